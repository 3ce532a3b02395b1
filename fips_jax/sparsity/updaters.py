"""Sparse-training updaters: Dense, Static, GMP, RigL and N:M, as optax wrappers.

An updater wraps an optax optimiser; the wrapped state is a `SparseState` holding the masks, so
jit, sharding and checkpointing carry them for free. The training step is

    grads = jax.grad(loss)(params)          # pruned entries are exactly 0, grads are dense
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    params = updater.post_gradient_update(params, opt_state)   # pruned entries exactly 0

Inside `tx.update` (all traceable): the inner optimiser sees grads masked by the current mask;
on update steps (`count % update_freq == 0`, count > 0) the masks are recomputed under
`lax.cond`; updates are zeroed wherever the old or the new mask is False, so pruned and freshly
grown entries do not move this step. Only leaves whose slash-joined path matches `filter_regex`
get masks (FiPS: the V factors, never U or biases).
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from fips_jax.sparsity import masks as mk
from fips_jax.sparsity.schedules import CosineDecay, PolynomialSchedule, ramp_over_run

PyTree = Any


class SparseState(NamedTuple):
    """Optax state of a sparsity-wrapped optimiser.

    masks: params-shaped; bool (True = kept) for sparse leaves, None for dense ones.
    inner_state: the wrapped optimiser's state.
    target_sparsities: params-shaped; float32 scalar target for sparse leaves, None otherwise.
    count: int32 scalar, number of `update` calls so far.
    """

    masks: PyTree
    inner_state: optax.OptState
    target_sparsities: PyTree
    count: jnp.ndarray


def get_sparse_state(opt_state: PyTree) -> SparseState:
    """The single SparseState inside a (possibly chained) optax state."""
    if isinstance(opt_state, SparseState):
        return opt_state
    found = [
        node
        for node in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, SparseState))
        if isinstance(node, SparseState)
    ]
    if len(found) != 1:
        raise ValueError(
            f"expected exactly one SparseState in the optimiser state, found {len(found)}"
        )
    return found[0]


def reset_moments(inner_state: PyTree, params_def: Any, reset: list[Any]) -> PyTree:
    """Zero the entries flagged in `reset` in every params-shaped subtree of an optax state.

    A subtree counts as params-shaped when its tree structure equals `params_def` (Adam's mu
    and nu, momentum traces); within it a leaf is touched only if its shape matches the flag.
    reset: flat list aligned with the params leaves, bool arrays or None.
    """

    def params_like(node):
        return jax.tree.structure(node) == params_def

    def zero(node):
        if not params_like(node):
            return node
        leaves = params_def.flatten_up_to(node)
        out = [
            x if r is None or getattr(x, "shape", None) != r.shape
            else jnp.where(r, jnp.zeros((), x.dtype), x)
            for x, r in zip(leaves, reset)
        ]
        return params_def.unflatten(out)

    return jax.tree.map(zero, inner_state, is_leaf=params_like)


@dataclasses.dataclass(frozen=True, kw_only=True)
class SparsityUpdater:
    """Base updater: one-shot global (or per-tensor) magnitude masks, never updated.

    sparsity: target fraction of zeros over the sparse leaves, in [0, 1).
    filter_regex: re.search over slash-joined param paths selecting the sparse leaves.
    scope: "global" (one top-k over all sparse leaves, raw magnitudes) or "per_tensor".
    update_freq: masks may change only on steps that are multiples of it.
    """

    sparsity: float = 0.0
    filter_regex: str = mk.DEFAULT_FILTER
    scope: str = "global"
    update_freq: int = 50

    # Subclasses that change masks during training set this; Static and Dense never do.
    dynamic = False

    def __post_init__(self):
        if not 0.0 <= self.sparsity < 1.0:
            raise ValueError(f"sparsity must be in [0, 1), got {self.sparsity}")
        mk.check_scope(self.scope)
        if self.update_freq < 1:
            raise ValueError(f"update_freq must be >= 1, got {self.update_freq}")

    # ---- hooks -------------------------------------------------------------------------------
    def initial_sparsity(self) -> float:
        """Sparsity of the mask built by `wrap_optax(...).init` (a Python float)."""
        return self.sparsity

    def last_update_step(self) -> int | None:
        """The last count at which an update can change the masks (None: no end). Later update
        steps would recompute the masks they already hold, so they are skipped."""
        return None

    def is_update_step(self, count: jnp.ndarray) -> jnp.ndarray:
        """bool scalar: whether the masks are recomputed at this count."""
        due = (count > 0) & (count % self.update_freq == 0)
        last = self.last_update_step()
        return due if last is None else due & (count <= last)

    def host_is_update_step(self, count: int) -> bool:
        """`is_update_step` for a Python int count: lets a training loop pick, per step, a
        compiled step with or without the mask update (`tx.update(..., mask_update=...)`)."""
        if not self.dynamic or count <= 0 or count % self.update_freq:
            return False
        last = self.last_update_step()
        return last is None or count <= last

    def update_masks(self, ws: list, masks: list, grads: list, count: jnp.ndarray) -> list:
        """New flat masks on an update step. ws/grads: flat leaves, None for dense leaves."""
        del ws, grads, count
        return masks

    def resets_moments(self) -> bool:
        """Whether entries that become active get their optimiser moments zeroed."""
        return False

    def one_shot_masks(self, ws: list, sparsity: float) -> list:
        """Flat masks at a concrete sparsity from scratch (init and `instant_sparsify`)."""
        return self.magnitude_masks(ws, [None if w is None else True for w in ws], sparsity)

    # ---- shared machinery --------------------------------------------------------------------
    def sparse_leaves(self, params: PyTree) -> list:
        """Flat params leaves, with None in place of every dense leaf."""
        flags = mk.select_sparse(params, self.filter_regex)
        return [w if f else None for w, f in zip(jax.tree.leaves(params), flags)]

    def keep_counts(self, ws: list, sparsity: Any) -> Any:
        """How many entries to keep: one count (global) or one per leaf (per_tensor).

        sparsity: a Python float (exact count) or a traced float32 scalar.
        """
        if isinstance(sparsity, (float, int)):
            count = lambda n: mk.num_keep(float(sparsity), n)  # noqa: E731
        else:
            count = lambda n: mk.num_keep_traced(sparsity, n, exact_at=self.sparsity)  # noqa: E731
        if self.scope == "global":
            return count(sum(w.size for w in ws if w is not None))
        return [None if w is None else count(w.size) for w in ws]

    def magnitude_masks(self, ws: list, active: list, sparsity: Any) -> list:
        """Top-k |w| among `active` entries at `sparsity`, restricted to `active`."""
        kept = mk.topk_magnitude_masks(ws, active, self.keep_counts(ws, sparsity), self.scope)
        return [None if k is None else k & a for k, a in zip(kept, active)]

    def target_sparsities(self, params: PyTree) -> PyTree:
        target = jnp.float32(self.sparsity)
        targets = [None if w is None else target for w in self.sparse_leaves(params)]
        return mk.unflatten_like(params, targets)

    def init_masks(self, params: PyTree) -> PyTree:
        """Masks at `initial_sparsity()` from the magnitudes of `params`."""
        masks = self.one_shot_masks(self.sparse_leaves(params), self.initial_sparsity())
        return mk.unflatten_like(params, masks)

    def instant_sparsify(
        self, params: PyTree, sparsity: float | None = None
    ) -> tuple[PyTree, PyTree]:
        """One-shot magnitude pruning: (masked params, masks), at the final target by default.

        For GMP the target is the END of the ramp; before GMP training pass
        `sparsity=updater.initial_sparsity()` (or skip this call and let `tx.init` build the
        initial mask), else the ramp starts from an already fully pruned model.
        """
        target = self.sparsity if sparsity is None else float(sparsity)
        masks = self.one_shot_masks(self.sparse_leaves(params), target)
        masks = mk.unflatten_like(params, masks)
        return mk.apply_masks(params, masks), masks

    def apply_masks(self, params: PyTree, masks: PyTree) -> PyTree:
        return mk.apply_masks(params, masks)

    def post_gradient_update(self, params: PyTree, sparse_state: PyTree) -> PyTree:
        """params * masks; `sparse_state` is a SparseState or any optax state containing one."""
        return mk.apply_masks(params, get_sparse_state(sparse_state).masks)

    def wrap_optax(
        self, inner: optax.GradientTransformation
    ) -> optax.GradientTransformationExtraArgs:
        """`inner` with masked gradients/updates and mask updates; its state is a SparseState.
        (Long because it holds optax's init/update pair as closures over this updater.)"""
        inner = optax.with_extra_args_support(inner)

        def init_fn(params):
            return SparseState(
                masks=self.init_masks(params),
                inner_state=inner.init(params),
                target_sparsities=self.target_sparsities(params),
                count=jnp.zeros([], jnp.int32),
            )

        def update_fn(updates, state, params=None, mask_update=None, **extra_args):
            """mask_update: None decides on device from the count (`lax.cond`); a Python bool
            (the caller knows the count, `host_is_update_step`) compiles only that branch, so
            a step without a mask update carries no conditional, whose branches would copy
            every mask and V at each step."""
            old = mk.flatten_like(updates, state.masks)
            grads = jax.tree.leaves(updates)
            # The inner optimiser only sees gradients of kept entries, so pruned entries build
            # no moments; RigL reads the dense `grads` itself.
            masked_grads = mk.apply_masks(updates, state.masks)
            new_updates, inner_state = inner.update(
                masked_grads, state.inner_state, params, **extra_args
            )

            new = old
            if self.dynamic and any(m is not None for m in old):
                if params is None:
                    raise ValueError(
                        f"{type(self).__name__} needs params in tx.update to update masks"
                    )
                ws = [None if m is None else w for w, m in zip(jax.tree.leaves(params), old)]
                dense_grads = [None if m is None else g for g, m in zip(grads, old)]
                if mask_update is None:
                    new = jax.lax.cond(
                        self.is_update_step(state.count),
                        lambda: self.update_masks(ws, old, dense_grads, state.count),
                        lambda: old,
                    )
                elif mask_update:
                    new = self.update_masks(ws, old, dense_grads, state.count)
                if self.resets_moments() and new is not old:
                    grown = [None if o is None else n & ~o for n, o in zip(new, old)]
                    inner_state = reset_moments(inner_state, jax.tree.structure(updates), grown)

            # Entries pruned now or before, and entries grown this step, do not move.
            out = [
                u if o is None else jnp.where(o & n, u, jnp.zeros((), u.dtype))
                for u, o, n in zip(jax.tree.leaves(new_updates), old, new)
            ]
            new_state = SparseState(
                masks=mk.unflatten_like(updates, new),
                inner_state=inner_state,
                target_sparsities=state.target_sparsities,
                count=state.count + 1,
            )
            return mk.unflatten_like(updates, out), new_state

        return optax.GradientTransformationExtraArgs(init_fn, update_fn)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Dense(SparsityUpdater):
    """No sparsity: no masks (all None); the optimiser runs unchanged."""

    def __post_init__(self):
        super().__post_init__()
        if self.sparsity != 0.0:
            raise ValueError(f"Dense takes sparsity 0, got {self.sparsity}")

    def sparse_leaves(self, params: PyTree) -> list:
        return [None for _ in jax.tree.leaves(params)]


@dataclasses.dataclass(frozen=True, kw_only=True)
class Static(SparsityUpdater):
    """One-shot magnitude pruning to the target at init; the mask never changes."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class GMP(SparsityUpdater):
    """Gradual magnitude pruning on a `PolynomialSchedule` (see schedules.py for defaults).

    On every update step the kept set shrinks to the top-k magnitudes among the currently kept
    entries, so a pruned weight is never revived.

    t_end: number of training steps (the loop runs steps 0 .. t_end - 1). The ramp ends, and the
    target is in place, at the last update step before t_end,
    T = update_freq * floor((t_end - 1) / update_freq); e.g. t_end = 400, update_freq = 50:
    T = 350. init_sparsity/begin_step: None for the paper's shape relative to T
    (25% at step 0 -> 50% at T/4 -> 75% at T for a 0.75 target).
    """

    t_end: int
    init_sparsity: float | None = None
    begin_step: float | None = None
    reference_parity: bool = False

    dynamic = True

    @property
    def schedule(self) -> PolynomialSchedule:
        return ramp_over_run(self.sparsity, self.t_end, self.update_freq, init_sparsity=self.init_sparsity,
                             begin_step=self.begin_step, reference_parity=self.reference_parity)

    def __post_init__(self):
        super().__post_init__()
        self.schedule  # validates the schedule arguments  # noqa: B018

    def initial_sparsity(self) -> float:
        return self.schedule.initial

    def last_update_step(self) -> int:
        # From end_step on the schedule is constant and the kept set already has its count.
        return self.schedule.end_step

    def update_masks(self, ws, masks, grads, count):
        return self.magnitude_masks(ws, masks, self.schedule(count))


@dataclasses.dataclass(frozen=True, kw_only=True)
class RigL(SparsityUpdater):
    """RigL (Evci et al. 2020): constant sparsity, periodic drop-and-grow.

    Starts at the target by magnitude. On update steps before t_end, with
    f = drop_fraction * (1 + cos(pi * step / t_end)) / 2 and k active entries (globally or per
    tensor), n = min(round(f * k), #inactive) entries are swapped: the n smallest-magnitude
    active ones are dropped and the n previously inactive ones with the largest dense-gradient
    magnitude are grown (just-dropped entries are not candidates). Grown weights start at exactly
    0 and their optimiser moments are zeroed, unless `reference_parity` (the authors' code keeps
    stale moments).
    """

    t_end: int
    drop_fraction: float = 0.1
    reference_parity: bool = False

    dynamic = True

    def __post_init__(self):
        super().__post_init__()
        if not 0.0 <= self.drop_fraction <= 1.0:
            raise ValueError(f"drop_fraction must be in [0, 1], got {self.drop_fraction}")
        if self.t_end < 1:
            raise ValueError(f"t_end must be >= 1, got {self.t_end}")

    def resets_moments(self) -> bool:
        return not self.reference_parity

    def last_update_step(self) -> int:
        return self.t_end - 1

    def update_masks(self, ws, masks, grads, count):
        frac = CosineDecay(self.drop_fraction, self.t_end)(count)
        inactive = [None if m is None else ~m for m in masks]

        # uint32 counts: a V group of an 8B model has more entries than int32 can count.
        def swaps(active, size):
            n = jnp.minimum(jnp.round(frac * active.astype(jnp.float32)).astype(jnp.uint32), active)
            return jnp.minimum(n, jnp.uint32(size) - active)

        if self.scope == "global":
            active = sum(m.sum(dtype=jnp.uint32) for m in masks if m is not None)
            n = swaps(active, sum(m.size for m in masks if m is not None))
            keep, grow = active - n, n
        else:
            active = [None if m is None else m.sum(dtype=jnp.uint32) for m in masks]
            n = [None if m is None else swaps(a, m.size) for m, a in zip(masks, active)]
            keep = [None if m is None else a - k for m, a, k in zip(masks, active, n)]
            grow = n
        kept = mk.topk_magnitude_masks(ws, masks, keep, self.scope)
        grown = mk.topk_magnitude_masks(grads, inactive, grow, self.scope)
        return [
            None if m is None else (k & m) | (g & ~m) for m, k, g in zip(masks, kept, grown)
        ]


@dataclasses.dataclass(frozen=True, kw_only=True)
class NM(SparsityUpdater):
    """N:M structured magnitude sparsity: in every tile of `m` consecutive entries along `axis`
    keep the `n` largest |w| (ties to the lower index). Sparsity is 1 - n/m; scope is ignored.

    t_end = 0 (default): the N:M mask is built once by magnitude and kept fixed. t_end > 0
    (number of training steps, as for GMP): gradual N:M-GMP: every update step each tile keeps
    clip(round(m * (1 - s(step))), n, m) of its currently kept entries, s following GMP's
    `PolynomialSchedule` to 1 - n/m; a pruned entry is never revived.

    axis: the tile axis, which must be the one the sparse kernel reduces over (for `x @ V`
    with V [r, p] that is axis 0; for `x @ V.T` it is axis 1).
    """

    n: int = 2
    m: int = 4
    axis: int = -1
    t_end: int = 0

    def __post_init__(self):
        if not 0 < self.n <= self.m:
            raise ValueError(f"N:M needs 0 < n <= m, got {self.n}:{self.m}")
        realised = 1.0 - self.n / self.m
        if self.sparsity not in (0.0, realised):
            raise ValueError(f"{self.n}:{self.m} realises sparsity {realised}, got {self.sparsity}")
        object.__setattr__(self, "sparsity", realised)
        super().__post_init__()
        if self.t_end < 0:
            raise ValueError(f"t_end must be >= 0, got {self.t_end}")
        if self.t_end:
            self.schedule  # validates  # noqa: B018

    @property
    def dynamic(self) -> bool:  # type: ignore[override]
        return self.t_end > 0

    @property
    def schedule(self) -> PolynomialSchedule:
        return ramp_over_run(self.sparsity, self.t_end, self.update_freq)

    def tile_keep(self, sparsity: Any) -> Any:
        """Entries kept per tile at `sparsity` (Python float or traced scalar)."""
        if isinstance(sparsity, float):
            return min(max(int(round(self.m * (1.0 - sparsity))), self.n), self.m)
        return jnp.clip(jnp.round(self.m * (1.0 - sparsity)), self.n, self.m).astype(jnp.int32)

    def initial_sparsity(self) -> float:
        return self.schedule.initial if self.t_end else self.sparsity

    def last_update_step(self) -> int | None:
        return self.schedule.end_step if self.t_end else None

    def sparse_leaves(self, params: PyTree) -> list:
        ws = super().sparse_leaves(params)
        for (name, _), w in zip(mk.named_leaves(params), ws):
            if w is not None and (w.ndim == 0 or w.shape[self.axis] % self.m):
                raise ValueError(
                    f"{name}: shape {w.shape} has no axis {self.axis} divisible into "
                    f"{self.n}:{self.m} tiles of {self.m}"
                )
        return ws

    def one_shot_masks(self, ws, sparsity):
        k = self.tile_keep(float(sparsity))
        return [None if w is None else mk.nm_mask(w, k, self.m, self.axis) for w in ws]

    def update_masks(self, ws, masks, grads, count):
        k = self.tile_keep(self.schedule(count))
        return [
            None if w is None else mk.nm_mask(w, k, self.m, self.axis, a)
            for w, a in zip(ws, masks)
        ]
