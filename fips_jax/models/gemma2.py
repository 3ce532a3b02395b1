"""Gemma-2 causal decoder.

Gemma (`gemma.py`: (1 + w) RMSNorms, sqrt(hidden_size)-scaled embeddings, a gelu_tanh-gated
MLP, tied embeddings) plus these switches of the shared `decoder_common.CausalLM`:
  * four norms per block (pre/post attention and MLP);
  * attention logits are scaled by query_pre_attn_scalar ** -0.5 and soft-capped, and
    final logits are soft-capped: cap * tanh(x / cap);
  * layers alternate local sliding-window and global attention (`layer_types`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

from fips_jax.models import decoder_common
from fips_jax.models.gemma import GemmaConfig

LAYER_TYPES = ("sliding_attention", "full_attention")


def default_layer_types(num_layers: int, pattern: int = 2) -> tuple[str, ...]:
    """Every `pattern`-th layer global, the others local (sliding), as HF's default: Gemma-2
    (pattern 2) alternates local/global, Gemma-3 (pattern 6) has 5 local layers per global one."""
    return tuple("sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(num_layers))


@dataclasses.dataclass(frozen=True)
class Gemma2Config(GemmaConfig):
    """Gemma-2 hyper-parameters with HF field names; `layer_types` defaults to alternating."""

    model_type: ClassVar[str] = "gemma2"
    hf_architecture: ClassVar[str] = "Gemma2ForCausalLM"
    activation_key: ClassVar[str] = "hidden_activation"
    legacy_gelu_is_tanh: ClassVar[bool] = False
    sliding_window_pattern: ClassVar[int] = 2

    vocab_size: int = 256000
    hidden_size: int = 2304
    intermediate_size: int = 9216
    num_hidden_layers: int = 26
    num_attention_heads: int = 8
    num_key_value_heads: int = 4
    query_pre_attn_scalar: float = 256
    sliding_window: int | None = 4096
    layer_types: tuple[str, ...] | None = None
    attn_logit_softcapping: float | None = 50.0
    final_logit_softcapping: float | None = 30.0

    def __post_init__(self):
        name = self.model_type
        if self.layer_types is None:
            types = default_layer_types(self.num_hidden_layers, self.sliding_window_pattern)
            object.__setattr__(self, "layer_types", types)
        types = decoder_common.checked_layer_types(name, self.layer_types, self.num_hidden_layers, LAYER_TYPES)
        object.__setattr__(self, "layer_types", types)

    def to_hf_config(self) -> dict[str, Any]:
        """HF `config.json` dict that `transformers.Gemma2ForCausalLM` loads."""
        return {**super().to_hf_config(), "layer_types": list(self.layer_types)}

    def decoder_spec(self) -> decoder_common.DecoderSpec:
        return dataclasses.replace(
            super().decoder_spec(),
            layer_windows=decoder_common.layer_windows(self.layer_types, self.sliding_window),
            attn_scale=float(self.query_pre_attn_scalar) ** -0.5,
            post_norms=True,
            attn_softcap=self.attn_logit_softcapping,
            final_softcap=self.final_logit_softcapping,
        )


@dataclasses.dataclass(frozen=True)
class Gemma2Architecture(decoder_common.CausalLMArchitecture):
    """`base.Architecture` for Gemma-2. config: Gemma2Config; dtype: compute dtype; param_dtype: storage."""

    name = "gemma2"
    config: Gemma2Config
