"""Gemma-2-2B (26 blocks, d 2304, p 9216): blocks [0, 1], then groups of 6 (SPEC §1), SlimPajama
calibration, WikiText-2 perplexity (SPEC §4, §7). Needs hub access and `pip install datasets`."""

from fips_jax.config_base import base_config


def get_config():
    c = base_config()
    c.model.source = "hf"
    c.model.path = "google/gemma-2-2b"
    c.data.calib.update(source="hf", dataset="cerebras/SlimPajama-627B", split="train", n_documents=2000,
                        window=8192, n_windows=20)
    c.data.eval.update(source="hf", dataset="wikitext", dataset_config="wikitext-2-raw-v1", split="test",
                       context=2048, max_windows=1000, protocol="standard")
    c.fips.budget = 0.5
    c.fips.sparsity = 0.75
    c.fips.groups = ((0, 1),) + tuple(tuple(range(s, s + 6)) for s in range(2, 26, 6))
    c.local.epochs = 40.0
    c.local.batch_tokens = 8192
    c.local.lr = 3.125e-5
    c.local.end_lr = 3.125e-7
    c.local.weight_decay = 0.1
    c.chunk = 2
    return c
