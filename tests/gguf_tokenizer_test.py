"""The GGUF tokenizer without torch: the same ids as transformers' own GGUF tokenizer on real text,
and the CLI running a GGUF model end to end in a process where torch cannot be imported."""

import importlib.util
import json
import os
import subprocess
import sys

import gguf
import numpy as np
import pytest

import _helpers as helpers
from fips_jax.data import text as text_data
from fips_jax.hf import gguf as hf_gguf
from fips_jax.hf.gguf_file import GgufFile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Runs a module with torch unimportable: `import torch` raises ImportError and
# importlib.util.find_spec("torch") returns None, as in an environment without torch.
NO_TORCH = "import runpy, sys; sys.modules['torch'] = None; sys.argv = sys.argv[1:]; " \
           "runpy.run_module(sys.argv[0], run_name='__main__', alter_sys=True)"
TOKENIZER_STRINGS = ("tokenizer.ggml.tokens", "tokenizer.ggml.merges")


@pytest.fixture(scope="module")
def smollm2_path():
    return helpers.smollm2_gguf_or_skip()


def _real_text(min_chars: int) -> str:
    try:
        articles = text_data.wiki_offline_articles("eval")
    except (FileNotFoundError, ImportError) as e:
        pytest.skip(str(e))
    out, n = [], 0
    for _, text in articles:
        out.append(text)
        n += len(text)
        if n >= min_chars:
            break
    return "\n\n".join(out)


def test_ids_equal_transformers_gguf_tokenizer(smollm2_path):
    if importlib.util.find_spec("torch") is None:
        pytest.skip("transformers' GGUF tokenizer (the reference) needs torch")
    from transformers import PreTrainedTokenizerFast

    ours = hf_gguf.load_gguf_tokenizer(smollm2_path)
    folder, name = os.path.split(smollm2_path)
    reference = PreTrainedTokenizerFast.from_pretrained(folder, gguf_file=name)
    # Real prose, plus the chat markup and characters that exercise byte fallback and splitting.
    text = _real_text(60_000) + "\n<|im_start|>user\nCafé naïve — 東京 123,456.78 it's\t\ttabs  <|im_end|>\n"
    ids = ours(text)["input_ids"]
    assert len(ids) >= 10_000, len(ids)
    assert ids == reference(text)["input_ids"]
    assert ours.decode(ids) == reference.decode(ids)
    for attr in ("bos_token", "eos_token", "pad_token", "unk_token"):
        assert getattr(ours, attr) == getattr(reference, attr), attr
    assert ours.convert_tokens_to_ids("<|im_start|>") == reference.convert_tokens_to_ids("<|im_start|>")


def test_tokenizer_strings_kept_only_when_asked(smollm2_path):
    lean = GgufFile(smollm2_path)
    full = GgufFile(smollm2_path, keep_strings=TOKENIZER_STRINGS)
    assert lean.fields["tokenizer.ggml.tokens"].length == len(full.fields["tokenizer.ggml.tokens"]) == 49152
    assert full.fields["tokenizer.ggml.merges"][0].count(" ") == 1
    assert set(lean.tensors) == set(full.tensors)  # the tensor table is found either way


def _tiny_gguf_with_tokenizer(path, source_path):
    """A random 2-block llama GGUF whose tokenizer metadata is SmolLM2's (vocabulary, merges,
    token types, special ids): the tokenizer path of the default run at a tiny model's cost."""
    src = GgufFile(source_path, keep_strings=TOKENIZER_STRINGS).fields
    vocab, d, p, layers, heads = len(src["tokenizer.ggml.tokens"]), 32, 64, 2, 4
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(layers)
    w.add_context_length(256)
    w.add_embedding_length(d)
    w.add_feed_forward_length(p)
    w.add_head_count(heads)
    w.add_head_count_kv(2)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_vocab_size(vocab)
    w.add_tokenizer_model(src["tokenizer.ggml.model"])
    w.add_tokenizer_pre(src["tokenizer.ggml.pre"])
    w.add_token_list(src["tokenizer.ggml.tokens"])
    w.add_token_types(src["tokenizer.ggml.token_type"])
    w.add_token_merges(src["tokenizer.ggml.merges"])
    w.add_bos_token_id(src["tokenizer.ggml.bos_token_id"])
    w.add_eos_token_id(src["tokenizer.ggml.eos_token_id"])
    rng = np.random.default_rng(0)

    def add(name, *shape, scale=0.05):
        w.add_tensor(name, (rng.standard_normal(shape) * scale).astype(np.float32 if len(shape) == 1 else np.float16))

    add("token_embd.weight", vocab, d)  # no output.weight: tied embeddings
    w.add_tensor("output_norm.weight", np.ones(d, np.float32))
    for i in range(layers):
        w.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(d, np.float32))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(d, np.float32))
        add(f"blk.{i}.attn_q.weight", d, d)
        add(f"blk.{i}.attn_k.weight", d // 2, d)
        add(f"blk.{i}.attn_v.weight", d // 2, d)
        add(f"blk.{i}.attn_output.weight", d, d)
        add(f"blk.{i}.ffn_gate.weight", p, d)
        add(f"blk.{i}.ffn_up.weight", p, d)
        add(f"blk.{i}.ffn_down.weight", d, p)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_cli_runs_a_gguf_model_without_torch(tmp_path, smollm2_path):
    model = tmp_path / "tiny.gguf"
    _tiny_gguf_with_tokenizer(model, smollm2_path)
    wd = tmp_path / "run"
    overrides = [f"--config.model.path={model}", "--config.data.calib.window=64", "--config.data.calib.n_windows=4",
                 "--config.data.eval.context=64", "--config.data.eval.max_windows=2", "--config.data.holdout_windows=1",
                 "--config.fips.group_size=2", "--config.local.epochs=6", "--config.local.batch_tokens=128",
                 "--config.checkpoint_every=4", "--config.finetune.n_windows=4"]
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", NO_TORCH, "fips_jax.main", "--config=configs/smollm2.py",
                           f"--workdir={wd}", *overrides], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "torch" not in proc.stderr.lower().replace("pytorch was not found", ""), proc.stderr[-2000:]
    m = json.load(open(wd / "metrics.json"))
    assert m["data"]["calib_tokens"] == 4 * 64
    # The vocabulary is the GGUF's own: a random model's perplexity is near its vocabulary size.
    assert 0.2 * 49152 < m["evals"]["dense"]["ppl"] < 5 * 49152
