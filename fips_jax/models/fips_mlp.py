"""One block's FiPS-compressed MLP: the group's shared basis U times this block's factors V_t.

Block b's FC t is `W_t = U V_t` (SPEC §1) with U: [d, r] shared by the group and
V_t: [r, p] sparse. Three forwards of the same function, chosen by `mode`:

  "materialize"  W_t = U V_t, then the dense MLP (`base.mlp_apply`): d*r*p flops per FC up front,
                 the cheap choice for calibration batches of thousands of tokens.
  "factored"     fc1-like `(x @ U) @ V_t`, fc2/down-like `(x @ V_t^T) @ U^T`; W never exists.
  "sparse"       the factored products with every V_t held packed: nonzeros and their rows.

Each FC's factor is its own array (`v_<fc>`), not a slice of one [F, r, p] array: XLA on CPU
copies a sliced dot operand on every call.

Packed V (`PackedV`), ELLPACK along r, the axis `(x @ U) @ V_t` contracts over: for every column
j of V_t [r, p], the rows of its nonzeros in increasing order, padded to K per column
(K = the largest column count; padding has value 0 on a row the column does not use):

    values [K, p] float      index [K, p] uint16 row in [0, r)

N:M: when every tile of m consecutive rows of a column keeps at most n entries (e.g. the 2:4 masks
of `sparsity.create_updater("nm", n=2, m=4, axis=-2)` on v [n_blocks, F, r, p]), K = r n / m and
entry k of a column lies in tile k // n, so the index shrinks to the position inside the tile
(uint8 in [0, m)). Tiles run along r because r is the reduction dimension of `(x U) V_t`:
`y^T = V_t^T (x U)^T` is the shape 2:4 tensor-core kernels take, sparse operand V_t^T [p, r] with
its N:M tiles along the reduction. (fc2/down-like FCs reduce over p; a hardware kernel for them
would want tiles along p, but the updater has one axis for the whole v leaf.)

A packed V runs with one of two kernels, both plain XLA so they work on CPU under jit:
  "densify"  rebuild V_t [r, p] inside the jitted function (N:M: compare-and-select; otherwise a
             scatter), then the factored matmuls; between calls only the packed V is held.
  "gather"   never forms V_t: gathers (fc1-like) or scatter-adds (fc2-like) the K entries of
             every column, T*K*p work; worth it only for a handful of tokens (decoding).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fips_jax import factors
from fips_jax.models import base

MODES = ("materialize", "factored", "sparse")
SPARSE_KERNELS = ("densify", "gather")
INDEX_COLLECTION = "fips_index"  # non-trainable integer variables: packed V's row indices


@flax.struct.dataclass
class PackedV:
    """One FC's V [r, p] as ELLPACK along r (see the module docstring).

    values: [K, p] float; index: [K, p] uint16 rows (uint8 tile positions when `nm`).
    """

    values: jax.Array
    index: jax.Array
    rank: int = flax.struct.field(pytree_node=False)
    nm: tuple[int, int] | None = flax.struct.field(pytree_node=False, default=None)

    def rows(self) -> jax.Array:
        """int32 [K, p]: the row of V that every stored entry belongs to."""
        idx = self.index.astype(jnp.int32)
        if self.nm is None:
            return idx
        n, m = self.nm
        return ((jnp.arange(idx.shape[0], dtype=jnp.int32) // n) * m)[:, None] + idx

    def dense(self) -> jax.Array:
        """V [r, p], exactly: every stored value lands once, every other entry is +0."""
        k, p = self.values.shape
        if self.nm is not None:
            # Each stored entry of a tile sits at one of m positions: select, do not scatter.
            n, m = self.nm
            vals = self.values.reshape(k // n, n, 1, p)
            hit = self.index.reshape(k // n, n, 1, p).astype(jnp.int32) == jnp.arange(m)[:, None]
            return jnp.sum(jnp.where(hit, vals, jnp.zeros((), vals.dtype)), axis=1).reshape(self.rank, p)
        # The scatter's zeros are computed from the values (|finite| * 0 = +0), so that they are
        # allocated when the values are ready, not hoisted to the start of a jitted function.
        zeros = jnp.broadcast_to(jnp.abs(jnp.nan_to_num(self.values[0, 0])) * 0, (self.rank, p))
        # Rows within a column are distinct (padding uses rows the column does not use).
        return zeros.at[self.rows(), jnp.arange(p)].set(self.values, unique_indices=True)


def _kept(v: np.ndarray, mask: Any) -> np.ndarray:
    if mask is None:
        return v != 0
    mask = np.asarray(mask, bool)
    if mask.shape != v.shape:
        raise ValueError(f"mask shape {mask.shape} != v shape {v.shape}")
    if np.any((v != 0) & ~mask):
        raise ValueError(f"v has {int(np.sum((v != 0) & ~mask))} nonzeros outside the mask")
    return mask


def pack(v: Any, *, nm: tuple[int, int] | None = None, mask: Any = None) -> PackedV:
    """Pack one FC's factor. Runs on the host (the packed shape depends on the data).

    v: [r, p], zero where pruned. mask: [r, p] bool (True = kept) or None (the nonzeros of v);
    pass the updater's mask to keep kept entries that happen to be exactly 0.
    nm: (n, m): the N:M layout; a ValueError if some tile of m rows keeps more than n entries.
    """
    v = np.asarray(v)
    if v.ndim != 2:
        raise ValueError(f"pack takes one FC's v [r, p], got shape {v.shape}")
    kept = _kept(v, mask)
    r, p = v.shape
    if nm is not None:
        n, m = nm
        if not 0 < n <= m or r % m:
            raise ValueError(f"{n}:{m} tiles along r need 0 < n <= m and m | r; r = {r}")
        tiles = kept.reshape(r // m, m, p)
        worst = int(tiles.sum(axis=1).max(initial=0))
        if worst > n:
            raise ValueError(f"not {n}:{m} along r (axis -2 of v): a tile of {m} rows keeps {worst} entries")
        # Sorting "kept ? pos : m + pos" puts a tile's kept positions first, in increasing order,
        # then unused positions as padding (their values are 0); a sort of small ints, not an argsort.
        pos = np.sort(np.where(tiles, 0, m) + np.arange(m, dtype=np.int32)[:, None], axis=1)[:, :n, :] % m
        vals = np.take_along_axis(np.where(kept, v, 0).reshape(r // m, m, p), pos, axis=1)
        return PackedV(jnp.asarray(vals.reshape(-1, p)), jnp.asarray(pos.reshape(-1, p), jnp.uint8), rank=r, nm=(n, m))
    k = max(int(kept.sum(axis=0).max(initial=0)), 1)
    rows = np.sort(np.where(kept, 0, r) + np.arange(r, dtype=np.int32)[:, None], axis=0)[:k, :] % r  # as above
    vals = np.take_along_axis(np.where(kept, v, 0), rows, axis=0)
    index_dtype = jnp.uint16 if r <= np.iinfo(np.uint16).max + 1 else jnp.int32
    return PackedV(jnp.asarray(vals), jnp.asarray(rows, index_dtype), rank=r)


# ---------------------------------------------------------------------------------------------
# Pure forwards. x: [..., d] -> [..., d]; u: [d, r]; vs: per FC (spec order) a [r, p] array (or a
# PackedV in sparse mode), e.g. a [F, r, p] array; bias: {fc name: [out]} or None.
# ---------------------------------------------------------------------------------------------


def _mlp(spec: base.MlpSpec, fc: Callable[[int, jax.Array], jax.Array], bias: Mapping[str, jax.Array] | None,
         x: jax.Array) -> jax.Array:
    """The MLP of `spec` given `fc(f, h) = h @ kernel_f` (flax layout), in `base.mlp_apply`'s order."""
    act = base.ACTIVATIONS[spec.activation]

    def lin(f, h):
        y = fc(f, h)
        if bias is not None:
            y = y + bias[spec.fc_names[f]].astype(y.dtype)
        return y

    if spec.gated:
        return lin(2, act(lin(0, x)) * lin(1, x))
    return lin(1, act(lin(0, x)))


def _matmul_t(h: jax.Array, w: jax.Array) -> jax.Array:
    """h [..., k] @ w.T for w [n, k], as one dot (no transposed copy of w)."""
    return jax.lax.dot_general(h, w, (((h.ndim - 1,), (1,)), ((), ())))


def materialize_forward(spec: base.MlpSpec, u: jax.Array, vs: Sequence[jax.Array], bias, x: jax.Array) -> jax.Array:
    """W_t = u @ vs[t] for every FC, then the dense MLP."""
    return base.mlp_apply(spec, factors.block_mlp_params(spec, u, vs, bias), x)


def factored_forward(spec: base.MlpSpec, u: jax.Array, vs: Sequence[jax.Array], bias, x: jax.Array) -> jax.Array:
    """fc1-like `(h @ u) @ v_t` ([.., d] -> [.., r] -> [.., p]); fc2-like `(h @ v_t^T) @ u^T`."""
    u = u.astype(x.dtype)

    def fc(f, h):
        v = vs[f].astype(h.dtype)
        return _matmul_t(_matmul_t(h, v), u) if spec.transposed[f] else (h @ u) @ v

    return _mlp(spec, fc, bias, x)


def _gather_mul(h: jax.Array, v: PackedV) -> jax.Array:
    """h [.., r] @ V [r, p] from the packed entries -> [.., p]."""
    return jnp.sum(jnp.take(h, v.rows(), axis=-1) * v.values.astype(h.dtype), axis=-2)


def _scatter_mul_t(h: jax.Array, v: PackedV) -> jax.Array:
    """h [.., p] @ V^T [p, r] from the packed entries -> [.., r]."""
    contrib = h[..., None, :] * v.values.astype(h.dtype)  # [.., K, p]: (k, j) adds h_j V[rows[k, j], j]
    return jnp.zeros(h.shape[:-1] + (v.rank,), h.dtype).at[..., v.rows()].add(contrib)


def sparse_forward(spec: base.MlpSpec, u: jax.Array, vs: Sequence[PackedV], bias, x: jax.Array,
                   kernel: str = "densify") -> jax.Array:
    """The factored forward with packed factors (`kernel` in SPARSE_KERNELS, see the module docstring)."""
    if kernel == "densify":
        # Densification does not depend on x, so XLA is free to run every block's at the start and
        # hold all dense V's (and int32 indices) at once; it does on CPU, and optimization_barrier
        # does not stop it there. Adding an exact zero computed from x ties both to this block:
        # finite * 0 is +-0, v + -0 = v, and +-0 as an integer is 0.
        zero = jnp.nan_to_num(x.reshape(-1)[0]) * 0
        vs = [v.replace(values=v.values + zero.astype(v.values.dtype), index=v.index + zero.astype(v.index.dtype))
              for v in vs]
        return factored_forward(spec, u, [v.dense() for v in vs], bias, x)
    if kernel != "gather":
        raise ValueError(f"sparse kernel {kernel!r} not in {SPARSE_KERNELS}")
    u = u.astype(x.dtype)

    def fc(f, h):
        return _matmul_t(_scatter_mul_t(h, vs[f]), u) if spec.transposed[f] else _gather_mul(h @ u, vs[f])

    return _mlp(spec, fc, bias, x)


def forward(spec: base.MlpSpec, mode: str, u: jax.Array, vs: Sequence[Any], bias, x: jax.Array,
            sparse_kernel: str = "densify") -> jax.Array:
    """One block's compressed MLP in `mode`; vs holds PackedV's in "sparse" mode, [r, p] arrays otherwise."""
    if mode == "materialize":
        return materialize_forward(spec, u, vs, bias, x)
    if mode == "factored":
        return factored_forward(spec, u, vs, bias, x)
    if mode == "sparse":
        if not all(isinstance(v, PackedV) for v in vs):
            raise ValueError("sparse mode takes PackedV factors (fips_mlp.pack(v_t))")
        return sparse_forward(spec, u, vs, bias, x, sparse_kernel)
    raise ValueError(f"FiPS MLP mode {mode!r} not in {MODES}")


# ---------------------------------------------------------------------------------------------
# The linen module
# ---------------------------------------------------------------------------------------------


class FipsMlp(nn.Module):
    """One block's compressed MLP; the shared basis u [d, r] is an argument (its group owns it).

    Params per FC: `v_<fc>` [r, p] ("rank", "mlp") in materialize/factored mode; in sparse mode
    `v_values_<fc>` [K, p] ("packed_rank", "mlp") plus the integer `v_index_<fc>` in the
    INDEX_COLLECTION variables. Biases `bias_<fc>` [out] ("mlp" or "embed") when `spec.has_bias`.
    `from_group` builds the module and its variables from a trained group.
    """

    spec: base.MlpSpec
    rank: int
    features: int                          # p, the MLP width
    mode: str = "factored"
    packed_k: tuple[int, ...] = ()         # sparse: stored entries per column of each V_t (K)
    nm: tuple[int, int] | None = None      # sparse: N:M layout (index = position in tile)
    sparse_kernel: str = "densify"
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, u: jax.Array) -> jax.Array:
        """x: [..., d], u: [d, r] -> [..., d]."""
        if self.mode not in MODES:
            raise ValueError(f"FiPS MLP mode {self.mode!r} not in {MODES}")
        d, names = x.shape[-1], self.spec.fc_names
        init = nn.initializers.normal(stddev=0.02)
        vs = []
        if self.mode == "sparse":
            if len(self.packed_k) != len(names) or min(self.packed_k) < 1:
                raise ValueError(f"sparse mode needs packed_k >= 1 for each of {names} (use fips_mlp.from_group)")
            for name, k in zip(names, self.packed_k):
                values = self.param(f"v_values_{name}", nn.with_logical_partitioning(init, ("packed_rank", "mlp")),
                                    (k, self.features), self.param_dtype)
                index = self.variable(INDEX_COLLECTION, f"v_index_{name}", jnp.zeros, (k, self.features),
                                      jnp.uint8 if self.nm else jnp.uint16).value
                vs.append(PackedV(values, index, rank=self.rank, nm=self.nm))
        else:
            for name in names:
                vs.append(self.param(f"v_{name}", nn.with_logical_partitioning(init, ("rank", "mlp")),
                                     (self.rank, self.features), self.param_dtype))
        bias = None
        if self.spec.has_bias:
            bias = {}
            for name, tr in zip(names, self.spec.transposed):
                out, axis = (d, "embed") if tr else (self.features, "mlp")
                bias[name] = self.param(f"bias_{name}", nn.with_logical_partitioning(nn.initializers.zeros_init(), (axis,)),
                                        (out,), self.param_dtype)
        return forward(self.spec, self.mode, u, vs, bias, x, self.sparse_kernel)


def from_group(spec: base.MlpSpec, group: Mapping[str, Any], b: int, mode: str = "factored", *,
               nm: tuple[int, int] | None = None, mask: Any = None,
               sparse_kernel: str = "densify") -> tuple[FipsMlp, dict]:
    """(module, variables) for block b of a trained group `{"u": [d, r], "v": [n, F, r, p],
    "bias": {fc: [n, out]}}` (the `factors` layout). Apply as `module.apply(variables, x, u)`.

    mask: the group's [n, F, r, p] sparsity mask for sparse mode (None: the nonzeros of v).
    """
    v_b = np.asarray(group["v"][b]) if mode == "sparse" else group["v"][b]
    _, r, p = v_b.shape
    params: dict = {}
    variables: dict = {"params": params}
    kwargs: dict = {}
    if mode == "sparse":
        index, ks = {}, []
        for f, name in enumerate(spec.fc_names):
            packed = pack(v_b[f], nm=nm, mask=None if mask is None else np.asarray(mask)[b, f])
            params[f"v_values_{name}"] = packed.values
            index[f"v_index_{name}"] = packed.index
            ks.append(packed.values.shape[0])
        variables[INDEX_COLLECTION] = index
        kwargs = dict(packed_k=tuple(ks), nm=nm, sparse_kernel=sparse_kernel)
    else:
        for f, name in enumerate(spec.fc_names):
            params[f"v_{name}"] = jnp.asarray(v_b[f])
    if "bias" in group:
        for name in spec.fc_names:
            params[f"bias_{name}"] = jnp.asarray(group["bias"][name][b])
    return FipsMlp(spec, rank=r, features=p, mode=mode, **kwargs), variables


def held_bytes(variables: Mapping[str, Any]) -> int:
    """Bytes of every array in a variables tree (what a mode keeps in memory between calls)."""
    return int(sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(variables)))
