"""`local.offload_model`: the dense model leaves the device during each group's local step and
comes back unchanged; the run's results are the same bit for bit. And `sharding.HostCopy`, the
move itself, on a sharded mesh."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from fips_jax import config_base, pipeline, sharding, stages
from fips_jax.tasks import causal_lm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(**overrides):
    one = {"mesh.data": 1, "mesh.fsdp": 1, "mesh.tensor": 1, "fips.group_size": 2, "local.epochs": 2.0,
           "local.inputs": "student", "checkpoint_every": 4, "compare.methods": "", "data.eval.max_windows": 2,
           "data.calib.n_windows": 4}
    return config_base.load_config(os.path.join(ROOT, "configs", "tiny_llama.py"), {**one, **overrides})


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same run with the model resident and offloaded; the offloaded one records, at every
    local step, whether the model's arrays it was given are deleted."""
    out = {}
    for offload in (False, True, "disk"):
        wd = tmp_path_factory.mktemp(f"offload_{offload}")
        seen = {"deleted_at_step": []}
        calibrate = causal_lm.calibrate

        def calibrate_and_keep(run, arch, params, plan, dat, peers, seen=seen):
            seen["params"] = params
            return calibrate(run, arch, params, plan, dat, peers)

        def on_step(step, loss, seen=seen):
            if "params" in seen:
                seen["deleted_at_step"].append(all(x.is_deleted() for x in jax.tree_util.tree_leaves(seen["params"])))

        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(causal_lm, "calibrate", calibrate_and_keep)
            over = {"local.offload_model": bool(offload)}
            if offload == "disk":  # the model goes to files of the group's store
                over["local.store"] = "disk"
                host_copy = sharding.HostCopy

                def recording(trees, directory=None, seen=seen):
                    copy = host_copy(trees, directory)
                    seen.setdefault("files", []).append(
                        (directory, sum(os.path.getsize(os.path.join(directory, f)) for f in os.listdir(directory)),
                         copy.nbytes))
                    return copy

                mp.setattr(sharding, "HostCopy", recording)
            metrics = pipeline.run(_config(**over), str(wd), log=lambda m: None, on_step=on_step)
        out[offload] = dict(wd=wd, metrics=metrics, **seen)
    return out


@pytest.mark.parametrize("where", [True, "disk"], ids=["host", "disk"])
def test_offloaded_run_matches_the_resident_one_bit_for_bit(runs, where):
    a, b = runs[False], runs[where]
    for g in ("g00", "g01"):
        fa = stages.load_arrays(str(a["wd"] / "groups" / g / "final.npz"))
        fb = stages.load_arrays(str(b["wd"] / "groups" / g / "final.npz"))
        for x, y in zip(jax.tree_util.tree_leaves(fa), jax.tree_util.tree_leaves(fb)):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert a["metrics"]["evals"] == b["metrics"]["evals"]
    assert a["metrics"]["per_block"] == b["metrics"]["per_block"]


def test_the_model_is_off_the_device_during_local_steps_only(runs):
    for where in (True, "disk"):
        b = runs[where]
        assert b["deleted_at_step"] and all(b["deleted_at_step"]), (where, b["deleted_at_step"])
    # On disk: one folder per group in its store, holding every byte of the model while the
    # group trains, and gone with the group.
    files = runs["disk"]["files"]
    assert len(files) == 2 and all(size == held > 0 for _, size, held in files), files
    assert all(os.sep.join(("acts", "p0", "model")) in d and not os.path.exists(d) for d, _, _ in files), files
    # Resident: never deleted (the pipeline evaluated with the arrays it loaded).
    assert runs[False]["deleted_at_step"] and not any(runs[False]["deleted_at_step"])


def test_host_copy_restores_sharded_and_shared_leaves():
    mesh = jax.make_mesh((2, 4), ("a", "b"))
    x = jax.device_put(jnp.arange(64.0).reshape(8, 8), NamedSharding(mesh, P("a", "b")))
    y = jax.device_put(jnp.arange(6, dtype=jnp.bfloat16), NamedSharding(mesh, P()))
    trees = [{"x": x, "y": y, "n": 3}, [x]]
    copy = sharding.HostCopy(trees)
    assert x.is_deleted() and y.is_deleted()
    # Each distinct shard once: x's 8 blocks of 4 x 2 (256 bytes in all), y's one replica (12 bytes).
    assert copy.nbytes == 64 * 4 + 6 * 2
    first, second = copy.restore()
    assert first["x"] is second[0] and first["n"] == 3
    assert first["x"].sharding == x.sharding and first["y"].sharding == y.sharding
    assert first["y"].dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(first["x"]), np.arange(64.0).reshape(8, 8))
    np.testing.assert_array_equal(np.asarray(first["y"], np.float32), np.arange(6))


def test_host_copy_to_files_restores_sharded_and_shared_leaves(tmp_path):
    mesh = jax.make_mesh((2, 4), ("a", "b"))
    x = jax.device_put(jnp.arange(64.0).reshape(8, 8), NamedSharding(mesh, P("a", "b")))
    y = jax.device_put(jnp.arange(6, dtype=jnp.bfloat16), NamedSharding(mesh, P()))
    e = jax.device_put(jnp.zeros((0, 3)), NamedSharding(mesh, P()))
    directory = str(tmp_path / "model")
    copy = sharding.HostCopy([{"x": x, "y": y, "e": e}, [x]], directory=directory)
    assert x.is_deleted() and y.is_deleted()
    assert sum(os.path.getsize(os.path.join(directory, f)) for f in os.listdir(directory)) == copy.nbytes == 64 * 4 + 6 * 2
    first, second = copy.restore()
    assert not os.path.exists(directory)
    assert first["x"] is second[0] and first["x"].sharding == x.sharding and first["y"].dtype == jnp.bfloat16
    assert first["e"].shape == (0, 3)
    np.testing.assert_array_equal(np.asarray(first["x"]), np.arange(64.0).reshape(8, 8))
    np.testing.assert_array_equal(np.asarray(first["y"], np.float32), np.arange(6))


def test_consumed_init_is_freed_and_training_is_unchanged(tmp_path):
    from fips_jax import local_opt
    cfg = local_opt.LocalOptConfig(steps=3, lr=1e-2, algorithm="static", sparsity=0.5)
    rng = np.random.default_rng(0)
    p0 = {"u": jnp.asarray(rng.standard_normal((4, 3)), jnp.float32),
          "v": jnp.asarray(rng.standard_normal((1, 1, 3, 5)), jnp.float32)}
    x = jnp.asarray(rng.standard_normal((2, 4)), jnp.float32)

    def loss(p, step, x):
        del step
        return jnp.mean(jnp.square(x @ p["u"] @ p["v"][0, 0])), {}

    kept, _ = local_opt.train(p0, loss, (x,), cfg, str(tmp_path / "a"), log=lambda m: None)
    assert not p0["v"].is_deleted()
    given = {k: jnp.array(v) for k, v in p0.items()}
    used, _ = local_opt.train(given, loss, (x,), cfg, str(tmp_path / "b"), log=lambda m: None, consume=True)
    assert given["v"].is_deleted() and given["u"].is_deleted()
    for k in p0:
        np.testing.assert_array_equal(np.asarray(kept[k]), np.asarray(used[k]))
