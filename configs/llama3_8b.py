"""Llama-3.1-8B (32 blocks, d 4096, p 14336): 4 groups of 8, the paper's LLM protocol
(`paper_llm_config`: SlimPajama calibration, WikiText-2 perplexity at context 2048)."""

from fips_jax.config_base import paper_llm_config


def get_config():
    c = paper_llm_config("meta-llama/Llama-3.1-8B", lr=8e-6, chunk=2)
    c.fips.group_size = 8
    # What docs/memory_plan.md plans with: the checkpoint's own bfloat16 (the dense model and the
    # teacher activations at half the float32 size) and one block's step temporaries at a time;
    # together they let a group's step fit one 80 GB device.
    c.model.dtype = "bfloat16"
    c.local.block_remat = True
    c.local.offload_model = True  # the dense model waits in host memory during the local step
    c.fips.init = "gram"  # U from W W^T with W split over the devices: no one-device SVD of [d, n*3*p]
    return c
