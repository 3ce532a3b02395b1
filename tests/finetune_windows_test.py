"""`finetune.n_windows`: global fine-tuning on more text than calibration, starting with the
calibration windows themselves, and named refusals."""

import numpy as np
import pytest

from fips_jax import config_base
from fips_jax.tasks import causal_lm, image


class _ByteTokenizer:
    """One token per character: window contents can be checked by hand."""

    def encode(self, text, add_special_tokens=True):
        return [ord(c) % 251 for c in text]


class _Run:
    def __init__(self, cfg):
        self.cfg = cfg
        self.lines = []

    def log(self, msg):
        self.lines.append(msg)


def _run(tmp_path, n_windows, ft_windows, chars=4000):
    text = "".join(chr(ord("a") + (i * 7) % 26) for i in range(chars))
    path = tmp_path / "text.txt"
    path.write_text(text)
    cfg = config_base.base_config()
    cfg.data.calib.update(source="local_text", path=str(path), window=16, n_windows=n_windows)
    cfg.data.eval.update(source="local_text", path=str(path), context=16, max_windows=4)
    cfg.finetune.n_windows = ft_windows
    return _Run(cfg.to_dict()), text


def test_default_fine_tunes_on_the_calibration_windows(tmp_path):
    run, _ = _run(tmp_path, 4, 0)
    dat = causal_lm.load_data(run, None, _ByteTokenizer())
    assert dat.finetune is dat.calib and dat.calib.shape == (4, 16)


def test_more_windows_start_with_the_calibration_ones(tmp_path):
    run, text = _run(tmp_path, 4, 10)
    dat = causal_lm.load_data(run, None, _ByteTokenizer())
    want = np.asarray([ord(c) % 251 for c in text[:160]], np.int32).reshape(10, 16)
    np.testing.assert_array_equal(dat.finetune, want)
    np.testing.assert_array_equal(dat.calib, want[:4])


def test_too_few_windows_and_negative_counts_are_named(tmp_path):
    run, _ = _run(tmp_path, 4, 300, chars=4000)  # 250 windows of 16 characters
    with pytest.raises(ValueError, match=r"finetune.n_windows=300: the calibration source \(local_text:.*\) "
                                         r"has only 250 windows of 16 tokens"):
        causal_lm.load_data(run, None, _ByteTokenizer())
    run, _ = _run(tmp_path, 4, -1)
    with pytest.raises(ValueError, match="finetune.n_windows must be >= 0"):
        causal_lm.load_data(run, None, _ByteTokenizer())


def test_vit_refuses_text_windows():
    cfg = config_base.base_config()
    cfg.finetune.n_windows = 8
    with pytest.raises(ValueError, match="finetune.n_windows applies to LLM text windows"):
        image.load_data(_Run(cfg.to_dict()), None, None)
