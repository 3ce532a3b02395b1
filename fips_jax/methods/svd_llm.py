"""SVD-LLM (whitening, closed form; SPEC §8): every FC its own rank-k factorisation that is
optimal for the layer's calibration inputs, `min ||X W - X A B||_F` (`whitening.svd_llm`), at
the per-layer rank `k (d + p) = b d p` (the peers' floor formula, equal to per-layer SVD's).

Orientation: gate/up/fc1 read `y = x K` with K [d, p] (input side d); down/fc2 read `y = h K`
with K [p, d] (input side p). FiPS writes both as W [d, p] = U V, so down's A [p, k], B [k, d]
become U = B^T [d, k], V = A^T [k, p].
"""

from __future__ import annotations

import numpy as np

from fips_jax import budget, sharding, whitening
from fips_jax.methods import Problem, fc_layout, part
from fips_jax.models import base

NAME = "svd_llm"
LABEL = "SVD-LLM"
NEEDS_STATS = True


def gram_of(problem: Problem, b: int, f: int) -> np.ndarray:
    """X^T X of FC f's input in block b: the MLP input for input-side FCs, the hidden for down/fc2."""
    stats = problem.stats
    if stats is None:
        raise ValueError(f"method {NAME!r} needs calibration statistics (problem.stats is None)")
    return stats.hidden[b] if problem.layout.transposed[f] else stats.inputs[b]


def factor(problem: Problem, b: int, f: int, k: int, damp: float) -> tuple[np.ndarray, np.ndarray]:
    """SVD-LLM factors of FC f in block b, as FiPS's (u [d, k], v [k, p])."""
    kernel = sharding.to_host(base.get_path(problem.dense_params, problem.layout.fc_paths[b][f])).astype(np.float64)
    a, bb = whitening.svd_llm(kernel, gram_of(problem, b, f), k, damp)
    return (bb.T, a.T) if problem.layout.transposed[f] else (a, bb)


def init(problem: Problem) -> list:
    layout = problem.layout
    k = budget.per_layer_rank(layout.d, layout.p, problem.budget, layer=f"blocks {layout.blocks}")
    damp = problem.cfg["compare"]["damp"]
    parts = []
    for b in range(layout.n_blocks):
        for f in range(layout.n_fcs):
            u, v = factor(problem, b, f, k, damp)
            parts.append(part(problem, fc_layout(layout, (b,), f), u, v[None, None]))
    return parts
