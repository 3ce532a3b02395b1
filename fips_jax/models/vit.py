"""ViT and DeiT image classifiers (linen), staged for FiPS.

Covers the HF classes `ViTForImageClassification`, `DeiTForImageClassification` and
`DeiTForImageClassificationWithTeacher`: a patch-embedding conv, a CLS token (plus a
distillation token for DeiT), learned position embeddings, pre-LN blocks with a biased GELU
MLP, a final LayerNorm and a linear head on the CLS token. With a distillation head the
logits are the mean of the CLS head and the distillation-token head, as HF computes them
at inference. `layer_scale=True` adds DINOv2's LayerScale (a learned per-channel gain on each
residual branch); with `num_labels=0` that is the DINOv2 backbone (`DinoV2Architecture`).

Inputs are images NHWC float32 `[B, H, W, C]` (HF's `pixel_values` are NCHW; transpose with
`images = pixel_values.transpose(0, 2, 3, 1)`). H and W must equal `config.image_size`:
position embeddings are not interpolated.

Param tree (slash paths):
    patch_embed/proj/{kernel [ph, pw, C, d], bias [d]}
    cls_token [1, 1, d], dist_token [1, 1, d] (DeiT only), pos_embed [1, T, d]
    blocks_{i}/norm1, blocks_{i}/attn/{query,key,value,out}, blocks_{i}/norm2,
    blocks_{i}/mlp/{fc1 [d, p], fc2 [p, d]}          (each Dense: kernel [in, out], bias)
    blocks_{i}/ls1 [d], blocks_{i}/ls2 [d]            (LayerScale gains, layer_scale only)
    norm/{scale, bias}, head/{kernel [d, L], bias}, head_dist (DeiT with teacher only)

Every param carries logical axis names ("embed", "mlp", "heads", "classes"; norms use
("embed",); None for singleton and conv-window axes) through `nn.with_logical_partitioning`.
`Architecture.init` unboxes them, so it returns plain arrays; `Architecture.logical_axes()`
gives the names as a tree of `PartitionSpec`s for a sharding table to map onto a mesh.

Compute and param dtypes default to float32 (`ViTArchitecture(cfg, dtype=jnp.bfloat16, ...)`);
softmax and LayerNorm statistics run in float32 whatever the compute dtype.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from fips_jax.models import base


# ---------------------------------------------------------------------------------------
# Layers shared with Swin.
# ---------------------------------------------------------------------------------------

def dense(features: int, axes: tuple[str | None, str | None], use_bias: bool = True, name: str | None = None,
          dtype: Any = jnp.float32, param_dtype: Any = jnp.float32) -> nn.Dense:
    """nn.Dense whose kernel `[in, out]` is named `axes` and whose bias is named `axes[1]`."""
    return nn.Dense(
        features,
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), axes),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), (axes[1],)),
        name=name,
    )


def layer_norm(eps: float, name: str | None = None, dtype: Any = jnp.float32,
               param_dtype: Any = jnp.float32) -> nn.LayerNorm:
    # The two-pass variance matches PyTorch's LayerNorm to ~1e-7; the fast E[x^2]-E[x]^2
    # form loses digits when activations have a large mean. Statistics are float32 always.
    return nn.LayerNorm(
        epsilon=eps,
        use_fast_variance=False,
        dtype=dtype,
        param_dtype=param_dtype,
        scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), ("embed",)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("embed",)),
        name=name,
    )


def patch_conv(features: int, patch: tuple[int, int], name: str | None = None, dtype: Any = jnp.float32,
               param_dtype: Any = jnp.float32) -> nn.Conv:
    """Non-overlapping patch projection: kernel `[ph, pw, C, features]` (HWIO), stride = patch."""
    return nn.Conv(
        features,
        kernel_size=patch,
        strides=patch,
        padding="VALID",
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), (None, None, None, "embed")),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("embed",)),
        name=name,
    )


class Attention(nn.Module):
    """Multi-head self-attention over the second-to-last axis, with an optional additive bias.

    x: [..., N, d] -> [..., N, d]; `bias` broadcasts against the logits `[..., heads, N, N]`.
    """

    num_heads: int
    qkv_bias: bool = True
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, bias: jax.Array | None = None) -> jax.Array:
        d = x.shape[-1]
        if d % self.num_heads:
            raise ValueError(f"width {d} not divisible by {self.num_heads} heads")
        head_dim = d // self.num_heads
        prec = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        split = lambda t: t.reshape(*t.shape[:-1], self.num_heads, head_dim)
        q = split(dense(d, ("embed", "heads"), self.qkv_bias, name="query", **prec)(x))
        k = split(dense(d, ("embed", "heads"), self.qkv_bias, name="key", **prec)(x))
        v = split(dense(d, ("embed", "heads"), self.qkv_bias, name="value", **prec)(x))
        logits = jnp.einsum("...qhd,...khd->...hqk", q, k) * head_dim**-0.5
        if bias is not None:
            logits = logits + bias
        # Softmax in float32 whatever the compute dtype, as HF does.
        probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v.dtype)
        o = jnp.einsum("...hqk,...khd->...qhd", probs, v).reshape(*x.shape[:-1], d)
        return dense(d, ("heads", "embed"), name="out", **prec)(o)


class Mlp(nn.Module):
    """fc2(act(fc1(x))) with biases. x: [..., d] -> [..., d]; fc1 kernel [d, p], fc2 [p, d]."""

    hidden: int
    activation: str = "gelu"
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        prec = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = dense(self.hidden, ("embed", "mlp"), name="fc1", **prec)(x)
        h = base.ACTIVATIONS[self.activation](h)
        return dense(x.shape[-1], ("mlp", "embed"), name="fc2", **prec)(h)


# ---------------------------------------------------------------------------------------
# ViT / DeiT.
# ---------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class ViTConfig:
    """ViT/DeiT hyper-parameters. `dist_token` selects DeiT (a second prefix token);
    `dist_head` adds DeiT's distillation head (logits = mean of both heads).
    `num_labels = 0` drops the head: logits are then the final-norm CLS features [B, d].
    `layer_scale` multiplies each residual branch by a learned gain `[d]` (DINOv2, CaiT)."""

    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    image_size: tuple[int, int] = (224, 224)
    patch_size: tuple[int, int] = (16, 16)
    num_channels: int = 3
    num_labels: int = 1000
    layer_norm_eps: float = 1e-12
    qkv_bias: bool = True
    activation: str = "gelu"
    dist_token: bool = False
    dist_head: bool = False
    layer_scale: bool = False

    def __post_init__(self):
        # Accept HF-style ints for square sizes; stored as tuples so configs stay hashable.
        for field in ("image_size", "patch_size"):
            v = getattr(self, field)
            object.__setattr__(self, field, (v, v) if isinstance(v, int) else tuple(v))
        if self.hidden_size % self.num_heads:
            raise ValueError(f"ViTConfig: hidden_size {self.hidden_size} not divisible by num_heads {self.num_heads}")
        if self.activation not in base.ACTIVATIONS:
            raise ValueError(f"ViTConfig: activation {self.activation!r} not in {sorted(base.ACTIVATIONS)}")
        if self.dist_head and not self.dist_token:
            raise ValueError("ViTConfig: dist_head needs dist_token")
        if self.dist_head and self.num_labels <= 0:
            raise ValueError("ViTConfig: dist_head needs num_labels > 0")

    @property
    def grid(self) -> tuple[int, int]:
        return self.image_size[0] // self.patch_size[0], self.image_size[1] // self.patch_size[1]

    @property
    def num_prefix_tokens(self) -> int:
        return 2 if self.dist_token else 1

    @property
    def seq_len(self) -> int:
        return self.grid[0] * self.grid[1] + self.num_prefix_tokens

    @property
    def num_blocks(self) -> int:
        return self.num_layers


class PatchEmbed(nn.Module):
    """images [B, H, W, C] -> patch tokens [B, (H/ph)*(W/pw), d], row-major over the patch grid."""

    features: int
    patch: tuple[int, int]
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, images: jax.Array) -> jax.Array:
        x = patch_conv(self.features, self.patch, name="proj", dtype=self.dtype, param_dtype=self.param_dtype)(images)
        return x.reshape(x.shape[0], -1, x.shape[-1])


class ViTBlock(nn.Module):
    """Pre-LN block. x: [B, T, d] -> (out [B, T, d], mlp_in [B, T, d] = norm2 of the attention output).

    With `config.layer_scale` each branch is scaled before its residual add:
    x + ls1 * attn(norm1(x)), then x + ls2 * mlp(norm2(x)), with ls1, ls2: [d].
    """

    config: ViTConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def _scale(self, name: str, branch: jax.Array) -> jax.Array:
        if not self.config.layer_scale:
            return branch
        init = nn.with_logical_partitioning(nn.initializers.ones_init(), ("embed",))
        gamma = self.param(name, init, (branch.shape[-1],), self.param_dtype)
        return branch * gamma.astype(branch.dtype)

    @nn.compact
    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        cfg = self.config
        prec = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        y = layer_norm(cfg.layer_norm_eps, name="norm1", **prec)(x)
        x = x + self._scale("ls1", Attention(cfg.num_heads, cfg.qkv_bias, name="attn", **prec)(y))
        mlp_in = layer_norm(cfg.layer_norm_eps, name="norm2", **prec)(x)
        mlp_out = Mlp(cfg.intermediate_size, cfg.activation, name="mlp", **prec)(mlp_in)
        return x + self._scale("ls2", mlp_out), mlp_in


class ImageModel(nn.Module):
    """images [B, H, W, C] -> logits [B, num_labels] through the stages `embed`, `block` (one per
    `config.num_blocks`) and `classify`, which a subclass defines; ViT and Swin are two."""

    config: Any
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @property
    def prec(self) -> dict[str, Any]:
        return dict(dtype=self.dtype, param_dtype=self.param_dtype)

    def setup_norm_and_head(self):
        """The final LayerNorm `norm` and, unless num_labels is 0, the linear `head`."""
        cfg = self.config
        self.norm = layer_norm(cfg.layer_norm_eps, **self.prec)
        if cfg.num_labels > 0:
            self.head = dense(cfg.num_labels, ("embed", "classes"), **self.prec)

    def __call__(self, images: jax.Array) -> jax.Array:
        x = self.embed(images)
        for i in range(self.config.num_blocks):
            x, _ = self.block(i, x)
        return self.classify(x)


class ViT(ImageModel):
    """The ViT/DeiT `ImageModel`: tokens [B, T, d] between the stages."""

    config: ViTConfig

    def setup(self):
        cfg = self.config
        d = cfg.hidden_size
        prec = self.prec
        token_init = nn.with_logical_partitioning(nn.initializers.normal(0.02), (None, None, "embed"))
        self.patch_embed = PatchEmbed(d, cfg.patch_size, **prec)
        self.cls_token = self.param("cls_token", token_init, (1, 1, d), self.param_dtype)
        if cfg.dist_token:
            self.dist_token = self.param("dist_token", token_init, (1, 1, d), self.param_dtype)
        self.pos_embed = self.param("pos_embed", token_init, (1, cfg.seq_len, d), self.param_dtype)
        self.blocks = [ViTBlock(cfg, **prec) for _ in range(cfg.num_layers)]  # named blocks_{i}
        self.setup_norm_and_head()
        if cfg.dist_head:
            self.head_dist = dense(cfg.num_labels, ("embed", "classes"), **prec)

    def embed(self, images: jax.Array) -> jax.Array:
        """images [B, H, W, C] -> tokens [B, T, d], prefix tokens first (CLS, then DeiT's distillation)."""
        cfg = self.config
        if images.ndim != 4 or tuple(images.shape[1:]) != (*cfg.image_size, cfg.num_channels):
            raise ValueError(
                f"ViT expects NHWC images [B, {cfg.image_size[0]}, {cfg.image_size[1]}, {cfg.num_channels}], "
                f"got {tuple(images.shape)}"
            )
        x = self.patch_embed(images.astype(self.dtype))
        b = x.shape[0]
        prefix = [self.cls_token] + ([self.dist_token] if cfg.dist_token else [])
        prefix = [jnp.broadcast_to(t, (b, 1, t.shape[-1])).astype(x.dtype) for t in prefix]
        return jnp.concatenate([*prefix, x], axis=1) + self.pos_embed.astype(x.dtype)

    def block(self, i: int, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Block i (a Python int). x: [B, T, d] -> (out [B, T, d], mlp_in [B, T, d])."""
        return self.blocks[i](x)

    def classify(self, x: jax.Array) -> jax.Array:
        """x: [B, T, d] (last block's output) -> logits [B, num_labels]."""
        x = self.norm(x)
        if self.config.num_labels <= 0:
            return x[:, 0]
        logits = self.head(x[:, 0])
        if self.config.dist_head:
            logits = (logits + self.head_dist(x[:, 1])) / 2
        return logits


# ---------------------------------------------------------------------------------------
# Staged view for the FiPS pipeline.
# ---------------------------------------------------------------------------------------

def mlp_spec_for(activation: str) -> base.MlpSpec:
    return dataclasses.replace(base.VIT_MLP, activation=activation)


@dataclasses.dataclass(frozen=True)
class ImageArchitecture:
    """`base.Architecture` for a linen image model (ViT, Swin) whose module has `embed(images)`,
    `block(i, x) -> (out, mlp_in)` and `classify(x)`. ctx is None; images are `[B, H, W, C]`.

    A subclass names its module class (`module_cls`, built as `module_cls(config, dtype,
    param_dtype)`); the config gives `num_blocks`, `image_size`, `num_channels`, `activation`.
    """

    is_causal_lm = False
    module_cls: ClassVar[type[nn.Module]]

    config: Any
    dtype: Any = jnp.float32  # compute dtype
    param_dtype: Any = jnp.float32

    @property
    def num_blocks(self) -> int:
        return self.config.num_blocks

    @property
    def mlp_spec(self) -> base.MlpSpec:
        return mlp_spec_for(self.config.activation)

    def module(self) -> nn.Module:
        return self.module_cls(self.config, self.dtype, self.param_dtype)

    def _dummy(self) -> jax.Array:
        cfg = self.config
        return jnp.zeros((1, *cfg.image_size, cfg.num_channels), jnp.float32)

    def init(self, rng: jax.Array) -> base.Params:
        return nn.meta.unbox(self.module().init(rng, self._dummy())["params"])

    def logical_axes(self) -> Any:
        """Tree shaped like `init`'s, holding a PartitionSpec of logical axis names per param."""
        boxed = jax.eval_shape(lambda r: self.module().init(r, self._dummy()), jax.random.key(0))
        return nn.get_partition_spec(boxed)["params"]

    def mlp_path(self, block: int) -> str:
        return f"blocks_{block}/mlp"

    def embed(self, params: base.Params, images: jax.Array) -> tuple[jax.Array, None]:
        return self.module().apply({"params": params}, images, method="embed"), None

    def block(self, params: base.Params, i: int, hidden: jax.Array, ctx: Any = None) -> tuple[jax.Array, jax.Array]:
        return self.module().apply({"params": params}, i, hidden, method="block")

    def head(self, params: base.Params, hidden: jax.Array, ctx: Any = None) -> jax.Array:
        return self.module().apply({"params": params}, hidden, method="classify")

    def apply(self, params: base.Params, images: jax.Array) -> jax.Array:
        return self.module().apply({"params": params}, images)


@dataclasses.dataclass(frozen=True)
class ViTArchitecture(ImageArchitecture):
    """ViT/DeiT. hidden is [B, T, d] with T = config.seq_len."""

    name = "vit"  # DeiT too: same blocks, the config says which tokens and heads
    module_cls = ViT

    config: ViTConfig


@dataclasses.dataclass(frozen=True)
class DinoV2Architecture(ViTArchitecture):
    """The DINOv2 backbone: a `ViTConfig` with `layer_scale=True` and `num_labels=0`, so `apply`
    gives the final-norm CLS features `[B, d]`. Only the name differs from `ViTArchitecture`: it
    tells `registry.to_hf_config` (hence export manifests) to write a `model_type="dinov2"` config."""

    name = "dinov2"

    def __post_init__(self):
        if not self.config.layer_scale or self.config.num_labels:
            raise ValueError("DinoV2Architecture needs ViTConfig(layer_scale=True, num_labels=0), got "
                             f"layer_scale={self.config.layer_scale}, num_labels={self.config.num_labels}")
