"""Sparse training of the FiPS V factors (SPEC §5), with jaxpruner's shape of API.

    updater = sparsity.create_updater("gmp", sparsity=0.75, t_end=num_steps)
    tx = updater.wrap_optax(optax.adamw(lr, weight_decay=wd))   # state holds a SparseState
    opt_state = tx.init(params)                                  # builds the initial masks
    # per (jitted) step:
    updates, opt_state = tx.update(grads, opt_state, params)
    params = updater.post_gradient_update(optax.apply_updates(params, updates), opt_state)

Modules: `schedules` (step -> sparsity), `masks` (top-k / N:M mask arithmetic), `updaters`
(SparseState and the Dense/Static/GMP/RigL/NM optax wrappers), `factory` (`create_updater`).
"""

from fips_jax.sparsity.factory import ALGORITHMS, create_updater
from fips_jax.sparsity.masks import DEFAULT_FILTER, apply_masks, realised_sparsity
from fips_jax.sparsity.schedules import (
    PAPER_RAMP_START,
    ConstantSchedule,
    CosineDecay,
    PolynomialSchedule,
    last_update_before,
)
from fips_jax.sparsity.updaters import (
    GMP,
    NM,
    Dense,
    RigL,
    SparseState,
    SparsityUpdater,
    Static,
    get_sparse_state,
    reset_moments,
)

__all__ = [
    "ALGORITHMS",
    "DEFAULT_FILTER",
    "GMP",
    "NM",
    "PAPER_RAMP_START",
    "ConstantSchedule",
    "CosineDecay",
    "Dense",
    "PolynomialSchedule",
    "RigL",
    "SparseState",
    "SparsityUpdater",
    "Static",
    "apply_masks",
    "create_updater",
    "get_sparse_state",
    "last_update_before",
    "realised_sparsity",
    "reset_moments",
]
