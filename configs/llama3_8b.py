"""Llama-3.1-8B (32 blocks, d 4096, p 14336): 4 groups of 8, the paper's LLM protocol
(`paper_llm_config`: SlimPajama calibration, WikiText-2 perplexity at context 2048)."""

from fips_jax.config_base import paper_llm_config


def get_config():
    c = paper_llm_config("meta-llama/Llama-3.1-8B", lr=8e-6, chunk=2)
    c.fips.group_size = 8
    # One block's step temporaries at a time: what lets the group's step fit one 80 GB device
    # (docs/memory_plan.md).
    c.local.block_remat = True
    return c
