"""HF <-> fips_jax conversion for ViT (`model_type="vit"`) and DeiT (`model_type="deit"`).

Pure functions over a config dict and a tensor getter, so a checkpoint reader (safetensors,
lazy or not) and a registry keyed on `model_type` can drive them:

    cfg = config_from_hf(json.load(open("config.json")))
    params = params_from_hf(lambda name: tensors[name], cfg)
    logits = build_architecture(cfg).apply(params, images_nhwc)
    save_file(params_to_hf(params, cfg), "model.safetensors")

Names follow the checkpoints on the Hub and what `save_pretrained` writes
(`vit.encoder.layer.0.attention.attention.query.weight`, ...). The name map is one list of
(flax path, HF name, transform) triples; `convert_from_hf`/`convert_to_hf` run any such list and
are shared with the Swin converter. Transforms:
    identity   same array
    transpose  torch Linear weight [out, in] <-> flax kernel [in, out]
    conv       torch Conv2d weight OIHW <-> flax Conv kernel HWIO
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import numpy as np

from fips_jax.models import base
from fips_jax.models.vit import ViTArchitecture, ViTConfig

KeyMap = list[tuple[str, str, str]]

# HF `hidden_act` -> base.ACTIVATIONS name, and the name written back.
HF_ACTIVATIONS = {
    "gelu": "gelu",
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "relu": "relu",
    "silu": "silu",
    "swish": "silu",
}
ACTIVATION_TO_HF = {"gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh", "relu": "relu", "silu": "silu"}

# transform name -> (HF array -> flax array, flax shape -> HF shape, flax array -> HF array)
_TRANSFORMS: dict[str, tuple[Callable, Callable, Callable]] = {
    "identity": (lambda a: a, lambda s: tuple(s), lambda a: a),
    "transpose": (lambda a: a.T, lambda s: tuple(s[::-1]), lambda a: a.T),
    "conv": (
        lambda a: a.transpose(2, 3, 1, 0),
        lambda s: (s[3], s[2], s[0], s[1]),
        lambda a: a.transpose(3, 2, 0, 1),
    ),
}


def hf_activation(hf_config: Mapping[str, Any]) -> str:
    act = hf_config.get("hidden_act", "gelu")
    if act not in HF_ACTIVATIONS:
        raise ValueError(f"hidden_act {act!r} not supported; known: {sorted(HF_ACTIVATIONS)}")
    return HF_ACTIVATIONS[act]


def hf_num_labels(hf_config: Mapping[str, Any]) -> int:
    if "num_labels" in hf_config:
        return int(hf_config["num_labels"])
    if "id2label" in hf_config:
        return len(hf_config["id2label"])
    return 2  # PretrainedConfig's default


def pair(v: int | list[int] | tuple[int, ...]) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, (int, np.integer)) else (int(v[0]), int(v[1]))


def unpair(v: tuple[int, int]) -> int | list[int]:
    return v[0] if v[0] == v[1] else list(v)


# ---------------------------------------------------------------------------------------
# Generic name-map conversion.
# ---------------------------------------------------------------------------------------

def convert_from_hf(
    get_tensor: Callable[[str], np.ndarray], key_map: KeyMap, shapes: base.Params, dtype: Any = np.float32
) -> dict:
    """Read every tensor `key_map` names and place it at its flax path.

    shapes: a tree like the model's params whose leaves have `.shape` (e.g. `jax.eval_shape`
    of `init`), used to check each tensor. All missing and mis-shaped tensors are collected and
    reported in one ValueError. Returns a nested dict of numpy arrays in `dtype` (None keeps
    the checkpoint's), in host memory: place them on devices at the call site.
    """
    params: dict = {}
    problems = []
    for path, name, transform in key_map:
        to_flax, hf_shape, _ = _TRANSFORMS[transform]
        want = tuple(base.get_path(shapes, path).shape)
        try:
            t = np.asarray(get_tensor(name))
        except Exception as e:  # readers differ in what they raise for an absent name
            problems.append(f"missing {name} (for {path}, expected shape {hf_shape(want)}): {type(e).__name__}")
            continue
        if tuple(t.shape) != hf_shape(want):
            problems.append(f"{name}: expected shape {hf_shape(want)}, found {tuple(t.shape)} (for {path})")
            continue
        t = np.ascontiguousarray(to_flax(t))
        _set(params, path, t if dtype is None else t.astype(dtype))
    if problems:
        raise ValueError(f"{len(problems)} problem(s) reading the HF checkpoint:\n  " + "\n  ".join(problems))
    return params


def convert_to_hf(params: base.Params, key_map: KeyMap, dtype: Any = None) -> dict[str, np.ndarray]:
    """flax params -> {HF name: contiguous numpy array} for every entry of `key_map`."""
    out = {}
    for path, name, transform in key_map:
        a = np.asarray(jax.device_get(base.get_path(params, path)))
        out[name] = np.ascontiguousarray(_TRANSFORMS[transform][2](a).astype(dtype or a.dtype))
    return out


def _set(tree: dict, path: str, value: Any) -> None:
    *parents, leaf = path.split("/")
    for p in parents:
        tree = tree.setdefault(p, {})
    tree[leaf] = value


def linear(path: str, name: str, bias: bool = True) -> KeyMap:
    """torch Linear `name.{weight,bias}` <-> flax Dense `path/{kernel,bias}`."""
    km = [(f"{path}/kernel", f"{name}.weight", "transpose")]
    return (km + [(f"{path}/bias", f"{name}.bias", "identity")]) if bias else km


def norm(path: str, name: str) -> KeyMap:
    """torch LayerNorm `name.{weight,bias}` <-> flax LayerNorm `path/{scale,bias}`."""
    return [(f"{path}/scale", f"{name}.weight", "identity"), (f"{path}/bias", f"{name}.bias", "identity")]


# ---------------------------------------------------------------------------------------
# ViT / DeiT.
# ---------------------------------------------------------------------------------------

def config_from_hf(hf_config: Mapping[str, Any]) -> ViTConfig:
    """HF config.json dict (model_type "vit" or "deit") -> ViTConfig."""
    model_type = hf_config.get("model_type", "vit")
    if model_type not in ("vit", "deit"):
        raise ValueError(f"model_type {model_type!r} is not ViT/DeiT")
    archs = hf_config.get("architectures") or []
    return ViTConfig(
        hidden_size=hf_config.get("hidden_size", 768),
        num_layers=hf_config.get("num_hidden_layers", 12),
        num_heads=hf_config.get("num_attention_heads", 12),
        intermediate_size=hf_config.get("intermediate_size", 3072),
        image_size=pair(hf_config.get("image_size", 224)),
        patch_size=pair(hf_config.get("patch_size", 16)),
        num_channels=hf_config.get("num_channels", 3),
        num_labels=hf_num_labels(hf_config),
        layer_norm_eps=hf_config.get("layer_norm_eps", 1e-12),
        qkv_bias=hf_config.get("qkv_bias", True),
        activation=hf_activation(hf_config),
        # Every DeiT backbone carries the distillation token; only the "WithTeacher" class
        # has the second head.
        dist_token=model_type == "deit",
        dist_head=model_type == "deit" and any("WithTeacher" in a for a in archs),
    )


def config_to_hf(cfg: ViTConfig) -> dict:
    """ViTConfig -> HF config dict. Label names are not kept: merge over the original config
    (`{**original, **config_to_hf(cfg)}`) to keep `id2label`."""
    if cfg.dist_head:
        arch = "DeiTForImageClassificationWithTeacher"
    else:
        arch = "DeiTForImageClassification" if cfg.dist_token else "ViTForImageClassification"
    return {
        "model_type": "deit" if cfg.dist_token else "vit",
        "architectures": [arch],
        "hidden_size": cfg.hidden_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "intermediate_size": cfg.intermediate_size,
        "image_size": unpair(cfg.image_size),
        "patch_size": unpair(cfg.patch_size),
        "num_channels": cfg.num_channels,
        "num_labels": cfg.num_labels,
        "layer_norm_eps": cfg.layer_norm_eps,
        "qkv_bias": cfg.qkv_bias,
        "hidden_act": ACTIVATION_TO_HF[cfg.activation],
    }


def key_map(cfg: ViTConfig) -> KeyMap:
    """(flax path, HF tensor name, transform) for every parameter of the model."""
    p = "deit" if cfg.dist_token else "vit"
    emb = f"{p}.embeddings"
    km: KeyMap = [
        ("patch_embed/proj/kernel", f"{emb}.patch_embeddings.projection.weight", "conv"),
        ("patch_embed/proj/bias", f"{emb}.patch_embeddings.projection.bias", "identity"),
        ("cls_token", f"{emb}.cls_token", "identity"),
        ("pos_embed", f"{emb}.position_embeddings", "identity"),
    ]
    if cfg.dist_token:
        km.append(("dist_token", f"{emb}.distillation_token", "identity"))
    for i in range(cfg.num_layers):
        b, h = f"blocks_{i}", f"{p}.encoder.layer.{i}"
        km += norm(f"{b}/norm1", f"{h}.layernorm_before")
        for ours, theirs in (("query", "query"), ("key", "key"), ("value", "value")):
            km += linear(f"{b}/attn/{ours}", f"{h}.attention.attention.{theirs}", cfg.qkv_bias)
        km += linear(f"{b}/attn/out", f"{h}.attention.output.dense")
        km += norm(f"{b}/norm2", f"{h}.layernorm_after")
        km += linear(f"{b}/mlp/fc1", f"{h}.intermediate.dense")
        km += linear(f"{b}/mlp/fc2", f"{h}.output.dense")
    km += norm("norm", f"{p}.layernorm")
    if cfg.num_labels > 0:
        if cfg.dist_head:
            km += linear("head", "cls_classifier") + linear("head_dist", "distillation_classifier")
        else:
            km += linear("head", "classifier")
    return km


def build_architecture(cfg: ViTConfig) -> ViTArchitecture:
    return ViTArchitecture(cfg)


def params_from_hf(get_tensor: Callable[[str], np.ndarray], cfg: ViTConfig, dtype: Any = np.float32) -> dict:
    """Flax params (numpy leaves) from HF tensors; raises one ValueError listing every
    missing or mis-shaped tensor. Tensors not in `key_map` (e.g. a pooler) are ignored."""
    shapes = jax.eval_shape(build_architecture(cfg).init, jax.random.key(0))
    return convert_from_hf(get_tensor, key_map(cfg), shapes, dtype)


def params_to_hf(params: base.Params, cfg: ViTConfig, dtype: Any = None) -> dict[str, np.ndarray]:
    """Flax params -> {HF name: array}, ready for `safetensors.numpy.save_file`."""
    return convert_to_hf(params, key_map(cfg), dtype)
