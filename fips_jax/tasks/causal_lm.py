"""Causal LMs: text calibration, MLP-output reconstruction streamed group by group, perplexity.

The calibration tokens flow through the dense model one group at a time (SPEC §4): a group's
MLP inputs are captured, its targets computed once (teacher forcing), every method compresses
it, FiPS is refined, and the held-out error of each is measured before the stream moves on.
Only the hidden state after the last finished group is kept to resume.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import time
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from fips_jax import calibration, calib_stats, checkpointing, data, factors, local_opt, report, sharding, stages
from fips_jax.evaluators import perplexity
from fips_jax.methods import GroupStats, Problem
from fips_jax.methods import fips
from fips_jax.tasks import Calibrated, relative_error

NAME = "causal_lm"


# ---- data ---------------------------------------------------------------------------------------


def text(src: dict) -> str:
    kind = src["source"]
    if kind == "wiki_offline":
        return data.wiki_offline_text(src["split"])
    if kind == "local_text":
        if not src["path"]:
            raise ValueError("data source local_text needs a path (--config.data.<calib|eval>.path=...)")
        if not os.path.exists(src["path"]):
            raise FileNotFoundError(f"text file not found: {src['path']}")
        return data.local_text(src["path"])
    if kind == "hf":
        return data.hf_text(src["dataset"], src["dataset_config"] or None, src["split"], src["n_documents"] or None)
    raise ValueError(f"text source {kind!r} not in ('wiki_offline', 'local_text', 'hf')")


def tokens(src: dict, tokenizer, n_tokens: int) -> np.ndarray:
    """At least `n_tokens` token ids from the source if it has them (all of it otherwise).
    Only a prefix of a long text is encoded: tokenising megabytes for a few windows is waste."""
    txt = text(src)
    chars = max(n_tokens * 8, 4096)
    while True:
        ids = data.encode(tokenizer, txt[:chars])
        if ids.shape[0] >= n_tokens or chars >= len(txt):
            return ids
        chars *= 2


@dataclasses.dataclass
class Data:
    calib: np.ndarray       # [windows, window] token ids
    finetune: np.ndarray    # [windows, window]: what global fine-tuning trains on (calib or a superset)
    eval_ids: np.ndarray    # the scored prefix of the evaluation split
    holdout: np.ndarray     # [windows, context]: held-out reconstruction error
    context: int
    protocol: str
    scope: dict             # how much of the split is scored


def load_data(run, arch, tokenizer) -> Data:
    del arch
    data_cfg = run.cfg["data"]
    calib_src, eval_src = data_cfg["calib"], data_cfg["eval"]
    window, n_windows = calib_src["window"], calib_src["n_windows"]
    ft_windows = int(run.cfg["finetune"].get("n_windows", 0) or 0)
    if ft_windows < 0:
        raise ValueError(f"finetune.n_windows must be >= 0 (0 = the calibration windows), got {ft_windows}")
    # The first windows of one token stream: the fine-tuning windows start with the calibration ones.
    n_read = max(n_windows, ft_windows)
    stream = tokens(calib_src, tokenizer, window * n_read)
    calib = data.token_windows(stream, window, n_windows)
    if ft_windows:
        if stream.shape[0] < window * ft_windows:
            raise ValueError(f"finetune.n_windows={ft_windows}: the calibration source "
                             f"({calib_src['source']}:{calib_src.get('split', '')}) has only "
                             f"{stream.shape[0] // window} windows of {window} tokens")
        ft_ids = data.token_windows(stream[: window * ft_windows], window, ft_windows)
    else:
        ft_ids = calib
    context = eval_src["context"]
    # The whole split is tokenised (seconds) so that a run scoring only `max_windows` of its
    # windows can say how many there were: "standard" perplexity means the whole split.
    split_ids = data.encode(tokenizer, text(eval_src))
    eval_ids = split_ids[: context * eval_src["max_windows"]]
    holdout = data.token_windows(eval_ids, context, min(data_cfg["holdout_windows"], max(len(eval_ids) // context, 1)))
    scope = {"windows_scored": len(eval_ids) // context, "windows_in_split": len(split_ids) // context,
             "tokens_in_split": int(len(split_ids))}
    run.log(f"calibration: {calib.shape[0]} windows x {window} tokens ({calib_src['source']}:"
            f"{calib_src.get('split', '')}); evaluation: {report.eval_scope_label(scope, context)}, held-out "
            f"reconstruction: {holdout.size} tokens")
    return Data(calib, ft_ids, eval_ids, holdout, context, eval_src["protocol"], scope)


# ---- local optimisation -------------------------------------------------------------------------


def _steps(n_items: int, batch: int, epochs: float) -> int:
    return max(int(round(epochs * -(-n_items // batch))), 1)


class _Group:
    """One group's calibration problem: inputs, targets, statistics and the training of parts.

    The MLP inputs x and targets y [n, T, d] stay on the host in the model's dtype (the stream's);
    training steps receive one minibatch each (`batches`), so nothing of their size is held on
    the device. `store` allocates the [n, T, d] arrays: anonymous memory, or files mapped and
    read a slice at a time (local.store=disk); the held-out xh, yh are small and stay in memory.

    With several processes, x (and FiPS's student inputs) are this process's share of the
    calibration tokens (`calibrate` splits the windows); every device computation over them is
    one global computation (`sharding.from_process_rows`), so targets, statistics, minibatches
    and the calibration loss are what one process holding every token computes. The held-out
    xh is every process's whole copy."""

    def __init__(self, run, arch, params, layout, rank, g, x, xh, need_stats, student=None,
                 store: calibration.ActivationStore = calibration.MEMORY):
        """x, xh: the teacher's MLP inputs of the calibration and held-out tokens. `student`:
        (inputs, outputs) of the calibration tokens as FiPS's compressed earlier groups produce
        them (`local.inputs=student`); FiPS is then fitted on them, the peers on the teacher's.
        outputs: (teacher's block outputs, the student's with this group dense), whose difference
        is the drift added to FiPS's target (`local.drift`), or None when local.drift is 0.
        need_stats: (peers need them, FiPS needs them)."""
        cfg, spec = run.cfg, arch.mlp_spec
        self.run, self.spec, self.layout, self.g, self.store = run, spec, layout, g, store
        self.dir = f"groups/g{g:02d}"
        peers_need, fips_need = need_stats
        self.x, self.xh = np.asarray(x), np.asarray(xh)
        self.split = sharding.multi_process()
        self.n_tokens = self.x.shape[1] * jax.process_count()  # every process's tokens
        self.batch = min(cfg["local"]["batch_tokens"], self.n_tokens)
        teacher = local_opt.stack_dense_mlps(params, layout)

        def grams_of(inputs):
            grams = calib_stats.group_input_grams(spec, teacher, inputs, mesh=run.mesh)
            return GroupStats(grams["in"], grams["hidden"], int(grams["n"]))

        # Targets are fixed (teacher forcing), so they are computed once, not every step.
        self.y = self._targets(teacher, self.x, self.x.dtype, "y")
        self.yh = self._targets(teacher, self.xh, np.float32, split=False)
        stats = grams_of(self.x) if peers_need or (fips_need and student is None) else None
        self.problem = Problem(layout, rank, cfg["fips"]["budget"], params, spec, cfg, stats, run.mesh, run.rules)
        if student is None:
            self.fips_x, self.fips_y, self.fips_problem = self.x, self.y, self.problem
        else:
            xs, outputs = student
            self.fips_x = np.asarray(xs)
            alpha = float(cfg["local"]["drift"])
            if alpha and outputs is None:
                raise ValueError("local.drift > 0 needs the teacher's and the student's block outputs")
            self.fips_y = self._targets(teacher, self.fips_x, self.fips_x.dtype, "fips_y", drift=(alpha, outputs))
            self.fips_problem = dataclasses.replace(self.problem, stats=grams_of(self.fips_x) if fips_need else None)
        self.steps = _steps(self.n_tokens, self.batch, cfg["local"]["epochs"])

    def act_sharding(self, shape):
        return sharding.logical_to_sharding(sharding.ACTIVATION_AXES, self.run.mesh, self.run.rules,
                                            jax.ShapeDtypeStruct(shape, self.x.dtype))

    def _replicated(self):  # what every process can read back whole
        return sharding.replicated(self.run.mesh)

    def _put(self, xb: np.ndarray, split: bool) -> jax.Array:
        """A host minibatch [n, b, d] on the mesh: this process's tokens of a global minibatch
        (several processes, `split`), or the same array on every process."""
        if self.split and split:
            return sharding.from_process_rows(xb, self.run.mesh, axis=1)
        if self.split:
            return sharding.put(xb, self._replicated())
        return sharding.put(xb, self.act_sharding(xb.shape))

    def _targets(self, teacher, x: np.ndarray, dtype, name: str | None = None, drift=None,
                 split: bool = True) -> np.ndarray:
        """The dense MLP outputs of host inputs x [n, T, d], computed on the device a minibatch of
        tokens at a time and kept on the host in `dtype`: from the group's store as `name`, in
        memory without one. drift (FiPS's student targets): (alpha, (teacher's block outputs,
        student's) [n, T, d] float32, or None when alpha is 0): the outputs in float32 plus
        alpha * (teacher's - student's), then cast to `dtype` on the host, a minibatch of tokens
        at a time (the same numbers as on the whole arrays). split: x is this process's share of
        the calibration tokens (False: the held-out tokens, whole on every process)."""
        out_dtype = dtype if drift is None else np.float32
        out_sh = sharding.rows_sharding(self.run.mesh, 3, 1) if self.split and split else self._replicated()
        fn = jax.jit(lambda t, xb: local_opt.mlp_targets(self.spec, t, xb).astype(out_dtype), out_shardings=out_sh)
        y = self.store.alloc(x.shape, dtype, name) if name else np.empty(x.shape, dtype)
        for s in range(0, x.shape[1], self.batch):
            sl = (slice(None), slice(s, s + self.batch))
            xb = x[sl]
            yb = fn(teacher, self._put(xb, split))
            yb = sharding.process_rows(yb, axis=1) if self.split and split else np.asarray(yb)
            if drift is not None:
                alpha, outputs = drift
                if alpha:
                    out_t, out_s = outputs
                    yb = yb + alpha * (out_t[sl] - out_s[sl])
                    calibration.release(out_t[sl])
                    calibration.release(out_s[sl])
                yb = yb.astype(dtype)
            y[sl] = yb
            calibration.release(xb)
            calibration.release(y[sl])
        return y

    def batches(self, key, blocks: slice = slice(None), fips_data: bool = True) -> local_opt.HostBatches:
        """The training minibatches of `blocks`: (x, y) gathered on the host per step; FiPS's
        inputs and targets (the student's with `local.inputs=student`) or the teacher's."""
        x, y = (self.fips_x, self.fips_y) if fips_data else (self.x, self.y)
        return local_opt.HostBatches((x[blocks], y[blocks]), key, self.batch, self.act_sharding, mesh=self.run.mesh)

    def calib_mse(self, params: dict, compute_dtype) -> float:
        """`mlp_group_loss` of FiPS's params over every calibration token, a minibatch at a time."""
        fn = jax.jit(lambda p, xb, yb: local_opt.mlp_group_loss(p, self.spec, xb, yb, compute_dtype)[1],
                     out_shardings=self._replicated())
        sq = np.zeros(self.layout.n_blocks)
        per_call = jax.process_count() if self.split else 1  # every process's minibatch in one call
        for s in range(0, self.x.shape[1], self.batch):
            xb, yb = self.fips_x[:, s:s + self.batch], self.fips_y[:, s:s + self.batch]
            sq += np.asarray(fn(params, self._put(xb, True), self._put(yb, True)), np.float64) * xb.shape[1] * per_call
            calibration.release(xb)
            calibration.release(yb)
        return float(np.mean(sq / self.n_tokens))

    def heldout(self, parts: list) -> list[float]:
        ws, bias = factors.part_weights(parts, self.layout)
        if self.split:  # one global computation, its result on every process
            out = jax.jit(lambda w, b, x: local_opt.mlp_outputs(w, b, self.spec, x), out_shardings=self._replicated())(
                ws, bias, self._put(self.xh, False))
        else:
            out = local_opt.mlp_outputs(ws, bias, self.spec, jnp.asarray(self.xh))
        return [relative_error(out[b], self.yh[b]) for b in range(self.layout.n_blocks)]


def _loss_fns(run, spec):
    """The FiPS loss, one function for every group: `local_opt.train` reuses its compiled step
    across groups (and blocks, in sequential mode) of the same shapes. Each step's minibatch
    (x, y) [n, batch, d] comes from `_Group.batches` (`local_opt.minibatch_indices` on the host)."""
    compute_dtype = jnp.dtype(run.cfg["local"].get("compute_dtype", "float32"))
    remat = bool(run.cfg["local"].get("block_remat", False))

    def fips_loss(p, step, x, y):
        del step
        return local_opt.mlp_group_loss(p, spec, x, y, compute_dtype, remat)

    def parts_loss(part_layouts, layout):
        def loss(p, step, x, y):
            del step
            return local_opt.mlp_parts_loss(p, part_layouts, layout, spec, x, y, compute_dtype)
        return loss

    return fips_loss, parts_loss


def _batch_key(run):
    return jax.random.PRNGKey(run.cfg["seed"])


def _train_fips(run, grp: _Group, p0: dict, loss_fn) -> tuple[dict, list[float]]:
    """FiPS's local optimisation of one group: the joint update, or the authors' sequential order
    (one MLP at a time with a fresh optimiser; later MLPs keep moving U). The joint update
    consumes p0 (its device buffers are donated or freed)."""
    cfg, gdir = run.cfg, run.path(grp.dir)
    lcfg = fips.local_config(cfg, grp.steps)
    kw = dict(checkpoint_every=cfg["checkpoint_every"], log=run.log, on_step=run.on_step)
    mode = cfg["fips"]["mode"]
    if mode == "joint":
        p_sh = sharding.group_shardings(p0, run.mesh, run.rules, grp.spec.fc_names, grp.spec.transposed)
        return local_opt.train(p0, loss_fn, (), lcfg, os.path.join(gdir, "loop"), name=f"group {grp.g}",
                               param_shardings=p_sh, feed=grp.batches(_batch_key(run)), consume=True, **kw)
    if mode != "sequential":
        raise ValueError(f"fips.mode {mode!r} not in ('joint', 'sequential')")
    p1, losses = dict(p0), []
    for b in range(grp.layout.n_blocks):
        sub = {"u": p1["u"], "v": p1["v"][b:b + 1]}
        if "bias" in p1:
            sub["bias"] = {k: v[b:b + 1] for k, v in p1["bias"].items()}
        sub, lb = local_opt.train(sub, loss_fn, (), lcfg, os.path.join(gdir, f"loop_b{b}"),
                                  name=f"group {grp.g} block {grp.layout.blocks[b]}",
                                  feed=grp.batches(_batch_key(run), slice(b, b + 1)), **kw)
        new = {"u": sub["u"], "v": p1["v"].at[b].set(sub["v"][0])}
        if "bias" in sub:
            new["bias"] = {k: p1["bias"][k].at[b].set(sub["bias"][k][0]) for k in sub["bias"]}
        p1 = new
        losses += lb
    return p1, losses


def _train_parts(run, grp: _Group, name: str, parts: list, parts_loss) -> list:
    """A peer's factors refined with FiPS's local optimisation budget: same loss, steps, data and
    optimiser, dense factors (`compare.train`)."""
    lcfg = dataclasses.replace(fips.local_config(run.cfg, grp.steps), algorithm="dense", sparsity=0.0)
    layouts = tuple(layout for layout, _ in parts)
    trained, _ = local_opt.train([p for _, p in parts], parts_loss(layouts, grp.layout), (), lcfg,
                                 run.path(grp.dir, f"{name}_loop"), checkpoint_every=run.cfg["checkpoint_every"],
                                 log=run.log, name=f"group {grp.g} {name}", on_step=run.on_step,
                                 feed=grp.batches(_batch_key(run), fips_data=False))
    return list(zip(layouts, trained))


def _compress_group(run, grp: _Group, peers: list, losses_fns, off_device=None) -> tuple[dict, dict]:
    """One group, every method: FiPS's init and local optimisation, each peer's closed form (and
    its refinement with `compare.train`), and everyone's held-out error. Returns (FiPS's final
    params, the group's stats). off_device(fn): fn() with the dense model off the device
    (`local.offload_model`); None: fn()."""
    cfg, log, g, layout, gdir = run.cfg, run.log, grp.g, grp.layout, grp.dir
    fips_loss, parts_loss = losses_fns
    off_device = off_device or (lambda fn: fn())
    t0 = time.perf_counter()
    p0 = run.stage(f"{gdir}/init", lambda: fips.init(grp.fips_problem)[0][1], "arrays", quiet=True)
    log(f"group {g}: FiPS init ({cfg['fips']['init']}, prune {cfg['fips']['prune']}) {time.perf_counter() - t0:.1f}s")
    errors = {"fips_init": grp.heldout([(layout, fips.one_shot(p0, cfg))])}
    held = [p0]  # handed over: the joint update frees the init instead of keeping it beside V
    del p0
    p1, losses = off_device(lambda: _train_fips(run, grp, held.pop(), fips_loss))
    errors["fips_final"] = grp.heldout([(layout, p1)])
    for m in peers:
        t_peer = time.perf_counter()
        parts = run.stage(f"{gdir}/{m.NAME}", lambda m=m: m.init(grp.problem), "parts", quiet=True)
        errors[m.NAME] = grp.heldout(parts)
        log(f"group {g}: {m.NAME} {time.perf_counter() - t_peer:.1f}s")
        if cfg["compare"]["train"]:
            parts = run.stage(f"{gdir}/{m.NAME}_trained", lambda m=m, p=parts: off_device(
                lambda: _train_parts(run, grp, m.NAME, p, parts_loss)), "parts", quiet=True)
            errors[f"{m.NAME}_trained"] = grp.heldout(parts)
    calib_mse = grp.calib_mse(p1, jnp.float32)
    return p1, {"blocks": list(layout.blocks), "rank": grp.problem.rank, "steps": grp.steps,
                "loss_first": losses[0] if losses else None, "loss_last": losses[-1] if losses else None,
                "heldout_rel_error": errors, "calib_mse_final": float(calib_mse)}


def _student_inputs(cfg: dict, arch) -> bool:
    """Whether FiPS is fitted on its own compressed model's activations (`local.inputs`)."""
    inputs, drift = cfg["local"]["inputs"], float(cfg["local"]["drift"])
    if inputs not in ("teacher", "student"):
        raise ValueError(f"local.inputs {inputs!r} not in ('teacher', 'student')")
    if not 0.0 <= drift <= 1.0:
        raise ValueError(f"local.drift {drift} must be in [0, 1]")
    if inputs == "student" and drift and getattr(getattr(arch, "spec", None), "post_norms", False):
        # The correction is made in MLP-output space: exact only where the MLP's output is added
        # to the residual stream as it is; a post-MLP norm sits between them.
        raise ValueError("local.drift > 0 needs an MLP output added to the residual stream as it is; this model "
                         "normalises it first (post-MLP norm): use local.drift=0")
    return inputs == "student"


def _group_store(run, gdir: str) -> calibration.ActivationStore:
    """Where a group's [n, T, d] activations live (`local.store`): host memory, or files under
    <workdir>/groups/gNN/acts/p<process> (one folder per process: each holds its own arrays),
    emptied first (a run killed mid-group left them) and deleted when the group is done."""
    if calibration.check_store(run.cfg["local"].get("store", "memory")) == "memory":
        if sharding.is_writer():  # files of an interrupted local.store=disk attempt
            shutil.rmtree(run.path(gdir, "acts"), ignore_errors=True)
        return calibration.MEMORY
    return calibration.ActivationStore(run.path(gdir, "acts", f"p{jax.process_index()}"))


def calibrate(run, arch, params, plan, dat: Data, peers: list) -> Calibrated:
    """Every group in turn: capture its MLP inputs, compress it with FiPS and every peer method,
    refine, and measure the held-out error; resumes at the first unfinished group, the stream
    restored from the hidden state saved after the last finished one (a group's activations are
    recomputed, never saved: `local.store=disk` files are deleted with the group)."""
    cfg, log = run.cfg, run.log
    student = _student_inputs(cfg, arch)
    calibration.check_store(cfg["local"].get("store", "memory"))
    drift = float(cfg["local"]["drift"])
    # Several processes: each captures its own share of the calibration windows (the held-out
    # windows, a few, every process whole); one process: all of them.
    mesh = run.mesh
    calib = dat.calib
    if sharding.multi_process():
        share = sharding.process_share(len(dat.calib), mesh, "data.calib.n_windows")
        calib = dat.calib[share]
        log(f"calibration windows {share.start}-{share.stop - 1} of {len(dat.calib)} captured by this process "
            f"({jax.process_count()} processes)")
    calib_stream = calibration.HiddenStream(arch, params, calib, cfg["chunk"], mesh=mesh, split=True)
    hold_stream = calibration.HiddenStream(arch, params, dat.holdout, cfg["chunk"], mesh=mesh)
    # local.inputs=student: a second stream through FiPS's compressed model (dense from the
    # current group on); `student_params` gains each group's factors as it finishes.
    student_stream = calibration.HiddenStream(arch, params, calib, cfg["chunk"], mesh=mesh, split=True) \
        if student else None
    resume_at = 0
    while resume_at < len(plan) and run.done(f"groups/g{resume_at:02d}/stats"):
        resume_at += 1
    if resume_at:
        saved = run.load(f"groups/g{resume_at - 1:02d}/hidden_after", "arrays")
        nxt = plan[resume_at - 1][0].blocks[-1] + 1
        calib_stream.restore(np.asarray(saved["calib"]), nxt)
        hold_stream.restore(np.asarray(saved["holdout"]), nxt)
        if student:
            if "student" not in saved:
                raise ValueError(f"{run.path('groups')}: the finished groups were calibrated with local.inputs=teacher; "
                                 "resume with that setting or start a new workdir")
            student_stream.restore(np.asarray(saved["student"]), nxt)
        log(f"groups 0-{resume_at - 1} done earlier; resuming at group {resume_at}")
    losses_fns = _loss_fns(run, arch.mlp_spec)
    need_stats = (any(m.NEEDS_STATS for m in peers), fips.needs_stats(cfg))
    group_stats = []
    streams = [s for s in (calib_stream, hold_stream, student_stream) if s is not None]
    offload = bool(cfg["local"].get("offload_model", False))

    def off_device(grp: _Group):
        """`local.offload_model`: run fn() with the dense model, and every stream's copy of it,
        in host memory, or in files of the group's store with `local.store=disk` (on a CPU
        backend, where the device's memory is the host's, only files free it). The local step
        needs none of it (its minibatches come from the host), and on an 8-9B model it is 15-17
        GiB of device memory. Afterwards every holder gets the re-placed arrays: `params` here,
        the streams, the group's problems."""
        def run_off(fn):
            nonlocal params
            to = None if grp.store.directory is None else os.path.join(grp.store.directory, "model")
            copy = sharding.HostCopy([params] + [s.params for s in streams], directory=to)
            try:
                return fn()
            finally:
                params, *stream_params = copy.restore()
                for s, p in zip(streams, stream_params):
                    s.params = p
                grp.problem = dataclasses.replace(grp.problem, dense_params=params)
                grp.fips_problem = dataclasses.replace(grp.fips_problem, dense_params=params)
        return run_off if offload else None

    for g, (layout, rank) in enumerate(plan):
        gdir = f"groups/g{g:02d}"
        if g < resume_at:
            stats = run.load(f"{gdir}/stats")
            if student:
                student_stream.params = factors.assemble(student_stream.params,
                                                         [(layout, run.load(f"{gdir}/final", "arrays"))])
        else:
            t0 = time.perf_counter()
            store = _group_store(run, gdir)
            if student:
                entry = student_stream.state()
                # The block outputs (float32) only form the drift: not computed when it is off.
                if drift:
                    x, out_teacher = calib_stream.advance(layout.blocks, True, store, "x")
                    xs, out_student = student_stream.advance(layout.blocks, True, store, "fips_x")
                    student_in = (xs, (out_teacher, out_student))
                    del xs, out_teacher, out_student
                else:
                    x = calib_stream.advance(layout.blocks, store=store, name="x")
                    student_in = (student_stream.advance(layout.blocks, store=store, name="fips_x"), None)
            else:
                x, student_in = calib_stream.advance(layout.blocks, store=store, name="x"), None
            grp = _Group(run, arch, params, layout, rank, g, x, hold_stream.advance(layout.blocks), need_stats,
                         student_in, store)
            del x, student_in  # the group holds what it uses; the block outputs are in FiPS's targets now
            store.delete("x_out")
            store.delete("fips_x_out")
            p1, stats = _compress_group(run, grp, peers, losses_fns, off_device(grp))
            del grp
            store.clear()  # before the group counts as done: a finished group leaves no files
            saved = {"calib": calib_stream.state(), "holdout": hold_stream.state()}
            if student:  # the group again, now compressed: the next group's inputs
                student_stream.params = factors.assemble(student_stream.params, [(layout, p1)])
                student_stream.restore(entry, layout.blocks[0])
                student_stream.advance(layout.blocks, keep_inputs=False)
                saved["student"] = student_stream.state()
            stats["seconds"] = time.perf_counter() - t0
            run.save(f"{gdir}/final", p1, "arrays")
            del p1  # kept on disk only, like every finished group's (`final` below)
            run.save(f"{gdir}/hidden_after", saved, "arrays")
            run.save(f"{gdir}/stats", stats)
            if g and sharding.is_writer():  # only the newest stream state is needed to resume
                prev = run.file(f"groups/g{g - 1:02d}/hidden_after", "arrays")
                if os.path.exists(prev):
                    os.remove(prev)
            checkpointing.fault_point("group_done")
            stages.trim_heap()  # the group's freed step inputs and activations, before the next group's
            log(f"group {g} done in {stats['seconds']:.0f}s: held-out rel. error " + ", ".join(
                f"{k} {np.mean(v):.4f}" for k, v in stats["heldout_rel_error"].items()))
        group_stats.append(stats)
    # A finished group's factors (V-sized) are read back from the stage store where they are
    # used, one group at a time, never all held beside the next group's; with offload_model as
    # host arrays, placed by their reader.
    final = stages.StoredTrees(run, {f"g{g:02d}": f"groups/g{g:02d}/final" for g in range(len(plan))}, host=offload)
    return _calibrated(run, plan, dat, peers, final, group_stats, params)


def _calibrated(run, plan, dat: Data, peers: list, final: Mapping, group_stats: list, params) -> Calibrated:
    """The variants to evaluate, each loaded from the stage store only when it is evaluated."""
    cfg = run.cfg
    layouts = {f"g{g:02d}": layout for g, (layout, _) in enumerate(plan)}
    peer_names = [m.NAME for m in peers] + ([f"{m.NAME}_trained" for m in peers] if cfg["compare"]["train"] else [])

    # Each variant's groups are read one at a time as its evaluation assembles them.
    def peer(key):
        return lambda: (pt for g in range(len(plan)) for pt in run.load(f"groups/g{g:02d}/{key}", "parts"))

    variants: dict[str, Any] = {"dense": None, **{k: peer(k) for k in peer_names}}
    variants["fips_init"] = lambda: ((layouts[n], fips.one_shot(run.load(f"groups/{n}/init", "arrays"), cfg))
                                     for n in layouts)
    variants["fips_final"] = lambda: ((layouts[n], final[n]) for n in layouts)
    blocks = [i for layout, _ in plan for i in layout.blocks]
    heldout = {k: [e for st in group_stats for e in st["heldout_rel_error"][k]]
               for k in group_stats[0]["heldout_rel_error"]} if group_stats else {}
    return Calibrated(variants=variants, final=final, layouts=layouts, heldout=heldout, blocks=blocks,
                      finetune_inputs=dat.finetune, finetune_labels=None, params=params,
                      metrics={"groups_stats": group_stats,
                               "data": {"calib_tokens": int(dat.calib.size), "eval_tokens": int(len(dat.eval_ids)),
                                        "heldout_tokens": int(dat.holdout.size),
                                        "eval": {**dat.scope, "label": report.eval_scope_label(dat.scope, dat.context)}}})


# ---- evaluation ---------------------------------------------------------------------------------


def evaluate(run, arch, params, dat: Data, variants: dict) -> tuple[dict, dict]:
    """Perplexity of every variant on the evaluation split, each a stage of its own."""
    apply = jax.jit(arch.apply)

    def ppl(model):
        return perplexity.perplexity(lambda t: apply(model, t), dat.eval_ids, dat.context, dat.protocol,
                                     batch_size=run.cfg["eval"]["batch_size"], jit=False)

    evals = {}
    for key, parts in variants.items():
        evals[key] = run.stage(f"stages/eval_{key}", lambda parts=parts: ppl(
            params if parts is None else factors.assemble(params, parts())))
    return evals, {"task": NAME, "metric": "perplexity", "protocol": dat.protocol}
