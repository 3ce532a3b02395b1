"""fips_jax.data.text: text splits, token windows, host shards."""

import json
import string

import numpy as np
import pytest

from fips_jax.data import text as text_data


class CharTokenizer:
    """Byte-level stand-in for a HF tokenizer: BOS=1 then one id per byte."""

    def encode(self, text, add_special_tokens=True):
        ids = [b + 2 for b in text.encode("utf-8")]
        return [1] + ids if add_special_tokens else ids


# ---------------------------------------------------------------- text


@pytest.fixture(scope="module")
def wiki_splits():
    try:
        return {s: text_data.wiki_offline_articles(s) for s in text_data.WIKI_SPLITS}
    except ImportError as e:
        pytest.skip(str(e))


def test_wiki_offline_splits_disjoint_and_cover(wiki_splits):
    calib = [t for t, _ in wiki_splits["calib"]]
    evals = [t for t, _ in wiki_splits["eval"]]
    every = [t for t, _ in wiki_splits["all"]]
    assert not set(calib) & set(evals)
    assert sorted(calib + evals) == every
    # ~1 in 10 articles held out, and enough calibration text for 20 x 8192 tokens.
    assert 0.08 < len(evals) / len(every) < 0.12
    assert len(text_data.wiki_offline_text("calib")) > 1_000_000


def test_wiki_offline_deterministic(wiki_splits):
    assert text_data.wiki_offline_articles("eval") == wiki_splits["eval"]
    text = text_data.wiki_offline_text("eval")
    assert text == "\n\n".join(t for _, t in wiki_splits["eval"])
    title, body = wiki_splits["eval"][0]
    assert body.startswith(title + "\n")


def test_wiki_offline_bad_split():
    with pytest.raises(ValueError, match="not in"):
        text_data.wiki_offline_articles("test")


def test_local_text(tmp_path):
    (tmp_path / "a.txt").write_text("hello world", encoding="utf-8")
    assert text_data.local_text(str(tmp_path / "a.txt")) == "hello world"
    lines = [json.dumps({"text": "one", "id": 1}), "", json.dumps({"text": "two"})]
    (tmp_path / "b.jsonl").write_text("\n".join(lines), encoding="utf-8")
    assert text_data.local_text(str(tmp_path / "b.jsonl")) == "one\n\ntwo"
    (tmp_path / "c.jsonl").write_text(json.dumps({"body": "x"}), encoding="utf-8")
    with pytest.raises(ValueError, match="no 'text' field"):
        text_data.local_text(str(tmp_path / "c.jsonl"))


def test_hf_text_error_names_dataset():
    try:
        import datasets  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match=r"wikitext/wikitext-2-raw-v1.*pip install datasets"):
            text_data.hf_text("wikitext", "wikitext-2-raw-v1", "test")
    else:
        pytest.skip("datasets installed; the error path is not reachable offline-deterministically")


# ---------------------------------------------------------------- tokens


def test_token_windows_shapes():
    ids = np.arange(103)
    w = text_data.token_windows(ids, 10)
    assert w.shape == (10, 10)
    np.testing.assert_array_equal(w[3], np.arange(30, 40))  # non-overlapping, in order
    assert text_data.token_windows(ids, 10, n_windows=4).shape == (4, 10)
    assert text_data.token_windows(np.arange(100), 10, drop_last=False).shape == (10, 10)
    with pytest.raises(ValueError, match="do not divide"):
        text_data.token_windows(ids, 10, drop_last=False)


def test_token_windows_too_short():
    with pytest.raises(ValueError, match="calibration text too short: 7 tokens for one window of 8"):
        text_data.token_windows(np.arange(7), 8)
    with pytest.raises(ValueError, match="calibration text too short: 30 tokens for 4 windows of 8"):
        text_data.token_windows(np.arange(30), 8, n_windows=4)


def test_calibration_tokens():
    toks = text_data.calibration_tokens(CharTokenizer(), string.ascii_letters, window=16, n_windows=3)
    assert toks.shape == (3, 16) and toks.dtype == np.int32
    assert toks[0, 0] == 1  # BOS starts the stream only
    assert toks[1, 0] == ord(string.ascii_letters[15]) + 2  # stream position 16 is text index 15


def test_host_slice():
    x = np.arange(12).reshape(6, 2)
    shards = [text_data.host_slice(x, i, 3) for i in range(3)]
    np.testing.assert_array_equal(np.concatenate(shards), x)
    np.testing.assert_array_equal(shards[1], x[2:4])
    with pytest.raises(ValueError, match="evenly"):
        text_data.host_slice(x, 0, 4)
    with pytest.raises(ValueError, match="process_index"):
        text_data.host_slice(x, 3, 3)
