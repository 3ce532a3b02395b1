"""Text generation with a compressed LLM.

    python -m fips_jax.generate --compressed=/tmp/run/compressed --prompt="The history of" --max_new_tokens=40
    python -m fips_jax.generate --sparse=/tmp/run/model.safetensors --mlp=sparse --tokenizer=bytes --prompt=...

The model comes from an `export.save` directory (--compressed) or an `export_sparse` file
(--sparse). `--mlp` picks how the grouped MLPs run:

  assembled    U V_t multiplied out once at load (`export.load`'s params); plain dense model.
  materialize | factored | sparse
               the decoder's MLP calls are intercepted (`flax.linen.intercept_methods`) and
               replaced by `fips_mlp.forward` on the group's U and the block's V, so W never
               exists between calls ("sparse": V packed, see `fips_mlp`).

Decoding re-runs the whole sequence for every new token (no KV cache) on a buffer padded to
prompt + max_new_tokens, inside one compiled `lax.while_loop`: the causal mask makes the logits at
position t independent of the padding after it. Greedy by default; --temperature > 0 samples.

The manifest stores no tokenizer: --tokenizer_from (an HF folder or a .gguf file; --gguf is the
same for GGUF) names one; otherwise SmolLM2-135M's GGUF tokenizer is used when the model has its
shape, and UTF-8 bytes (`registry.ByteTokenizer`) when not.
"""

from __future__ import annotations

import functools
import os
import sys
import time
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fips_jax import export, export_sparse
from fips_jax.data import text as text_data
from fips_jax.models import base, fips_mlp, registry

MLP_MODES = ("assembled",) + fips_mlp.MODES
TOKENIZERS = ("auto", "model", "bytes")
# hf_config keys that identify a checkpoint's shape (and so its vocabulary's owner).
_SHAPE_KEYS = ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
               "num_attention_heads", "num_key_value_heads")


def load(compressed: str | None = None, sparse: str | None = None) -> tuple[dict, dict]:
    """(tree {"base", "fips"}, manifest) from exactly one of a directory or a sparse file."""
    if (compressed is None) == (sparse is None):
        raise ValueError("give exactly one of --compressed (a directory) or --sparse (a .safetensors file)")
    return export.read_tree(compressed) if compressed else export_sparse.read(sparse)


def _pack(v_t: np.ndarray) -> fips_mlp.PackedV:
    """The tight 2:4 layout when the factor has it, ELLPACK otherwise."""
    try:
        return fips_mlp.pack(v_t, nm=(2, 4))
    except ValueError:
        return fips_mlp.pack(v_t)


def _group_inputs(tree: dict, manifest: dict, mode: str) -> dict:
    """{group: {"u", "factors": [block][fc] V_t [r, p] (PackedV in sparse mode), "bias"?}} for
    `mlp_logits_fn`."""
    out = {}
    for g in manifest["groups"]:
        group_params = dict(tree["fips"][g["name"]])
        v = np.asarray(group_params.pop("v"))
        # One array per FC, split once here: a slice inside the jitted forward is a copy per call.
        pick = _pack if mode == "sparse" else jnp.asarray
        group_params["factors"] = [[pick(v_t) for v_t in v_b] for v_b in v]
        out[g["name"]] = group_params
    return out


def mlp_logits_fn(arch: base.Architecture, manifest: dict, mode: str, sparse_kernel: str = "densify") -> Callable:
    """`fn((base_params, groups), tokens [B, T]) -> logits [B, T, V]` with every grouped MLP run
    by `fips_mlp.forward` in `mode` on `groups` (from `_group_inputs`); undecorated, jit it."""
    where = {arch.mlp_path(i): (g["name"], b) for g in manifest["groups"] for b, i in enumerate(g["blocks"])}
    spec = arch.mlp_spec

    def fn(weights, tokens):
        params, groups = weights

        def interceptor(next_fun, args, kwargs, context):
            path = "/".join(context.module.path)
            if context.method_name != "__call__" or path not in where:
                return next_fun(*args, **kwargs)
            name, b = where[path]
            grp = groups[name]
            bias = {k: x[b] for k, x in grp["bias"].items()} if "bias" in grp else None
            return fips_mlp.forward(spec, mode, grp["u"], grp["factors"][b], bias, args[0], sparse_kernel)

        with nn.intercept_methods(interceptor):
            return arch.apply(params, tokens)

    return fn


def build(tree: dict, manifest: dict, mlp: str = "assembled",
          sparse_kernel: str = "densify") -> tuple[base.Architecture, Callable[[Any, jax.Array], jax.Array], Any]:
    """(arch, pure `fn(weights, tokens [B, T]) -> logits [B, T, V]`, weights) of the compressed
    model. The weights are an argument, not a closure, so jitting fn does not bake them in."""
    if mlp not in MLP_MODES:
        raise ValueError(f"--mlp {mlp!r} not in {MLP_MODES}")
    if mlp == "assembled":
        arch, params = export.assemble_tree(tree, manifest)
        return arch, arch.apply, params
    arch = registry.from_hf_config(manifest["hf_config"])
    return arch, mlp_logits_fn(arch, manifest, mlp, sparse_kernel), (tree["base"], _group_inputs(tree, manifest, mlp))


@functools.partial(jax.jit, static_argnames=("fn", "n_prompt", "temperature", "eos_id"))
def _decode(fn, weights, buf, key, n_prompt, temperature, eos_id):
    """Fill buf [1, L] after its first n_prompt tokens, one token per model call, stopping after
    eos_id. Returns (buf, number of tokens filled). One compiled loop for all steps."""

    def step(state):
        buf, t, _ = state
        # The logits at t - 1 predict token t; positions past t are padding the causal mask hides.
        logits = jax.lax.dynamic_index_in_dim(fn(weights, buf)[0], t - 1, keepdims=False).astype(jnp.float32)
        if temperature > 0:
            nxt = jax.random.categorical(jax.random.fold_in(key, t), logits / temperature)
        else:
            nxt = jnp.argmax(logits)
        done = jnp.bool_(False) if eos_id is None else nxt == eos_id
        return buf.at[0, t].set(nxt.astype(jnp.int32)), t + 1, done

    def running(state):
        _, t, done = state
        return (t < buf.shape[1]) & ~done

    buf, t, _ = jax.lax.while_loop(running, step, (buf, jnp.int32(n_prompt), jnp.bool_(False)))
    return buf, t - n_prompt


def generate(fn: Callable[[Any, jax.Array], jax.Array], weights: Any, prompt: Sequence[int], max_new_tokens: int,
             *, temperature: float = 0.0, seed: int = 0, eos_id: int | None = None) -> list[int]:
    """New token ids after `prompt` (up to and including eos_id): greedy (temperature 0) or
    sampled from softmax(logits / temperature).

    fn(weights, tokens [1, L] int32) -> logits [1, L, V], e.g. from `build`. Every step runs it on
    the same buffer of L = len(prompt) + max_new_tokens, inside one compiled loop.
    """
    if not prompt:
        raise ValueError("the prompt encodes to no tokens; a causal LM needs at least one to start from")
    if max_new_tokens < 1:
        return []
    buf = np.zeros((1, len(prompt) + max_new_tokens), np.int32)
    buf[0, :len(prompt)] = prompt
    out, n = _decode(fn, weights, jnp.asarray(buf), jax.random.PRNGKey(seed), len(prompt), float(temperature),
                     None if eos_id is None else int(eos_id))
    return np.asarray(out)[0, len(prompt):len(prompt) + int(n)].tolist()


def _same_shape(a: dict, b: dict) -> bool:
    return all(a.get(k) == b.get(k) for k in _SHAPE_KEYS)


def smollm2_tokenizer_if_matching(hf_config: dict) -> Any | None:
    """SmolLM2's GGUF tokenizer when the model has SmolLM2-135M's shape (None otherwise or when
    the GGUF package is not installed)."""
    from fips_jax.hf import gguf, gguf_file  # pylint: disable=import-outside-toplevel

    try:
        path = gguf.smollm2_gguf_path()
    except FileNotFoundError:
        return None
    ref = gguf.llama_config(gguf_file.GgufFile(path)).to_hf_config()  # metadata only, no tensors
    return gguf.load_gguf_tokenizer(path) if _same_shape(ref, hf_config) else None


def resolve_tokenizer(kind: str, source: str | None, hf_config: dict) -> Any:
    """The tokenizer for `--tokenizer` kind (auto | model | bytes) and `--tokenizer_from` source."""
    if kind not in TOKENIZERS:
        raise ValueError(f"--tokenizer {kind!r} not in {TOKENIZERS}")
    if kind == "bytes":
        tok = registry.ByteTokenizer()
    elif source:
        if not os.path.exists(source):
            raise FileNotFoundError(f"tokenizer source not found: {source}")
        if source.endswith(".gguf"):
            from fips_jax.hf import gguf  # pylint: disable=import-outside-toplevel

            tok = gguf.load_gguf_tokenizer(source)
        else:
            from transformers import AutoTokenizer  # pylint: disable=import-outside-toplevel

            tok = AutoTokenizer.from_pretrained(source)
    else:
        tok = smollm2_tokenizer_if_matching(hf_config)
        if tok is None and kind == "model":
            raise ValueError("--tokenizer=model: the manifest has no tokenizer and the model is not SmolLM2-135M; "
                             "pass --tokenizer_from=<HF folder or .gguf file>")
        tok = tok or registry.ByteTokenizer()
    vocab = len(tok) if hasattr(tok, "__len__") else tok.vocab_size
    if vocab > hf_config["vocab_size"]:
        raise ValueError(f"tokenizer has {vocab} tokens, the model only {hf_config['vocab_size']}")
    return tok


def run(compressed: str | None, sparse: str | None, prompt: str, max_new_tokens: int = 40, *,
        tokenizer: str = "auto", tokenizer_from: str | None = None, mlp: str = "assembled",
        sparse_kernel: str = "densify", temperature: float = 0.0, seed: int = 0) -> tuple[str, list[int], dict]:
    """(completion text, new ids, stats) for the CLI and tests."""
    tree, manifest = load(compressed, sparse)
    if not registry.from_hf_config(manifest["hf_config"]).is_causal_lm:
        raise ValueError(f"{manifest['architecture']} is not a causal LM; nothing to generate")
    tok = resolve_tokenizer(tokenizer, tokenizer_from, manifest["hf_config"])
    ids = text_data.encode(tok, prompt).tolist()
    limit = manifest["hf_config"].get("max_position_embeddings")
    if limit and len(ids) + max_new_tokens > limit:
        raise ValueError(f"prompt ({len(ids)} tokens) + {max_new_tokens} new exceeds the model's {limit} positions")
    _, fn, weights = build(tree, manifest, mlp, sparse_kernel)
    eos = getattr(tok, "eos_token_id", None)
    t0 = time.perf_counter()
    new = generate(fn, weights, ids, max_new_tokens, temperature=temperature, seed=seed, eos_id=eos)
    seconds = time.perf_counter() - t0
    return tok.decode(new), new, {"prompt_tokens": len(ids), "new_tokens": len(new), "seconds": seconds}


def main(argv):
    del argv
    from absl import flags, logging  # pylint: disable=import-outside-toplevel

    logging.set_verbosity(logging.WARNING)  # no Orbax INFO chatter
    f = flags.FLAGS
    try:
        text, _, stats = run(f.compressed, f.sparse, f.prompt, f.max_new_tokens, tokenizer=f.tokenizer,
                             tokenizer_from=f.tokenizer_from or f.gguf, mlp=f.mlp, sparse_kernel=f.sparse_kernel,
                             temperature=f.temperature, seed=f.seed)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(f.prompt + text)
    print(f"[{stats['new_tokens']} tokens in {stats['seconds']:.1f}s including compilation, mlp={f.mlp}]",
          file=sys.stderr)


if __name__ == "__main__":
    from absl import app, flags

    flags.DEFINE_string("compressed", None, "A compressed model directory (export.save).")
    flags.DEFINE_string("sparse", None, "A sparse .safetensors file (export_sparse).")
    flags.DEFINE_string("prompt", "", "Text to continue.")
    flags.DEFINE_integer("max_new_tokens", 40, "Tokens to generate.")
    flags.DEFINE_enum("tokenizer", "auto", TOKENIZERS, "auto: --tokenizer_from, else SmolLM2's when the model "
                      "matches, else bytes; model: the same without the bytes fallback; bytes: UTF-8 bytes.")
    flags.DEFINE_string("tokenizer_from", None, "An HF tokenizer folder or a .gguf file.")
    flags.DEFINE_string("gguf", None, "A .gguf file whose tokenizer to use (same as --tokenizer_from).")
    flags.DEFINE_enum("mlp", "assembled", MLP_MODES, "How the compressed MLPs run (see the module docstring).")
    flags.DEFINE_enum("sparse_kernel", "densify", fips_mlp.SPARSE_KERNELS, "Kernel of --mlp=sparse.")
    flags.DEFINE_float("temperature", 0.0, "0: greedy; > 0: sample from softmax(logits / temperature).")
    flags.DEFINE_integer("seed", 0, "Sampling seed.")
    app.run(main)
