"""Artefacts appear whole or not at all: HF folders, the compressed model, durable small files,
and a foreign --workdir is never written into."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from fips_jax import checkpointing, config_base, export, pipeline
from fips_jax.methods import fips
from fips_jax.hf import safetensors_io

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tensors(scale):
    return [(f"layer{i}.weight", np.full((64, 64), scale * (i + 1), np.float32)) for i in range(4)]


def _snapshot(folder):
    """{relative path: bytes} of every file under `folder`."""
    out = {}
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, folder)] = f.read()
    return out


def _old_checkpoint(tmp_path):
    """A sharded checkpoint (4 shards of 16 KiB + index) with a tokenizer file beside it."""
    out = tmp_path / "ckpt"
    safetensors_io.save_checkpoint(str(out), _tensors(1.0), max_shard_bytes=20_000)
    (out / "tokenizer.json").write_text('{"vocab": 1}')
    return out


def test_save_checkpoint_failing_midway_leaves_the_old_files(tmp_path, monkeypatch):
    out = _old_checkpoint(tmp_path)
    before = _snapshot(out)
    original, calls = safetensors_io.write_file, []

    def failing(path, tensors, metadata=None):
        calls.append(path)
        if len(calls) == 2:
            raise OSError("disk full")
        original(path, tensors, metadata)

    monkeypatch.setattr(safetensors_io, "write_file", failing)
    with pytest.raises(OSError, match="disk full"):
        safetensors_io.save_checkpoint(str(out), _tensors(2.0), max_shard_bytes=20_000)
    assert _snapshot(out) == before
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]  # no temp folder left behind

    # Replaced whole: the new layout (one file) and no stale shard; the tokenizer is carried over.
    monkeypatch.setattr(safetensors_io, "write_file", original)
    files = safetensors_io.save_checkpoint(str(out), _tensors(2.0), extra_files={"config.json": b"{}"})
    assert files == [safetensors_io.SINGLE_FILE, "config.json"]
    assert sorted(os.listdir(out)) == ["config.json", safetensors_io.SINGLE_FILE, "tokenizer.json"]
    assert (out / "tokenizer.json").read_text() == '{"vocab": 1}'
    assert safetensors_io.SafetensorsReader(str(out)).get("layer3.weight")[0, 0] == 8.0
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]


def test_save_checkpoint_killed_between_shards_leaves_the_old_files(tmp_path):
    out = _old_checkpoint(tmp_path)
    before = _snapshot(out)
    script = ("import sys, numpy as np; from fips_jax.hf import safetensors_io as s; "
              "t = [(f'layer{i}.weight', np.full((64, 64), 2.0 * (i + 1), np.float32)) for i in range(4)]; "
              "s.save_checkpoint(sys.argv[1], t, max_shard_bytes=20_000)")
    env = dict(os.environ, JAX_PLATFORMS="cpu", FIPS_JAX_KILL_AT="safetensors_shard:2")
    proc = subprocess.run([sys.executable, "-c", script, str(out)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert _snapshot(out) == before  # the old set, whole; the two new shards sit in a temp folder
    assert any(n.startswith(".tmp-ckpt-") for n in os.listdir(tmp_path))
    env.pop("FIPS_JAX_KILL_AT")
    proc = subprocess.run([sys.executable, "-c", script, str(out)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]  # the killed attempt's leftovers are gone
    reader = safetensors_io.SafetensorsReader(str(out))
    assert [reader.get(f"layer{i}.weight")[0, 0] for i in range(4)] == [2.0, 4.0, 6.0, 8.0]
    assert (out / "tokenizer.json").read_text() == '{"vocab": 1}'


def test_export_failing_midway_keeps_the_previous_model(tmp_path, monkeypatch):
    cfg = config_base.load_config(os.path.join(ROOT, "configs", "tiny_llama.py"), {})
    from fips_jax.models import registry
    arch, params, _ = registry.load_model(cfg["model"], seed=0)
    plan = pipeline.plan_groups(cfg, arch, params)
    groups = [fips.group_init(arch.mlp_spec, layout, rank, params, cfg["fips"]["tau"]) for layout, rank in plan]
    target = str(tmp_path / "compressed")
    export.save(target, arch, params, plan, groups, manifest={"run": 1})
    before = _snapshot(target)

    def fault(name):
        if name == "export_orbax":
            raise KeyboardInterrupt  # as if stopped after the params were written, before the manifest

    monkeypatch.setattr(checkpointing, "fault_point", fault)
    with pytest.raises(KeyboardInterrupt):
        export.save(target, arch, params, plan, groups, manifest={"run": 2})
    assert _snapshot(target) == before
    assert sorted(os.listdir(tmp_path)) == ["compressed"]
    monkeypatch.undo()
    export.save(target, arch, params, plan, groups, manifest={"run": 2})
    assert export.load(target)[2]["run"] == 2
    assert sorted(os.listdir(tmp_path)) == ["compressed"]


def test_small_files_are_fsynced_with_their_directory(tmp_path, monkeypatch):
    synced = []
    original = os.fsync

    def spy(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        original(fd)

    monkeypatch.setattr(os, "fsync", spy)
    checkpointing.save_arrays(str(tmp_path / "a.npz"), {"x": np.ones(3)})
    checkpointing.write_json(str(tmp_path / "b.json"), {"y": 1})
    files = [os.path.basename(p) for p in synced]
    # Each file under its temp name, then the directory after the rename.
    assert files[0].startswith(".tmp-") and files[0].endswith(".npz") and synced[1] == str(tmp_path)
    assert files[2].startswith(".tmp-") and synced[3] == str(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["a.npz", "b.json"]


def test_foreign_nonempty_workdir_is_refused_and_untouched(tmp_path):
    wd = tmp_path / "photos"
    wd.mkdir()
    (wd / "holiday.jpg").write_bytes(b"\xff\xd8 not a run")
    before = _snapshot(wd)
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-m", "fips_jax.main", "--config=configs/tiny_llama.py", f"--workdir={wd}"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: workdir ") and str(wd) in lines[0], proc.stderr[-2000:]
    assert "not a fips_jax run" in lines[0] and "holiday.jpg" in lines[0]
    assert _snapshot(wd) == before and sorted(os.listdir(wd)) == ["holiday.jpg"]


def test_empty_workdir_and_own_workdir_are_accepted(tmp_path):
    cfg = {"a": 1}
    checkpointing.check_config(str(tmp_path), cfg)  # empty: a new run
    assert json.load(open(tmp_path / "config.json")) == cfg
    (tmp_path / "stages").mkdir()
    checkpointing.check_config(str(tmp_path), cfg)  # its own: a resume
    other = tmp_path / "other"
    other.mkdir()
    checkpointing.check_config(str(other), cfg, write=False)  # a process other than 0 writes nothing
    assert os.listdir(other) == []
