"""What each quality lever buys on one group of the default run, in held-out error and seconds.

    python benchmarks/quality_levers.py --group=0 --json=/tmp/levers.json \
        --lever=paper: --lever=whitened:fips.init=whitened \
        --lever=whitened+obs:fips.init=whitened,fips.prune=obs,local.algorithm=static

Each `--lever=name:key=value,...` is a set of config overrides on `configs/smollm2.py` (or
`--config`). The script streams the calibration and held-out tokens to the group once, then per
lever: FiPS's init (+ OBS pruning), one-shot pruning, the local optimisation, and the held-out
relative error of the block MLP outputs after each, plus the closed-form peers' errors on the
same group. One group costs a fraction of the full run, so levers can be compared quickly; the
perplexity of a chosen setting then comes from the full run.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fips_jax import calibration, config_base, factors, methods, pipeline, stages  # noqa: E402
from fips_jax.methods import fips  # noqa: E402
from fips_jax.models import registry  # noqa: E402
from fips_jax.tasks import causal_lm  # noqa: E402


def _parse_value(text: str):
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(text.lower(), text)


def _lever(spec: str) -> tuple[str, dict]:
    name, _, body = spec.partition(":")
    overrides = {}
    for item in filter(None, body.split(",")):
        key, _, value = item.partition("=")
        overrides[key] = _parse_value(value)
    return name, overrides


def _apply(cfg: dict, overrides: dict) -> dict:
    cfg = copy.deepcopy(cfg)
    for key, value in overrides.items():
        *parents, leaf = key.split(".")
        node = cfg
        for part in parents:
            node = node[part]
        if leaf not in node:
            raise KeyError(f"unknown config key {key!r}")
        node[leaf] = value
    return cfg


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/smollm2.py")
    ap.add_argument("--group", type=int, default=0)
    ap.add_argument("--lever", action="append", default=[], help="name:key=value,... (repeatable)")
    ap.add_argument("--peers", default="per_layer_svd,svd_llm,basis_sharing")
    ap.add_argument("--json", default="", help="also write the results here")
    args = ap.parse_args()
    base_cfg = config_base.load_config(args.config)
    levers = [_lever(s) for s in args.lever] or [("paper", {})]
    workdir = tempfile.mkdtemp(prefix="levers-")
    run = stages.Run(base_cfg, workdir, log=lambda s: None)
    arch, params, tokenizer = registry.load_model(base_cfg["model"], seed=base_cfg["seed"])
    dat = causal_lm.load_data(run, arch, tokenizer)
    plan = pipeline.plan_groups(base_cfg, arch, params)
    calib = calibration.HiddenStream(arch, params, dat.calib, base_cfg["chunk"])
    hold = calibration.HiddenStream(arch, params, dat.holdout, base_cfg["chunk"])
    for layout, _ in plan[:args.group]:
        calib.advance(layout.blocks)
        hold.advance(layout.blocks)
    layout = plan[args.group][0]
    x, xh = calib.advance(layout.blocks), hold.advance(layout.blocks)
    rows = []
    grp0 = None
    for name, overrides in levers:
        cfg = _apply(base_cfg, overrides)
        rank = pipeline.plan_groups(cfg, arch, params)[args.group][1]
        run = stages.Run(cfg, os.path.join(workdir, name), log=lambda s: None)
        t0 = time.perf_counter()
        grp = causal_lm._Group(run, arch, params, layout, rank, args.group, x, xh, (True, True))  # pylint: disable=protected-access
        grp0 = grp0 or grp
        t_stats = time.perf_counter() - t0
        p0 = fips.init(grp.problem)[0][1]
        t_init = time.perf_counter() - t0 - t_stats
        shot = fips.one_shot(p0, cfg)
        # Measured before the training, which consumes p0 (its device buffers are donated).
        err_init = float(np.mean(grp.heldout([(layout, p0)])))
        err_shot = float(np.mean(grp.heldout([(layout, shot)])))
        fips_loss, _ = causal_lm._loss_fns(run, arch.mlp_spec)  # pylint: disable=protected-access
        p1, losses = causal_lm._train_fips(run, grp, p0, fips_loss)  # pylint: disable=protected-access
        t_total = time.perf_counter() - t0
        v = np.asarray(p1["v"])
        d = layout.d
        row = {"lever": name, "overrides": overrides, "rank": rank, "steps": grp.steps,
               "heldout_init": err_init, "heldout_one_shot": err_shot,
               "heldout_final": float(np.mean(grp.heldout([(layout, p1)]))),
               "kept_fraction": factors.kept([(layout, p1)]) / layout.dense_weights,
               "zero_rows_above_d": int(np.sum(~np.any(v[:, :, d:, :] != 0, axis=(0, 1, 3)))) if rank > d else 0,
               "loss_first": losses[0], "loss_last": losses[-1],
               "seconds": {"stats": round(t_stats, 1), "init": round(t_init, 1), "total": round(t_total, 1)}}
        rows.append(row)
        print(json.dumps(row), flush=True)
    peers = {}
    for peer in methods.parse(args.peers):
        t0 = time.perf_counter()
        parts = peer.init(grp0.problem)
        peers[peer.NAME] = {"heldout": float(np.mean(grp0.heldout(parts))),
                            "kept_fraction": factors.kept(parts) / layout.dense_weights,
                            "seconds": round(time.perf_counter() - t0, 1)}
        print(json.dumps({"peer": peer.NAME, **peers[peer.NAME]}), flush=True)
    print(f"\ngroup {args.group} (blocks {layout.blocks[0]}-{layout.blocks[-1]}), held-out relative error of the "
          f"MLP outputs, budget {base_cfg['fips']['budget']:.0%}")
    print("| lever | rank | init | one-shot | final | kept | rows above d empty | s |\n|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['lever']} | {r['rank']} | {r['heldout_init']:.4f} | {r['heldout_one_shot']:.4f} | "
              f"{r['heldout_final']:.4f} | {100 * r['kept_fraction']:.2f}% | {r['zero_rows_above_d']} | "
              f"{r['seconds']['total']:.0f} |")
    for k, p in peers.items():
        print(f"| {k} (closed form) | | {p['heldout']:.4f} | | | {100 * p['kept_fraction']:.2f}% | | {p['seconds']:.0f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"group": args.group, "levers": rows, "peers": peers}, f, indent=1)
    shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
