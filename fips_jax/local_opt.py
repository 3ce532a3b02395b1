"""Local error minimisation: reconstruction losses for one group and the resumable training loop.

A group's trainable params are `factors`' dict {"u", "v", "bias"}.
The loss materialises W: for calibration batches (thousands of tokens) `d*r*p` flops per FC
are cheaper than the factored `T*(d*r + r*p)`.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fips_jax import factors, grouping, sparsity
from fips_jax.models import base

Params = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class LocalOptConfig:
    """Optimiser and sparsity settings of one local error minimisation run (SPEC §4, §5)."""

    steps: int
    lr: float = 1e-3
    end_lr: float = 1e-5
    weight_decay: float = 0.05
    algorithm: str = "gmp"        # dense | static | gmp | rigl | nm
    sparsity: float = 0.75
    update_freq: int = 50
    drop_fraction: float = 0.1    # RigL
    scope: str = "global"         # global | per_tensor
    n: int = 2                    # N:M
    m: int = 4
    nm_axis: int = -1
    prune_end: float = 1.0        # GMP reaches the target at this fraction of the steps (paper: 1.0)
    reference_parity: bool = False


V_FILTER = r"(^|/)v$"


def make_optimizer(cfg: LocalOptConfig):
    """AdamW (decoupled weight decay) on a cosine schedule with no warmup, wrapped by the
    sparsity updater that masks V. Returns (tx, updater)."""
    if cfg.steps < 1:
        raise ValueError(f"local optimisation needs steps >= 1, got {cfg.steps}")
    lr = optax.cosine_decay_schedule(cfg.lr, cfg.steps, alpha=cfg.end_lr / cfg.lr if cfg.lr else 0.0)
    updater = sparsity.create_updater(
        algorithm=cfg.algorithm,
        sparsity=cfg.sparsity,
        # Short runs end the ramp early to leave steps for recovery at the final sparsity; a ramp
        # ends no earlier than just after the first mask update (step update_freq), which then
        # reaches the target.
        t_end=max(int(round(cfg.prune_end * cfg.steps)), cfg.update_freq + 1),
        update_freq=cfg.update_freq,
        filter_regex=V_FILTER,
        scope=cfg.scope,
        drop_fraction=cfg.drop_fraction,
        n=cfg.n,
        m=cfg.m,
        axis=cfg.nm_axis,
        reference_parity=cfg.reference_parity,
    )
    return updater.wrap_optax(optax.adamw(lr, weight_decay=cfg.weight_decay)), updater


def stack_dense_mlps(dense_params: Mapping[str, Any], layout: grouping.GroupLayout) -> dict:
    """The group's dense MLP params stacked on a leading block axis (the frozen teacher)."""
    mlps = [base.get_path(dense_params, row[0].rsplit("/", 2)[0]) for row in layout.fc_paths]
    return base.stack_trees([jax.tree_util.tree_map(lambda x: x.astype(jnp.float32), m) for m in mlps])


def mlp_targets(spec: base.MlpSpec, teacher: Mapping[str, Any], x: jax.Array) -> jax.Array:
    """Dense MLP outputs [n, T, d] of the stacked teacher params on the MLP inputs x [n, T, d]."""
    return jax.vmap(lambda t, xb: base.mlp_apply(spec, t, xb))(teacher, x)


def mlp_outputs(ws: jax.Array, bias: Mapping[str, jax.Array] | None, spec: base.MlpSpec, x: jax.Array,
                compute_dtype: Any = jnp.float32) -> jax.Array:
    """Every block's MLP output [n, T, d] from its materialised FCs ws [n, F, d, p] (biases
    {fc: [n, out]} or None) on its inputs x [n, T, d]. compute_dtype: see `mlp_group_loss`."""
    cd = jnp.dtype(compute_dtype)
    x = x.astype(jnp.float32)  # inputs may come in the model's dtype (bfloat16): upcast exactly
    # split, not per-FC indexing: its transpose concatenates the FCs' weight gradients into
    # one [n, F, d, p] array instead of adding one zero-padded full-size copy per FC.
    w_fc = [w[:, 0] for w in jnp.split(ws, len(spec.fc_names), axis=1)]
    act = base.ACTIVATIONS[spec.activation]

    def fc(f, h):
        # Batched over blocks: h [n, T, in]; W_f [n, d, p] read as [in, out] (transposed FCs: p -> d).
        eq = "ntp,ndp->ntd" if spec.transposed[f] else "ntd,ndp->ntp"
        y = factors.mixed_einsum(eq, h, w_fc[f], cd)
        if bias is not None:
            y = y + bias[spec.fc_names[f]][:, None, :].astype(jnp.float32)
        return y

    if spec.gated:
        gate, up, down = range(3)
        return fc(down, act(fc(gate, x)) * fc(up, x))
    return fc(1, act(fc(0, x)))


def _mse(out: jax.Array, targets: jax.Array) -> tuple[jax.Array, jax.Array]:
    per_block = jnp.mean(jnp.square(out - targets.astype(jnp.float32)), axis=(1, 2))
    return jnp.mean(per_block), per_block


def _block_remat_mses(params: Params, spec: base.MlpSpec, x: jax.Array, targets: jax.Array,
                      cd: Any) -> jax.Array:
    """Per-block MSE [n] computed one block at a time (a loop over blocks), each block's forward
    (its W = U V_b and MLP activations) recomputed in the backward instead of kept: the step
    holds one block's W, activations and their gradients at a time instead of the group's."""
    u = params["u"]

    def one(args):
        v_b, bias_b, x_b, t_b = args
        ws = factors.group_weights(u, v_b[None], cd)
        bias = None if bias_b is None else {k: b[None] for k, b in bias_b.items()}
        out = mlp_outputs(ws, bias, spec, x_b[None], cd)[0]
        return jnp.mean(jnp.square(out - t_b.astype(jnp.float32)))

    return jax.lax.map(jax.checkpoint(one), (params["v"], params.get("bias"), x, targets))


def mlp_group_loss(params: Params, spec: base.MlpSpec, x: jax.Array, targets: jax.Array,
                   compute_dtype: Any = jnp.float32, block_remat: bool = False) -> tuple[jax.Array, jax.Array]:
    """LLM loss: MSE of each block's MLP output on the dense model's MLP inputs (teacher forcing).

    x, targets: [n, T, d] MLP inputs and the dense MLP's outputs on them.
    Returns (mean over blocks, per-block MSE [n]). The mean gives the shared U the mean of the
    group's gradients (the joint group update of Algorithm 1).
    compute_dtype: operand dtype of the matmuls (bfloat16: float32 params cast per step); every
    product accumulates in float32 and the activations, the loss and its gradients' sums stay
    float32.
    block_remat: blocks one at a time with their forward rematerialised (`_block_remat_mses`);
    the same loss up to float rounding (U's gradient is summed block by block), a fraction of
    the step's temporaries.
    """
    if block_remat:
        per_block = _block_remat_mses(params, spec, x, targets, jnp.dtype(compute_dtype))
        return jnp.mean(per_block), per_block
    ws = factors.group_weights(params["u"], params["v"], jnp.dtype(compute_dtype))
    return _mse(mlp_outputs(ws, params.get("bias"), spec, x, compute_dtype), targets)


def mlp_parts_loss(parts: Sequence[Params], part_layouts: Sequence[grouping.GroupLayout],
                   layout: grouping.GroupLayout, spec: base.MlpSpec, x: jax.Array, targets: jax.Array,
                   compute_dtype: Any = jnp.float32) -> tuple[jax.Array, jax.Array]:
    """`mlp_group_loss` for any method's parts covering the group (`factors.part_weights`)."""
    ws, bias = factors.part_weights(list(zip(part_layouts, parts)), layout, jnp.dtype(compute_dtype))
    return _mse(mlp_outputs(ws, bias, spec, x, compute_dtype), targets)


def block_outputs_loss(
    params: Mapping[str, Params],
    arch: base.Architecture,
    dense_params: Mapping[str, Any],
    layouts: Mapping[str, grouping.GroupLayout],
    inputs: Mapping[int, jax.Array],
    targets: Mapping[int, jax.Array],
    ctx: Any,
) -> tuple[jax.Array, jax.Array]:
    """ViT loss: sum over blocks of the MSE of the block output, attention frozen, each block fed
    the dense model's input (teacher forcing). Blocks may differ (Swin's shifted windows), so
    they are unrolled rather than vmapped.

    params: {group name: group params}; inputs/targets: {block index: [B, tokens, d]}.
    Returns (sum, per-block MSE in block order).
    """
    model = dense_params
    for g, layout in layouts.items():
        model = factors.assemble(model, [(layout, params[g])])
    per_block = []
    for i in sorted(inputs):
        out, _ = arch.block(model, i, inputs[i], ctx)
        per_block.append(jnp.mean(jnp.square(out - targets[i])))
    per_block = jnp.stack(per_block)
    return jnp.sum(per_block), per_block


def _all_finite(tree: Any) -> jax.Array:
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(tree)]))


def make_step(loss_fn: Callable[..., tuple[jax.Array, jax.Array]], tx: optax.GradientTransformation, updater,
              check_finite: bool = False, mask_update: bool | None = None) -> Callable:
    """One update: grads of `loss_fn(params, *batch)`, the wrapped optimiser, then the masks.

    The forward sees params directly; pruned V entries are exactly zero, so the gradient w.r.t. V
    is dense (what RigL grows by). Undecorated: jit at the call site (donate params/opt_state).
    Returns (params, opt_state, loss, aux); with `check_finite` a fifth output, bool [3]: whether
    the loss, every gradient and every updated param are finite (one reduction each, in the step).
    mask_update: None lets the step decide from its count; True/False builds a step that always /
    never updates the masks (the caller picks by `updater.host_is_update_step(step)`).
    """
    kw = {} if mask_update is None else {"mask_update": mask_update}

    def step(params, opt_state, *batch):
        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, *batch)
        updates, opt_state = tx.update(grads, opt_state, params, **kw)
        params = optax.apply_updates(params, updates)
        params = updater.post_gradient_update(params, sparsity.get_sparse_state(opt_state))
        if check_finite:
            return params, opt_state, loss, aux, jnp.stack([jnp.isfinite(loss), _all_finite(grads), _all_finite(params)])
        return params, opt_state, loss, aux

    return step


@functools.lru_cache(maxsize=16)
def _compiled_step(loss_fn: Callable, cfg: LocalOptConfig, mask_update: bool, out_shardings: Any) -> Callable:
    """The jitted, donating step of `train`, one per (loss, config, branch, shardings): every
    group (every block in sequential mode) of the same shapes reuses one compile when the
    caller passes the same `loss_fn` object. out_shardings: a hashable `_Hashable` or None."""
    tx, updater = make_optimizer(cfg)
    kw = {} if out_shardings is None else {"out_shardings": out_shardings.value}
    return jax.jit(make_step(loss_fn, tx, updater, check_finite=True, mask_update=mask_update),
                   donate_argnums=(0, 1), **kw)


class _Hashable:
    """A pytree of shardings keyed by its flattened form (dicts are not hashable)."""

    def __init__(self, value):
        self.value = value
        leaves, treedef = jax.tree_util.tree_flatten(value)
        self._key = (tuple(leaves), treedef)

    def __hash__(self):
        return hash(self._key)

    def __eq__(self, other):
        return isinstance(other, _Hashable) and self._key == other._key


def minibatch_indices(key: jax.Array, step: jax.Array, n_tokens: int, batch: int) -> jax.Array:
    """Token positions of minibatch `step`: a fresh shuffle each epoch, derived from the step
    number alone, so a resumed run sees exactly the batches an uninterrupted one would."""
    per_epoch = max(n_tokens // batch, 1)
    epoch, j = step // per_epoch, step % per_epoch
    perm = jax.random.permutation(jax.random.fold_in(key, epoch), n_tokens)
    return jax.lax.dynamic_slice_in_dim(perm, j * batch, min(batch, n_tokens))


class HostBatches:
    """Minibatches of host arrays fed to `train` one step at a time.

    arrays: host (numpy) arrays [n, T, ...] sharing the token axis 1, in any dtype (the model's:
    the step casts and accumulates in float32). Step s gets `a[:, idx]` of each, idx the positions
    `minibatch_indices(key, s, T, batch)` gives (the same tokens a step that gathers on the device
    would take), put on the device with `sharding_for(shape)` (None: the default device). Only
    minibatches ever reach the device; `train` asks for step s + 1 while step s runs.
    File-backed arrays (`calibration.ActivationStore`, local.store=disk) are read row by row with
    `os.preadv` (`calibration.gather`), so RSS holds the minibatch, not the file.

    mesh, with several processes: the arrays are this process's share of the tokens (its slot's
    contiguous positions of the T = processes x local tokens; `sharding.process_slot`). Every
    process draws the same positions; each fills the rows it holds into a zero minibatch, and one
    device computation adds the processes' minibatches (each row is nonzero in one of them, so
    the sum is exact): the step gets the minibatch one process holding every token would give.
    That costs processes x minibatch of device memory, spread over the mesh, for one step.
    """

    def __init__(self, arrays: Sequence[np.ndarray], key: jax.Array, batch: int,
                 sharding_for: Callable[[tuple[int, ...]], Any] | None = None, mesh: Any = None):
        from fips_jax import sharding  # pylint: disable=import-outside-toplevel

        self.arrays = tuple(arrays)
        self.split = mesh is not None and sharding.multi_process()
        self.mesh, self.local_tokens = mesh, int(self.arrays[0].shape[1])
        self.n_tokens = self.local_tokens * (jax.process_count() if self.split else 1)
        self.first = sharding.process_slot(mesh) * self.local_tokens if self.split else 0
        self.batch = min(int(batch), self.n_tokens)
        self.key, self.sharding_for = key, sharding_for
        self._perm: tuple[int, np.ndarray] | None = None
        self._combine: dict = {}

    def indices(self, step: int) -> np.ndarray:
        """`minibatch_indices(key, step, T, batch)` on the host, one permutation per epoch."""
        per_epoch = max(self.n_tokens // self.batch, 1)
        epoch, j = divmod(int(step), per_epoch)
        if self._perm is None or self._perm[0] != epoch:
            perm = jax.random.permutation(jax.random.fold_in(self.key, epoch), self.n_tokens)
            self._perm = (epoch, np.asarray(perm))
        return self._perm[1][j * self.batch:(j + 1) * self.batch]

    def __call__(self, step: int) -> tuple[jax.Array, ...]:
        from fips_jax import calibration, sharding  # pylint: disable=import-outside-toplevel

        idx = self.indices(step)
        out = []
        for a in self.arrays:
            if self.split:
                out.append(self._split_minibatch(a, idx))
                continue
            mb = calibration.gather(a, idx)  # np.ascontiguousarray(a[:, idx])
            sh = None if self.sharding_for is None else self.sharding_for(mb.shape)
            out.append(jax.device_put(mb) if sh is None else sharding.put(mb, sh))
        return tuple(out)

    def _split_minibatch(self, a: np.ndarray, idx: np.ndarray) -> jax.Array:
        from fips_jax import calibration, sharding  # pylint: disable=import-outside-toplevel

        own = (idx >= self.first) & (idx < self.first + self.local_tokens)
        mb = np.zeros((a.shape[0], idx.shape[0]) + a.shape[2:], a.dtype)
        if own.any():
            mb[:, own] = calibration.gather(a, idx[own] - self.first)
        shape = mb.shape
        fn = self._combine.get((shape, mb.dtype))
        if fn is None:
            p = jax.process_count()

            def combine(g):  # [n, P * B, ...] -> [n, B, ...]: the slots' minibatches added
                return jnp.sum(g.reshape((shape[0], p) + shape[1:]), axis=1, dtype=g.dtype)

            sh = self.sharding_for(shape) if self.sharding_for is not None else sharding.replicated(self.mesh)
            fn = self._combine.setdefault((shape, mb.dtype), jax.jit(combine, out_shardings=sh))
        return fn(sharding.from_process_rows(mb, self.mesh, axis=1))


def _buffers(x: jax.Array) -> set:
    """The device buffers behind x's addressable shards (two arrays may share them)."""
    return {(str(s.device), s.data.unsafe_buffer_pointer()) for s in x.addressable_shards}


def _unshared(tree: Any) -> Any:
    """`tree` with a copy of each leaf that is the same array object as an earlier leaf."""
    seen: set[int] = set()

    def one(x):
        if id(x) in seen:
            return jnp.array(x)
        seen.add(id(x))
        return x

    return jax.tree_util.tree_map(one, tree)


class Interrupted(Exception):
    """Raised by a step hook to stop a run (tests use it to simulate a kill)."""


class NonFiniteError(ValueError):
    """A step produced a non-finite loss, gradient or param; the run stopped before saving it."""


_FINITE_PARTS = ("loss", "gradient", "params after the update")


def train(
    params: Params,
    loss_fn: Callable[..., tuple[jax.Array, jax.Array]],
    consts: Sequence[Any],
    cfg: LocalOptConfig,
    ckpt_dir: str,
    *,
    checkpoint_every: int = 50,
    log: Callable[[str], None] = print,
    name: str = "local",
    on_step: Callable[[int, float], None] | None = None,
    param_shardings: Any = None,
    feed: Callable[[int], tuple] | None = None,
    consume: bool = False,
) -> tuple[Params, list[float]]:
    """Run `cfg.steps` updates of `loss_fn(params, step, *feed(step), *consts) -> (loss, aux)`,
    resuming from the latest checkpoint in `ckpt_dir` if there is one.

    feed: per-step arguments (e.g. `HostBatches`: a minibatch put on the device), a function of
    the step number; the next step's are prepared while the current step runs (jax dispatches
    the step asynchronously). None: no per-step arguments.

    The minibatch is a function of the step number (see `minibatch_indices`), so a resumed run
    computes exactly what an uninterrupted one would. Returns the final params and the loss at
    every step of this process's part of the run (losses before a resume are in the checkpoint).

    param_shardings: NamedShardings of `params` (`sharding.group_shardings`); the optimiser state
    shadows them and the step keeps both in place. Consts keep the shardings they come with.

    Failure safety: the step also reports whether its loss, gradients and updated params are all
    finite; the host checks it with the loss (already pulled every step), before any checkpoint
    of that step is written. The first non-finite step stops the run with `NonFiniteError` naming
    `name`, the step and the last checkpoint saved (all finite): stopping rather than skipping the
    step, because a NaN here means diverged training or broken inputs, which skipping would hide.
    A rerun resumes from that checkpoint.

    consume: the caller hands `params` over. They are not copied: the step donates them, and
    every input leaf the masked initial state does not reuse is deleted, so the initial params
    never sit on the device beside the trained ones (V-sized: 10 GiB for a Llama-3.1-8B group).
    The caller's references to them are dead afterwards. False: the caller keeps them (a copy).
    """
    from fips_jax import checkpointing, sharding  # pylint: disable=import-outside-toplevel

    tx, updater = make_optimizer(cfg)
    given = jax.tree_util.tree_leaves(params) if consume else []
    if not consume:  # the step donates its buffers, and the caller keeps the initial params
        params = jax.tree_util.tree_map(jnp.array, params)
    out_shardings = None
    if param_shardings is not None:
        params = jax.device_put(params, param_shardings)
        o_sh = sharding.shadow_shardings(jax.eval_shape(tx.init, params), params, param_shardings)
        scalar = jax.sharding.NamedSharding(jax.tree.leaves(param_shardings)[0].mesh, jax.sharding.PartitionSpec())
        out_shardings = _Hashable((param_shardings, o_sh, scalar, scalar, scalar))
        init = jax.jit(tx.init, out_shardings=o_sh)
    else:
        init = tx.init
    # The initial masks: the schedule's value at step 0 (GMP: 25%). A leaf that is the same
    # array as an earlier one (e.g. one target-sparsity scalar for every leaf) is copied, since
    # the step donates each leaf; the others are used as they are, not copied (Adam's moments
    # are twice V).
    opt_state = _unshared(init(params))
    params = updater.post_gradient_update(params, opt_state)
    state = {"params": params, "opt_state": opt_state}
    leaves, treedef = jax.tree_util.tree_flatten(state)
    if given:  # consumed inputs whose buffers the state does not use (e.g. V before its masking)
        kept = set().union(*(_buffers(x) for x in leaves if isinstance(x, jax.Array)))
        for x in given:
            if isinstance(x, jax.Array) and not x.is_deleted() and not _buffers(x) & kept:
                x.delete()
    del given
    ckpt = checkpointing.LoopCheckpointer(ckpt_dir)
    start = ckpt.latest_step() or 0
    losses: list[float] = []
    if start:
        saved = ckpt.restore(start, {"leaves": {str(i): x for i, x in enumerate(leaves)}, "losses": np.zeros((start,), np.float32)})
        state = jax.tree_util.tree_unflatten(treedef, [saved["leaves"][str(i)] for i in range(len(leaves))])
        losses = [float(x) for x in saved["losses"]]
        log(f"{name}: resumed at step {start}/{cfg.steps}")
    params, opt_state = state["params"], state["opt_state"]
    # Whether a step updates the masks is known here from its number (the optimiser's count is
    # the step), so each step runs a program with only its branch; later mask updates that could
    # change nothing (GMP after its ramp, RigL after t_end) are never run.
    steps = {u: _compiled_step(loss_fn, cfg, u, out_shardings) for u in (False, True)}
    t0 = time.perf_counter()
    saved_at = start
    nxt = feed(start) if feed is not None and start < cfg.steps else ()
    for step in range(start, cfg.steps):
        step_fn = steps[updater.host_is_update_step(step)]
        batch = nxt
        params, opt_state, loss, _, finite = step_fn(params, opt_state, jnp.int32(step), *batch, *consts)
        del batch
        # Prefetch: the next minibatch is gathered and sent while this step runs.
        nxt = feed(step + 1) if feed is not None and step + 1 < cfg.steps else ()
        losses.append(float(loss))
        done = step + 1
        finite = np.asarray(finite)
        if not finite.all():
            ckpt.close()  # lets a pending save of the last good step finish
            bad = ", ".join(part for part, ok in zip(_FINITE_PARTS, finite) if not ok)
            where = (f"the last good checkpoint is step {saved_at} in {ckpt_dir}; a rerun resumes from there"
                     if saved_at else f"no checkpoint was saved yet in {ckpt_dir}; a rerun starts over")
            raise NonFiniteError(f"{name}: non-finite {bad} at step {done}/{cfg.steps} (loss {losses[-1]}); "
                                 f"stopped without saving it: {where}")
        if done % checkpoint_every == 0 or done == cfg.steps:
            leaves = jax.tree_util.tree_leaves({"params": params, "opt_state": opt_state})
            ckpt.save(done, {"leaves": {str(i): x for i, x in enumerate(leaves)}, "losses": np.asarray(losses, np.float32)})
            saved_at = done
        if done % max(cfg.steps // 10, 1) == 0 or done == cfg.steps:
            rate = (done - start) / max(time.perf_counter() - t0, 1e-9)
            log(f"{name}: step {done}/{cfg.steps} loss {losses[-1]:.4g} ({rate:.2f} steps/s)")
        if on_step is not None:
            ckpt.wait()
            on_step(done, losses[-1])
        checkpointing.fault_point("train_step")
    ckpt.close()
    return params, losses
