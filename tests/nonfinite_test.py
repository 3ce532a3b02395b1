"""Non-finite values never get saved: the local loop stops at the first NaN/inf step before
checkpointing it, and neither export writes a tree holding one."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fips_jax import checkpointing, config_base, export, export_sparse, local_opt, pipeline
from fips_jax.methods import fips
from fips_jax.models import registry

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _toy(poison):
    """A 20-step sparse run whose loss (or also its gradient) is NaN at step index 12."""
    rng = np.random.default_rng(0)
    params = {"u": jnp.asarray(rng.standard_normal((8, 4)), jnp.float32),
              "v": jnp.asarray(rng.standard_normal((1, 1, 4, 6)), jnp.float32)}
    x = jnp.asarray(rng.standard_normal((32, 8)), jnp.float32)

    def loss_fn(p, step, x):
        loss = jnp.mean(jnp.square(x @ p["u"] @ p["v"][0, 0] - 1.0))
        if poison == "loss":  # where() keeps the gradient finite: only the loss is NaN
            loss = jnp.where(step == 12, jnp.nan, loss)
        else:  # NaN through the product: loss, gradients and the updated params
            loss = loss * jnp.where(step == 12, jnp.nan, 1.0)
        return loss, loss

    cfg = local_opt.LocalOptConfig(steps=20, lr=1e-2, algorithm="gmp", sparsity=0.5, update_freq=2)
    return params, loss_fn, (x,), cfg


@pytest.mark.parametrize("poison,parts", [("loss", "loss"), ("grad", "loss, gradient, params after the update")])
def test_first_nonfinite_step_stops_the_loop_before_it_is_saved(tmp_path, poison, parts):
    params, loss_fn, consts, cfg = _toy(poison)
    ckpt_dir = str(tmp_path / "loop")
    with pytest.raises(local_opt.NonFiniteError) as e:
        local_opt.train(params, loss_fn, consts, cfg, ckpt_dir, checkpoint_every=5, log=lambda m: None, name="group 1")
    msg = str(e.value)
    assert isinstance(e.value, ValueError) and "\n" not in msg
    assert msg.startswith(f"group 1: non-finite {parts} at step 13/20")
    assert "last good checkpoint is step 10" in msg and ckpt_dir in msg
    ckpt = checkpointing.LoopCheckpointer(ckpt_dir)
    assert ckpt.latest_step() == 10 < 12
    # Restored raw (saved shapes), every leaf of the newest checkpoint is finite.
    saved = ckpt.manager.restore(10)
    leaves = jax.tree_util.tree_leaves(saved)
    assert leaves and all(np.all(np.isfinite(np.asarray(x))) for x in leaves if np.issubdtype(np.asarray(x).dtype, np.inexact))
    ckpt.close()


def test_nonfinite_before_the_first_checkpoint_says_a_rerun_starts_over(tmp_path):
    params, loss_fn, consts, cfg = _toy("loss")
    with pytest.raises(local_opt.NonFiniteError, match=r"local: non-finite loss at step 13/20 .*no checkpoint was saved yet"):
        local_opt.train(params, loss_fn, consts, cfg, str(tmp_path / "loop"), checkpoint_every=50, log=lambda m: None)
    assert checkpointing.LoopCheckpointer(str(tmp_path / "loop")).latest_step() is None


def test_pipeline_nan_in_one_group_names_it_and_a_rerun_resumes(tmp_path, monkeypatch):
    """NaN in group 1's loss at step index 7 (test-only wrapper around the loop): group 0 is
    finished and kept, group 1 stops at its step-5 checkpoint, nothing is exported, and the
    same run without the fault resumes from step 5."""
    cfg = config_base.load_config(os.path.join(ROOT, "configs", "tiny_llama.py"), {
        "mesh.data": 1, "mesh.fsdp": 1, "mesh.tensor": 1, "local.epochs": 3.0, "checkpoint_every": 5})
    original = local_opt.train

    def poisoned(params, loss_fn, *args, name="local", **kw):
        if name == "group 1":
            clean = loss_fn

            def loss_fn(p, step, *c):
                loss, aux = clean(p, step, *c)
                return jnp.where(step == 7, jnp.nan, loss), aux

        return original(params, loss_fn, *args, name=name, **kw)

    monkeypatch.setattr(local_opt, "train", poisoned)
    wd = str(tmp_path / "wd")
    with pytest.raises(local_opt.NonFiniteError, match=r"^group 1: non-finite loss at step 8/12 .*"
                                                       r"last good checkpoint is step 5 in .*g01/loop"):
        pipeline.run(cfg, wd, log=lambda m: None)
    assert os.path.exists(os.path.join(wd, "groups", "g00", "stats.json"))
    assert not os.path.exists(os.path.join(wd, "groups", "g01", "final.npz"))
    assert checkpointing.LoopCheckpointer(os.path.join(wd, "groups", "g01", "loop")).latest_step() == 5
    assert not os.path.exists(os.path.join(wd, "compressed"))
    assert not os.path.exists(os.path.join(wd, "metrics.json"))

    monkeypatch.setattr(local_opt, "train", original)
    logs = []
    metrics = pipeline.run(cfg, wd, log=logs.append)
    assert any("group 1: resumed at step 5/12" in line for line in logs), logs
    assert np.all(np.isfinite(metrics["per_block"]["heldout_rel_error_fips_final"]))


@pytest.fixture(scope="module")
def tiny():
    cfg = config_base.load_config(os.path.join(ROOT, "configs", "tiny_llama.py"), {})
    arch, params, _ = registry.load_model(cfg["model"], seed=0)
    plan = pipeline.plan_groups(cfg, arch, params)
    groups = [fips.group_init(arch.mlp_spec, layout, rank, params, cfg["fips"]["tau"]) for layout, rank in plan]
    return arch, params, plan, groups


def test_exports_refuse_a_tree_with_a_nan_and_write_nothing(tiny, tmp_path):
    arch, params, plan, groups = tiny
    bad = [groups[0], {**groups[1], "v": groups[1]["v"].at[0, 1, 2, 3].set(jnp.nan)}]
    target = str(tmp_path / "compressed")
    with pytest.raises(ValueError, match=r"compressed: refusing to export non-finite values .* in fips/g01/v$"):
        export.save(target, arch, params, plan, bad, manifest={})
    assert os.listdir(tmp_path) == []

    export.save(target, arch, params, plan, groups, manifest={})  # the finite tree exports
    tree, manifest = export.read_tree(target)
    tree["base"]["final_norm"]["scale"] = tree["base"]["final_norm"]["scale"].at[0].set(jnp.inf)
    path = str(tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"model.safetensors: refusing .* in base/final_norm/scale$"):
        export_sparse.save(path, tree, manifest)
    assert not os.path.exists(path) and not os.path.exists(path + ".tmp")
