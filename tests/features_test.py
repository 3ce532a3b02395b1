"""Feature metrics on hand-made features with known answers, and the Fashion-MNIST probe of a tiny ViT."""

import gzip

import jax
import numpy as np
import pytest

from fips_jax.evaluators import features
from fips_jax.models.vit import ViTArchitecture, ViTConfig


@pytest.fixture
def fashion_dir(tmp_path):
    """Fashion-MNIST-layout IDX files (uint8): 6 train and 4 test random 28x28 images."""
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 6), ("t10k", 4)):
        for kind, array in (("images-idx3", rng.integers(0, 256, (n, 28, 28))), ("labels-idx1", np.arange(n) % 3)):
            array = np.asarray(array, np.uint8)
            header = bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, ">u4").tobytes()
            with gzip.open(tmp_path / f"{prefix}-{kind}-ubyte.gz", "wb") as f:
                f.write(header + array.tobytes())
    return tmp_path


def test_cls_cosine_known_values():
    a = np.array([[1.0, 0.0], [0.0, 2.0], [3.0, 4.0]])
    assert features.cls_cosine(a, a) == pytest.approx(1.0)
    assert features.cls_cosine(a, -5 * a) == pytest.approx(-1.0)
    rotated = a @ np.array([[0.0, 1.0], [-1.0, 0.0]])  # 90 degrees: every pair orthogonal
    assert features.cls_cosine(a, rotated) == pytest.approx(0.0, abs=1e-12)
    # Per-image, then the mean: cos = 1, 0, 0.6 -> 1.6 / 3.
    b = np.array([[2.0, 0.0], [1.0, 0.0], [5.0, 0.0]])
    assert features.cls_cosine(a, b) == pytest.approx(1.6 / 3)
    assert features.cls_cosine(np.zeros((1, 2)), a[:1]) == 0.0
    with pytest.raises(ValueError, match="one shape"):
        features.cls_cosine(a, a[:2])


def test_extract_pads_the_last_batch_and_drops_the_padding():
    seen = []

    def fn(x):
        seen.append(x.shape[0])
        return x[:, :3] * 2

    x = np.arange(50, dtype=np.float32).reshape(10, 5)
    out = features.extract(fn, x, batch_size=4)
    assert seen == [4, 4, 4]
    np.testing.assert_array_equal(out, x[:, :3] * 2)
    with pytest.raises(ValueError, match="expected \\[B, D\\]"):
        features.extract(lambda x: x[:, 0], x, batch_size=4)


def labelled(n, seed):
    """Images are class centroids in 8-D plus noise: linearly separable with margin."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 4
    centroids = 3.0 * np.eye(8)[:4]
    return (centroids[labels] + 0.3 * rng.standard_normal((n, 8))).astype(np.float32), labels


def test_probe_report_separates_good_bad_and_rotated_features():
    train, test = labelled(200, 0), labelled(100, 1)
    q, _ = np.linalg.qr(np.random.default_rng(2).standard_normal((8, 8)))
    noise = np.random.default_rng(3)
    fns = {
        "dense": lambda x: x,
        "rotated": lambda x: x @ q,  # same information, different directions
        "noise": lambda x: noise.standard_normal(x.shape),  # no information at all
        "narrow": lambda x: x[:, :2],  # half the classes' axes only; other width: no cosine
    }
    rep = features.probe_report(fns, train, test, batch_size=32)
    assert list(rep) == list(fns)
    assert rep["dense"]["probe_accuracy"] == 1.0 and rep["dense"]["cls_cosine"] == pytest.approx(1.0)
    # A ridge probe is rotation invariant, so accuracy matches exactly while the cosine drops.
    assert rep["rotated"]["probe_accuracy"] == 1.0 and rep["rotated"]["accuracy_vs_reference"] == 1.0
    assert rep["rotated"]["cls_cosine"] < 0.9
    # The dense model's own probe does not survive the rotation; on dense features it is exact.
    assert rep["dense"]["reference_probe_accuracy"] == 1.0 and rep["rotated"]["reference_probe_accuracy"] < 0.8
    assert rep["noise"]["probe_accuracy"] < 0.5 and abs(rep["noise"]["cls_cosine"]) < 0.2
    # Classes 2 and 3 coincide in those two dimensions: one of them is always wrong.
    assert rep["narrow"]["probe_accuracy"] == pytest.approx(0.75, abs=0.03) and np.isnan(rep["narrow"]["cls_cosine"])
    assert rep["noise"]["n_train"] == 200 and rep["noise"]["n_test"] == 100
    table = features.report_table(rep)
    assert "| dense | 100.00 | 100.0 | 100.00 | 1.0000 |" in table
    with pytest.raises(ValueError, match="reference 'teacher'"):
        features.probe_report(fns, train, test, reference="teacher")


def test_probe_models_on_fashion_mnist_fixture(fashion_dir):
    cfg = ViTConfig(hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32, image_size=14, patch_size=7,
                    num_labels=0)
    arch = ViTArchitecture(cfg)
    # Random leaves of the right shapes: compiling arch.init costs more than this whole test.
    rng = np.random.default_rng(0)
    shapes = jax.eval_shape(arch.init, jax.random.key(0))
    dense = jax.tree_util.tree_map(lambda s: (0.3 * rng.standard_normal(s.shape)).astype(np.float32), shapes)
    other = jax.tree_util.tree_map(lambda p: p * 0.5, dense)
    probe_cfg = {"source": "fashion_mnist", "path": str(fashion_dir), "n_train": 6, "n_test": 4, "l2": 1e-3}
    rep = features.probe_models(arch, {"dense": dense, "half": other}, probe_cfg, batch_size=4)
    assert rep["dense"]["cls_cosine"] == pytest.approx(1.0) and rep["dense"]["n_test"] == 4
    assert rep["half"]["cls_cosine"] < 1.0
    with pytest.raises(ValueError, match="eval.probe.source 'cifar'"):
        features.probe_models(arch, {"dense": dense}, {**probe_cfg, "source": "cifar"})


def test_probe_predict_reproduces_linear_probe():
    from fips_jax.evaluators import classification  # pylint: disable=import-outside-toplevel

    rng = np.random.default_rng(5)
    x_train, y_train = rng.standard_normal((300, 12)) * 3, rng.integers(0, 5, 300)
    x_test, y_test = rng.standard_normal((200, 12)) * 3, rng.integers(0, 5, 200)
    x_train[:, 0] += y_train  # weak signal: accuracy well below 1, so a wrong normalisation would show
    x_test[:, 0] += y_test
    probe = classification.linear_probe(x_train, y_train, x_test, y_test, l2=1e-2)
    pred = features.probe_predict(probe, x_train, x_test)
    assert 0.2 < probe["test_accuracy"] < 0.9
    assert np.mean(pred == y_test) == probe["test_accuracy"]
    assert np.mean(features.probe_predict(probe, x_train, x_train) == y_train) == probe["train_accuracy"]
