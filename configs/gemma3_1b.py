"""Gemma-3-1B (26 blocks, d 1152, p 6912, 5 local : 1 global layers) as `gemma2_2b.py` runs
Gemma-2-2B: same learning rate and groups."""

from fips_jax.config_base import pair_then_groups, paper_llm_config


def get_config():
    c = paper_llm_config("google/gemma-3-1b-pt", lr=3.125e-5, chunk=2)
    c.fips.groups = pair_then_groups(26, 6)
    return c
