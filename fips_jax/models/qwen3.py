"""Qwen3 (dense) causal decoder: Llama plus an RMSNorm over each head's features of q and k
(`q_norm`, `k_norm`, applied before RoPE), no biases unless `attention_bias`, and an explicit
head_dim (HF default 128, not hidden_size // heads). Everything else is `Qwen2Config`'s.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from fips_jax.models import decoder_common
from fips_jax.models.qwen2 import Qwen2Config


@dataclasses.dataclass(frozen=True)
class Qwen3Config(Qwen2Config):
    """Qwen3 hyper-parameters with HF field names (see `Qwen2Config`)."""

    MODEL_TYPE: ClassVar[str] = "qwen3"
    HF_ARCHITECTURE: ClassVar[str] = "Qwen3ForCausalLM"

    head_dim: int | None = 128
    attention_bias: bool = False

    def decoder_spec(self) -> decoder_common.DecoderSpec:
        return dataclasses.replace(super().decoder_spec(), qkv_bias=False, attn_bias=self.attention_bias,
                                   qk_norm=True)


@dataclasses.dataclass(frozen=True)
class Qwen3Architecture(decoder_common.CausalLMArchitecture):
    """`base.Architecture` for Qwen3. config: Qwen3Config; dtype: compute; param_dtype: storage."""

    name = "qwen3"
    config: Qwen3Config
