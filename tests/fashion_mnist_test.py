"""fips_jax.data.images, Fashion-MNIST: IDX parsing on fixtures written here, the Debian package's files when present,
and the grayscale -> ViT input conversion."""

import gzip
import os

import numpy as np
import pytest

from fips_jax.data import images as image_data


def write_idx(path, array, gz=True):
    """The IDX layout `read_idx` parses: 0, 0, type code, rank, big-endian dims, big-endian data."""
    codes = {np.dtype(np.uint8): 0x08, np.dtype(np.int32): 0x0C, np.dtype(np.float32): 0x0D}
    array = np.asarray(array)
    header = bytes([0, 0, codes[array.dtype], array.ndim]) + np.asarray(array.shape, ">u4").tobytes()
    payload = header + array.astype(array.dtype.newbyteorder(">")).tobytes()
    with (gzip.open if gz else open)(path, "wb") as f:
        f.write(payload)


@pytest.fixture
def fixture_dir(tmp_path):
    """A tiny Fashion-MNIST folder: 6 train and 4 test 28x28 images whose pixels encode their index."""
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 6), ("t10k", 4)):
        images = (np.arange(n, dtype=np.uint8)[:, None, None] * 40 + rng.integers(0, 3, (n, 28, 28))).astype(np.uint8)
        write_idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz", images)
        write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", (np.arange(n) % 10).astype(np.uint8))
    return tmp_path


def test_read_idx_types_and_plain_files(tmp_path):
    for dtype, gz in ((np.uint8, True), (np.int32, False), (np.float32, True)):
        a = (np.arange(24).reshape(2, 3, 4) - 5).astype(dtype) if dtype != np.uint8 else np.arange(24, dtype=np.uint8)
        path = str(tmp_path / f"a_{np.dtype(dtype).name}{'.gz' if gz else ''}")
        write_idx(path, a, gz)
        out = image_data.read_idx(path)
        assert out.dtype == a.dtype and out.dtype.isnative
        np.testing.assert_array_equal(out, a)


def test_read_idx_rejects_bad_files(tmp_path):
    bad = tmp_path / "bad.gz"
    with gzip.open(bad, "wb") as f:
        f.write(b"\x89PNG\r\n")
    with pytest.raises(ValueError, match="not an IDX file"):
        image_data.read_idx(str(bad))
    short = tmp_path / "short"
    write_idx(short, np.zeros((2, 2), np.uint8), gz=False)
    with open(short, "ab") as f:
        f.write(b"\x00")
    with pytest.raises(ValueError, match="5 data bytes for shape \\(2, 2\\)"):
        image_data.read_idx(str(short))


def test_fashion_mnist_from_fixture(fixture_dir):
    images, labels = image_data.fashion_mnist("train", path=str(fixture_dir))
    assert images.shape == (6, 28, 28) and images.dtype == np.uint8
    np.testing.assert_array_equal(labels, np.arange(6)) and labels.dtype == np.int32
    np.testing.assert_array_equal(images[:, 0, 0] // 40, np.arange(6))
    images, labels = image_data.fashion_mnist("test", n=3, path=str(fixture_dir))
    assert images.shape == (3, 28, 28) and labels.tolist() == [0, 1, 2]
    with pytest.raises(ValueError, match="n=5 > 4 test examples"):
        image_data.fashion_mnist("test", n=5, path=str(fixture_dir))
    with pytest.raises(ValueError, match="split 'val'"):
        image_data.fashion_mnist("val", path=str(fixture_dir))


def test_fashion_mnist_missing_names_the_apt_package(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        image_data.fashion_mnist("train", path=str(tmp_path))


@pytest.mark.skipif(not os.path.isdir(image_data.FASHION_MNIST_DIR), reason="dataset-fashion-mnist not installed")
def test_real_fashion_mnist():
    images, labels = image_data.fashion_mnist("test")
    assert images.shape == (10000, 28, 28) and images.dtype == np.uint8
    np.testing.assert_array_equal(np.bincount(labels), [1000] * 10)
    _, labels = image_data.fashion_mnist("train", n=10)
    assert labels.tolist() == [9, 0, 0, 3, 0, 2, 7, 2, 5, 5]  # the published first ten train labels


def test_grayscale_to_model_inputs():
    flat = np.full((2, 28, 28), 128, np.uint8)
    x = image_data.grayscale_to_model_inputs(flat, 56)
    assert x.shape == (2, 56, 56, 3) and x.dtype == np.float32
    np.testing.assert_allclose(x[0, 7, 9], (128 / 255 - image_data.IMAGENET_MEAN) / image_data.IMAGENET_STD, rtol=1e-6)
    assert image_data.grayscale_to_model_inputs(flat, (28, 42)).shape == (2, 28, 42, 3)
    with pytest.raises(ValueError, match="grayscale images"):
        image_data.grayscale_to_model_inputs(np.zeros((2, 28, 28, 3), np.uint8))


def test_enlarging_matches_pil_bilinear():
    Image = pytest.importorskip("PIL.Image")
    img = np.random.default_rng(1).integers(0, 256, (28, 28)).astype(np.float32)
    ref = np.asarray(Image.fromarray(img, mode="F").resize((112, 84), Image.Resampling.BILINEAR))
    ours = image_data.linear_resize_matrix(28, 84) @ img @ image_data.linear_resize_matrix(28, 112).T
    np.testing.assert_allclose(ours, ref, atol=1e-3)


def test_streamed_batches_equal_the_eager_conversion(fixture_dir):
    raw, labels = image_data.fashion_mnist("train", n=5, path=str(fixture_dir))
    eager = image_data.grayscale_to_model_inputs(raw, 32)
    batches = list(image_data.fashion_mnist_batches("train", n=5, path=str(fixture_dir), size=32, batch_size=2))
    assert [b[0].shape for b in batches] == [(2, 32, 32, 3), (2, 32, 32, 3), (1, 32, 32, 3)]
    np.testing.assert_array_equal(np.concatenate([b[0] for b in batches]), eager)
    np.testing.assert_array_equal(np.concatenate([b[1] for b in batches]), labels)
