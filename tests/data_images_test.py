"""fips_jax.data.images: ImageNet-folder sampling, eager and streamed, and preprocessing."""

import os

import numpy as np
import pytest

from fips_jax.data import images as image_data

PIL = pytest.importorskip("PIL.Image")


@pytest.fixture(scope="module")
def imagenet_root(tmp_path_factory):
    """root/{train,val}/<wnid>/: 3 classes, 4 train JPEGs each of varied sizes, 1 val PNG each."""
    root = tmp_path_factory.mktemp("imagenet")
    rng = np.random.default_rng(0)
    for c, wnid in enumerate(["n01440764", "n01443537", "n01484850"]):
        for split, count in (("train", 4), ("val", 1)):
            os.makedirs(root / split / wnid)
            for i in range(count):
                h, w = int(rng.integers(240, 320)), int(rng.integers(240, 320))
                pixels = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
                ext = "JPEG" if split == "train" else "png"
                PIL.fromarray(pixels).save(root / split / wnid / f"img_{c}_{i}.{ext}")
        (root / "train" / wnid / "notes.txt").write_text("not an image")
    return str(root)


def test_stratified_sample(imagenet_root):
    paths, labels = image_data.stratified_sample(imagenet_root, "train", per_class=2, seed=0)
    assert len(paths) == 6
    np.testing.assert_array_equal(labels, [0, 0, 1, 1, 2, 2])
    for p, c in zip(paths, labels):
        assert f"img_{c}_" in os.path.basename(p)
    assert len(set(paths)) == 6
    assert image_data.stratified_sample(imagenet_root, "train", 2, seed=0)[0] == paths  # deterministic
    sub_paths, sub_labels = image_data.stratified_sample(imagenet_root, "train", 3, n_classes=2, seed=1)
    assert len(sub_paths) == 6 and len(set(sub_labels.tolist())) == 2
    assert all(np.bincount(sub_labels)[np.unique(sub_labels)] == 3)
    with pytest.raises(ValueError, match="fewer than per_class"):
        image_data.stratified_sample(imagenet_root, "train", per_class=5)


def test_folder_calibration_and_batches(imagenet_root):
    images, labels = image_data.imagenet_folder_calibration(imagenet_root, per_class=1, seed=0)
    assert images.shape == (3, 224, 224, 3) and images.dtype == np.float32
    np.testing.assert_array_equal(labels, [0, 1, 2])
    batches = list(image_data.imagenet_folder_batches(imagenet_root, "val", batch_size=2))
    assert [b[0].shape[0] for b in batches] == [2, 1]
    np.testing.assert_array_equal(np.concatenate([b[1] for b in batches]), [0, 1, 2])
    half = list(image_data.imagenet_folder_batches(imagenet_root, "val", batch_size=8, process_index=1, process_count=2))
    np.testing.assert_array_equal(half[0][1], [1])


def test_streamed_sample_equals_the_eager_one(imagenet_root):
    eager_images, eager_labels = image_data.imagenet_folder_calibration(
        imagenet_root, per_class=3, n_classes=2, seed=1, interpolation="bicubic")
    sample = image_data.stratified_sample(imagenet_root, "train", per_class=3, n_classes=2, seed=1)
    batches = list(image_data.image_batches(*sample, batch_size=4, interpolation="bicubic"))
    assert [b[0].shape for b in batches] == [(4, 224, 224, 3), (2, 224, 224, 3)]
    assert all(b[0].dtype == np.float32 and b[1].dtype == np.int32 for b in batches)
    np.testing.assert_array_equal(np.concatenate([b[0] for b in batches]), eager_images)
    np.testing.assert_array_equal(np.concatenate([b[1] for b in batches]), eager_labels)


@pytest.mark.parametrize("interpolation", image_data.INTERPOLATIONS)
def test_constant_image_normalised(interpolation):
    colour = np.array([200, 100, 50], dtype=np.uint8)
    image = PIL.fromarray(np.broadcast_to(colour, (300, 400, 3)).copy())
    out = image_data.preprocess_image(image, interpolation=interpolation)
    assert out.shape == (224, 224, 3) and out.dtype == np.float32
    expected = (colour / 255.0 - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
    np.testing.assert_allclose(out, np.broadcast_to(expected, out.shape), atol=1e-5)


def test_center_crop_geometry():
    # 512 wide x 256 high needs no resize; the crop keeps columns 144..367, so the red/blue
    # boundary at column 256 lands at crop column 112.
    pixels = np.zeros((256, 512, 3), np.uint8)
    pixels[:, :256, 0] = 255
    pixels[:, 256:, 2] = 255
    out = image_data.preprocess_image(pixels)
    red = (1.0 - image_data.IMAGENET_MEAN[0]) / image_data.IMAGENET_STD[0]
    assert np.allclose(out[:, :112, 0], red) and np.allclose(out[:, 112:, 2], (1.0 - 0.406) / 0.225)
    assert np.allclose(out[:, 112:, 0], -0.485 / 0.229)


def test_bad_interpolation():
    with pytest.raises(ValueError, match="interpolation"):
        image_data.preprocess_image(np.zeros((256, 256, 3), np.uint8), interpolation="nearest")
