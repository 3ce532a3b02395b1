"""Throughput of the jitted local-optimisation step next to the machine's matmul peak.

    python benchmarks/local_step.py [--cases smollm2,deit_b] [--modes joint,sequential]
                                    [--reps 3] [--compute-dtype float32] [--reference] [--json]
                                    [--authors-repo PATH [--sparsimony-repo PATH]]

Cases (one group each, GMP to 75% with AdamW, as `local_opt.train` runs it):
  smollm2  d 576, p 1536, 6 blocks, 3 FCs (SiLU-gated), rank 1063, 1024 positions per block;
  deit_b   d 768, p 3072, 4 blocks, 2 FCs (GELU), rank at budget 0.5, --deit-tokens per block
           (the paper's minibatch is 128 x 197 = 25216).
Modes: joint (one step over the whole group, the default) and sequential (one step on one MLP,
the authors' order; a group step is `blocks` of them). Each is timed without and with a mask
update (the two programs `local_opt.train` picks between).

Peaks: a chained square matmul inside one jitted loop (`jnp.dot`), float32 and bfloat16 (bf16
out, and bf16 operands with float32 accumulation), and `torch.matmul` when torch is importable.
The XLA float32 peak a row is compared with is measured again around that row's timing (median
of the run's first and those two), since on a shared machine the available compute moves; the
torch peak is measured once. GFLOP are counted analytically (`step_flops`).

--reference also times a per-MLP step written in PyTorch after the authors' description (one
MLP at a time: W = U V_t from the masked V_t, MSE of the MLP output, backward, torch AdamW,
re-mask), with and without a `gc.collect()` after each step as their loop has; it is a
description-level reimplementation for timing, not their code.

--authors-repo=PATH [--sparsimony-repo=PATH] times the authors' own code from a checkout of
github.com/cemuyuk/FiPS (and of github.com/mklasby/sparsimony, by default PATH/third_party/
sparsimony): their `training.distil_llm_local.train_per_mlp` loop, run as written on one group
of a random `transformers` Llama whose MLPs have the case's shapes, compressed by their
`sd2s.lrm.SMModel` to the case's rank (their `p_budget` chosen so that their `compute_sparse_r`
gives it), AdamW and their GMP sparsifier (global, 75%), the case's positions per step. Their
seconds per group step are the difference of two runs of that loop, with 1 and 1 + 2 * reps
steps per MLP (their per-MLP set-up and logging cancel), taken with their `gc.collect()` and
with it replaced by a no-op, and with the sparsifier's mask update on no step (their default
schedule before its first update) or on every step (delta_t 1, t_accel 0). LLM cases only (their
loop names the gate/up/down projections). Modules their imports need that are not installed
are replaced by empty stand-ins (`_AUTHORS_STUBS`: experiment tracking, config and launch
tooling, and deepspeed, whose one use is for ZeRO-3 sharded weights); of them only wandb.log
runs in the loop, once per MLP at its epoch end (a no-op here, and cancelled by the difference).
Their config (omegaconf) is a dict with attribute access. torch.cuda calls in their loop are
no-ops on a CPU-only torch.

No assertion: figures. With --json the last line is one JSON object (`cases`: one entry per
case, mode and mask update; `peaks`).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import io
import json
import os
import sys
import time
import types

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from fips_jax import budget, local_opt
from fips_jax.models import base

GATED = base.MlpSpec(("gate", "up", "down"), (False, False, True), "silu", gated=True, has_bias=False)
CASES = {
    "smollm2": dict(d=576, p=1536, blocks=6, spec=GATED, rank=1063, tokens=1024),
    "deit_b": dict(d=768, p=3072, blocks=4, spec=base.VIT_MLP, rank=None, tokens=128 * 197),
}


def step_flops(n: int, f: int, d: int, p: int, r: int, t: int) -> float:
    """Matmul flops of one step of the group loss (forward + backward) over n blocks of f FCs.

    Materialising W = U V per FC costs 2 d r p forward and twice that backward (dU and dV).
    Per block every FC costs 2 T d p forward and 2 T d p for its weight gradient; the last FC
    also 2 T d p for the input gradient that reaches the others (the MLP input needs none).
    """
    return float(3 * n * f * 2 * d * r * p + n * (2 * f + 1) * 2 * t * d * p)


def _median_time(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def xla_matmul_gflops(dtype, size: int, reps: int, chain: int = 8, accumulate=None) -> float:
    """`chain` chained [size, size] products inside one jitted loop, so dispatch does not count.
    accumulate: `preferred_element_type` (bf16 operands with float32 accumulation take another
    kernel on XLA:CPU than bf16 -> bf16)."""
    a = (jax.random.normal(jax.random.PRNGKey(0), (size, size), jnp.float32) / np.sqrt(size)).astype(dtype)
    f = jax.jit(lambda x: jax.lax.fori_loop(
        0, chain, lambda i, y: jnp.dot(y, a, preferred_element_type=accumulate).astype(dtype), x))
    f(a).block_until_ready()
    return chain * 2 * size**3 / _median_time(lambda: f(a).block_until_ready(), reps) / 1e9


def torch_matmul_gflops(dtype: str, size: int, reps: int, chain: int = 8) -> float | None:
    try:
        import torch  # pylint: disable=import-outside-toplevel
    except ImportError:
        return None
    dt = getattr(torch, dtype)
    a = (torch.randn(size, size) / size**0.5).to(dt)

    def run():
        y = a
        for _ in range(chain):
            y = y @ a
        return y

    run()
    return chain * 2 * size**3 / _median_time(run, reps) / 1e9


def _group(case: dict, tokens: int, seed: int = 0):
    d, p, n, spec = case["d"], case["p"], case["blocks"], case["spec"]
    f = len(spec.fc_names)
    r = case["rank"] or budget.rank_for_budget(d, p, n, f, 0.5, 0.75)
    k = jax.random.split(jax.random.PRNGKey(seed), 4)
    params = {"u": jax.random.normal(k[0], (d, r), jnp.float32) / np.sqrt(d),
              "v": jax.random.normal(k[1], (n, f, r, p), jnp.float32) / np.sqrt(r)}
    if spec.has_bias:
        params["bias"] = {name: jnp.zeros((n, d if tr else p)) for name, tr in zip(spec.fc_names, spec.transposed)}
    x = jax.random.normal(k[2], (n, tokens, d), jnp.float32)
    y = jax.random.normal(k[3], (n, tokens, d), jnp.float32)
    return params, x, y, r


def time_our_step(case: dict, tokens: int, mode: str, reps: int, compute_dtype) -> dict:
    """Seconds per step of `local_opt.make_step` (jitted, donating, as `train` runs it) without
    and with a mask update; sequential times one block's MLP."""
    params, x, y, r = _group(case, tokens)
    if mode == "sequential":
        params = {"u": params["u"], "v": params["v"][:1],
                  **({"bias": {k: v[:1] for k, v in params["bias"].items()}} if "bias" in params else {})}
        x, y = x[:1], y[:1]
    spec = case["spec"]
    cfg = local_opt.LocalOptConfig(steps=10_000, update_freq=50)
    tx, updater = local_opt.make_optimizer(cfg)
    opt_state = jax.tree_util.tree_map(jnp.array, tx.init(params))

    def loss_fn(prm, step, x, y):
        return local_opt.mlp_group_loss(prm, spec, x, y, compute_dtype)

    out = {"rank": r}
    state = [params, opt_state]
    for update in (False, True):
        step = jax.jit(local_opt.make_step(loss_fn, tx, updater, check_finite=True, mask_update=update),
                       donate_argnums=(0, 1))

        def run():
            state[0], state[1], loss, _, _ = step(state[0], state[1], jnp.int32(50), x, y)
            loss.block_until_ready()

        t0 = time.perf_counter()
        run()
        out["compile_s" if not update else "compile_mask_s"] = time.perf_counter() - t0
        out["mask_update" if update else "plain"] = _median_time(run, reps)
    return out


def time_reference_step(case: dict, tokens: int, reps: int, collect: bool) -> float | None:
    """Seconds per group step (every MLP once) of the PyTorch per-MLP step described in the
    module docstring; None without torch."""
    try:
        import torch  # pylint: disable=import-outside-toplevel
    except ImportError:
        return None
    d, p, n, spec = case["d"], case["p"], case["blocks"], case["spec"]
    f = len(spec.fc_names)
    r = case["rank"] or budget.rank_for_budget(d, p, n, f, 0.5, 0.75)
    torch.manual_seed(0)
    u = (torch.randn(d, r) / d**0.5).requires_grad_()
    vs = [[(torch.randn(r, p) / r**0.5).requires_grad_() for _ in range(f)] for _ in range(n)]
    masks = [[torch.rand(r, p) > 0.75 for _ in range(f)] for _ in range(n)]
    x, y = torch.randn(n, tokens, d), torch.randn(n, tokens, d)
    act = torch.nn.functional.silu if spec.activation == "silu" else torch.nn.functional.gelu
    opts = [torch.optim.AdamW([u, *vs[b]], lr=1e-3, weight_decay=0.05) for b in range(n)]

    def mlp_step(b):
        ws = [u @ (v * m) for v, m in zip(vs[b], masks[b])]  # [d, p] each
        if spec.gated:
            out = (act(x[b] @ ws[0]) * (x[b] @ ws[1])) @ ws[2].T
        else:
            out = act(x[b] @ ws[0]) @ ws[1].T
        loss = torch.mean((out - y[b]) ** 2)
        opts[b].zero_grad(set_to_none=True)
        loss.backward()
        opts[b].step()
        with torch.no_grad():
            for v, m in zip(vs[b], masks[b]):
                v.mul_(m)
        if collect:
            gc.collect()

    def group_step():
        for b in range(n):
            mlp_step(b)

    group_step()
    return _median_time(group_step, reps)


# Modules the authors' imports name that this timing does not use, replaced by empty stand-ins
# when not installed: {module: attributes}.
_AUTHORS_STUBS = {
    "deepspeed": {},                      # sparsimony: only for ZeRO-3 sharded weights
    "deepspeed.utils": {},
    "omegaconf": {"DictConfig": dict, "OmegaConf": None},  # annotations; OmegaConf in their main()
    "wandb": {"log": lambda *a, **k: None, "login": lambda *a, **k: None},
    "wandb.sdk": {},
    "wandb.sdk.wandb_run": {"Run": object},
    "pytorch_lightning": {},              # seed_everything, only in their main()
    "dotenv": {},                         # only in their __main__
    "hydra": {"main": lambda *a, **k: (lambda f: f)},
    "datasets": {"load_dataset": None},   # only in their main()
}


class _Config(dict):
    """A dict with attribute reads and writes, as their loop uses its omegaconf config."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError as e:
            raise AttributeError(name) from e

    __setattr__ = dict.__setitem__

    @classmethod
    def of(cls, tree):
        return cls({k: cls.of(v) for k, v in tree.items()}) if isinstance(tree, dict) else tree


def _import_authors(authors_repo: str, sparsimony_repo: str):
    """Their `training.distil_llm_local` and `sd2s.lrm` from the user's checkouts; returns the
    two modules and the names stubbed."""
    import importlib  # pylint: disable=import-outside-toplevel
    stubbed = []
    for name, attrs in _AUTHORS_STUBS.items():
        try:
            importlib.import_module(name)
        except ImportError:
            module = types.ModuleType(name)
            module.__dict__.update(attrs)
            sys.modules[name] = module
            parent, _, child = name.rpartition(".")
            if parent:
                setattr(sys.modules[parent], child, module)
            stubbed.append(name)
    sys.path[:0] = [os.path.abspath(authors_repo), os.path.abspath(sparsimony_repo)]
    distil = importlib.import_module("training.distil_llm_local")
    lrm = importlib.import_module("sd2s.lrm")
    return distil, lrm, stubbed


def time_authors_step(case: dict, tokens: int, reps: int, authors_repo: str, sparsimony_repo: str) -> dict | None:
    """Seconds per group step of the authors' `train_per_mlp` (module docstring), keyed
    `{mask_update}_{with_gc|without_gc}`, plus `stubbed` and `rank`; None for a case their
    loop does not train (not gated)."""
    if not case["spec"].gated:
        return None
    import torch  # pylint: disable=import-outside-toplevel
    from transformers import LlamaConfig, LlamaForCausalLM  # pylint: disable=import-outside-toplevel
    distil, lrm, stubbed = _import_authors(authors_repo, sparsimony_repo)
    from sd2s.utils import compute_sparse_r  # pylint: disable=import-outside-toplevel

    d, p, n, spec = case["d"], case["p"], case["blocks"], case["spec"]
    f, sparsity = len(spec.fc_names), 0.75
    r = case["rank"] or budget.rank_for_budget(d, p, n, f, 0.5, sparsity)
    # Their rank formula, inverted so that it gives ours.
    p_budget = (r + 0.5) * (4 * f * d * n * (1 - sparsity) + d) / (4 * f * n * d**2)
    assert compute_sparse_r(n_blocks=n, d=d, p_budget=p_budget, sparsity=sparsity, num_ffs=f) == r
    torch.manual_seed(0)
    heads = max(h for h in range(1, 17) if d % h == 0 and (d // h) % 2 == 0)
    hf = LlamaForCausalLM(LlamaConfig(hidden_size=d, intermediate_size=p, num_hidden_layers=n,
                                      num_attention_heads=heads, num_key_value_heads=heads,
                                      vocab_size=256, hidden_act="silu"))
    model_cfg = _Config.of(dict(
        p_budget=p_budget, sparsity=sparsity, structured_sparsity=False, block_fqn_prefix="layers",
        layer_fqn_suffixes=["up_proj", "down_proj", "gate_proj"],
        normalization=dict(in_place=False, fqn=None, apply_before_idx=None),
        block_group_indices={"block_group_1": list(range(n))}, concat_axis=1, mask=True, base_requires_grad=True))
    template = lrm.SMModel(model_cfg, hf)
    template.train()
    real_gc = distil.gc

    def run(steps: int, collect: bool, mask_update: bool) -> float:
        # One positions-per-step batch per step and MLP, one epoch.
        acts = {f"model.layers.{b}.mlp": (torch.randn(steps * tokens, d), torch.randn(steps * tokens, d))
                for b in range(n)}
        cfg = _Config.of(dict(
            training=dict(num_epochs=1, hooks=dict(num_batches=steps)), data=dict(batch_size=tokens),
            optimizer=dict(name="AdamW", kwargs=dict(lr=1e-3, weight_decay=0.05),
                           scheduler=dict(name="CosineAnnealingLR", kwargs=dict(T_max=steps, eta_min=1e-5))),
            sparsifier=dict(name="gradual", sparsity=sparsity, global_pruning=True, grown_weights_init=0,
                            pruning_ratio=0.1, initial_sparsity=0.25, accelerated_sparsity=0.5,
                            final_sparsity=sparsity, t_accel=0 if mask_update else 200,
                            scheduler=dict(delta_t=1 if mask_update else 50, t_end_coeff=1.0))))
        model = copy.deepcopy(template)
        distil.gc = real_gc if collect else types.SimpleNamespace(collect=lambda *a: 0)
        try:
            t0 = time.perf_counter()
            with contextlib.redirect_stdout(io.StringIO()):
                distil.train_per_mlp(cfg=cfg, c_model=model, original_model_activations=acts, step=0,
                                     device=torch.device("cpu"))
            return time.perf_counter() - t0
        finally:
            distil.gc = real_gc

    out = {"stubbed": stubbed, "rank": r}
    extra = 2 * reps
    run(1, True, True)  # warm-up: lazy initialisation in torch and their modules
    for mask_update in (False, True):
        for collect in (False, True):
            short, long = run(1, collect, mask_update), run(1 + extra, collect, mask_update)
            out[f"{'mask' if mask_update else 'plain'}_{'with_gc' if collect else 'without_gc'}"] = (long - short) / extra
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default="smollm2,deit_b")
    ap.add_argument("--modes", default="joint,sequential")
    ap.add_argument("--deit-tokens", type=int, default=128 * 197, help="positions per DeiT-B block")
    ap.add_argument("--reps", type=int, default=3, help="timed steps per program (median)")
    ap.add_argument("--peak-size", type=int, default=2048)
    ap.add_argument("--compute-dtype", default="float32", choices=("float32", "bfloat16"))
    ap.add_argument("--reference", action="store_true", help="also time the PyTorch per-MLP step")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--authors-repo", help="a checkout of github.com/cemuyuk/FiPS: also time their per-MLP loop")
    ap.add_argument("--sparsimony-repo", help="a checkout of github.com/mklasby/sparsimony "
                    "(default: AUTHORS_REPO/third_party/sparsimony)")
    args = ap.parse_args()
    sparsimony_repo = args.sparsimony_repo or (
        os.path.join(args.authors_repo, "third_party", "sparsimony") if args.authors_repo else None)

    peaks = {"xla_fp32": xla_matmul_gflops(jnp.float32, args.peak_size, args.reps),
             "xla_bf16": xla_matmul_gflops(jnp.bfloat16, args.peak_size, args.reps),
             "xla_bf16_f32acc": xla_matmul_gflops(jnp.bfloat16, args.peak_size, args.reps, accumulate=jnp.float32),
             "torch_fp32": torch_matmul_gflops("float32", args.peak_size, args.reps),
             "torch_bf16": torch_matmul_gflops("bfloat16", args.peak_size, args.reps)}
    print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), jax {jax.__version__}")
    print("matmul peak, GFLOP/s (" + f"{args.peak_size}^3): " + ", ".join(
        f"{k} {v:.0f}" if v is not None else f"{k} n/a" for k, v in peaks.items()))
    rows = []
    header = (f"{'case':8} {'mode':10} {'mask':4} {'rank':>5} {'step s':>8} {'group/s':>8} {'GFLOP/s':>8} "
              f"{'%xla':>5} {'%torch':>6}")
    print(header)
    for name in args.cases.split(","):
        case = CASES[name]
        tokens = args.deit_tokens if name == "deit_b" else case["tokens"]
        n, f = case["blocks"], len(case["spec"].fc_names)
        ref = None
        if args.reference:
            ref = {"with_gc": time_reference_step(case, tokens, args.reps, collect=True),
                   "without_gc": time_reference_step(case, tokens, args.reps, collect=False)}
        authors = None
        if args.authors_repo:
            authors = time_authors_step(case, tokens, args.reps, args.authors_repo, sparsimony_repo)
        for mode in args.modes.split(","):
            # On a shared machine the peak moves with the load: measured again next to each timing.
            xla_peak = float(np.median([peaks["xla_fp32"], xla_matmul_gflops(jnp.float32, args.peak_size, args.reps)]))
            t = time_our_step(case, tokens, mode, args.reps, jnp.dtype(args.compute_dtype))
            xla_peak = float(np.median([xla_peak, xla_matmul_gflops(jnp.float32, args.peak_size, args.reps)]))
            n_step = n if mode == "joint" else 1
            flops = step_flops(n_step, f, case["d"], case["p"], t["rank"], tokens)
            for update in (False, True):
                step_s = t["mask_update" if update else "plain"]
                group_s = step_s * (1 if mode == "joint" else n)
                gflops = flops / step_s / 1e9
                row = {"case": name, "mode": mode, "mask_update": update, "tokens": tokens, "rank": t["rank"],
                       "compute_dtype": args.compute_dtype, "step_s": step_s, "group_step_s": group_s,
                       "group_steps_per_s": 1 / group_s, "step_gflop": flops / 1e9, "step_gflops": gflops,
                       "compile_s": t["compile_mask_s" if update else "compile_s"],
                       "xla_fp32_peak_gflops": xla_peak, "torch_fp32_peak_gflops": peaks["torch_fp32"],
                       "fraction_of_xla_peak": gflops / xla_peak,
                       "fraction_of_torch_peak": gflops / peaks["torch_fp32"] if peaks["torch_fp32"] else None}
                if ref is not None and ref["without_gc"]:
                    row["reference_group_step_s"] = ref
                    row["speedup_vs_reference_without_gc"] = ref["without_gc"] / group_s
                    row["speedup_vs_reference_with_gc"] = ref["with_gc"] / group_s
                if authors is not None:
                    kind = "mask" if update else "plain"
                    row["authors_group_step_s"] = {k: v for k, v in authors.items() if k.startswith(kind)}
                    row["authors_stubbed_modules"] = authors["stubbed"]
                    row["speedup_vs_authors_without_gc"] = authors[f"{kind}_without_gc"] / group_s
                    row["speedup_vs_authors_with_gc"] = authors[f"{kind}_with_gc"] / group_s
                rows.append(row)
                tf = f"{row['fraction_of_torch_peak']:6.0%}" if row["fraction_of_torch_peak"] else "   n/a"
                print(f"{name:8} {mode:10} {'yes' if update else 'no':4} {t['rank']:5d} {step_s:8.3f} "
                      f"{1 / group_s:8.3f} {gflops:8.1f} {row['fraction_of_xla_peak']:5.0%} {tf}")
        if ref is not None and ref["without_gc"]:
            print(f"{name}: PyTorch per-MLP reference step, group step {ref['without_gc']:.3f}s without gc.collect, "
                  f"{ref['with_gc']:.3f}s with it")
            for row in rows:
                if row["case"] == name:
                    print(f"  ours {row['mode']:10} mask {'yes' if row['mask_update'] else 'no ':3}: "
                          f"{row['speedup_vs_reference_without_gc']:.2f}x (no gc), "
                          f"{row['speedup_vs_reference_with_gc']:.2f}x (with gc)")
        if authors is not None:
            print(f"{name}: the authors' train_per_mlp (rank {authors['rank']}), group step: no mask update "
                  f"{authors['plain_without_gc']:.3f}s without gc.collect, {authors['plain_with_gc']:.3f}s with it; "
                  f"mask update every step {authors['mask_without_gc']:.3f}s / {authors['mask_with_gc']:.3f}s"
                  + (f" (stand-ins for: {', '.join(authors['stubbed'])})" if authors["stubbed"] else ""))
            for row in rows:
                if row["case"] == name:
                    print(f"  ours {row['mode']:10} mask {'yes' if row['mask_update'] else 'no ':3}: "
                          f"{row['speedup_vs_authors_without_gc']:.2f}x (their step without gc), "
                          f"{row['speedup_vs_authors_with_gc']:.2f}x (as written, with gc)")
        elif args.authors_repo:
            print(f"{name}: the authors' per-MLP loop trains gated (LLM) MLPs only; not timed")
    if args.json:
        print(json.dumps({"peaks": peaks, "jax": jax.__version__, "cases": rows}))


if __name__ == "__main__":
    main()
