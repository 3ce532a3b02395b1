"""`local.store=disk`: a group's activations as files mapped and read a slice at a time, the same
numbers as in memory, gone when the group is done, and their pages released after each read."""

import os
import types

import jax
import numpy as np
import pytest

from fips_jax import calibration, checkpointing, config_base, local_opt, pipeline, stages

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MiB = 2**20
QUIET = lambda m: None  # noqa: E731


def _config(**overrides):
    one = {"mesh.data": 1, "mesh.fsdp": 1, "mesh.tensor": 1, "fips.group_size": 2, "local.epochs": 2.0,
           "checkpoint_every": 4}
    return config_base.load_config(os.path.join(ROOT, "configs", "tiny_llama.py"), {**one, **overrides})


SETTINGS = {"teacher": {"local.inputs": "teacher"},
            "student": {"local.inputs": "student", "local.drift": 1.0}}


def _acts_files(workdir) -> list[str]:
    out = []
    for dirpath, _, files in os.walk(workdir):
        if "acts" in dirpath.split(os.sep):
            out += [os.path.relpath(os.path.join(dirpath, f), workdir) for f in files]
    return sorted(out)


def _acts_dirs(workdir) -> list[str]:
    return sorted(os.path.relpath(os.path.join(d, n), workdir) for d, names, _ in os.walk(workdir)
                  for n in names if n == "acts")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{(inputs, store): (workdir, metrics, files seen in acts/ at each step)}."""
    out = {}
    for inputs, over in SETTINGS.items():
        for store in ("memory", "disk"):
            wd = tmp_path_factory.mktemp(f"{inputs}_{store}")
            seen = []
            metrics = pipeline.run(_config(**over, **{"local.store": store}), str(wd), log=QUIET,
                                   on_step=lambda step, loss, wd=wd, seen=seen: seen.append(_acts_files(wd)))
            out[inputs, store] = (wd, metrics, seen)
    return out


def _finals(workdir) -> dict:
    gdirs = sorted(n for n in os.listdir(os.path.join(workdir, "groups")) if n.startswith("g"))
    return {g: stages.load_arrays(os.path.join(workdir, "groups", g, "final.npz")) for g in gdirs}


def _without_timings(metrics: dict) -> dict:
    def strip(v):
        if isinstance(v, dict):
            return {k: strip(x) for k, x in v.items() if k != "seconds"}
        if isinstance(v, list):
            return [strip(x) for x in v]
        return v

    return strip(metrics)


@pytest.mark.parametrize("inputs", list(SETTINGS))
def test_disk_store_gives_the_same_factors_and_metrics_bit_for_bit(runs, inputs):
    wd_mem, m_mem, _ = runs[inputs, "memory"]
    wd_disk, m_disk, _ = runs[inputs, "disk"]
    a, b = _finals(wd_mem), _finals(wd_disk)
    assert sorted(a) == sorted(b) == ["g00", "g01"]
    for g in a:
        for k in ("u", "v"):
            np.testing.assert_array_equal(np.asarray(a[g][k]), np.asarray(b[g][k]), err_msg=f"{g}/{k}")
    assert set(m_mem["evals"]) == {"dense", "per_layer_svd", "fips_init", "fips_final"}
    assert m_mem["evals"] == m_disk["evals"]
    assert _without_timings(m_mem["groups_stats"]) == _without_timings(m_disk["groups_stats"])
    assert "seconds" in m_mem["groups_stats"][0]  # the only key left out


@pytest.mark.parametrize("inputs", list(SETTINGS))
def test_activation_files_exist_during_their_group_and_are_gone_after(runs, inputs):
    wd, _, seen = runs[inputs, "disk"]
    names = {"x.npy", "y.npy"} | ({"fips_x.npy", "fips_y.npy"} if inputs == "student" else set())
    assert seen, "no training step ran"
    for g in ("g00", "g01"):
        during = [files for files in seen if any(f.startswith(os.path.join("groups", g)) for f in files)]
        assert during, f"{g}: no activation files seen during its steps"
        for files in during:
            # Only this group's arrays, and the block outputs (drift) already folded into the targets.
            assert {os.path.basename(f) for f in files} == names, files
            assert all(f.startswith(os.path.join("groups", g, "acts", "p0")) for f in files), files
    assert _acts_files(wd) == [] and _acts_dirs(wd) == []
    # The memory store writes nothing.
    assert all(files == [] for files in runs[inputs, "memory"][2])


def _mapping_rss(path: str) -> int:
    """Resident bytes of this process's mappings of `path` (/proc/self/smaps Rss)."""
    total, inside = 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()
            if head and "-" in head[0] and len(head) >= 5 and ":" in head[3]:  # a mapping's header line
                inside = len(head) >= 6 and head[5] == path
            elif inside and line.startswith("Rss:"):
                total += int(head[1]) * 1024
    return total


@pytest.mark.skipif(not os.path.exists("/proc/self/smaps"), reason="needs Linux /proc")
def test_release_drops_the_resident_pages_of_the_mapping(tmp_path):
    store = calibration.ActivationStore(str(tmp_path / "acts"))
    n, t, d = 2, 8192, 1024  # 64 MiB of float32
    a = store.alloc((n, t, d), np.float32, "x")
    path = os.path.realpath(str(tmp_path / "acts" / "x.npy"))
    assert os.path.getsize(path) >= n * t * d * 4
    rng = np.random.default_rng(0)
    want = rng.standard_normal((n, t, d), dtype=np.float32)
    a[:] = want  # every page touched, none released
    assert _mapping_rss(path) > 48 * MiB
    calibration.release(np.asarray(a))  # through a plain ndarray view of the memmap
    assert _mapping_rss(path) < 4 * MiB
    # Written a chunk at a time with a release after each: never more than a few chunks resident.
    b = store.alloc((n, t, d), np.float32, "y")
    path_b = os.path.realpath(str(tmp_path / "acts" / "y.npy"))
    peak = 0
    for s in range(0, t, 512):
        b[:, s:s + 512] = want[:, s:s + 512]
        calibration.release(b[:, s:s + 512])
        peak = max(peak, _mapping_rss(path_b))
    assert peak < 8 * MiB
    # Slices read through the mapping, then released.
    np.testing.assert_array_equal(a[:, 100:1000], want[:, 100:1000])
    assert _mapping_rss(path) > 4 * MiB
    calibration.release(a[:, 100:1000])
    assert _mapping_rss(path) < 4 * MiB
    # An epoch of random minibatch gathers: the data comes back exactly, no page of the files is
    # mapped (rows are read with preadv), also from views of blocks.
    feed = local_opt.HostBatches((a, np.asarray(b)[1:]), jax.random.PRNGKey(7), 256)
    peak = 0
    for step in range(t // 256):
        xb, yb = feed(step)
        idx = feed.indices(step)
        np.testing.assert_array_equal(np.asarray(xb), want[:, idx])
        np.testing.assert_array_equal(np.asarray(yb), want[1:, idx])
        peak = max(peak, _mapping_rss(path) + _mapping_rss(path_b))
    assert peak < 16 * MiB, peak / MiB  # the two files are 128 MiB
    del a, b, feed
    store.clear()
    assert not os.path.exists(tmp_path / "acts")


def test_memory_store_and_release_of_plain_arrays():
    a = calibration.MEMORY.alloc((2, 3, 4), np.float32, "x")
    assert type(a) is np.ndarray and a.shape == (2, 3, 4)
    a[:] = np.arange(24).reshape(2, 3, 4)
    calibration.release(a[:, 1:])  # nothing to release: no error
    np.testing.assert_array_equal(calibration.gather(a, np.array([2, 0])), a[:, [2, 0]])
    calibration.MEMORY.clear()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_gather_of_a_file_reads_the_same_rows(tmp_path, dtype):
    store = calibration.ActivationStore(str(tmp_path))
    dt = np.dtype(jax.numpy.dtype(dtype))
    a = store.alloc((3, 50, 2, 5), dt, "x")
    want = np.random.default_rng(1).standard_normal(a.shape).astype(dt)
    a[:] = want
    idx = np.array([49, 0, 7, 7, 31])
    for view, ref in ((a, want), (np.asarray(a)[1:], want[1:]), (a[2:3], want[2:3])):
        got = calibration.gather(view, idx)
        assert got.flags.c_contiguous and got.dtype == dt
        np.testing.assert_array_equal(got, ref[:, idx])
    # Its file gone with the mapping still open: read through the mapping.
    store.clear()
    np.testing.assert_array_equal(calibration.gather(a, idx), want[:, idx])


def test_a_new_store_overwrites_stale_files(tmp_path):
    folder = tmp_path / "acts" / "p0"
    os.makedirs(folder)
    (folder / "x.npy").write_bytes(b"left by a killed run")
    (folder / "x_out.npy").write_bytes(b"left by a killed run")
    store = calibration.ActivationStore(str(folder))
    assert os.listdir(folder) == []
    a = store.alloc((1, 4, 2), np.float32, "x")
    a[:] = 1.0
    assert np.load(str(folder / "x.npy")).sum() == 8.0


def test_interrupted_disk_run_resumes_past_its_stale_files(runs, tmp_path):
    """Killed mid-group 1 with local.store=disk, its files left behind: the resumed run overwrites
    them, deletes them with the group and ends with the factors of the straight run."""
    straight = runs["teacher", "disk"][0]
    calls = []

    class Stop(Exception):
        pass

    def boom(step, loss):
        calls.append(step)
        if len(calls) == 11:  # 8 steps a group: in group 1's loop
            raise Stop()

    wd, cfg = str(tmp_path / "killed"), _config(**{"local.store": "disk"})
    with pytest.raises(Stop):
        pipeline.run(cfg, wd, log=QUIET, on_step=boom)
    assert _acts_files(wd) == [os.path.join("groups", "g01", "acts", "p0", f) for f in ("x.npy", "y.npy")]
    logs = []
    pipeline.run(cfg, wd, log=logs.append)
    assert any("groups 0-0 done earlier" in line for line in logs), logs
    assert _acts_dirs(wd) == []
    a, b = _finals(straight), _finals(wd)
    for g in a:
        for k in ("u", "v"):
            np.testing.assert_array_equal(np.asarray(a[g][k]), np.asarray(b[g][k]), err_msg=f"{g}/{k}")


def test_memory_run_removes_the_files_of_an_interrupted_disk_attempt(tmp_path):
    """The key is resume-safe; a group run with local.store=memory deletes the acts/ folder an
    interrupted disk attempt of it left."""
    from fips_jax.tasks import causal_lm  # pylint: disable=import-outside-toplevel

    stale = tmp_path / "groups" / "g01" / "acts" / "p0"
    os.makedirs(stale)
    (stale / "x.npy").write_bytes(b"stale")
    run = types.SimpleNamespace(cfg={"local": {"store": "memory"}}, path=lambda *p: os.path.join(tmp_path, *p))
    assert causal_lm._group_store(run, "groups/g01") is calibration.MEMORY  # pylint: disable=protected-access
    assert not os.path.exists(tmp_path / "groups" / "g01" / "acts")
    run.cfg["local"]["store"] = "disk"
    store = causal_lm._group_store(run, "groups/g01")  # pylint: disable=protected-access
    assert store.directory == os.path.join(tmp_path, "groups/g01", "acts", "p0") and os.listdir(store.directory) == []


def test_store_is_resume_safe(tmp_path):
    checkpointing.check_config(str(tmp_path), _config(**{"local.store": "memory"}), ignore=pipeline.RESUME_SAFE_KEYS)
    checkpointing.check_config(str(tmp_path), _config(**{"local.store": "disk"}), ignore=pipeline.RESUME_SAFE_KEYS)
    with pytest.raises(ValueError, match="local.epochs"):  # other keys still refused
        checkpointing.check_config(str(tmp_path), _config(**{"local.epochs": 3.0}), ignore=pipeline.RESUME_SAFE_KEYS)


def test_unknown_store_is_refused_with_the_allowed_values(tmp_path):
    with pytest.raises(ValueError, match=r"local.store 'ssd' not in \('memory', 'disk'\)"):
        pipeline.run(_config(**{"local.store": "ssd"}), str(tmp_path / "w"), log=QUIET)
    assert not os.path.exists(tmp_path / "w")  # refused before anything is written
