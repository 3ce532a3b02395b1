"""Gemma-2B (v1; 18 blocks, d 2048, p 16384, head_dim 256, one KV head) as `gemma2_2b.py` runs
Gemma-2-2B (its learning rate; blocks [0, 1], then groups of 4 rather than 6)."""

from fips_jax.config_base import pair_then_groups, paper_llm_config


def get_config():
    c = paper_llm_config("google/gemma-2b", lr=3.125e-5, chunk=2)
    c.fips.groups = pair_then_groups(18, 4)
    return c
