"""The Gemma (1, 2, 3) pieces of GGUF (llama.cpp) import: tensor names, config, norm weights.

What differs from llama GGUF files (`gguf.py`):
  * names: Gemma-2/3 have four norms per block (`attn_norm`, `post_attention_norm`, `ffn_norm` =
    the pre-MLP norm, `post_ffw_norm`) and, for Gemma-3, per-head `attn_q_norm` / `attn_k_norm`;
    Gemma (v1) has Llama's two (`attn_norm`, `ffn_norm` = HF's post_attention_layernorm);
  * llama.cpp's converter stores every Gemma RMSNorm weight as 1 + w (the multiplier), HF and
    fips_jax store w: `norm_to_hf` subtracts the 1 (`norm_to_gguf` adds it back);
  * Q/K rows are *not* permuted (llama.cpp runs Gemma with NEOX-style RoPE, HF's rotate-half);
  * the config comes from `gemma.*` / `gemma2.*` / `gemma3.*` metadata plus what llama.cpp
    hard-codes rather than stores (`hf_config`): for Gemma-2/3 the layer pattern (global every 2nd / 6th layer), Gemma-3's
    local RoPE base (10k), and query_pre_attn_scalar (head_dim, but hidden / heads for the 27B
    models, which llama.cpp recognises by their block count).

    hf = hf_config(file.fields, file.tensors)         # then checkpoint.family(hf["model_type"])
    key = hf_name("blk.3.post_ffw_norm.weight")       # model.layers.3.post_feedforward_layernorm.weight
    w = norm_to_hf(key, file.read(gguf_name))
"""

from __future__ import annotations

import re
from typing import Any, Iterable, Mapping

import numpy as np

ARCHITECTURES = ("gemma", "gemma2", "gemma3")

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
# Gemma (v1): no post-norms and no q/k norms, so llama.cpp's ffn_norm is the pre-MLP norm
# that HF calls post_attention_layernorm (as in llama files).
GEMMA1_LAYER_NAMES = {
    **{k: v for k, v in LAYER_NAMES.items() if k not in ("post_attention_norm", "post_ffw_norm", "attn_q_norm",
                                                          "attn_k_norm")},
    "ffn_norm": "post_attention_layernorm",
}
_LAYER_RE = re.compile(r"^blk\.(\d+)\.(\w+)\.(weight|bias)$")
_HF_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.([\w.]+)\.(weight|bias)$")
NORM_RE = re.compile(r"(layernorm|_norm|\.norm)\.weight$")

# What llama.cpp hard-codes per architecture instead of storing it.
_SLIDING_WINDOW_PATTERN = {"gemma2": 2, "gemma3": 6}
_BLOCKS_27B = {"gemma2": 46, "gemma3": 62}
_LOCAL_ROPE_THETA = 10_000.0


def layer_names(architecture: str = "gemma2") -> dict[str, str]:
    """GGUF layer tensor name -> HF module under `model.layers.{i}`, for a Gemma `architecture`."""
    return GEMMA1_LAYER_NAMES if architecture == "gemma" else LAYER_NAMES


def hf_name(gguf_name: str, architecture: str = "gemma2") -> str:
    """HF tensor name of a Gemma GGUF tensor (unknown names are returned unchanged)."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    m = _LAYER_RE.match(gguf_name)
    names = layer_names(architecture)
    if m and m.group(2) in names:
        return f"model.layers.{m.group(1)}.{names[m.group(2)]}.{m.group(3)}"
    return gguf_name


def gguf_name(hf: str, architecture: str = "gemma2") -> str:
    """Inverse of `hf_name` (for writers and tests)."""
    inverse = {v: k for k, v in _GLOBAL_NAMES.items()}
    if hf in inverse:
        return inverse[hf]
    m = _HF_LAYER_RE.match(hf)
    layer = {v: k for k, v in layer_names(architecture).items()}
    if m and m.group(2) in layer:
        return f"blk.{m.group(1)}.{layer[m.group(2)]}.{m.group(3)}"
    return hf


def is_norm(hf: str) -> bool:
    """True for the RMSNorm weights (block, q/k and final norms) under their HF names."""
    return bool(NORM_RE.search(hf))


def norm_to_hf(hf: str, array: np.ndarray) -> np.ndarray:
    """A tensor read from the file, as HF stores it: norm weights lose llama.cpp's + 1."""
    return array - np.asarray(1, array.dtype) if is_norm(hf) else array


def norm_to_gguf(hf: str, array: np.ndarray) -> np.ndarray:
    """Inverse of `norm_to_hf`: norm weights as llama.cpp's converter writes them (1 + w)."""
    return array + np.asarray(1, array.dtype) if is_norm(hf) else array


_REQUIRED = object()


def _get(fields: Mapping[str, Any], key: str, default: Any = _REQUIRED) -> Any:
    if key in fields:
        value = fields[key]
        return value.tolist() if isinstance(value, np.ndarray) else value
    if default is _REQUIRED:
        raise ValueError(f"GGUF metadata lacks {key!r}")
    return default


def decimal(value: Any) -> float | None:
    """A float32 metadata value as the decimal it was written from (1e-06, not 9.99999997e-07),
    so that configs read from GGUF compare equal to the HF ones."""
    return None if value is None else float(str(np.float32(value)))


def hf_config(fields: Mapping[str, Any], tensor_names: Iterable[str]) -> dict[str, Any]:
    """HF config.json dict (model_type "gemma", "gemma2" or "gemma3_text") from a GGUF file's
    metadata (`fields`, e.g. `GgufFile.fields`) and tensor names; `GemmaConfig` / `Gemma2Config` /
    `Gemma3Config` `.from_hf_config` read it. Raises ValueError for other architectures or missing metadata."""
    arch = _get(fields, "general.architecture", None)
    if arch not in ARCHITECTURES:
        raise ValueError(f"GGUF architecture {arch!r} is not a Gemma; supported here: {list(ARCHITECTURES)}")
    names = set(tensor_names)
    key = lambda k, default=_REQUIRED: _get(fields, f"{arch}.{k}", default)  # noqa: E731
    layers = int(key("block_count"))
    hidden, heads = int(key("embedding_length")), int(key("attention.head_count"))
    head_dim = int(key("attention.key_length", hidden // heads))
    vocab = key("vocab_size", None)
    if vocab is None:
        tokens = _get(fields, "tokenizer.ggml.tokens", None)
        vocab = getattr(tokens, "length", None) or (len(tokens) if tokens is not None else None)
    if vocab is None:
        raise ValueError(f"GGUF metadata lacks {arch}.vocab_size and tokenizer.ggml.tokens")
    out: dict[str, Any] = {
        "model_type": {"gemma3": "gemma3_text"}.get(arch, arch),
        "vocab_size": int(vocab),
        "hidden_size": hidden,
        "intermediate_size": int(key("feed_forward_length")),
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": int(key("attention.head_count_kv", heads)),
        "head_dim": head_dim,
        "max_position_embeddings": int(key("context_length", 8192)),
        "rms_norm_eps": decimal(key("attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": decimal(key("rope.freq_base", 1_000_000.0 if arch == "gemma3" else 10_000.0)),
        "attention_bias": "blk.0.attn_q.bias" in names,
        "tie_word_embeddings": "output.weight" not in names,
        "bos_token_id": _get(fields, "tokenizer.ggml.bos_token_id", None),
        "eos_token_id": _get(fields, "tokenizer.ggml.eos_token_id", None),
        "pad_token_id": _get(fields, "tokenizer.ggml.padding_token_id", None),
    }
    if arch == "gemma":  # llama.cpp's gemma: global attention everywhere, no caps, head_dim scaling
        return out
    pattern = _SLIDING_WINDOW_PATTERN[arch]
    out.update({
        "sliding_window": int(key("attention.sliding_window", 4096)),
        "layer_types": ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(layers)],
        "query_pre_attn_scalar": hidden // heads if layers == _BLOCKS_27B[arch] else head_dim,
        "attn_logit_softcapping": decimal(key("attn_logit_softcapping", None)),
        "final_logit_softcapping": decimal(key("final_logit_softcapping", None)),
        "hidden_activation": "gelu_pytorch_tanh",
    })
    if arch == "gemma3":
        scaling = key("rope.scaling.type", "none")
        if scaling not in ("none", "linear"):
            raise ValueError(f"GGUF rope scaling {scaling!r} not supported; supported: ['none', 'linear']")
        out["rope_scaling"] = (
            {"rope_type": "linear", "factor": decimal(key("rope.scaling.factor"))} if scaling == "linear" else None
        )
        out["rope_local_base_freq"] = _LOCAL_ROPE_THETA
    return out
