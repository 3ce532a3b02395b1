"""Image-classification metrics: top-k accuracy over batches, and a closed-form linear probe.

`classification_accuracy` is the SPEC §6 ImageNet-1k number (full 50k val, preprocessing in
`fips_jax.data`). `linear_probe` measures feature quality without a classifier head, e.g. to
compare dense and compressed ViT features on a small labelled set.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

LogitsFn = Callable[[jax.Array], jax.Array]  # images [B, H, W, 3] -> logits [B, C]
Progress = Callable[[int], None]  # examples done so far


def topk_correct(logits: jax.Array, labels: jax.Array, ks: Sequence[int] = (1, 5)) -> jax.Array:
    """Whether each label is among the k highest logits: `[len(ks), B]` bool.

    logits: `[B, C]`, labels: `[B]` int. Ties are broken towards the lower class index
    (`lax.top_k`), so a constant-logit model does not get credit for every class. A k larger
    than C counts as C.
    """
    if logits.ndim != 2 or labels.shape != logits.shape[:1]:
        raise ValueError(f"expected logits [B, C] and labels [B], got {logits.shape} and {labels.shape}")
    k_max = min(max(ks), logits.shape[-1])
    _, top = jax.lax.top_k(logits.astype(jnp.float32), k_max)  # [B, k_max], best first
    hit = top == labels[:, None]
    return jnp.stack([hit[:, : min(k, k_max)].any(axis=-1) for k in ks])


def classification_accuracy(
    logits_fn: LogitsFn,
    batches: Iterable[tuple[np.ndarray, np.ndarray]],
    ks: Sequence[int] = (1, 5),
    jit: bool = True,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Top-k accuracy of `logits_fn` over `(images [B, ...], labels [B])` batches.

    Every batch is padded to the first batch's size (padding rows discarded), so a jitted model
    compiles once even though the last batch of a split is usually short.
    Returns {"top1": float, "top5": float, ..., "n_examples": int} with accuracies in [0, 1].
    """
    ks = tuple(ks)

    def count(images: jax.Array, labels: jax.Array) -> jax.Array:
        return topk_correct(logits_fn(images), labels, ks)

    count_fn = jax.jit(count) if jit else count

    correct = np.zeros(len(ks), dtype=np.int64)
    n_examples, batch_size = 0, None
    for images, labels in batches:
        images, labels = np.asarray(images), np.asarray(labels, dtype=np.int32)
        n_real = labels.shape[0]
        if images.shape[0] != n_real:
            raise ValueError(f"batch has {images.shape[0]} images but {n_real} labels")
        batch_size = batch_size or n_real
        if n_real > batch_size:
            raise ValueError(f"batch of {n_real} larger than the first batch ({batch_size})")
        if n_real < batch_size:
            pad = batch_size - n_real
            images = np.concatenate([images, np.repeat(images[:1], pad, axis=0)])
            labels = np.concatenate([labels, np.repeat(labels[:1], pad)])
        hits = np.asarray(jax.device_get(count_fn(jnp.asarray(images), jnp.asarray(labels))))
        correct += hits[:, :n_real].sum(axis=1)
        n_examples += n_real
        if progress is not None:
            progress(n_examples)
    if n_examples == 0:
        raise ValueError("classification_accuracy: no batches")
    out: dict[str, Any] = {f"top{k}": float(c) / n_examples for k, c in zip(ks, correct)}
    out["n_examples"] = n_examples
    return out


def linear_probe(
    train_feats: np.ndarray,
    train_labels: np.ndarray,
    test_feats: np.ndarray,
    test_labels: np.ndarray,
    l2: float = 1e-3,
) -> dict[str, Any]:
    """Closed-form ridge regression on one-hot targets; accuracy of its argmax.

    train_feats: `[N, D]`, train_labels: `[N]` int; test_feats: `[M, D]`, test_labels: `[M]`.
    Features are centred with the training mean and divided by the training RMS (one scalar),
    so `l2` does not depend on the feature scale. Solves, in float64,
        min_W (1/N) ||X W - Y||^2 + l2 ||W||^2    (bias = class frequencies, unregularised)
    in the primal (D x D system) or dual (N x N) form, whichever is smaller. Deterministic.
    Test labels absent from training count as errors.

    Returns {"train_accuracy", "test_accuracy", "n_classes", "weights" [D, K], "bias" [K],
    "classes" [K]} where predictions are `classes[argmax(((x - mean) / scale) @ weights + bias)]`.
    """
    x = np.asarray(train_feats, dtype=np.float64)
    x_test = np.asarray(test_feats, dtype=np.float64)
    if x.ndim != 2 or x_test.ndim != 2 or x.shape[1] != x_test.shape[1]:
        raise ValueError(f"features must be [N, D] and [M, D], got {x.shape} and {x_test.shape}")
    if l2 <= 0:
        raise ValueError(f"l2 must be positive for a unique solution, got {l2}")
    train_labels = np.asarray(train_labels)
    test_labels = np.asarray(test_labels)
    classes, y_idx = np.unique(train_labels, return_inverse=True)
    n, d = x.shape
    y = np.eye(len(classes))[y_idx]  # [N, K]

    mean = x.mean(axis=0)
    xc = x - mean
    scale = np.sqrt(np.mean(xc**2)) or 1.0  # constant features: nothing to scale
    xc /= scale
    bias = y.mean(axis=0)
    yc = y - bias
    if d <= n:
        weights = np.linalg.solve(xc.T @ xc + n * l2 * np.eye(d), xc.T @ yc)
    else:
        weights = xc.T @ np.linalg.solve(xc @ xc.T + n * l2 * np.eye(n), yc)

    def predict(feats: np.ndarray) -> np.ndarray:
        return classes[np.argmax(((feats - mean) / scale) @ weights + bias, axis=1)]

    return {
        "train_accuracy": float(np.mean(predict(x) == train_labels)),
        "test_accuracy": float(np.mean(predict(x_test) == test_labels)),
        "n_classes": len(classes),
        "weights": weights,
        "bias": bias,
        "classes": classes,
    }
