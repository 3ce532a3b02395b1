"""Feature-quality metrics for backbones without a classifier head (e.g. DINOv2).

A compressed backbone is judged three ways against its dense original:
  * linear-probe accuracy: a closed-form ridge probe (`classification.linear_probe`) trained on
    each model's own features of a labelled train set, scored on a test set;
  * dense-probe accuracy: the dense model's probe applied unchanged to the compressed model's test
    features, as a downstream head trained on the dense backbone would be. A fresh probe adapts to
    distorted features; this one does not, so it separates compressions that a fresh probe cannot;
  * feature fidelity: the mean cosine similarity between each model's test features and the
    dense model's, image by image (`cls_cosine`).

    report = probe_report({"dense": f_dense, "fips": f_fips}, (x_train, y_train), (x_test, y_test))
    print(report_table(report))

`probe_models` builds those feature functions from an architecture and several param trees
(one jitted forward shared by all of them) on Fashion-MNIST: what `pipeline.compress_vit` runs
for a config with `eval.probe.source = "fashion_mnist"`.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from fips_jax.data import images as image_data
from fips_jax.evaluators import classification

FeatureFn = Callable[[np.ndarray], Any]  # images [B, ...] -> features [B, D]


def cls_cosine(features_a: np.ndarray, features_b: np.ndarray, eps: float = 1e-12) -> float:
    """Mean over images of cos(a_i, b_i). features_a, features_b: `[N, D]` -> scalar in [-1, 1].

    Computed in float64; a zero vector has cosine 0 with anything (eps guards the division).
    """
    a = np.asarray(features_a, np.float64)
    b = np.asarray(features_b, np.float64)
    if a.ndim != 2 or a.shape != b.shape:
        raise ValueError(f"cls_cosine: expected two [N, D] arrays of one shape, got {a.shape} and {b.shape}")
    dots = np.sum(a * b, axis=1)
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return float(np.mean(dots / np.maximum(norms, eps)))


def extract(feature_fn: FeatureFn, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """feature_fn over `images [N, ...]` in batches -> `[N, D]` float32.

    The last batch is padded to `batch_size` (padding rows dropped) so a jitted function
    compiles once.
    """
    images = np.asarray(images)
    if images.shape[0] == 0:
        raise ValueError("extract: no images")
    out = []
    for start in range(0, images.shape[0], batch_size):
        chunk = images[start:start + batch_size]
        n_real = chunk.shape[0]
        if n_real < batch_size and start:  # a single short batch is left as is
            chunk = np.concatenate([chunk, np.repeat(chunk[:1], batch_size - n_real, axis=0)])
        feats = np.asarray(jax.device_get(feature_fn(chunk)), np.float32)
        if feats.ndim != 2 or feats.shape[0] != chunk.shape[0]:
            raise ValueError(f"feature function returned {feats.shape} for a batch of {chunk.shape[0]}; expected [B, D]")
        out.append(feats[:n_real])
    return np.concatenate(out)


def probe_predict(probe: Mapping[str, Any], train_feats: np.ndarray, feats: np.ndarray) -> np.ndarray:
    """Labels `[M]` that a `classification.linear_probe` result predicts for `feats [M, D]`.

    linear_probe normalises features by its training mean and one RMS scale, which it does not
    return; they are recomputed here from its `train_feats [N, D]` exactly as its docstring says.
    """
    x = np.asarray(train_feats, np.float64)
    mean = x.mean(axis=0)
    scale = np.sqrt(np.mean((x - mean) ** 2)) or 1.0
    logits = ((np.asarray(feats, np.float64) - mean) / scale) @ probe["weights"] + probe["bias"]
    return probe["classes"][np.argmax(logits, axis=1)]


def probe_report(
    feature_fns: Mapping[str, FeatureFn],
    train: tuple[np.ndarray, np.ndarray],
    test: tuple[np.ndarray, np.ndarray],
    reference: str = "dense",
    batch_size: int = 64,
    l2: float = 1e-3,
) -> dict[str, dict[str, float]]:
    """Linear probe and feature fidelity of several models on one labelled split pair.

    feature_fns: {name: images [B, ...] -> features [B, D]} (D may differ between models);
    train, test: (images `[N, ...]`, labels `[N]` int); reference: the name the others are compared
    with (must be among feature_fns).
    Returns {name: {"probe_accuracy", "probe_train_accuracy", "accuracy_vs_reference" (accuracy /
    reference accuracy), "reference_probe_accuracy" (the reference's probe on this model's test
    features), "cls_cosine" (mean cosine of test features to the reference's), "n_train",
    "n_test"}}, in feature_fns order. The last two comparisons need the reference's feature width
    (NaN otherwise).
    """
    if reference not in feature_fns:
        raise ValueError(f"probe_report: reference {reference!r} not in {sorted(feature_fns)}")
    (x_train, y_train), (x_test, y_test) = train, test
    feats = {name: (extract(fn, x_train, batch_size), extract(fn, x_test, batch_size))
             for name, fn in feature_fns.items()}
    probes = {name: classification.linear_probe(f_train, y_train, f_test, y_test, l2=l2)
              for name, (f_train, f_test) in feats.items()}
    ref_acc, (ref_train, ref_test) = probes[reference]["test_accuracy"], feats[reference]
    report = {}
    for name, probe in probes.items():
        test_feats = feats[name][1]
        same_width = test_feats.shape == ref_test.shape
        transfer = probe_predict(probes[reference], ref_train, test_feats) if same_width else None
        report[name] = {
            "probe_accuracy": probe["test_accuracy"],
            "probe_train_accuracy": probe["train_accuracy"],
            "accuracy_vs_reference": probe["test_accuracy"] / ref_acc if ref_acc else float("nan"),
            "reference_probe_accuracy": float(np.mean(transfer == y_test)) if same_width else float("nan"),
            "cls_cosine": cls_cosine(test_feats, ref_test) if same_width else float("nan"),
            "n_train": int(len(y_train)),
            "n_test": int(len(y_test)),
        }
    return report


def report_table(report: Mapping[str, Mapping[str, float]], reference: str = "dense") -> str:
    """Markdown table of a `probe_report` result, one row per model."""
    lines = [f"| model | linear-probe top-1 % | of {reference} % | {reference} probe top-1 % "
             f"| CLS cosine to {reference} |", "|---|---:|---:|---:|---:|"]
    for name, r in report.items():
        lines.append(f"| {name} | {100 * r['probe_accuracy']:.2f} | {100 * r['accuracy_vs_reference']:.1f} "
                     f"| {100 * r['reference_probe_accuracy']:.2f} | {r['cls_cosine']:.4f} |")
    return "\n".join(lines)


def probe_models(arch: Any, models: Mapping[str, Any], probe_cfg: Mapping[str, Any],
                 batch_size: int = 64) -> dict[str, dict[str, float]]:
    """`probe_report` for several param trees of one architecture on Fashion-MNIST.

    models: {name: params} with the dense model under "dense"; probe_cfg: {"source":
    "fashion_mnist", "path": "" (the Debian package's folder), "n_train", "n_test", "l2"}.
    Images are taken as the first n_train of the train split and the first n_test of the test
    split, converted to the model's input size by `image_data.grayscale_to_model_inputs` one batch at
    a time (so the raw uint8 images, not the float inputs, are what stays in memory).
    """
    if probe_cfg["source"] != "fashion_mnist":
        raise ValueError(f"eval.probe.source {probe_cfg['source']!r} not in ('fashion_mnist',)")
    path = probe_cfg.get("path") or None
    train = image_data.fashion_mnist("train", n=probe_cfg["n_train"], path=path)
    test = image_data.fashion_mnist("test", n=probe_cfg["n_test"], path=path)
    size = arch.config.image_size
    apply = jax.jit(arch.apply)  # params are an argument: one compilation serves every model

    def features_of(params):
        return lambda raw: apply(params, jnp.asarray(image_data.grayscale_to_model_inputs(raw, size)))

    fns = {name: features_of(params) for name, params in models.items()}
    return probe_report(fns, train, test, reference="dense", batch_size=batch_size, l2=probe_cfg.get("l2", 1e-3))
