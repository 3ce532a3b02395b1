"""The run's state: config, workdir, log, timings, mesh, and the stage store.

Every resumable artefact of a run goes through `Run.stage`: a stage is computed once, written
atomically under the workdir (JSON results as `<name>.json`, array trees and factor parts as
`<name>.npz`), and read back instead of recomputed when the same command runs again. The
training loops inside a stage checkpoint their own steps (Orbax, `local_opt.train`) under the
stage's directory, so an interrupted stage resumes mid-loop.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import dataclasses
import json
import os
import time
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from fips_jax import checkpointing, grouping, sharding

KINDS = ("json", "arrays", "parts")


def _save_arrays(path: str, tree: dict) -> None:
    # Collective: every process gathers the jax arrays split over processes; process 0 writes
    # them. Host arrays and a process's own jax arrays (e.g. closed-form factors computed on the
    # host) are the same on every process and are written as they are.
    flat = traverse_util.flatten_dict(tree, sep="/")
    flat = {k: sharding.to_host(v) for k, v in flat.items()}
    if sharding.is_writer():
        checkpointing.save_arrays(path, {k: np.asarray(v) for k, v in flat.items()})


def host_tree(tree: Any) -> Any:
    """`tree` with every jax array replaced by a full numpy copy on this host (collective: a
    sharded array is gathered from every process), freeing nothing itself: the caller drops the
    device arrays by dropping its references."""
    return jax.tree_util.tree_map(lambda v: sharding.to_host(v) if isinstance(v, jax.Array) else v, tree)


def trim_heap() -> bool:
    """Hand the heap's free pages back to the OS (glibc's `malloc_trim(0)`); False where the C
    library has no such call. Buffers freed between stages (minibatches, per-block activations,
    step inputs: tens of MiB each, below glibc's mmap threshold) stay in the heap otherwise, and
    RSS keeps them: about 1 GiB per LLM group at d 1024, the base every later phase's peak sits on."""
    try:
        fn = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return False
    fn(0)
    return True


class StoredTrees(Mapping):
    """{name: array tree} of finished array stages, read from the stage store at every access
    instead of held in memory: a run's finished groups' factors (V-sized, 10 GiB per Llama-3.1-8B
    group in float32, 1.4 GiB per group of a 1.1B model) stay on disk until an evaluation, the
    fine-tuning or the export reads them, one group at a time where the reader iterates.
    `host`: numpy leaves, left for the reader to place, instead of jax arrays on the default
    device (what `Run.load` gives)."""

    def __init__(self, run: "Run", stages: Mapping[str, str], host: bool = False):
        self._run, self._stages, self._host = run, dict(stages), host

    def __getitem__(self, key: str) -> dict:
        name = self._stages[key]
        if not self._host:
            return self._run.load(name, "arrays")
        return traverse_util.unflatten_dict(checkpointing.load_arrays(self._run.file(name, "arrays")), sep="/")

    def __iter__(self):
        return iter(self._stages)

    def __len__(self) -> int:
        return len(self._stages)


def load_arrays(path: str) -> dict:
    """An array tree written by a stage (nested dicts of jax arrays)."""
    flat = {k: jnp.asarray(v) for k, v in checkpointing.load_arrays(path).items()}
    return traverse_util.unflatten_dict(flat, sep="/")


def save_parts(path: str, parts: list) -> None:
    """Factor parts [(GroupLayout, params)]: the params as arrays, the layouts as one JSON string."""
    layouts = json.dumps([dataclasses.asdict(layout) for layout, _ in parts])
    _save_arrays(path, {"layouts": np.asarray(layouts), **{f"part{i:03d}": p for i, (_, p) in enumerate(parts)}})


def load_parts(path: str) -> list:
    """[(GroupLayout, params)] as `save_parts` wrote them."""
    flat = checkpointing.load_arrays(path)
    layouts = [grouping.GroupLayout.from_json(d) for d in json.loads(str(flat.pop("layouts")))]
    tree = traverse_util.unflatten_dict({k: jnp.asarray(v) for k, v in flat.items()}, sep="/")
    return [(layout, tree[f"part{i:03d}"]) for i, layout in enumerate(layouts)]


class Run:
    """Shared state of one pipeline run: config, workdir, logging, timings and the stage store."""

    def __init__(self, cfg: dict, workdir: str, log: Callable[[str], None], on_step=None):
        self.cfg, self.workdir, self.log, self.on_step = cfg, workdir, log, on_step
        self.timings: dict[str, float] = {}
        self.mesh = sharding.make_mesh(cfg["mesh"])
        self.rules = sharding.rules_from_config(cfg["sharding"]["rules"])

    def path(self, *parts: str) -> str:
        return os.path.join(self.workdir, *parts)

    def file(self, name: str, kind: str = "json") -> str:
        if kind not in KINDS:
            raise ValueError(f"stage kind {kind!r} not in {KINDS}")
        return self.path(name + (".json" if kind == "json" else ".npz"))

    def done(self, name: str, kind: str = "json") -> bool:
        return os.path.exists(self.file(name, kind))

    def load(self, name: str, kind: str = "json") -> Any:
        path = self.file(name, kind)
        return {"json": checkpointing.read_json, "arrays": load_arrays, "parts": load_parts}[kind](path)

    def save(self, name: str, value: Any, kind: str = "json") -> None:
        path = self.file(name, kind)
        if kind == "json":
            if sharding.is_writer():
                checkpointing.write_json(path, value)
        else:
            (_save_arrays if kind == "arrays" else save_parts)(path, value)

    def stage(self, name: str, fn: Callable[[], Any], kind: str = "json", label: str | None = None,
              quiet: bool = False) -> Any:
        """`fn()` once: its result is saved as `name` (+ .json or .npz, under the workdir) and
        reused on later runs. Array stages come back as jax arrays, so a resumed run computes with
        what a fresh one had. `label` (default: the name's last component) names it in the log
        and in the timings."""
        label = label or os.path.basename(name)
        if self.done(name, kind):
            if not quiet:
                self.log(f"[{label}] done earlier, reusing {self.file(name, kind)}")
            return self.load(name, kind)
        if not quiet:
            self.log(f"[{label}] ...")
        t0 = time.perf_counter()
        result = fn()
        if not quiet:  # quiet stages repeat per group; their time is in the group's stats
            self.timings[label] = time.perf_counter() - t0
        # Computed, not yet saved: where kill tests interrupt (`FIPS_JAX_KILL_AT=stage:N` counts
        # JSON stages, i.e. evaluations; array stages are `array_stage:N`).
        checkpointing.fault_point("stage" if kind == "json" else "array_stage")
        self.save(name, result, kind)
        trim_heap()
        if not quiet:
            self.log(f"[{label}] {time.perf_counter() - t0:.1f}s")
        return result


def shardings_of(run: Run, spec, tree: dict) -> dict:
    """{name: NamedShardings of its group params} by the run's mesh and rules."""
    return {n: sharding.group_shardings(p, run.mesh, run.rules, spec.fc_names, spec.transposed) for n, p in tree.items()}

