"""Qwen2 / Qwen2.5 causal decoder: Llama with biases on the q, k and v projections.

`Qwen2Config` mirrors the HF `Qwen2Config` fields the forward pass depends on (same names); the
linen module is the shared `decoder_common.CausalLM`. Qwen2's optional sliding-window layers
(`use_sliding_window`, layers from `max_window_layers` on, or explicit `layer_types`) map onto
the decoder's per-layer windows; released checkpoints ship with them off. `Qwen3Config`
(`qwen3.py`) extends this config.

    arch = Qwen2Architecture(Qwen2Config(...))
    logits = arch.apply(arch.init(jax.random.key(0)), tokens)   # [B, T] int -> [B, T, vocab]
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

from fips_jax.models import decoder_common

_SILU_NAMES = ("silu", "swish")
LAYER_TYPES = ("full_attention", "sliding_attention")


def layer_types_from_hf(hf: dict[str, Any], num_layers: int) -> tuple[int | None, tuple[str, ...]]:
    """(sliding_window or None, layer_types) as HF's Qwen2/Qwen3 configs resolve them: the window
    exists only with use_sliding_window, and by default covers layers >= max_window_layers."""
    window = hf.get("sliding_window") if hf.get("use_sliding_window") else None
    types = hf.get("layer_types")
    if types is None:
        first = hf.get("max_window_layers", 28)
        types = ["sliding_attention" if window is not None and i >= first else "full_attention"
                 for i in range(num_layers)]
    return window, tuple(types)


@dataclasses.dataclass(frozen=True)
class Qwen2Config:
    """Qwen2 hyper-parameters with HF field names. head_dim defaults to hidden_size // heads;
    sliding_window is None unless some layer slides; layer_types defaults to all full."""

    MODEL_TYPE: ClassVar[str] = "qwen2"
    HF_ARCHITECTURE: ClassVar[str] = "Qwen2ForCausalLM"

    vocab_size: int = 151936
    hidden_size: int = 4096
    intermediate_size: int = 22016
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    max_position_embeddings: int = 32768
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: decoder_common.RopeScaling | None = None
    sliding_window: int | None = None
    layer_types: tuple[str, ...] | None = None
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    pad_token_id: int | None = None

    def __post_init__(self):
        name = self.MODEL_TYPE
        if self.num_key_value_heads is None:
            object.__setattr__(self, "num_key_value_heads", self.num_attention_heads)
        if self.head_dim is None:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        if self.layer_types is None:
            object.__setattr__(self, "layer_types", ("full_attention",) * self.num_hidden_layers)
        types = decoder_common.checked_layer_types(name, self.layer_types, self.num_hidden_layers, LAYER_TYPES)
        object.__setattr__(self, "layer_types", types)
        if "sliding_attention" in self.layer_types and not self.sliding_window:
            raise ValueError(f"{name}: sliding_attention layers need a sliding_window (got {self.sliding_window})")

    @classmethod
    def from_hf_config(cls, hf: dict[str, Any]) -> "Qwen2Config":
        """From an HF `config.json` dict (model_type "qwen2", or "qwen3" for the subclass)."""
        name = cls.MODEL_TYPE
        act = hf.get("hidden_act", "silu")
        if act not in _SILU_NAMES:
            raise ValueError(f"{name} hidden_act {act!r} not supported; expected one of {_SILU_NAMES}")
        theta, scaling = decoder_common.rope_from_hf(hf)
        layers = hf.get("num_hidden_layers", cls.num_hidden_layers)
        window, types = layer_types_from_hf(hf, layers)
        skip = ("rope_theta", "rope_scaling", "sliding_window", "layer_types")
        kwargs = decoder_common.hf_field_kwargs(cls, hf, skip)
        return cls(**kwargs, rope_theta=theta, rope_scaling=scaling, sliding_window=window, layer_types=types)

    def to_hf_config(self) -> dict[str, Any]:
        """HF `config.json` dict that transformers' `*ForCausalLM` of this family loads."""
        sliding = [i for i, t in enumerate(self.layer_types) if t == "sliding_attention"]
        return {
            **decoder_common.hf_config_dict(self, self.MODEL_TYPE, self.HF_ARCHITECTURE, ("hidden_act", "silu"),
                                            self.rope_scaling),
            "layer_types": list(self.layer_types),
            "use_sliding_window": self.sliding_window is not None,
            "max_window_layers": sliding[0] if sliding else self.num_hidden_layers,
        }

    def decoder_spec(self) -> decoder_common.DecoderSpec:
        windows = decoder_common.layer_windows(self.layer_types, self.sliding_window)
        return decoder_common.spec_from_hf_fields(self, "silu", rope_scaling=self.rope_scaling, layer_windows=windows,
                                                  qkv_bias=True)


@dataclasses.dataclass(frozen=True)
class Qwen2Architecture(decoder_common.CausalLMArchitecture):
    """`base.Architecture` for Qwen2/2.5. config: Qwen2Config; dtype: compute; param_dtype: storage."""

    name = "qwen2"
    config: Qwen2Config
