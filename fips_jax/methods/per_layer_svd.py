"""Per-layer truncated SVD: every FC its own best rank-k approximation (Eckart-Young), dense
factors, no sharing, no calibration data. k from `budget.per_layer_rank`: k (d + p) = b d p."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fips_jax import budget
from fips_jax.methods import Problem, fc_layout, part
from fips_jax.models import base

NAME = "per_layer_svd"
LABEL = "per-layer SVD"
NEEDS_STATS = False


@jax.jit
def _svd(w):
    return jnp.linalg.svd(w.astype(jnp.float32), full_matrices=False)


def init(problem: Problem) -> list:
    layout = problem.layout
    k = budget.per_layer_rank(layout.d, layout.p, problem.budget, layer=f"blocks {layout.blocks}")
    parts = []
    for b, row in enumerate(layout.fc_paths):
        for f, (path, transposed) in enumerate(zip(row, layout.transposed)):
            w = base.get_path(problem.dense_params, path)
            u, s, vh = _svd(w.T if transposed else w)  # d x p
            parts.append(part(problem, fc_layout(layout, (b,), f), u[:, :k] * s[:k], vh[:k][None, None]))
    return parts


def compress(dense_params, spec: base.MlpSpec, plan, budget_fraction: float) -> list:
    """Every group of a plan [(layout, rank)] compressed per layer: the parts of the whole model."""
    return [pt for layout, rank in plan
            for pt in init(Problem(layout, rank, budget_fraction, dense_params, spec, cfg={}))]
