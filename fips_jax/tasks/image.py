"""Vision transformers: block-output reconstruction of all groups jointly, classification or
agreement with the dense model, and a linear probe for backbones.

One optimiser trains every group at once (SPEC §4, §5): each shared U receives its group's summed
gradient and global pruning ranks every V of the model together. The teacher's block inputs and
outputs are recomputed per minibatch inside the step, so nothing model-sized is cached.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from fips_jax import calib_stats, calibration, data, factors, local_opt, stages
from fips_jax.data import images as image_data
from fips_jax.evaluators import classification, features
from fips_jax.methods import GroupStats, Problem
from fips_jax.methods import fips
from fips_jax.tasks import Calibrated, relative_error

NAME = "image_classification"


def images(src: dict, arch, seed: int) -> tuple[np.ndarray, np.ndarray | None]:
    kind = src["source"]
    if kind == "random":
        h, w = arch.config.image_size
        rng = np.random.default_rng(seed)
        return rng.standard_normal((src["n_images"], h, w, arch.config.num_channels)).astype(np.float32), None
    if kind == "imagenet_folder":
        if not os.path.isdir(src["path"]):
            raise FileNotFoundError(f"ImageNet folder not found: {src['path']!r} (expected {src['path']}/"
                                    f"{src['split']}/<wnid>/*.JPEG)")
        imgs, labels = data.imagenet_folder_calibration(
            src["path"], per_class=src["per_class"], n_classes=src["n_classes"] or None, seed=seed, split=src["split"],
            interpolation=src["interpolation"])
        return imgs, np.asarray(labels)
    if kind == "fashion_mnist":  # unlabelled here: the backbones it serves output features
        raw, _ = data.fashion_mnist(src["split"], n=src["n_images"], path=src["path"] or None)
        return data.grayscale_to_model_inputs(raw, arch.config.image_size), None
    raise ValueError(f"image source {kind!r} not in ('random', 'imagenet_folder', 'fashion_mnist')")


@dataclasses.dataclass
class Data:
    calib: np.ndarray
    calib_labels: np.ndarray | None
    eval_batches: Callable[[int], Iterator[tuple[np.ndarray, np.ndarray | None]]]  # batch size -> stream
    n_eval: int
    labelled: bool
    holdout: np.ndarray


def eval_stream(src: dict, arch, seed: int) -> tuple[Callable, int, bool]:
    """The evaluation images as a stream of (images [b, h, w, c] float32, labels [b] or None),
    decoded a batch at a time: a 50k-image validation split is never held as float32. Returns
    (batch size -> iterator, number of images, labelled)."""
    kind = src["source"]
    if kind == "imagenet_folder":
        if not os.path.isdir(src["path"]):
            raise FileNotFoundError(f"ImageNet folder not found: {src['path']!r} (expected {src['path']}/"
                                    f"{src['split']}/<wnid>/*.JPEG)")
        paths, labels = image_data.stratified_sample(src["path"], src["split"], src["per_class"],
                                                     src["n_classes"] or None, seed)
        return (lambda bs: image_data.image_batches(paths, labels, bs, interpolation=src["interpolation"]),
                len(paths), True)
    if kind == "fashion_mnist":  # unlabelled here: the backbones it serves output features
        n = len(image_data.fashion_mnist(src["split"], n=src["n_images"], path=src["path"] or None)[0])
        return (lambda bs: ((x, None) for x, _ in image_data.fashion_mnist_batches(
            src["split"], n=src["n_images"], path=src["path"] or None, size=arch.config.image_size, batch_size=bs)),
                n, False)
    imgs, labels = images(src, arch, seed)
    return (lambda bs: ((imgs[s:s + bs], None if labels is None else labels[s:s + bs])
                        for s in range(0, imgs.shape[0], bs)), imgs.shape[0], labels is not None)


def load_data(run, arch, tokenizer) -> Data:
    del tokenizer
    cfg, data_cfg = run.cfg, run.cfg["data"]
    if jax.process_count() > 1:
        raise ValueError(f"{jax.process_count()} processes: multi-process calibration splits an LLM's calibration "
                         "windows; image models calibrate on one process (one host's devices)")
    if cfg["local"].get("compute_dtype", "float32") != "float32":
        raise ValueError("local.compute_dtype applies to the LLM MLP-output loss; ViT block-output "
                         "calibration runs in float32")
    if cfg["local"].get("offload_model", False):
        raise ValueError("local.offload_model applies to LLM calibration (host-fed MLP minibatches); ViT "
                         "block-output calibration runs the dense blocks in its loss")
    if cfg["finetune"].get("n_windows", 0):
        raise ValueError("finetune.n_windows applies to LLM text windows; ViT fine-tuning trains on the "
                         "calibration images (set data.calib.n_images to train on more)")
    calib, calib_labels = images(data_cfg["calib"], arch, cfg["seed"])
    batches, n_eval, labelled = eval_stream(data_cfg["eval"], arch, cfg["seed"] + 1)
    held, want = [], data_cfg["holdout_images"]
    for x, _ in batches(max(min(want, 256), 1)):
        held.append(x)
        if sum(h.shape[0] for h in held) >= want:
            break
    run.log(f"calibration: {calib.shape[0]} images; evaluation: {n_eval} images")
    return Data(calib, calib_labels, batches, n_eval, labelled, np.concatenate(held)[:want])


def group_statistics(arch, params, plan, images_: np.ndarray, chunk: int) -> list[GroupStats]:
    """Every group's MLP-input second moments on the calibration images (the dense model's
    activations, streamed block by block; one group's inputs held at a time)."""
    stream = calibration.HiddenStream(arch, params, images_, chunk)
    out = []
    for layout, _ in plan:
        x = stream.advance(layout.blocks)
        grams = calib_stats.group_input_grams(arch.mlp_spec, local_opt.stack_dense_mlps(params, layout), x)
        out.append(GroupStats(grams["in"], grams["hidden"], int(grams["n"])))
    return out


def calibrate(run, arch, params, plan, dat: Data, peers: list) -> Calibrated:
    cfg, log = run.cfg, run.log
    if cfg["compare"]["train"] and peers:
        raise ValueError("compare.train (refining peers) is implemented for LLMs only")
    layouts = {f"g{g:02d}": layout for g, (layout, _) in enumerate(plan)}
    stats = (group_statistics(arch, params, plan, dat.calib, cfg["chunk"])
             if fips.needs_stats(cfg) or any(m.NEEDS_STATS for m in peers) else [None] * len(plan))
    problems = {n: Problem(layout, rank, cfg["fips"]["budget"], params, arch.mlp_spec, cfg, st, run.mesh, run.rules)
                for n, (layout, rank), st in zip(layouts, plan, stats)}
    p0 = run.stage("groups/init", lambda: {n: fips.init(pr)[0][1] for n, pr in problems.items()}, "arrays", quiet=True)
    all_blocks = sorted(i for layout in layouts.values() for i in layout.blocks)
    batch = min(cfg["local"]["batch_images"], dat.calib.shape[0])
    key = jax.random.PRNGKey(cfg["seed"])
    names = list(layouts)

    def loss_fn(p, step, imgs, dense):
        idx = local_opt.minibatch_indices(key, step, imgs.shape[0], batch)
        inputs, outputs, ctx = calibration.teacher_blocks(arch, dense, imgs[idx], all_blocks)
        return local_opt.block_outputs_loss(p, arch, dense, layouts, inputs, outputs, ctx)

    def train():
        steps = max(int(round(cfg["local"]["epochs"] * -(-dat.calib.shape[0] // batch))), 1)
        p_sh = stages.shardings_of(run, arch.mlp_spec, p0)
        return local_opt.train(p0, loss_fn, (jnp.asarray(dat.calib), params), fips.local_config(cfg, steps),
                               run.path("groups", "loop"), checkpoint_every=cfg["checkpoint_every"], log=log,
                               name="local", on_step=run.on_step, param_shardings=p_sh)

    losses = []

    def train_and_keep_losses():
        p, ls = train()
        losses.extend(ls)
        return p

    p1 = run.stage("groups/final", train_and_keep_losses, "arrays", quiet=True)
    variants: dict[str, Any] = {"dense": None}
    for m in peers:
        # Closed form, computed once: held-out error, evaluation and the budget all read it.
        parts = [pt for n in names for pt in m.init(problems[n])]
        variants[m.NAME] = lambda parts=parts: parts
    one_shot = fips.one_shot(p0, cfg)
    variants["fips_init"] = lambda: [(layouts[n], one_shot[n]) for n in names]
    variants["fips_final"] = lambda: [(layouts[n], p1[n]) for n in names]

    inputs, outputs, ctx = jax.jit(lambda p, x: calibration.teacher_blocks(arch, p, x, all_blocks))(
        params, jnp.asarray(dat.holdout))
    block = {i: jax.jit(lambda p, h, c, i=i: arch.block(p, i, h, c)[0]) for i in all_blocks}
    heldout = {}
    for k, parts in variants.items():
        if parts is not None:
            model = factors.assemble(params, parts())
            heldout[k] = [relative_error(block[i](model, inputs[i], ctx), outputs[i]) for i in all_blocks]
    return Calibrated(variants=variants, final=dict(p1), layouts=layouts, heldout=heldout, blocks=all_blocks,
                      finetune_inputs=dat.calib, finetune_labels=dat.calib_labels,
                      metrics={"loss_first": losses[0] if losses else None, "loss_last": losses[-1] if losses else None,
                               "data": {"calib_images": int(dat.calib.shape[0]), "eval_images": dat.n_eval}})


def evaluate(run, arch, params, dat: Data, variants: dict) -> tuple[dict, dict]:
    """Top-1/5 (with labels), agreement with the dense model's predictions and the logits'
    relative error for every variant, in one streamed pass over the evaluation images (each
    batch decoded once, scored by every model); for backbones a linear probe and the CLS cosine
    (`eval.probe`)."""
    apply = jax.jit(arch.apply)
    bs = run.cfg["eval"]["batch_size"]
    models = {k: params if parts is None else factors.assemble(params, parts()) for k, parts in variants.items()}
    sums = {k: {"n": 0, "top1": 0, "top5": 0, "agree": 0, "err": 0.0} for k in models}
    dense_sq = 0.0
    for x, labels in dat.eval_batches(bs):
        dense = np.asarray(apply(params, jnp.asarray(x)))
        dense_sq += float(np.sum(np.square(dense, dtype=np.float64)))
        for k, model in models.items():
            logits = dense if k == "dense" else np.asarray(apply(model, jnp.asarray(x)))
            acc = sums[k]
            acc["n"] += logits.shape[0]
            if labels is not None:
                correct = np.asarray(classification.topk_correct(jnp.asarray(logits), jnp.asarray(labels), ks=(1, 5)))
                acc["top1"] += int(correct[0].sum())
                acc["top5"] += int(correct[1].sum())
            acc["agree"] += int(np.sum(logits.argmax(-1) == dense.argmax(-1)))
            acc["err"] += float(np.sum(np.square(logits - dense, dtype=np.float64)))
    evals = {}
    for k, acc in sums.items():
        ev = {"n_examples": acc["n"]}
        if dat.labelled:
            ev.update(top1=acc["top1"] / acc["n"], top5=acc["top5"] / acc["n"])
        if k != "dense":
            ev["agreement_with_dense"] = acc["agree"] / acc["n"]
            ev["logits_rel_error"] = acc["err"] / max(dense_sq, 1e-30)
        evals[k] = ev
    extra = {"task": NAME, "metric": "top1" if dat.labelled else "agreement_with_dense"}
    probe_cfg = run.cfg["eval"]["probe"]
    if probe_cfg["source"]:  # linear probe + CLS cosine of every model's features (backbones)
        extra["probe"] = run.stage("stages/eval_probe", lambda: features.probe_models(arch, models, probe_cfg,
                                                                                       batch_size=bs))
        run.log("linear probe:\n" + features.report_table(extra["probe"]))
    return evals, extra
