"""Swin Transformer image classifier (linen), staged for FiPS; matches HF `SwinForImageClassification`.

Patch embedding (conv + LayerNorm, optional absolute position embeddings), then stages of
window-attention blocks with a learned relative position bias. Within a stage, odd blocks
shift their windows by window_size // 2 and mask attention between regions that the cyclic
shift brought together. HF's rule is kept: a block whose resolution is <= window_size uses one
window covering the shorter side and no shift. Every stage but the last ends with patch merging
(2x2 neighbourhood -> LayerNorm -> linear 4C -> 2C). The head is LayerNorm, mean over tokens,
linear.

Inputs are images NHWC float32 `[B, H, W, C]` (HF's `pixel_values` are NCHW). As in HF, H and W
need not divide by the patch size (the image is zero-padded bottom/right); without absolute
position embeddings any size whose stage resolutions fit the window works.

Hidden states between stages keep their spatial layout: `[B, h, w, C_s]`, with h, w the stage's
patch-grid resolution, so the staged view needs no context (ctx is None) and the MLP input
`mlp_in` is `[B, h, w, C_s]` too (flatten to `[-1, C_s]` to collect calibration rows).

Param tree, blocks numbered globally over all stages (block i is in stage `config.block_stage(i)`):
    patch_embed/{proj/{kernel [ph, pw, C, d], bias}, norm/{scale, bias}}
    pos_embed [1, gh*gw, d]                      (use_absolute_embeddings only)
    blocks_{i}/norm1, blocks_{i}/attn/{query,key,value,out, rel_pos_bias [(2w-1)^2, heads]},
    blocks_{i}/norm2, blocks_{i}/mlp/{fc1 [C_s, p_s], fc2 [p_s, C_s]}
    merges_{s}/{norm [4 C_s], reduction/kernel [4 C_s, 2 C_s]}   (after stage s, s < num_stages - 1)
    norm/{scale, bias}, head/{kernel, bias}

Staging: `block(params, i, ...)` for the first block of a stage s > 0 first applies
`merges_{s-1}` (the patch merging that ends stage s - 1), so
`embed -> block_0 .. block_{N-1} -> head` is the full forward.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fips_jax.models import base
from fips_jax.models.vit import (Attention, ImageArchitecture, ImageModel, Mlp, PatchEmbed, dense, layer_norm,
                                 patch_conv)

# HF builds the patch-embedding and patch-merging LayerNorms with PyTorch's default eps, not
# config.layer_norm_eps (which only the blocks and the final norm use).
_TORCH_LN_EPS = 1e-5
# HF masks shifted-window attention with -100 rather than -inf; kept for exact parity.
_MASK_VALUE = -100.0


@dataclasses.dataclass(frozen=True)
class SwinConfig:
    """Swin hyper-parameters. Stage s has width `embed_dim * 2**s`, `depths[s]` blocks and
    `num_heads[s]` heads. `num_labels = 0` drops the head (logits are the pooled features)."""

    image_size: tuple[int, int] = (224, 224)
    patch_size: tuple[int, int] = (4, 4)
    num_channels: int = 3
    embed_dim: int = 96
    depths: tuple[int, ...] = (2, 2, 6, 2)
    num_heads: tuple[int, ...] = (3, 6, 12, 24)
    window_size: int = 7
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    layer_norm_eps: float = 1e-5
    activation: str = "gelu"
    use_absolute_embeddings: bool = False
    num_labels: int = 1000

    def __post_init__(self):
        # Accept HF-style ints and lists; stored as tuples so configs stay hashable.
        for field in ("image_size", "patch_size"):
            v = getattr(self, field)
            object.__setattr__(self, field, (v, v) if isinstance(v, int) else tuple(v))
        object.__setattr__(self, "depths", tuple(self.depths))
        object.__setattr__(self, "num_heads", tuple(self.num_heads))
        if len(self.depths) != len(self.num_heads) or not self.depths or min(self.depths) < 1:
            raise ValueError(f"SwinConfig: depths {self.depths} and num_heads {self.num_heads} must be non-empty, "
                             "equally long, with every depth >= 1")
        for s, heads in enumerate(self.num_heads):
            if self.stage_dim(s) % heads:
                raise ValueError(f"SwinConfig: stage {s} width {self.stage_dim(s)} not divisible by {heads} heads")
        if self.activation not in base.ACTIVATIONS:
            raise ValueError(f"SwinConfig: activation {self.activation!r} not in {sorted(base.ACTIVATIONS)}")
        for s, res in enumerate(self.stage_resolutions()):
            check_window_fits(res, self.window_size, where=f"SwinConfig: stage {s} at image_size {self.image_size}")

    @property
    def num_blocks(self) -> int:
        return sum(self.depths)

    @property
    def grid(self) -> tuple[int, int]:
        """Patch grid (h, w) of a config-sized image; padding rounds up."""
        return -(-self.image_size[0] // self.patch_size[0]), -(-self.image_size[1] // self.patch_size[1])

    def stage_dim(self, s: int) -> int:
        return self.embed_dim * 2**s

    def mlp_hidden(self, s: int) -> int:
        return int(self.mlp_ratio * self.stage_dim(s))

    def block_stage(self, i: int) -> tuple[int, int]:
        """Global block index -> (stage, index within the stage)."""
        if not 0 <= i < self.num_blocks:
            raise ValueError(f"block {i} out of range [0, {self.num_blocks})")
        for s, depth in enumerate(self.depths):
            if i < depth:
                return s, i
            i -= depth
        raise AssertionError("unreachable")

    def stage_resolutions(self) -> list[tuple[int, int]]:
        """Patch-grid resolution entering each stage for a config-sized image (merging rounds up)."""
        h, w = self.grid
        out = []
        for _ in self.depths:
            out.append((h, w))
            h, w = (h + 1) // 2, (w + 1) // 2
        return out


def window_geometry(res: tuple[int, int], window: int, shifted: bool) -> tuple[int, int]:
    """(window, shift) a block uses at resolution `res`. HF's rule: at res <= window the window
    shrinks to the shorter side and the shift is dropped (the window already sees everything
    along that side)."""
    if min(res) <= window:
        return min(res), 0
    return window, window // 2 if shifted else 0


def check_window_fits(res: tuple[int, int], window: int, where: str) -> None:
    # The relative-position table is sized for `window`; a shrunken window cannot index it.
    # HF fails on such inputs with a shape error, so they are refused here with a clear one.
    if min(res) < window:
        raise ValueError(f"{where}: resolution {res} is smaller than window_size {window}; "
                         "the relative position bias table only fits full windows")


def relative_position_index(window: int) -> np.ndarray:
    """[N, N] index into the [(2w-1)^2, heads] bias table, N = window^2, row-major (h, w) tokens."""
    coords = np.stack(np.meshgrid(np.arange(window), np.arange(window), indexing="ij")).reshape(2, -1)
    rel = (coords[:, :, None] - coords[:, None, :]).transpose(1, 2, 0) + (window - 1)
    return rel[..., 0] * (2 * window - 1) + rel[..., 1]


def partition(x: jax.Array, window: int) -> jax.Array:
    """[B, H, W, C] -> [B, nH*nW, window*window, C]; windows row-major, tokens row-major inside."""
    b, h, w, c = x.shape
    x = x.reshape(b, h // window, window, w // window, window, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, (h // window) * (w // window), window * window, c)


def unpartition(x: jax.Array, window: int, h: int, w: int) -> jax.Array:
    """Inverse of `partition`: [B, nH*nW, window*window, C] -> [B, h, w, C]."""
    b, c = x.shape[0], x.shape[-1]
    x = x.reshape(b, h // window, w // window, window, window, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, h, w, c)


def shift_mask(h: int, w: int, window: int, shift: int) -> np.ndarray:
    """[nW, N, N] additive mask for shifted windows on an (h, w) padded grid: 0 where two tokens
    come from the same region of the un-shifted image, -100 where the roll joined them."""
    h_region = (np.arange(h) >= h - window).astype(int) + (np.arange(h) >= h - shift)
    w_region = (np.arange(w) >= w - window).astype(int) + (np.arange(w) >= w - shift)
    regions = (h_region[:, None] * 3 + w_region[None, :]).astype(np.float32)
    win = np.asarray(partition(regions[None, :, :, None], window))[0, :, :, 0]  # [nW, N]
    return np.where(win[:, None, :] != win[:, :, None], _MASK_VALUE, 0.0).astype(np.float32)


class WindowAttention(Attention):
    """Attention within windows plus the learned relative position bias (and the shift mask).

    windows: [B, nW, N, C]; mask: [nW, N, N] or None -> [B, nW, N, C]. N = window_size^2.
    """

    window_size: int = 7

    @nn.compact
    def __call__(self, windows: jax.Array, mask: np.ndarray | None = None) -> jax.Array:
        w = self.window_size
        table = self.param(
            "rel_pos_bias",
            nn.with_logical_partitioning(nn.initializers.truncated_normal(0.02), (None, None)),
            ((2 * w - 1) ** 2, self.num_heads),
            self.param_dtype,
        )
        n = w * w
        bias = table[relative_position_index(w).reshape(-1)].reshape(n, n, self.num_heads).transpose(2, 0, 1)
        if mask is not None:
            bias = bias[None] + jnp.asarray(mask)[:, None]  # [nW, heads, N, N]
        return super().__call__(windows, bias.astype(jnp.float32))


class SwinBlock(nn.Module):
    """x: [B, h, w, C] -> (out [B, h, w, C], mlp_in [B, h, w, C])."""

    config: SwinConfig
    stage: int
    shifted: bool
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        cfg = self.config
        prec = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        _, h, w, _ = x.shape
        window, shift = window_geometry((h, w), cfg.window_size, self.shifted)
        check_window_fits((h, w), cfg.window_size, where=f"stage {self.stage}")

        y = layer_norm(cfg.layer_norm_eps, name="norm1", **prec)(x)
        # Pad after the norm, as HF does: the padded tokens are zeros that still take part
        # in attention (they are not masked), so the order matters for parity.
        hp, wp = h + (-h) % window, w + (-w) % window
        y = jnp.pad(y, ((0, 0), (0, hp - h), (0, wp - w), (0, 0)))
        if shift:
            y = jnp.roll(y, (-shift, -shift), axis=(1, 2))
        mask = shift_mask(hp, wp, window, shift) if shift else None
        attn = WindowAttention(cfg.num_heads[self.stage], cfg.qkv_bias, window_size=window, name="attn", **prec)
        y = unpartition(attn(partition(y, window), mask), window, hp, wp)
        if shift:
            y = jnp.roll(y, (shift, shift), axis=(1, 2))
        x = x + y[:, :h, :w]

        mlp_in = layer_norm(cfg.layer_norm_eps, name="norm2", **prec)(x)
        return x + Mlp(cfg.mlp_hidden(self.stage), cfg.activation, name="mlp", **prec)(mlp_in), mlp_in


class PatchMerging(nn.Module):
    """[B, h, w, C] -> [B, ceil(h/2), ceil(w/2), 2C]: concat each 2x2 neighbourhood, norm, project."""

    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        _, h, w, c = x.shape
        x = jnp.pad(x, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)))
        # HF's channel order: (row, col) offsets (0,0), (1,0), (0,1), (1,1).
        x = jnp.concatenate([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], axis=-1)
        prec = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = layer_norm(_TORCH_LN_EPS, name="norm", **prec)(x)
        return dense(2 * c, (None, "embed"), use_bias=False, name="reduction", **prec)(x)


class SwinPatchEmbed(PatchEmbed):
    """images [B, H, W, C] -> [B, ceil(H/ph), ceil(W/pw), d] (zero-pads bottom/right), then LayerNorm.
    PatchEmbed's fields; the token grid is kept 2-D for the windows."""

    @nn.compact
    def __call__(self, images: jax.Array) -> jax.Array:
        _, h, w, _ = images.shape
        ph, pw = self.patch
        prec = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        images = jnp.pad(images, ((0, 0), (0, (-h) % ph), (0, (-w) % pw), (0, 0)))
        x = patch_conv(self.features, self.patch, name="proj", **prec)(images)
        return layer_norm(_TORCH_LN_EPS, name="norm", **prec)(x)


class Swin(ImageModel):
    """The Swin `ImageModel`: patch grids [B, h, w, C] between the stages."""

    config: SwinConfig

    def setup(self):
        cfg = self.config
        prec = self.prec
        self.patch_embed = SwinPatchEmbed(cfg.embed_dim, cfg.patch_size, **prec)
        if cfg.use_absolute_embeddings:
            init = nn.with_logical_partitioning(nn.initializers.truncated_normal(0.02), (None, None, "embed"))
            shape = (1, cfg.grid[0] * cfg.grid[1], cfg.embed_dim)
            self.pos_embed = self.param("pos_embed", init, shape, self.param_dtype)
        stages = [cfg.block_stage(i) for i in range(cfg.num_blocks)]
        self.blocks = [SwinBlock(cfg, s, shifted=j % 2 == 1, **prec) for s, j in stages]  # named blocks_{i}
        self.merges = [PatchMerging(**prec) for _ in range(len(cfg.depths) - 1)]  # named merges_{s}
        self.setup_norm_and_head()

    def embed(self, images: jax.Array) -> jax.Array:
        """images [B, H, W, C] -> patch features [B, gh, gw, embed_dim]."""
        cfg = self.config
        if images.ndim != 4 or images.shape[-1] != cfg.num_channels:
            raise ValueError(f"Swin expects NHWC images [B, H, W, {cfg.num_channels}], got {tuple(images.shape)}")
        x = self.patch_embed(images.astype(self.dtype))
        if cfg.use_absolute_embeddings:
            if tuple(x.shape[1:3]) != cfg.grid:
                raise ValueError(f"absolute position embeddings fit a {cfg.grid} patch grid "
                                 f"(image_size {cfg.image_size}), got {tuple(x.shape[1:3])}")
            x = x + self.pos_embed.reshape(1, *cfg.grid, -1).astype(x.dtype)
        return x

    def block(self, i: int, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Global block i (a Python int); the first block of stage s > 0 merges patches first.
        x: [B, h, w, C] -> (out, mlp_in), both at block i's stage resolution and width."""
        s, j = self.config.block_stage(i)
        if s > 0 and j == 0:
            x = self.merges[s - 1](x)
        return self.blocks[i](x)

    def classify(self, x: jax.Array) -> jax.Array:
        """x: [B, h, w, C_last] (last block's output) -> logits [B, num_labels]."""
        pooled = self.norm(x).astype(jnp.float32).mean(axis=(1, 2)).astype(x.dtype)
        return self.head(pooled) if self.config.num_labels > 0 else pooled


@dataclasses.dataclass(frozen=True)
class SwinArchitecture(ImageArchitecture):
    """Swin. hidden is [B, h, w, C] (see module docstring)."""

    name = "swin"
    module_cls = Swin

    config: SwinConfig
