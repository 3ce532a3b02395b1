"""How far the compressed model's residual stream drifts from the dense one after group 0.

    python benchmarks/student_drift.py --workdir=workdir/smollm2 [--blocks=6,7]

Reads a finished run's group-0 factors (`<workdir>/groups/g00/final.npz`) and its config, runs the
calibration windows through the dense model and through the model with group 0 compressed, and
prints, for each of `--blocks` (which must lie after group 0): the mean norm of the drift (teacher's
block output minus the student's, this block dense) next to the mean norm of the dense MLP's output
and of the residual, and how concentrated the squared drift is on a few tokens. This is the size of
the correction `local.inputs=student` with `local.drift=1` asks a group's MLPs to make.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fips_jax import calibration, data, factors, grouping, local_opt, stages  # noqa: E402
from fips_jax.models import registry  # noqa: E402
from fips_jax.tasks import causal_lm  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", required=True, help="a finished causal-LM run")
    ap.add_argument("--blocks", default="", help="comma-separated block indices after group 0 (default: the next two)")
    args = ap.parse_args()
    cfg = json.load(open(os.path.join(args.workdir, "config.json")))  # the run's config, as saved
    arch, params, tokenizer = registry.load_model(cfg["model"])
    src = cfg["data"]["calib"]
    calib = data.token_windows(causal_lm.tokens(src, tokenizer, src["window"] * src["n_windows"]), src["window"],
                               src["n_windows"])
    manifest = json.load(open(os.path.join(args.workdir, "compressed", "manifest.json")))
    g0 = tuple(manifest["groups"][0]["blocks"])
    blocks = [int(b) for b in args.blocks.split(",")] if args.blocks else [g0[-1] + 1, g0[-1] + 2]
    if min(blocks) <= g0[-1]:
        raise SystemExit(f"--blocks {blocks} must come after group 0 {g0}")
    layout0 = grouping.group_layout(params, arch.mlp_spec, arch.mlp_path, g0, group=0)
    student = factors.assemble(params, [(layout0, stages.load_arrays(os.path.join(args.workdir, "groups", "g00",
                                                                                     "final.npz")))])
    upto = range(max(blocks) + 1)
    _, out_t = calibration.HiddenStream(arch, params, calib, cfg["chunk"]).advance(upto, with_outputs=True)
    x_s, out_s = calibration.HiddenStream(arch, student, calib, cfg["chunk"]).advance(upto, with_outputs=True)
    for b in blocks:
        mlp = local_opt.stack_dense_mlps(params, grouping.group_layout(params, arch.mlp_spec, arch.mlp_path, (b,)))
        y = np.asarray(local_opt.mlp_targets(arch.mlp_spec, mlp, x_s[b:b + 1]))[0]
        drift = np.linalg.norm(out_t[b] - out_s[b], axis=1)
        sq = np.sort(drift ** 2)[::-1]
        print(f"block {b}: mean |drift| {drift.mean():.3f}, mean |dense MLP output| {np.linalg.norm(y, axis=1).mean():.3f}, "
              f"mean |residual| {np.linalg.norm(out_t[b], axis=1).mean():.3f}; share of the squared drift in the top "
              f"1% of tokens {sq[:max(len(sq) // 100, 1)].sum() / sq.sum():.3f}")


if __name__ == "__main__":
    main()
