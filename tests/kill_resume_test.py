"""SIGKILL the CLI at named points (checkpointing.fault_point) and rerun the same command: the
resumed run ends with the metrics of an uninterrupted one."""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# 20 steps a group, a checkpoint every 5, one device: a run takes seconds.
ARGS = ["--config=configs/tiny_llama.py", "--config.local.epochs=5.0", "--config.checkpoint_every=5",
        "--config.mesh.data=1", "--config.mesh.fsdp=1", "--config.mesh.tensor=1"]
# In order, each in a fresh process on the same workdir; every one must really kill it.
KILLS = [
    ("train_step:13", "inside group 0's loop, after step 13 of 20"),
    ("group_done:1", "between groups 0 and 1, group 0 resumed from its checkpoint first"),
    ("train_step:7", "inside group 1's loop, after step 7 of 20"),
    ("stage:2", "during evaluation (per-layer SVD computed, not saved)"),
    ("export_orbax", "during the Orbax export (params written, no manifest)"),
    ("export_sparse", "during the sparse safetensors export (file written, not renamed)"),
]


def _cli(workdir, cache, kill_at=None):
    # A persistent compilation cache shared by all the runs: compiling is most of a tiny run.
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=cache,
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1")
    env.pop("FIPS_JAX_KILL_AT", None)
    if kill_at:
        env["FIPS_JAX_KILL_AT"] = kill_at
    return subprocess.run([sys.executable, "-m", "fips_jax.main", *ARGS, f"--workdir={workdir}"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("jax_cache"))


@pytest.fixture(scope="module")
def reference(tmp_path_factory, cache):
    wd = str(tmp_path_factory.mktemp("uninterrupted"))
    proc = _cli(wd, cache)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.load(open(os.path.join(wd, "metrics.json")))


def _assert_close(got, want, where):
    if isinstance(want, dict):
        assert sorted(got) == sorted(want), where
        for k in want:
            _assert_close(got[k], want[k], f"{where}/{k}")
    elif isinstance(want, list):
        assert len(got) == len(want), where
        for i, (g, w) in enumerate(zip(got, want)):
            _assert_close(g, w, f"{where}[{i}]")
    elif isinstance(want, float):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-12, err_msg=where)
    else:
        assert got == want, where


def test_killed_anywhere_then_rerun_gives_the_uninterrupted_metrics(reference, cache, tmp_path):
    wd = str(tmp_path / "wd")
    for point, where in KILLS:
        proc = _cli(wd, cache, kill_at=point)
        print(f"killed at {point} ({where}): returncode {proc.returncode}")
        assert proc.returncode == -9, f"{point} ({where}) was not reached: rc {proc.returncode}\n{proc.stderr[-3000:]}"
        assert not os.path.exists(os.path.join(wd, "metrics.json")), point
        if point == "group_done:1":
            # Step 10's save is asynchronous: a kill soon after it may leave step 5 the newest.
            assert re.search(r"group 0: resumed at step (5|10)/20", proc.stdout), proc.stdout[-3000:]
        if point == "export_orbax":  # after stage:2: the saved eval is reused, the unsaved one redone
            assert "[eval_dense] done earlier" in proc.stdout and "[eval_per_layer_svd] ...\n" in proc.stdout
            assert not os.path.exists(os.path.join(wd, "compressed"))  # the model is not there, not half there
        if point == "export_sparse":
            assert os.path.exists(os.path.join(wd, "compressed", "manifest.json"))
            assert not os.path.exists(os.path.join(wd, "compressed.safetensors"))
    proc = _cli(wd, cache)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.load(open(os.path.join(wd, "metrics.json")))
    for key in ("evals", "per_block", "budget", "groups"):
        _assert_close(got[key], reference[key], key)
    _assert_close(got["export"]["sizes"], reference["export"]["sizes"], "export/sizes")
    # Nothing half-written is left beside the outputs.
    assert not [n for n in os.listdir(wd) if n.startswith((".tmp-", ".old-")) or n.endswith(".tmp")]
