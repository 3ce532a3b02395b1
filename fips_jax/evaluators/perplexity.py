"""Causal-LM perplexity under two named protocols (SPEC §6). Never mix them in one table.

`standard`
    The token stream (the whole "\\n\\n"-joined WikiText-2 test split, encoded once, so one BOS
    at the start) is cut into non-overlapping windows of `context` tokens; the incomplete tail is
    dropped unless `include_tail`. Each window is scored on every token except its first, which
    has no context inside the window: a window contributes `context - 1` scored tokens. This is
    the GPTQ/SparseGPT/Wanda convention (HF `labels=input_ids` loss per window).
`reference_first_window`
    Only the first `context` tokens, scored the same way (`context - 1` tokens). This is what the
    FiPS authors' code reports; it gives lower numbers (Llama-3.1-8B 4.75 vs ~6.2 standard).

In both, ppl = exp(sum of NLL over scored tokens / number of scored tokens), with the
log-softmax in float32 whatever the model's dtype, and the sum accumulated in float64 on host.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from fips_jax.data import text as text_data

PROTOCOLS = ("standard", "reference_first_window")

LogitsFn = Callable[[jax.Array], jax.Array]  # tokens [B, T] int32 -> logits [B, T, V]
Progress = Callable[[int, int], None]  # (windows done, windows total)


def window_nll(logits: jax.Array, tokens: jax.Array) -> jax.Array:
    """Summed next-token NLL per window: `[B]` float32.

    logits: `[B, T, V]` (any float dtype); position t predicts token t + 1.
    tokens: `[B, T]` int. Scores tokens 1..T-1, i.e. T - 1 tokens per window.
    """
    if logits.shape[:2] != tokens.shape:
        raise ValueError(f"logits shape {logits.shape} does not match tokens {tokens.shape} as [B, T, V]")
    # float32 before the reduction: bf16 logsumexp over a 128k-256k vocabulary loses ~2 digits.
    logits = logits[:, :-1].astype(jnp.float32)
    targets = tokens[:, 1:]
    target_logits = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    nll = jax.nn.logsumexp(logits, axis=-1) - target_logits
    return nll.sum(axis=-1)


def _windows_for(token_ids: np.ndarray, context: int, protocol: str) -> np.ndarray:
    if protocol == "standard":
        return text_data.token_windows(token_ids, context)
    if protocol == "reference_first_window":
        return text_data.token_windows(token_ids, context, n_windows=1)
    raise ValueError(f"perplexity protocol {protocol!r} not in {PROTOCOLS}")


def _total_nll(score_fn: Callable[[jax.Array], jax.Array], windows: np.ndarray, batch_size: int,
               progress: Progress | None) -> float:
    """Summed NLL of `windows` `[N, T]` under `score_fn` (`[B, T]` -> per-window sums `[B]`), in
    batches of exactly `batch_size`: the last is padded with repeats of its first window, whose
    scores are dropped, so a jitted `score_fn` compiles once."""
    n_windows = windows.shape[0]
    total_nll = 0.0
    for start in range(0, n_windows, batch_size):
        batch = windows[start : start + batch_size]
        n_real = batch.shape[0]
        if n_real < batch_size:
            batch = np.concatenate([batch, np.repeat(batch[:1], batch_size - n_real, axis=0)])
        sums = np.asarray(jax.device_get(score_fn(jnp.asarray(batch))), dtype=np.float64)
        total_nll += float(sums[:n_real].sum())
        if progress is not None:
            progress(start + n_real, n_windows)
    return total_nll


def perplexity(
    logits_fn: LogitsFn,
    token_ids: np.ndarray,
    context: int = 2048,
    protocol: str = "standard",
    batch_size: int = 1,
    include_tail: bool = False,
    jit: bool = True,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Perplexity of `logits_fn` on a token stream `[n_tokens]`.

    logits_fn: tokens `[B, T]` int32 → logits `[B, T, V]`; called with B = `batch_size` and
      T = `context` on every call (the last batch is padded with repeats of its first window
      whose scores are discarded), so a jitted model compiles once.
    include_tail: `standard` only; also score the final incomplete window (its own shape, so one
      more compile) on all but its first token.
    jit: wrap `logits_fn` and the NLL reduction in one `jax.jit`; set False for a function that
      cannot be traced (e.g. a torch reference).

    Returns {"protocol", "ppl", "nll" (mean per scored token), "n_tokens" (scored tokens),
    "n_windows", "context"}.
    """
    token_ids = np.asarray(token_ids, dtype=np.int32)
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if include_tail and protocol != "standard":
        raise ValueError("include_tail only applies to the standard protocol")
    windows = _windows_for(token_ids, context, protocol)

    def score(tokens: jax.Array) -> jax.Array:
        return window_nll(logits_fn(tokens), tokens)

    score_fn = jax.jit(score) if jit else score

    n_windows = windows.shape[0]
    total_nll = _total_nll(score_fn, windows, batch_size, progress)
    n_tokens = n_windows * (context - 1)

    if include_tail:
        tail = token_ids[n_windows * context :]
        if tail.shape[0] >= 2:  # a one-token tail has nothing to score
            sums = np.asarray(jax.device_get(score_fn(jnp.asarray(tail[None]))), dtype=np.float64)
            total_nll += float(sums[0])
            n_tokens += tail.shape[0] - 1
            n_windows += 1

    mean_nll = total_nll / n_tokens
    return {
        "protocol": protocol,
        "ppl": float(np.exp(mean_nll)),
        "nll": mean_nll,
        "n_tokens": int(n_tokens),
        "n_windows": int(n_windows),
        "context": int(context),
    }


def text_perplexity(
    logits_fn: LogitsFn,
    tokenizer: Any,
    text: str,
    context: int = 2048,
    protocol: str = "standard",
    **kwargs,
) -> dict[str, Any]:
    """`perplexity` of a text encoded once with `tokenizer` (BOS, if any, only at the start)."""
    return perplexity(logits_fn, text_data.encode(tokenizer, text), context, protocol, **kwargs)
