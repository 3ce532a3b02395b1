"""Tests for fips_jax.data: text splits, token windows, host shards, ImageNet-folder loading."""

import json
import os
import string

import numpy as np
import pytest

from fips_jax import data

PIL = pytest.importorskip("PIL.Image")


class CharTokenizer:
    """Byte-level stand-in for a HF tokenizer: BOS=1 then one id per byte."""

    def encode(self, text, add_special_tokens=True):
        ids = [b + 2 for b in text.encode("utf-8")]
        return [1] + ids if add_special_tokens else ids


# ---------------------------------------------------------------- text


@pytest.fixture(scope="module")
def wiki_splits():
    try:
        return {s: data.wiki_offline_articles(s) for s in data.WIKI_SPLITS}
    except ImportError as e:
        pytest.skip(str(e))


def test_wiki_offline_splits_disjoint_and_cover(wiki_splits):
    calib = [t for t, _ in wiki_splits["calib"]]
    evals = [t for t, _ in wiki_splits["eval"]]
    every = [t for t, _ in wiki_splits["all"]]
    assert not set(calib) & set(evals)
    assert sorted(calib + evals) == every
    # ~1 in 10 articles held out, and enough calibration text for 20 x 8192 tokens.
    assert 0.08 < len(evals) / len(every) < 0.12
    assert len(data.wiki_offline_text("calib")) > 1_000_000


def test_wiki_offline_deterministic(wiki_splits):
    assert data.wiki_offline_articles("eval") == wiki_splits["eval"]
    text = data.wiki_offline_text("eval")
    assert text == "\n\n".join(t for _, t in wiki_splits["eval"])
    title, body = wiki_splits["eval"][0]
    assert body.startswith(title + "\n")


def test_wiki_offline_bad_split():
    with pytest.raises(ValueError, match="not in"):
        data.wiki_offline_articles("test")


def test_local_text(tmp_path):
    (tmp_path / "a.txt").write_text("hello world", encoding="utf-8")
    assert data.local_text(str(tmp_path / "a.txt")) == "hello world"
    lines = [json.dumps({"text": "one", "id": 1}), "", json.dumps({"text": "two"})]
    (tmp_path / "b.jsonl").write_text("\n".join(lines), encoding="utf-8")
    assert data.local_text(str(tmp_path / "b.jsonl")) == "one\n\ntwo"
    (tmp_path / "c.jsonl").write_text(json.dumps({"body": "x"}), encoding="utf-8")
    with pytest.raises(ValueError, match="no 'text' field"):
        data.local_text(str(tmp_path / "c.jsonl"))


def test_hf_text_error_names_dataset():
    try:
        import datasets  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match=r"wikitext/wikitext-2-raw-v1.*pip install datasets"):
            data.hf_text("wikitext", "wikitext-2-raw-v1", "test")
    else:
        pytest.skip("datasets installed; the error path is not reachable offline-deterministically")


# ---------------------------------------------------------------- tokens


def test_token_windows_shapes():
    ids = np.arange(103)
    w = data.token_windows(ids, 10)
    assert w.shape == (10, 10)
    np.testing.assert_array_equal(w[3], np.arange(30, 40))  # non-overlapping, in order
    assert data.token_windows(ids, 10, n_windows=4).shape == (4, 10)
    assert data.token_windows(np.arange(100), 10, drop_last=False).shape == (10, 10)
    with pytest.raises(ValueError, match="do not divide"):
        data.token_windows(ids, 10, drop_last=False)


def test_token_windows_too_short():
    with pytest.raises(ValueError, match="calibration text too short: 7 tokens for one window of 8"):
        data.token_windows(np.arange(7), 8)
    with pytest.raises(ValueError, match="calibration text too short: 30 tokens for 4 windows of 8"):
        data.token_windows(np.arange(30), 8, n_windows=4)


def test_calibration_tokens():
    toks = data.calibration_tokens(CharTokenizer(), string.ascii_letters, window=16, n_windows=3)
    assert toks.shape == (3, 16) and toks.dtype == np.int32
    assert toks[0, 0] == 1  # BOS starts the stream only
    assert toks[1, 0] == ord(string.ascii_letters[15]) + 2  # stream position 16 is text index 15


def test_host_slice():
    x = np.arange(12).reshape(6, 2)
    shards = [data.host_slice(x, i, 3) for i in range(3)]
    np.testing.assert_array_equal(np.concatenate(shards), x)
    np.testing.assert_array_equal(shards[1], x[2:4])
    with pytest.raises(ValueError, match="evenly"):
        data.host_slice(x, 0, 4)
    with pytest.raises(ValueError, match="process_index"):
        data.host_slice(x, 3, 3)


# ---------------------------------------------------------------- images


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
    paths, labels = data.stratified_sample(imagenet_root, "train", per_class=2, seed=0)
    assert len(paths) == 6
    np.testing.assert_array_equal(labels, [0, 0, 1, 1, 2, 2])
    for p, c in zip(paths, labels):
        assert f"img_{c}_" in os.path.basename(p)
    assert len(set(paths)) == 6
    assert data.stratified_sample(imagenet_root, "train", 2, seed=0)[0] == paths  # deterministic
    sub_paths, sub_labels = data.stratified_sample(imagenet_root, "train", 3, n_classes=2, seed=1)
    assert len(sub_paths) == 6 and len(set(sub_labels.tolist())) == 2
    assert all(np.bincount(sub_labels)[np.unique(sub_labels)] == 3)
    with pytest.raises(ValueError, match="fewer than per_class"):
        data.stratified_sample(imagenet_root, "train", per_class=5)


def test_folder_calibration_and_batches(imagenet_root):
    images, labels = data.imagenet_folder_calibration(imagenet_root, per_class=1, seed=0)
    assert images.shape == (3, 224, 224, 3) and images.dtype == np.float32
    np.testing.assert_array_equal(labels, [0, 1, 2])
    batches = list(data.imagenet_folder_batches(imagenet_root, "val", batch_size=2))
    assert [b[0].shape[0] for b in batches] == [2, 1]
    np.testing.assert_array_equal(np.concatenate([b[1] for b in batches]), [0, 1, 2])
    half = list(data.imagenet_folder_batches(imagenet_root, "val", batch_size=8, process_index=1, process_count=2))
    np.testing.assert_array_equal(half[0][1], [1])


@pytest.mark.parametrize("interpolation", data.INTERPOLATIONS)
def test_constant_image_normalised(interpolation):
    colour = np.array([200, 100, 50], dtype=np.uint8)
    image = PIL.fromarray(np.broadcast_to(colour, (300, 400, 3)).copy())
    out = data.preprocess_image(image, interpolation=interpolation)
    assert out.shape == (224, 224, 3) and out.dtype == np.float32
    expected = (colour / 255.0 - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
    np.testing.assert_allclose(out, np.broadcast_to(expected, out.shape), atol=1e-5)


def test_center_crop_geometry():
    # 512 wide x 256 high needs no resize; the crop keeps columns 144..367, so the red/blue
    # boundary at column 256 lands at crop column 112.
    pixels = np.zeros((256, 512, 3), np.uint8)
    pixels[:, :256, 0] = 255
    pixels[:, 256:, 2] = 255
    out = data.preprocess_image(pixels)
    red = (1.0 - data.IMAGENET_MEAN[0]) / data.IMAGENET_STD[0]
    assert np.allclose(out[:, :112, 0], red) and np.allclose(out[:, 112:, 2], (1.0 - 0.406) / 0.225)
    assert np.allclose(out[:, 112:, 0], -0.485 / 0.229)


def test_bad_interpolation():
    with pytest.raises(ValueError, match="interpolation"):
        data.preprocess_image(np.zeros((256, 256, 3), np.uint8), interpolation="nearest")
