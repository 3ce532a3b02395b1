"""Seconds and peak RSS of reading a checkpoint through `safetensors_io.SafetensorsReader`.

    python benchmarks/safetensors_load.py --dir=/tmp/st_bench            # writes fixtures once, reuses them

Two fixtures, both random bf16 with the tensor names and shapes of HF SmolLM2-135M (llama
architecture: 30 layers, hidden 576, intermediate 1536, vocab 49152, 9 heads, 3 KV heads, tied
embeddings; ~135M params, ~270 MB):

  single    model.safetensors
  sharded   the same tensors in 3 shards + model.safetensors.index.json

Each case runs in a fresh child process (so its peak RSS, `ru_maxrss`, is that read's alone) that
opens the reader and reads every tensor as float32, one at a time, dropping each (what
`convert.load_params` does before transforming and placing a tensor). Printed: open seconds,
read-all seconds, peak RSS in MiB (`ru_maxrss`, which counts mapped file pages) and peak RssAnon
(sampled after each tensor of a second, untimed pass: the memory that is not the mapped file). The fixtures are written with `safetensors.numpy`, not with
the code under test, so two checkouts time the same files.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np

HIDDEN, INTER, LAYERS, VOCAB, HEADS, KV_HEADS = 576, 1536, 30, 49152, 9, 3


def smollm2_shapes() -> dict[str, tuple[int, ...]]:
    """{HF tensor name: torch-layout shape} of SmolLM2-135M (tied embeddings: no lm_head)."""
    head_dim = HIDDEN // HEADS
    shapes = {"model.embed_tokens.weight": (VOCAB, HIDDEN), "model.norm.weight": (HIDDEN,)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        shapes |= {
            p + "input_layernorm.weight": (HIDDEN,),
            p + "post_attention_layernorm.weight": (HIDDEN,),
            p + "self_attn.q_proj.weight": (HEADS * head_dim, HIDDEN),
            p + "self_attn.k_proj.weight": (KV_HEADS * head_dim, HIDDEN),
            p + "self_attn.v_proj.weight": (KV_HEADS * head_dim, HIDDEN),
            p + "self_attn.o_proj.weight": (HIDDEN, HEADS * head_dim),
            p + "mlp.gate_proj.weight": (INTER, HIDDEN),
            p + "mlp.up_proj.weight": (INTER, HIDDEN),
            p + "mlp.down_proj.weight": (HIDDEN, INTER),
        }
    return shapes


def write_fixtures(root: str, n_shards: int = 3) -> None:
    """root/single/model.safetensors and root/sharded/{3 shards, index}, unless already there."""
    import ml_dtypes
    from safetensors.numpy import save_file

    if os.path.exists(os.path.join(root, "sharded", "model.safetensors.index.json")):
        return
    rng = np.random.default_rng(0)
    tensors = {k: rng.standard_normal(s, dtype=np.float32).astype(ml_dtypes.bfloat16)
               for k, s in smollm2_shapes().items()}
    print(f"{sum(t.size for t in tensors.values()) / 1e6:.1f}M params", flush=True)
    os.makedirs(os.path.join(root, "single"), exist_ok=True)
    save_file(tensors, os.path.join(root, "single", "model.safetensors"), metadata={"format": "pt"})
    os.makedirs(os.path.join(root, "sharded"), exist_ok=True)
    names = list(tensors)
    weight_map = {}
    for i, chunk in enumerate(np.array_split(np.arange(len(names)), n_shards)):
        file = f"model-{i + 1:05d}-of-{n_shards:05d}.safetensors"
        save_file({names[j]: tensors[names[j]] for j in chunk}, os.path.join(root, "sharded", file),
                  metadata={"format": "pt"})
        weight_map |= {names[j]: file for j in chunk}
    with open(os.path.join(root, "sharded", "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)


def read_all(folder: str) -> dict:
    """Child side: open, read every tensor as float32, report times and peak RSS."""
    from fips_jax.hf import safetensors_io

    t0 = time.perf_counter()
    reader = safetensors_io.SafetensorsReader(folder)
    t1 = time.perf_counter()
    total = 0
    for k in reader.keys():
        total += reader.get(k).size
    t2 = time.perf_counter()
    anon = 0.0
    for k in reader.keys():  # a second pass, untimed, sampling anonymous memory after each read
        reader.get(k)
        anon = max(anon, _rss_anon_mib())
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return {"open_s": t1 - t0, "read_s": t2 - t1, "peak_rss_mib": rss, "peak_anon_mib": anon, "params": total}


def _rss_anon_mib() -> float:
    """RssAnon: resident memory that is not a mapped file (mapped checkpoint pages are page cache,
    counted in RSS but given back by the kernel whenever it needs them)."""
    with open("/proc/self/status") as f:
        line = next(x for x in f if x.startswith("RssAnon:"))
    return int(line.split()[1]) / 1024


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dir", default="/tmp/st_bench")
    parser.add_argument("--repeats", type=int, default=3, help="runs per case; the fastest is printed")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(read_all(args.child)))
        return
    write_fixtures(args.dir)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    print(f"{'case':8s} {'open s':>8s} {'read s':>8s} {'peak RSS MiB':>13s} {'peak anon MiB':>14s}")
    for case in ("single", "sharded"):
        runs = []
        for _ in range(args.repeats):
            out = subprocess.run([sys.executable, __file__, "--child", os.path.join(args.dir, case)],
                                 env=env, check=True, capture_output=True, text=True).stdout
            runs.append(json.loads(out.strip().splitlines()[-1]))
        best = min(runs, key=lambda r: r["open_s"] + r["read_s"])
        print(f"{case:8s} {best['open_s']:8.3f} {best['read_s']:8.3f} {max(r['peak_rss_mib'] for r in runs):13.0f} "
              f"{max(r['peak_anon_mib'] for r in runs):14.0f}")


if __name__ == "__main__":
    main()
