"""Image calibration and evaluation inputs (ViTs) as plain numpy arrays.

ImageNet: a folder `root/{train,val}/<wnid>/*.JPEG` (any image extension), every image
preprocessed by one function: resize the shorter side to 256, center crop 224, ImageNet mean/std,
NHWC float32 (SPEC §6). Loaded eagerly (`imagenet_folder_calibration`, a class-stratified
sample) or streamed a batch at a time (`image_batches` over `stratified_sample`'s files: the same
sample; `imagenet_folder_batches`: a whole split).

Fashion-MNIST: the IDX files of the Debian package, read with numpy alone; `grayscale_to_model_inputs`
turns its 28x28 grayscale images into a ViT's normalised RGB input, so a backbone can be
linear-probed offline.

Pillow is imported lazily so that the rest of the package works without it.
"""

from __future__ import annotations

import gzip
import os
from typing import Any, Iterator, Sequence

import numpy as np

# ---------------------------------------------------------------------------------------------
# ImageNet folders
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


def image_batches(
    paths: Sequence[str], labels: Sequence[int] | np.ndarray, batch_size: int = 256, **preprocess_kwargs
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Image files streamed as (images `[b, 224, 224, 3]` float32, labels `[b]` int32), decoding one
    batch at a time (evaluation sets too large to hold as float32); the last batch may be smaller.
    `image_batches(*stratified_sample(root, split, per_class, n_classes, seed))` streams what
    `imagenet_folder_calibration` returns whole."""
    labels = np.asarray(labels, np.int32)
    for start in range(0, len(paths), batch_size):
        yield load_images(paths[start : start + batch_size], **preprocess_kwargs), labels[start : start + batch_size]


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
    yield from image_batches([p for p, _ in items], [c for _, c in items], batch_size, **preprocess_kwargs)


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


def fashion_mnist_batches(
    split: str, n: int | None = None, path: str | None = None, size: int | tuple[int, int] = 224,
    batch_size: int = 256,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """`fashion_mnist` converted by `grayscale_to_model_inputs` a batch at a time: (images
    `[b, H, W, 3]` float32, labels `[b]` int32); only the uint8 images stay in memory whole."""
    images, labels = fashion_mnist(split, n, path)
    for start in range(0, images.shape[0], batch_size):
        stop = start + batch_size
        yield grayscale_to_model_inputs(images[start:stop], size), labels[start:stop]


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
