"""Peak RSS of each process when the teacher's capture is split over processes.

Runs one `benchmarks/peak_rss.py` case through the real CLI (`python -m launch.run`) with 1
process and with P processes on this machine (jax.distributed over localhost, gloo collectives,
each process pinned to its own core when there are enough), and prints each process's peak
resident memory (the kernel's `ru_maxrss` of the finished child), the wall time and the final
FiPS held-out error, which must agree between the runs:

    python benchmarks/process_split_rss.py --case=llama_0.2b --processes=1,2 \
        --set=data.calib.n_windows=32,model.dtype=bfloat16

Every process holds its share of the calibration windows' hidden states and of each group's MLP
inputs and targets, and its devices' slices of the dense model (`mesh.fsdp` spans every process's
devices); what stays whole per process is the held-out stream, the minibatch buffers, the
runtime and what every process reads whole (the tokenizer, evaluation data, a finished group's
factors read back for evaluation and export). So the figure falls with P but not to 1/P.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import peak_rss  # noqa: E402  pylint: disable=wrong-import-position

GiB = 2**30


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def run(case: dict, overrides: dict, processes: int, out: str) -> dict:
    workdir = os.path.join(out, f"{case['name']}_p{processes}")
    shutil.rmtree(workdir, ignore_errors=True)
    args = [sys.executable, "-m", "launch.run", f"--config={case['config']}", f"--workdir={workdir}"]
    args += [f"--config.{k}={v}" for k, v in {**case["overrides"], **overrides}.items()]
    port, cores = _free_port(), os.cpu_count() or 1
    env = {k: v for k, v in os.environ.items()
           if k not in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "FIPS_DISTRIBUTED")}
    env.update(JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
    procs = []
    t0 = time.perf_counter()
    for i in range(processes):
        e = dict(env)
        if processes > 1:
            e.update(JAX_COORDINATOR_ADDRESS=f"localhost:{port}", JAX_NUM_PROCESSES=str(processes),
                     JAX_PROCESS_ID=str(i))
        cmd = (["taskset", "-c", str(i % cores)] if processes > 1 and processes <= cores and shutil.which("taskset")
               else []) + args
        log = open(os.path.join(out, f"{case['name']}_p{processes}.{i}.log"), "w")
        procs.append((subprocess.Popen(cmd, cwd=peak_rss.REPO, env=e, stdout=log, stderr=subprocess.STDOUT), log))
    print(f"$ {' '.join(args)}  ({processes} process{'es' if processes > 1 else ''})", flush=True)
    peaks, codes = [], []
    for p, log in procs:
        _, status, usage = os.wait4(p.pid, 0)
        log.close()
        codes.append(os.waitstatus_to_exitcode(status))
        peaks.append(usage.ru_maxrss * 1024)  # KiB on Linux
    wall = time.perf_counter() - t0
    res = {"processes": processes, "returncodes": codes, "peak_rss_gib": [b / GiB for b in peaks], "wall_s": wall}
    metrics = os.path.join(workdir, "metrics.json")
    if all(c == 0 for c in codes) and os.path.exists(metrics):
        with open(metrics) as f:
            m = json.load(f)
        err = m["per_block"].get("heldout_rel_error_fips_final", [])
        res["fips_final_heldout"] = sum(err) / max(len(err), 1)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--case", default="llama_0.2b", help=f"one of {', '.join(peak_rss.CASES)}")
    ap.add_argument("--processes", default="1,2", help="comma-separated process counts")
    ap.add_argument("--set", default="", help="extra overrides k=v,k=v (as peak_rss.py --set)")
    ap.add_argument("--out", default="/tmp/process_split_rss")
    args = ap.parse_args()
    if args.case not in peak_rss.CASES:
        ap.error(f"unknown case {args.case!r}; known: {list(peak_rss.CASES)}")
    overrides = dict(kv.split("=", 1) for kv in args.set.split(",") if kv)
    os.makedirs(args.out, exist_ok=True)
    rows = [run(peak_rss.CASES[args.case], overrides, int(p), args.out) for p in args.processes.split(",")]
    with open(os.path.join(args.out, "process_split_rss.json"), "w") as f:
        json.dump({"case": args.case, "overrides": overrides, "runs": rows}, f, indent=1)
    print("\n| processes | peak RSS per process (GiB) | max | wall s | FiPS final held-out error |")
    print("|---:|---|---:|---:|---:|")
    for r in rows:
        ok = all(c == 0 for c in r["returncodes"])
        print(f"| {r['processes']} | {', '.join(f'{g:.2f}' for g in r['peak_rss_gib'])} | "
              f"{max(r['peak_rss_gib']):.2f} | {r['wall_s']:.0f} | "
              f"{r['fips_final_heldout']:.4f} |" if ok else f"| {r['processes']} | failed: {r['returncodes']} | | | |")
    print(f"\nwrote {os.path.join(args.out, 'process_split_rss.json')}")


if __name__ == "__main__":
    main()
