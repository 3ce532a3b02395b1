import numpy as np
import pytest

from fips_jax import budget


@pytest.mark.parametrize("b,r", [(0.10, 273), (0.25, 682), (0.40, 1092), (0.50, 1365), (0.75, 2048)])
def test_deit_b_ranks(b, r):
    assert budget.rank_for_budget(768, 3072, 4, 2, b, 0.75) == r


def test_gemma2_2b_ranks():
    assert budget.rank_for_budget(2304, 9216, 2, 3, 0.5, 0.75) == 3949
    assert budget.rank_for_budget(2304, 9216, 4, 3, 0.5, 0.75) == 4253


def test_reference_parity_overspends_when_p_is_not_4d():
    # Llama-3.2-3B: d 3072, p 8192 (p = 2.67 d). The 4d form gives a larger rank.
    real = budget.rank_for_budget(3072, 8192, 7, 3, 0.5, 0.75)
    parity = budget.rank_for_budget(3072, 8192, 7, 3, 0.5, 0.75, reference_parity=True)
    assert parity > real
    # Groups of 4, by hand: floor(4*3*4*3072^2*0.5 / (4*3*4*3072*0.25 + 3072)) = floor(5671.38);
    # with the real p, floor(0.5*3*4*3072*8192 / (3072 + 0.25*3*4*8192)) = floor(5461.33).
    assert budget.rank_for_budget(3072, 8192, 4, 3, 0.5, 0.75, reference_parity=True) == 5671
    assert budget.rank_for_budget(3072, 8192, 4, 3, 0.5, 0.75) == 5461
    # For p = 4d both forms agree.
    assert budget.rank_for_budget(768, 3072, 4, 2, 0.4, 0.75, reference_parity=True) == 1092


def test_round_to():
    assert budget.rank_for_budget(768, 3072, 4, 2, 0.5, 0.75, round_to=64) == 1344


def test_kept_params_match_the_budget():
    d, p, n, f, b, s = 768, 3072, 4, 2, 0.5, 0.75
    r = budget.rank_for_budget(d, p, n, f, b, s)
    u = np.ones((d, r), np.float32)
    v = np.zeros((n, f, r, p), np.float32)
    keep = round((1 - s) * v.size)
    v.reshape(-1)[:keep] = 1.0
    kept = budget.group_kept_params(u, v)
    assert kept == d * r + keep
    assert kept <= b * n * f * d * p
    # The floor loses less than one rank's worth of parameters.
    assert b * n * f * d * p - kept < d + (1 - s) * n * f * p


def test_bad_budgets_name_the_group_and_numbers():
    with pytest.raises(ValueError, match=r"group 3: budget 1.5"):
        budget.rank_for_budget(768, 3072, 4, 2, 1.5, 0.75, group="group 3")
    with pytest.raises(ValueError, match=r"budget 0"):
        budget.rank_for_budget(768, 3072, 4, 2, 0.0, 0.75)
    with pytest.raises(ValueError, match=r"sparsity 1.0"):
        budget.rank_for_budget(768, 3072, 4, 2, 0.5, 1.0)
    with pytest.raises(ValueError, match=r"rank 0 < 1"):
        budget.rank_for_budget(8, 32, 1, 2, 0.001, 0.0)


def test_per_layer_rank():
    # r (d + p) <= b d p < (r + 1)(d + p)
    r = budget.per_layer_rank(768, 3072, 0.5)
    assert r * (768 + 3072) <= 0.5 * 768 * 3072 < (r + 1) * (768 + 3072)


def test_report_three_ways():
    params = {
        "embed": {"embedding": np.zeros((10, 4))},
        "blocks_0": {"attn": {"q": {"kernel": np.zeros((4, 4))}},
                     "mlp": {"fc1": {"kernel": np.zeros((4, 16)), "bias": np.zeros(16)},
                             "fc2": {"kernel": np.zeros((16, 4)), "bias": np.zeros(4)}}},
    }
    rep = budget.budget_report(kept_mlp=64, dense_params=params, mlp_weights=128)
    assert rep.dense_linear == 16 + 128
    assert rep.dense_total == 40 + 16 + 128 + 20
    assert rep.of_mlp == 0.5
    assert rep.of_linear == pytest.approx((16 + 64) / 144)
    assert rep.of_model == pytest.approx((204 - 64) / 204)
