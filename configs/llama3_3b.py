"""Llama-3.2-3B (28 blocks, d 3072, p 8192): 4 groups of 7, the paper's LLM protocol
(`paper_llm_config`: SlimPajama calibration, WikiText-2 perplexity at context 2048)."""

from fips_jax.config_base import paper_llm_config


def get_config():
    c = paper_llm_config("meta-llama/Llama-3.2-3B", lr=4e-6, chunk=2)
    c.fips.group_size = 7
    return c
