"""Teacher activations from the dense model, streamed so that no run holds every layer at once.

LLMs (SPEC §4): the calibration tokens flow through the dense model one group of blocks at a
time; for each group we keep only that group's MLP inputs `[n, tokens, d]` (in host memory, or
in files read a slice at a time: `ActivationStore`, `local.store`) and the hidden state after it.
ViTs: the block inputs and outputs of a minibatch are recomputed from the dense model inside each
training step (teacher forcing), so nothing is cached.
"""

from __future__ import annotations

import mmap
import os
import shutil
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from fips_jax import sharding
from fips_jax.models import base


STORES = ("memory", "disk")


def check_store(kind: str) -> str:
    """`local.store`, refused with the allowed values if unknown."""
    if kind not in STORES:
        raise ValueError(f"local.store {kind!r} not in {STORES}")
    return kind


class ActivationStore:
    """Allocator of a group's [n_blocks, n_tokens, d] activation arrays (`local.store`).

    memory (directory None): `np.empty`, anonymous host memory, as the arrays always were.
    disk: each array is a `.npy` file under `directory` mapped with `np.lib.format.open_memmap`;
    writers fill it a chunk at a time and readers read slices of it, each calling `release`
    after (touched pages of a shared file mapping count in RSS until they are dropped), and
    training minibatches of random token positions are read with `gather` (`os.preadv`, nothing
    mapped), so the process's RSS holds about one chunk or minibatch of it, not the array. The
    file data stays in the page cache, which the kernel reclaims (writing dirty pages back) under
    pressure. For Llama-3.1-8B (groups of 8 blocks, 163,840 calibration tokens, d 4096, bfloat16)
    x and y are 10 GiB each: 20 GiB of RAM per process in memory, a minibatch on disk.
    A name is overwritten if it exists (a run killed mid-group leaves stale files: the next
    attempt recomputes them); `clear` deletes the directory when the group is done.
    """

    def __init__(self, directory: str | None = None):
        self.directory = directory
        if directory is not None:
            shutil.rmtree(directory, ignore_errors=True)  # stale files of an interrupted attempt
            os.makedirs(directory, exist_ok=True)

    def alloc(self, shape: Sequence[int], dtype: Any, name: str) -> np.ndarray:
        if self.directory is None:
            return np.empty(tuple(shape), dtype)
        path = os.path.join(self.directory, f"{name}.npy")
        return np.lib.format.open_memmap(path, mode="w+", dtype=np.dtype(dtype), shape=tuple(shape))

    def delete(self, name: str) -> None:
        """Delete one array's file; its disk space returns once the last view of it is dropped."""
        if self.directory is not None:
            try:
                os.remove(os.path.join(self.directory, f"{name}.npy"))
            except FileNotFoundError:
                pass

    def clear(self) -> None:
        """Delete the files (mappings still open stay readable until they are dropped), and the
        parent folder when no other process's folder is left in it."""
        if self.directory is not None:
            shutil.rmtree(self.directory, ignore_errors=True)
            try:
                os.rmdir(os.path.dirname(self.directory))
            except OSError:
                pass


MEMORY = ActivationStore()


def release(a: Any) -> None:
    """Drop the resident pages of the part of a file mapping that array view `a` spans
    (`madvise(MADV_DONTNEED)`: the data stays in the file / page cache and is read back on the
    next access); nothing for arrays that are not file-backed."""
    _, mm = _memmap(a)
    if mm is None or mm.closed or not hasattr(mmap, "MADV_DONTNEED"):
        return
    base = np.frombuffer(mm, np.uint8)
    start_addr = base.ctypes.data
    del base  # the buffer export of the mapping ends here
    lo, hi = np.lib.array_utils.byte_bounds(a) if hasattr(np.lib, "array_utils") else np.byte_bounds(a)
    start = max(lo - start_addr, 0) // mmap.PAGESIZE * mmap.PAGESIZE
    end = min(hi - start_addr, len(mm))
    if end > start:
        mm.madvise(mmap.MADV_DONTNEED, start, end - start)


def _memmap(a: Any) -> tuple[np.memmap, mmap.mmap] | tuple[None, None]:
    """The memmap (file name, offset) and mapping array `a` is a view of, (None, None) if none."""
    while a is not None:
        if isinstance(a, np.memmap) and getattr(a, "_mmap", None) is not None and a.filename:
            return a, a._mmap  # pylint: disable=protected-access
        a = getattr(a, "base", None)
    return None, None


def gather(a: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """`a[:, idx]` of a host array [n, T, ...] as a new C-contiguous array (a training minibatch of
    token positions). A file-backed `a` is read with one `os.preadv` per row, in file order,
    without mapping any of it: through the mapping, each row touched would map the whole
    page-cache folio around it (up to megabytes on recent kernels), so a minibatch of random
    rows maps most of the file until it is released. The same numbers either way."""
    m, mm = _memmap(a)
    row_shape = a.shape[2:]
    row = int(np.prod(row_shape, dtype=np.int64)) * a.itemsize
    contiguous_rows = a.ndim >= 2 and np.ascontiguousarray(a[:1, :1]).strides[2:] == a.strides[2:]
    fd = None
    if m is not None and not mm.closed and contiguous_rows and a.strides[1] >= 0 and a.strides[0] >= 0:
        try:
            fd = os.open(m.filename, os.O_RDONLY)
        except OSError:  # the file is gone (its group is done) but the mapping is not: read through it
            pass
    if fd is None:  # in memory, or no file to read: index (and drop any mapped pages touched)
        out = np.ascontiguousarray(a[:, idx])
        release(a)
        return out
    idx = np.asarray(idx, np.int64)
    out = np.empty((a.shape[0], idx.shape[0]) + row_shape, a.dtype)
    base = np.frombuffer(mm, np.uint8)
    # File offset of a[0, 0]: numpy maps the file from the allocation granule below m.offset.
    first = m.offset - m.offset % mmap.ALLOCATIONGRANULARITY + (a.ctypes.data - base.ctypes.data)
    del base
    order = np.argsort(idx, kind="stable")
    offsets = (idx[order] * a.strides[1]).tolist()  # ascending: the file read front to back
    buf = memoryview(out.reshape(-1).view(np.uint8))
    preadv = os.preadv
    try:
        for b in range(a.shape[0]):
            views = [buf[p:p + row] for p in ((b * idx.shape[0] + order) * row).tolist()]
            off = first + b * a.strides[0]
            for v, o in zip(views, offsets):
                if preadv(fd, [v], off + o) != row:
                    raise OSError(f"{m.filename}: short read at offset {off + o}")
    finally:
        os.close(fd)
    return out


_EMBED = object()  # `HiddenStream._run`'s ctx for the embedding (a block's ctx may be None)


class HiddenStream:
    """Hidden states of a fixed token batch advancing through the dense model block by block.

    Batches of `chunk` sequences are run at a time to bound activation memory; states are kept
    on the host between blocks.

    With several processes (`mesh` given; `sharding.multi_process()`), every forward is one
    global computation over the mesh, whichever way the dense model is sharded:
    - split=True: `inputs` are this process's share of the windows (`sharding.process_share`);
      each chunk's batch is the processes' chunks side by side, split over the devices
      (`sharding.rows_sharding`), and each process keeps only its own rows, so host memory and
      work per process shrink with the number of processes. A chunk is padded with zero windows
      to a multiple of the process's devices; their rows are dropped.
    - split=False: every process passes the same `inputs` and gets every row (small streams:
      the held-out windows).
    One process: plain single-device arrays, as always.
    """

    def __init__(self, arch: base.Architecture, params: Any, inputs: np.ndarray, chunk: int,
                 mesh: Any = None, split: bool = False):
        self.arch, self.params, self.chunk = arch, params, max(int(chunk), 1)
        self.mesh = mesh if mesh is not None and sharding.multi_process() else None
        self.split = bool(split) and self.mesh is not None
        self._jitted: dict[Any, Callable] = {}
        self.hidden, self.ctx = [], []
        for s in range(0, inputs.shape[0], self.chunk):
            tokens = np.asarray(inputs[s:s + self.chunk])
            h, ctx = self._run("embed", arch.embed, params, tokens)
            self.hidden.append(h)
            self.ctx.append(ctx)
        self.next_block = 0

    def _pad(self, rows: np.ndarray) -> np.ndarray:
        extra = -rows.shape[0] % sharding.local_devices(self.mesh)
        if not extra:
            return rows
        return np.concatenate([rows, np.zeros((extra,) + rows.shape[1:], rows.dtype)])

    def _run(self, key: Any, fn: Callable, params: Any, rows: np.ndarray, ctx: Any = _EMBED) -> tuple:
        """fn(params, rows[, ctx]) -> (rows' results as host arrays, the rest as device arrays).
        The first output has a row per input row; so does the second for a block (its MLP
        inputs), while embed's second (the context) stays on the device for the blocks. `key`
        names fn in the cache of compiled functions; ctx: the block's context (which may be
        None), left out for embed."""
        if self.mesh is None:
            jitted = self._jitted.get(key) or self._jitted.setdefault(key, jax.jit(fn))
            out = jitted(params, jnp.asarray(rows)) if ctx is _EMBED else jitted(params, jnp.asarray(rows), ctx)
            return (np.asarray(out[0]), out[1] if ctx is _EMBED else np.asarray(out[1]))
        n = rows.shape[0]
        if self.split:
            arg = sharding.from_process_rows(self._pad(rows), self.mesh)
        else:
            arg = sharding.put(rows, sharding.replicated(self.mesh))
        args = (params, arg) if ctx is _EMBED else (params, arg, ctx)
        jitted = self._jitted.get((key, arg.shape))
        if jitted is None:
            def out_sh(leaf):
                if self.split and leaf.ndim and leaf.shape[0] == arg.shape[0]:
                    return sharding.rows_sharding(self.mesh, leaf.ndim)
                return sharding.replicated(self.mesh)

            shardings = jax.tree_util.tree_map(out_sh, jax.eval_shape(fn, *args))
            jitted = self._jitted.setdefault((key, arg.shape), jax.jit(fn, out_shardings=shardings))
        out = jitted(*args)
        fetch = (lambda a: sharding.process_rows(a)[:n]) if self.split else np.asarray
        return (fetch(out[0]), out[1] if ctx is _EMBED else fetch(out[1]))

    def advance(self, blocks: Sequence[int], with_outputs: bool = False, store: ActivationStore = MEMORY,
                name: str = "x", keep_inputs: bool = True):
        """Run `blocks` (which must continue where the stream is) and return their MLP inputs
        flattened over tokens: [len(blocks), n_tokens, d], in the dtype the model computes them
        in (bfloat16 for a bfloat16 model: half the host memory of float32, and exact; consumers
        upcast to float32 for their sums). With `with_outputs`, also each block's output,
        flattened the same way, in float32: (inputs, outputs). The arrays come from `store`
        (`name` and `name`_out), written a chunk of sequences at a time. keep_inputs=False only
        moves the stream on (returns None, or None and the outputs). Split over processes: this
        process's tokens only."""
        out = outs = None  # filled in place: one group's inputs held once, not also as per-chunk pieces
        n_seqs = sum(x.shape[0] for x in self.hidden)
        for k, i in enumerate(blocks):
            if i != self.next_block:
                raise ValueError(f"hidden stream is at block {self.next_block}, asked for block {i}")
            fn = self._block_fn(i)
            hidden, at, at_out = [], 0, 0
            for h, ctx in zip(self.hidden, self.ctx):
                nxt, mlp_in = self._run(i, fn, self.params, h, ctx)
                hidden.append(nxt)
                if keep_inputs:
                    mlp_in = mlp_in.reshape(-1, mlp_in.shape[-1])
                    if out is None:
                        per_seq = mlp_in.shape[0] // h.shape[0]  # MLP rows per sequence / image
                        out = store.alloc((len(blocks), per_seq * n_seqs, mlp_in.shape[-1]), mlp_in.dtype, name)
                    out[k, at:at + mlp_in.shape[0]] = mlp_in
                    release(out[k, at:at + mlp_in.shape[0]])
                    at += mlp_in.shape[0]
                if with_outputs:
                    o = hidden[-1].reshape(-1, hidden[-1].shape[-1])
                    if outs is None:
                        per_seq = o.shape[0] // h.shape[0]
                        outs = store.alloc((len(blocks), per_seq * n_seqs, o.shape[-1]), np.float32, f"{name}_out")
                    outs[k, at_out:at_out + o.shape[0]] = o  # cast to float32 as it is written
                    release(outs[k, at_out:at_out + o.shape[0]])
                    at_out += o.shape[0]
            self.hidden = hidden
            self.next_block += 1
        return (out, outs) if with_outputs else out

    def _block_fn(self, i: int) -> Callable:
        # One function per block index: Gemma-2 alternates local/global attention and Swin
        # alternates shifted windows, so the index is static.
        arch = self.arch
        return lambda params, hidden, ctx: arch.block(params, i, hidden, ctx)

    def state(self) -> np.ndarray:
        """The hidden state of every window (split over processes: gathered from all of them,
        a collective), what `restore` takes back."""
        local = np.concatenate(self.hidden)
        return sharding.gather_process_rows(local, self.mesh) if self.split else local

    def restore(self, hidden: np.ndarray, next_block: int) -> None:
        """Jump to a saved point of the stream (a finished group), skipping recomputation.
        `hidden`: every window's state, as `state` gives it (split: this process takes its share)."""
        if self.split:
            hidden = hidden[sharding.process_share(hidden.shape[0], self.mesh, "saved hidden states")]
        self.hidden = [hidden[s:s + self.chunk] for s in range(0, hidden.shape[0], self.chunk)]
        self.next_block = next_block


def teacher_blocks(arch: base.Architecture, params: Any, images: jax.Array, blocks: Sequence[int]):
    """Dense block inputs and outputs of one minibatch: ({i: input}, {i: output}, ctx).
    Traced inside the training step; gradients never flow into the teacher."""
    params = jax.lax.stop_gradient(params)
    hidden, ctx = arch.embed(params, images)
    inputs, outputs = {}, {}
    wanted = set(blocks)
    for i in range(max(blocks) + 1):
        out, _ = arch.block(params, i, hidden, ctx)
        if i in wanted:
            inputs[i], outputs[i] = hidden, out
        hidden = out
    return inputs, outputs, ctx
