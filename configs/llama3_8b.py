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
    # A group's calibration activations on disk (`local.store`): its teacher MLP inputs x and
    # targets y, [8 blocks, 163840 tokens, 4096] in bfloat16, are 10 GiB each, 20 GiB of host RAM
    # per process in memory (another 20 with local.inputs=student, and the float32 block outputs,
    # 2 x 20 GiB, while the student's targets are formed with local.drift > 0). As files under
    # <workdir>/groups/gNN/acts/, read a slice or minibatch at a time (`calibration.ActivationStore`),
    # the process holds about a minibatch of them; the page cache keeps what the machine has
    # room for. The workdir's disk needs that room; the files go when the group is done.
    c.local.store = "disk"
    return c
