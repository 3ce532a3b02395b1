"""One group's compressed factors, and everything that turns them into weights.

A group's params are a plain dict (so checkpoints need no custom types):

    {"u": [d, r], "v": [n, F, r, p], "bias": {fc_name: [n, out]}}   # "bias" only if the MLP has biases

Block b's FC f is `W = u @ v[b, f]` written as `d x p` (transposed back for fc2/down, see
`grouping`). A compressed model is a list of parts `(GroupLayout, params)`: FiPS has one part per
group covering every FC of its blocks; per-layer methods have one part per FC (a layout of one
block and one FC), Basis Sharing one per shared basis. Training, fine-tuning, export and the
`FipsMlp` module all go through the functions here.
"""

from __future__ import annotations

import functools
from typing import Any, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from fips_jax import grouping
from fips_jax.models import base

Params = dict[str, Any]


class FipsFactors(NamedTuple):
    """One group's factors.

    u: [d, r] dense shared basis (orthonormal columns at init, zero columns past d when grown).
    v: [n_blocks, n_fcs, r, p] per-FC factors, `W_{b,f} ~= u @ v[b, f]` (W written as d x p).
    """

    u: jax.Array
    v: jax.Array


def materialize(u: jax.Array, v: jax.Array) -> jax.Array:
    """u @ [v_00, v_01, ..., v_10, ...]: the group matrix W_s, [d, n*F*p], block-major."""
    n, f, r, p = v.shape
    return u @ jnp.transpose(v, (2, 0, 1, 3)).reshape(r, n * f * p)


def init_group_params(fac: FipsFactors, dense_params: Mapping[str, Any], layout: grouping.GroupLayout,
                      spec: base.MlpSpec) -> Params:
    """Trainable params of a group (or of any part: a layout of some of its FCs) from its factors;
    biases start from the dense model's."""
    out: Params = {"u": fac.u, "v": fac.v}
    if spec.has_bias:
        out["bias"] = {
            name: jnp.stack([base.get_path(dense_params, f"{row[f].rsplit('/', 1)[0]}/bias").astype(jnp.float32)
                             for row in layout.fc_paths])
            for f, name in enumerate(layout.fc_names)
        }
    return out


def block_mlp_params(spec: base.MlpSpec, u: jax.Array, v_b: jax.Array, bias_b: Mapping[str, jax.Array] | None) -> dict:
    """Materialised MLP params of one block in the flax layout `base.mlp_apply` takes.
    v_b: [F, r, p]; bias_b: {fc: [out]} or None."""
    mlp = {}
    for f, (name, tr) in enumerate(zip(spec.fc_names, spec.transposed)):
        w = u @ v_b[f]
        mlp[name] = {"kernel": w.T if tr else w}
        if bias_b is not None:
            mlp[name]["bias"] = bias_b[name]
    return mlp


def group_kernels(params: Params, layout: grouping.GroupLayout) -> dict[str, jax.Array]:
    """{kernel path: materialised kernel} for every FC in the group."""
    out = {}
    for b, row in enumerate(layout.fc_paths):
        for f, (path, tr) in enumerate(zip(row, layout.transposed)):
            w = params["u"] @ params["v"][b, f]
            out[path] = w.T if tr else w
    return out


def assemble(dense_params: Mapping[str, Any], groups: Sequence[tuple[grouping.GroupLayout, Params]]) -> dict:
    """Dense-layout params of the compressed model: every grouped MLP kernel replaced by U V_t
    (and its bias by the trained one). Exactly the compressed model's function."""
    out = dense_params
    for layout, params in groups:
        out = grouping.replace_kernels(out, group_kernels(params, layout))
        if "bias" in params:
            for f, name in enumerate(layout.fc_names):
                for b, row in enumerate(layout.fc_paths):
                    bias_path = f"{row[f].rsplit('/', 1)[0]}/bias"
                    out = grouping.replace_kernels(out, {bias_path: params["bias"][name][b]})
    return out


def group_weights(u: jax.Array, v: jax.Array, dtype: Any = jnp.float32) -> jax.Array:
    """Every FC's W = U V_t of a group in float32: u [d, r], v [n, F, r, p] -> [n, F, d, p].

    All FCs at once over the whole V, so the backward gives V's gradient as one array (slicing
    V per FC returned one zero-padded V-sized gradient per FC, added up). `dtype`: the matmul
    operand dtype (`mixed_einsum`).
    """
    n, f, r, p = v.shape
    # A loop of plain [d, r] x [r, p] products: XLA:CPU lowers the one-einsum form to a GEMM
    # over V transposed to [n F p, r] (a V-sized copy in, another out for its gradient); the
    # loop reads V and writes dV in place and its backward is again plain products.
    w = jax.lax.map(lambda v_t: mixed_einsum("dr,rp->dp", u, v_t, dtype), v.reshape(n * f, r, p))
    return w.reshape(n, f, u.shape[0], p)


def mixed_einsum(eq: str, a: jax.Array, b: jax.Array, dtype: Any = jnp.float32) -> jax.Array:
    """float32 `einsum(eq, a, b)` with operands rounded to `dtype`, forward and backward.

    float32: a plain einsum. bfloat16: every product (the two gradient products too) takes
    bfloat16 operands and accumulates in float32, the form XLA:CPU hands to its fast bf16
    kernels; autodiff of a plain bf16 einsum would run its backward with float32 operands.
    eq: two operands, each index of an operand found in the other or the output.
    """
    if jnp.dtype(dtype) == jnp.float32:
        return jnp.einsum(eq, a, b, preferred_element_type=jnp.float32)
    return _mixed_einsum(eq, jnp.dtype(dtype), a.astype(jnp.float32), b.astype(jnp.float32))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _mixed_einsum(eq, dtype, a, b):
    return jnp.einsum(eq, a.astype(dtype), b.astype(dtype), preferred_element_type=jnp.float32)


def _mixed_einsum_fwd(eq, dtype, a, b):
    a_c, b_c = a.astype(dtype), b.astype(dtype)
    return jnp.einsum(eq, a_c, b_c, preferred_element_type=jnp.float32), (a_c, b_c)


def _mixed_einsum_bwd(eq, dtype, res, g):
    a_c, b_c = res  # float32 a and b, rounded to dtype
    (ia, ib), out = eq.split("->")[0].split(","), eq.split("->")[1]
    g = g.astype(dtype)
    da = jnp.einsum(f"{out},{ib}->{ia}", g, b_c, preferred_element_type=jnp.float32)
    db = jnp.einsum(f"{ia},{out}->{ib}", a_c, g, preferred_element_type=jnp.float32)
    return da, db


_mixed_einsum.defvjp(_mixed_einsum_fwd, _mixed_einsum_bwd)


def nonzeros(v: Any) -> int:
    """Nonzeros of a host or device array; one split over several processes is counted on the
    devices (no process can read it whole), any other where it is."""
    if isinstance(v, jax.Array) and not v.is_fully_addressable:
        return int(jnp.count_nonzero(v))
    return int(np.count_nonzero(np.asarray(v)))


def kept(parts: Sequence[tuple[grouping.GroupLayout, Params]]) -> int:
    """Kept weights of a compressed model: every dense U plus the nonzeros of every V (biases
    excluded, as the budget formula counts)."""
    return sum(int(np.size(p["u"]) + nonzeros(p["v"])) for _, p in parts)


def part_weights(parts: Sequence[tuple[grouping.GroupLayout, Params]], layout: grouping.GroupLayout,
                 dtype: Any = jnp.float32) -> tuple[jax.Array, dict | None]:
    """Every FC of `layout` materialised from parts that cover each of its kernels exactly once:
    (ws [n, F, d, p], biases {fc: [n, out]} or None). The any-method counterpart of
    `group_weights`; differentiable in the parts."""
    where = {path: (b, f) for b, row in enumerate(layout.fc_paths) for f, path in enumerate(row)}
    slots: list[list[Any]] = [[None] * layout.n_fcs for _ in layout.fc_paths]
    bias_slots: list[list[Any]] = [[None] * layout.n_fcs for _ in layout.fc_paths]
    for part_layout, p in parts:
        w = group_weights(p["u"], p["v"], dtype)
        for pb, row in enumerate(part_layout.fc_paths):
            for pf, path in enumerate(row):
                if path not in where:
                    raise ValueError(f"part kernel {path} is not in the group of blocks {layout.blocks}")
                b, f = where[path]
                if slots[b][f] is not None:
                    raise ValueError(f"kernel {path} is covered by two parts")
                slots[b][f] = w[pb, pf]
                if "bias" in p:
                    bias_slots[b][f] = p["bias"][part_layout.fc_names[pf]][pb]
    missing = [path for path, (b, f) in where.items() if slots[b][f] is None]
    if missing:
        raise ValueError(f"no part covers {', '.join(missing[:5])}")
    ws = jnp.stack([jnp.stack(row) for row in slots])
    if bias_slots[0][0] is None:
        return ws, None
    return ws, {name: jnp.stack([row[f] for row in bias_slots]) for f, name in enumerate(layout.fc_names)}
