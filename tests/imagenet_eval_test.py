"""Top-k accuracy on hand-made logits, batching/padding, and the linear probe."""

import jax.numpy as jnp
import numpy as np
import pytest

from fips_jax.evaluators import classification as cls

# 4 examples, 6 classes. Label ranks: ex0 1st, ex1 2nd, ex2 5th, ex3 6th.
LOGITS = np.array(
    [
        [9.0, 1.0, 2.0, 3.0, 4.0, 5.0],
        [5.0, 9.0, 1.0, 2.0, 3.0, 4.0],
        [9.0, 8.0, 7.0, 6.0, 5.0, 1.0],
        [1.0, 2.0, 3.0, 4.0, 5.0, 6.0],
    ],
    dtype=np.float32,
)
LABELS = np.array([0, 0, 4, 0], dtype=np.int32)


def test_topk_correct_hand_made():
    hits = np.asarray(cls.topk_correct(jnp.asarray(LOGITS), jnp.asarray(LABELS), ks=(1, 2, 5)))
    np.testing.assert_array_equal(hits, [[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0]])


def test_topk_ties_not_rewarded():
    flat = jnp.zeros((3, 10))
    hits = np.asarray(cls.topk_correct(flat, jnp.array([0, 5, 9]), ks=(1,)))
    np.testing.assert_array_equal(hits, [[1, 0, 0]])


@pytest.mark.parametrize("jit", [True, False])
def test_classification_accuracy_batches(jit):
    # "images" are the logits themselves; batches of 3 then 1 exercise the padding path.
    batches = [(LOGITS[:3], LABELS[:3]), (LOGITS[3:], LABELS[3:])]
    seen = []
    out = cls.classification_accuracy(lambda x: x * 1.0, batches, jit=jit, progress=seen.append)
    assert out == {"top1": 0.25, "top5": 0.75, "n_examples": 4}
    assert seen == [3, 4]


def test_classification_accuracy_errors():
    with pytest.raises(ValueError, match="no batches"):
        cls.classification_accuracy(lambda x: x, [])
    with pytest.raises(ValueError, match="larger than the first batch"):
        cls.classification_accuracy(lambda x: x, [(LOGITS[:1], LABELS[:1]), (LOGITS, LABELS)])


def _blobs(rng, n_per_class, centres):
    feats = np.concatenate([c + 0.3 * rng.normal(size=(n_per_class, centres.shape[1])) for c in centres])
    labels = np.repeat(np.arange(len(centres)) * 10 + 7, n_per_class)  # non-contiguous label ids
    return feats, labels


@pytest.mark.parametrize("dim", [5, 200])  # primal and dual solves
def test_linear_probe_separable(dim):
    rng = np.random.default_rng(0)
    centres = 3.0 * rng.normal(size=(3, dim))
    train_x, train_y = _blobs(rng, 20, centres)
    test_x, test_y = _blobs(rng, 10, centres)
    out = cls.linear_probe(1e3 * train_x, train_y, 1e3 * test_x, test_y, l2=1e-3)
    assert out["train_accuracy"] == 1.0 and out["test_accuracy"] == 1.0
    assert out["n_classes"] == 3 and out["weights"].shape == (dim, 3)
    again = cls.linear_probe(1e3 * train_x, train_y, 1e3 * test_x, test_y, l2=1e-3)
    np.testing.assert_array_equal(out["weights"], again["weights"])


def test_linear_probe_uninformative_features():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(400, 4))
    y = rng.integers(0, 2, size=400)
    out = cls.linear_probe(x[:200], y[:200], x[200:], y[200:], l2=1e-2)
    assert 0.35 < out["test_accuracy"] < 0.65  # chance, not a leak from test labels
    with pytest.raises(ValueError, match="l2"):
        cls.linear_probe(x, y, x, y, l2=0.0)
