"""Device meshes, logical-axis rules and shardings for calibrating 8-9B models on many devices.

Every array the pipeline holds names its axes logically: the dense model's params through
`arch.logical_axes()` (e.g. `("embed", "mlp")` for a gate kernel), a FiPS group's params through
`group_logical_axes`, calibration activations through `ACTIVATION_AXES`. One table of rules maps
logical names to mesh axes, so the model code never names a mesh axis:

    mesh = make_mesh({"data": 1, "fsdp": -1, "tensor": 1})
    shardings = logical_to_sharding(arch.logical_axes(), mesh, DEFAULT_RULES, shapes)

Rules are data: `((logical name, mesh axis | tuple of mesh axes | None), ...)`. A name may appear
several times; each array dimension takes the first candidate whose mesh axes are not already
used by an earlier dimension of the same array and whose size divides the dimension (otherwise
the next candidate, finally replicated). That is how a gate kernel `[d, p]: ("embed", "mlp")`
and a down kernel `[p, d]: ("mlp", "embed")` share one table: whichever axis comes first takes
"fsdp", the other what is left.

Optimiser states and sparsity masks shadow the params (Adam's mu/nu, `SparseState.masks`), so
`shadow_shardings` gives each of their leaves the sharding of the param it mirrors and replicates
the rest (step counts, per-leaf target sparsities).
"""

from __future__ import annotations

import math
import os
import shutil
from typing import Any, Callable, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MeshAxes = str | tuple[str, ...] | None
Rules = tuple[tuple[str, MeshAxes], ...]
LogicalAxes = tuple[str | None, ...]

MESH_AXES = ("data", "fsdp", "tensor")

# FSDP-style defaults for calibration: every large tensor is split over "fsdp" along one axis and
# over "tensor" along another; token positions are split over every data-parallel device, so the
# [n, tokens, d] activations of a group are never replicated.
#
# FiPS factors: V [n, F, r, p] is split along p over fsdp x tensor, never along r: r comes from the
# budget formula and is rarely divisible (Llama-3.1-8B: 7819), while p is (14336 = 2^11 * 7). With
# V split along p, each device forms its own columns of W = U V locally (U is small and
# replicated along r) and only the minibatch of activations moves, never a [d, p] weight.
DEFAULT_RULES: Rules = (
    ("batch", ("data", "fsdp")),    # calibration windows [N, window]
    ("tokens", ("data", "fsdp")),   # flattened token positions of MLP inputs [n, tokens, d]
    ("length", None),
    ("act_embed", None),            # model width of activations
    ("embed", "fsdp"),
    ("mlp", ("fsdp", "tensor")),    # V, and down kernels [p, d] whose p comes first
    ("mlp", "tensor"),              # gate/up kernels [d, p]: embed took fsdp already
    ("rank", None),
    ("heads", "tensor"),
    ("kv", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),             # per-head q/k norm scales [hd] (Qwen3, Gemma-3): tiny, replicated
    ("vocab", "tensor"),
    ("classes", None),
    ("block", None),
    ("fc", None),
    ("columns", ("data", "fsdp", "tensor")),  # long axis of a group matrix W_s [d, n*F*p]
)

def rules_from_config(rules: Any) -> Rules:
    """Rules from a run config: () means DEFAULT_RULES; lists (as JSON gives them back) become
    tuples. Raises ValueError for an entry that is not (logical name, mesh axes)."""
    if not rules:
        return DEFAULT_RULES
    out = []
    for entry in rules:
        if len(entry) != 2 or not isinstance(entry[0], str):
            raise ValueError(f"sharding rule {entry!r} is not (logical name, mesh axis | [mesh axes] | None)")
        name, axes = entry
        out.append((name, tuple(axes) if isinstance(axes, (list, tuple)) else axes))
    return tuple(out)


U_AXES: LogicalAxes = ("embed", "rank")                 # u: [d, r]
V_AXES: LogicalAxes = ("block", "fc", "rank", "mlp")    # v: [n, F, r, p]
ACTIVATION_AXES: LogicalAxes = ("block", "tokens", "act_embed")  # MLP inputs / targets [n, T, d]
WINDOW_AXES: LogicalAxes = ("batch", "length")          # calibration token windows [N, L]
GROUP_MATRIX_AXES: LogicalAxes = (None, "columns")      # W_s: [d, n*F*p]


# ---------------------------------------------------------------------------------------------
# Processes and meshes
# ---------------------------------------------------------------------------------------------


def distributed_reason(environ: Mapping[str, str] = os.environ) -> str | None:
    """Why this process is one of several (so `jax.distributed.initialize()` must run first),
    or None for a single-process run. Reads only the environment.

    FIPS_DISTRIBUTED=1/0 forces the answer (launch/tpu_pod.sh sets 1 on every worker).
    """
    forced = environ.get("FIPS_DISTRIBUTED", "")
    if forced:
        return "FIPS_DISTRIBUTED=1" if forced not in ("0", "false", "False") else None
    if environ.get("JAX_COORDINATOR_ADDRESS"):
        return f"JAX_COORDINATOR_ADDRESS={environ['JAX_COORDINATOR_ADDRESS']}"
    # Inside `srun` with several tasks; a bare `sbatch` shell (no step node list) is one process.
    if environ.get("SLURM_STEP_NODELIST") and int(environ.get("SLURM_NTASKS", "1")) > 1:
        return f"SLURM job {environ.get('SLURM_JOB_ID', '?')} with {environ['SLURM_NTASKS']} tasks"
    if "," in environ.get("TPU_WORKER_HOSTNAMES", "") or environ.get("MEGASCALE_COORDINATOR_ADDRESS"):
        return "multi-host TPU slice"
    return None


def distributed_kwargs(environ: Mapping[str, str] = os.environ) -> dict[str, Any]:
    """Arguments for `jax.distributed.initialize` that its cluster auto-detection does not find.

    - JAX_NUM_PROCESSES / JAX_PROCESS_ID next to JAX_COORDINATOR_ADDRESS (jax reads only the
      address from the environment).
    - SLURM with one task per node: jax would give each process the single GPU numbered by its
      SLURM_LOCALID; the process drives every GPU of its node instead (SLURM_GPUS_ON_NODE).
    """
    out: dict[str, Any] = {}
    if environ.get("JAX_NUM_PROCESSES"):
        out["num_processes"] = int(environ["JAX_NUM_PROCESSES"])
    if environ.get("JAX_PROCESS_ID"):
        out["process_id"] = int(environ["JAX_PROCESS_ID"])
    one_per_node = environ.get("SLURM_NTASKS_PER_NODE") == "1" or (
        environ.get("SLURM_NTASKS") and environ.get("SLURM_NTASKS") == environ.get("SLURM_NNODES"))
    if one_per_node and environ.get("SLURM_GPUS_ON_NODE") and not environ.get("JAX_LOCAL_DEVICE_IDS"):
        out["local_device_ids"] = list(range(int(environ["SLURM_GPUS_ON_NODE"])))
    return out


def initialize_distributed(environ: Mapping[str, str] = os.environ, log: Callable[[str], None] = print) -> bool:
    """`jax.distributed.initialize()` (cluster auto-detection: SLURM, Cloud TPU, or the
    JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID variables) when the environment
    says there are several processes. Must run before anything touches a device."""
    reason = distributed_reason(environ)
    if reason is None:
        return False
    if not environ.get("JAX_CPU_COLLECTIVES_IMPLEMENTATION"):
        # CPU processes (tests, CPU clusters) need a collectives backend to compute together;
        # accelerators ignore this setting.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(**distributed_kwargs(environ))
    log(f"jax.distributed: process {jax.process_index()}/{jax.process_count()} ({reason}), "
        f"{jax.local_device_count()} local of {jax.device_count()} devices")
    return True


def is_writer() -> bool:
    """True on the one process that writes reports, JSON stages and npz files (process 0).
    Orbax checkpoints are collective: every process calls save/restore."""
    return jax.process_index() == 0


def mesh_shape(axes: Mapping[str, int], n_devices: int) -> dict[str, int]:
    """Axis sizes with a -1 entry filled by the devices left over. Raises ValueError unless the
    product divides `n_devices`."""
    sizes = dict(axes)
    bad = {k: v for k, v in sizes.items() if v != -1 and v < 1}
    if bad:
        raise ValueError(f"mesh axis sizes must be >= 1 or -1 (fill), got {bad}")
    fill = [k for k, v in sizes.items() if v == -1]
    if len(fill) > 1:
        raise ValueError(f"at most one mesh axis may be -1 (fill), got {fill} in {dict(axes)}")
    fixed = math.prod(v for v in sizes.values() if v != -1)
    if n_devices % fixed:
        raise ValueError(f"mesh {dict(axes)} needs a multiple of {fixed} devices, have {n_devices}")
    if fill:
        sizes[fill[0]] = n_devices // fixed
    return sizes


def make_mesh(axes: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh over `devices` (default all of them), e.g. `{"data": 2, "fsdp": 4, "tensor": 1}`.

    -1 fills one axis with the remaining devices. A product smaller than the device count uses
    the first devices (e.g. a 1-device mesh for a comparison run); one that does not divide it is
    a ValueError. Axes are `Auto`: XLA's partitioner places the collectives.
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = mesh_shape(axes, len(devices))
    total = math.prod(sizes.values())
    return jax.make_mesh(tuple(sizes.values()), tuple(sizes), axis_types=(AxisType.Auto,) * len(sizes),
                         devices=devices[:total])


# ---------------------------------------------------------------------------------------------
# Logical axes -> shardings
# ---------------------------------------------------------------------------------------------


def _is_axes(x: Any) -> bool:
    return isinstance(x, PartitionSpec) or (
        isinstance(x, tuple) and all(a is None or isinstance(a, str) for a in x))


def _as_tuple(m: MeshAxes) -> tuple[str, ...]:
    return () if m is None else (m,) if isinstance(m, str) else tuple(m)


def logical_to_spec(axes: LogicalAxes, mesh: Mesh, rules: Rules, shape: Sequence[int] | None = None) -> PartitionSpec:
    """Mesh PartitionSpec of one array from its logical axis names (see the module docstring).

    shape: when given, a candidate is skipped unless its mesh size divides the dimension.
    Raises ValueError for a logical name without a rule or a rule naming an axis not in the mesh.
    """
    axes = tuple(axes)
    if not axes:  # an unannotated param (flax's PartitionSpec()): replicated, whatever its rank
        return PartitionSpec()
    if shape is not None and len(shape) != len(axes):
        raise ValueError(f"logical axes {axes} do not match shape {tuple(shape)}")
    used: set[str] = set()
    out: list[MeshAxes] = []
    for i, name in enumerate(axes):
        chosen: MeshAxes = None
        if name is not None:
            candidates = [m for logical, m in rules if logical == name]
            if not candidates:
                raise ValueError(f"logical axis {name!r} has no sharding rule; rules cover "
                                 f"{sorted({logical for logical, _ in rules})}")
            for m in candidates:
                mesh_axes = _as_tuple(m)
                missing = [a for a in mesh_axes if a not in mesh.shape]
                if missing:
                    raise ValueError(f"rule ({name!r}, {m!r}) names mesh axes {missing} not in the mesh "
                                     f"{dict(mesh.shape)}")
                if used & set(mesh_axes):
                    continue
                if shape is not None and shape[i] % math.prod(mesh.shape[a] for a in mesh_axes):
                    continue
                chosen = m if isinstance(m, str) or m is None else tuple(m)
                used |= set(mesh_axes)
                break
        out.append(chosen)
    return PartitionSpec(*out)


def logical_to_sharding(logical_axes_tree: Any, mesh: Mesh, rules: Rules, shapes: Any = None) -> Any:
    """NamedSharding tree from a tree of logical axis tuples (or flax PartitionSpecs of logical
    names, as `arch.logical_axes()` returns). shapes: optional tree of the same structure whose
    leaves have `.shape` (arrays or ShapeDtypeStructs), to skip non-dividing mesh axes."""
    if shapes is None:
        return jax.tree.map(lambda a: NamedSharding(mesh, logical_to_spec(a, mesh, rules)),
                            logical_axes_tree, is_leaf=_is_axes)
    return jax.tree.map(lambda a, x: NamedSharding(mesh, logical_to_spec(a, mesh, rules, x.shape)),
                        logical_axes_tree, shapes, is_leaf=_is_axes)


def group_logical_axes(params: Mapping[str, Any], fc_names: Sequence[str] = (),
                       transposed: Sequence[bool] = ()) -> dict:
    """Logical axes of one group's trainable params `{"u", "v", "bias"?}` (local_opt layout).

    Biases are `[n, out]`: out is the model width for transposed FCs (fc2/down), else p.
    fc_names, transposed: from the `MlpSpec`; needed only when the params have biases.
    """
    out: dict[str, Any] = {"u": U_AXES, "v": V_AXES}
    if "bias" in params:
        width = dict(zip(fc_names, transposed))
        missing = sorted(set(params["bias"]) - set(width))
        if missing:
            raise ValueError(f"biases {missing} have no entry in fc_names {tuple(fc_names)}")
        out["bias"] = {name: ("block", "embed" if width[name] else "mlp") for name in params["bias"]}
    return out


def group_shardings(params: Mapping[str, Any], mesh: Mesh, rules: Rules, fc_names: Sequence[str] = (),
                    transposed: Sequence[bool] = ()) -> dict:
    """NamedShardings of one group's params (arrays or ShapeDtypeStructs)."""
    return logical_to_sharding(group_logical_axes(params, fc_names, transposed), mesh, rules, params)


def _dict_path(path: tuple) -> tuple[str, ...] | None:
    keys = []
    for k in path:
        if not isinstance(k, jax.tree_util.DictKey):
            return None
        keys.append(str(k.key))
    return tuple(keys)


def shadow_shardings(tree: Any, params: Any, param_shardings: Any) -> Any:
    """Shardings for a tree that shadows `params` (optax state, sparsity masks, gradients).

    A leaf whose key path ends with a param's dict path and whose shape equals that param's
    (`.../mu/v`, `SparseState.masks["v"]`) gets that param's sharding; every other leaf
    (counts, per-leaf target sparsities) is replicated. tree, params: arrays or
    ShapeDtypeStructs (e.g. `jax.eval_shape(tx.init, params)`).
    """
    flat_params = {}
    mesh = None
    for (path, x), sh in zip(jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(param_shardings)):
        mesh = sh.mesh
        keys = _dict_path(path)
        if keys is None:
            raise ValueError(f"params must be nested dicts; got a leaf at {jax.tree_util.keystr(path)}")
        flat_params[keys] = (tuple(x.shape), sh)
    if mesh is None:
        raise ValueError("shadow_shardings needs at least one param")
    replicated = NamedSharding(mesh, PartitionSpec())
    longest = max(len(path) for path in flat_params)

    def pick(path, leaf):
        keys = [str(k.key) if isinstance(k, jax.tree_util.DictKey) else None for k in path]
        for n in range(min(longest, len(keys)), 0, -1):
            suffix = tuple(keys[-n:])
            if None not in suffix and suffix in flat_params and flat_params[suffix][0] == tuple(leaf.shape):
                return flat_params[suffix][1]
        return replicated

    return jax.tree_util.tree_map_with_path(pick, tree)


# ---------------------------------------------------------------------------------------------
# Building and placing sharded arrays
# ---------------------------------------------------------------------------------------------


def sharded_init(fn: Callable, *args, shardings: Any) -> Any:
    """`fn(*args)` computed straight into its shardings: shapes first (`jax.eval_shape`), then
    `jax.jit(fn, out_shardings=...)`, so no device ever holds the whole output.

    shardings: a tree matching fn's output, or a function from the abstract output
    (ShapeDtypeStructs) to that tree (e.g. `lambda a: shadow_shardings(a, params, param_sh)`).
    """
    abstract = jax.eval_shape(fn, *args)
    out = shardings(abstract) if callable(shardings) else shardings
    return jax.jit(fn, out_shardings=out)(*args)


def put(array: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """A host array as a global jax.Array with `sharding`, each device receiving only its own
    slice. Works with several processes as long as each holds the same host array (or one
    that agrees on the slices its devices need)."""
    array = np.asarray(array)
    return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])


def place_fn(mesh: Mesh, rules: Rules, logical_axes: Any) -> Callable[[str, np.ndarray], jax.Array]:
    """A `place(path, array)` for `hf.checkpoint.load_pretrained(place=...)` (and `load_gguf`):
    each converted tensor goes straight onto its sharding, one tensor at a time, so the whole
    model never sits on one device. logical_axes: `arch.logical_axes()`."""
    flat = {}
    for path, axes in jax.tree_util.tree_leaves_with_path(logical_axes, is_leaf=_is_axes):
        flat["/".join(_dict_path(path) or ())] = tuple(axes)

    def place(path: str, array: np.ndarray) -> jax.Array:
        if path not in flat:
            raise ValueError(f"no logical axes for {path!r}; the model declares {len(flat)} params "
                             f"(e.g. {sorted(flat)[:3]})")
        return put(array, NamedSharding(mesh, logical_to_spec(flat[path], mesh, rules, array.shape)))

    return place


def _nbytes(x: Any) -> int:
    return int(math.prod(x.shape)) * np.dtype(x.dtype).itemsize


def check_replication(tree: Any, max_replicated_bytes: int, *, top: int = 5) -> int:
    """Total bytes of fully replicated leaves (arrays or ShapeDtypeStructs with a sharding);
    raises ValueError naming the `top` largest of them when the total exceeds the limit.

    Meant for multi-device runs: on one device every array counts as replicated. Leaves without
    a sharding (numpy arrays on the host) are skipped.
    """
    found = []
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        sh = getattr(leaf, "sharding", None)
        if sh is not None and sh.is_fully_replicated:
            found.append((_nbytes(leaf), jax.tree_util.keystr(path), tuple(leaf.shape), np.dtype(leaf.dtype).name))
    total = sum(b for b, *_ in found)
    if total > max_replicated_bytes:
        found.sort(reverse=True)
        worst = "; ".join(f"{p} {list(s)} {d} {b / 2**20:.1f} MiB" for b, p, s, d in found[:top])
        raise ValueError(
            f"{total / 2**20:.1f} MiB of the tree is replicated on every device (limit "
            f"{max_replicated_bytes / 2**20:.1f} MiB); largest: {worst}. Add a sharding rule for their "
            "logical axes or a mesh axis size that divides them")
    return total


def per_device_bytes(shape: Sequence[int], dtype: Any, sharding: NamedSharding) -> int:
    """Bytes one device holds of an array with this shape and sharding."""
    return int(math.prod(sharding.shard_shape(tuple(shape)))) * np.dtype(dtype).itemsize


class HostCopy:
    """The device arrays of some pytrees moved to host memory, or to files, and back
    (`local.offload_model`).

    `HostCopy(trees)` copies every distinct jax.Array leaf of `trees`, shard by shard (each
    process only its addressable shards, a replicated shard once per index), and frees its device
    buffers: the arrays themselves are deleted, so every other reference to them is dead until
    `restore()`. `restore()` puts each back with its sharding and returns `trees` with the new
    arrays; leaves shared between trees (or within one) stay shared. Non-array leaves pass through.

    directory: write the shards there as raw files instead of keeping them in host memory (read
    back through a file mapping, deleted by `restore`). On a CPU backend the device memory is host
    memory, and only files free it.
    """

    def __init__(self, trees: Sequence[Any], directory: str | None = None):
        self.trees, self.directory = list(trees), directory
        self._saved: dict[int, tuple[tuple[int, ...], Any, dict]] = {}
        if directory is not None:
            os.makedirs(directory, exist_ok=True)
        for tree in self.trees:
            for leaf in jax.tree_util.tree_leaves(tree):
                if isinstance(leaf, jax.Array) and id(leaf) not in self._saved:
                    by_index: dict = {}
                    for shard in leaf.addressable_shards:
                        key = _index_key(shard.index)
                        if key not in by_index:
                            by_index[key] = self._keep(np.asarray(shard.data))
                    self._saved[id(leaf)] = (leaf.shape, leaf.sharding, by_index)
        for tree in self.trees:
            for leaf in jax.tree_util.tree_leaves(tree):
                if isinstance(leaf, jax.Array) and not leaf.is_deleted():
                    leaf.delete()
        self.nbytes = sum(_nbytes(a if isinstance(a, np.ndarray) else a[1])
                          for _, _, by in self._saved.values() for a in by.values())

    def _keep(self, a: np.ndarray) -> Any:
        """`a` itself, or (the raw file it was written to, its shape and dtype)."""
        if self.directory is None:
            return a
        path = os.path.join(self.directory, f"{len(os.listdir(self.directory)):05d}.bin")
        a = np.ascontiguousarray(a)
        with open(path, "wb") as f:
            f.write(a.reshape(-1).view(np.uint8).data)
        return path, jax.ShapeDtypeStruct(a.shape, a.dtype)

    @staticmethod
    def _read(kept: Any) -> np.ndarray:
        if isinstance(kept, np.ndarray):
            return kept
        path, like = kept
        if not math.prod(like.shape):
            return np.zeros(like.shape, like.dtype)
        return np.memmap(path, dtype=np.uint8, mode="r").view(like.dtype).reshape(like.shape)

    def restore(self) -> list[Any]:
        new: dict[int, jax.Array] = {}
        for key, (shape, sh, by_index) in self._saved.items():
            idx = sh.addressable_devices_indices_map(shape)
            shards = []
            for dev, i in idx.items():
                host = self._read(by_index[_index_key(i)])
                shards.append(jax.device_put(np.array(host) if isinstance(host, np.memmap) else host, dev))
                del host
            new[key] = jax.make_array_from_single_device_arrays(shape, sh, shards)
        self._saved = {}
        if self.directory is not None:
            shutil.rmtree(self.directory, ignore_errors=True)
        return [jax.tree_util.tree_map(lambda leaf: new.get(id(leaf), leaf), tree) for tree in self.trees]


def _index_key(index: tuple) -> tuple:
    """A shard's index (a tuple of slices) as a hashable key."""
    return tuple((s.start, s.stop, s.step) if isinstance(s, slice) else s for s in index)


# ---------------------------------------------------------------------------------------------
# Rows split over processes (the teacher's capture on several hosts)
# ---------------------------------------------------------------------------------------------
#
# With several processes, each holds its own slice of the calibration windows (and of the MLP
# inputs and targets they give) on its host; nothing holds all of them. A device computation on
# them takes a global array whose `axis` is split over every device of the mesh, each process's
# devices holding that process's rows, one contiguous block of them: its "slot". The blocks
# follow the mesh's device order, which on every cluster we know is the processes' order, but
# the slot is read from the sharding rather than assumed.


def multi_process() -> bool:
    """Whether this run has several processes (each with its own share of the calibration data)."""
    return jax.process_count() > 1


def replicated(mesh: Mesh) -> NamedSharding:
    """Every device holds the whole array: what every process can read back whole."""
    return NamedSharding(mesh, PartitionSpec())


def rows_sharding(mesh: Mesh, ndim: int, axis: int = 0) -> NamedSharding:
    """`axis` of an ndim-array split over every device of `mesh` (all mesh axes, in order)."""
    spec = [None] * ndim
    spec[axis] = tuple(mesh.axis_names)
    return NamedSharding(mesh, PartitionSpec(*spec))


def local_devices(mesh: Mesh) -> int:
    """How many of the mesh's devices belong to this process."""
    return sum(d.process_index == jax.process_index() for d in mesh.devices.flat)


def process_slot(mesh: Mesh) -> int:
    """Which contiguous block of rows this process's devices hold under `rows_sharding` (0 ..
    processes - 1). Raises ValueError when they do not hold one contiguous block."""
    n_local = local_devices(mesh)
    if n_local == 0 or mesh.size % n_local:
        raise ValueError(f"process {jax.process_index()} holds {n_local} of the mesh's {mesh.size} devices; "
                         "splitting calibration data over processes needs the same number on each")
    starts = sorted(i[0].start or 0 for i in rows_sharding(mesh, 1).addressable_devices_indices_map(
        (mesh.size,)).values())
    if starts != list(range(starts[0], starts[0] + n_local)) or starts[0] % n_local:
        raise ValueError(f"process {jax.process_index()}'s devices are not one contiguous block of the mesh "
                         f"(rows {starts}); order the mesh's devices by process")
    return starts[0] // n_local


def process_share(n: int, mesh: Mesh, what: str = "rows") -> slice:
    """This process's contiguous share of n rows (n a multiple of the process count, else a
    ValueError naming `what`)."""
    p = jax.process_count()
    if n % p:
        raise ValueError(f"{what}: {n} do not split evenly over {p} processes; use a multiple of {p}")
    k = process_slot(mesh)
    return slice(k * (n // p), (k + 1) * (n // p))


def from_process_rows(local: np.ndarray, mesh: Mesh, axis: int = 0) -> jax.Array:
    """The global array whose `axis` is every process's `local` rows, in slot order. Every
    process passes the same shape; its rows must split evenly over its devices."""
    local = np.asarray(local)
    n_local = local_devices(mesh)
    if local.shape[axis] % n_local:
        raise ValueError(f"{local.shape[axis]} rows along axis {axis} do not split over this process's "
                         f"{n_local} devices")
    shape = list(local.shape)
    shape[axis] *= jax.process_count()
    return jax.make_array_from_process_local_data(rows_sharding(mesh, local.ndim, axis), local, tuple(shape))


def process_rows(x: jax.Array, axis: int = 0) -> np.ndarray:
    """This process's rows of a global array split along `axis` as `rows_sharding` splits it: its
    addressable shards in order, one copy of each."""
    by_start = {}
    for s in x.addressable_shards:
        by_start.setdefault(s.index[axis].start or 0, s)
    return np.concatenate([np.asarray(by_start[k].data) for k in sorted(by_start)], axis=axis)


def gather_process_rows(local: np.ndarray, mesh: Mesh, axis: int = 0) -> np.ndarray:
    """Every process's `local` rows concatenated along `axis` in slot order, on every process
    (collective). One process: `local` itself."""
    if not multi_process():
        return local
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel

    parts = np.asarray(multihost_utils.process_allgather(np.asarray(local), tiled=False))
    slots = np.asarray(multihost_utils.process_allgather(np.int32(process_slot(mesh)))).reshape(-1)
    order = np.argsort(slots)
    return np.concatenate([parts[i] for i in order], axis=axis)


def to_host(x: Any) -> np.ndarray:
    """A whole numpy copy of x on this process: a host array as it is, a jax array this process
    can read (its own, or replicated) directly, one split over several processes gathered from
    them (a collective: every process must call it for the same array)."""
    if not isinstance(x, jax.Array) or x.is_fully_addressable or x.is_fully_replicated:
        return np.asarray(x)
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
