"""Perplexity protocols against a hand-written numpy reference on a bigram fake model."""

import jax.numpy as jnp
import numpy as np
import pytest

from fips_jax.evaluators import perplexity as ppl_lib

VOCAB = 11
TABLE = np.random.default_rng(0).normal(size=(VOCAB, VOCAB)).astype(np.float32) * 2.0
STREAM = np.random.default_rng(1).integers(0, VOCAB, size=53).astype(np.int32)


def bigram_logits(tokens):
    """Fake LM: logits at position t depend only on token t (row of a fixed table)."""
    return jnp.asarray(TABLE)[tokens]


def reference(stream, context, n_windows):
    """Loop over windows; log-softmax by hand in float64; skip each window's first token."""
    nll, count = 0.0, 0
    for w in range(n_windows):
        window = stream[w * context : (w + 1) * context]
        for t in range(1, len(window)):
            row = TABLE[window[t - 1]].astype(np.float64)
            log_probs = row - np.log(np.exp(row - row.max()).sum()) - row.max()
            nll -= log_probs[window[t]]
            count += 1
    return nll / count, count


@pytest.mark.parametrize("batch_size", [1, 2, 4])
def test_standard_matches_reference(batch_size):
    context = 8
    want_nll, want_count = reference(STREAM, context, n_windows=len(STREAM) // context)
    got = ppl_lib.perplexity(bigram_logits, STREAM, context, "standard", batch_size=batch_size)
    assert got["n_windows"] == 6 and got["n_tokens"] == want_count == 6 * 7
    assert got["protocol"] == "standard" and got["context"] == 8
    np.testing.assert_allclose(got["nll"], want_nll, rtol=1e-6)
    np.testing.assert_allclose(got["ppl"], np.exp(want_nll), rtol=1e-6)


def test_reference_first_window_matches_reference():
    context = 8
    want_nll, want_count = reference(STREAM, context, n_windows=1)
    got = ppl_lib.perplexity(bigram_logits, STREAM, context, "reference_first_window")
    assert got["n_windows"] == 1 and got["n_tokens"] == want_count == 7
    np.testing.assert_allclose(got["nll"], want_nll, rtol=1e-6)
    standard = ppl_lib.perplexity(bigram_logits, STREAM, context, "standard")
    assert abs(got["ppl"] - standard["ppl"]) > 1e-3  # protocols differ on a multi-window stream


def test_protocols_agree_on_one_window():
    one = STREAM[:16]
    a = ppl_lib.perplexity(bigram_logits, one, 16, "standard")
    b = ppl_lib.perplexity(bigram_logits, one, 16, "reference_first_window")
    assert a["n_tokens"] == b["n_tokens"] == 15
    np.testing.assert_allclose(a["ppl"], b["ppl"], rtol=1e-7)


def test_include_tail():
    context = 8  # 53 = 6 * 8 + 5: the tail window scores 4 more tokens
    full_nll, full_count = reference(STREAM, context, n_windows=6)
    tail = STREAM[48:]
    tail_nll, tail_count = reference(tail, len(tail), n_windows=1)
    got = ppl_lib.perplexity(bigram_logits, STREAM, context, "standard", include_tail=True)
    assert got["n_tokens"] == full_count + tail_count == 46 and got["n_windows"] == 7
    want = (full_nll * full_count + tail_nll * tail_count) / (full_count + tail_count)
    np.testing.assert_allclose(got["nll"], want, rtol=1e-6)


def test_bfloat16_logits_and_no_jit_and_progress():
    calls = []
    got = ppl_lib.perplexity(
        lambda t: bigram_logits(t).astype(jnp.bfloat16), STREAM, 8, batch_size=4, jit=False,
        progress=lambda done, total: calls.append((done, total)),
    )
    want_nll, _ = reference(STREAM, 8, 6)
    np.testing.assert_allclose(got["nll"], want_nll, rtol=2e-2)  # bf16 logits, float32 reduction
    assert calls == [(4, 6), (6, 6)]


def test_errors():
    with pytest.raises(ValueError, match="protocol"):
        ppl_lib.perplexity(bigram_logits, STREAM, 8, "sliding")
    with pytest.raises(ValueError, match="too short: 53 tokens for one window of 64"):
        ppl_lib.perplexity(bigram_logits, STREAM, 64)
    with pytest.raises(ValueError, match="does not match tokens"):
        ppl_lib.perplexity(lambda t: bigram_logits(t)[:, :-1], STREAM, 8)


def test_text_perplexity_uses_stream():
    class Tok:
        def encode(self, text, add_special_tokens=True):
            return [int(c) for c in text]

    text = "".join(str(t % 10) for t in STREAM)
    ids = np.array([int(c) for c in text], np.int32)
    got = ppl_lib.text_perplexity(bigram_logits, Tok(), text, context=8)
    np.testing.assert_allclose(got["nll"], reference(ids, 8, 6)[0], rtol=1e-6)
