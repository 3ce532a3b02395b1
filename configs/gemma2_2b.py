"""Gemma-2-2B (26 blocks, d 2304, p 9216): blocks [0, 1], then groups of 6 (SPEC §1), the
paper's LLM protocol (`paper_llm_config`)."""

from fips_jax.config_base import pair_then_groups, paper_llm_config


def get_config():
    c = paper_llm_config("google/gemma-2-2b", lr=3.125e-5, chunk=2)
    c.fips.groups = pair_then_groups(26, 6)
    return c
