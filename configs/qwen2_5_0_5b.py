"""Qwen2.5-0.5B (24 blocks, d 896, p 4864, tied embeddings): 4 groups of 6, the paper's LLM
protocol (`paper_llm_config`: SlimPajama calibration, WikiText-2 perplexity at context 2048).
The learning rate is not from the paper (which has no Qwen run): Gemma-2-2B's, for a model of
similar width; sweep it before quoting numbers."""

from fips_jax.config_base import paper_llm_config


def get_config():
    c = paper_llm_config("Qwen/Qwen2.5-0.5B", lr=3.125e-5, chunk=2)
    c.fips.group_size = 6
    return c
