"""Llama-3.1-8B (32 blocks, d 4096, p 14336): 4 groups of 8, SlimPajama calibration (20 x 8192
tokens, 40 epochs, minibatch 8192 positions), WikiText-2 perplexity at context 2048 (SPEC §4, §7).
Needs hub access (or a local copy via --config.model.path) and `pip install datasets`."""

from fips_jax.config_base import base_config


def get_config():
    c = base_config()
    c.model.source = "hf"
    c.model.path = "meta-llama/Llama-3.1-8B"
    c.data.calib.update(source="hf", dataset="cerebras/SlimPajama-627B", split="train", n_documents=2000,
                        window=8192, n_windows=20)
    c.data.eval.update(source="hf", dataset="wikitext", dataset_config="wikitext-2-raw-v1", split="test",
                       context=2048, max_windows=1000, protocol="standard")
    c.fips.budget = 0.5
    c.fips.sparsity = 0.75
    c.fips.group_size = 8
    c.local.epochs = 40.0
    c.local.batch_tokens = 8192
    c.local.lr = 8e-6
    c.local.end_lr = 8e-8
    c.local.weight_decay = 0.1
    c.chunk = 2
    return c
