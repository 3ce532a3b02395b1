"""Gemma (v1) causal decoder (`gemma`, `GemmaForCausalLM`), and the config base of Gemma-2/3.

Differences from Llama, all switches of the shared `decoder_common.CausalLM`:
  * RMSNorm scales by (1 + w) and stores w (two norms per block, as Llama's);
  * embeddings are multiplied by sqrt(hidden_size) in the embedding dtype;
  * the MLP is gelu_tanh-gated (GeGLU); head_dim is explicit (256 on the released 2B and 7B,
    where 2B has hidden / heads = 256 too but 7B has 3072 / 16 = 192); embeddings are tied.
Attention logits are scaled by head_dim ** -0.5, nothing is soft-capped or windowed.

`Gemma2Config` (and through it `Gemma3Config`) extends `GemmaConfig` with post-norms,
sliding windows, query_pre_attn_scalar and soft-capping.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

from fips_jax.models import decoder_common

GELU_TANH_NAMES = ("gelu_pytorch_tanh", "gelu_tanh", "gelu_new", "gelu_fast")


@dataclasses.dataclass(frozen=True)
class GemmaConfig:
    """Gemma hyper-parameters with HF field names (defaults: HF's `GemmaConfig`, the 7B model)."""

    model_type: ClassVar[str] = "gemma"
    hf_architecture: ClassVar[str] = "GemmaForCausalLM"
    # HF's Gemma reads `hidden_act`, where the released configs say "gelu" but mean the tanh
    # approximation (transformers rewrites it so); Gemma-2/3 read `hidden_activation`.
    activation_key: ClassVar[str] = "hidden_act"
    legacy_gelu_is_tanh: ClassVar[bool] = True

    vocab_size: int = 256000
    hidden_size: int = 3072
    intermediate_size: int = 24576
    num_hidden_layers: int = 28
    num_attention_heads: int = 16
    num_key_value_heads: int = 16
    head_dim: int = 256
    max_position_embeddings: int = 8192
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    attention_bias: bool = False
    tie_word_embeddings: bool = True
    bos_token_id: int | None = 2
    eos_token_id: int | tuple[int, ...] | None = 1
    pad_token_id: int | None = 0

    @classmethod
    def hf_kwargs(cls, hf: dict[str, Any], rope_fields: tuple[str, ...]) -> dict[str, Any]:
        """The dataclass fields found in an HF config dict, checked; `rope_fields` are left to the caller."""
        act = hf.get("hidden_activation") or hf.get("hidden_act") or "gelu_pytorch_tanh"
        if act == "gelu" and cls.legacy_gelu_is_tanh:
            act = "gelu_pytorch_tanh"
        if act not in GELU_TANH_NAMES:
            raise ValueError(
                f"{cls.model_type} hidden activation {act!r} not supported; expected one of {GELU_TANH_NAMES}"
            )
        if hf.get("use_bidirectional_attention"):
            raise ValueError(f"{cls.model_type} use_bidirectional_attention=True not supported (causal LM only)")
        return decoder_common.hf_field_kwargs(cls, hf, rope_fields)

    @classmethod
    def from_hf_config(cls, hf: dict[str, Any]):
        """From an HF `config.json` dict of this class's model_type."""
        theta, scaling = decoder_common.rope_from_hf(hf)
        if scaling is not None:
            raise ValueError(f"{cls.model_type} rope scaling {scaling} not supported")
        return cls(**cls.hf_kwargs(hf, ("rope_theta",)), rope_theta=theta)

    def to_hf_config(self) -> dict[str, Any]:
        """HF `config.json` dict that transformers' `hf_architecture` class loads."""
        return decoder_common.hf_config_dict(self, self.model_type, self.hf_architecture,
                                             (self.activation_key, "gelu_pytorch_tanh"), None)

    def decoder_spec(self) -> decoder_common.DecoderSpec:
        return decoder_common.spec_from_hf_fields(self, "gelu_tanh", attn_bias=self.attention_bias,
                                                  norm_unit_offset=True, scale_embeddings=True)


@dataclasses.dataclass(frozen=True)
class GemmaArchitecture(decoder_common.CausalLMArchitecture):
    """`base.Architecture` for Gemma (v1). config: GemmaConfig; dtype: compute dtype; param_dtype: storage."""

    name = "gemma"
    config: GemmaConfig
