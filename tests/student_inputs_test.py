"""`local.inputs=student`: FiPS's groups fitted on the activations of its own compressed model,
with the drift back to the teacher's block outputs in the target."""

import os
import types

import numpy as np
import pytest

from fips_jax import calibration, config_base, factors, local_opt, pipeline, stages
from fips_jax.tasks import causal_lm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(**overrides):
    one = {"mesh.data": 1, "mesh.fsdp": 1, "mesh.tensor": 1, "fips.group_size": 2, "local.epochs": 2.0,
           "local.inputs": "student", "local.drift": 1.0, "checkpoint_every": 4}
    return config_base.load_config(os.path.join(ROOT, "configs", "tiny_llama.py"), {**one, **overrides})


def _recording(monkeypatch) -> dict:
    """Runs the pipeline's causal-LM calibration as is, keeping its arguments and each group's
    calibration problem."""
    seen = {"groups": []}
    calibrate, group = causal_lm.calibrate, causal_lm._Group

    def calibrate_and_keep(run, arch, params, plan, dat, peers):
        seen.update(arch=arch, params=params, plan=plan, dat=dat, chunk=run.cfg["chunk"])
        return calibrate(run, arch, params, plan, dat, peers)

    class Kept(group):
        def __init__(self, *args, **kw):
            super().__init__(*args, **kw)
            seen["groups"].append(self)

    monkeypatch.setattr(causal_lm, "calibrate", calibrate_and_keep)
    monkeypatch.setattr(causal_lm, "_Group", Kept)
    return seen


@pytest.fixture(scope="module")
def student_run(tmp_path_factory):
    wd = tmp_path_factory.mktemp("student")
    with pytest.MonkeyPatch.context() as monkeypatch:
        seen = _recording(monkeypatch)
        pipeline.run(_config(), str(wd), log=lambda m: None)
    return wd, seen


def test_later_groups_see_the_compressed_model_and_the_drift_to_the_teacher(student_run):
    tmp_path, seen = student_run
    arch, params, plan, dat = seen["arch"], seen["params"], seen["plan"], seen["dat"]
    g0, g1 = seen["groups"]
    # Group 0: nothing upstream is compressed, so the student's inputs are the teacher's and the
    # drift is zero: FiPS's problem is the teacher-forced one.
    np.testing.assert_array_equal(np.asarray(g0.fips_x), np.asarray(g0.x))
    np.testing.assert_array_equal(np.asarray(g0.fips_y), np.asarray(g0.y))

    # Group 1, recomputed independently: blocks 0-1 replaced by group 0's trained factors.
    final0 = stages.load_arrays(str(tmp_path / "groups" / "g00" / "final.npz"))
    student = factors.assemble(params, [(plan[0][0], final0)])
    xs, out_s = calibration.HiddenStream(arch, student, dat.calib, seen["chunk"]).advance(range(4), with_outputs=True)
    xt, out_t = calibration.HiddenStream(arch, params, dat.calib, seen["chunk"]).advance(range(4), with_outputs=True)
    assert np.abs(xs[2:] - xt[2:]).max() > 1e-3  # the compression upstream did move the inputs
    np.testing.assert_allclose(np.asarray(g1.x), xt[2:], rtol=0, atol=1e-6)
    np.testing.assert_allclose(np.asarray(g1.fips_x), xs[2:], rtol=0, atol=1e-6)
    # Target: the MLP output that, added to the student's post-attention residual, gives the
    # teacher's block output (Llama adds the MLP output to the residual stream as it is).
    teacher_mlps = local_opt.stack_dense_mlps(params, plan[1][0])
    dense_out = np.asarray(local_opt.mlp_targets(arch.mlp_spec, teacher_mlps, xs[2:]))
    residual = out_s[2:] - dense_out
    np.testing.assert_allclose(residual + np.asarray(g1.fips_y), out_t[2:], rtol=0, atol=1e-5)


def test_drift_zero_targets_the_dense_mlp_on_the_students_inputs(monkeypatch, tmp_path):
    seen = _recording(monkeypatch)
    pipeline.run(_config(**{"local.drift": 0.0, "local.epochs": 1.0}), str(tmp_path), log=lambda m: None)
    g1 = seen["groups"][1]
    want = local_opt.mlp_targets(seen["arch"].mlp_spec, local_opt.stack_dense_mlps(seen["params"], g1.layout), g1.fips_x)
    np.testing.assert_allclose(np.asarray(g1.fips_y), np.asarray(want), rtol=0, atol=1e-6)


class _Stop(Exception):
    pass


def test_interrupted_student_run_resumes_to_the_same_factors(student_run, tmp_path):
    straight, _ = student_run
    cfg = _config()
    quiet = lambda m: None
    calls = []

    def boom(step, loss):  # group 1's loop, after group 0 and its stream state were saved
        calls.append(step)
        if len(calls) == 11:  # 8 steps a group
            raise _Stop()

    with pytest.raises(_Stop):
        pipeline.run(cfg, str(tmp_path / "killed"), log=quiet, on_step=boom)
    logs = []
    pipeline.run(cfg, str(tmp_path / "killed"), log=logs.append)
    assert any("groups 0-0 done earlier" in line for line in logs), logs
    for g in ("g00", "g01"):
        a = stages.load_arrays(str(straight / "groups" / g / "final.npz"))
        b = stages.load_arrays(str(tmp_path / "killed" / "groups" / g / "final.npz"))
        for k in ("u", "v"):
            np.testing.assert_allclose(np.asarray(a[k]), np.asarray(b[k]), rtol=0, atol=1e-6, err_msg=f"{g}/{k}")


@pytest.mark.parametrize("local,post_norms,message", [
    ({"inputs": "students", "drift": 1.0}, False, "local.inputs 'students'"),
    ({"inputs": "student", "drift": 1.5}, False, "local.drift 1.5"),
    ({"inputs": "student", "drift": 0.5}, True, "local.drift=0"),
])
def test_bad_settings_are_named(local, post_norms, message):
    arch = types.SimpleNamespace(spec=types.SimpleNamespace(post_norms=post_norms))
    with pytest.raises(ValueError, match=message):
        causal_lm._student_inputs({"local": local}, arch)


def test_post_norm_models_may_use_student_inputs_without_drift():
    arch = types.SimpleNamespace(spec=types.SimpleNamespace(post_norms=True))
    assert causal_lm._student_inputs({"local": {"inputs": "student", "drift": 0.0}}, arch)
    assert not causal_lm._student_inputs({"local": {"inputs": "teacher", "drift": 1.0}}, arch)
