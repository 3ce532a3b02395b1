"""GGUF (llama.cpp) export of a dense-layout decoder: metadata, llama.cpp tensor names, its
layout conventions, and the tokenizer.

Tensors start from the family's HF key map (`checkpoint.FAMILIES`, `convert.export_params`),
so they are in HF names and HF `[out, in]` layout; the `gguf` package's per-architecture name
map (`gguf.get_tensor_name_map`) turns `model.layers.3.mlp.up_proj` into `blk.3.ffn_up`. What
differs between architectures is one `GgufArch` entry in `ARCHS`:

  * metadata: `<arch>.*` keys from the config (llama.cpp reads them; so does transformers'
    GGUF loader, through its own rename table);
  * permute_qk: llama.cpp's llama graph applies an interleaved RoPE, so its converter permutes
    each head's Q/K rows from HF's rotate-half order (`permute_rope_rows`, the inverse of
    `gguf.unpermute_rope_rows`); gemma models use NEOX-style RoPE and keep HF's order;
  * norm_offset: Gemma's RMSNorm multiplies by (1 + w) and HF stores w; llama.cpp multiplies by
    the stored weight, so its converter stores 1 + w (transformers' loader subtracts 1 again).

Where llama.cpp fixes what a config could vary, the export refuses rather than write a file that
runs differently: gemma2 queries are scaled by head_dim ** -0.5 (so query_pre_attn_scalar must
equal head_dim, or hidden/heads for the 46-layer 27B), soft-capping is always on, windows
alternate from layer 0. transformers' GGUF loader reads neither the scalar nor the caps and uses
Gemma-2's defaults (256, 50, 30), as the released 2B and 9B models have.

Quantisation is the `gguf` package's (`gguf.quants.quantize`). As llama.cpp's converter does,
1-D tensors (norms, biases) stay float32, and a tensor whose rows are not whole blocks of the
chosen type is stored float16 instead.

    write_gguf(path, arch, params, qtype="Q8_0", tokenizer_gguf=source_gguf_path)
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable

import gguf
import numpy as np

from fips_jax import checkpointing
from fips_jax.hf import checkpoint, convert
from fips_jax.models import base


def permute_rope_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """HF rotate-half Q/K rows -> llama.cpp's interleaved order. w: [n_heads * hd, ...].

    Each head's row pair (i, i + hd/2) moves to the adjacent rows (2i, 2i + 1); the inverse of
    `fips_jax.hf.gguf.unpermute_rope_rows`."""
    hd = w.shape[0] // n_heads
    return w.reshape(n_heads, 2, hd // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _llama_metadata(cfg: Any) -> dict[str, Any]:
    meta = {"rope.dimension_count": cfg.head_dim}
    scaling = cfg.rope_scaling
    if scaling is not None:
        if scaling.rope_type != "linear":
            # llama3-style scaling is a rope_freqs tensor in GGUF; the loaders here do not read it.
            raise ValueError(f"GGUF export: llama rope scaling {scaling.rope_type!r} not supported; supported: linear")
        meta.update({"rope.scaling.type": "linear", "rope.scaling.factor": float(scaling.factor)})
    return meta


def _head_dim_metadata(cfg: Any) -> dict[str, Any]:
    # key_length carries an explicit head_dim (Gemma's and Qwen3's are not hidden // heads).
    return {"attention.key_length": cfg.head_dim, "attention.value_length": cfg.head_dim}


def _gemma2_metadata(cfg: Any) -> dict[str, Any]:
    # llama.cpp scales queries by head_dim ** -0.5 (hidden / heads for the 46-layer 27B model),
    # not by the config's query_pre_attn_scalar: a model where they differ would run differently.
    scalar = cfg.hidden_size / cfg.num_attention_heads if cfg.num_hidden_layers == 46 else cfg.head_dim
    if float(cfg.query_pre_attn_scalar) != float(scalar):
        raise ValueError(f"GGUF export: gemma2 query_pre_attn_scalar={cfg.query_pre_attn_scalar} but llama.cpp "
                         f"scales queries by {scalar} ** -0.5 (head_dim, or hidden/heads for 46 layers)")
    want = tuple("sliding_attention" if i % 2 == 0 else "full_attention" for i in range(cfg.num_hidden_layers))
    if cfg.sliding_window is not None and tuple(cfg.layer_types) != want:
        raise ValueError(f"GGUF export: gemma2 layer_types {list(cfg.layer_types)} must alternate sliding/full "
                         "from layer 0 (llama.cpp's fixed gemma2 pattern)")
    caps = {"attn_logit_softcapping": cfg.attn_logit_softcapping, "final_logit_softcapping": cfg.final_logit_softcapping}
    if None in caps.values():
        raise ValueError(f"GGUF export: gemma2 without soft-capping ({caps}): llama.cpp's gemma2 always caps")
    return {
        **_head_dim_metadata(cfg),
        # No window is a window as long as the context (llama.cpp's gemma2 always windows even layers).
        "attention.sliding_window": cfg.sliding_window or cfg.max_position_embeddings,
        **{k: float(v) for k, v in caps.items()},
    }


def _gemma3_metadata(cfg: Any) -> dict[str, Any]:
    # llama.cpp fixes what Gemma-3 configs could vary: global attention on every 6th layer, a
    # 10k RoPE base on the local ones, queries scaled by head_dim ** -0.5 (hidden / heads for the
    # 62-layer 27B), and no soft-capping.
    scalar = cfg.hidden_size // cfg.num_attention_heads if cfg.num_hidden_layers == 62 else cfg.head_dim
    want = tuple("sliding_attention" if (i + 1) % 6 else "full_attention" for i in range(cfg.num_hidden_layers))
    problems = []
    if float(cfg.query_pre_attn_scalar) != float(scalar):
        problems.append(f"query_pre_attn_scalar={cfg.query_pre_attn_scalar} (llama.cpp scales by {scalar})")
    if tuple(cfg.layer_types) != want:
        problems.append("layer_types other than global on every 6th layer")
    if float(cfg.rope_local_base_freq) != 10_000.0:
        problems.append(f"rope_local_base_freq={cfg.rope_local_base_freq} (llama.cpp uses 10000)")
    if cfg.final_logit_softcapping is not None:
        problems.append(f"final_logit_softcapping={cfg.final_logit_softcapping} (llama.cpp's gemma3 has none)")
    if cfg.rope_scaling is not None and cfg.rope_scaling.rope_type != "linear":
        problems.append(f"rope scaling {cfg.rope_scaling.rope_type!r} (linear only)")
    if problems:
        raise ValueError("GGUF export: this gemma3 would run differently in llama.cpp: " + "; ".join(problems))
    meta = {**_head_dim_metadata(cfg), "attention.sliding_window": cfg.sliding_window}
    if cfg.rope_scaling is not None:
        meta.update({"rope.scaling.type": "linear", "rope.scaling.factor": float(cfg.rope_scaling.factor)})
    return meta


def _qwen_metadata(cfg: Any) -> dict[str, Any]:
    # llama.cpp's qwen2/qwen3 graphs attend over every position; a sliding-window layer would run
    # differently there.
    if cfg.sliding_window is not None and "sliding_attention" in tuple(cfg.layer_types):
        raise ValueError(f"GGUF export: {cfg.MODEL_TYPE} with sliding-window layers is not supported "
                         "(llama.cpp's graph attends over every position)")
    if cfg.rope_scaling is not None:
        raise ValueError(f"GGUF export: {cfg.MODEL_TYPE} rope scaling {cfg.rope_scaling.rope_type!r} not supported")
    return _head_dim_metadata(cfg)


@dataclasses.dataclass(frozen=True)
class GgufArch:
    """How one fips_jax architecture (a `checkpoint.FAMILIES` key) is written for llama.cpp.

    model_arch: the `gguf.MODEL_ARCH` (its name is `general.architecture`).
    metadata: cfg -> `<arch>.*` keys beyond the common ones (`_common_metadata`).
    permute_qk: store Q/K rows in llama.cpp's interleaved-RoPE order.
    norm_offset: added to every RMSNorm weight (1.0 where the model applies 1 + w).
    """

    model_arch: gguf.MODEL_ARCH
    metadata: Callable[[Any], dict[str, Any]]
    permute_qk: bool = False
    norm_offset: float = 0.0

    @property
    def name(self) -> str:
        return gguf.MODEL_ARCH_NAMES[self.model_arch]


ARCHS: dict[str, GgufArch] = {
    "llama": GgufArch(gguf.MODEL_ARCH.LLAMA, _llama_metadata, permute_qk=True),
    # Gemma (v1): llama.cpp's gemma graph scales queries by head_dim ** -0.5 as HF does, with
    # global attention and no caps: nothing beyond the head size to write or refuse.
    "gemma": GgufArch(gguf.MODEL_ARCH.GEMMA, _head_dim_metadata, norm_offset=1.0),
    "gemma2": GgufArch(gguf.MODEL_ARCH.GEMMA2, _gemma2_metadata, norm_offset=1.0),
    "gemma3_text": GgufArch(gguf.MODEL_ARCH.GEMMA3, _gemma3_metadata, norm_offset=1.0),
    "qwen2": GgufArch(gguf.MODEL_ARCH.QWEN2, _qwen_metadata),
    "qwen3": GgufArch(gguf.MODEL_ARCH.QWEN3, _qwen_metadata),
}


def gguf_arch(name: str) -> GgufArch:
    if name not in ARCHS:
        raise ValueError(f"GGUF export: architecture {name!r} not supported; supported: {sorted(ARCHS)}")
    return ARCHS[name]


def _common_metadata(cfg: Any) -> dict[str, Any]:
    return {
        "vocab_size": cfg.vocab_size, "context_length": cfg.max_position_embeddings,
        "embedding_length": cfg.hidden_size, "feed_forward_length": cfg.intermediate_size,
        "block_count": cfg.num_hidden_layers, "attention.head_count": cfg.num_attention_heads,
        "attention.head_count_kv": cfg.num_key_value_heads,
        "attention.layer_norm_rms_epsilon": float(cfg.rms_norm_eps), "rope.freq_base": float(cfg.rope_theta),
    }


def _add(writer: gguf.GGUFWriter, key: str, value: Any) -> None:
    if isinstance(value, bool):
        writer.add_bool(key, value)
    elif isinstance(value, (int, np.integer)):
        writer.add_uint32(key, int(value))
    elif isinstance(value, (float, np.floating)):
        writer.add_float32(key, float(value))
    elif isinstance(value, str):
        writer.add_string(key, value)
    else:
        raise TypeError(f"GGUF metadata {key}: unsupported value {value!r}")


def _quantisable(qtype: gguf.GGMLQuantizationType) -> bool:
    """Whether the `gguf` package can write `qtype` (some types it only reads)."""
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    try:
        gguf.quants.quantize(np.ones((1, block), np.float32), qtype)
    except (NotImplementedError, ValueError, TypeError, KeyError):
        return False
    return True


def qtype_of(name: str) -> gguf.GGMLQuantizationType:
    """A ggml type by name (F32, F16, Q8_0, ...) that the `gguf` package can quantise to."""
    qtype = gguf.GGMLQuantizationType.__members__.get(str(name).upper())
    if qtype is None or not _quantisable(qtype):
        can = [t.name for t in gguf.GGMLQuantizationType
               if t.name.startswith(("F", "BF", "Q")) and t in gguf.GGML_QUANT_SIZES and _quantisable(t)]
        raise ValueError(f"GGUF type {name!r} not supported; the gguf package writes {can}")
    return qtype


def _file_type(qtype: gguf.GGMLQuantizationType) -> int:
    if qtype == gguf.GGMLQuantizationType.F32:
        return int(gguf.LlamaFileType.ALL_F32)
    return int(getattr(gguf.LlamaFileType, f"MOSTLY_{qtype.name}", gguf.LlamaFileType.GUESSED))


def gguf_tensors(arch: base.Architecture, params: dict) -> list[tuple[str, np.ndarray]]:
    """(GGUF name, float32 array in llama.cpp's layout) for every param, in key-map order."""
    spec = gguf_arch(arch.name)
    cfg = arch.config
    fam = checkpoint.family(arch.name)
    names = gguf.get_tensor_name_map(spec.model_arch, cfg.num_hidden_layers)
    out = []
    for hf_key, w in convert.export_params(params, fam.key_map(cfg)):
        stem, _, suffix = hf_key.rpartition(".")
        name = names.get_name(stem)
        if name is None:
            raise ValueError(f"GGUF export: {spec.name} has no llama.cpp name for {hf_key}")
        name = f"{name}.{suffix}"
        w = np.asarray(w, np.float32)
        if spec.permute_qk and ".attn_q." in name:
            w = permute_rope_rows(w, cfg.num_attention_heads)
        elif spec.permute_qk and ".attn_k." in name:
            w = permute_rope_rows(w, cfg.num_key_value_heads)
        if spec.norm_offset and name.endswith("norm.weight"):
            w = w + np.float32(spec.norm_offset)
        out.append((name, w))
    return out


def _copy_tokenizer_fields(writer: gguf.GGUFWriter, source: str) -> None:
    """Every `tokenizer.*` key of the source GGUF, with its own value types."""
    reader = gguf.GGUFReader(source)
    for key, field in reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), vtype, sub)


def write_gguf(path: str, arch: base.Architecture, params: dict, qtype: str = "F32",
               tokenizer_gguf: str | None = None, name: str = "") -> None:
    """Write `arch`/`params` (dense layout) as one GGUF file at `path`, atomically.

    qtype: the ggml type of the 2-D tensors (F32, F16, Q8_0, ... see `qtype_of`).
    tokenizer_gguf: a GGUF file whose `tokenizer.*` metadata is copied (the run's source model);
    None writes `tokenizer.ggml.model = "none"`, llama.cpp's marker of a model without a vocabulary.
    Raises ValueError for architectures, RoPE variants or types the export does not support.
    """
    spec = gguf_arch(arch.name)
    ggml_type = qtype_of(qtype)
    tensors = gguf_tensors(arch, params)  # everything checked before a byte is written
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    prefix = f".tmp-{os.path.basename(path)}-"
    for stale in [n for n in os.listdir(folder) if n.startswith(prefix)]:  # left by a killed export
        os.remove(os.path.join(folder, stale))
    tmp = os.path.join(folder, f"{prefix}{os.getpid()}")
    writer = gguf.GGUFWriter(tmp, spec.name)
    try:
        if name:
            writer.add_name(name)
        writer.add_file_type(_file_type(ggml_type))
        for key, value in {**_common_metadata(arch.config), **spec.metadata(arch.config)}.items():
            _add(writer, f"{spec.name}.{key}", value)
        if tokenizer_gguf:
            _copy_tokenizer_fields(writer, tokenizer_gguf)
        else:
            writer.add_tokenizer_model("none")
        block = gguf.GGML_QUANT_SIZES[ggml_type][0]
        for tname, w in tensors:
            kind = ggml_type
            if w.ndim == 1:
                kind = gguf.GGMLQuantizationType.F32
            elif w.shape[-1] % block:
                kind = gguf.GGMLQuantizationType.F16
            data = gguf.quants.quantize(w, kind)
            writer.add_tensor(tname, data, raw_dtype=kind)  # uint8 blocks: the shape is derived
        if ggml_type not in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
            writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        checkpointing.fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        writer.close()
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    checkpointing.fsync_dir(folder)
