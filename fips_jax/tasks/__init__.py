"""What differs between model kinds, behind one interface the pipeline calls.

A task module provides

    load_data(run, arch, tokenizer) -> data            # calibration, evaluation, held-out inputs
    calibrate(run, arch, params, plan, data, peers) -> Calibrated
    evaluate(run, arch, params, data, variants) -> (evals, extra metrics)

`causal_lm` streams MLP inputs group by group and scores perplexity; `image` trains every group
jointly on block outputs and scores classification (or agreement, and a linear probe).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterable, Mapping

import jax.numpy as jnp

from fips_jax.models import base


@dataclasses.dataclass
class Calibrated:
    """What the local optimisation leaves for evaluation, fine-tuning and export.

    variants: {name: () -> parts (an iterable of (layout, params), read once)} in report order
      ("dense" maps to None); loaded lazily so that no more than one compressed model is held
      at a time, and an LLM's groups one at a time as they are assembled.
    final: {group name: FiPS params after local optimisation}; a mapping that may read each
      group from the stage store at every access (`stages.StoredTrees`): index it where needed.
    layouts: {group name: GroupLayout}.
    heldout: {variant: [held-out relative error per block, in block order]}.
    finetune_inputs / finetune_labels: what `finetune` trains on.
    metrics: task-specific entries for metrics.json.
    params: the dense params to go on with, when the task re-placed them (`local.offload_model`
      deletes the arrays it was given); None: the ones it was given.
    """

    variants: dict[str, Callable[[], Iterable] | None]
    final: Mapping[str, dict]
    layouts: dict
    heldout: dict[str, list[float]]
    blocks: list[int]
    finetune_inputs: Any
    finetune_labels: Any
    metrics: dict
    params: Any = None


def relative_error(out, target) -> float:
    return float(jnp.sum(jnp.square(out - target)) / jnp.maximum(jnp.sum(jnp.square(target)), 1e-30))


def for_arch(arch: base.Architecture):
    # pylint: disable=import-outside-toplevel
    from fips_jax.tasks import causal_lm, image
    return causal_lm if arch.is_causal_lm else image
