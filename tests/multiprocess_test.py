"""Two processes (jax.distributed on CPU, gloo collectives) calibrate the tiny Llama together:
each captures half of the calibration windows, and the run ends with what one process holding
every window computes on the same four devices. A two-process run killed between groups resumes
on one process."""

import json
import os
import re
import socket
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Most of what a group touches: activations in files, student inputs, the whitened basis with
# OBS, a closed-form peer, and global fine-tuning over every group.
ARGS = ["--config=configs/tiny_llama.py", "--config.local.store=disk", "--config.local.inputs=student",
        "--config.fips.init=whitened", "--config.fips.prune=obs", "--config.compare.methods=per_layer_svd,svd_llm",
        "--config.finetune.enabled=True", "--config.finetune.batch=4", "--config.checkpoint_every=5"]
DEVICES = 4  # one process with 4 devices, or two processes with 2 each: the same mesh shape


def _env(cache, n_local, kill_at=None, **extra):
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={n_local}",
               JAX_COMPILATION_CACHE_DIR=cache, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1")
    env.pop("FIPS_JAX_KILL_AT", None)
    for k in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "FIPS_DISTRIBUTED"):
        env.pop(k, None)
    env.update(extra)
    if kill_at:
        env["FIPS_JAX_KILL_AT"] = kill_at
    return env


def _one_process(workdir, cache):
    return subprocess.run([sys.executable, "-m", "launch.run", *ARGS, f"--workdir={workdir}"], cwd=ROOT,
                          env=_env(cache, DEVICES), capture_output=True, text=True, timeout=900)


def _free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _two_processes(workdir, cache, kill_at=None):
    """Both processes' (returncode, stdout + stderr)."""
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, "-m", "launch.run", *ARGS, f"--workdir={workdir}"], cwd=ROOT,
                              env=_env(cache, DEVICES // 2, kill_at, JAX_COORDINATOR_ADDRESS=f"localhost:{port}",
                                       JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(i)),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    out = []
    for p in procs:
        try:
            text, _ = p.communicate(timeout=900)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        out.append((p.returncode, text))
    return out


def _factors(workdir):
    groups = sorted(os.listdir(os.path.join(workdir, "groups")))
    out = {}
    for g in groups:
        with np.load(os.path.join(workdir, "groups", g, "final.npz")) as z:
            out.update({f"{g}/{k}": z[k] for k in z.files})
    with np.load(os.path.join(workdir, "finetune", "final.npz")) as z:
        out.update({f"finetune/{k}": z[k] for k in z.files})
    return out


def _assert_same_run(got_dir, want_dir):
    got, want = _factors(got_dir), _factors(want_dir)
    assert sorted(got) == sorted(want)
    for k in want:
        # float32 sums over the same tokens in another order (per-process chunks): rounding only.
        np.testing.assert_allclose(got[k], want[k], rtol=1e-4, atol=1e-5, err_msg=k)
    m_got = json.load(open(os.path.join(got_dir, "metrics.json")))
    m_want = json.load(open(os.path.join(want_dir, "metrics.json")))
    assert m_got["budget"] == m_want["budget"]
    assert sorted(m_got["evals"]) == sorted(m_want["evals"])
    for model in m_want["evals"]:
        np.testing.assert_allclose(m_got["evals"][model]["nll"], m_want["evals"][model]["nll"], rtol=1e-4,
                                   err_msg=model)
    for key, values in m_want["per_block"].items():
        np.testing.assert_allclose(m_got["per_block"][key], values, rtol=1e-3, atol=1e-6, err_msg=key)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("jax_cache"))


@pytest.fixture(scope="module")
def reference(tmp_path_factory, cache):
    wd = str(tmp_path_factory.mktemp("one_process"))
    proc = _one_process(wd, cache)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "captured by this process" not in proc.stdout + proc.stderr  # one process: every window
    return wd


def test_two_processes_split_the_capture_and_compute_what_one_does(reference, cache, tmp_path):
    wd = str(tmp_path / "two")
    (rc0, log0), (rc1, log1) = _two_processes(wd, cache)
    assert rc0 == 0 and rc1 == 0, (log0[-3000:], log1[-3000:])
    # Each process captured its own half of the 8 calibration windows, in process order.
    assert re.search(r"calibration windows 0-3 of 8 captured by this process \(2 processes\)", log0), log0[-2000:]
    assert re.search(r"calibration windows 4-7 of 8 captured by this process \(2 processes\)", log1), log1[-2000:]
    assert "process 1/2" in log1 and "2 local of 4 devices" in log1
    assert len(json.load(open(os.path.join(wd, "metrics.json")))["versions"]["devices"]) == DEVICES
    _assert_same_run(wd, reference)
    # The exports of the two-process run read back like any other.
    assert os.path.exists(os.path.join(wd, "compressed", "manifest.json"))
    assert os.path.getsize(os.path.join(wd, "compressed.safetensors")) > 0


def test_a_two_process_run_killed_between_groups_resumes_on_one_process(reference, cache, tmp_path):
    wd = str(tmp_path / "killed")
    outs = _two_processes(wd, cache, kill_at="group_done:1")
    assert all(rc != 0 for rc, _ in outs), "the kill point must stop both processes"
    assert os.path.exists(os.path.join(wd, "groups", "g00", "stats.json"))
    assert not os.path.exists(os.path.join(wd, "groups", "g01", "stats.json"))
    proc = _one_process(wd, cache)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resuming at group 1" in proc.stdout + proc.stderr
    _assert_same_run(wd, reference)
