"""Streamed Gram matrices equal float64 X^T X and H^T H computed directly."""

import jax.numpy as jnp
import numpy as np
import pytest

from fips_jax import calib_stats
from fips_jax.models import base

GATED = base.MlpSpec(("gate", "up", "down"), (False, False, True), "silu", gated=True, has_bias=False)
D, P = 12, 20


def _mlp(spec, seed=0, bias=None):
    rng = np.random.default_rng(seed)
    bias = spec.has_bias if bias is None else bias
    out = {}
    for name, tr in zip(spec.fc_names, spec.transposed):
        shape = (P, D) if tr else (D, P)
        out[name] = {"kernel": jnp.asarray(rng.standard_normal(shape) / np.sqrt(shape[0]), jnp.float32)}
        if bias:
            out[name]["bias"] = jnp.asarray(rng.standard_normal(shape[1]) * 0.1, jnp.float32)
    return out


def _x(tokens=300, seed=1):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((tokens, D)) * np.exp(np.linspace(-1, 2, D))).astype(np.float32)


def _reference(spec, params, x):
    """float64 numpy forward up to the last FC."""
    x = x.astype(np.float64)
    k = {n: np.asarray(params[n]["kernel"], np.float64) for n in spec.fc_names}
    b = {n: np.asarray(params[n]["bias"], np.float64) if "bias" in params[n] else 0.0 for n in spec.fc_names}
    if spec.gated:
        g = x @ k["gate"] + b["gate"]
        h = g / (1 + np.exp(-g)) * (x @ k["up"] + b["up"])
    else:
        from math import erf
        a = x @ k["fc1"] + b["fc1"]
        h = a * 0.5 * (1 + np.vectorize(erf)(a / np.sqrt(2)))
    return x.T @ x, h.T @ h


@pytest.mark.parametrize("spec", [GATED, base.VIT_MLP], ids=["gated", "vit"])
def test_grams_match_float64_reference(spec):
    params, x = _mlp(spec), _x()
    stats = calib_stats.mlp_input_grams(spec, params, x, chunk=64)
    ref_in, ref_h = _reference(spec, params, x)
    assert stats["n"] == 300 and stats["in"].dtype == np.float64
    # float32 chunk products: relative error ~ 1e-7 * sqrt(64) of the largest entries
    np.testing.assert_allclose(stats["in"], ref_in, rtol=2e-6, atol=2e-6 * np.abs(ref_in).max())
    np.testing.assert_allclose(stats["hidden"], ref_h, rtol=2e-5, atol=2e-6 * np.abs(ref_h).max())
    if spec.has_bias:  # the bias must be in H: H^T H without it differs far beyond rounding
        nob = {n: {"kernel": params[n]["kernel"]} for n in spec.fc_names}
        assert np.abs(calib_stats.mlp_input_grams(spec, nob, x)["hidden"] - ref_h).max() > 1e-2 * np.abs(ref_h).max()


def test_chunked_equals_unchunked_and_accumulates():
    params, x = _mlp(GATED), _x(257)
    whole = calib_stats.mlp_input_grams(GATED, params, x, chunk=10_000)
    chunked = calib_stats.mlp_input_grams(GATED, params, x, chunk=50)  # 5 chunks + a 7-token tail
    np.testing.assert_allclose(chunked["in"], whole["in"], rtol=1e-5, atol=1e-5 * np.abs(whole["in"]).max())
    np.testing.assert_allclose(chunked["hidden"], whole["hidden"], rtol=1e-5, atol=1e-5 * np.abs(whole["hidden"]).max())
    part = calib_stats.mlp_input_grams(GATED, params, x[:100])
    acc = calib_stats.mlp_input_grams(GATED, params, x[100:], acc=part)
    assert acc["n"] == 257 and part["n"] == 100  # acc is not modified in place
    np.testing.assert_allclose(acc["in"], whole["in"], rtol=1e-5, atol=1e-5 * np.abs(whole["in"]).max())


def test_group_helper_matches_per_block():
    mlps = [_mlp(GATED, seed=s) for s in range(3)]
    stacked = base.stack_trees(mlps)
    x = np.stack([_x(90, seed=10 + s) for s in range(3)])
    group = calib_stats.group_input_grams(GATED, stacked, x, chunk=40)
    assert group["in"].shape == (3, D, D) and group["hidden"].shape == (3, P, P) and group["n"] == 90
    for b in range(3):
        one = calib_stats.mlp_input_grams(GATED, mlps[b], x[b], chunk=40)
        np.testing.assert_allclose(group["in"][b], one["in"], rtol=1e-5, atol=1e-6 * np.abs(one["in"]).max())
        np.testing.assert_allclose(group["hidden"][b], one["hidden"], rtol=1e-5, atol=1e-6 * np.abs(one["hidden"]).max())


def test_bad_shapes():
    params = _mlp(GATED)
    with pytest.raises(ValueError, match="x: width"):
        calib_stats.mlp_input_grams(GATED, params, np.zeros((4, D + 1), np.float32))
    with pytest.raises(ValueError, match="acc"):
        calib_stats.mlp_input_grams(GATED, params, _x(4), acc={"in": np.zeros((2, 2)), "hidden": np.zeros((P, P)), "n": 0})
