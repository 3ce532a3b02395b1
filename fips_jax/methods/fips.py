"""FiPS (SPEC §1-§5): one dense basis U shared by every FC of a group's blocks, sparse per-FC
factors V. `init` is the closed-form start: the shared basis (`fips.init`: the paper's SVD of the
group matrix, or its activation-aware form `whitened`), then optionally V pruned to its target
sparsity with second-order error compensation (`fips.prune=obs`); the pipeline refines U and V
by local error minimisation (`local_config`)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from fips_jax import factors, grouping, local_opt, obs, sharding, sparsity, svd_init, whitening
from fips_jax.methods import Problem

NAME = "fips"
LABEL = "FiPS"
NEEDS_STATS = False  # as a peer; as the main method see `needs_stats`
INITS = ("svd", "gram", "whitened")
PRUNES = ("magnitude", "obs")


def needs_stats(cfg: dict) -> bool:
    """Whether this run's FiPS settings read the group's calibration statistics."""
    return cfg["fips"]["init"] == "whitened" or cfg["fips"]["prune"] == "obs"


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
    """The group's initial params as one part: the shared basis and V (`fips.init`), V pruned to
    the target sparsity when `fips.prune=obs` (otherwise the local optimisation's schedule
    prunes it by magnitude)."""
    fips_cfg, layout = problem.cfg["fips"], problem.layout
    if fips_cfg["init"] == "whitened":
        params = whitened_init(problem)
    else:
        params = group_init(problem.spec, layout, problem.rank, problem.dense_params, fips_cfg["tau"], fips_cfg["init"],
                            problem.mesh, problem.rules)
    if fips_cfg["prune"] == "obs":
        params = obs_pruned(problem, params)
    elif fips_cfg["prune"] != "magnitude":
        raise ValueError(f"fips.prune {fips_cfg['prune']!r} not in {PRUNES}")
    return [(layout, params)]


def _stats(problem: Problem, what: str):
    if problem.stats is None:
        raise ValueError(f"{what} needs calibration statistics (problem.stats is None)")
    return problem.stats


def whitened_init(problem: Problem) -> dict:
    """`whitening.whitened_group_init`: the shared basis of the activation-weighted problem, every
    V exactly optimal given it (float64 on the host; one [d, d] eigenproblem per candidate)."""
    layout, fips_cfg = problem.layout, problem.cfg["fips"]
    stats = _stats(problem, "fips.init=whitened")
    w = sharding.to_host(grouping.concat_group(problem.dense_params, layout)).astype(np.float64)
    ws = w.reshape(layout.d, layout.n_blocks, layout.n_fcs, layout.p).transpose(1, 2, 0, 3)
    fac = whitening.whitened_group_init(ws, stats.inputs, stats.hidden, layout.transposed, problem.rank,
                                        tau=fips_cfg["tau"], damp=problem.cfg["compare"]["damp"], steps=fips_cfg["whiten_steps"])
    return factors.init_group_params(fac, problem.dense_params, layout, problem.spec)


def obs_pruned(problem: Problem, params: dict) -> dict:
    """V pruned to `fips.sparsity` in every FC by `obs.obs_prune_group` (SparseGPT-style, the
    block's input Hessian), U unchanged. The local optimisation then starts at the target
    sparsity; `local.algorithm=static` keeps this mask, gmp/rigl move it."""
    cfg = problem.cfg
    stats = _stats(problem, "fips.prune=obs")
    if cfg["local"]["algorithm"] == "nm":
        raise ValueError("fips.prune=obs prunes unstructured; local.algorithm=nm needs fips.prune=magnitude")
    v, _ = obs.obs_prune_group(sharding.to_host(params["u"]), sharding.to_host(params["v"]), stats.inputs, stats.hidden,
                               problem.layout.transposed, cfg["fips"]["sparsity"], damp=cfg["fips"]["obs_damp"],
                               block_size=cfg["fips"]["obs_block"])
    return {**params, "v": jnp.asarray(v, jnp.float32)}


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
