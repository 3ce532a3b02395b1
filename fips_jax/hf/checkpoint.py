"""Load and save HF-layout checkpoints (`config.json` + safetensors) for every architecture.

`config.json`'s `model_type` picks a *family module* from `FAMILIES`. A family module provides

    config_from_hf(hf: dict) -> Config                      # frozen config dataclass
    config_to_hf(cfg: Config) -> dict                       # must set "model_type" (and "architectures")
    key_map(cfg: Config) -> list[convert.KeyMapEntry]       # every param, flax path <-> HF key
    build_architecture(cfg: Config, dtype=jnp.float32) -> base.Architecture
    ignored_keys(cfg: Config) -> tuple[str, ...]            # optional: regexes of HF keys to skip
    checkpoint_key_map(cfg, keys) -> list[KeyMapEntry]      # optional: key_map renamed to the layout
                                                            # of a checkpoint holding `keys` (loading)

and the architecture it builds must have `arch.name` equal to a `FAMILIES` key that maps back to
the same module (used by `save_pretrained`). Registering a family is one entry in `FAMILIES`.
"""

from __future__ import annotations

import json
import os
from types import ModuleType
from typing import Any, Callable

import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from fips_jax.hf import convert, gemma, gemma2, gemma3, llama, qwen2, qwen3, safetensors_io, swin, vit
from fips_jax.models import base

FAMILIES: dict[str, ModuleType] = {
    "llama": llama,
    "gemma": gemma,
    "gemma2": gemma2,
    "qwen2": qwen2,
    "qwen3": qwen3,
    "gemma3_text": gemma3,
    "gemma3": gemma3,  # multimodal checkpoints: the text tower, saved back as "gemma3_text"
    "vit": vit,
    "deit": vit,  # DeiT checkpoints build a "vit" architecture (distillation token optional)
    "swin": swin,
}

CONFIG_FILE = "config.json"
# Weights, configs and tokenizer/preprocessor files; never the *.bin / *.pt copies of the weights.
_HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer.model", "*.txt"]


def family(model_type: str) -> ModuleType:
    """The family module registered for an HF model_type."""
    if model_type not in FAMILIES:
        raise ValueError(f"model_type {model_type!r} is not supported; supported: {sorted(FAMILIES)}")
    return FAMILIES[model_type]


def resolve(path_or_hub_id: str) -> str:
    """A local checkpoint folder: the argument itself, or a Hugging Face Hub snapshot of it."""
    path = os.fspath(path_or_hub_id)
    if os.path.isdir(path):
        return path
    if os.path.exists(path) or path.startswith((".", "/", "~")):
        raise ValueError(f"{path}: not a checkpoint folder")
    from huggingface_hub import snapshot_download  # the Hub path alone needs it

    return snapshot_download(repo_id=path, allow_patterns=_HUB_PATTERNS)


def read_config(folder: str) -> tuple[ModuleType, Any]:
    """(family module, config) from `folder/config.json`."""
    path = os.path.join(folder, CONFIG_FILE)
    if not os.path.exists(path):
        raise ValueError(f"{folder}: no {CONFIG_FILE}")
    with open(path) as f:
        hf = json.load(f)
    if "model_type" not in hf:
        raise ValueError(f"{path}: no model_type; supported: {sorted(FAMILIES)}")
    fam = family(hf["model_type"])
    return fam, fam.config_from_hf(hf)


def _ignored(fam: ModuleType, cfg: Any) -> tuple[str, ...]:
    return tuple(fam.ignored_keys(cfg)) if hasattr(fam, "ignored_keys") else ()


def load_pretrained(
    path_or_hub_id: str, dtype: Any = jnp.float32, place: Callable[[str, np.ndarray], Any] | None = None
) -> tuple[base.Architecture, dict]:
    """(architecture, params) from an HF checkpoint folder or Hub id.

    dtype: param and compute dtype. place: see `convert.load_params` (e.g. sharded placement).
    Raises ValueError naming an unsupported model_type, or listing every missing, unexpected and
    mis-shaped tensor; truncated files fail before any tensor is loaded.
    """
    folder = resolve(path_or_hub_id)
    fam, cfg = read_config(folder)
    arch = fam.build_architecture(cfg, dtype=dtype)
    reader = safetensors_io.SafetensorsReader(folder)
    shapes = convert.expected_shapes(arch.init)
    key_map = fam.checkpoint_key_map(cfg, reader.keys()) if hasattr(fam, "checkpoint_key_map") else fam.key_map(cfg)
    params = convert.load_params(reader, key_map, shapes, dtype, _ignored(fam, cfg), place)
    return arch, params


def _dtype_name(params: dict) -> str:
    dtypes = {np.dtype(x.dtype).name for x in traverse_util.flatten_dict(params, sep="/").values()}
    return dtypes.pop() if len(dtypes) == 1 else "float32"


def save_pretrained(
    arch: base.Architecture, params: dict, out_dir: str, max_shard_bytes: int | None = None,
    extra_files: dict[str, bytes] | None = None,
) -> list[str]:
    """Write `config.json` and HF-layout safetensors that transformers (and `load_pretrained`) load.

    max_shard_bytes: split into index + shards above this size. Returns the files written.
    extra_files: {name: bytes} written in the same folder, in the same atomic step (tokenizer files).
    The folder (weights and config together) appears whole or not at all, see
    `safetensors_io.save_checkpoint`; other files already in `out_dir` are kept.
    """
    fam = family(arch.name)
    tensors = convert.export_params(params, fam.key_map(arch.config))
    # "dtype" for current transformers, "torch_dtype" for older releases.
    hf = {**fam.config_to_hf(arch.config), "dtype": _dtype_name(params), "torch_dtype": _dtype_name(params)}
    config = json.dumps(hf, indent=2, sort_keys=True).encode()
    return safetensors_io.save_checkpoint(out_dir, tensors, max_shard_bytes,
                                          extra_files={**(extra_files or {}), CONFIG_FILE: config})
