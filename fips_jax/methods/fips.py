"""FiPS (SPEC §1-§5): one dense basis U shared by every FC of a group's blocks, sparse per-FC
factors V. `init` is the closed-form start (`fips.init`); the pipeline then prunes V to its
sparsity and refines U and V by local error minimisation (`local_config`)."""

from __future__ import annotations

import jax

from fips_jax import factors, grouping, local_opt, sharding, sparsity, svd_init
from fips_jax.methods import Problem

NAME = "fips"
LABEL = "FiPS"
NEEDS_STATS = False
INITS = ("svd", "gram")


def local_config(cfg: dict, steps: int) -> local_opt.LocalOptConfig:
    """The local optimisation's optimiser and sparsity settings from the run config."""
    lc = cfg["local"]
    return local_opt.LocalOptConfig(
        steps=steps, lr=lc["lr"], end_lr=lc["end_lr"], weight_decay=lc["weight_decay"],
        algorithm=lc["algorithm"], sparsity=cfg["fips"]["sparsity"] if lc["algorithm"] != "dense" else 0.0,
        update_freq=lc["update_freq"], drop_fraction=lc["drop_fraction"], scope=lc["scope"],
        n=lc["n"], m=lc["m"], prune_end=lc["prune_end"], reference_parity=cfg["fips"]["reference_parity"],
        # N:M tiles run along r, the axis the factored kernel `(x U) V_t` contracts over
        # (models/fips_mlp.py packs V along it), so the trained masks are the deployed ones.
        nm_axis=-2,
    )


def init(problem: Problem) -> list:
    """The group's SVD-initialised params (SPEC §3) as one part."""
    fc = problem.cfg["fips"]
    return [(problem.layout, group_init(problem.spec, problem.layout, problem.rank, problem.dense_params, fc["tau"],
                                        fc["init"], problem.mesh, problem.rules))]


def group_init(spec, layout: grouping.GroupLayout, rank: int, dense_params, tau: float = 32.0, method: str = "svd",
               mesh=None, rules=sharding.DEFAULT_RULES) -> dict:
    """One group's trainable params {"u", "v"[, "bias"]} from the SVD of its group matrix.
    method "gram": the same factors from W W^T with W split along its long axis over `mesh`
    (`svd_init.init_group_gram`)."""
    static = ("rank", "n_blocks", "n_fcs", "tau")
    if method == "svd":
        fn, w = jax.jit(svd_init.init_group, static_argnames=static), grouping.concat_group(dense_params, layout)
    elif method == "gram":
        def named(axes, shape):
            return jax.sharding.NamedSharding(mesh, sharding.logical_to_spec(axes, mesh, rules, shape))

        n, f, d, p = layout.n_blocks, layout.n_fcs, layout.d, layout.p
        w = jax.jit(grouping.concat_group, static_argnums=1,
                    out_shardings=named(sharding.GROUP_MATRIX_AXES, (d, n * f * p)))(dense_params, layout)
        out_sh = factors.FipsFactors(u=named(sharding.U_AXES, (d, rank)), v=named(sharding.V_AXES, (n, f, rank, p)))
        fn = jax.jit(svd_init.init_group_gram, static_argnames=static, out_shardings=out_sh)
    else:
        raise ValueError(f"fips.init {method!r} not in {INITS}")
    fac = fn(w, rank=rank, n_blocks=layout.n_blocks, n_fcs=layout.n_fcs, tau=tau)
    return factors.init_group_params(fac, dense_params, layout, spec)


def one_shot(params: dict, cfg: dict) -> dict:
    """Initial params pruned once to the target sparsity (global magnitude), no training: the
    "FiPS after init" row, at the same budget as the final model. `params` may be one group's
    dict or a {group: params} dict (global pruning ranks every V in it together)."""
    lc = local_config(cfg, 1)
    # Only the final target matters, and GMP and RigL reach it by the same magnitude ranking as
    # a static mask; building their schedules would need a step count that this row has none of.
    algorithm = "static" if lc.algorithm in ("gmp", "rigl") else lc.algorithm
    updater = sparsity.create_updater(
        algorithm=algorithm, sparsity=lc.sparsity if algorithm != "nm" else None, filter_regex=local_opt.V_FILTER,
        scope=lc.scope, n=lc.n, m=lc.m, axis=lc.nm_axis)
    return updater.instant_sparsify(params)[0]
