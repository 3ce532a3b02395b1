"""Stage checkpoints in a workdir, so that a killed run resumes where it stopped.

- Loops (local optimisation) save `{params, opt_state}` with an Orbax CheckpointManager every N
  steps; Orbax writes into a temporary directory and renames it when complete, so a run killed
  mid-save leaves the previous step intact.
- Finished stages leave small JSON or array files written atomically (write to a temp name,
  fsync, `os.replace`, fsync the directory), and are never recomputed.
- Artefacts made of several files (the compressed model, HF checkpoint folders) are built in a
  temp directory next to the target and renamed into place (`atomic_dir`): a reader, or a rerun,
  sees the old version whole or the new one whole, never a mix.
- The run's config is saved beside the checkpoints; a later run with a config that changes what a
  saved stage computed is refused with the keys that differ, and a non-empty directory without
  one (not a run's workdir) is refused before anything is written into it.
- `fault_point(name)` marks places where tests kill the process (`FIPS_JAX_KILL_AT`).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import tempfile
from typing import Any, Iterable, Iterator

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import traverse_util


KILL_ENV = "FIPS_JAX_KILL_AT"
_reached: dict[str, int] = {}


def fault_point(name: str) -> None:
    """A testing aid: SIGKILL this process here when the environment variable `FIPS_JAX_KILL_AT`
    is `name` (the first time the point is reached) or `name:N` (the N-th time, counted in this
    process). Lets a test stop a run at a chosen place, with no chance to clean up, and check
    that a rerun of the same command resumes to the uninterrupted result. A no-op otherwise."""
    want = os.environ.get(KILL_ENV)
    if not want:
        return
    target, _, nth = want.partition(":")
    if target != name:
        return
    _reached[name] = _reached.get(name, 0) + 1
    if _reached[name] == int(nth or 1):
        os.kill(os.getpid(), signal.SIGKILL)


def fsync_dir(path: str) -> None:
    """Make a rename or file creation inside directory `path` durable."""
    fsync_file(path)


def fsync_file(path: str) -> None:
    """Flush a file written by a library that does not fsync (safetensors, Orbax) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(path: str) -> None:
    """fsync every file and directory under `path`."""
    for root, _, files in os.walk(path):
        for name in files:
            fsync_file(os.path.join(root, name))
        fsync_dir(root)


def _write_atomically(path: str, write, suffix: str = "") -> None:
    """`write(file object)` into a temp file next to `path`, fsync it, rename it to `path`,
    fsync the directory. A crash leaves the old `path` (or none), never a partial one."""
    folder = os.path.dirname(path) or "."
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=suffix)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    fsync_dir(folder)


def atomic_write_bytes(path: str, data: bytes) -> None:
    _write_atomically(path, lambda f: f.write(data))


def _unique(parent: str, prefix: str) -> str:
    return os.path.join(parent, f"{prefix}{os.getpid()}-{secrets.token_hex(4)}")


def _stale_siblings(parent: str, base: str) -> list[str]:
    return [os.path.join(parent, n) for n in os.listdir(parent)
            if n.startswith((f".tmp-{base}-", f".old-{base}-"))]


def replace_dir(tmp: str, target: str) -> None:
    """Put the complete directory `tmp` at `target` (same filesystem). An existing `target` is
    renamed aside first and removed only once the new one is in place, so at every moment one
    of the two is whole on disk."""
    parent = os.path.dirname(os.path.abspath(target))
    aside = None
    if os.path.lexists(target):
        aside = _unique(parent, f".old-{os.path.basename(target)}-")
        os.rename(target, aside)
    try:
        os.rename(tmp, target)
    except BaseException:
        if aside is not None:
            os.rename(aside, target)
        raise
    fsync_dir(parent)
    if aside is not None:
        if os.path.isdir(aside) and not os.path.islink(aside):
            shutil.rmtree(aside)
        else:
            os.remove(aside)


@contextlib.contextmanager
def atomic_dir(target: str, collective: bool = False) -> Iterator[str]:
    """Build the directory `target` whole or not at all: yields a fresh temp directory next to
    it to write into; on normal exit its files are fsynced and it replaces `target`
    (`replace_dir`); on an exception it is removed and `target` is untouched. Leftovers of a
    killed earlier attempt (`.tmp-<name>-*`, `.old-<name>-*`) are removed first.

    collective: every process of a multi-process run enters (Orbax saves are collective); they
    share one temp name, and only process 0 (`sharding.is_writer`) cleans up and renames.
    """
    target = os.path.abspath(target)
    parent, base = os.path.dirname(target), os.path.basename(target)
    writer = not collective or jax.process_index() == 0
    multi = collective and jax.process_count() > 1
    if multi:
        from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    os.makedirs(parent, exist_ok=True)
    if writer:
        for stale in _stale_siblings(parent, base):
            if os.path.isdir(stale):
                shutil.rmtree(stale)
            else:
                os.remove(stale)
    if multi:
        tmp = os.path.join(parent, f".tmp-{base}-collective")
        if writer:
            os.makedirs(tmp)
        multihost_utils.sync_global_devices(f"atomic_dir start {target}")
    else:
        tmp = _unique(parent, f".tmp-{base}-")
        os.mkdir(tmp)  # not mkdtemp: the folder keeps the umask's permissions once renamed
    try:
        yield tmp
        if multi:
            multihost_utils.sync_global_devices(f"atomic_dir written {target}")
        if writer:
            fsync_tree(tmp)
            replace_dir(tmp, target)
        if multi:
            multihost_utils.sync_global_devices(f"atomic_dir done {target}")
    except BaseException:
        if writer:
            shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_json(path: str, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True, default=_jsonable) + "\n").encode())


def read_json(path: str) -> Any:
    with open(path) as f:
        return json.load(f)


def _jsonable(x):
    if isinstance(x, (np.generic,)):
        return x.item()
    if isinstance(x, (np.ndarray, jax.Array)):
        return np.asarray(x).tolist()
    if isinstance(x, tuple):
        return list(x)
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")


def save_arrays(path: str, arrays: dict[str, np.ndarray]) -> None:
    """Named arrays in one .npz, atomically and durably (as `atomic_write_bytes`)."""
    _write_atomically(path, lambda f: np.savez(f, **{k: np.asarray(v) for k, v in arrays.items()}), suffix=".npz")


def load_arrays(path: str) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


class LoopCheckpointer:
    """Orbax checkpoints of a training loop's state, keyed by step."""

    def __init__(self, directory: str, max_to_keep: int = 2):
        self.manager = ocp.CheckpointManager(
            os.path.abspath(directory),
            options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True),
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any) -> None:
        self.manager.save(step, args=ocp.args.StandardSave(state))

    def restore(self, step: int, like: Any) -> Any:
        abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, like)
        return self.manager.restore(step, args=ocp.args.StandardRestore(abstract))

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def _this_process_only() -> ocp.options.MultiprocessingOptions:
    """Orbax options for a read this process does on its own (every process, by default, takes
    part in a save or restore and waits for the others at its barriers)."""
    if jax.process_count() == 1:
        return ocp.options.MultiprocessingOptions()
    me = jax.process_index()
    return ocp.options.MultiprocessingOptions(primary_host=me, active_processes={me},
                                              barrier_sync_key_prefix=f"process{me}")


def save_tree(directory: str, tree: Any) -> None:
    """One-off Orbax save of a param tree (the exported compressed model)."""
    if jax.process_count() > 1:
        # A process's own (not global) jax arrays, e.g. factors read back from a stage file, are
        # the same on every process: Orbax saves such values as host arrays, from process 0.
        tree = jax.tree_util.tree_map(
            lambda a: np.asarray(a) if isinstance(a, jax.Array) and a.is_fully_addressable else a, tree)
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(os.path.abspath(directory), tree, force=True)
    ckptr.wait_until_finished()


def restore_tree(directory: str, like: Any | None = None, sharding: Any = None) -> Any:
    """Restore a `save_tree` tree. like: a tree of arrays or ShapeDtypeStructs (with shardings)
    to restore into; None: the saved shapes and dtypes, every array on `sharding` (default the
    first local device). The mesh a tree was saved from never matters, so a model exported from
    a multi-device run reloads on a laptop. With several processes each reads on its own (no
    barrier with the others): e.g. process 0 converting the export to safetensors."""
    ckptr = ocp.StandardCheckpointer(multiprocessing_options=_this_process_only())
    path = os.path.abspath(directory)
    if like is None:
        meta = ckptr.metadata(path)
        tree = getattr(getattr(meta, "item_metadata", meta), "tree", None)
        if tree is None:
            tree = getattr(meta, "item_metadata", meta)
        sh = sharding or jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        abstract = jax.tree_util.tree_map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=sh), tree)
        return ckptr.restore(path, abstract)
    abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, like)
    return ckptr.restore(path, abstract)


def flatten_config(cfg: dict) -> dict[str, Any]:
    """{"fips.tau": 0.5, ...}: nested config dicts flattened with dotted keys."""
    return traverse_util.flatten_dict(cfg, sep=".")


def check_config(workdir: str, cfg: dict, ignore: Iterable[str] = (), write: bool = True) -> None:
    """Save `cfg` in the workdir on first use; afterwards refuse a config whose values differ
    (except keys under `ignore` prefixes, which do not change any saved stage).

    A workdir that holds files but no config.json is not a run's workdir (config.json is the
    first thing a run writes): it is refused, and nothing is written into it.
    write: whether this process saves config.json (process 0 only in a multi-process run).
    """
    path = os.path.join(workdir, "config.json")
    current = json.loads(json.dumps(cfg, default=_jsonable))
    if not os.path.exists(path):
        # A temp file of a config.json write killed midway is the only thing a run leaves first.
        foreign = sorted(n for n in os.listdir(workdir) if not n.startswith(".tmp-"))
        if foreign:
            raise ValueError(
                f"workdir {workdir} is not empty and has no config.json, so it is not a fips_jax run "
                f"(it holds {', '.join(foreign[:5])}{', ...' if len(foreign) > 5 else ''}); "
                "refusing to write into it: use a new or empty --workdir")
        if write:
            write_json(path, current)
        return
    saved = flatten_config(read_json(path))
    now = flatten_config(current)
    ignore = tuple(ignore)
    diffs = [
        f"{k}: {saved.get(k, '<absent>')!r} -> {now.get(k, '<absent>')!r}"
        for k in sorted(set(saved) | set(now))
        if not k.startswith(ignore) and saved.get(k) != now.get(k)
    ]
    if diffs:
        raise ValueError(
            f"workdir {workdir} holds stages computed with a different config ({'; '.join(diffs)}); "
            "use a new --workdir, or delete that one to start over"
        )
