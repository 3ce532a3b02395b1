"""GGUF export then import, for every family both directions support: the file fips_jax writes
reads back to the same config and bit-identical params (F32), and transformers' own GGUF loader
reads it to the same logits."""

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fips_jax import config_base, grouping
from fips_jax.hf import gguf as hf_gguf
from fips_jax.hf import gguf_export
from fips_jax.models import base, registry

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKENS = np.random.RandomState(0).randint(0, 256, (2, 40))  # longer than the tiny sliding windows
# Set in the tiny models what the readers fix rather than read: llama.cpp's Gemma-3 local RoPE
# base (10k); transformers' GGUF loader reads no Qwen3 head_dim (defaults to 128; fips_jax reads
# attention.key_length) and no Gemma-3 query_pre_attn_scalar (defaults to 256), while llama.cpp
# scales by head_dim, so the Gemma-3 model has head_dim 256.
OVERRIDES = {"tiny_gemma3": {"rope_local_base_freq": 10000.0, "head_dim": 256, "query_pre_attn_scalar": 256},
             "tiny_qwen3": {"head_dim": 128}}
# transformers' GGUF loader has no "gemma" (v1) architecture (5.24 maps gemma2/3/4 only), so that
# case is read by fips_jax alone; its head_dim (24, not hidden / heads) is read from key_length.
CASES = ["tiny_llama", "tiny_qwen2", "tiny_qwen3", "tiny_gemma", "tiny_gemma2", "tiny_gemma3"]


def _model(name):
    cfg = config_base.load_config(os.path.join(ROOT, "configs", f"{name}.py"))
    cfg["model"]["hf_config"].update(OVERRIDES.get(name, {}))
    arch, params, _ = registry.load_model(cfg["model"], seed=1)
    # Random norms, so that a Gemma 1 + w offset lost or doubled on the way shows.
    rng = np.random.default_rng(0)
    params = jax.tree_util.tree_map_with_path(
        lambda p, x: x + 0.1 * rng.standard_normal(x.shape).astype(x.dtype) if "norm" in jax.tree_util.keystr(p) else x,
        params)
    return arch, params


@pytest.fixture(scope="module", params=CASES)
def exported(request, tmp_path_factory):
    arch, params = _model(request.param)
    path = str(tmp_path_factory.mktemp(request.param) / "model.gguf")
    gguf_export.write_gguf(path, arch, params, "F32")
    return arch, params, path


def test_fips_jax_reads_back_the_same_model(exported):
    arch, params, path = exported
    arch2, params2 = hf_gguf.load_gguf(path)
    assert arch2.name == arch.name and arch2.config == arch.config, (
        {k: (v, getattr(arch2.config, k)) for k, v in dataclasses.asdict(arch.config).items()
         if getattr(arch2.config, k) != v})
    assert jax.tree_util.tree_structure(params2) == jax.tree_util.tree_structure(params)
    offset = gguf_export.gguf_arch(arch.name).norm_offset
    for path, a in jax.tree_util.tree_leaves_with_path(params):
        a, b = np.asarray(a), np.asarray(base.get_path(params2, grouping.path_str(path)))
        if offset and "norm" in grouping.path_str(path):
            # Stored as 1 + w in float32 and read back as (1 + w) - 1: exact to one rounding of 1 + w.
            np.testing.assert_allclose(b, a, rtol=0, atol=np.finfo(np.float32).eps * float(np.max(1 + np.abs(a))))
        else:
            np.testing.assert_array_equal(b, a)


def test_transformers_reads_the_same_logits(exported):
    torch = pytest.importorskip("torch")
    pytest.importorskip("accelerate")  # transformers' GGUF loading needs it
    from transformers import AutoModelForCausalLM

    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    arch, params, path = exported
    gguf_name = gguf_export.gguf_arch(arch.name).name
    if gguf_name not in GGUF_SUPPORTED_ARCHITECTURES:
        pytest.skip(f"transformers' GGUF loader does not read architecture {gguf_name!r}")
    folder, name = os.path.split(path)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = model(torch.as_tensor(TOKENS)).logits.numpy()
    ours = np.asarray(jax.jit(arch.apply)(params, jnp.asarray(TOKENS)))
    np.testing.assert_allclose(theirs, ours, atol=1e-4 * max(1.0, float(np.abs(ours).max())))


def test_gemma3_llama_cpp_would_run_differently_is_refused():
    arch, params = _model("tiny_gemma3")
    bad = dataclasses.replace(arch.config, rope_local_base_freq=1000.0)
    with pytest.raises(ValueError, match="rope_local_base_freq=1000.0"):
        gguf_export.gguf_arch("gemma3_text").metadata(bad)
