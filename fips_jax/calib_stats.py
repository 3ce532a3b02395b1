"""Second-moment statistics of an MLP's activations, streamed from calibration inputs.

The activation-aware closed forms (`whitening.py`, `obs.py`) need, per block, the Gram matrix of
the MLP input `X^T X` ([d, d], the input of gate/up/fc1) and of the hidden activation `H^T H`
([p, p], the input of down/fc2), over all calibration tokens:

    H = act(x @ K_gate + b_gate) * (x @ K_up + b_up)     (gated MLP)
    H = act(x @ K_fc1 + b_fc1)                           (fc1/fc2 MLP)

exactly as `base.mlp_apply` computes it (biases included).

Precision: each chunk of tokens is multiplied in float32 on the accelerator at HIGHEST matmul
precision (TPUs and recent GPUs otherwise use bf16/TF32 passes), and the chunk products are
summed in float64 numpy on the host. The float32 partial sum inside one chunk has a relative
error bounded by the chunk size (at worst ~ chunk * eps32, typically ~ sqrt(chunk) * eps32);
accumulating 160k+ tokens' chunks in float32 would instead grow with the number of chunks, and
the smallest eigenvalues of a Gram matrix (which the Cholesky whitening divides by) are the
first to be lost. Float64 on the host costs one [d, d] + [p, p] addition per chunk, negligible
next to the matmuls, and is simpler to reason about than Kahan-compensated float32.

Memory stays bounded by the chunk: the hidden activation of `chunk` tokens, [chunk, p].
"""

from __future__ import annotations

import functools
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from fips_jax import calibration, sharding
from fips_jax.models import base

Stats = dict  # {"in": [.., d, d] float64, "hidden": [.., p, p] float64, "n": int tokens}

_HI = jax.lax.Precision.HIGHEST


def mlp_hidden(spec: base.MlpSpec, mlp_params: Mapping[str, Any], x: jax.Array) -> jax.Array:
    """The input of the last FC (down/fc2) of one MLP: x [..., d] -> [..., p], float32.

    Mirrors `base.mlp_apply` up to the last FC, with biases.
    """
    act = base.ACTIVATIONS[spec.activation]

    def fc(name, h):
        p = mlp_params[name]
        y = jnp.matmul(h, p["kernel"].astype(jnp.float32), precision=_HI)
        if "bias" in p:
            y = y + p["bias"].astype(jnp.float32)
        return y

    x = x.astype(jnp.float32)
    if spec.gated:
        gate, up, _ = spec.fc_names
        return act(fc(gate, x)) * fc(up, x)
    return act(fc(spec.fc_names[0], x))


def chunk_grams(spec: base.MlpSpec, mlp_params: Mapping[str, Any], x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """float32 `(X^T X [d, d], H^T H [p, p])` of one chunk x [tokens, d]. Pure and jit-safe
    (`spec` static)."""
    x = x.astype(jnp.float32)
    h = mlp_hidden(spec, mlp_params, x)
    return jnp.matmul(x.T, x, precision=_HI), jnp.matmul(h.T, h, precision=_HI)


_chunk_grams = jax.jit(chunk_grams, static_argnums=0)
# A group: stacked params [n, ...] and inputs [n, T, d] -> grams [n, d, d], [n, p, p].
_group_chunk_grams = jax.jit(jax.vmap(chunk_grams, in_axes=(None, 0, 0)), static_argnums=0)


@functools.lru_cache(maxsize=None)
def _split_group_chunk_grams(mesh):
    """`_group_chunk_grams` on tokens split over processes: the sums over every process's
    tokens, replicated so that each process reads them whole."""
    return jax.jit(jax.vmap(chunk_grams, in_axes=(None, 0, 0)), static_argnums=0,
                   out_shardings=sharding.replicated(mesh))


def _check_acc(acc: Stats | None, d: int, p: int, lead: tuple[int, ...]) -> Stats:
    if acc is None:
        return {"in": np.zeros(lead + (d, d)), "hidden": np.zeros(lead + (p, p)), "n": 0}
    if acc["in"].shape != lead + (d, d) or acc["hidden"].shape != lead + (p, p):
        raise ValueError(
            f"acc: grams of shapes {acc['in'].shape}, {acc['hidden'].shape}; "
            f"these inputs give {lead + (d, d)}, {lead + (p, p)}")
    return {"in": np.array(acc["in"], np.float64), "hidden": np.array(acc["hidden"], np.float64), "n": int(acc["n"])}


def _hidden_width(spec: base.MlpSpec, mlp_params: Mapping[str, Any]) -> int:
    first = spec.fc_names[0]
    return int(mlp_params[first]["kernel"].shape[-1])


def mlp_input_grams(spec: base.MlpSpec, mlp_params: Mapping[str, Any], x: Any, acc: Stats | None = None,
                    chunk: int = 4096) -> Stats:
    """Adds one block's calibration inputs to its Gram matrices.

    mlp_params: one block's dense MLP params, the layout `base.mlp_apply` takes.
    x: [tokens, d] MLP inputs (any float dtype; host or device array).
    acc: a previous result to add to (not modified), or None to start from zero.
    chunk: tokens per device matmul; bounds memory at [chunk, p] activations.
    Returns {"in": X^T X [d, d], "hidden": H^T H [p, p]} in float64 and "n": tokens so far.
    """
    if x.ndim != 2:
        raise ValueError(f"x: expected [tokens, d], got shape {tuple(x.shape)}")
    if chunk < 1:
        raise ValueError(f"chunk {chunk} must be >= 1")
    d = x.shape[1]
    k_in = mlp_params[spec.fc_names[0]]["kernel"]
    if k_in.shape[0] != d:
        raise ValueError(f"x: width {d} but {spec.fc_names[0]} kernel is {tuple(k_in.shape)}")
    out = _check_acc(acc, d, _hidden_width(spec, mlp_params), ())
    for s in range(0, x.shape[0], chunk):
        g_in, g_h = _chunk_grams(spec, mlp_params, jnp.asarray(x[s:s + chunk]))
        out["in"] += np.asarray(g_in, np.float64)
        out["hidden"] += np.asarray(g_h, np.float64)
    out["n"] += int(x.shape[0])
    return out


def group_input_grams(spec: base.MlpSpec, stacked_mlp_params: Mapping[str, Any], x: Any, acc: Stats | None = None,
                      chunk: int = 4096, mesh: Any = None) -> Stats:
    """`mlp_input_grams` for every block of a group at once.

    mesh: with several processes, x is this process's share of the tokens and the sums run
    over every process's (one collective per chunk; every process must call with the same
    number of tokens); with one process it changes nothing.

    stacked_mlp_params: the group's dense MLP params stacked on a leading block axis, as
      `local_opt.stack_dense_mlps` returns them.
    x: [n, tokens, d] each block's MLP inputs (teacher activations).
    Returns {"in": [n, d, d], "hidden": [n, p, p]} float64 and "n": tokens per block so far.
    """
    if x.ndim != 3:
        raise ValueError(f"x: expected [n_blocks, tokens, d], got shape {tuple(x.shape)}")
    if chunk < 1:
        raise ValueError(f"chunk {chunk} must be >= 1")
    n, _, d = x.shape
    k_in = stacked_mlp_params[spec.fc_names[0]]["kernel"]
    if k_in.shape[:2] != (n, d):
        raise ValueError(f"x: {n} blocks of width {d} but stacked {spec.fc_names[0]} kernel is {tuple(k_in.shape)}")
    out = _check_acc(acc, d, _hidden_width(spec, stacked_mlp_params), (n,))
    split = mesh is not None and sharding.multi_process()
    fn = _split_group_chunk_grams(mesh) if split else _group_chunk_grams
    for s in range(0, x.shape[1], chunk):
        xc = x[:, s:s + chunk]
        g_in, g_h = fn(spec, stacked_mlp_params,
                       sharding.from_process_rows(xc, mesh, axis=1) if split else jnp.asarray(xc))
        out["in"] += np.asarray(g_in, np.float64)
        out["hidden"] += np.asarray(g_h, np.float64)
        calibration.release(xc)  # a file-backed x (local.store=disk): drop the chunk's pages
    out["n"] += int(x.shape[1]) * (jax.process_count() if split else 1)
    return out
