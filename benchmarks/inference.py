"""Inference latency and memory of dense MLPs vs every FiPS forward (MLP stacks only).

    python -m benchmarks.inference --out=/tmp/bench                       # CPU default (~5 min)
    python -m benchmarks.inference --out=/tmp/bench --batches=1,2,4,8,16,32,64   # GPU default

Two stacks of MLPs with random weights of the real shapes (attention, norms and embeddings are
left out: this measures the part FiPS changes), each block `x <- x + mlp(x)`:

  deit_b   DeiT-B: 12 blocks, d 768, p 3072, GELU with biases, groups of 4; 197 tokens/image.
  smollm2  SmolLM2-135M: 30 blocks, d 576, p 1536, gated SiLU, groups of 6; --llm_tokens tokens per
           sequence (default 1: one decoding step, where weight bytes dominate).

FiPS at budgets 10/25/40/50% of the MLP weights, V 75% sparse, rank from `budget.rank_for_budget`
rounded down to --round_to (64, the N:M kernel granularity). Modes (`fips_mlp`):

  dense          the original MLPs
  materialize    W = U V_t formed in every call (calibration's forward; batch-independent cost,
                 so on CPU only the smallest batch is timed)
  factored       (x U) V_t and (x V_t^T) U^T with V dense-with-zeros
  sparse         V packed as ELLPACK along r (random uniform 75% mask), densified inside the call
  sparse_nm      V with a 1:4 mask along r (also 75%), packed as values + uint8 tile positions
  sparse_gather  packed V, never densified; only for at most --gather_max_tokens (8) tokens

Memory: on GPU `peak_bytes_in_use` of the device, each (model, budget, mode) in its own process
with batches ascending (the counter cannot be reset, and the peak grows with the batch); on CPU
there is no allocator peak, so "held" reports the bytes of parameters each mode keeps between
calls. XLA's own estimate (`compiled.memory_analysis()`: arguments + outputs + temporaries) is
reported on every device. A markdown table, inference.json and inference.png go to --out.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import subprocess
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fips_jax import budget, export_sparse
from fips_jax.models import base
from fips_jax.models import fips_mlp as fm

GATED_SILU = base.MlpSpec(("gate", "up", "down"), (False, False, True), "silu", gated=True, has_bias=False)
MODES = ("dense", "materialize", "factored", "sparse", "sparse_nm", "sparse_gather")
SPARSITY = 0.75


@dataclasses.dataclass(frozen=True)
class Stack:
    name: str
    d: int
    p: int
    blocks: int
    group: int
    spec: base.MlpSpec
    tokens: int  # per example

    def rank(self, b: float, round_to: int) -> int:
        return budget.rank_for_budget(self.d, self.p, self.group, len(self.spec.fc_names), b, SPARSITY,
                                      round_to=round_to or None, group=self.name)


def stacks(llm_tokens: int) -> dict[str, Stack]:
    return {
        "deit_b": Stack("deit_b", 768, 3072, 12, 4, base.VIT_MLP, 197),
        "smollm2": Stack("smollm2", 576, 1536, 30, 6, GATED_SILU, llm_tokens),
    }


def _normal(rng: np.random.Generator, shape, std) -> np.ndarray:
    return rng.standard_normal(shape, dtype=np.float32) * np.float32(std)


def _biases(s: Stack, rng: np.random.Generator, n: int) -> dict | None:
    if not s.spec.has_bias:
        return None
    return {name: _normal(rng, (n, s.d if tr else s.p), 0.02) for name, tr in zip(s.spec.fc_names, s.spec.transposed)}


def dense_stack(s: Stack) -> tuple[Any, Any]:
    """(fn(weights, x), weights): the original MLPs, W ~ N(0, 1/d)."""
    rng = np.random.default_rng(0)
    bias = _biases(s, rng, s.blocks)
    weights = []
    for i in range(s.blocks):
        mlp = {}
        for name, tr in zip(s.spec.fc_names, s.spec.transposed):
            w = _normal(rng, (s.d, s.p), s.d ** -0.5)
            mlp[name] = {"kernel": jnp.asarray(w.T if tr else w)}
            if bias is not None:
                mlp[name]["bias"] = jnp.asarray(bias[name][i])
        weights.append(mlp)

    def fn(weights, x):
        for mlp in weights:
            x = x + base.mlp_apply(s.spec, mlp, x)
        return x

    return fn, weights


@functools.lru_cache(maxsize=2)  # the uniform and the 1:4 groups of the budget being measured
def fips_groups(s: Stack, rank: int, nm: bool) -> list[dict]:
    """Random trained-looking groups {"u": [d, r], "v": [n, F, r, p] 75% zeros, "bias"?} (numpy),
    scaled so that U V_t has the dense init's scale. nm: a 1:4 mask along r, else uniform."""
    f = len(s.spec.fc_names)
    rng = np.random.default_rng(1)
    std = (rank * (1 - SPARSITY) * s.d) ** -0.25
    groups = []
    for _ in range(s.blocks // s.group):
        v = _normal(rng, (s.group, f, rank, s.p), std)
        if nm:
            keep = rng.integers(0, 4, (s.group, f, rank // 4, 1, s.p), dtype=np.uint8)
            mask = (keep == np.arange(4, dtype=np.uint8)[:, None]).reshape(v.shape)
        else:
            mask = rng.random(v.shape, dtype=np.float32) >= SPARSITY
        v *= mask
        group = {"u": _normal(rng, (s.d, rank), std), "v": v}
        bias = _biases(s, rng, s.group)
        if bias is not None:
            group["bias"] = bias
        groups.append(group)
    return groups


def fips_stack(s: Stack, groups: list[dict], mode: str) -> tuple[Any, Any]:
    """(fn(weights, x), weights) running every block's FipsMlp in `mode` (a benchmark mode name)."""
    fips_mode = "sparse" if mode.startswith("sparse") else mode
    kernel = "gather" if mode == "sparse_gather" else "densify"
    nm = (1, 4) if mode == "sparse_nm" else None
    modules, weights = [], []
    for group in groups:
        blocks = []
        for b in range(s.group):
            module, variables = fm.from_group(s.spec, group, b, fips_mode, nm=nm, sparse_kernel=kernel)
            modules.append(module)
            blocks.append(variables)
        weights.append({"u": jnp.asarray(group["u"]), "blocks": blocks})

    def fn(weights, x):
        i = 0
        for group in weights:
            for variables in group["blocks"]:
                x = x + modules[i].apply(variables, x, group["u"])
                i += 1
        return x

    return fn, weights


def nbytes(tree: Any) -> int:
    return int(sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(tree)))


def measure(fn, weights, x, reps: int) -> dict:
    """Median wall time of the jitted fn over `reps` calls after a compile-and-warm-up call."""
    jitted = jax.jit(fn)
    t0 = time.perf_counter()
    compiled = jitted.lower(weights, x).compile()
    compile_s = time.perf_counter() - t0
    compiled(weights, x).block_until_ready()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        compiled(weights, x).block_until_ready()
        times.append(time.perf_counter() - t0)
    out = {"ms": 1e3 * float(np.median(times)), "compile_s": compile_s}
    ma = compiled.memory_analysis()
    if ma is not None:
        out["xla_bytes"] = int(ma.argument_size_in_bytes + ma.output_size_in_bytes + ma.temp_size_in_bytes)
        out["xla_temp_bytes"] = int(ma.temp_size_in_bytes)
    stats = jax.devices()[0].memory_stats() or {}
    if jax.default_backend() == "gpu" and "peak_bytes_in_use" in stats:
        out["peak_bytes"] = int(stats["peak_bytes_in_use"])
    return out


def run_job(job: dict) -> list[dict]:
    """Every batch of one (model, budget, mode), batches ascending. budget None: dense."""
    s = stacks(job["llm_tokens"])[job["model"]]
    mode, b = job["mode"], job["budget"]
    rank = None if b is None else s.rank(b, job["round_to"])
    if mode == "dense":
        fn, weights = dense_stack(s)
    else:
        fn, weights = fips_stack(s, fips_groups(s, rank, nm=mode == "sparse_nm"), mode)
    rows = []
    for i, batch in enumerate(job["batches"]):
        tokens = batch * s.tokens
        if mode == "sparse_gather" and tokens > job["gather_max_tokens"]:
            continue
        if mode == "materialize" and i and not job["all_materialize"]:
            continue
        x = jax.random.normal(jax.random.PRNGKey(1), (batch, s.tokens, s.d), jnp.float32)
        r = measure(fn, weights, x, job["reps"])
        rows.append({"model": s.name, "budget": b, "rank": rank, "mode": mode, "batch": batch, "tokens": tokens,
                     "held_bytes": nbytes(weights), **r})
    return rows


def run_isolated(job: dict) -> list[dict]:
    """run_job in a fresh process, so the device's peak-memory counter belongs to this job."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-m", "benchmarks.inference", "--worker", json.dumps(job)],
                          cwd=root, capture_output=True, text=True, check=False)
    if proc.returncode:
        raise RuntimeError(f"worker {job} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def disk_fractions(s: Stack, b: float, round_to: int) -> dict:
    """On-disk MLP bytes (export_sparse format, float32) / dense MLP bytes, for both masks."""
    rank = s.rank(b, round_to)
    out = {}
    for name, nm in (("uniform", False), ("1:4", True)):
        g = fips_groups(s, rank, nm)[0]  # every group has the same shape
        parts = export_sparse.encode_v(g["v"])
        per_group = g["u"].nbytes + sum(a.nbytes for a in parts.values())
        out[name] = per_group / (4 * s.group * len(s.spec.fc_names) * s.d * s.p)
    return out


def table(rows: list[dict]) -> str:
    mib = lambda b: "" if b is None else f"{b / 2**20:,.1f}"
    dense = {(r["model"], r["batch"]): r["ms"] for r in rows if r["mode"] == "dense"}
    lines = ["| model | budget | rank | mode | batch | tokens | ms | x dense | held MiB | XLA MiB | peak MiB |",
             "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        budget_s = "" if r["budget"] is None else f"{r['budget']:.0%}"
        speed = dense.get((r["model"], r["batch"]))
        speed_s = "" if speed is None else f"{speed / r['ms']:.2f}"
        lines.append(
            f"| {r['model']} | {budget_s} | {r['rank'] or ''} | {r['mode']} | {r['batch']} | {r['tokens']} "
            f"| {r['ms']:.2f} | {speed_s} | {mib(r['held_bytes'])} | {mib(r.get('xla_bytes'))} "
            f"| {mib(r.get('peak_bytes'))} |")
    return "\n".join(lines)


def plot(rows: list[dict], budgets: list[float], path: str) -> None:
    import matplotlib  # pylint: disable=import-outside-toplevel
    import matplotlib.ticker  # pylint: disable=import-outside-toplevel

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

    models = sorted({r["model"] for r in rows})
    color = {mode: f"C{i}" for i, mode in enumerate(MODES)}  # one colour per mode in every panel
    fig, axes = plt.subplots(len(models), len(budgets), figsize=(4 * len(budgets), 3.3 * len(models)), squeeze=False)
    for i, model in enumerate(models):
        batches = sorted({r["batch"] for r in rows if r["model"] == model})
        for j, b in enumerate(budgets):
            ax = axes[i][j]
            for mode in MODES:
                pts = sorted((r["batch"], r["ms"]) for r in rows if r["model"] == model and r["mode"] == mode
                             and (r["budget"] == b or mode == "dense"))
                if pts:
                    ax.plot(*zip(*pts), marker="o", label=mode, color=color[mode],
                            linestyle="--" if mode == "dense" else "-")
            ax.set(xscale="log", yscale="log", title=f"{model}, budget {b:.0%}", xlabel="batch", ylabel="ms")
            ax.set_xticks(batches, [str(x) for x in batches])
            ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
            ax.grid(alpha=0.3)
    handles = {h.get_label(): h for ax in axes.ravel() for h in ax.get_lines()}
    fig.legend([handles[m] for m in MODES if m in handles], [m for m in MODES if m in handles],
               loc="lower center", ncol=len(handles), fontsize=8)
    fig.subplots_adjust(bottom=0.15)
    fig.suptitle(f"MLP-stack latency on {jax.devices()[0].device_kind}", fontsize=10)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="/tmp/fips_inference")
    ap.add_argument("--models", default="deit_b,smollm2")
    ap.add_argument("--budgets", default="0.1,0.25,0.4,0.5")
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--batches", default=None, help="default: 1,2,4,8,16,32,64 on GPU; 1,8 on CPU")
    ap.add_argument("--llm_tokens", type=int, default=1, help="tokens per sequence for smollm2 (1 = decoding)")
    ap.add_argument("--round_to", type=int, default=64)
    ap.add_argument("--reps", type=int, default=None, help="default: 20 on GPU, 3 on CPU")
    ap.add_argument("--gather_max_tokens", type=int, default=8)
    ap.add_argument("--all_materialize", action="store_true", help="time materialize at every batch")
    ap.add_argument("--isolate", choices=("auto", "yes", "no"), default="auto",
                    help="one process per (model, budget, mode); auto: on GPU, for the peak-memory counter")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(run_job(json.loads(args.worker))))
        return
    gpu = jax.default_backend() == "gpu"
    batches = [int(b) for b in (args.batches or ("1,2,4,8,16,32,64" if gpu else "1,8")).split(",")]
    budgets = [float(b) for b in args.budgets.split(",")]
    modes = [m for m in args.modes.split(",") if m]
    unknown = sorted(set(modes) - set(MODES))
    if unknown:
        ap.error(f"unknown modes {unknown}; valid: {MODES}")
    isolate = args.isolate == "yes" or (args.isolate == "auto" and gpu)
    common = dict(llm_tokens=args.llm_tokens, round_to=args.round_to, reps=args.reps or (20 if gpu else 3),
                  gather_max_tokens=args.gather_max_tokens, all_materialize=args.all_materialize or gpu)
    rows, disk, t0 = [], {}, time.perf_counter()
    for model in args.models.split(","):
        # On CPU DeiT's 197-token images make batches past 1 slow; --batches overrides.
        model_batches = batches if (gpu or args.batches or model != "deit_b") else batches[:1]
        # Budget outermost, so the cached random groups of one budget serve all of its modes.
        jobs = [("dense", None)] if "dense" in modes else []
        jobs += [(mode, b) for b in budgets for mode in modes if mode != "dense"]
        for mode, b in jobs:
            job = dict(common, model=model, mode=mode, budget=b, batches=model_batches)
            new = run_isolated(job) if isolate else run_job(job)
            rows += new
            for r in new:
                print(f"[{time.perf_counter() - t0:6.0f}s] {model} {mode} budget {b} batch {r['batch']}: "
                      f"{r['ms']:.2f} ms", flush=True)
            if b is not None and b not in disk.setdefault(model, {}):
                disk[model][b] = disk_fractions(stacks(args.llm_tokens)[model], b, args.round_to)
    device = f"{jax.devices()[0].device_kind} ({jax.default_backend()}, {len(jax.devices())} device(s))"
    md = [f"# FiPS MLP-stack inference on {device}", "",
          "MLP stacks only (random weights, real shapes); V 75% sparse; ms = median of "
          f"{common['reps']} calls after compilation. held = parameter bytes kept between calls; "
          "XLA = compiled arguments + outputs + temporaries; peak = device allocator peak (GPU only, "
          "one process per model/budget/mode).", "", table(rows), "",
          "On-disk MLP bytes of the sparse safetensors format (float32, indices included) / dense MLP bytes:", "",
          "| model | budget | uniform 75% mask | 1:4 mask |", "|---|---:|---:|---:|"]
    for m, per in disk.items():
        md += [f"| {m} | {b:.0%} | {f['uniform']:.1%} | {f['1:4']:.1%} |" for b, f in per.items()]
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "inference.md"), "w") as f:
        f.write("\n".join(md) + "\n")
    with open(os.path.join(args.out, "inference.json"), "w") as f:
        json.dump({"device": device, "rows": rows, "disk_fraction": disk, "args": vars(args)}, f, indent=1)
    plot(rows, budgets, os.path.join(args.out, "inference.png"))
    print("\n".join(md))
    print(f"\nwrote {args.out}/inference.md, inference.json, inference.png ({time.perf_counter() - t0:.0f}s)")


if __name__ == "__main__":
    main()
