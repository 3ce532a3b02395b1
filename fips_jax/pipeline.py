"""FiPS end to end, in the order of the paper's Algorithm 1.

    load dense params -> calibration data -> group -> SVD init -> local error minimisation with
    sparsity -> assemble compressed params -> evaluate -> export

Every stage leaves its result in the workdir and is skipped when found there, and the local
optimisation checkpoints every `checkpoint_every` steps, so rerunning the same command after an
interruption resumes where it stopped.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from fips_jax import (budget, calibration, checkpointing, data, export, export_sparse, finetune, grouping, local_opt,
                      report, sharding, sparsity, svd_init)
from fips_jax.evaluators import classification, features, perplexity
from fips_jax.models import base, registry

# Config keys that change no saved stage: changing them on resume is allowed.
RESUME_SAFE_KEYS = ("checkpoint_every", "log_every", "eval.batch_size", "chunk", "mesh",
                    "sharding.max_replicated_mib")


class Run:
    """Shared state of one pipeline run: config, workdir, logging and stage timings."""

    def __init__(self, cfg: dict, workdir: str, log: Callable[[str], None], on_step=None):
        self.cfg, self.workdir, self.log, self.on_step = cfg, workdir, log, on_step
        self.timings: dict[str, float] = {}
        self.mesh = sharding.make_mesh(cfg["mesh"])
        self.rules = sharding.rules_from_config(cfg["sharding"]["rules"])

    def path(self, *parts: str) -> str:
        return os.path.join(self.workdir, *parts)

    def stage(self, name: str, fn: Callable[[], dict]) -> dict:
        """Run `fn` once: its JSON result is saved under stages/ and reused on later runs."""
        out = self.path("stages", f"{name}.json")
        if os.path.exists(out):
            self.log(f"[{name}] done earlier, reusing {out}")
            return checkpointing.read_json(out)
        self.log(f"[{name}] ...")
        t0 = time.perf_counter()
        result = fn()
        self.timings[name] = time.perf_counter() - t0
        checkpointing.fault_point("stage")
        if sharding.is_writer():
            checkpointing.write_json(out, result)
        self.log(f"[{name}] {self.timings[name]:.1f}s")
        return result


def local_config(cfg: dict, steps: int) -> local_opt.LocalOptConfig:
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


def plan_groups(cfg: dict, arch: base.Architecture, params: Any) -> list[tuple[grouping.GroupLayout, int]]:
    """Groups with their layouts and ranks (SPEC §2), validated before any compute."""
    fc = cfg["fips"]
    groups = grouping.make_groups(
        arch.num_blocks, groups=fc["groups"] or None, group_size=None if fc["groups"] else fc["group_size"])
    v_sparsity = 0.0 if cfg["local"]["algorithm"] == "dense" else fc["sparsity"]
    out = []
    for g, blocks in enumerate(groups):
        layout = grouping.group_layout(params, arch.mlp_spec, arch.mlp_path, blocks, group=g)
        r = budget.rank_for_budget(layout.d, layout.p, layout.n_blocks, layout.n_fcs, fc["budget"], v_sparsity,
                                   round_to=fc["round_to"] or None, reference_parity=fc["reference_parity"],
                                   group=f"group {g} (blocks {blocks[0]}-{blocks[-1]})")
        m = cfg["local"]["m"]
        if cfg["local"]["algorithm"] == "nm" and r % m:
            raise ValueError(
                f"group {g} (blocks {blocks[0]}-{blocks[-1]}): rank {r} is not a multiple of local.m={m}, and N:M "
                f"tiles run along the rank; set fips.round_to to a multiple of {m} (64 for sparse kernels)")
        out.append((layout, r))
    return out


def per_layer_svd_params(params: Any, plan, budget_fraction: float) -> tuple[Any, int]:
    """The baseline: every grouped FC replaced by its own truncated SVD at the same budget.
    Returns (params, kept weights)."""
    svd = jax.jit(svd_init.per_layer_svd, static_argnames="rank")
    kernels = {}
    for layout, _ in plan:
        r = budget.per_layer_rank(layout.d, layout.p, budget_fraction, layer=f"blocks {layout.blocks}")
        for row in layout.fc_paths:
            for path in row:
                kernels[path] = svd(base.get_path(params, path), rank=r)
    return grouping.replace_kernels(params, kernels), per_layer_svd_kept(plan, budget_fraction)


def per_layer_svd_kept(plan, budget_fraction: float) -> int:
    """Weights the per-layer SVD baseline keeps (what `per_layer_svd_params` returns), without
    computing it."""
    kept = 0
    for layout, _ in plan:
        r = budget.per_layer_rank(layout.d, layout.p, budget_fraction, layer=f"blocks {layout.blocks}")
        kept += r * (layout.d + layout.p) * len(layout.fc_paths) * len(layout.fc_names)
    return kept


def one_shot(params: dict, cfg: dict) -> dict:
    """SVD init pruned once to the target sparsity (global magnitude), no training: the
    "FiPS after SVD init" row, at the same budget as the final model."""
    lc = local_config(cfg, 1)
    # Only the final target matters, and GMP and RigL reach it by the same magnitude ranking as
    # a static mask; building their schedules would need a step count that this row has none of.
    algorithm = "static" if lc.algorithm in ("gmp", "rigl") else lc.algorithm
    updater = sparsity.create_updater(
        algorithm=algorithm, sparsity=lc.sparsity if algorithm != "nm" else None, filter_regex=local_opt.V_FILTER,
        scope=lc.scope, n=lc.n, m=lc.m, axis=lc.nm_axis)
    return updater.instant_sparsify(params)[0]


def group_init(arch: base.Architecture, layout: grouping.GroupLayout, rank: int, params: Any, tau: float,
               method: str = "svd", mesh=None, rules=sharding.DEFAULT_RULES) -> dict:
    """SVD-initialised trainable params of one group (SPEC §3). method "gram": the same factors
    from W W^T with W split along its long axis over `mesh` (`svd_init.init_group_gram`)."""
    static = ("rank", "n_blocks", "n_fcs", "tau")
    if method == "svd":
        init, w = jax.jit(svd_init.init_group, static_argnames=static), grouping.concat_group(params, layout)
    elif method == "gram":
        def named(axes, shape):
            return jax.sharding.NamedSharding(mesh, sharding.logical_to_spec(axes, mesh, rules, shape))

        n, f, d, p = layout.n_blocks, layout.n_fcs, layout.d, layout.p
        w = jax.jit(grouping.concat_group, static_argnums=1,
                    out_shardings=named(sharding.GROUP_MATRIX_AXES, (d, n * f * p)))(params, layout)
        out_sh = svd_init.FipsFactors(u=named(sharding.U_AXES, (d, rank)), v=named(sharding.V_AXES, (n, f, rank, p)))
        init = jax.jit(svd_init.init_group_gram, static_argnames=static, out_shardings=out_sh)
    else:
        raise ValueError(f"fips.init {method!r} not in ('svd', 'gram')")
    factors = init(w, rank=rank, n_blocks=layout.n_blocks, n_fcs=layout.n_fcs, tau=tau)
    return local_opt.init_group_params(factors, params, layout, arch.mlp_spec)


def group_shardings(r: Run, arch: base.Architecture, groups: dict) -> dict:
    """{group name: NamedShardings of its params} by the run's mesh and rules."""
    spec = arch.mlp_spec
    return {n: sharding.group_shardings(p, r.mesh, r.rules, spec.fc_names, spec.transposed) for n, p in groups.items()}


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


def run(cfg: dict, workdir: str, log: Callable[[str], None] = print, on_step=None) -> dict:
    """The whole pipeline; returns the metrics also written to `workdir/metrics.json`."""
    check_config(cfg)
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise ValueError(f"workdir {workdir} is a file, not a directory")
    os.makedirs(workdir, exist_ok=True)
    checkpointing.check_config(workdir, cfg, ignore=RESUME_SAFE_KEYS, write=sharding.is_writer())
    r = Run(cfg, workdir, log, on_step)
    t_start = time.perf_counter()
    # One device: nothing to place (placing a loaded tree would briefly hold it twice).
    place_for = (lambda a: sharding.place_fn(r.mesh, r.rules, a.logical_axes())) if r.mesh.size > 1 else None
    arch, params, tokenizer = registry.load_model(cfg["model"], seed=cfg["seed"], place_for=place_for)
    log(f"model: {arch.name}, {arch.num_blocks} blocks, {base.count_params(params) / 1e6:.1f}M params, "
        f"mesh {dict(r.mesh.shape)}")
    if r.mesh.size > 1:
        sharding.check_replication(params, cfg["sharding"]["max_replicated_mib"] * 2**20)
    plan = plan_groups(cfg, arch, params)
    for g, (layout, rank) in enumerate(plan):
        log(f"group {g}: blocks {layout.blocks}, d {layout.d}, p {layout.p}, rank {rank}")
    results = (compress_llm(r, arch, params, tokenizer, plan) if arch.is_causal_lm
               else compress_vit(r, arch, params, plan))
    metrics = {
        **results,
        "model": arch.name,
        "groups": [{"blocks": list(l.blocks), "rank": k, "d": l.d, "p": l.p} for l, k in plan],
        "config": cfg,
        "versions": {"python": platform.python_version(), "jax": jax.__version__, "backend": jax.default_backend(),
                     "devices": [str(d) for d in jax.devices()]},
        "timings_s": {**r.timings, "total_this_process": time.perf_counter() - t_start},
    }
    if sharding.is_writer():
        checkpointing.write_json(r.path("metrics.json"), metrics)
        report.write(r.workdir, metrics)
    log(report.table(metrics))
    return metrics


# ---------------------------------------------------------------------------------------------
# Shared pieces
# ---------------------------------------------------------------------------------------------


def _flat(tree: dict, prefix: str = "") -> dict[str, np.ndarray]:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}/"))
        else:
            out[f"{prefix}{k}"] = np.asarray(v)
    return out


def _unflat(flat: dict[str, np.ndarray]) -> dict:
    out: dict = {}
    for key, v in flat.items():
        node = out
        *parents, leaf = key.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = jnp.asarray(v)
    return out


def save_group(path: str, params: dict) -> None:
    # Collective: every process gathers the global arrays; process 0 writes them.
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel

    flat = _flat(multihost_utils.process_allgather(params, tiled=True))
    if sharding.is_writer():
        checkpointing.save_arrays(path, flat)


def load_group(path: str) -> dict:
    return _unflat(checkpointing.load_arrays(path))


def relative_error(out: jax.Array, target: jax.Array) -> float:
    return float(jnp.sum(jnp.square(out - target)) / jnp.maximum(jnp.sum(jnp.square(target)), 1e-30))


def fips_budget(plan, group_params: list[dict], dense_params: Any) -> budget.BudgetReport:
    kept = sum(budget.group_kept_params(p["u"], p["v"]) for p in group_params)
    return budget.budget_report(kept, dense_params, sum(l.dense_weights for l, _ in plan))


def sparsity_per_block(plan, group_params: list[dict]) -> dict[int, float]:
    out = {}
    for (layout, _), p in zip(plan, group_params):
        v = np.asarray(p["v"])
        for b, i in enumerate(layout.blocks):
            out[i] = float(np.mean(v[b] == 0))
    return out


def _steps(n_items: int, batch: int, epochs: float) -> int:
    return max(int(round(epochs * -(-n_items // batch))), 1)


def global_finetune(r: Run, arch: base.Architecture, params: Any, layouts: dict, group_params: dict,
                    inputs: np.ndarray, labels: np.ndarray | None) -> dict | None:
    """The optional global error minimisation (SPEC §4, `finetune.enabled`): every group's U, V and
    biases trained together through the whole model, V kept at its number of nonzeros by RigL.
    Returns {group name: params}, or None when disabled. Resumes like the local loop."""
    cfg = r.cfg
    ft = finetune.from_config(cfg["finetune"], int(inputs.shape[0]))
    if ft is None:
        return None
    path = r.path("finetune", "final.npz")
    if os.path.exists(path):
        r.log(f"[finetune] done earlier, reusing {path}")
        return load_group(path)
    r.log(f"[finetune] {ft.steps} steps, batch {ft.batch}, loss {ft.loss}, {ft.algorithm}")
    t0 = time.perf_counter()
    tuned, losses = finetune.finetune(
        arch, params, layouts, group_params, jnp.asarray(inputs), ft, r.path("finetune", "loop"),
        labels=None if labels is None else jnp.asarray(labels), seed=cfg["seed"],
        checkpoint_every=cfg["checkpoint_every"], log=r.log, on_step=r.on_step,
        param_shardings=group_shardings(r, arch, group_params))
    r.timings["finetune"] = time.perf_counter() - t0
    save_group(path, tuned)
    if sharding.is_writer():
        checkpointing.write_json(r.path("finetune", "stats.json"), {
            "steps": ft.steps, "loss_first": losses[0] if losses else None,
            "loss_last": losses[-1] if losses else None, "seconds": r.timings["finetune"]})
    return tuned


def export_compressed(r: Run, arch: base.Architecture, params: Any, plan, group_params: list, manifest: dict) -> dict:
    """Both exports of the compressed model: the Orbax tree with its manifest (`compressed/`) and
    the sparse safetensors file (`compressed.safetensors`: U, V's nonzeros and their indices).
    Returns paths and the on-disk sizes next to the dense MLP's."""
    lc = r.cfg["local"]
    manifest = {**manifest, "sparsity": {
        "algorithm": lc["algorithm"], "target": r.cfg["fips"]["sparsity"],
        "nm": [lc["n"], lc["m"]] if lc["algorithm"] == "nm" else None, "nm_axis": "rank (axis -2 of v)"}}
    export.save(r.path("compressed"), arch, params, plan, group_params, manifest=manifest)
    out = {"orbax": r.path("compressed"), "safetensors": r.path("compressed.safetensors")}
    if sharding.is_writer():
        sizes = export_sparse.convert(out["orbax"], out["safetensors"])
        out["sizes"] = sizes.as_dict()
        r.log("sparse safetensors export:\n" + sizes.table())
    return out


# ---------------------------------------------------------------------------------------------
# LLMs: MLP-output reconstruction, streamed group by group
# ---------------------------------------------------------------------------------------------


def _text(src: dict) -> str:
    kind = src["source"]
    if kind == "wiki_offline":
        return data.wiki_offline_text(src["split"])
    if kind == "local_text":
        if not src["path"]:
            raise ValueError("data source local_text needs a path (--config.data.<calib|eval>.path=...)")
        if not os.path.exists(src["path"]):
            raise FileNotFoundError(f"text file not found: {src['path']}")
        return data.local_text(src["path"])
    if kind == "hf":
        return data.hf_text(src["dataset"], src["dataset_config"] or None, src["split"], src["n_documents"] or None)
    raise ValueError(f"text source {kind!r} not in ('wiki_offline', 'local_text', 'hf')")


def _tokens(src: dict, tokenizer, n_tokens: int) -> np.ndarray:
    """At least `n_tokens` token ids from the source if it has them (all of it otherwise).
    Only a prefix of a long text is encoded: tokenising megabytes for a few windows is waste."""
    text = _text(src)
    chars = max(n_tokens * 8, 4096)
    while True:
        ids = data.encode(tokenizer, text[:chars])
        if ids.shape[0] >= n_tokens or chars >= len(text):
            return ids
        chars *= 2


def compress_llm(r: Run, arch: base.Architecture, params: Any, tokenizer, plan) -> dict:
    cfg, dc = r.cfg, r.cfg["data"]
    calib_src, eval_src = dc["calib"], dc["eval"]
    window, n_windows = calib_src["window"], calib_src["n_windows"]
    calib = data.token_windows(_tokens(calib_src, tokenizer, window * n_windows), window, n_windows)
    context = eval_src["context"]
    # The whole split is tokenised (seconds) so that a run scoring only `max_windows` of its
    # windows can say how many there were: "standard" perplexity means the whole split.
    split_ids = data.encode(tokenizer, _text(eval_src))
    eval_ids = split_ids[: context * eval_src["max_windows"]]
    holdout = data.token_windows(eval_ids, context, min(dc["holdout_windows"], max(len(eval_ids) // context, 1)))
    eval_scope = {"windows_scored": len(eval_ids) // context, "windows_in_split": len(split_ids) // context,
                  "tokens_in_split": int(len(split_ids))}
    n_tok = calib.size
    log, spec = r.log, arch.mlp_spec
    log(f"calibration: {calib.shape[0]} windows x {window} tokens ({calib_src['source']}:{calib_src.get('split', '')}); "
        f"evaluation: {report.eval_scope_label(eval_scope, context)}, held-out reconstruction: {holdout.size} tokens")

    # Memory: nothing model-sized is held across the group loop beyond the dense params and the
    # groups' final factors. The baseline's kernels are made per group, then again for its eval;
    # the one-shot init models are rebuilt from init.npz at eval time; each evaluated model is
    # assembled inside its stage and dropped after it.
    calib_stream = calibration.HiddenStream(arch, params, calib, cfg["chunk"])
    hold_stream = calibration.HiddenStream(arch, params, holdout, cfg["chunk"])
    mse = jax.jit(local_opt.mlp_group_loss, static_argnums=1)

    final_params, group_stats = [], []
    done = [os.path.exists(r.path("groups", f"g{g:02d}", "stats.json")) for g in range(len(plan))]
    resume_at = 0
    while resume_at < len(plan) and done[resume_at]:
        resume_at += 1
    if resume_at:
        saved = checkpointing.load_arrays(r.path("groups", f"g{resume_at - 1:02d}", "hidden_after.npz"))
        nxt = plan[resume_at - 1][0].blocks[-1] + 1
        calib_stream.restore(saved["calib"], nxt)
        hold_stream.restore(saved["holdout"], nxt)
        log(f"groups 0-{resume_at - 1} done earlier; resuming at group {resume_at}")

    lcfg_template = local_config(cfg, 1)
    batch = min(cfg["local"]["batch_tokens"], n_tok)
    key = jax.random.PRNGKey(cfg["seed"])
    compute_dtype = jnp.dtype(cfg["local"].get("compute_dtype", "float32"))

    # One function for every group: `local_opt.train` reuses its compiled step across groups
    # (and blocks, in sequential mode) of the same shapes.
    def loss_fn(p, step, x, y):
        idx = local_opt.minibatch_indices(key, step, x.shape[1], batch)
        return local_opt.mlp_group_loss(p, spec, x[:, idx], y[:, idx], compute_dtype)

    for g, (layout, rank) in enumerate(plan):
        gdir = r.path("groups", f"g{g:02d}")
        if g < resume_at:
            final_params.append(load_group(os.path.join(gdir, "final.npz")))
            group_stats.append(checkpointing.read_json(os.path.join(gdir, "stats.json")))
            continue
        t0 = time.perf_counter()
        mlp_in = calib_stream.advance(layout.blocks)  # [n, tokens, d] on the host
        act_sh = sharding.logical_to_sharding(sharding.ACTIVATION_AXES, r.mesh, r.rules, mlp_in)
        x = sharding.put(mlp_in, act_sh)
        xh = jnp.asarray(hold_stream.advance(layout.blocks))
        teacher = local_opt.stack_dense_mlps(params, layout)
        # Targets are fixed (teacher forcing), so they are computed once, not every step.
        y = jax.jit(local_opt.mlp_targets, static_argnums=0, out_shardings=act_sh)(spec, teacher, x)
        init_path = os.path.join(gdir, "init.npz")
        if os.path.exists(init_path):
            p0 = load_group(init_path)
        else:
            p0 = group_init(arch, layout, rank, params, cfg["fips"]["tau"], cfg["fips"]["init"], r.mesh, r.rules)
            save_group(init_path, p0)
        p_sh = sharding.group_shardings(p0, r.mesh, r.rules, spec.fc_names, spec.transposed)

        steps = _steps(n_tok, batch, cfg["local"]["epochs"])
        lcfg = dataclasses.replace(lcfg_template, steps=steps)
        if cfg["fips"]["mode"] == "joint":
            p1, losses = local_opt.train(p0, loss_fn, (x, y), lcfg, os.path.join(gdir, "loop"),
                                         checkpoint_every=cfg["checkpoint_every"], log=log, name=f"group {g}",
                                         on_step=r.on_step, param_shardings=p_sh)
        elif cfg["fips"]["mode"] == "sequential":
            # The authors' order: one MLP at a time with a fresh optimiser; later MLPs keep moving U.
            p1, losses = dict(p0), []
            for b in range(layout.n_blocks):
                sub = {"u": p1["u"], "v": p1["v"][b:b + 1]}
                if "bias" in p1:
                    sub["bias"] = {k: v[b:b + 1] for k, v in p1["bias"].items()}
                sub, lb = local_opt.train(sub, loss_fn, (x[b:b + 1], y[b:b + 1]), lcfg,
                                          os.path.join(gdir, f"loop_b{b}"), checkpoint_every=cfg["checkpoint_every"],
                                          log=log, name=f"group {g} block {layout.blocks[b]}", on_step=r.on_step)
                new = {"u": sub["u"], "v": p1["v"].at[b].set(sub["v"][0])}
                if "bias" in sub:
                    new["bias"] = {k: p1["bias"][k].at[b].set(sub["bias"][k][0]) for k in sub["bias"]}
                p1 = new
                losses += lb
        else:
            raise ValueError(f"fips.mode {cfg['fips']['mode']!r} not in ('joint', 'sequential')")

        base_teacher = local_opt.stack_dense_mlps(per_layer_svd_params(params, [(layout, rank)], cfg["fips"]["budget"])[0],
                                                  layout)
        target = local_opt.mlp_targets(spec, teacher, xh)

        def rel(mlp_out):
            return [relative_error(mlp_out[b], target[b]) for b in range(layout.n_blocks)]

        stats = {
            "blocks": list(layout.blocks), "rank": rank, "steps": steps,
            "loss_first": losses[0] if losses else None, "loss_last": losses[-1] if losses else None,
            "heldout_rel_error": {
                "per_layer_svd": rel(local_opt.mlp_targets(spec, base_teacher, xh)),
                "fips_init": rel(_group_mlp_out(spec, one_shot(p0, cfg), xh)),
                "fips_final": rel(_group_mlp_out(spec, p1, xh)),
            },
            "calib_mse_final": float(mse(p1, spec, x, y)[0]),
            "seconds": time.perf_counter() - t0,
        }
        save_group(os.path.join(gdir, "final.npz"), p1)
        if sharding.is_writer():
            checkpointing.save_arrays(os.path.join(gdir, "hidden_after.npz"),
                                      {"calib": calib_stream.state(), "holdout": hold_stream.state()})
            checkpointing.write_json(os.path.join(gdir, "stats.json"), stats)
            if g:  # only the newest stream state is needed to resume
                prev = r.path("groups", f"g{g - 1:02d}", "hidden_after.npz")
                if os.path.exists(prev):
                    os.remove(prev)
        checkpointing.fault_point("group_done")
        e = stats["heldout_rel_error"]
        log(f"group {g} done in {stats['seconds']:.0f}s: held-out rel. error per-layer SVD "
            f"{np.mean(e['per_layer_svd']):.4f}, FiPS init {np.mean(e['fips_init']):.4f}, "
            f"final {np.mean(e['fips_final']):.4f}")
        final_params.append(p1)
        group_stats.append(stats)

    layouts = {f"g{g:02d}": layout for g, (layout, _) in enumerate(plan)}
    tuned = global_finetune(r, arch, params, layouts, dict(zip(layouts, final_params)), calib, None)
    layout_list = list(layouts.values())

    def fips_init_model():
        inits = [one_shot(load_group(r.path("groups", f"g{g:02d}", "init.npz")), cfg) for g in range(len(plan))]
        return local_opt.assemble(params, list(zip(layout_list, inits)))

    apply = jax.jit(arch.apply)

    def ppl(model):
        return perplexity.perplexity(lambda t: apply(model, t), eval_ids, context, eval_src["protocol"],
                                     batch_size=cfg["eval"]["batch_size"], jit=False)

    evals = {
        "dense": r.stage("eval_dense", lambda: ppl(params)),
        "per_layer_svd": r.stage("eval_per_layer_svd", lambda: ppl(
            per_layer_svd_params(params, plan, cfg["fips"]["budget"])[0])),
        "fips_init": r.stage("eval_fips_init", lambda: ppl(fips_init_model())),
        "fips_final": r.stage("eval_fips_final", lambda: ppl(local_opt.assemble(params, list(zip(layout_list, final_params))))),
    }
    if tuned is not None:
        final_params = [tuned[n] for n in layouts]
        evals["fips_finetuned"] = r.stage("eval_fips_finetuned", lambda: ppl(
            local_opt.assemble(params, [(layouts[n], tuned[n]) for n in layouts])))
    fips_b = fips_budget(plan, final_params, params)
    base_b = budget.budget_report(per_layer_svd_kept(plan, cfg["fips"]["budget"]), params, fips_b.dense_mlp)
    exported = export_compressed(r, arch, params, plan, final_params,
                                 {"budget": fips_b.as_dict(), "evals": evals, "finetuned": tuned is not None})
    return {
        "task": "causal_lm", "metric": "perplexity", "protocol": eval_src["protocol"],
        "evals": evals, "export": exported,
        "budget": {"fips": fips_b.as_dict(), "per_layer_svd": base_b.as_dict()},
        "per_block": _per_block(plan, final_params, group_stats),
        "groups_stats": group_stats,
        "data": {"calib_tokens": int(n_tok), "eval_tokens": int(len(eval_ids)), "heldout_tokens": int(holdout.size),
                 "eval": {**eval_scope, "label": report.eval_scope_label(eval_scope, context)}},
    }


def _group_mlp_out(spec, p, xh):
    bias = p.get("bias")
    return jax.vmap(lambda v_b, bias_b, x_b: base.mlp_apply(
        spec, local_opt.block_mlp_params(spec, p["u"], v_b, bias_b), x_b))(p["v"], bias, xh)


def _per_block(plan, final_params, group_stats) -> dict:
    sp = sparsity_per_block(plan, final_params)
    out = {"block": sorted(sp), "sparsity": [sp[i] for i in sorted(sp)]}
    for key in ("per_layer_svd", "fips_init", "fips_final"):
        vals = {}
        for (layout, _), st in zip(plan, group_stats):
            for b, i in enumerate(layout.blocks):
                vals[i] = st["heldout_rel_error"][key][b]
        out[f"heldout_rel_error_{key}"] = [vals[i] for i in sorted(vals)]
    return out


# ---------------------------------------------------------------------------------------------
# ViTs: block-output reconstruction of all groups jointly, teacher recomputed per minibatch
# ---------------------------------------------------------------------------------------------


def _images(src: dict, arch: base.Architecture, seed: int) -> tuple[np.ndarray, np.ndarray | None]:
    kind = src["source"]
    if kind == "random":
        h, w = arch.config.image_size
        rng = np.random.default_rng(seed)
        return rng.standard_normal((src["n_images"], h, w, arch.config.num_channels)).astype(np.float32), None
    if kind == "imagenet_folder":
        if not os.path.isdir(src["path"]):
            raise FileNotFoundError(f"ImageNet folder not found: {src['path']!r} (expected {src['path']}/"
                                    f"{src['split']}/<wnid>/*.JPEG)")
        images, labels = data.imagenet_folder_calibration(
            src["path"], per_class=src["per_class"], n_classes=src["n_classes"] or None, seed=seed, split=src["split"],
            interpolation=src["interpolation"])
        return images, np.asarray(labels)
    if kind == "fashion_mnist":  # unlabelled here: the backbones it serves output features
        raw, _ = data.fashion_mnist(src["split"], n=src["n_images"], path=src["path"] or None)
        return data.grayscale_to_model_inputs(raw, arch.config.image_size), None
    raise ValueError(f"image source {kind!r} not in ('random', 'imagenet_folder', 'fashion_mnist')")


def compress_vit(r: Run, arch: base.Architecture, params: Any, plan) -> dict:
    cfg, dc, log = r.cfg, r.cfg["data"], r.log
    if cfg["local"].get("compute_dtype", "float32") != "float32":
        raise ValueError("local.compute_dtype applies to the LLM MLP-output loss; ViT block-output "
                         "calibration runs in float32")
    calib, calib_labels = _images(dc["calib"], arch, cfg["seed"])
    eval_images, eval_labels = _images(dc["eval"], arch, cfg["seed"] + 1)
    holdout = eval_images[: dc["holdout_images"]]
    log(f"calibration: {calib.shape[0]} images; evaluation: {eval_images.shape[0]} images")
    layouts = {f"g{g:02d}": layout for g, (layout, _) in enumerate(plan)}
    init_path = r.path("groups", "init.npz")
    if os.path.exists(init_path):
        p0 = load_group(init_path)
    else:
        p0 = {name: group_init(arch, layout, rank, params, cfg["fips"]["tau"], cfg["fips"]["init"], r.mesh, r.rules)
              for name, (layout, rank) in zip(layouts, plan)}
        save_group(init_path, p0)
    all_blocks = sorted(i for layout in layouts.values() for i in layout.blocks)
    batch = min(cfg["local"]["batch_images"], calib.shape[0])
    key = jax.random.PRNGKey(cfg["seed"])

    def loss_fn(p, step, images, dense):
        idx = local_opt.minibatch_indices(key, step, images.shape[0], batch)
        inputs, outputs, ctx = calibration.teacher_blocks(arch, dense, images[idx], all_blocks)
        return local_opt.block_outputs_loss(p, arch, dense, layouts, inputs, outputs, ctx)

    final_path = r.path("groups", "final.npz")
    steps = _steps(calib.shape[0], batch, cfg["local"]["epochs"])
    if os.path.exists(final_path):
        p1, losses = load_group(final_path), []
    else:
        # One optimiser for everything: each shared U receives its group's summed gradient and
        # global pruning ranks every V of the model together (SPEC §4, §5).
        p1, losses = local_opt.train(p0, loss_fn, (jnp.asarray(calib), params), local_config(cfg, steps),
                                     r.path("groups", "loop"), checkpoint_every=cfg["checkpoint_every"], log=log,
                                     name="local", on_step=r.on_step,
                                     param_shardings=group_shardings(r, arch, p0))
        save_group(final_path, p1)

    names = list(layouts)
    tuned = global_finetune(r, arch, params, layouts, p1, calib, calib_labels)
    baseline_params, baseline_kept = per_layer_svd_params(params, plan, cfg["fips"]["budget"])
    models = {
        "dense": params,
        "per_layer_svd": baseline_params,
        "fips_init": local_opt.assemble(params, [(layouts[n], p) for n, p in one_shot(p0, cfg).items()]),
        "fips_final": local_opt.assemble(params, [(layouts[n], p1[n]) for n in names]),
    }
    if tuned is not None:
        models["fips_finetuned"] = local_opt.assemble(params, [(layouts[n], tuned[n]) for n in names])
    inputs, outputs, ctx = jax.jit(lambda p, x: calibration.teacher_blocks(arch, p, x, all_blocks))(
        params, jnp.asarray(holdout))
    block = {i: jax.jit(lambda p, h, c, i=i: arch.block(p, i, h, c)[0]) for i in all_blocks}
    heldout = {k: [relative_error(block[i](m, inputs[i], ctx), outputs[i]) for i in all_blocks]
               for k, m in models.items() if k != "dense"}
    apply = jax.jit(arch.apply)
    bs = cfg["eval"]["batch_size"]

    def evaluate(model):
        logits = np.concatenate([np.asarray(apply(model, jnp.asarray(eval_images[s:s + bs])))
                                 for s in range(0, eval_images.shape[0], bs)])
        out = {"n_examples": int(logits.shape[0])}
        if eval_labels is not None:
            correct = classification.topk_correct(jnp.asarray(logits), jnp.asarray(eval_labels), ks=(1, 5))
            out.update(top1=float(np.mean(correct[0])), top5=float(np.mean(correct[1])))
        return out, logits

    dense_eval, dense_logits = evaluate(params)
    evals = {"dense": dense_eval}
    for k in [k for k in models if k != "dense"]:
        ev, logits = evaluate(models[k])
        ev["agreement_with_dense"] = float(np.mean(logits.argmax(-1) == dense_logits.argmax(-1)))
        ev["logits_rel_error"] = relative_error(jnp.asarray(logits), jnp.asarray(dense_logits))
        evals[k] = ev
    probe_cfg = cfg["eval"]["probe"]
    probe = None
    if probe_cfg["source"]:  # linear probe + CLS cosine of every model's features (backbones)
        probe = r.stage("eval_probe", lambda: features.probe_models(arch, models, probe_cfg, batch_size=bs))
        log("linear probe:\n" + features.report_table(probe))
    final_list = [(tuned or p1)[n] for n in names]
    fips_b = fips_budget(plan, final_list, params)
    base_b = budget.budget_report(baseline_kept, params, fips_b.dense_mlp)
    exported = export_compressed(r, arch, params, plan, final_list,
                                 {"budget": fips_b.as_dict(), "evals": evals, "finetuned": tuned is not None})
    sp = sparsity_per_block(plan, final_list)
    return {
        "task": "image_classification", "metric": "top1" if eval_labels is not None else "agreement_with_dense",
        "evals": evals, "export": exported, **({"probe": probe} if probe is not None else {}),
        "budget": {"fips": fips_b.as_dict(), "per_layer_svd": base_b.as_dict()},
        "per_block": {"block": all_blocks, "sparsity": [sp[i] for i in all_blocks],
                      **{f"heldout_rel_error_{k}": v for k, v in heldout.items()}},
        "loss_first": losses[0] if losses else None, "loss_last": losses[-1] if losses else None,
        "data": {"calib_images": int(calib.shape[0]), "eval_images": int(eval_images.shape[0])},
    }
