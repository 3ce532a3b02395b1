"""Gemma-2-9B (42 blocks, d 3584, p 14336): 7 groups of 6, the paper's LLM protocol
(`paper_llm_config`). Needs an accelerator with room for the model (see launch/ for sharded runs)."""

from fips_jax.config_base import paper_llm_config


def get_config():
    c = paper_llm_config("google/gemma-2-9b", lr=3.125e-5, chunk=1)
    c.fips.group_size = 6
    # What docs/memory_plan.md plans with: the checkpoint's own bfloat16 (the dense model and the
    # teacher activations at half the float32 size) and one block's step temporaries at a time;
    # together they let a group's step fit one 80 GB device.
    c.model.dtype = "bfloat16"
    c.local.block_remat = True
    c.local.offload_model = True  # the dense model waits in host memory during the local step
    c.fips.init = "gram"  # U from W W^T with W split over the devices: no one-device SVD of [d, n*3*p]
    # A group's calibration activations on disk (`local.store`): its teacher MLP inputs x and
    # targets y, [6 blocks, 163840 tokens, 3584] in bfloat16, are 6.6 GiB each, 13 GiB of host RAM
    # per process in memory (another 13 with local.inputs=student). As files under
    # <workdir>/groups/gNN/acts/, read a slice or minibatch at a time (`calibration.ActivationStore`),
    # the process holds about a minibatch of them; the page cache keeps what the machine has
    # room for. The workdir's disk needs that room; the files go when the group is done.
    c.local.store = "disk"
    return c
