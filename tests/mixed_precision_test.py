"""Decoder LLMs with `matmul_dtype`: every dense product takes bfloat16 operands and accumulates
in float32, forward and backward; None leaves the reference float32 model untouched."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fips_jax.models import decoder_common, registry

LLAMA = dict(model_type="llama", vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5,
             rope_theta=10000.0, tie_word_embeddings=True, hidden_act="silu")
BF16 = jnp.bfloat16


def _bf16_dot(a, b):
    return jnp.einsum("nd,dp->np", a.astype(BF16), b.astype(BF16), preferred_element_type=jnp.float32)


def test_mixed_dot_general_rounds_operands_and_accumulates_in_float32():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((2, 3, 16)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((16, 8)), jnp.float32)
    dot = decoder_common.mixed_dot_general("bfloat16")
    dims = (((2,), (0,)), ((), ()))
    got = dot(x, w, dims)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(_bf16_dot(x.reshape(6, 16), w)).reshape(2, 3, 8))
    # Backward: both gradient products also take bf16 operands (the cotangent rounded too).
    g = jnp.asarray(rng.standard_normal((2, 3, 8)), jnp.float32)
    _, vjp = jax.vjp(lambda a, b: dot(a, b, dims), x, w)
    dx, dw = vjp(g)
    g2 = g.reshape(6, 8).astype(BF16)
    want_dx = jnp.einsum("np,dp->nd", g2, w.astype(BF16), preferred_element_type=jnp.float32).reshape(2, 3, 16)
    want_dw = jnp.einsum("nd,np->dp", x.reshape(6, 16).astype(BF16), g2, preferred_element_type=jnp.float32)
    np.testing.assert_array_equal(np.asarray(dx), np.asarray(want_dx))
    np.testing.assert_array_equal(np.asarray(dw), np.asarray(want_dw))
    assert decoder_common.mixed_dot_general(None) is None
    with pytest.raises(NotImplementedError, match="x\\[..., d\\] @ W\\[d, p\\]"):
        dot(x, w, (((1,), (0,)), ((), ())))


@pytest.mark.parametrize("tied", [True, False])
def test_bf16_products_stay_within_rounding_of_the_float32_model(tied):
    arch = registry.from_hf_config({**LLAMA, "tie_word_embeddings": tied})
    params = arch.init(jax.random.PRNGKey(0))
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, 64, (2, 12)), jnp.int32)
    ref = arch.apply(params, tokens)
    # None is the reference model itself, bit for bit.
    np.testing.assert_array_equal(np.asarray(dataclasses.replace(arch, matmul_dtype=None).apply(params, tokens)),
                                  np.asarray(ref))
    mixed = dataclasses.replace(arch, matmul_dtype=jnp.dtype(BF16))
    got = mixed.apply(params, tokens)
    rel = float(jnp.linalg.norm(got - ref) / jnp.linalg.norm(ref))
    assert 1e-5 < rel < 2e-2, rel  # rounded (not the float32 path), but only by bf16's ~2^-9 per operand

    def loss(a, p):
        return jnp.mean(jax.nn.log_softmax(a.apply(p, tokens)) ** 2)

    g_ref, g_mixed = jax.grad(lambda p: loss(arch, p))(params), jax.grad(lambda p: loss(mixed, p))(params)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g_ref), jax.tree_util.tree_leaves(g_mixed)):
        err = float(jnp.linalg.norm(a - b) / (jnp.linalg.norm(a) + 1e-30))
        assert err < 5e-2, (jax.tree_util.keystr(path), err)
