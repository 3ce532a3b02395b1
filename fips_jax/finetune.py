"""Global error minimisation (SPEC §4, optional): end-to-end fine-tuning of the compressed model.

After local error minimisation every group's U, V's and biases are trained together through the
whole model: the student is `arch.apply(assemble(dense, groups), x)`, the teacher the dense model
on the same minibatch; everything outside the groups stays frozen. V stays sparse under RigL at
the number of nonzeros it already has, so the budget is unchanged: RigL swaps entries, never adds
them. The loop is `local_opt.train`, so the run checkpoints and resumes exactly like local
optimisation.

Trainable params: `{group name: {"u": [d, r], "v": [n, F, r, p], "bias": {fc: [n, out]}}}`.
Inputs: token windows `[N, T]` int32 (causal LMs) or images `[N, H, W, C]` (ViTs); step s trains
on the `batch` rows `local_opt.minibatch_indices(key, s, N, batch)`.

Losses (`FinetuneConfig.loss`):
  kd   match the dense model: on logits, KL(teacher || student) of the softmaxes at
       `temperature` (times T^2, mean over positions); on features (a backbone without a head,
       e.g. DINOv2's final-norm CLS) the relative squared error sum (s - t)^2 / sum t^2.
  mse  mean squared error between the student's and the teacher's outputs.
  ce   cross-entropy on the truth: the next token for causal LMs, `labels` for classifiers.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fips_jax import factors, grouping, local_opt
from fips_jax.sparsity import masks
from fips_jax.models import base

Params = dict[str, Any]
LOSSES = ("kd", "mse", "ce")
# rigl: SPEC §4. static: the mask stays the nonzeros of V, which keeps a structured (N:M)
# pattern that RigL's unstructured swaps would break.
ALGORITHMS = ("rigl", "static")
OUTPUTS = ("logits", "features")
COMPUTE_DTYPES = ("float32", "bfloat16")
CONFIG_KEYS = ("enabled", "epochs", "batch", "lr", "end_lr", "weight_decay", "drop_fraction", "update_freq",
               "loss", "temperature")


@dataclasses.dataclass(frozen=True)
class FinetuneConfig:
    """Optimiser, sparsity and loss of one fine-tuning run (SPEC §4: AdamW lr 1e-4, wd 0.05,
    cosine decay, RigL drop fraction 0.1, 0.05 for transfer)."""

    steps: int
    lr: float = 1e-4
    end_lr: float = 0.0
    weight_decay: float = 0.05
    drop_fraction: float = 0.1
    update_freq: int = 50
    batch: int = 8
    loss: str = "kd"           # kd | mse | ce
    temperature: float = 1.0   # kd on logits
    algorithm: str = "rigl"    # rigl | static
    # Operand dtype of the student's and the teacher's dense products (float32 accumulation,
    # params and optimiser state float32): bfloat16 makes a step ~2x faster on CPU.
    compute_dtype: str = "float32"

    def __post_init__(self):
        if self.loss not in LOSSES:
            raise ValueError(f"finetune loss {self.loss!r} not in {LOSSES}")
        if self.algorithm not in ALGORITHMS:
            raise ValueError(f"finetune algorithm {self.algorithm!r} not in {ALGORITHMS}")
        if self.steps < 1:
            raise ValueError(f"finetune needs steps >= 1, got {self.steps}")
        if self.batch < 1:
            raise ValueError(f"finetune batch must be >= 1, got {self.batch}")
        if self.temperature <= 0:
            raise ValueError(f"finetune temperature must be > 0, got {self.temperature}")
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise ValueError(f"finetune compute_dtype {self.compute_dtype!r} not in {COMPUTE_DTYPES}")
        # A weight grown by RigL starts at 0, the smallest magnitude: with a mask update every
        # step it would be dropped again before it ever moved.
        if self.algorithm == "rigl" and self.update_freq < 2:
            raise ValueError(f"finetune update_freq must be >= 2 for rigl, got {self.update_freq}")


def from_config(ft: Mapping[str, Any], n_inputs: int) -> FinetuneConfig | None:
    """The `finetune` block of a run config as a FinetuneConfig; None when `enabled` is false.

    steps = max(1, round(epochs * ceil(n_inputs / batch))): `epochs` passes over the N inputs.
    """
    missing = [k for k in CONFIG_KEYS if k not in ft]
    if missing:
        raise ValueError(f"finetune config lacks {missing}; needs {list(CONFIG_KEYS)}")
    if not ft["enabled"]:
        return None
    batch = int(ft["batch"])
    if batch < 1 or n_inputs < 1:
        raise ValueError(f"finetune needs batch >= 1 and inputs, got batch {batch}, {n_inputs} inputs")
    steps = max(1, int(round(float(ft["epochs"]) * math.ceil(n_inputs / batch))))
    return FinetuneConfig(
        steps=steps, lr=float(ft["lr"]), end_lr=float(ft["end_lr"]), weight_decay=float(ft["weight_decay"]),
        drop_fraction=float(ft["drop_fraction"]), update_freq=int(ft["update_freq"]), batch=batch,
        loss=str(ft["loss"]), temperature=float(ft["temperature"]), algorithm=str(ft.get("algorithm", "rigl")),
        compute_dtype=str(ft.get("compute_dtype", "float32")))


def compute_arch(arch: base.Architecture, compute_dtype: str) -> base.Architecture:
    """`arch` with its dense products in `compute_dtype` (float32 accumulation). Only the decoder
    LLMs have the switch (`matmul_dtype`); the ViTs' reference numerics are float32."""
    if compute_dtype == "float32":
        return arch
    if not (dataclasses.is_dataclass(arch) and any(f.name == "matmul_dtype" for f in dataclasses.fields(arch))):
        raise ValueError(f"finetune.compute_dtype={compute_dtype!r} is for the decoder LLMs; {arch.name} "
                         "fine-tunes in float32")
    return dataclasses.replace(arch, matmul_dtype=jnp.dtype(compute_dtype))


def output_kind(arch: base.Architecture) -> str:
    """"logits" for causal LMs and classifiers, "features" for backbones without a head
    (`config.num_labels == 0`: DINOv2, headless ViT/Swin), whose apply gives final-norm features."""
    if arch.is_causal_lm:
        return "logits"
    num_labels = getattr(arch.config, "num_labels", None)
    if num_labels is None:
        raise ValueError(f"{arch.name}: cannot tell logits from features (config has no num_labels); "
                         "pass outputs='logits' or 'features'")
    return "logits" if num_labels > 0 else "features"


def v_nonzeros(group_params: Mapping[str, Params]) -> tuple[int, int]:
    """(nonzeros, entries) of every group's V together: the sparse part of the budget."""
    vs = [p["v"] for p in group_params.values()]
    return sum(factors.nonzeros(v) for v in vs), int(sum(v.size for v in vs))


def output_loss(student: jax.Array, teacher: jax.Array, loss: str, kind: str, temperature: float = 1.0) -> jax.Array:
    """kd or mse between outputs [..., C] (logits or features), in float32."""
    s, t = student.astype(jnp.float32), teacher.astype(jnp.float32)
    if loss == "mse":
        return jnp.mean(jnp.square(s - t))
    if loss != "kd":
        raise ValueError(f"output_loss takes kd or mse, got {loss!r}")
    if kind == "features":
        return jnp.sum(jnp.square(s - t)) / jnp.maximum(jnp.sum(jnp.square(t)), 1e-30)
    # T^2 keeps gradient magnitudes comparable across temperatures (Hinton et al. 2015).
    log_t = jax.nn.log_softmax(t / temperature, axis=-1)
    log_s = jax.nn.log_softmax(s / temperature, axis=-1)
    kl = jnp.sum(jnp.exp(log_t) * (log_t - log_s), axis=-1)
    return jnp.mean(kl) * temperature**2


def make_loss(arch: base.Architecture, layouts: Mapping[str, grouping.GroupLayout], cfg: FinetuneConfig,
              kind: str, batch: int, key: jax.Array) -> Callable[..., tuple[jax.Array, jax.Array]]:
    """`loss_fn(group_params, step, inputs, dense_params[, labels]) -> (loss, loss)` for
    `local_opt.train`. Dense params are an argument, not a closure, so jit does not bake the
    model into the program as constants."""
    names = list(layouts)
    arch = compute_arch(arch, cfg.compute_dtype)

    def loss_fn(params, step, inputs, dense, labels=None):
        idx = local_opt.minibatch_indices(key, step, inputs.shape[0], batch)
        x = inputs[idx]
        student = arch.apply(factors.assemble(dense, [(layouts[n], params[n]) for n in names]), x)
        if cfg.loss == "ce":
            if arch.is_causal_lm:
                logits, target = student[:, :-1], x[:, 1:]
            else:
                logits, target = student, labels[idx]
            loss = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), target))
        else:
            teacher = jax.lax.stop_gradient(arch.apply(dense, x))
            loss = output_loss(student, teacher, cfg.loss, kind, cfg.temperature)
        return loss, loss

    return loss_fn


def _ce_labels(arch: base.Architecture, kind: str, labels: np.ndarray | jax.Array | None, n: int) -> tuple[Any, ...]:
    """The loss constants loss "ce" adds after (inputs, dense params): (labels [n] int32,) for a
    classifier, () for a causal LM (its targets are the inputs' next tokens). Raises ValueError
    where "ce" cannot apply or the labels do not fit the n inputs."""
    if arch.is_causal_lm:
        if labels is not None:
            raise ValueError("finetune loss 'ce' on a causal LM trains on the next token of the inputs; "
                             "labels must be None")
        return ()
    if kind == "features":
        raise ValueError(f"finetune loss 'ce' needs class logits, but {arch.name} outputs features "
                         "(no classification head); use loss 'kd'")
    if labels is None:
        raise ValueError(f"finetune loss 'ce' on the classifier {arch.name} needs labels ([N] class ids)")
    if np.shape(labels) != (n,):
        raise ValueError(f"labels have shape {np.shape(labels)}, expected ({n},) for {n} inputs")
    return (jnp.asarray(labels, jnp.int32),)


def finetune(
    arch: base.Architecture,
    dense_params: Mapping[str, Any],
    layouts: Mapping[str, grouping.GroupLayout],
    group_params: Mapping[str, Params],
    inputs: np.ndarray | jax.Array,
    cfg: FinetuneConfig,
    ckpt_dir: str,
    *,
    labels: np.ndarray | jax.Array | None = None,
    outputs: str | None = None,
    seed: int = 0,
    checkpoint_every: int = 50,
    log: Callable[[str], None] = print,
    on_step: Callable[[int, float], None] | None = None,
    param_shardings: Any = None,
) -> tuple[dict[str, Params], list[float]]:
    """Fine-tune every group's U, V and biases end to end; resumes from `ckpt_dir` if it holds
    a checkpoint. Returns ({group name: params}, loss at every step).

    layouts/group_params: keyed by the same group names. The sparsity RigL keeps is the one V
    has now (its zeros over all groups' V together, global scope), so the count of nonzeros of
    V is unchanged. outputs: "logits" | "features" | None (None: `output_kind(arch)`).
    labels: [N] int class ids, for loss "ce" on a classifier only.
    """
    if set(layouts) != set(group_params):
        raise ValueError(f"layouts for groups {sorted(layouts)} but params for {sorted(group_params)}")
    kind = outputs or output_kind(arch)
    if kind not in OUTPUTS:
        raise ValueError(f"outputs {kind!r} not in {OUTPUTS}")
    n = int(inputs.shape[0])
    consts: tuple[Any, ...] = (jnp.asarray(inputs), dense_params)
    if cfg.loss == "ce":
        consts += _ce_labels(arch, kind, labels, n)

    nnz, size = v_nonzeros(group_params)
    if nnz == 0:
        raise ValueError("every V is all zeros: nothing to fine-tune")
    sparsity = 1.0 - nnz / size
    # The initial mask keeps the top-`nnz` magnitudes, i.e. exactly the nonzeros.
    assert masks.num_keep(sparsity, size) == nnz, (sparsity, size, nnz)
    lcfg = local_opt.LocalOptConfig(
        steps=cfg.steps, lr=cfg.lr, end_lr=cfg.end_lr, weight_decay=cfg.weight_decay, algorithm=cfg.algorithm,
        sparsity=sparsity, update_freq=cfg.update_freq, drop_fraction=cfg.drop_fraction, scope="global",
        # RigL's last swap comes before the last step, so every grown weight (which starts at
        # exactly 0) is trained at least once and counts among the nonzeros at the end.
        prune_end=(cfg.steps - 1) / cfg.steps,
    )
    batch = min(cfg.batch, n)
    log(f"finetune: {cfg.steps} steps of {batch} of {n} inputs, loss {cfg.loss} on {kind}, "
        f"{cfg.algorithm} at sparsity {sparsity:.4f} ({nnz} of {size} V entries)")
    loss_fn = make_loss(arch, layouts, cfg, kind, batch, jax.random.PRNGKey(seed))
    params, losses = local_opt.train(dict(group_params), loss_fn, consts, lcfg, ckpt_dir,
                                     checkpoint_every=checkpoint_every, log=log, name="finetune",
                                     on_step=on_step, param_shardings=param_shardings)
    after, _ = v_nonzeros(params)
    # A kept weight landing on exactly 0 can only lower the count; the mask never exceeds nnz.
    log(f"finetune: V nonzeros {nnz} -> {after}")
    return dict(params), losses
