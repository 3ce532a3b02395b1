"""Qwen3-0.6B-Base (28 blocks, d 1024, p 3072, head_dim 128, tied embeddings): 4 groups of 7,
the paper's LLM protocol (`paper_llm_config`). The learning rate is not from the paper (which
has no Qwen run): Gemma-2-2B's; sweep it before quoting numbers."""

from fips_jax.config_base import paper_llm_config


def get_config():
    c = paper_llm_config("Qwen/Qwen3-0.6B-Base", lr=3.125e-5, chunk=2)
    c.fips.group_size = 7
    return c
