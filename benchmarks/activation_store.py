"""Host memory (RSS) of a group's calibration activations held in memory vs on disk (`local.store`).

    python benchmarks/activation_store.py                  # 1.5 GiB store (x + y), bfloat16
    python benchmarks/activation_store.py --gib=2 --batch=2048 --dir=/tmp

Each mode runs in a fresh process (RSS of that process alone) and does what a group does with
its two largest arrays, the MLP inputs x and targets y [n_blocks, tokens, d]:

  write   fill them a chunk of tokens at a time (as `HiddenStream.advance` and `_Group._targets`
          do), through `calibration.ActivationStore` (memory: `np.empty`; disk: `.npy` files
          mapped with `open_memmap`, each chunk's pages released after it is written);
  gather  one epoch of training minibatches as `local_opt.HostBatches` takes them (random token
          positions; on disk read with `os.preadv`, nothing of the files mapped).

Printed per mode: VmRSS before, the peak during the writes and during the epoch (VmHWM after
resetting it through /proc/self/clear_refs, falling back to VmRSS sampled after every chunk),
the file size, and the time per minibatch: the host gather of x and y (`calibration.gather`,
what `HostBatches` calls: numpy fancy indexing in memory, one `os.preadv` per row on disk) and
their `device_put`. `disk` reads from a warm page cache (the data
was just written); `disk_cold` first writes the files back and drops them from the page cache
(`posix_fadvise(DONTNEED)`), so its gathers read the disk. Timings are this machine's and vary
with the load: figures to compare, not to assert.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
GiB, MiB = 2**30, 2**20
MODES = ("memory", "disk", "disk_cold")


def status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where that is not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def child(args) -> dict:
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax  # pylint: disable=import-outside-toplevel
    import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
    import numpy as np  # pylint: disable=import-outside-toplevel

    from fips_jax import calibration, local_opt  # pylint: disable=import-outside-toplevel

    dtype = np.dtype(jnp.dtype(args.dtype))
    per_token = args.n_blocks * args.d * dtype.itemsize
    tokens = int(args.gib * GiB / 2 / per_token) // args.batch * args.batch
    shape = (args.n_blocks, tokens, args.d)
    on_disk = args.mode != "memory"
    folder = tempfile.mkdtemp(prefix="acts-", dir=args.dir) if on_disk else None
    store = calibration.ActivationStore(folder) if on_disk else calibration.MEMORY
    rng = np.random.default_rng(0)
    chunk = rng.standard_normal((args.n_blocks, args.write_chunk, args.d), dtype=np.float32).astype(dtype)
    jax.device_put(np.zeros(4)).block_until_ready()  # the backend up before the baseline

    rss0 = status("VmRSS")
    hwm_ok = reset_peak()
    sampled = rss0
    t0 = time.perf_counter()
    arrays = [store.alloc(shape, dtype, name) for name in ("x", "y")]
    for a in arrays:
        for s in range(0, tokens, args.write_chunk):
            n = min(args.write_chunk, tokens - s)
            a[:, s:s + n] = chunk[:, :n]
            calibration.release(a[:, s:s + n])
            sampled = max(sampled, status("VmRSS"))
    write_s = time.perf_counter() - t0
    write_peak = max(sampled, status("VmHWM") if hwm_ok else 0)
    file_bytes = sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder)) if on_disk else 0

    if args.mode == "disk_cold":  # written back and out of the page cache: the gathers read the disk
        for name in os.listdir(folder):
            fd = os.open(os.path.join(folder, name), os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)

    rss1 = status("VmRSS")
    hwm_ok = reset_peak()
    sampled = rss1
    feed = local_opt.HostBatches(arrays, jax.random.PRNGKey(0), args.batch)
    steps = tokens // args.batch
    times, put_times = [], []
    for step in range(steps):  # what `feed(step)` does, its host gather and device_put timed apart
        idx = feed.indices(step)
        t = time.perf_counter()
        mbs = [calibration.gather(a, idx) for a in arrays]
        t1 = time.perf_counter()
        jax.block_until_ready([jax.device_put(mb) for mb in mbs])
        times.append(t1 - t)
        put_times.append(time.perf_counter() - t1)
        sampled = max(sampled, status("VmRSS"))
        del mbs
    gather_peak = max(sampled, status("VmHWM") if hwm_ok else 0)
    rss_end = status("VmRSS")
    del arrays, feed
    store.clear()
    times.sort()
    return {"mode": args.mode, "shape": list(shape), "dtype": str(dtype),
            "store_bytes": 2 * int(np.prod(shape)) * dtype.itemsize,
            "file_bytes": file_bytes, "rss_before": rss0, "write_peak": write_peak, "write_s": write_s,
            "rss_after_write": rss1, "gather_peak": gather_peak, "rss_after_epoch": rss_end,
            "steps": steps, "batch": args.batch, "gather_ms_median": 1e3 * times[len(times) // 2],
            "gather_ms_mean": 1e3 * sum(times) / len(times), "put_ms_mean": 1e3 * sum(put_times) / len(put_times),
            "peak_from_vmhwm": hwm_ok}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gib", type=float, default=1.5, help="size of x + y together")
    ap.add_argument("--n_blocks", type=int, default=8)
    ap.add_argument("--d", type=int, default=4096)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--batch", type=int, default=1024, help="tokens per minibatch gather")
    ap.add_argument("--write_chunk", type=int, default=512, help="tokens per write")
    ap.add_argument("--dir", default=None, help="where the disk files go (default: the temp folder)")
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--mode", help=argparse.SUPPRESS)  # one mode, in this process (the parent's child)
    args = ap.parse_args()
    if args.mode:
        print(json.dumps(child(args)))
        return
    results = []
    for mode in args.modes.split(","):
        cmd = [sys.executable, os.path.abspath(__file__), f"--mode={mode}"] + [
            a for a in sys.argv[1:] if not a.startswith("--modes")]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=REPO).stdout
        results.append(json.loads(out.strip().splitlines()[-1]))
    r0 = results[0]
    print(f"x and y [{', '.join(map(str, r0['shape']))}] {r0['dtype']}: {r0['store_bytes'] / GiB:.2f} GiB together; "
          f"minibatch {r0['batch']} tokens, {r0['steps']} gathers (one epoch)")
    print("| mode | RSS before MiB | peak in writes MiB | peak in epoch MiB | RSS after epoch MiB | file MiB "
          "| write s | gather x+y ms (median / mean) | device_put ms (mean) |")
    print("|---|---:|---:|---:|---:|---:|---:|---|---:|")
    for r in results:
        print(f"| {r['mode']} | {r['rss_before'] / MiB:.0f} | {r['write_peak'] / MiB:.0f} "
              f"| {r['gather_peak'] / MiB:.0f} "
              f"| {r['rss_after_epoch'] / MiB:.0f} | {r['file_bytes'] / MiB:.0f} | {r['write_s']:.2f} "
              f"| {r['gather_ms_median']:.1f} / {r['gather_ms_mean']:.1f} | {r['put_ms_mean']:.1f} |")
    for r in results:
        above = max(r["write_peak"], r["gather_peak"]) - r["rss_before"]
        print(f"- {r['mode']}: peak RSS above the start {above / MiB:.0f} "
              f"MiB for {r['store_bytes'] / MiB:.0f} MiB of activations"
              + ("" if r["peak_from_vmhwm"] else " (peaks sampled after each chunk: VmHWM could not be reset)"))


if __name__ == "__main__":
    main()
