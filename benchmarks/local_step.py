"""Throughput of the jitted local-optimisation step for a DeiT-B-sized group.

    python benchmarks/local_step.py [--blocks 4 --tokens 25216 --steps 10 --budget 0.5]

Group: d 768, p 3072, 4 blocks, 2 FCs (GELU MLP), 128 x 197 tokens per block, GMP at 75%.
Prints steps/s and achieved GFLOP/s (counted analytically, see `step_flops`) next to the
machine's dense float32 matmul GFLOP/s measured on the same device. No assertion: a figure.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from fips_jax import budget, local_opt, svd_init
from fips_jax.models import base


def step_flops(n: int, d: int, p: int, r: int, t: int) -> float:
    """Matmul flops of one step of the 2-FC group loss (forward + backward).

    Materialising W = U V per FC costs 2 d r p forward and twice that backward (dU and dV).
    Per block, fc1 costs 2 T d p forward + 2 T d p for its weight gradient; fc2 the same plus
    2 T d p for the input gradient that reaches fc1.
    """
    materialise = 3 * n * 2 * (2 * d * r * p)
    tokens = n * 10 * t * d * p
    return float(materialise + tokens)


def matmul_gflops(size: int, reps: int = 10) -> float:
    """Dense float32 matmul throughput at JAX's default precision (TF32 on recent GPUs),
    `reps` chained products inside one jitted loop so dispatch does not count."""
    a = jax.random.normal(jax.random.PRNGKey(0), (size, size), jnp.float32) / np.sqrt(size)
    f = jax.jit(lambda x: jax.lax.fori_loop(0, reps, lambda i, y: (y @ a) * 0.5, x))
    f(a).block_until_ready()
    t0 = time.perf_counter()
    f(a).block_until_ready()
    return reps * 2 * size**3 / (time.perf_counter() - t0) / 1e9


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--d", type=int, default=768)
    ap.add_argument("--p", type=int, default=3072)
    ap.add_argument("--blocks", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=128 * 197)
    ap.add_argument("--budget", type=float, default=0.5)
    ap.add_argument("--steps", type=int, default=10)
    args = ap.parse_args()
    d, p, n, t = args.d, args.p, args.blocks, args.tokens
    r = budget.rank_for_budget(d, p, n, 2, args.budget, 0.75)
    spec = base.VIT_MLP
    key = jax.random.split(jax.random.PRNGKey(0), 4)
    w = jax.random.normal(key[0], (d, n * 2 * p), jnp.float32) / np.sqrt(d)
    fac = jax.jit(svd_init.init_group, static_argnames=("rank", "n_blocks", "n_fcs", "tau"))(
        w, rank=r, n_blocks=n, n_fcs=2)
    params = {"u": fac.u, "v": fac.v, "bias": {"fc1": jnp.zeros((n, p)), "fc2": jnp.zeros((n, d))}}
    x = jax.random.normal(key[1], (n, t, d), jnp.float32)
    y = jax.random.normal(key[2], (n, t, d), jnp.float32)
    cfg = local_opt.LocalOptConfig(steps=1000, update_freq=50)
    tx, updater = local_opt.make_optimizer(cfg)
    opt_state = tx.init(params)

    def loss_fn(prm, step, x, y):
        return local_opt.mlp_group_loss(prm, spec, x, y)

    step = jax.jit(local_opt.make_step(loss_fn, tx, updater), donate_argnums=(0, 1))
    t0 = time.perf_counter()
    params, opt_state, loss, _ = step(params, opt_state, jnp.int32(0), x, y)
    loss.block_until_ready()
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for i in range(1, args.steps + 1):
        params, opt_state, loss, _ = step(params, opt_state, jnp.int32(i), x, y)
    loss.block_until_ready()
    dt = (time.perf_counter() - t0) / args.steps
    flops = step_flops(n, d, p, r, t)
    print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()})")
    print(f"group: d {d}, p {p}, blocks {n}, FCs 2, rank {r}, tokens/block {t}")
    print(f"first step (compile + run): {compile_s:.1f}s")
    print(f"step: {dt * 1e3:.1f} ms  ->  {1 / dt:.2f} steps/s, {flops / dt / 1e9:.1f} GFLOP/s "
          f"({flops / 1e9:.0f} GFLOP/step)")
    size = 8192 if jax.default_backend() == "gpu" else 2048
    print(f"dense float32 {size}^3 matmul on this device: {matmul_gflops(size):.1f} GFLOP/s")


if __name__ == "__main__":
    main()
