"""Shared linen pieces of the causal decoders (Llama-3, Gemma-2, Gemma-3, Qwen2/2.5, Qwen3).

The families differ only in a handful of switches (norm offset, post-norms, embedding scale,
soft-capping, sliding windows, activation, q/k/v biases, per-head q/k norms, a RoPE base for
local layers), so all are one `CausalLM` module driven by a frozen `DecoderSpec`; `llama.py`,
`gemma2.py`, `gemma3.py`, `qwen2.py` and `qwen3.py` translate their HF-shaped configs into a spec.

Shapes: B batch, T query length, S key length (= T, no cache), d model width, H query heads,
K key/value heads (H % K == 0, GQA), G = H // K, hd head dim, p MLP width, V vocabulary.

Param tree (slash-joined, flax `[in, out]` kernels):
    embed/embedding                      [V, d]     ("vocab", "embed")
    blocks_{i}/pre_attn_norm/scale       [d]        ("embed",)
    blocks_{i}/attn/{q,k,v}/kernel       [d, H*hd] / [d, K*hd]
    blocks_{i}/attn/{q,k,v}/bias         [H*hd] / [K*hd]  (attn_bias or qkv_bias: Qwen2)
    blocks_{i}/attn/{q,k}_norm/scale     [hd]       ("head_dim",)  (qk_norm: Qwen3, Gemma-3)
    blocks_{i}/attn/o/kernel             [H*hd, d]
    blocks_{i}/post_attn_norm/scale      [d]        (Gemma-2/3 only)
    blocks_{i}/pre_mlp_norm/scale        [d]
    blocks_{i}/mlp/{gate,up}/kernel      [d, p]     ("embed", "mlp")
    blocks_{i}/mlp/down/kernel           [p, d]     ("mlp", "embed")
    blocks_{i}/post_mlp_norm/scale       [d]        (Gemma-2/3 only)
    final_norm/scale                     [d]
    lm_head/kernel                       [d, V]     (untied embeddings only)
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fips_jax import factors
from fips_jax.models import base

_KERNEL_INIT = nn.initializers.normal(stddev=0.02)

ROPE_TYPES = ("default", "linear", "llama3")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling. rope_type "linear" divides every frequency by `factor`; "llama3"
    divides low frequencies by `factor`, keeps high ones and interpolates in between."""

    rope_type: str
    factor: float
    low_freq_factor: float | None = None
    high_freq_factor: float | None = None
    original_max_position_embeddings: int | None = None

    def __post_init__(self):
        if self.rope_type not in ROPE_TYPES[1:]:
            raise ValueError(f"rope_type {self.rope_type!r} not supported; supported: {list(ROPE_TYPES)}")
        if self.rope_type == "llama3" and None in (
            self.low_freq_factor, self.high_freq_factor, self.original_max_position_embeddings
        ):
            raise ValueError(
                f"llama3 rope scaling needs low/high_freq_factor and original_max_position_embeddings: {self}"
            )


def rope_inv_freq(head_dim: int, theta: float, scaling: RopeScaling | None) -> np.ndarray:
    """Inverse frequencies [head_dim // 2] float32, computed on the host (static).

    Computed in float32 in the reference's operation order, so that the frequencies match it
    bit for bit where possible (an ulp of difference shows at long positions).
    """
    f32 = np.float32
    inv = f32(1.0) / f32(theta) ** (np.arange(0, head_dim, 2).astype(f32) / f32(head_dim))
    if scaling is not None and scaling.rope_type == "linear":
        inv = inv / f32(scaling.factor)
    elif scaling is not None and scaling.rope_type == "llama3":
        old_len = scaling.original_max_position_embeddings
        low, high, factor = scaling.low_freq_factor, scaling.high_freq_factor, scaling.factor
        low_wavelen, high_wavelen = old_len / low, old_len / high
        wavelen = f32(2 * math.pi) / inv
        scaled = np.where(wavelen > low_wavelen, inv / f32(factor), inv)
        smooth = (f32(old_len) / wavelen - f32(low)) / f32(high - low)
        smoothed = (1 - smooth) * scaled / f32(factor) + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        inv = np.where(medium, smoothed, scaled)
    return inv.astype(np.float32)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: np.ndarray) -> jax.Array:
    """Rotate-half RoPE (HF layout: first and second halves of each head pair up).

    x: [B, T, N, hd]; positions: [B, T] int; inv_freq: [hd // 2] -> [B, T, N, hd].
    """
    freqs = positions[..., None].astype(jnp.float32) * jnp.asarray(inv_freq)  # [B, T, hd/2]
    angles = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]
    cos, sin = jnp.cos(angles).astype(x.dtype), jnp.sin(angles).astype(x.dtype)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rotated * sin


def rope_from_hf(hf: dict) -> tuple[float, RopeScaling | None]:
    """(rope_theta, scaling) from an HF config dict.

    Accepts both the current `rope_parameters` dict and the older top-level `rope_theta` plus
    `rope_scaling` (whose "type" key predates "rope_type"); `rope_scaling` wins, as in HF.
    """
    params = dict(hf.get("rope_scaling") or hf.get("rope_parameters") or {})
    if any(isinstance(v, dict) for v in params.values()):
        raise ValueError(f"per-layer-type rope parameters are not supported: {params}")
    theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type == "default":
        return theta, None
    if rope_type not in ROPE_TYPES:
        raise ValueError(f"rope_type {rope_type!r} not supported; supported: {list(ROPE_TYPES)}")
    if rope_type == "linear":
        return theta, RopeScaling("linear", float(params["factor"]))
    return theta, RopeScaling(
        "llama3",
        float(params["factor"]),
        float(params["low_freq_factor"]),
        float(params["high_freq_factor"]),
        int(params.get("original_max_position_embeddings", hf.get("max_position_embeddings"))),
    )


def rope_to_hf(theta: float, scaling: RopeScaling | None) -> dict:
    """HF config entries for RoPE, in both the current and the legacy spelling so that old and
    new transformers versions read the same thing."""
    params: dict[str, Any] = {"rope_type": "default", "rope_theta": theta}
    if scaling is not None:
        params = {"rope_theta": theta, **{k: v for k, v in dataclasses.asdict(scaling).items() if v is not None}}
    legacy = None if scaling is None else {k: v for k, v in params.items() if k != "rope_theta"}
    return {"rope_theta": theta, "rope_scaling": legacy, "rope_parameters": params}


@dataclasses.dataclass(frozen=True)
class DecoderSpec:
    """Everything the shared decoder needs; built by each model's config.

    layer_windows: per layer, the sliding-window length (keys with q_pos - k_pos < window are
      visible) or None for global causal attention.
    norm_unit_offset: True for Gemma's RMSNorm, which scales by (1 + w) and stores w.
    attn_bias: biases on all four attention projections; qkv_bias: on q, k and v only (Qwen2).
    qk_norm: RMSNorm over each head's hd features of q and k, before RoPE (Qwen3; Gemma-3 with
      the unit offset).
    local_rope_theta: RoPE base of the sliding-window layers, which then use no frequency
      scaling (Gemma-3: 10k locally, 1M and `rope_scaling` globally); None = as global layers.
    """

    vocab_size: int
    d_model: int
    d_ff: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    activation: str
    norm_eps: float
    rope_theta: float
    rope_scaling: RopeScaling | None
    layer_windows: tuple[int | None, ...]
    attn_scale: float
    attn_bias: bool = False
    qkv_bias: bool = False
    qk_norm: bool = False
    mlp_bias: bool = False
    tie_embeddings: bool = False
    norm_unit_offset: bool = False
    post_norms: bool = False
    scale_embeddings: bool = False
    attn_softcap: float | None = None
    final_softcap: float | None = None
    local_rope_theta: float | None = None

    @property
    def num_layers(self) -> int:
        return len(self.layer_windows)

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")


def spec_from_hf_fields(cfg: Any, activation: str, **switches) -> DecoderSpec:
    """A `DecoderSpec` from a config with HF field names (vocab_size, hidden_size,
    intermediate_size, num_attention_heads, num_key_value_heads, head_dim, rms_norm_eps,
    rope_theta, num_hidden_layers, tie_word_embeddings): global attention on every layer scaled by
    head_dim ** -0.5 and no rope scaling, unless `switches` (any other DecoderSpec field) say
    otherwise. Each family's `decoder_spec` adds only what makes it that family."""
    common = dict(
        vocab_size=cfg.vocab_size, d_model=cfg.hidden_size, d_ff=cfg.intermediate_size,
        num_heads=cfg.num_attention_heads, num_kv_heads=cfg.num_key_value_heads, head_dim=cfg.head_dim,
        activation=activation, norm_eps=cfg.rms_norm_eps, rope_theta=cfg.rope_theta, rope_scaling=None,
        layer_windows=(None,) * cfg.num_hidden_layers, attn_scale=float(cfg.head_dim) ** -0.5,
        tie_embeddings=cfg.tie_word_embeddings)
    return DecoderSpec(**{**common, **switches})


class DecoderContext(NamedTuple):
    """What every block needs besides the hidden state.

    positions: [B, T] int32 token positions (RoPE, sliding windows).
    mask: [B, T, S] bool, True where query t may attend key s (causal; padding would go here).
    """

    positions: jax.Array
    mask: jax.Array


def mixed_dot_general(matmul_dtype: Any) -> Callable | None:
    """A `dot_general` for `nn.Dense` whose products take `matmul_dtype` operands and accumulate
    in float32, backward included (`factors.mixed_einsum`); None (plain `lax.dot_general`) when
    `matmul_dtype` is None. On XLA:CPU bf16 operands with float32 accumulation run ~3-4x faster
    than float32 (benchmarks/local_step.py); elsewhere it is the native mixed precision."""
    if matmul_dtype is None:
        return None
    dtype = jnp.dtype(matmul_dtype)

    def dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
        del precision, preferred_element_type
        (lc, rc), batch = dimension_numbers
        if tuple(lc) != (lhs.ndim - 1,) or tuple(rc) != (0,) or any(batch) or rhs.ndim != 2:
            raise NotImplementedError(f"mixed-precision dense supports x[..., d] @ W[d, p], got {dimension_numbers}")
        out = factors.mixed_einsum("nd,dp->np", lhs.reshape(-1, lhs.shape[-1]), rhs, dtype)
        return out.reshape(*lhs.shape[:-1], rhs.shape[1])

    return dot_general


def _dense(features: int, axes: tuple[str, str], use_bias: bool, dtype, param_dtype, name: str,
           matmul_dtype: Any = None) -> nn.Dense:
    return nn.Dense(
        features,
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=nn.with_logical_partitioning(_KERNEL_INIT, axes),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), axes[1:]),
        name=name,
        dot_general=mixed_dot_general(matmul_dtype),
    )


def soft_cap(x: jax.Array, cap: float | None) -> jax.Array:
    """cap * tanh(x / cap): bounds logits smoothly to (-cap, cap); identity when cap is None."""
    return x if cap is None else cap * jnp.tanh(x / cap)


class RMSNorm(nn.Module):
    """x / rms(x), scaled by `scale` (Llama) or `1 + scale` (Gemma). x: [..., d] -> [..., d].

    Normalisation runs in float32 whatever the compute dtype, as in the reference models.
    axis: logical name of the normalised axis ("head_dim" for per-head q/k norms).
    """

    eps: float
    unit_offset: bool = False
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    axis: str = "embed"  # logical name of the normalised axis ("head_dim" for q/k norms)

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        init = nn.initializers.zeros_init() if self.unit_offset else nn.initializers.ones_init()
        scale = self.param("scale", nn.with_logical_partitioning(init, (self.axis,)), (x.shape[-1],), self.param_dtype)
        xf = x.astype(jnp.float32)
        normed = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        if self.unit_offset:
            # Gemma multiplies in float32 before casting back; Llama casts first.
            return (normed * (1.0 + scale.astype(jnp.float32))).astype(self.dtype)
        return scale.astype(self.dtype) * normed.astype(self.dtype)


class Attention(nn.Module):
    """Grouped-query self-attention with RoPE. x: [B, T, d] -> [B, T, d]."""

    spec: DecoderSpec
    window: int | None
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    matmul_dtype: Any = None  # the dense projections' operand dtype (mixed_dot_general); None = dtype

    @nn.compact
    def __call__(self, x: jax.Array, ctx: DecoderContext) -> jax.Array:
        s = self.spec
        b, t, _ = x.shape
        k_heads, g, hd = s.num_kv_heads, s.num_heads // s.num_kv_heads, s.head_dim
        dense = lambda n, axes, bias, name: _dense(n, axes, bias, self.dtype, self.param_dtype, name,
                                                   self.matmul_dtype)
        qkv_bias = s.attn_bias or s.qkv_bias
        q = dense(s.num_heads * hd, ("embed", "heads"), qkv_bias, "q")(x).reshape(b, t, s.num_heads, hd)
        k = dense(k_heads * hd, ("embed", "kv_heads"), qkv_bias, "k")(x).reshape(b, t, k_heads, hd)
        v = dense(k_heads * hd, ("embed", "kv_heads"), qkv_bias, "v")(x).reshape(b, t, k_heads, hd)
        if s.qk_norm:
            # Per head, over hd, before RoPE (Qwen3; Gemma-3 with its 1 + w scale).
            norm = lambda name: RMSNorm(s.norm_eps, s.norm_unit_offset, self.dtype, self.param_dtype, "head_dim",
                                        name=name)
            q, k = norm("q_norm")(q), norm("k_norm")(k)

        if self.window is not None and s.local_rope_theta is not None:
            inv_freq = rope_inv_freq(hd, s.local_rope_theta, None)
        else:
            inv_freq = rope_inv_freq(hd, s.rope_theta, s.rope_scaling)
        q = apply_rope(q, ctx.positions, inv_freq)
        k = apply_rope(k, ctx.positions, inv_freq)

        # Query head h reads kv head h // G, so split H as [K, G].
        q = q.reshape(b, t, k_heads, g, hd)
        logits = jnp.einsum("btkgh,bskh->bkgts", q, k) * jnp.asarray(s.attn_scale, self.dtype)
        logits = soft_cap(logits, s.attn_softcap)
        mask = ctx.mask
        if self.window is not None:
            offset = ctx.positions[:, :, None] - ctx.positions[:, None, :]
            mask = mask & (offset < self.window)
        logits = jnp.where(mask[:, None, None], logits, jnp.finfo(logits.dtype).min)
        probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(self.dtype)
        out = jnp.einsum("bkgts,bskh->btkgh", probs, v).reshape(b, t, s.num_heads * hd)
        return dense(s.d_model, ("heads", "embed"), s.attn_bias, "o")(out)


class GatedMlp(nn.Module):
    """down(act(gate(x)) * up(x)). x: [..., d] -> [..., d]; matches `base.mlp_apply`."""

    d_ff: int
    activation: str
    use_bias: bool = False
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    matmul_dtype: Any = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        act = base.ACTIVATIONS[self.activation]
        dense = lambda n, axes, name: _dense(n, axes, self.use_bias, self.dtype, self.param_dtype, name,
                                             self.matmul_dtype)
        h = act(dense(self.d_ff, ("embed", "mlp"), "gate")(x)) * dense(self.d_ff, ("embed", "mlp"), "up")(x)
        return dense(x.shape[-1], ("mlp", "embed"), "down")(h)


class DecoderBlock(nn.Module):
    """Pre-norm attention + gated MLP, with Gemma's optional post-norms.

    x: [B, T, d] -> (block output [B, T, d], MLP input [B, T, d] = pre-MLP-norm output).
    """

    spec: DecoderSpec
    window: int | None
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    matmul_dtype: Any = None

    @nn.compact
    def __call__(self, x: jax.Array, ctx: DecoderContext) -> tuple[jax.Array, jax.Array]:
        s = self.spec
        norm = lambda name: RMSNorm(s.norm_eps, s.norm_unit_offset, self.dtype, self.param_dtype, name=name)
        h = norm("pre_attn_norm")(x)
        h = Attention(s, self.window, self.dtype, self.param_dtype, self.matmul_dtype, name="attn")(h, ctx)
        if s.post_norms:
            h = norm("post_attn_norm")(h)
        x = x + h
        mlp_in = norm("pre_mlp_norm")(x)
        h = GatedMlp(s.d_ff, s.activation, s.mlp_bias, self.dtype, self.param_dtype, self.matmul_dtype,
                     name="mlp")(mlp_in)
        if s.post_norms:
            h = norm("post_mlp_norm")(h)
        return x + h, mlp_in


class CausalLM(nn.Module):
    """Token ids [B, T] -> next-token logits [B, T, V], exposed in three stages.

    `embed_tokens`, `block` and `head` are the staged view (`apply(..., method=...)`);
    `__call__` is exactly their composition.
    """

    spec: DecoderSpec
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    matmul_dtype: Any = None  # operand dtype of the dense projections and the head (mixed_dot_general)

    def setup(self):
        s = self.spec
        self.embed = nn.Embed(
            s.vocab_size,
            s.d_model,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            embedding_init=nn.with_logical_partitioning(nn.initializers.normal(stddev=0.02), ("vocab", "embed")),
        )
        # A list attribute set in setup names its modules blocks_0, blocks_1, ...
        self.blocks = [DecoderBlock(s, w, self.dtype, self.param_dtype, self.matmul_dtype) for w in s.layer_windows]
        self.final_norm = RMSNorm(s.norm_eps, s.norm_unit_offset, self.dtype, self.param_dtype)
        if not s.tie_embeddings:
            self.lm_head = _dense(s.vocab_size, ("embed", "vocab"), False, self.dtype, self.param_dtype, None,
                                  self.matmul_dtype)

    def embed_tokens(self, tokens: jax.Array) -> tuple[jax.Array, DecoderContext]:
        """tokens: [B, T] int -> (hidden [B, T, d], context)."""
        hidden = self.embed(tokens)
        if self.spec.scale_embeddings:
            # Gemma rounds sqrt(d) to the compute dtype before scaling (55.4 -> 55.5 in bf16).
            hidden = hidden * jnp.asarray(math.sqrt(self.spec.d_model), hidden.dtype)
        b, t = tokens.shape
        positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        mask = positions[:, :, None] >= positions[:, None, :]
        return hidden, DecoderContext(positions, mask)

    def block(self, i: int, hidden: jax.Array, ctx: DecoderContext) -> tuple[jax.Array, jax.Array]:
        """Block i: hidden [B, T, d] -> (output [B, T, d], MLP input [B, T, d])."""
        return self.blocks[i](hidden, ctx)

    def head(self, hidden: jax.Array, ctx: DecoderContext) -> jax.Array:
        """Final norm and LM head: [B, T, d] -> logits [B, T, V]."""
        del ctx
        hidden = self.final_norm(hidden)
        if not self.spec.tie_embeddings:
            logits = self.lm_head(hidden)
        elif self.matmul_dtype is not None:
            table = self.embed.embedding
            logits = factors.mixed_einsum("nd,vd->nv", hidden.reshape(-1, hidden.shape[-1]), table,
                                          jnp.dtype(self.matmul_dtype)).reshape(*hidden.shape[:-1], table.shape[0])
        else:
            logits = self.embed.attend(hidden)
        return soft_cap(logits, self.spec.final_softcap)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        hidden, ctx = self.embed_tokens(tokens)
        for i in range(self.spec.num_layers):
            hidden, _ = self.block(i, hidden, ctx)
        return self.head(hidden, ctx)


@dataclasses.dataclass(frozen=True)
class CausalLMArchitecture:
    """`base.Architecture` for a `CausalLM`; subclasses set `name` and build the spec.

    Frozen and hashable, so bound methods can be jitted directly
    (`jax.jit(arch.block, static_argnums=1)`).
    """

    name = "causal_lm"
    is_causal_lm = True

    config: Any
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    # Operand dtype of every dense product, accumulated in float32 (e.g. bfloat16 for fast
    # fine-tuning steps); None: the products run in `dtype`, as the reference models do.
    matmul_dtype: Any = None

    @property
    def spec(self) -> DecoderSpec:
        return self.config.decoder_spec()

    @property
    def mlp_spec(self) -> base.MlpSpec:
        s = self.spec
        return base.MlpSpec(("gate", "up", "down"), (False, False, True), s.activation, gated=True, has_bias=s.mlp_bias)

    @property
    def num_blocks(self) -> int:
        return self.spec.num_layers

    def module(self) -> CausalLM:
        return CausalLM(self.spec, self.dtype, self.param_dtype, self.matmul_dtype)

    def init(self, rng: jax.Array) -> dict:
        """Random params as plain arrays (logical-axis boxes removed)."""
        tokens = jnp.zeros((1, 1), jnp.int32)
        return nn.meta.unbox(self.module().init(rng, tokens)["params"])

    def logical_axes(self) -> dict:
        """Param tree of logical axis-name tuples, e.g. ("embed", "mlp"), for sharding rules."""
        boxed = jax.eval_shape(lambda: self.module().init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32)))
        return nn.get_partition_spec(boxed)["params"]

    def mlp_path(self, block: int) -> str:
        return f"blocks_{block}/mlp"

    def embed(self, params: base.Params, tokens: jax.Array) -> tuple[jax.Array, DecoderContext]:
        return self.module().apply({"params": params}, tokens, method="embed_tokens")

    def block(self, params: base.Params, i: int, hidden: jax.Array, ctx: DecoderContext):
        return self.module().apply({"params": params}, i, hidden, ctx, method="block")

    def head(self, params: base.Params, hidden: jax.Array, ctx: DecoderContext) -> jax.Array:
        return self.module().apply({"params": params}, hidden, ctx, method="head")

    def apply(self, params: base.Params, tokens: jax.Array) -> jax.Array:
        return self.module().apply({"params": params}, tokens)


def hf_field_kwargs(cls: type, hf: dict, skip: tuple[str, ...]) -> dict:
    """Keyword arguments for the config dataclass `cls` from an HF config dict: every field of
    `cls` that `hf` sets but those in `skip` (the caller reads them itself), token ids as
    `hf_token_ids` gives them."""
    fields = {f.name for f in dataclasses.fields(cls)} - set(skip)
    kwargs = {k: hf[k] for k in fields if k in hf}
    kwargs.update(hf_token_ids(hf))
    return kwargs


def hf_token_ids(hf: dict) -> dict:
    """bos/eos/pad ids from an HF config dict (lists become tuples so configs stay hashable)."""
    out = {}
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        v = hf.get(key)
        out[key] = tuple(v) if isinstance(v, list) else v
    return out


def token_ids_to_hf(cfg: Any) -> dict:
    out = {}
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        v = getattr(cfg, key)
        out[key] = list(v) if isinstance(v, tuple) else v
    return out



def hf_config_dict(cfg: Any, model_type: str, architecture: str, activation: tuple[str, str],
                   rope_scaling: RopeScaling | None) -> dict:
    """The HF `config.json` dict of a decoder config dataclass whose fields carry HF's names:
    model_type, architectures, the activation as (key, value), every field, RoPE and token ids
    spelt as HF spells them."""
    key, value = activation
    return {
        "model_type": model_type,
        "architectures": [architecture],
        key: value,
        **{f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)},
        **rope_to_hf(cfg.rope_theta, rope_scaling),
        **token_ids_to_hf(cfg),
    }


def checked_layer_types(name: str, layer_types: Sequence[str], num_layers: int,
                        supported: Sequence[str]) -> tuple[str, ...]:
    """`layer_types` as a tuple, after checking it has one entry per layer, each in `supported`."""
    layer_types = tuple(layer_types)
    if len(layer_types) != num_layers:
        raise ValueError(f"{name}: {len(layer_types)} layer_types for {num_layers} layers")
    bad = sorted(set(layer_types) - set(supported))
    if bad:
        raise ValueError(f"{name}: layer types {bad} not supported; supported: {list(supported)}")
    return layer_types


def layer_windows(layer_types: Sequence[str], window: int | None) -> tuple[int | None, ...]:
    """Per layer: `window` for a "sliding_attention" layer, None (every key) otherwise."""
    return tuple(window if t == "sliding_attention" else None for t in layer_types)
