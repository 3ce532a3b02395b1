"""FiPS on the real DINOv2-S/14 at several budgets: Fashion-MNIST linear probe and CLS cosine of
dense, per-layer SVD and FiPS.

    python benchmarks/dinov2_probe.py --workdir=/tmp/dinov2_probe \\
        [--config=configs/dinov2_small.py[:cpu]] [--budgets=0.25,0.4,0.5]

For each budget: `pipeline.run` compresses the model (calibration and local optimisation as the
config says) into `<workdir>/budget_<b>/`; the FiPS model is reloaded from its exported
`compressed/` folder (`export.load`), the per-layer SVD baseline is rebuilt at the same budget.
One `features.probe_report` then scores every model against the dense one (dense features are
computed once). Prints a markdown table and wall times; writes `<workdir>/probe.json`.
Rerunning with the same workdir reuses finished pipeline stages.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fips_jax import config_base, export, factors, pipeline  # noqa: E402
from fips_jax.data import images as image_data  # noqa: E402
from fips_jax.methods import per_layer_svd  # noqa: E402
from fips_jax.evaluators import features  # noqa: E402
from fips_jax.models import registry  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--config", default="configs/dinov2_small.py")
    ap.add_argument("--budgets", default="0.25,0.4,0.5")
    args = ap.parse_args()
    t_start = time.perf_counter()
    cfg = config_base.load_config(args.config)
    probe_cfg = dict(cfg["eval"]["probe"])
    cfg["eval"]["probe"]["source"] = ""  # the probe runs below, once for every budget's models
    budgets = [float(b) for b in args.budgets.split(",")]
    timings, runs = {}, {}

    arch, dense, _ = registry.load_model(cfg["model"], seed=cfg["seed"])
    print(f"{arch.name}: {arch.config}\ndevice: {jax.devices()[0]}", flush=True)
    models = {"dense": dense}
    for b in budgets:
        run_cfg = json.loads(json.dumps(cfg))  # deep copy
        run_cfg["fips"]["budget"] = b
        workdir = os.path.join(args.workdir, f"budget_{b:.2f}")
        t0 = time.perf_counter()
        metrics = pipeline.run(run_cfg, workdir, log=lambda msg: print(f"  {msg}", flush=True))
        timings[f"pipeline {b:.2f}"] = time.perf_counter() - t0
        _, fips_params, _ = export.load(os.path.join(workdir, "compressed"))
        plan = pipeline.plan_groups(run_cfg, arch, dense)
        models[f"per_layer_svd@{b:.2f}"] = factors.assemble(dense, per_layer_svd.compress(dense, arch.mlp_spec, plan, b))
        models[f"fips@{b:.2f}"] = fips_params
        runs[b] = metrics

    t0 = time.perf_counter()
    train = image_data.fashion_mnist("train", n=probe_cfg["n_train"], path=probe_cfg["path"] or None)
    test = image_data.fashion_mnist("test", n=probe_cfg["n_test"], path=probe_cfg["path"] or None)
    apply = jax.jit(arch.apply)  # one compilation for every param tree

    def feature_fn(params):
        return lambda raw: apply(params, jnp.asarray(image_data.grayscale_to_model_inputs(raw, arch.config.image_size)))

    report = features.probe_report({k: feature_fn(p) for k, p in models.items()}, train, test,
                                   batch_size=cfg["eval"]["batch_size"], l2=probe_cfg["l2"])
    timings["probe"] = time.perf_counter() - t0

    lines = ["| model | budget | kept of MLP weights | probe top-1 % | of dense % | dense probe top-1 % "
             "| CLS cosine to dense | held-out block rel. error |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in report.items():
        kind, _, b = name.partition("@")
        cells = ["—", "100.0%", "—"]
        if b:
            m = runs[float(b)]
            key = "fips" if kind == "fips" else "per_layer_svd"
            err = m["per_block"]["heldout_rel_error_" + ("fips_final" if kind == "fips" else "per_layer_svd")]
            cells = [b, f"{100 * m['budget'][key]['fraction_of_mlp_weights']:.1f}%", f"{np.mean(err):.4f}"]
        lines.append(f"| {kind} | {cells[0]} | {cells[1]} | {100 * r['probe_accuracy']:.2f} "
                     f"| {100 * r['accuracy_vs_reference']:.1f} | {100 * r['reference_probe_accuracy']:.2f} "
                     f"| {r['cls_cosine']:.4f} | {cells[2]} |")
    timings["total"] = time.perf_counter() - t_start
    print(f"\nFashion-MNIST linear probe: {probe_cfg['n_train']} train / {probe_cfg['n_test']} test images, "
          f"input {arch.config.image_size[0]}px, config {args.config}\n")
    print("\n".join(lines))
    print("\nwall time: " + ", ".join(f"{k} {v:.0f}s" for k, v in timings.items()))
    with open(os.path.join(args.workdir, "probe.json"), "w", encoding="utf-8") as f:
        json.dump({"config": args.config, "probe": report, "timings_s": timings, "device": str(jax.devices()[0]),
                   "groups": {b: m["groups"] for b, m in runs.items()}}, f, indent=1)


if __name__ == "__main__":
    main()
