"""GGUF import of the Qwen2 and Qwen3 architectures: random tiny models written the way llama.cpp's
converter writes them (HF row order, q/k/v biases, per-head q/k norms, explicit head_dim) in
F32, F16, Q8_0, Q4_0/Q4_1/Q5_0/Q5_1 and K-quants, loaded by `load_gguf` and compared with the
exact dequantised tensors and with transformers' own GGUF loader."""

import contextlib

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

import _helpers as helpers
from fips_jax.hf import checkpoint, convert
from fips_jax.hf import gguf as hf_gguf
from fips_jax.models.qwen2 import Qwen2Config
from fips_jax.models.qwen3 import Qwen3Config

try:  # transformers' GGUF loader (the reference) needs torch; the rest runs without it
    import torch
    import transformers
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint
except ImportError:
    torch = transformers = None

Q = gguf.GGMLQuantizationType
# p = 256: the down projection's rows are one K-quant super-block (256 inputs); the rest are
# multiples of the 32-input blocks of the legacy quants.
TINY = dict(vocab_size=64, hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-6, rope_theta=1e6)
CONFIGS = {
    "qwen2": Qwen2Config(**TINY, tie_word_embeddings=True),
    # head_dim 32 != hidden_size // heads (16): only `attention.key_length` tells it.
    "qwen3": Qwen3Config(**TINY, head_dim=32, tie_word_embeddings=False),
}
# GGUF tensor kind -> storage type for each scheme; 1-D tensors (norms, biases) stay F32, as
# llama.cpp keeps them.
SCHEMES = {
    "F32": {},
    "F16": dict.fromkeys(["token_embd", "output", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up",
                          "ffn_down"], Q.F16),
    "Q8_0": dict.fromkeys(["token_embd", "output", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up",
                           "ffn_down"], Q.Q8_0),
    "Q4_0/Q4_1/Q5_0/Q5_1": {"ffn_gate": Q.Q4_0, "ffn_up": Q.Q4_1, "ffn_down": Q.Q5_0, "attn_q": Q.Q5_1,
                            "attn_k": Q.Q4_0, "attn_v": Q.Q4_1, "attn_output": Q.Q8_0, "token_embd": Q.Q4_0},
    "Q6_K": {"ffn_down": Q.Q6_K, "ffn_gate": Q.Q8_0, "ffn_up": Q.Q8_0},
    "Q4_K": {"ffn_down": Q.Q4_K, "ffn_gate": Q.Q4_0, "ffn_up": Q.Q4_1},
}
# K-quants (which the gguf package dequantises but cannot quantise): bytes per 256-value block and
# the byte offsets of their float16 scale fields, set to small values so weights stay ~0.01.
K_BLOCKS = {Q.Q6_K: (210, (208,)), Q.Q4_K: (144, (0, 2))}


def _k_quant_bytes(rows, cols, qtype, rng):
    size, f16_at = K_BLOCKS[qtype]
    raw = rng.integers(0, 256, (rows, cols // 256, size), dtype=np.uint8)
    for at in f16_at:
        raw[..., at:at + 2] = np.frombuffer(np.float16(2e-5).tobytes(), np.uint8)
    return raw.reshape(rows, -1)


def write_gguf(path, name, cfg, hf_tensors, scheme, seed=0):
    """Write HF-named tensors under GGUF names as llama.cpp's converter does for qwen2/qwen3 (no
    Q/K permutation); returns what each HF tensor dequantises to."""
    entry = hf_gguf.GGUF_ARCHS[name]
    kinds = ["attn_norm", "ffn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"]
    kinds += [k for k in entry.layer_names if k not in kinds]
    to_gguf = {entry.hf_name(g): g for g in ["token_embd.weight", "output_norm.weight", "output.weight"]}
    to_gguf.update({entry.hf_name(f"blk.{i}.{k}.{s}"): f"blk.{i}.{k}.{s}"
                    for i in range(cfg.num_hidden_layers) for k in kinds for s in ("weight", "bias")})
    w = gguf.GGUFWriter(str(path), name)
    helpers.add_decoder_hparams(w, cfg)
    if name == "qwen3":  # llama.cpp writes these when config.json has head_dim
        w.add_key_length(cfg.head_dim)
        w.add_value_length(cfg.head_dim)
    rng = np.random.default_rng(seed)
    stored = {}
    for key, arr in hf_tensors:
        gname = to_gguf[key]
        qtype = Q.F32 if arr.ndim == 1 else scheme.get(gname.split(".")[-2], Q.F32)
        if qtype == Q.F32:
            raw = arr.astype(np.float32)
        elif qtype == Q.F16:
            raw = arr.astype(np.float16)
        elif qtype in K_BLOCKS:
            raw = _k_quant_bytes(*arr.shape, qtype, rng)
        else:
            raw = gguf.quants.quantize(arr, qtype)
        w.add_tensor(gname, raw, raw_dtype=None if qtype in (Q.F32, Q.F16) else qtype)
        stored[key] = raw.astype(np.float32) if qtype in (Q.F32, Q.F16) else gguf.quants.dequantize(raw, qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return stored


@pytest.fixture(scope="module", params=list(CONFIGS))
def family(request):
    """(GGUF architecture name, config, HF-named tensors of random params)."""
    cfg = CONFIGS[request.param]
    fam = checkpoint.family(request.param)
    rng = np.random.default_rng(0)
    shapes = jax.eval_shape(fam.build_architecture(cfg).init, jax.random.key(0))
    params = jax.tree_util.tree_map_with_path(
        lambda p, s: (rng.normal(p[-1].key == "scale", 0.05, s.shape)).astype(np.float32), shapes)
    return request.param, cfg, list(convert.export_params(params, fam.key_map(cfg)))


@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_load_gguf_matches_the_file_and_transformers(tmp_path, family, scheme):
    name, cfg, tensors = family
    path = str(tmp_path / f"{name}.gguf")
    stored = write_gguf(path, name, cfg, tensors, SCHEMES[scheme])
    arch, params = hf_gguf.load_gguf(path)
    # GGUF keeps eps as float32; it is read back as the decimal it was written from.
    assert arch.name == name
    assert arch.config == cfg
    flat = traverse_util.flatten_dict(params, sep="/")
    fam = checkpoint.family(name)
    for e in fam.key_map(arch.config):
        want = convert.TRANSFORMS[e.transform].to_flax(stored[e.hf_key], None)
        np.testing.assert_array_equal(np.asarray(flat[e.flax_path]), want, err_msg=e.hf_key)
    if scheme != "F32":  # quantisation (or the random K-quant bytes) really changed the weights
        orig = dict(tensors)["model.layers.0.mlp.down_proj.weight"]
        assert np.abs(stored["model.layers.0.mlp.down_proj.weight"] - orig).max() > 0

    if torch is None:
        pytest.skip("transformers' GGUF loader (the reference) needs torch")
    hf_cls = {"qwen2": transformers.Qwen2ForCausalLM, "qwen3": transformers.Qwen3ForCausalLM}[name]
    cfg_cls = {"qwen2": transformers.Qwen2Config, "qwen3": transformers.Qwen3Config}[name]
    with _no_init_weights():
        model = hf_cls._from_config(cfg_cls(**arch.config.to_hf_config()), attn_implementation="eager",
                                    dtype=torch.float32)
    parsed = load_gguf_checkpoint(path, return_tensors=True, model_to_load=model)
    ours = arch.config.to_hf_config()
    for key in ("model_type", "num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads",
                "num_key_value_heads", "rope_theta", "rms_norm_eps", "vocab_size", "tie_word_embeddings",
                "max_position_embeddings"):
        assert parsed["config"][key] == pytest.approx(ours[key]), key
    missing, unexpected = model.load_state_dict(parsed["tensors"], strict=False)
    assert missing == (["lm_head.weight"] if cfg.tie_word_embeddings else []) and not unexpected
    model.tie_weights()
    tokens = np.random.RandomState(0).randint(0, cfg.vocab_size, (2, 10))
    with torch.no_grad():
        want = model.eval()(torch.tensor(tokens)).logits.numpy()
    got = np.asarray(jax.jit(arch.apply)(params, jnp.asarray(tokens)))
    print(f"\n{name} {scheme}: max |logits - transformers GGUF| = {np.abs(got - want).max():.2e}", end="")
    np.testing.assert_allclose(got, want, atol=1e-4)


def test_qwen2_without_biases_is_refused_naming_them(tmp_path, family):
    name, cfg, tensors = family
    if name != "qwen2":
        pytest.skip("qwen2 only")
    path = tmp_path / "nobias.gguf"
    write_gguf(path, name, cfg, [t for t in tensors if not t[0].endswith(".bias")], {})
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.q_proj\.bias"):
        hf_gguf.load_gguf(str(path))


def _no_init_weights():
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # older transformers: just pay for the random init
        return contextlib.nullcontext()
    return no_init_weights()


def test_qwen2_bpe_tokenizer_matches_transformers(tmp_path):
    """A byte-level BPE vocabulary (tokenizer.ggml.model "gpt2", pre "qwen2", as llama.cpp writes
    Qwen's) trained here on a little text: `load_gguf_tokenizer` builds it without torch and splits
    text as transformers' GGUF tokenizer does."""
    tokenizers = pytest.importorskip("tokenizers")
    import json

    text = ("Qwen2.5 is a family of language models. It's 2024; 12345 tokens, naïve café — 東京!\n"
            "  Indented   spaces\tand tabs; numbers 3.14159 and 1,000,000 don't split alike.\n") * 20
    bpe = tokenizers.ByteLevelBPETokenizer()
    bpe.train_from_iterator([text], vocab_size=400, min_frequency=2, special_tokens=["<|endoftext|>",
                                                                                     "<|im_start|>", "<|im_end|>"])
    model = json.loads(bpe._tokenizer.to_str())["model"]
    tokens = [t for t, _ in sorted(model["vocab"].items(), key=lambda kv: kv[1])]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    path = tmp_path / "qwen2_tok.gguf"
    w = gguf.GGUFWriter(str(path), "qwen2")
    cfg = CONFIGS["qwen2"]
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(128)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_freq_base(1e6)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(tokens)
    w.add_token_types([3 if t.startswith("<|") else 1 for t in tokens])
    w.add_token_merges(merges)
    w.add_eos_token_id(tokens.index("<|endoftext|>"))
    w.add_bos_token_id(tokens.index("<|endoftext|>"))
    w.add_pad_token_id(tokens.index("<|endoftext|>"))
    w.add_add_bos_token(False)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()

    ours = hf_gguf.load_gguf_tokenizer(str(path))
    probe = text[:400] + "<|im_start|>user\nNew words: Zürich 98765 isn't   here\n<|im_end|>"
    ids = ours(probe)["input_ids"]
    assert len(ids) < len(probe.encode()) / 2  # the merges were applied
    assert ours.decode(ids) == probe
    assert ours.convert_tokens_to_ids("<|im_start|>") in ids
    if torch is None:
        pytest.skip("transformers' GGUF tokenizer (the reference) needs torch")
    reference = transformers.PreTrainedTokenizerFast.from_pretrained(str(tmp_path), gguf_file=path.name)
    assert ids == reference(probe)["input_ids"]
    # The qwen2 split keeps digits apart (llama-bpe would group 3): the pre-tokenizer is really Qwen's.
    assert len(ours("98765")["input_ids"]) == 5
