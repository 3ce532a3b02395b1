"""HF <-> fips_jax conversion for ViT (`model_type="vit"`) and DeiT (`model_type="deit"`).

A checkpoint family module (see `checkpoint.FAMILIES`): `config_from_hf`, `config_to_hf`,
`key_map`, `ignored_keys` and `build_architecture`, plus `params_from_hf`/`params_to_hf` for
callers that hold tensors themselves:

    cfg = config_from_hf(json.load(open("config.json")))
    params = params_from_hf(safetensors.numpy.load_file("model.safetensors"), cfg)
    logits = build_architecture(cfg).apply(params, images_nhwc)
    safetensors.numpy.save_file(params_to_hf(params, cfg), "model.safetensors")

Names follow the checkpoints on the Hub and what `save_pretrained` writes
(`vit.encoder.layer.0.attention.attention.query.weight`, ...). Transforms are `convert.TRANSFORMS`
names: "transpose" for Linear weights, "conv" for the patch-embedding kernel (OIHW <-> HWIO).
The small helpers below (`linear`, `norm`, `pair`, ...) are shared with the Swin module.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import jax.numpy as jnp
import numpy as np

from fips_jax.hf import convert
from fips_jax.hf.convert import KeyMapEntry
from fips_jax.models import base
from fips_jax.models.vit import ViTArchitecture, ViTConfig

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

Tensors = Any  # convert.TensorSource | Mapping[str, np.ndarray] | Callable[[str], np.ndarray]


# ---------------------------------------------------------------------------------------
# Shared helpers.
# ---------------------------------------------------------------------------------------

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


class _MappingSource:
    """`convert.TensorSource` over a dict of arrays (e.g. `safetensors.numpy.load_file`)."""

    def __init__(self, tensors: Mapping[str, np.ndarray]):
        self.source, self._tensors = "tensor dict", tensors

    def keys(self) -> list[str]:
        return list(self._tensors)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(np.shape(self._tensors[key]))

    def get(self, key: str, dtype: Any = np.float32) -> np.ndarray:
        a = np.asarray(self._tensors[key])
        return a if dtype is None else a.astype(dtype)


class _GetterSource(_MappingSource):
    """`convert.TensorSource` over a `name -> array` callable. A callable cannot list its
    checkpoint, so only the key map's names are probed and unexpected tensors go unreported."""

    def __init__(self, get_tensor: Callable[[str], np.ndarray], names: list[str]):
        tensors = {}
        for name in names:
            try:
                tensors[name] = get_tensor(name)
            except Exception:  # readers differ in what they raise for an absent name
                pass
        super().__init__(tensors)
        self.source = "tensor getter"


def load_with_key_map(tensors: Tensors, key_map: list[KeyMapEntry], arch: Any, ignore: tuple[str, ...],
                      dtype: Any) -> dict:
    """`convert.load_params` from a TensorSource, a dict of arrays or a getter callable."""
    if not hasattr(tensors, "shape") or not hasattr(tensors, "get"):
        if isinstance(tensors, Mapping):
            tensors = _MappingSource(tensors)
        else:
            tensors = _GetterSource(tensors, [e[1] for e in key_map])
    return convert.load_params(tensors, key_map, convert.expected_shapes(arch.init), dtype, ignore)


def linear(path: str, name: str, bias: bool = True) -> list[KeyMapEntry]:
    """torch Linear `name.{weight,bias}` <-> flax Dense `path/{kernel,bias}`."""
    km = [KeyMapEntry(f"{path}/kernel", f"{name}.weight", "transpose")]
    return (km + [KeyMapEntry(f"{path}/bias", f"{name}.bias")]) if bias else km


def norm(path: str, name: str) -> list[KeyMapEntry]:
    """torch LayerNorm `name.{weight,bias}` <-> flax LayerNorm `path/{scale,bias}`."""
    return [KeyMapEntry(f"{path}/scale", f"{name}.weight"), KeyMapEntry(f"{path}/bias", f"{name}.bias")]


def embedding_entries(emb: str) -> list[KeyMapEntry]:
    """Patch projection, CLS token and position table under the HF prefix `emb` (e.g. "vit.embeddings")."""
    return [
        KeyMapEntry("patch_embed/proj/kernel", f"{emb}.patch_embeddings.projection.weight", "conv"),
        KeyMapEntry("patch_embed/proj/bias", f"{emb}.patch_embeddings.projection.bias"),
        KeyMapEntry("cls_token", f"{emb}.cls_token"),
        KeyMapEntry("pos_embed", f"{emb}.position_embeddings"),
    ]


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


def key_map(cfg: ViTConfig) -> list[KeyMapEntry]:
    """(flax path, HF tensor name, transform) for every parameter of the model."""
    prefix = "deit" if cfg.dist_token else "vit"
    km = embedding_entries(f"{prefix}.embeddings")
    if cfg.dist_token:
        km.append(KeyMapEntry("dist_token", f"{prefix}.embeddings.distillation_token"))
    for i in range(cfg.num_layers):
        b, h = f"blocks_{i}", f"{prefix}.encoder.layer.{i}"
        km += norm(f"{b}/norm1", f"{h}.layernorm_before")
        for ours, theirs in (("query", "query"), ("key", "key"), ("value", "value")):
            km += linear(f"{b}/attn/{ours}", f"{h}.attention.attention.{theirs}", cfg.qkv_bias)
        km += linear(f"{b}/attn/out", f"{h}.attention.output.dense")
        km += norm(f"{b}/norm2", f"{h}.layernorm_after")
        km += linear(f"{b}/mlp/fc1", f"{h}.intermediate.dense")
        km += linear(f"{b}/mlp/fc2", f"{h}.output.dense")
    km += norm("norm", f"{prefix}.layernorm")
    if cfg.num_labels > 0:
        if cfg.dist_head:
            km += linear("head", "cls_classifier") + linear("head_dist", "distillation_classifier")
        else:
            km += linear("head", "classifier")
    return km


def ignored_keys(cfg: ViTConfig) -> tuple[str, ...]:
    """Checkpoint tensors that may be present but are unused: the pooler of a ViTModel export."""
    return (r"^(vit|deit)\.pooler\.",)


def build_architecture(cfg: ViTConfig, dtype: Any = jnp.float32) -> ViTArchitecture:
    return ViTArchitecture(cfg, dtype=dtype, param_dtype=dtype)


def params_from_hf(tensors: Tensors, cfg: ViTConfig, dtype: Any = jnp.float32) -> dict:
    """Flax params from HF tensors: a `convert.TensorSource`, a dict of arrays, or a
    `name -> array` callable. Raises one ValueError listing every missing, mis-shaped (and, but
    for a callable, unexpected) tensor."""
    return load_with_key_map(tensors, key_map(cfg), build_architecture(cfg, dtype), ignored_keys(cfg), dtype)


def params_to_hf(params: base.Params, cfg: ViTConfig) -> dict[str, np.ndarray]:
    """Flax params -> {HF name: array}, ready for `safetensors.numpy.save_file`."""
    return dict(convert.export_params(params, key_map(cfg)))
