"""Perplexity against kept parameters for dense, the peers and FiPS variants, over budgets.

    python benchmarks/quality_sweep.py --out=/tmp/sweep --budgets=0.3,0.4,0.5,0.6,0.7 \
        --variant=fips_paper:fips.init=svd,fips.sparsity=0.75,local.algorithm=gmp \
        --variant=fips_aware:

Every (budget, variant) is one full pipeline run of `--config` (default: the README's offline
SmolLM2 run) in `<out>/b<budget>_<variant>`; the peers (`--peers`) run beside the first variant
only, since they do not depend on FiPS's settings. Runs resume like the CLI, so an interrupted
sweep continues where it stopped. Writes `<out>/sweep.json` (one row per model and budget:
perplexity, kept fraction of the MLP weights and of the model), `<out>/sweep.md` (a table) and
`<out>/sweep.png` (perplexity vs kept parameters, log scale).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fips_jax import config_base, pipeline  # noqa: E402

try:
    from benchmarks.quality_levers import _lever  # noqa: E402
except ImportError:  # run as a script from benchmarks/
    from quality_levers import _lever  # type: ignore  # noqa: E402


def _rows(metrics: dict, budget: float, variant: str, first: bool) -> list[dict]:
    rows = []
    for key, ev in metrics["evals"].items():
        if key == "dense" and not first:
            continue
        if not key.startswith("fips") and key != "dense" and not first:
            continue
        if key.startswith("fips") and key not in ("fips_final", "fips_finetuned"):
            continue
        b = None if key == "dense" else metrics["budget"].get(key, metrics["budget"]["fips"])
        name = variant if key.startswith("fips") else key
        rows.append({"budget": budget, "model": name, "ppl": ev["ppl"],
                     "kept_of_mlp": 1.0 if b is None else b["fraction_of_mlp_weights"],
                     "kept_of_model": 1.0 if b is None else b["fraction_of_model_params"]})
    return rows


def _plot(path: str, rows: list[dict]) -> None:
    import matplotlib  # pylint: disable=import-outside-toplevel
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for name in sorted({r["model"] for r in rows}):
        pts = sorted((r["kept_of_mlp"], r["ppl"]) for r in rows if r["model"] == name)
        ax.plot([p[0] * 100 for p in pts], [p[1] for p in pts], marker="o", label=name)
    ax.set(xlabel="kept MLP weights (%)", ylabel="perplexity", yscale="log", title="Perplexity vs kept parameters")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/smollm2.py")
    ap.add_argument("--out", required=True)
    ap.add_argument("--budgets", default="0.3,0.4,0.5,0.6,0.7")
    ap.add_argument("--variant", action="append", default=[], help="name:key=value,... FiPS settings (repeatable)")
    ap.add_argument("--peers", default="per_layer_svd,svd_llm,basis_sharing")
    ap.add_argument("--set", default="", help="key=value,... applied to every run (e.g. quicker evaluation)")
    args = ap.parse_args()
    variants = [_lever(v) for v in args.variant] or [("fips", {})]
    common = _lever(f"common:{args.set}")[1]
    rows = []
    for budget in [float(b) for b in args.budgets.split(",")]:
        for i, (name, overrides) in enumerate(variants):
            cfg = config_base.load_config(args.config, {**common, **overrides, "fips.budget": budget,
                                                        "compare.methods": args.peers if i == 0 else ""})
            workdir = os.path.join(args.out, f"b{budget:.2f}_{name}")
            print(f"== budget {budget:.0%}, {name}: {workdir}", flush=True)
            metrics = pipeline.run(cfg, workdir, log=lambda s: None)
            new = _rows(metrics, budget, name, first=i == 0)
            rows += new
            for r in new:
                print(json.dumps(r), flush=True)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "sweep.json"), "w") as f:
        json.dump(rows, f, indent=1)
    budgets = sorted({r["budget"] for r in rows})
    names = list(dict.fromkeys(r["model"] for r in rows))
    table = ["| model | " + " | ".join(f"{b:.0%}" for b in budgets) + " |", "|---|" + "---:|" * len(budgets)]
    for name in names:
        cells = []
        for b in budgets:
            hit = [r for r in rows if r["model"] == name and r["budget"] == b]
            cells.append(f"{hit[0]['ppl']:.4g} ({100 * hit[0]['kept_of_mlp']:.1f}%)" if hit else "")
        table.append(f"| {name} | " + " | ".join(cells) + " |")
    text = "perplexity (kept % of MLP weights) by budget\n\n" + "\n".join(table) + "\n"
    with open(os.path.join(args.out, "sweep.md"), "w") as f:
        f.write(text)
    _plot(os.path.join(args.out, "sweep.png"), rows)
    print(text)


if __name__ == "__main__":
    main()
