"""Stage checkpoints in a workdir, so that a killed run resumes where it stopped.

- Loops (local optimisation) save `{params, opt_state}` with an Orbax CheckpointManager every N
  steps; Orbax writes into a temporary directory and renames it when complete, so a run killed
  mid-save leaves the previous step intact.
- Finished stages leave small JSON or array files written atomically (write to a temp name, then
  `os.replace`), and are never recomputed.
- The run's config is saved beside the checkpoints; a later run with a config that changes what a
  saved stage computed is refused with the keys that differ.
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any, Iterable

import jax
import numpy as np
import orbax.checkpoint as ocp


def atomic_write_bytes(path: str, data: bytes) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", prefix=".tmp-")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


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
    """Named arrays in one .npz, atomically."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", prefix=".tmp-", suffix=".npz")
    with os.fdopen(fd, "wb") as f:
        np.savez(f, **{k: np.asarray(v) for k, v in arrays.items()})
    os.replace(tmp, path)


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


def save_tree(directory: str, tree: Any) -> None:
    """One-off Orbax save of a param tree (the exported compressed model)."""
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(os.path.abspath(directory), tree, force=True)
    ckptr.wait_until_finished()


def restore_tree(directory: str, like: Any | None = None, sharding: Any = None) -> Any:
    """Restore a `save_tree` tree. like: a tree of arrays or ShapeDtypeStructs (with shardings)
    to restore into; None: the saved shapes and dtypes, every array on `sharding` (default the
    first local device). The mesh a tree was saved from never matters, so a model exported from
    a multi-device run reloads on a laptop."""
    ckptr = ocp.StandardCheckpointer()
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


def flatten_config(cfg: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in cfg.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten_config(v, key + "."))
        else:
            out[key] = v
    return out


def check_config(workdir: str, cfg: dict, ignore: Iterable[str] = ()) -> None:
    """Save `cfg` in the workdir on first use; afterwards refuse a config whose values differ
    (except keys under `ignore` prefixes, which do not change any saved stage)."""
    path = os.path.join(workdir, "config.json")
    current = json.loads(json.dumps(cfg, default=_jsonable))
    if not os.path.exists(path):
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
