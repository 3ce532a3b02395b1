"""Schedule values at chosen steps vs hand-computed numbers (fips_jax/sparsity/schedules.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fips_jax.sparsity import schedules
from fips_jax.sparsity.schedules import (
    ConstantSchedule,
    CosineDecay,
    PolynomialSchedule,
    last_update_before,
)


def _values(schedule, steps):
    return np.array([float(schedule(t)) for t in steps])


def test_paper_ramp_start_constant():
    # x = 1 - 2**(-1/3) = 0.2062994740; t0/T = (0.25 - x) / (1 - x) = 0.0437005260 / 0.7937005260
    assert schedules.PAPER_RAMP_START == pytest.approx(0.0550592, abs=1e-7)


def test_gmp_default_hits_the_papers_three_points():
    # s_f = 0.75, T = 400: s_i = 0.25, t0 = 22.0237, ramp over 377.9763 steps.
    sched = PolynomialSchedule(final_sparsity=0.75, end_step=400, update_freq=1)
    assert sched.initial == 0.25
    got = _values(sched, [0, 22, 100, 200, 300, 400, 1000])
    # t=200: progress = 177.9763/377.9763 = 0.470866; 0.75 - 0.5 * 0.529134**3 = 0.675926
    # t=300: progress = 0.735431; 0.75 - 0.5 * 0.264569**3 = 0.740740
    want = [0.25, 0.25, 0.5, 0.675926, 0.740740, 0.75, 0.75]
    np.testing.assert_allclose(got, want, atol=2e-6)


def test_plain_cubic_from_step_zero():
    sched = PolynomialSchedule(final_sparsity=0.75, end_step=400, begin_step=0, update_freq=1)
    # 0.75 - 0.5 * (1 - t/400)**3: t=100 -> 0.75 - 0.5 * 0.421875; t=200 -> 0.75 - 0.5 * 0.125
    got = _values(sched, [0, 100, 200, 400])
    np.testing.assert_allclose(got, [0.25, 0.5390625, 0.6875, 0.75], atol=1e-7)


def test_value_only_changes_on_update_steps():
    sched = PolynomialSchedule(final_sparsity=0.75, end_step=400, begin_step=0, update_freq=50)
    # 0.75 - 0.5 * (1 - t_q/400)**3 with t_q the last multiple of 50:
    # t=99 -> t_q=50: 0.75 - 0.5 * 0.669921875 = 0.4150390625
    # t=100, 149 -> 0.5390625; t=150 -> 0.75 - 0.5 * 0.244140625 = 0.6279296875
    # t=399 -> t_q=350: 0.75 - 0.5 * 0.001953125 = 0.7490234375
    got = _values(sched, [99, 100, 149, 150, 399])
    want = [0.4150390625, 0.5390625, 0.5390625, 0.6279296875, 0.7490234375]
    np.testing.assert_allclose(got, want, atol=1e-7)


def test_custom_initial_sparsity_and_scaling_default():
    # s_i defaults to s_f / 3: 0.9 -> 0.3 at the start.
    assert float(PolynomialSchedule(final_sparsity=0.9, end_step=100)(0)) == pytest.approx(0.3)
    sched = PolynomialSchedule(
        final_sparsity=0.8, end_step=100, init_sparsity=0.0, begin_step=0, update_freq=1
    )
    # 0.8 - 0.8 * 0.5**3 = 0.7 at t = 50
    assert float(sched(50)) == pytest.approx(0.7, abs=1e-7)


def test_reference_parity_reproduces_the_authors_shortfall():
    # Authors' DeiT config: 5% before t_accel = 240, 50% at t_accel, target 75%, t_end = 450.
    kw = dict(
        final_sparsity=0.75,
        end_step=450,
        init_sparsity=0.5,
        pre_begin_sparsity=0.05,
        begin_step=240,
        update_freq=50,
    )
    ref = PolynomialSchedule(reference_parity=True, **kw)
    fixed = PolynomialSchedule(**kw)
    # 240 is not an update step: the value changes at 250.
    # ref t=250: 0.75 - 0.25 * (1 - 10/450)**3 = 0.75 - 0.25 * 0.934805 = 0.516299
    # ref t>=450: 0.75 - 0.25 * (240/450)**3 = 0.75 - 0.25 * 0.151704 = 0.712074
    np.testing.assert_allclose(
        _values(ref, [0, 200, 249, 250, 450, 600]),
        [0.05, 0.05, 0.05, 0.516299, 0.712074, 0.712074],
        atol=2e-6,
    )
    # fixed t=250: 0.75 - 0.25 * (1 - 10/210)**3 = 0.75 - 0.25 * 0.863838 = 0.534041
    np.testing.assert_allclose(_values(fixed, [250, 450, 600]), [0.534040, 0.75, 0.75], atol=2e-6)


def test_reference_parity_is_harmless_when_the_ramp_starts_at_zero():
    kw = dict(final_sparsity=0.75, end_step=400, begin_step=0, update_freq=50)
    steps = [0, 100, 250, 400]
    np.testing.assert_allclose(
        _values(PolynomialSchedule(reference_parity=True, **kw), steps),
        _values(PolynomialSchedule(**kw), steps),
        atol=1e-7,
    )


def test_schedules_trace_under_jit():
    sched = PolynomialSchedule(final_sparsity=0.75, end_step=400, begin_step=0, update_freq=50)
    assert float(jax.jit(sched)(jnp.int32(120))) == pytest.approx(0.5390625)
    assert float(jax.jit(ConstantSchedule(0.6))(jnp.int32(7))) == pytest.approx(0.6)


def test_cosine_decay():
    decay = CosineDecay(0.1, 100)
    # 0.1 * (1 + cos(pi t / 100)) / 2: t=25 -> 0.05 * (1 + 0.707107) = 0.085355
    np.testing.assert_allclose(
        _values(decay, [0, 25, 50, 100, 150]), [0.1, 0.0853553, 0.05, 0.0, 0.0], atol=1e-7
    )


def test_last_update_before():
    assert last_update_before(400, 50) == 350
    assert last_update_before(401, 50) == 400
    assert last_update_before(100, 10) == 90
    with pytest.raises(ValueError, match="no mask update"):
        last_update_before(50, 50)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(final_sparsity=1.0, end_step=10), "1.0"),
        (dict(final_sparsity=0.5, end_step=10, init_sparsity=-0.1), "-0.1"),
        (dict(final_sparsity=0.5, end_step=10, begin_step=10), "begin_step"),
        (dict(final_sparsity=0.5, end_step=10, update_freq=0), "update_freq"),
    ],
)
def test_invalid_schedules_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PolynomialSchedule(**kwargs)
