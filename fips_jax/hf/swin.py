"""HF <-> fips_jax conversion for Swin (`model_type="swin"`, `SwinForImageClassification`).

A checkpoint family module like `fips_jax.hf.vit`, with the same `params_from_hf`/`params_to_hf`.

HF nests blocks as `swin.encoder.layers.{s}.blocks.{j}`; here they are numbered globally
(`blocks_{i}`), and each stage's `downsample` becomes `merges_{s}`. Older checkpoints also store
`relative_position_index` buffers; they are derived from the window size, so they are ignored
on load and not written.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import numpy as np

from fips_jax.hf import convert
from fips_jax.hf.convert import KeyMapEntry
from fips_jax.hf.vit import (
    ACTIVATION_TO_HF,
    Tensors,
    hf_activation,
    hf_num_labels,
    linear,
    load_with_key_map,
    norm,
    pair,
    unpair,
)
from fips_jax.models import base
from fips_jax.models.swin import SwinArchitecture, SwinConfig


def config_from_hf(hf_config: dict[str, Any]) -> SwinConfig:
    """HF config.json dict (model_type "swin") -> SwinConfig."""
    if hf_config.get("model_type", "swin") != "swin":
        raise ValueError(f"model_type {hf_config.get('model_type')!r} is not Swin")
    return SwinConfig(
        image_size=pair(hf_config.get("image_size", 224)),
        patch_size=pair(hf_config.get("patch_size", 4)),
        num_channels=hf_config.get("num_channels", 3),
        embed_dim=hf_config.get("embed_dim", 96),
        depths=tuple(hf_config.get("depths", (2, 2, 6, 2))),
        num_heads=tuple(hf_config.get("num_heads", (3, 6, 12, 24))),
        window_size=hf_config.get("window_size", 7),
        mlp_ratio=float(hf_config.get("mlp_ratio", 4.0)),
        qkv_bias=hf_config.get("qkv_bias", True),
        layer_norm_eps=hf_config.get("layer_norm_eps", 1e-5),
        activation=hf_activation(hf_config),
        use_absolute_embeddings=hf_config.get("use_absolute_embeddings", False),
        num_labels=hf_num_labels(hf_config),
    )


def config_to_hf(cfg: SwinConfig) -> dict:
    """SwinConfig -> HF config dict. Label names are not kept: merge over the original config
    (`{**original, **config_to_hf(cfg)}`) to keep `id2label`."""
    return {
        "model_type": "swin",
        "architectures": ["SwinForImageClassification"],
        "image_size": unpair(cfg.image_size),
        "patch_size": unpair(cfg.patch_size),
        "num_channels": cfg.num_channels,
        "embed_dim": cfg.embed_dim,
        "depths": list(cfg.depths),
        "num_heads": list(cfg.num_heads),
        "window_size": cfg.window_size,
        "mlp_ratio": cfg.mlp_ratio,
        "qkv_bias": cfg.qkv_bias,
        "layer_norm_eps": cfg.layer_norm_eps,
        "hidden_act": ACTIVATION_TO_HF[cfg.activation],
        "use_absolute_embeddings": cfg.use_absolute_embeddings,
        "num_labels": cfg.num_labels,
    }


def key_map(cfg: SwinConfig) -> list[KeyMapEntry]:
    """(flax path, HF tensor name, transform) for every parameter of the model."""
    emb = "swin.embeddings"
    km = [
        KeyMapEntry("patch_embed/proj/kernel", f"{emb}.patch_embeddings.projection.weight", "conv"),
        KeyMapEntry("patch_embed/proj/bias", f"{emb}.patch_embeddings.projection.bias"),
        *norm("patch_embed/norm", f"{emb}.norm"),
    ]
    if cfg.use_absolute_embeddings:
        km.append(KeyMapEntry("pos_embed", f"{emb}.position_embeddings"))
    for i in range(cfg.num_blocks):
        s, j = cfg.block_stage(i)
        b, h = f"blocks_{i}", f"swin.encoder.layers.{s}.blocks.{j}"
        km += norm(f"{b}/norm1", f"{h}.layernorm_before")
        for name in ("query", "key", "value"):
            km += linear(f"{b}/attn/{name}", f"{h}.attention.self.{name}", cfg.qkv_bias)
        km.append(KeyMapEntry(f"{b}/attn/rel_pos_bias", f"{h}.attention.self.relative_position_bias_table"))
        km += linear(f"{b}/attn/out", f"{h}.attention.output.dense")
        km += norm(f"{b}/norm2", f"{h}.layernorm_after")
        km += linear(f"{b}/mlp/fc1", f"{h}.intermediate.dense")
        km += linear(f"{b}/mlp/fc2", f"{h}.output.dense")
    for s in range(len(cfg.depths) - 1):
        d = f"swin.encoder.layers.{s}.downsample"
        km += norm(f"merges_{s}/norm", f"{d}.norm")
        km += linear(f"merges_{s}/reduction", f"{d}.reduction", bias=False)
    km += norm("norm", "swin.layernorm")
    if cfg.num_labels > 0:
        km += linear("head", "classifier")
    return km


def ignored_keys(cfg: SwinConfig) -> tuple[str, ...]:
    """Checkpoint tensors that may be present but are unused: derived index buffers."""
    return (r"\.relative_position_index$",)


def build_architecture(cfg: SwinConfig, dtype: Any = jnp.float32) -> SwinArchitecture:
    return SwinArchitecture(cfg, dtype=dtype, param_dtype=dtype)


def params_from_hf(tensors: Tensors, cfg: SwinConfig, dtype: Any = jnp.float32) -> dict:
    """`hf.vit.params_from_hf` with Swin's key map."""
    return load_with_key_map(tensors, key_map(cfg), build_architecture(cfg, dtype), ignored_keys(cfg), dtype)


def params_to_hf(params: base.Params, cfg: SwinConfig) -> dict[str, np.ndarray]:
    """`hf.vit.params_to_hf` with Swin's key map."""
    return dict(convert.export_params(params, key_map(cfg)))
