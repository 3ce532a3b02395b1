"""Parameter budget -> rank of the shared basis, and the accounting that goes back.

A group of `n` blocks, each MLP with `F` fully connected layers written as `d x p` matrices,
is compressed to one dense basis `U: [d, r]` and sparse factors `V_t: [r, p]` (sparsity `s`).
Kept parameters `d*r + (1-s)*r*F*n*p` must equal `b * F*n*d*p`, hence

    r = floor(b*F*n*d*p / (d + (1-s)*F*n*p)).

The arithmetic is exact (rational), so budgets such as 0.75 that land on an integer rank are
not lost to float rounding.
"""

from __future__ import annotations

import dataclasses
import fractions
import re
from typing import Any, Mapping

import jax
import numpy as np

from fips_jax.models import base


def _exact(x: float) -> fractions.Fraction:
    # Fraction(str(x)) reads 0.1 as 1/10, not as the nearest binary double.
    return fractions.Fraction(str(x))


def _check(budget: float, sparsity: float, where: str) -> None:
    if not 0.0 < budget <= 1.0:
        raise ValueError(f"{where}: budget {budget} must be in (0, 1] (a fraction of the MLP weights)")
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"{where}: sparsity {sparsity} must be in [0, 1)")


def rank_for_budget(
    d: int,
    p: int,
    n_blocks: int,
    n_fcs: int,
    budget: float,
    sparsity: float,
    *,
    round_to: int | None = None,
    reference_parity: bool = False,
    group: Any = "group",
) -> int:
    """Rank r of the shared basis for one group at parameter budget `budget`.

    Args:
      d: model width (rows of every FC written as `d x p`).
      p: MLP width. The authors' code assumes p = 4d; `reference_parity=True` does the same
        (over-spends on models with p != 4d, e.g. Llama-3).
      n_blocks, n_fcs: blocks in the group and FCs per MLP (2 for ViT, 3 for gated MLPs).
      budget: kept nonzeros / original MLP weight count (biases excluded), in (0, 1].
      sparsity: fraction of zeros in V, in [0, 1).
      round_to: round r down to a multiple of this (e.g. 64 for N:M kernels).
      group: a name for error messages.
    """
    _check(budget, sparsity, f"{group}")
    b, keep = _exact(budget), 1 - _exact(sparsity)
    fn = n_fcs * n_blocks
    if reference_parity:
        r = (4 * fn * d * d * b) // (4 * fn * d * keep + d)
    else:
        r = (b * fn * d * p) // (d + keep * fn * p)
    r = int(r)
    if round_to:
        r = (r // round_to) * round_to
    if r < 1:
        raise ValueError(
            f"{group}: budget {budget} at sparsity {sparsity} gives rank {r} < 1 "
            f"(d={d}, p={p}, blocks={n_blocks}, fcs={n_fcs}"
            + (f", round_to={round_to}" if round_to else "")
            + "); raise the budget or lower the sparsity"
        )
    return r


def per_layer_rank(d: int, p: int, budget: float, *, layer: Any = "layer") -> int:
    """Rank of a per-layer truncated SVD (no sharing, dense factors) at the same budget:
    r * (d + p) = b * d * p."""
    _check(budget, 0.0, f"{layer}")
    r = int((_exact(budget) * d * p) // (d + p))
    if r < 1:
        raise ValueError(f"{layer}: budget {budget} gives per-layer SVD rank {r} < 1 (d={d}, p={p})")
    return r


def group_kept_params(u: jax.Array, v: jax.Array) -> int:
    """Kept parameters of one compressed group: dense U plus the nonzeros of V."""
    return int(np.asarray(u).size + np.count_nonzero(np.asarray(v)))


def _kernel_count(params: Mapping[str, Any], pattern: str) -> int:
    rx = re.compile(pattern)
    total = 0
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        name = "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)
        if rx.search(name):
            total += int(np.size(leaf))
    return total


def linear_weight_count(params: Mapping[str, Any]) -> int:
    """Weights of every linear layer inside the transformer blocks (kernels only; embeddings,
    heads, norms and biases excluded) — the denominator Basis Sharing and SVD-LLM use."""
    return _kernel_count(params, r"blocks_\d+/.*kernel$")


@dataclasses.dataclass(frozen=True)
class BudgetReport:
    """A compressed model's size three ways (papers count differently)."""

    kept_mlp: int           # U sizes + nonzeros of V (biases excluded)
    dense_mlp: int          # original MLP weights (biases excluded)
    dense_linear: int       # original weights of all linear layers in the blocks
    dense_total: int        # original parameter count of the whole model

    @property
    def of_mlp(self) -> float:
        return self.kept_mlp / self.dense_mlp

    @property
    def of_linear(self) -> float:
        return (self.dense_linear - self.dense_mlp + self.kept_mlp) / self.dense_linear

    @property
    def of_model(self) -> float:
        return (self.dense_total - self.dense_mlp + self.kept_mlp) / self.dense_total

    def as_dict(self) -> dict[str, float | int]:
        return {
            **dataclasses.asdict(self),
            "fraction_of_mlp_weights": self.of_mlp,
            "fraction_of_linear_weights": self.of_linear,
            "fraction_of_model_params": self.of_model,
        }


def budget_report(kept_mlp: int, dense_params: Mapping[str, Any], mlp_weights: int) -> BudgetReport:
    return BudgetReport(
        kept_mlp=int(kept_mlp),
        dense_mlp=int(mlp_weights),
        dense_linear=linear_weight_count(dense_params),
        dense_total=base.count_params(dense_params),
    )
