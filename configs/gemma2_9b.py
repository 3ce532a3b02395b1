"""Gemma-2-9B (42 blocks, d 3584, p 14336): 7 groups of 6, SlimPajama calibration, WikiText-2
perplexity (SPEC §4, §7). Needs hub access, `pip install datasets`, and an accelerator with room
for the model (see launch/ for sharded runs)."""

from fips_jax.config_base import base_config


def get_config():
    c = base_config()
    c.model.source = "hf"
    c.model.path = "google/gemma-2-9b"
    c.data.calib.update(source="hf", dataset="cerebras/SlimPajama-627B", split="train", n_documents=2000,
                        window=8192, n_windows=20)
    c.data.eval.update(source="hf", dataset="wikitext", dataset_config="wikitext-2-raw-v1", split="test",
                       context=2048, max_windows=1000, protocol="standard")
    c.fips.budget = 0.5
    c.fips.sparsity = 0.75
    c.fips.group_size = 6
    c.local.epochs = 40.0
    c.local.batch_tokens = 8192
    c.local.lr = 3.125e-5
    c.local.end_lr = 3.125e-7
    c.local.weight_decay = 0.1
    c.chunk = 1
    return c
