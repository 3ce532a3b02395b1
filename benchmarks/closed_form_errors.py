"""Closed-form reconstruction error of one group, per FC: the peers against FiPS's whitened init
at several sparsities, before and after OBS pruning. Seconds per setting, no training.

    python benchmarks/closed_form_errors.py --config=configs/dinov2_small.py:cpu --group=0 \
        --sparsity=0.5,0.6,0.7,0.75 --whiten_steps=0,4

The error of FC f is the activation-weighted one every method's closed form minimises
(`whitening.weighted_error`, relative to U V = 0): input-side FCs (gate/up/fc1) weighted by the
block's MLP-input second moment, output-side ones (down/fc2) by the hidden activations'. The
statistics are the dense model's on the calibration split (`data.calib`), as in the pipeline.
For each sparsity s the rank is the one the budget gives (`pipeline.plan_groups`); at s = 0 V is
dense. It shows which FC a setting sacrifices: the whitened basis minimises the sum over FCs in
absolute units, so the FCs with the largest weighted energy set it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fips_jax import calib_stats, calibration, config_base, factors, grouping, local_opt, methods, pipeline, stages  # noqa: E402
from fips_jax import whitening  # noqa: E402
from fips_jax.methods import fips  # noqa: E402
from fips_jax.models import registry  # noqa: E402


def per_fc_errors(ws: np.ndarray, stats, transposed, u: np.ndarray, v: np.ndarray) -> list[float]:
    """Relative weighted error of U V against ws [n, F, d, p] for each FC f."""
    return [whitening.weighted_error(u, v[:, f:f + 1], ws[:, f:f + 1], stats.inputs, stats.hidden,
                                     transposed[f:f + 1], relative=True) for f in range(ws.shape[1])]


def group_stats(cfg: dict, arch, params, tokenizer, plan, g: int, run):
    """The group's dense statistics on the calibration data, for an LLM or an image model."""
    if arch.is_causal_lm:
        from fips_jax.tasks import causal_lm  # pylint: disable=import-outside-toplevel

        dat = causal_lm.load_data(run, arch, tokenizer)
        stream = calibration.HiddenStream(arch, params, dat.calib, cfg["chunk"])
        for layout, _ in plan[:g]:
            stream.advance(layout.blocks, keep_inputs=False)
        layout = plan[g][0]
        grams = calib_stats.group_input_grams(arch.mlp_spec, local_opt.stack_dense_mlps(params, layout),
                                              stream.advance(layout.blocks))
        return methods.GroupStats(grams["in"], grams["hidden"], int(grams["n"]))
    from fips_jax.tasks import image  # pylint: disable=import-outside-toplevel

    dat = image.load_data(run, arch, tokenizer)
    return image.group_statistics(arch, params, plan[:g + 1], dat.calib, cfg["chunk"])[g]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/smollm2.py")
    ap.add_argument("--group", type=int, default=0)
    ap.add_argument("--sparsity", default="0,0.5,0.6,0.7,0.75", help="comma-separated fips.sparsity values")
    ap.add_argument("--whiten_steps", default="0,4", help="comma-separated fips.whiten_steps values")
    ap.add_argument("--peers", default="svd_llm,basis_sharing")
    ap.add_argument("--json", default="", help="also write the results here")
    args = ap.parse_args()
    base = config_base.load_config(args.config)
    run = stages.Run(base, tempfile.mkdtemp(prefix="closed-form-"), log=lambda s: None)
    arch, params, tokenizer = registry.load_model(base["model"], seed=base["seed"])
    plan = pipeline.plan_groups(base, arch, params)
    if not 0 <= args.group < len(plan):
        raise SystemExit(f"--group {args.group}: the config has groups 0-{len(plan) - 1}")
    layout = plan[args.group][0]
    stats = group_stats(base, arch, params, tokenizer, plan, args.group, run)
    w = np.asarray(grouping.concat_group(params, layout), np.float64)
    ws = w.reshape(layout.d, layout.n_blocks, layout.n_fcs, layout.p).transpose(1, 2, 0, 3)
    eye = np.eye(layout.d)
    rows = []

    def add(name, rank, errs, seconds, kept):
        row = {"setting": name, "rank": rank, "errors": dict(zip(layout.fc_names, errs)),
               "kept_fraction": kept, "seconds": round(seconds, 1)}
        rows.append(row)
        print(json.dumps(row), flush=True)

    for peer in methods.parse(args.peers):
        t0 = time.perf_counter()
        prob = methods.Problem(layout, plan[args.group][1], base["fips"]["budget"], params, arch.mlp_spec, base, stats)
        parts = peer.init(prob)
        wh = np.asarray(factors.part_weights(parts, layout)[0], np.float64)
        add(peer.NAME, None, per_fc_errors(ws, stats, layout.transposed, eye, wh), time.perf_counter() - t0,
            factors.kept(parts) / layout.dense_weights)
    for s in [float(x) for x in args.sparsity.split(",")]:
        for steps in [int(x) for x in args.whiten_steps.split(",")]:
            cfg = config_base.load_config(args.config, {"fips.sparsity": s, "fips.whiten_steps": steps,
                                                        "fips.init": "whitened", "fips.prune": "obs",
                                                        "local.algorithm": "static"})
            rank = pipeline.plan_groups(cfg, arch, params)[args.group][1]
            prob = methods.Problem(layout, rank, cfg["fips"]["budget"], params, arch.mlp_spec, cfg, stats)
            t0 = time.perf_counter()
            p0 = fips.whitened_init(prob)
            u = np.asarray(p0["u"], np.float64)
            dense_v = per_fc_errors(ws, stats, layout.transposed, u, np.asarray(p0["v"], np.float64))
            p1 = fips.obs_pruned(prob, p0) if s > 0 else p0
            errs = per_fc_errors(ws, stats, layout.transposed, u, np.asarray(p1["v"], np.float64))
            add(f"fips s={s:g} whiten_steps={steps} (dense V: " + ", ".join(f"{e:.5f}" for e in dense_v) + ")",
                rank, errs, time.perf_counter() - t0, factors.kept([(layout, p1)]) / layout.dense_weights)
    print(f"\n{args.config} group {args.group} (blocks {layout.blocks[0]}-{layout.blocks[-1]}): activation-weighted "
          f"relative error per FC, budget {base['fips']['budget']:.0%} of MLP weights")
    print("| setting | rank | " + " | ".join(layout.fc_names) + " | kept | s |")
    print("|---|---:|" + "---:|" * layout.n_fcs + "---:|---:|")
    for r in rows:
        print(f"| {r['setting']} | {r['rank'] or ''} | " + " | ".join(f"{e:.5f}" for e in r["errors"].values())
              + f" | {100 * r['kept_fraction']:.2f}% | {r['seconds']:.0f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"config": args.config, "group": args.group, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
