"""FiPS end to end, in the order of the paper's Algorithm 1.

    load the dense model -> plan the groups and ranks -> for each optimisation scope (an LLM
    group; all of a ViT's groups at once): statistics -> init (FiPS and every peer method) ->
    local optimisation -> held-out error -> [global fine-tuning] -> evaluate every variant ->
    export the compressed model

What differs between LLMs and ViTs (data, teacher, loss, evaluator) is behind `tasks`; what
differs between compression methods is behind `methods`. Every stage leaves its result in the
workdir (`stages.Run.stage`) and is skipped when found there, and the training loops checkpoint
every `checkpoint_every` steps, so rerunning the same command after an interruption resumes
where it stopped.
"""

from __future__ import annotations

import os
import platform
import time
from typing import Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np

from fips_jax import budget, calibration, checkpointing, export, export_sparse, factors, finetune, grouping, methods
from fips_jax import report, sharding, stages, tasks
from fips_jax.models import base, registry

# Config keys that change no saved stage: changing them on resume is allowed.
# local.store: where a group's activations live while it runs (memory or files deleted with the
# group); no saved stage depends on it, and a workdir from before the key resumes too.
RESUME_SAFE_KEYS = ("checkpoint_every", "log_every", "eval.batch_size", "chunk", "mesh",
                    "sharding.max_replicated_mib", "local.offload_model", "local.store")
COMPUTE_DTYPES = ("float32", "bfloat16")


def check_config(cfg: dict) -> None:
    """Combinations of keys that cannot work, refused before any compute."""
    ft = cfg["finetune"]
    if ft["enabled"] and cfg["local"]["algorithm"] == "nm" and ft["algorithm"] != "static":
        raise ValueError(f"finetune.algorithm={ft['algorithm']!r} would break the N:M pattern of "
                         "local.algorithm='nm' (RigL swaps entries anywhere); set finetune.algorithm=static")
    finetune.from_config(ft, n_inputs=1)  # its own checks (loss, algorithm, batch, ...), up front
    if cfg["local"].get("compute_dtype", "float32") not in COMPUTE_DTYPES:
        raise ValueError(f"local.compute_dtype {cfg['local']['compute_dtype']!r} not in {COMPUTE_DTYPES}")
    calibration.check_store(cfg["local"].get("store", "memory"))
    inits = methods.get("fips").INITS
    if cfg["fips"]["init"] not in inits:
        raise ValueError(f"fips.init {cfg['fips']['init']!r} not in {inits}")
    methods.parse(cfg["compare"]["methods"])


def plan_groups(cfg: dict, arch: base.Architecture, params) -> list[tuple[grouping.GroupLayout, int]]:
    """Groups with their layouts and ranks (SPEC §2), validated before any compute."""
    fips_cfg = cfg["fips"]
    groups = grouping.make_groups(
        arch.num_blocks, groups=fips_cfg["groups"] or None,
        group_size=None if fips_cfg["groups"] else fips_cfg["group_size"])
    v_sparsity = 0.0 if cfg["local"]["algorithm"] == "dense" else fips_cfg["sparsity"]
    out = []
    for g, blocks in enumerate(groups):
        layout = grouping.group_layout(params, arch.mlp_spec, arch.mlp_path, blocks, group=g)
        rank = budget.rank_for_budget(
            layout.d, layout.p, layout.n_blocks, layout.n_fcs, fips_cfg["budget"], v_sparsity,
            round_to=fips_cfg["round_to"] or None, reference_parity=fips_cfg["reference_parity"],
            group=f"group {g} (blocks {blocks[0]}-{blocks[-1]})")
        m = cfg["local"]["m"]
        if cfg["local"]["algorithm"] == "nm" and rank % m:
            raise ValueError(
                f"group {g} (blocks {blocks[0]}-{blocks[-1]}): rank {rank} is not a multiple of local.m={m}, and N:M "
                f"tiles run along the rank; set fips.round_to to a multiple of {m} (64 for sparse kernels)")
        out.append((layout, rank))
    return out


def run(cfg: dict, workdir: str, log: Callable[[str], None] = print, on_step=None) -> dict:
    """The whole pipeline; returns the metrics also written to `workdir/metrics.json`."""
    check_config(cfg)
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise ValueError(f"workdir {workdir} is a file, not a directory")
    os.makedirs(workdir, exist_ok=True)
    checkpointing.check_config(workdir, cfg, ignore=RESUME_SAFE_KEYS, write=sharding.is_writer())
    state = stages.Run(cfg, workdir, log, on_step)
    t_start = time.perf_counter()

    # Load and plan.
    # One device: nothing to place (placing a loaded tree would briefly hold it twice).
    place_for = (lambda a: sharding.place_fn(state.mesh, state.rules, a.logical_axes())) if state.mesh.size > 1 else None
    arch, params, tokenizer = registry.load_model(cfg["model"], seed=cfg["seed"], place_for=place_for)
    log(f"model: {arch.name}, {arch.num_blocks} blocks, {base.count_params(params) / 1e6:.1f}M params, "
        f"mesh {dict(state.mesh.shape)}")
    if state.mesh.size > 1:
        sharding.check_replication(params, cfg["sharding"]["max_replicated_mib"] * 2**20)
    plan = plan_groups(cfg, arch, params)
    for g, (layout, rank) in enumerate(plan):
        log(f"group {g}: blocks {layout.blocks}, d {layout.d}, p {layout.p}, rank {rank}")
    peers = methods.parse(cfg["compare"]["methods"])

    # Statistics, init, local optimisation and held-out error, scope by scope (the task's loop).
    task = tasks.for_arch(arch)
    dat = task.load_data(state, arch, tokenizer)
    cal = task.calibrate(state, arch, params, plan, dat, peers)
    params = params if cal.params is None else cal.params
    final = cal.final
    tuned = global_finetune(state, arch, params, cal)
    if tuned is not None:
        final = tuned
        cal.variants["fips_finetuned"] = lambda: [(cal.layouts[n], tuned[n]) for n in cal.layouts]

    # Evaluate every variant, count what each keeps, export FiPS.
    evals, task_metrics = task.evaluate(state, arch, params, dat, cal.variants)
    budgets = variant_budgets(plan, params, cal, peers, final)
    exported = export_compressed(state, arch, params, plan, (final[n] for n in cal.layouts),
                                 {"budget": budgets["fips"], "evals": evals, "finetuned": tuned is not None})
    sp = sparsity_per_block(plan, (final[n] for n in cal.layouts))
    metrics = {
        **task_metrics, **cal.metrics, "evals": evals, "export": exported, "budget": budgets,
        "labels": variant_labels(cal.variants, peers),
        "per_block": {"block": cal.blocks, "sparsity": [sp[i] for i in cal.blocks],
                      **{f"heldout_rel_error_{k}": v for k, v in cal.heldout.items()}},
        "model": arch.name,
        "groups": [{"blocks": list(l.blocks), "rank": k, "d": l.d, "p": l.p} for l, k in plan],
        "config": cfg,
        "versions": {"python": platform.python_version(), "jax": jax.__version__, "backend": jax.default_backend(),
                     "devices": [str(d) for d in jax.devices()]},
        "timings_s": {**state.timings, "total_this_process": time.perf_counter() - t_start},
    }
    if sharding.is_writer():
        checkpointing.write_json(state.path("metrics.json"), metrics)
        report.write(state.workdir, metrics)
    log(report.table(metrics))
    return metrics


def global_finetune(state: stages.Run, arch: base.Architecture, params, cal: tasks.Calibrated) -> dict | None:
    """The optional global error minimisation (SPEC §4, `finetune.enabled`): every group's U, V and
    biases trained together through the whole model, V kept at its number of nonzeros by RigL.
    Returns {group name: params}, or None when disabled. Resumes like the local loop."""
    cfg = state.cfg
    inputs, labels = cal.finetune_inputs, cal.finetune_labels
    ft = finetune.from_config(cfg["finetune"], int(inputs.shape[0]))
    if ft is None:
        return None

    def tune() -> dict:
        state.log(f"[finetune] {ft.steps} steps, batch {ft.batch}, loss {ft.loss}, {ft.algorithm}")
        start = {n: cal.final[n] for n in cal.layouts}  # every group trains at once
        tuned, losses = finetune.finetune(
            arch, params, cal.layouts, start, jnp.asarray(inputs), ft, state.path("finetune", "loop"),
            labels=None if labels is None else jnp.asarray(labels), seed=cfg["seed"],
            checkpoint_every=cfg["checkpoint_every"], log=state.log, on_step=state.on_step,
            param_shardings=stages.shardings_of(state, arch.mlp_spec, start))
        del start
        state.save("finetune/stats", {"steps": ft.steps, "loss_first": losses[0] if losses else None,
                                  "loss_last": losses[-1] if losses else None})
        return tuned

    tuned = state.stage("finetune/final", tune, "arrays", label="finetune")
    if sharding.multi_process():  # whole on every process, as the stage store gives it back on resume
        tuned = stages.host_tree(tuned)
    return tuned


def variant_budgets(plan, params, cal: tasks.Calibrated, peers: list, final: dict) -> dict:
    """Kept parameters of FiPS and of every peer, counted the same three ways."""
    dense_mlp = sum(layout.dense_weights for layout, _ in plan)
    out = {"fips": budget.budget_report(factors.kept((cal.layouts[n], final[n]) for n in cal.layouts), params,
                                        dense_mlp).as_dict()}
    for key, parts in cal.variants.items():
        if parts is not None and not key.startswith("fips"):
            out[key] = budget.budget_report(factors.kept(parts()), params, dense_mlp).as_dict()
    return out


def variant_labels(variants: dict, peers: list) -> dict[str, str]:
    labels = dict(report.ROWS)
    for m in peers:
        labels[m.NAME] = m.LABEL
        labels[f"{m.NAME}_trained"] = f"{m.LABEL} + local training"
    return {k: labels.get(k, k) for k in variants}


def sparsity_per_block(plan, group_params: Iterable[dict]) -> dict[int, float]:
    out = {}
    for (layout, _), p in zip(plan, group_params):
        v = np.asarray(p["v"])
        for b, i in enumerate(layout.blocks):
            out[i] = float(np.mean(v[b] == 0))
    return out


def export_compressed(state: stages.Run, arch: base.Architecture, params, plan, group_params: Iterable[dict],
                      manifest: dict) -> dict:
    """Both exports of the compressed model: the Orbax items with their manifest (`compressed/`)
    and the sparse safetensors file (`compressed.safetensors`: U, V's nonzeros and their indices),
    converted from what was written. `group_params` yields the groups' factors in order (read
    from the stage store as it goes); each export holds one group at a time. Returns paths and
    the on-disk sizes next to the dense MLP's."""
    state.log(f"export: {state.path('compressed')} and compressed.safetensors, one group at a time")
    stages.trim_heap()
    lc = state.cfg["local"]
    manifest = {**manifest, "sparsity": {
        "algorithm": lc["algorithm"], "target": state.cfg["fips"]["sparsity"],
        "nm": [lc["n"], lc["m"]] if lc["algorithm"] == "nm" else None, "nm_axis": "rank (axis -2 of v)"}}
    export.save(state.path("compressed"), arch, params, plan, group_params, manifest=manifest)
    out = {"orbax": state.path("compressed"), "safetensors": state.path("compressed.safetensors")}
    if sharding.is_writer():
        sizes = export_sparse.convert(out["orbax"], out["safetensors"])
        out["sizes"] = sizes.as_dict()
        state.log("sparse safetensors export:\n" + sizes.table())
    return out
