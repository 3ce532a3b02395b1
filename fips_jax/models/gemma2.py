"""Gemma-2 causal decoder.

Differences from Llama, all switches of the shared `decoder_common.CausalLM`:
  * RMSNorm scales by (1 + w) and there are four norms per block (pre/post attention and MLP);
  * embeddings are multiplied by sqrt(hidden_size);
  * attention logits are scaled by query_pre_attn_scalar ** -0.5 and soft-capped, and
    final logits are soft-capped: cap * tanh(x / cap);
  * layers alternate local sliding-window and global attention (`layer_types`);
  * the MLP is gelu_tanh-gated; embeddings are tied by default.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

from fips_jax.models import decoder_common as dc

_GELU_TANH_NAMES = ("gelu_pytorch_tanh", "gelu_tanh", "gelu_new", "gelu_fast")
LAYER_TYPES = ("sliding_attention", "full_attention")


def default_layer_types(num_layers: int, pattern: int = 2) -> tuple[str, ...]:
    """Every `pattern`-th layer global, the others local (sliding), as HF's default: Gemma-2
    (pattern 2) alternates local/global, Gemma-3 (pattern 6) has 5 local layers per global one."""
    return tuple("sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(num_layers))


@dataclasses.dataclass(frozen=True)
class Gemma2Config:
    """Gemma-2 hyper-parameters with HF field names; `layer_types` defaults to alternating."""

    model_type: ClassVar[str] = "gemma2"
    sliding_window_pattern: ClassVar[int] = 2

    vocab_size: int = 256000
    hidden_size: int = 2304
    intermediate_size: int = 9216
    num_hidden_layers: int = 26
    num_attention_heads: int = 8
    num_key_value_heads: int = 4
    head_dim: int = 256
    max_position_embeddings: int = 8192
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    attention_bias: bool = False
    query_pre_attn_scalar: float = 256
    sliding_window: int | None = 4096
    layer_types: tuple[str, ...] | None = None
    attn_logit_softcapping: float | None = 50.0
    final_logit_softcapping: float | None = 30.0
    tie_word_embeddings: bool = True
    bos_token_id: int | None = 2
    eos_token_id: int | tuple[int, ...] | None = 1
    pad_token_id: int | None = 0

    def __post_init__(self):
        name = self.model_type
        if self.layer_types is None:
            types = default_layer_types(self.num_hidden_layers, self.sliding_window_pattern)
            object.__setattr__(self, "layer_types", types)
        object.__setattr__(self, "layer_types", tuple(self.layer_types))
        if len(self.layer_types) != self.num_hidden_layers:
            raise ValueError(f"{name}: {len(self.layer_types)} layer_types for {self.num_hidden_layers} layers")
        bad = sorted(set(self.layer_types) - set(LAYER_TYPES))
        if bad:
            raise ValueError(f"{name}: layer types {bad} not supported; supported: {list(LAYER_TYPES)}")

    @classmethod
    def hf_kwargs(cls, hf: dict[str, Any], rope_fields: tuple[str, ...]) -> dict[str, Any]:
        """The dataclass fields found in an HF config dict, checked; `rope_fields` are left to the caller."""
        act = hf.get("hidden_activation") or hf.get("hidden_act") or "gelu_pytorch_tanh"
        if act not in _GELU_TANH_NAMES:
            raise ValueError(
                f"{cls.model_type} hidden_activation {act!r} not supported; expected one of {_GELU_TANH_NAMES}"
            )
        if hf.get("use_bidirectional_attention"):
            raise ValueError(f"{cls.model_type} use_bidirectional_attention=True not supported (causal LM only)")
        fields = {f.name for f in dataclasses.fields(cls)} - set(rope_fields)
        kwargs = {k: hf[k] for k in fields if k in hf}
        kwargs.update(dc.hf_token_ids(hf))
        return kwargs

    @classmethod
    def from_hf_config(cls, hf: dict[str, Any]) -> "Gemma2Config":
        """From an HF `config.json` dict (model_type "gemma2")."""
        theta, scaling = dc.rope_from_hf(hf)
        if scaling is not None:
            raise ValueError(f"gemma2 rope scaling {scaling} not supported")
        return cls(**cls.hf_kwargs(hf, ("rope_theta",)), rope_theta=theta)

    def to_hf_config(self) -> dict[str, Any]:
        """HF `config.json` dict that `transformers.Gemma2ForCausalLM` loads."""
        return {
            "model_type": "gemma2",
            "architectures": ["Gemma2ForCausalLM"],
            "hidden_activation": "gelu_pytorch_tanh",
            **{f.name: getattr(self, f.name) for f in dataclasses.fields(self)},
            "layer_types": list(self.layer_types),
            **dc.rope_to_hf(self.rope_theta, None),
            **dc.token_ids_to_hf(self),
        }

    def decoder_spec(self) -> dc.DecoderSpec:
        windows = tuple(self.sliding_window if t == "sliding_attention" else None for t in self.layer_types)
        return dc.DecoderSpec(
            vocab_size=self.vocab_size,
            d_model=self.hidden_size,
            d_ff=self.intermediate_size,
            num_heads=self.num_attention_heads,
            num_kv_heads=self.num_key_value_heads,
            head_dim=self.head_dim,
            activation="gelu_tanh",
            norm_eps=self.rms_norm_eps,
            rope_theta=self.rope_theta,
            rope_scaling=None,
            layer_windows=windows,
            attn_scale=float(self.query_pre_attn_scalar) ** -0.5,
            attn_bias=self.attention_bias,
            tie_embeddings=self.tie_word_embeddings,
            norm_unit_offset=True,
            post_norms=True,
            scale_embeddings=True,
            attn_softcap=self.attn_logit_softcapping,
            final_softcap=self.final_logit_softcapping,
        )


@dataclasses.dataclass(frozen=True)
class Gemma2Architecture(dc.CausalLMArchitecture):
    """`base.Architecture` for Gemma-2. config: Gemma2Config; dtype: compute dtype; param_dtype: storage."""

    name = "gemma2"
    config: Gemma2Config
