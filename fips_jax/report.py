"""Human-readable outputs of a run: a table, report.md, and per-block plots (the paper's
Figures 3 and 5: realised sparsity and reconstruction error per block)."""

from __future__ import annotations

import os

import numpy as np

from fips_jax import checkpointing

ROWS = (("dense", "dense"), ("per_layer_svd", "per-layer SVD"), ("fips_init", "FiPS after init"),
        ("fips_final", "FiPS final"), ("fips_finetuned", "FiPS + global fine-tuning"))


def _metric_cell(metrics: dict, ev: dict) -> str:
    if metrics["task"] == "causal_lm":
        return f"{ev['ppl']:.3f}"
    if "top1" in ev:
        return f"{100 * ev['top1']:.2f}"
    return f"{100 * ev.get('agreement_with_dense', 1.0):.2f}"


def eval_scope_label(scope: dict, context: int) -> str:
    """What a perplexity was computed on: the whole split, or "16 x 512 tokens of 219 windows"."""
    scored, total = scope["windows_scored"], scope["windows_in_split"]
    if scored >= total:
        return f"the whole split ({total} x {context} tokens)"
    return f"{scored} x {context} tokens of {total} windows"


def labels(metrics: dict) -> dict[str, str]:
    """{variant: row name} in report order: the run's own (`metrics["labels"]`), else the defaults."""
    return metrics.get("labels") or dict(ROWS)


def table(metrics: dict) -> str:
    """Markdown table: the evaluation metric and the kept parameters three ways per variant."""
    if metrics["task"] == "causal_lm":
        head = f"perplexity ({metrics['protocol']}, context {metrics['evals']['dense']['context']}"
        scope = metrics.get("data", {}).get("eval")
        if scope and metrics["protocol"] == "standard":
            head += f"; {eval_scope_label(scope, metrics['evals']['dense']['context'])}"
        head += ")"
    else:
        head = "top-1 %" if metrics["metric"] == "top1" else "top-1 agreement with dense %"
    lines = [f"| model | {head} | held-out rel. error | kept of MLP | kept of linear | kept of model |",
             "|---|---:|---:|---:|---:|---:|"]
    budgets = metrics["budget"]
    per_block = metrics["per_block"]
    for key, name in labels(metrics).items():
        if key not in metrics["evals"]:
            continue
        ev = metrics["evals"][key]
        err = per_block.get(f"heldout_rel_error_{key}")
        # Dense is the reference (0); a variant without per-block errors (global fine-tuning is
        # not measured block by block) says so rather than showing 0.
        err_s = f"{np.mean(err):.4f}" if err else ("0" if key == "dense" else "n/a")
        if key == "dense":
            kept = ("100.0%",) * 3
        else:
            b = budgets.get(key, budgets["fips"])
            kept = tuple(f"{100 * b[k]:.1f}%" for k in
                         ("fraction_of_mlp_weights", "fraction_of_linear_weights", "fraction_of_model_params"))
        lines.append(f"| {name} | {_metric_cell(metrics, ev)} | {err_s} | " + " | ".join(kept) + " |")
    return "\n".join(lines)


def plot(path: str, metrics: dict) -> None:
    import matplotlib  # pylint: disable=import-outside-toplevel
    matplotlib.use("Agg")
    import matplotlib.ticker  # pylint: disable=import-outside-toplevel
    import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

    pb = metrics["per_block"]
    blocks = pb["block"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3.6))
    ax1.bar(blocks, [100 * s for s in pb["sparsity"]], color="tab:blue")
    ax1.set(xlabel="block", ylabel="sparsity of V (%)", title="Realised sparsity per block", ylim=(0, 100))
    for key, name in list(labels(metrics).items())[1:]:
        vals = pb.get(f"heldout_rel_error_{key}")
        if vals:
            ax2.plot(blocks, vals, marker="o", ms=3, label=name)
    ax2.set(xlabel="block", ylabel="relative MSE (held-out)", title="Reconstruction error per block", yscale="log")
    ax2.legend()
    for ax in (ax1, ax2):
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _probe_section(metrics: dict) -> str:
    if "probe" not in metrics:
        return ""
    from fips_jax.evaluators import features  # pylint: disable=import-outside-toplevel

    probe = next(iter(metrics["probe"].values()))
    return (f"## Linear probe ({metrics['config']['eval']['probe']['source']}, {probe['n_train']} train / "
            f"{probe['n_test']} test images)\n\n{features.report_table(metrics['probe'])}\n\n")


def _export_section(metrics: dict) -> str:
    sizes = metrics.get("export", {}).get("sizes")
    if not sizes:
        return ""
    mib = lambda b: f"{b / 2**20:.2f} MiB"
    return (f"## Export\n\n- Orbax: `{metrics['export']['orbax']}`\n- sparse safetensors: "
            f"`{metrics['export']['safetensors']}`, {mib(sizes['file_bytes'])} on disk; its MLP part (U, V's "
            f"nonzeros and indices) {mib(sizes['mlp_bytes'])} = {100 * sizes['mlp_fraction']:.1f}% of the dense "
            f"MLP weights' {mib(sizes['dense_mlp_bytes'])}\n\n")


def write(workdir: str, metrics: dict) -> None:
    plot(os.path.join(workdir, "per_block.png"), metrics)
    groups = "\n".join(f"- blocks {g['blocks']}: rank {g['rank']} (d {g['d']}, p {g['p']})" for g in metrics["groups"])
    timings = "\n".join(f"- {k}: {v:.1f}s" for k, v in metrics["timings_s"].items())
    text = (f"# FiPS compression of {metrics['model']}\n\n{table(metrics)}\n\n"
            f"Budget {metrics['config']['fips']['budget']:.0%} of MLP weights at "
            f"{metrics['config']['fips']['sparsity']:.0%} sparsity of V "
            f"({metrics['config']['local']['algorithm']}).\n\n## Groups\n{groups}\n\n"
            f"{_probe_section(metrics)}{_export_section(metrics)}"
            f"## Timings (this process)\n{timings}\n\n![per block](per_block.png)\n")
    checkpointing.atomic_write_bytes(os.path.join(workdir, "report.md"), text.encode())
