"""Compression methods: each turns one group's dense MLP weights (and, when it needs them, the
group's calibration statistics) into factor parts at the run's budget.

A method is a module with

    NAME: str                  # the config value and the metrics key, e.g. "svd_llm"
    LABEL: str                 # its row in the printed table
    NEEDS_STATS: bool          # whether `init` reads `problem.stats`
    init(problem) -> parts     # closed-form factors: [(GroupLayout, {"u", "v"[, "bias"]}), ...]

Parts are what `factors` materialises, counts (`factors.kept`), trains and exports, so evaluation,
reporting and export treat every method the same way. Adding a method is adding one module here
and its name to `METHODS`.
"""

from __future__ import annotations

import dataclasses
from types import ModuleType
from typing import Any

import jax.numpy as jnp
import numpy as np

from fips_jax import factors, grouping
from fips_jax.models import base


@dataclasses.dataclass(frozen=True)
class GroupStats:
    """Second moments of a group's MLP inputs on the calibration tokens (float64, host).

    inputs: [n, d, d] of gate/up/fc1's input X (X^T X); hidden: [n, p, p] of down/fc2's input.
    """

    inputs: np.ndarray
    hidden: np.ndarray
    n_tokens: int


@dataclasses.dataclass(frozen=True)
class Problem:
    """Everything a method may read to compress one group."""

    layout: grouping.GroupLayout
    rank: int                # FiPS's shared rank for this group (SPEC §2)
    budget: float            # kept fraction of the group's MLP weights
    dense_params: Any
    spec: base.MlpSpec
    cfg: dict                # the run's config
    stats: GroupStats | None = None
    mesh: Any = None
    rules: Any = None


def fc_layout(layout: grouping.GroupLayout, blocks: tuple[int, ...], f: int) -> grouping.GroupLayout:
    """The layout of FC `f` of some of a group's blocks (indices into `layout.blocks`): the part
    a per-layer or per-type method factorises on its own."""
    return grouping.GroupLayout(tuple(layout.blocks[b] for b in blocks), (layout.fc_names[f],),
                                (layout.transposed[f],), tuple((layout.fc_paths[b][f],) for b in blocks),
                                layout.d, layout.p)


def part(problem: Problem, layout: grouping.GroupLayout, u: Any, v: Any) -> tuple[grouping.GroupLayout, dict]:
    """(layout, params) of factors u [d, k], v [n, F, k, p] (float32), with the dense biases of
    the layout's FCs attached when the MLP has biases."""
    fac = factors.FipsFactors(u=jnp.asarray(u, jnp.float32), v=jnp.asarray(v, jnp.float32))
    return layout, factors.init_group_params(fac, problem.dense_params, layout, problem.spec)


def _registry() -> dict[str, ModuleType]:
    # pylint: disable=import-outside-toplevel
    from fips_jax.methods import basis_sharing, fips, per_layer_svd, svd_llm
    return {m.NAME: m for m in (fips, per_layer_svd, svd_llm, basis_sharing)}


def get(name: str) -> ModuleType:
    methods = _registry()
    if name not in methods:
        raise ValueError(f"method {name!r} not in {sorted(methods)}")
    return methods[name]


def parse(names: str) -> list[ModuleType]:
    """`compare.methods` ("per_layer_svd,svd_llm") -> the method modules, FiPS excluded (it
    always runs)."""
    out = [get(n.strip()) for n in names.split(",") if n.strip()]
    if any(m.NAME == "fips" for m in out):
        raise ValueError("compare.methods lists the peers run beside FiPS; 'fips' always runs")
    return out
