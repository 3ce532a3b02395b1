"""Bytes per device of a sharded FiPS calibration of Llama-3.1-8B and Gemma-2-9B.

    python -m benchmarks.memory_plan [--write docs/memory_plan.md]

Nothing is allocated. The models are built abstractly (`jax.eval_shape`) from their HF
architecture numbers; groups, budget, sparsity and calibration sizes come from
`configs/llama3_8b.py` and `configs/gemma2_9b.py`, ranks from `budget.rank_for_budget`. Every
array is placed by the logical-axis rules of a real run (`sharding.DEFAULT_RULES`) on a mesh
`{"data": 1, "fsdp": <devices>, "tensor": 1}` of each target, and per-device sizes are the shard
shapes those rules give, so an array the rules fail to split shows up at full size.

The group's MLP inputs and targets stay on the host in the model's dtype (`model.dtype` of the
configs: bfloat16) and each
step receives one minibatch `[n, batch_tokens, d]` of each (`local_opt.HostBatches`); the device
holds that minibatch and the prefetched next one, never the whole `[n, tokens, d]`. The host does
not hold them either: the configs set `local.store=disk`, so they are files of the workdir read a
minibatch at a time (`calibration.ActivationStore`), and the process's RSS holds about one minibatch
of them (`benchmarks/activation_store.py`).

Temporaries of the local step are not guessed: the real jitted step (`local_opt.make_step` on
`mlp_group_loss`, AdamW + the sparsity updater, with the run's shardings, fed a minibatch in the
model's dtype) is lowered and compiled for the target's device count on fake CPU devices, and XLA's
memory analysis gives the per-device temporary bytes. The CPU backend partitions like the accelerators do (same SPMD
partitioner), but its buffer assignment is not theirs: read those rows as close estimates.
"""

from __future__ import annotations

import os

# Fake CPU devices for the compile-only memory analysis; must be set before jax is imported.
os.environ["JAX_PLATFORMS"] = "cpu"
os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=16"

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import functools  # noqa: E402
import math  # noqa: E402
from typing import Any  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec  # noqa: E402

from configs import gemma2_9b, llama3_8b  # noqa: E402
from fips_jax import budget, factors, local_opt, sharding, svd_init  # noqa: E402
from fips_jax.models import registry  # noqa: E402

GiB = 2**30

# HF config.json numbers (no hub access needed).
HF_CONFIGS = {
    "Llama-3.1-8B": dict(
        model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072, rms_norm_eps=1e-5,
        rope_theta=500000.0, tie_word_embeddings=False, hidden_act="silu",
        rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                          original_max_position_embeddings=8192)),
    "Gemma-2-9B": dict(
        model_type="gemma2", vocab_size=256000, hidden_size=3584, intermediate_size=14336, num_hidden_layers=42,
        num_attention_heads=16, num_key_value_heads=8, head_dim=256, query_pre_attn_scalar=256,
        sliding_window=4096, attn_logit_softcapping=50.0, final_logit_softcapping=30.0, rms_norm_eps=1e-6,
        tie_word_embeddings=True, hidden_activation="gelu_pytorch_tanh"),
}
RUN_CONFIGS = {"Llama-3.1-8B": llama3_8b.get_config(), "Gemma-2-9B": gemma2_9b.get_config()}


@dataclasses.dataclass(frozen=True)
class Target:
    name: str
    devices: int
    hbm_gib: float


TARGETS = (Target("TPU v5e-8", 8, 16), Target("TPU v4-32", 16, 32), Target("A100-80GB", 1, 80))

# Measured once on one H100 80GB (jax 0.11.2, CUDA) with this module's `step_memory` and a real
# optimiser initialisation, when masks were still computed by a global argsort (before
# `masks.topk_masks` became a threshold bisection) and the step still gathered its minibatch from
# float32 inputs held on the device; kept as text because this script runs on CPU.
CROSS_CHECK = (
    "One H100, Gemma-2-9B group, one device, as the step was then (float32 inputs and targets on the "
    "device, every block's W and activations at once, argsort top-k): the GPU compiler's temporaries "
    "were 15.5 GiB for the step without a mask update and 23.7 GiB for the GMP mask-update step, where "
    "the CPU backend's analysis of the same programs gave 27.8 and 37.8 GiB; the GMP optimiser "
    "initialisation ran with a 21.5 GiB peak: V 6.6 GiB plus the new state 14.9 GiB. So the CPU "
    "backend overstated one-device temporaries by about 1.6-1.8x; the tables above are CPU figures, "
    "upper estimates in that sense. The present step (host-fed minibatch, block rematerialisation, "
    "fused magnitude top-k) has not been run on a GPU yet.")


@dataclasses.dataclass
class Row:
    name: str
    shape: str
    dtype: str
    total: int | None
    per_device: dict[str, int | str]  # bytes, or a short reason when there is no number


def _mesh(target: Target) -> jax.sharding.Mesh:
    return sharding.make_mesh({"data": 1, "fsdp": target.devices, "tensor": 1}, jax.devices()[: target.devices])


def _placed(name: str, shapes: Any, axes: Any, dtype: Any, meshes: dict, shape_text: str = "") -> Row:
    """Total and per-device bytes of a tree of shapes placed by the default rules."""
    leaves = jax.tree.leaves(shapes)
    itemsize = np.dtype(dtype).itemsize
    per = {}
    for t, mesh in meshes.items():
        shs = jax.tree.leaves(sharding.logical_to_sharding(axes, mesh, sharding.DEFAULT_RULES, shapes))
        per[t] = sum(sharding.per_device_bytes(x.shape, dtype, s) for x, s in zip(leaves, shs))
    if not shape_text:
        shape_text = "[" + ", ".join(map(str, leaves[0].shape)) + "]"
    return Row(name, shape_text, np.dtype(dtype).name, sum(math.prod(x.shape) for x in leaves) * itemsize, per)


def _sum(name: str, shape: str, rows: list[Row], factor: int = 1) -> Row:
    return Row(name, shape, rows[0].dtype, factor * sum(r.total for r in rows),
               {t: factor * sum(r.per_device[t] for r in rows) for t in rows[0].per_device})


def step_memory(arch, d: int, p: int, n: int, rank: int, batch: int, cfg, algorithm: str, mesh,
                init: bool = False) -> Any:
    """XLA's memory analysis of the compiled, sharded local step for one group (nothing runs);
    `init=True`: of the optimiser's initialisation instead (which computes the first masks)."""
    f = len(arch.mlp_spec.fc_names)
    spec = arch.mlp_spec
    sparsity = 0.0 if algorithm == "dense" else cfg.fips.sparsity
    lcfg = local_opt.LocalOptConfig(steps=100, algorithm=algorithm, sparsity=sparsity, update_freq=50)
    tx, updater = local_opt.make_optimizer(lcfg)
    params = {"u": jax.ShapeDtypeStruct((d, rank), jnp.float32),
              "v": jax.ShapeDtypeStruct((n, f, rank, p), jnp.float32)}
    opt_state = jax.eval_shape(tx.init, params)
    psh = sharding.group_shardings(params, mesh, sharding.DEFAULT_RULES)
    osh = sharding.shadow_shardings(opt_state, params, psh)
    if init:
        return jax.jit(tx.init, in_shardings=(psh,), out_shardings=osh).lower(params).compile().memory_analysis()
    # One minibatch in the model's dtype, as `HostBatches` feeds it.
    x = jax.ShapeDtypeStruct((n, batch, d), jnp.dtype(cfg.model.dtype))
    act = sharding.logical_to_sharding(sharding.ACTIVATION_AXES, mesh, sharding.DEFAULT_RULES, x)
    rep = NamedSharding(mesh, PartitionSpec())

    def loss_fn(p_, step, x_, y_):
        del step
        return local_opt.mlp_group_loss(p_, spec, x_, y_, block_remat=bool(cfg.local.get("block_remat", False)))

    step = jax.jit(local_opt.make_step(loss_fn, tx, updater), in_shardings=(psh, osh, rep, act, act),
                   out_shardings=(psh, osh, rep, rep), donate_argnums=(0, 1))
    return step.lower(params, opt_state, jax.ShapeDtypeStruct((), jnp.int32), x, x).compile().memory_analysis()


def init_memory(d: int, p: int, n: int, f: int, rank: int, cfg, mesh) -> Any:
    """XLA's memory analysis of the group's SVD init as the run config computes it (`fips.init`
    svd or gram, `methods.fips.group_init`): the group matrix W [d, n*F*p] in the model's dtype in,
    U and V float32 out with the run's shardings (gram: W split along its long axis)."""
    kw = dict(rank=rank, n_blocks=n, n_fcs=f, tau=cfg.fips.tau)
    w = jax.ShapeDtypeStruct((d, n * f * p), jnp.dtype(cfg.model.dtype))
    named = lambda axes, shape: NamedSharding(mesh, sharding.logical_to_spec(axes, mesh, sharding.DEFAULT_RULES,
                                                                             shape))
    if cfg.fips.init == "gram":
        out = factors.FipsFactors(u=named(sharding.U_AXES, (d, rank)), v=named(sharding.V_AXES, (n, f, rank, p)))
        fn = jax.jit(functools.partial(svd_init.init_group_gram, **kw),
                     in_shardings=(named(sharding.GROUP_MATRIX_AXES, w.shape),), out_shardings=out)
    elif cfg.fips.init == "svd":  # `group_init` places nothing: one device's SVD of the whole W
        fn = jax.jit(functools.partial(svd_init.init_group, **kw))
    else:
        raise ValueError(f"fips.init {cfg.fips.init!r}: the plan covers svd and gram")
    return fn.lower(w).compile().memory_analysis()


def plan(model: str) -> tuple[dict, list[Row], list[Row]]:
    """(summary, device rows, host rows) for one model on every target."""
    hf, cfg = HF_CONFIGS[model], RUN_CONFIGS[model]
    arch = registry.from_hf_config(hf)
    shapes, axes = jax.eval_shape(arch.init, jax.random.PRNGKey(0)), arch.logical_axes()
    meshes = {t.name: _mesh(t) for t in TARGETS}
    d, p, f, n = hf["hidden_size"], hf["intermediate_size"], len(arch.mlp_spec.fc_names), cfg.fips.group_size
    rank = budget.rank_for_budget(d, p, n, f, cfg.fips.budget, cfg.fips.sparsity, group=model)
    tokens = cfg.data.calib.window * cfg.data.calib.n_windows
    n_params = sum(math.prod(x.shape) for x in jax.tree.leaves(shapes))
    sds = lambda *s: jax.ShapeDtypeStruct(s, jnp.float32)

    dense = [_placed(f"dense params ({np.dtype(t).name})", shapes, axes, t, meshes, f"{n_params / 1e9:.2f}B")
             for t in (jnp.bfloat16, jnp.float32)]
    u = _placed("U", sds(d, rank), sharding.U_AXES, jnp.float32, meshes)
    v = _placed("V", sds(n, f, rank, p), sharding.V_AXES, jnp.float32, meshes)
    masks = _placed("V masks", sds(n, f, rank, p), sharding.V_AXES, jnp.bool_, meshes)
    adam = _sum("Adam mu + nu", "2 x (U + V)", [u, v], 2)
    batch = cfg.local.batch_tokens
    model_dtype = jnp.dtype(cfg.model.dtype)  # of the resident dense model and the activations
    mb = _placed("minibatch", sds(n, batch, d), sharding.ACTIVATION_AXES, model_dtype, meshes)
    calib = _sum("minibatch inputs + targets, current + prefetched", f"2 x 2 x [{n}, {batch}, {d}]", [mb], 4)
    held = [u, v, masks, adam, calib]
    rows = dense + held

    # "dense" stands for every step that does not recompute masks (static: same temporaries; its
    # masks add the "V masks" row to the arguments). "init" is the optimiser's initialisation,
    # where every sparse algorithm computes its first masks.
    xla: dict[str, dict[str, Any]] = {"dense": {}, "gmp": {}, "init": {}}
    for kind in xla:
        for t in TARGETS:
            try:
                xla[kind][t.name] = step_memory(arch, d, p, n, rank, batch, cfg, "gmp" if kind == "init" else kind,
                                                meshes[t.name], init=kind == "init")
            except (OverflowError, ValueError) as e:  # e.g. more V entries than int32 indexes
                xla[kind][t.name] = f"fails: {type(e).__name__}"
                xla[kind]["error"] = str(e).splitlines()[0]
    args = {t.name: xla["dense"][t.name].argument_size_in_bytes for t in TARGETS}
    rows.append(Row("step arguments, XLA, dense (check: U + V + Adam + one minibatch)", "", "", None, args))
    model_row = dense[0] if model_dtype == jnp.bfloat16 else dense[1]
    offload = bool(cfg.local.get("offload_model", False))
    # `local.offload_model`: the dense model is in host memory during the local step.
    resident = {t.name: (0 if offload else model_row.per_device[t.name]) + sum(r.per_device[t.name] for r in held)
                for t in TARGETS}

    # The SVD init: the dense model is on the device (the stream needs it between local steps).
    inits = {t.name: init_memory(d, p, n, f, rank, cfg, meshes[t.name]) for t in TARGETS}
    rows.append(Row(f"SVD init ({cfg.fips.init}), XLA: W in + U, V out", f"[{d}, {n * f * p}] -> U, V", "", None,
                    {t: m.argument_size_in_bytes + m.output_size_in_bytes for t, m in inits.items()}))
    rows.append(Row(f"temporaries, XLA, SVD init ({cfg.fips.init})", "", "", None,
                    {t: m.temp_size_in_bytes for t, m in inits.items()}))
    rows.append(Row(f"**peak, SVD init ({cfg.fips.init})**", f"{model_dtype.name} model + W + U, V + temporaries", "",
                    None, {t: model_row.per_device[t] + m.argument_size_in_bytes + m.output_size_in_bytes
                           + m.temp_size_in_bytes for t, m in inits.items()}))
    where = "host" if offload else model_dtype.name
    for kind, label in (("init", "optimiser init (first masks)"), ("dense", "step without mask update"),
                        ("gmp", "GMP/RigL mask-update step")):
        results = {t: m for t, m in xla[kind].items() if t != "error"}
        rows.append(Row(f"temporaries, XLA, {label}", "", "", None, {
            t: m if isinstance(m, str) else m.temp_size_in_bytes for t, m in results.items()}))
        rows.append(Row(f"**peak, {label}**", f"model ({where}) + arrays + temporaries", "", None, {
            t: m if isinstance(m, str) else resident[t] + m.temp_size_in_bytes for t, m in results.items()}))

    on_disk = cfg.local.get("store", "memory") == "disk"
    host = [
        Row("hidden-state stream (RAM)", f"[{cfg.data.calib.n_windows}, {cfg.data.calib.window}, {d}]",
            model_dtype.name, tokens * d * model_dtype.itemsize, {}),
        Row(f"one group's MLP inputs + targets ({'disk, `local.store=disk`' if on_disk else 'RAM'})",
            f"2 x [{n}, {tokens}, {d}]", model_dtype.name, 2 * n * tokens * d * model_dtype.itemsize, {}),
        Row("minibatch gathers, current + prefetched (RAM)", f"2 x 2 x [{n}, {batch}, {d}]", model_dtype.name,
            4 * n * batch * d * model_dtype.itemsize, {}),
    ]
    if offload:
        host.append(Row("the dense model during the local step (RAM, `local.offload_model`)",
                        f"{n_params / 1e9:.2f}B", model_dtype.name, model_row.total, {}))
    # A finished group's factors go to the stage store and are read back one group at a time where
    # used (`stages.StoredTrees`): they are on disk during the calibration, not in RAM.
    groups = math.ceil(hf["num_hidden_layers"] / n)
    host.append(Row("the finished groups' FiPS factors, at the last group (disk, the stage store)",
                    f"{groups - 1} x (U + V)", "float32", (groups - 1) * (u.total + v.total), {}))
    summary = dict(model=model, d=d, p=p, layers=hf["num_hidden_layers"], group_size=n,
                   groups=groups, all_factors=groups * (u.total + v.total), rank=rank, budget=cfg.fips.budget,
                   sparsity=cfg.fips.sparsity, tokens=tokens, batch_tokens=cfg.local.batch_tokens,
                   v_entries=n * f * rank * p, gmp_error=xla["init"].get("error"))
    return summary, rows, host


def _cell(b: int | str | None, hbm: float | None = None, peak: bool = False) -> str:
    if b is None:
        return ""
    if isinstance(b, str):
        return b
    text = f"{b / GiB:.2f}"
    if peak and hbm:
        text = f"**{text}** ({'fits' if b <= hbm * GiB else 'over'}, {100 * b / (hbm * GiB):.0f}%)"
    return text


def markdown(plans: list[tuple[dict, list[Row], list[Row]]]) -> str:
    cols = [f"{t.name} ({t.devices} x {t.hbm_gib:g} GiB)" for t in TARGETS]
    out = ["# Memory plan: sharded FiPS calibration of 8-9B LLMs", "",
           "Generated by `python -m benchmarks.memory_plan --write docs/memory_plan.md` (see its docstring "
           "for the method). GiB per device on a mesh `{data: 1, fsdp: <devices>, tensor: 1}` with the "
           "default logical-axis rules of `fips_jax/sharding.py`; `total` is the unsharded size. The dense "
           "model (bfloat16) is on the device for the teacher stream and the SVD init, and in host memory "
           "during the local step (`local.offload_model`, on in both configs); finished groups' factors "
           "wait on disk in the stage store; FiPS's initial factors are handed to the local step, not kept beside it. FiPS factors, masks and optimiser state "
           "are float32/bool as the pipeline keeps them. The group's MLP inputs and targets stay on the "
           "host in bfloat16; the device holds the step's minibatch of them and the prefetched next one. "
           "Rows marked XLA come from compiling the real sharded local step for that device count (CPU "
           "backend, nothing allocated), with the run config's `local.block_remat` (on for both models).",
           ""]
    for s, rows, host in plans:
        out += [f"## {s['model']}", "",
                f"d {s['d']}, p {s['p']}, {s['layers']} blocks in {s['groups']} groups of {s['group_size']}, "
                f"budget {s['budget']}, sparsity {s['sparsity']} -> rank {s['rank']}"
                f"{' (> d: hybrid growth)' if s['rank'] > s['d'] else ''}, {s['v_entries'] / 1e9:.2f}e9 V entries; "
                f"calibration {s['tokens']} tokens, minibatch {s['batch_tokens']} tokens.", "",
                "| item | shape | dtype | total | " + " | ".join(cols) + " |",
                "|---|---|---|---:|" + "---:|" * len(cols)]
        for r in rows:
            peak = r.name.startswith("**peak")
            out.append(f"| {r.name} | {r.shape} | {r.dtype} | {_cell(r.total)} | "
                       + " | ".join(_cell(r.per_device.get(t.name), t.hbm_gib, peak) for t in TARGETS) + " |")
        out.append("")
        ram = [h for h in host if "(RAM" in h.name]
        stream = [h for h in ram if "offload_model" not in h.name]
        out.append("Host memory of one process holding every calibration window: "
                   + "; ".join(f"{h.name} {h.shape} {h.dtype} {h.total / GiB:.2f} GiB" for h in host)
                   + f". In RAM for the teacher stream and its minibatches: {sum(h.total for h in stream) / GiB:.2f} GiB"
                   + (f"; with what `local.offload_model` moves there: {sum(h.total for h in ram) / GiB:.2f} GiB"
                      if len(ram) > len(stream) else "") + ".")
        def shared_out(h, k):  # rows that every process holds only its share of
            return h.total / k if h.name.startswith(("hidden-state", "one group's")) else h.total

        per_process = {k: sum(shared_out(h, k) for h in stream) for k in (2, 4, 8)}
        out.append("With several processes (`launch/run.py`), each captures its own share of the calibration "
                   "windows (`calibration.HiddenStream`, split=True): the hidden-state stream and the group's "
                   "MLP inputs + targets divide by the process count, while each process still assembles "
                   "whole minibatches (it fills its own rows into a zero minibatch, and one device sum adds "
                   "the processes' ones). Teacher stream and minibatches in RAM per process: "
                   + ", ".join(f"{k} processes {b / GiB:.2f} GiB" for k, b in per_process.items())
                   + "; the group's activations per process (disk or RAM): "
                   + ", ".join(f"{k} processes {sum(h.total for h in host if h.name.startswith('one group')) / k / GiB:.2f} GiB"
                               for k in (2, 4, 8)) + ".")
        if s["gmp_error"]:
            out.append(f"Mask computation: `{s['gmp_error']}` ({s['v_entries']:,} V entries).")
        out.append("")
    out += ["## Cross-check on a GPU", "", CROSS_CHECK, ""]
    out += ["## Levers", "",
            "What shrinks which row (each changes the computation or its numerics, so none is a default):", "",
            "- Mask computation (optimiser init for static/GMP/RigL, and every mask-update step of GMP/RigL) "
            "finds its threshold by bisection with sharded count reductions (`masks.topk_masks`): no sort, "
            "uint32 counts up to 2**32 entries, temporaries that shrink with the devices like V does.",
            "- MLP inputs + targets (done): kept on the host in the model's dtype and fed one minibatch per "
            "step (`local_opt.HostBatches`, the next one prefetched), they left the device: 40 GiB of a "
            "Llama-3.1-8B group in float32 before.",
            "- `local.block_remat` (on in `configs/llama3_8b.py`, `configs/gemma2_9b.py`): the loss runs one "
            "block at a time with its forward recomputed in the backward, so the step holds one block's W, "
            "activations and their gradients instead of the group's (Llama, one device: 34.9 -> 17.9 GiB of "
            "temporaries). Same loss up to float rounding; off by default.",
            "- Magnitude top-k (done): GMP/RigL mask updates and the first masks score |V| inside each "
            "bisection pass instead of from a float32 copy of V (Llama, one device: 10 GiB less in both).",
            "- `local.offload_model` (done, on in both configs): the dense bfloat16 model (15-17 GiB) waits "
            "in host memory during the local step, which reads only host-fed minibatches; it costs a host "
            "copy of the model and one transfer each way per group. The local step also consumes FiPS's "
            "initial factors instead of keeping them beside the trained ones (a second V, 10 GiB for "
            "Llama; earlier plans did not count it).",
            "- Not done, next in size: Adam's mu and nu (2 x V, float32) could be kept in bfloat16 or only "
            "for V's kept entries; masks could be bit-packed (V entries / 8 bytes instead of / 1).",
            "- Not done: the export after the calibration (`export.save`, then `export_sparse.convert`) "
            "holds every group's factors in host RAM at once (all groups' U + V in float32: "
            + ", ".join(f"{s['all_factors'] / GiB:.1f} GiB for {s['model']}" for s, _, _ in plans)
            + ", plus the sparse conversion's copies); it is the peak of "
            "`benchmarks/peak_rss.py` at every size. Writing and converting one group at a time would bound "
            "it by one group.",
            "- U, V, masks, Adam and the step temporaries scale with the group size: groups of 4 instead of 8 "
            "roughly halve them at the cost of less sharing.",
            "- More devices on `fsdp` divide everything above except the gathered minibatch activations "
            "`[n, batch_tokens, d]`, which every device holds while it forms its columns of W.", ""]
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--write", default="", help="also write the markdown to this file")
    args = parser.parse_args()
    text = markdown([plan(m) for m in HF_CONFIGS])
    print(text)
    if args.write:
        os.makedirs(os.path.dirname(args.write) or ".", exist_ok=True)
        with open(args.write, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
