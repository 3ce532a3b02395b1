"""Basis Sharing (closed form; SPEC §8): the input-side FCs (gate/up, fc1) of `compare.share_blocks`
consecutive blocks share one whitened basis per matrix type (`whitening.basis_sharing` on the
summed input Gram), down/fc2 stay per layer (SVD-LLM), as the paper's published configurations
do. Pairs are formed inside each FiPS group, so both methods see the same blocks; a group's
leftover block is compressed on its own.

Ranks from the peers' floor formulas at the run's budget: shared `k = b d p g / (d + p g)`,
per layer `k (d + p) = b d p`, so every method keeps the same fraction of weights (within the
floors' rounding).
"""

from __future__ import annotations

import numpy as np

from fips_jax import budget, sharding, whitening
from fips_jax.methods import Problem, fc_layout, part, svd_llm
from fips_jax.models import base

NAME = "basis_sharing"
LABEL = "Basis Sharing"
NEEDS_STATS = True


def init(problem: Problem) -> list:
    layout, cfg = problem.layout, problem.cfg["compare"]
    damp, g = cfg["damp"], cfg["share_blocks"]
    if g < 1:
        raise ValueError(f"compare.share_blocks {g} must be >= 1")
    k_layer = budget.per_layer_rank(layout.d, layout.p, problem.budget, layer=f"blocks {layout.blocks}")
    parts = []
    for f, transposed in enumerate(layout.transposed):
        if transposed:  # down/fc2: per layer
            for b in range(layout.n_blocks):
                u, v = svd_llm.factor(problem, b, f, k_layer, damp)
                parts.append(part(problem, fc_layout(layout, (b,), f), u, v[None, None]))
            continue
        for start in range(0, layout.n_blocks, g):
            blocks = tuple(range(start, min(start + g, layout.n_blocks)))
            n = len(blocks)
            k = whitening.rank_for_ratio(layout.d, layout.p, 1 - problem.budget, n_layers=n)
            ws = [sharding.to_host(base.get_path(problem.dense_params, layout.fc_paths[b][f])).astype(np.float64) for b in blocks]
            basis, coeffs = whitening.basis_sharing(ws, [svd_llm.gram_of(problem, b, f) for b in blocks], k, damp)
            parts.append(part(problem, fc_layout(layout, blocks, f), basis, np.stack(coeffs)[:, None]))
    return parts
