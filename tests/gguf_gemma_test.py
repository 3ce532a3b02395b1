"""Gemma-2/3 GGUF pieces: tiny GGUF files written the way llama.cpp's converter writes them (norm
weights as 1 + w, no Q/K permutation) from random tiny HF models; the HF-named tensors and the
config we read back are compared with the HF model and with transformers' own GGUF loader."""

import gguf
import numpy as np
import pytest

from fips_jax.hf import checkpoint, convert, gguf_gemma
from fips_jax.hf.gguf_file import GgufFile

try:  # transformers' GGUF loader and the reference models need torch; the rest does not
    import torch
    import transformers
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint
except ImportError:
    torch = transformers = load_gguf_checkpoint = None

TINY = dict(
    vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=7, num_attention_heads=4,
    num_key_value_heads=2, head_dim=16, max_position_embeddings=64, query_pre_attn_scalar=16,
    sliding_window=4, rms_norm_eps=1e-6, bos_token_id=2, eos_token_id=1, pad_token_id=0,
)
EXTRA = {
    "gemma2": dict(rope_theta=10000.0, attn_logit_softcapping=20.0, final_logit_softcapping=3.0),
    "gemma3": dict(rope_theta=1000.0, rope_scaling={"rope_type": "linear", "factor": 4.0}, final_logit_softcapping=3.0),
}


def test_names_and_norm_transform_invert():
    for hf in ("model.layers.3.self_attn.k_norm.weight", "model.layers.0.post_feedforward_layernorm.weight",
               "model.norm.weight", "model.layers.1.mlp.down_proj.weight", "model.embed_tokens.weight"):
        assert gguf_gemma.hf_name(gguf_gemma.gguf_name(hf)) == hf
    assert gguf_gemma.hf_name("blk.2.ffn_norm.weight") == "model.layers.2.pre_feedforward_layernorm.weight"
    assert gguf_gemma.hf_name("blk.2.post_ffw_norm.weight") == "model.layers.2.post_feedforward_layernorm.weight"
    # Gemma (v1) has Llama's two norms: ffn_norm is HF's post_attention_layernorm there.
    assert gguf_gemma.hf_name("blk.2.ffn_norm.weight", "gemma") == "model.layers.2.post_attention_layernorm.weight"
    assert gguf_gemma.gguf_name("model.layers.2.post_attention_layernorm.weight", "gemma") == "blk.2.ffn_norm.weight"
    assert gguf_gemma.hf_name("blk.2.post_ffw_norm.weight", "gemma") == "blk.2.post_ffw_norm.weight"  # unknown
    w = np.array([0.5, -0.25], np.float32)
    assert gguf_gemma.is_norm("model.layers.0.self_attn.q_norm.weight")
    assert not gguf_gemma.is_norm("model.layers.0.mlp.up_proj.weight")
    np.testing.assert_array_equal(gguf_gemma.norm_to_gguf("model.norm.weight", w), [1.5, 0.75])
    np.testing.assert_array_equal(gguf_gemma.norm_to_hf("model.norm.weight", np.array([1.5, 0.75], np.float32)), w)
    with pytest.raises(ValueError, match="not a Gemma"):
        gguf_gemma.hf_config({"general.architecture": "llama"}, [])


def _write_gguf(path, arch, hf_cfg, tensors):
    """A GGUF file with llama.cpp's metadata keys for `arch` and the HF tensors renamed, norms + 1."""
    w = gguf.GGUFWriter(str(path), arch)
    c = hf_cfg
    for key, field in (("context_length", "max_position_embeddings"), ("embedding_length", "hidden_size"),
                       ("block_count", "num_hidden_layers"), ("feed_forward_length", "intermediate_size"),
                       ("attention.head_count", "num_attention_heads"),
                       ("attention.head_count_kv", "num_key_value_heads"), ("attention.key_length", "head_dim"),
                       ("attention.value_length", "head_dim"), ("attention.sliding_window", "sliding_window"),
                       ("vocab_size", "vocab_size")):
        w.add_uint32(f"{arch}.{key}", c[field])
    w.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", c["rms_norm_eps"])
    w.add_float32(f"{arch}.rope.freq_base", c["rope_theta"])
    for cap in ("attn_logit_softcapping", "final_logit_softcapping"):
        if c.get(cap) is not None:
            w.add_float32(f"{arch}.{cap}", c[cap])
    if c.get("rope_scaling"):
        w.add_string(f"{arch}.rope.scaling.type", "linear")
        w.add_float32(f"{arch}.rope.scaling.factor", c["rope_scaling"]["factor"])
    w.add_uint32("tokenizer.ggml.bos_token_id", c["bos_token_id"])
    w.add_uint32("tokenizer.ggml.eos_token_id", c["eos_token_id"])
    w.add_uint32("tokenizer.ggml.padding_token_id", c["pad_token_id"])
    for name, array in tensors.items():
        if name != "lm_head.weight":  # tied
            w.add_tensor(gguf_gemma.gguf_name(name), gguf_gemma.norm_to_gguf(name, array))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module", params=["gemma2", "gemma3"])
def gguf_model(request, tmp_path_factory):
    """(arch, torch model, its HF config dict, GGUF path) for a random tiny Gemma."""
    if torch is None:
        pytest.skip("transformers' GGUF loader needs torch")
    arch = request.param
    cls = {"gemma2": (transformers.Gemma2Config, transformers.Gemma2ForCausalLM),
           "gemma3": (transformers.Gemma3TextConfig, transformers.Gemma3ForCausalLM)}[arch]
    torch.manual_seed(0)
    model = cls[1]._from_config(cls[0](**TINY, **EXTRA[arch]), attn_implementation="eager").eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    tensors = {k: v.detach().numpy().copy() for k, v in model.state_dict().items() if "rotary" not in k}
    path = tmp_path_factory.mktemp(arch) / f"tiny-{arch}.gguf"
    _write_gguf(path, arch, {**TINY, **EXTRA[arch]}, tensors)
    return arch, model, path


def _ours(path):
    """(HF config dict, {HF name: tensor}) read with fips_jax's GGUF parser and gguf_gemma."""
    file = GgufFile(str(path))
    hf = gguf_gemma.hf_config(file.fields, file.tensors)
    tensors = {gguf_gemma.hf_name(n): gguf_gemma.norm_to_hf(gguf_gemma.hf_name(n), file.read(n)) for n in file.tensors}
    return hf, tensors


def test_tensors_and_config_match_transformers_gguf_loader(gguf_model):
    arch, model, path = gguf_model
    hf, tensors = _ours(path)
    theirs = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=model)
    assert sorted(tensors) == sorted(theirs["tensors"])
    for name, want in theirs["tensors"].items():
        np.testing.assert_allclose(tensors[name], np.asarray(want, np.float32), atol=1e-6, err_msg=name)
    # Every config entry transformers reads, we read the same; we also read what it leaves out.
    for k, v in theirs["config"].items():
        if k in hf:
            assert hf[k] == pytest.approx(v), k
    assert {"num_hidden_layers", "head_dim", "sliding_window", "rms_norm_eps"} <= set(theirs["config"]) & set(hf)
    assert hf["model_type"] == theirs["config"]["model_type"]


def test_gguf_loads_into_our_model_with_the_reference_logits(gguf_model):
    """The config read back equals the model's own, and the GGUF tensors under the family key map
    give transformers' logits (caps, local/global layers and scaled RoPE included)."""
    arch, model, path = gguf_model
    hf, tensors = _ours(path)
    fam = checkpoint.family(hf["model_type"])
    cfg = fam.config_from_hf(hf)
    assert cfg == fam.config_from_hf(model.config.to_dict())

    class Source:  # the tensors as a convert.TensorSource
        source = str(path)
        keys = lambda self: list(tensors)  # noqa: E731
        shape = lambda self, k: tensors[k].shape  # noqa: E731
        get = lambda self, k, dtype=np.float32: tensors[k].astype(dtype)  # noqa: E731

    built = fam.build_architecture(cfg)
    params = convert.load_params(Source(), fam.key_map(cfg), convert.expected_shapes(built.init))
    tokens = np.random.RandomState(0).randint(0, TINY["vocab_size"], (2, 12))
    with torch.no_grad():
        want = model(torch.tensor(tokens)).logits.numpy()
    np.testing.assert_allclose(np.asarray(built.apply(params, tokens)), want, atol=1e-4)
