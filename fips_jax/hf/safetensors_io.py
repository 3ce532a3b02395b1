"""Lazy, validated reading and atomic writing of (sharded) safetensors checkpoints, bf16 included.

Tensor bytes go through the `safetensors` package: `safe_open(framework="numpy")` memory-maps a
file and returns one tensor (bf16 as `ml_dtypes.bfloat16`, the dtype jax itself uses), and
`safetensors.numpy.save_file` writes. A reader maps the file anew for each tensor, so the pages
of tensors already read do not stay resident (mapped, they would count in RSS up to the
checkpoint's size); that costs a header parse per tensor (~0.5 ms). This module adds what HF-layout checkpoints need around
it: the sharded layout (`model.safetensors.index.json` naming a shard per tensor), atomic writes
(one file via a temp file renamed into place, a checkpoint folder via a temp folder renamed into
place: `save_checkpoint`), and errors that name the file and the tensor.

A file is checked when a reader opens it, so a truncated or corrupt file fails before any tensor
is loaded. The package makes the checks (dtype, shape x dtype size = byte count, tensors tiling
the data section exactly: no gap, overlap or trailing bytes); when it refuses a file,
`_explain_refusal` re-reads the header to say which tensor is wrong and how. One check is this
module's own: a tensor named twice in a header (the package keeps the last entry silently).
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from typing import Iterable, Iterator, Mapping

import ml_dtypes  # registers bfloat16 with numpy, which `safetensors.numpy` needs for BF16
import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from fips_jax import checkpointing

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
_MAX_HEADER = 100 * 1024 * 1024  # the package's own limit
# What write_file stores (any byte order): the dtypes HF checkpoints use.
_STORABLE = frozenset(np.dtype(t) for t in ("f8", "f4", "f2", ml_dtypes.bfloat16, "i8", "i4", "i2", "i1", "u1", "bool"))


def _no_duplicate_keys(pairs: list[tuple[str, object]]) -> dict:
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        dup = next(k for k in keys if keys.count(k) > 1)
        raise ValueError(f"key {dup!r} appears twice")
    return dict(pairs)


def _read_table(path: str) -> dict:
    """{tensor name: {"dtype", "shape", "data_offsets"}} of one file's JSON header (the
    `__metadata__` entry dropped). Refuses a truncated or non-JSON header and a name given twice."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        raw = f.read(8)  # the header length, little-endian u64
        if len(raw) < 8:
            raise ValueError(f"{path}: truncated safetensors file ({size} bytes, no header length)")
        (n,) = struct.unpack("<Q", raw)
        if n > min(_MAX_HEADER, size - 8):
            raise ValueError(f"{path}: corrupt or truncated safetensors file (header of {n} bytes, file has {size})")
        try:
            table = json.loads(f.read(n), object_pairs_hook=_no_duplicate_keys)
        except ValueError as e:  # bad UTF-8, bad JSON, a name twice
            raise ValueError(f"{path}: corrupt safetensors header ({e})") from None
    if not isinstance(table, dict):
        raise ValueError(f"{path}: corrupt safetensors header (a JSON {type(table).__name__}, not an object)")
    table.pop("__metadata__", None)
    return table


def _check_entry(path: str, name: str, info: object) -> tuple[int, int]:
    """(begin, end) of one header entry, after checking its dtype, shape and byte count."""
    if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= set(info):
        raise ValueError(f"{path}: tensor {name!r} has a malformed header entry {info!r}")
    shape, offsets = info["shape"], info["data_offsets"]
    # bool is an int subclass in Python, and neither true nor 2.0 is a dimension.
    is_count = lambda x: isinstance(x, int) and not isinstance(x, bool) and x >= 0  # noqa: E731
    if not isinstance(shape, list) or not all(is_count(d) for d in shape):
        raise ValueError(f"{path}: tensor {name!r} has shape {shape!r}; dims must be integers >= 0")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(is_count(o) for o in offsets):
        raise ValueError(f"{path}: tensor {name!r} has data_offsets {offsets!r}; expected [begin, end], integers >= 0")
    begin, end = offsets
    if begin > end:
        raise ValueError(f"{path}: tensor {name!r} has data_offsets [{begin}, {end}] with begin > end")
    want = _ITEMSIZE.get(info["dtype"])
    if want is not None:  # other dtypes: the package's own message
        for d in shape:  # Python ints: no overflow however large the dims
            want *= d
        if end - begin != want:
            raise ValueError(f"{path}: tensor {name!r} spans {end - begin} bytes, shape {shape} {info['dtype']} needs {want}")
    return begin, end


def _explain_refusal(path: str, table: dict) -> None:
    """Raise a ValueError naming the tensor that made the package refuse `path`, if one does.

    The package says which rule broke ("invalid offset for tensor `b`", "file not fully covered")
    but not where; this walks the same rules over the header: every entry well formed, and the
    tensors, sorted by offset, tiling the data section exactly to the end of the file.
    """
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))  # `_read_table` checked it
    data_size = os.path.getsize(path) - 8 - n
    spans = []
    for name, info in table.items():
        begin, end = _check_entry(path, name, info)
        if end > data_size:
            raise ValueError(
                f"{path}: truncated safetensors file: tensor {name!r} ends at byte {end} of the data "
                f"section but only {data_size} bytes are present"
            )
        spans.append((begin, end, name))
    spans.sort()
    pos, prev = 0, None
    for begin, end, name in spans:
        if begin < pos:
            raise ValueError(f"{path}: tensor {name!r} at bytes [{begin}, {end}) overlaps tensor {prev!r} (ends at {pos})")
        if begin > pos:
            after = f"after tensor {prev!r}" if prev is not None else "before the first tensor"
            raise ValueError(f"{path}: tensor {name!r} starts at byte {begin}, leaving a gap of {begin - pos} bytes {after}")
        pos, prev = end, name
    if pos != data_size:
        last = f"tensor {prev!r} ends" if prev is not None else "no tensor: data ends"
        raise ValueError(f"{path}: {data_size - pos} trailing bytes in the data section ({last} at byte {pos} of {data_size})")


def _checked_table(path: str) -> dict:
    """The header table of one file that the package opens; any refusal is a ValueError naming `path`."""
    table = _read_table(path)
    try:
        with safe_open(path, framework="numpy"):
            return table
    except SafetensorError as e:
        _explain_refusal(path, table)
        raise ValueError(f"{path}: corrupt safetensors file ({e})") from None


class SafetensorsReader:
    """Tensors of a checkpoint folder (`model.safetensors` or a sharded index), read lazily.

    `path` may be a folder, a `.safetensors` file, or a `*.safetensors.index.json`.
    Every file is opened and checked on construction; `get` maps the file and reads one tensor.
    """

    def __init__(self, path: str):
        path = os.fspath(path)
        if os.path.isdir(path):
            if os.path.exists(os.path.join(path, INDEX_FILE)):
                path = os.path.join(path, INDEX_FILE)
            elif os.path.exists(os.path.join(path, SINGLE_FILE)):
                path = os.path.join(path, SINGLE_FILE)
            else:
                raise ValueError(f"{path}: no {SINGLE_FILE} or {INDEX_FILE}")
        self.source = path
        if path.endswith(".json"):
            files = self._files_from_index(path)
        else:
            files = [path]
        self._where: dict[str, tuple[str, dict]] = {}  # name -> (file, header entry)
        for file in files:
            for name, info in _checked_table(file).items():
                if name in self._where:
                    raise ValueError(f"{file}: tensor {name!r} is also in {self._where[name][0]}")
                self._where[name] = (file, info)
        if path.endswith(".json"):
            self._check_index(path)

    def _files_from_index(self, index_path: str) -> list[str]:
        try:
            with open(index_path) as f:
                self._weight_map = json.load(f)["weight_map"]
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{index_path}: corrupt safetensors index ({e!r})") from None
        if not isinstance(self._weight_map, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in self._weight_map.items()
        ):
            raise ValueError(f"{index_path}: corrupt safetensors index (weight_map is not {{tensor: shard file}})")
        folder = os.path.dirname(index_path)
        files = sorted(set(self._weight_map.values()))
        missing = [f for f in files if not os.path.isfile(os.path.join(folder, f))]
        if missing:
            names = sorted(k for k, v in self._weight_map.items() if v == missing[0])
            more = f" and {len(names) - 3} more" if len(names) > 3 else ""
            raise ValueError(
                f"{index_path}: shard files missing: {missing}; {missing[0]} should hold tensors "
                f"{', '.join(map(repr, names[:3]))}{more}"
            )
        return [os.path.join(folder, f) for f in files]

    def _check_index(self, index_path: str) -> None:
        """Every tensor the index names is in the shard it names. (A shard may hold tensors the
        index leaves out: they are still readable, as with `safetensors.safe_open` on the shard.)"""
        folder = os.path.dirname(index_path)
        def found(k):
            return os.path.basename(self._where[k][0]) if k in self._where else "no shard"

        wrong = [
            f"{k!r} (index says {v}, found in {found(k)})"
            for k, v in self._weight_map.items()
            if k not in self._where or self._where[k][0] != os.path.join(folder, v)
        ]
        if wrong:
            more = f" and {len(wrong) - 10} more" if len(wrong) > 10 else ""
            raise ValueError(f"{index_path}: index does not match the shards: {', '.join(wrong[:10])}{more}")

    def keys(self) -> list[str]:
        return sorted(self._where)

    def __contains__(self, key: str) -> bool:
        return key in self._where

    def __len__(self) -> int:
        return len(self._where)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._where[key][1]["shape"])

    def dtype_name(self, key: str) -> str:
        """The stored safetensors dtype, e.g. "BF16"."""
        return self._where[key][1]["dtype"]

    def get(self, key: str, dtype: np.dtype | type | None = np.float32) -> np.ndarray:
        """One tensor as a numpy array (torch layout), cast to `dtype` (None: stored dtype)."""
        if key not in self._where:
            raise KeyError(f"{key!r} not in {self.source}")
        file = self._where[key][0]
        try:
            # Mapped for this one tensor: a handle held open across a load would keep every page
            # read so far resident (page cache, but counted in RSS, up to the checkpoint's size).
            with safe_open(file, framework="numpy") as f:
                arr = f.get_tensor(key)  # a fresh array: the mapped bytes, copied
        except SafetensorError as e:
            raise ValueError(f"{file}: cannot read {key!r} ({e})") from None
        return arr if dtype is None else arr.astype(dtype)


def write_file(path: str, tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None = None) -> None:
    """Write one .safetensors file atomically (a temp file, fsynced, renamed into place).

    Tensors are stored in the package's order (by dtype alignment, then name), not the dict's.
    Raises ValueError for a dtype outside f64/f32/f16/bf16/i64/i32/i16/i8/u8/bool."""
    arrays = {}
    for name, arr in tensors.items():
        arr = np.ascontiguousarray(arr)  # the package writes the raw buffer: it must be dense
        if arr.dtype.newbyteorder("=") not in _STORABLE:
            raise ValueError(f"dtype {arr.dtype} cannot be stored in safetensors")
        arrays[name] = arr
    tmp = f"{path}.tmp"
    save_file(arrays, tmp, metadata=dict(metadata or {"format": "pt"}))
    checkpointing.fsync_file(tmp)
    os.replace(tmp, path)
    checkpointing.fsync_dir(os.path.dirname(os.path.abspath(path)))


def _shards(items: list[tuple[str, np.ndarray]], max_bytes: int) -> Iterator[list[tuple[str, np.ndarray]]]:
    shard, size = [], 0
    for name, arr in items:
        if shard and size + arr.nbytes > max_bytes:
            yield shard
            shard, size = [], 0
        shard.append((name, arr))
        size += arr.nbytes
    if shard:
        yield shard


def _is_checkpoint_file(name: str) -> bool:
    return name == INDEX_FILE or (name.startswith("model") and name.endswith(".safetensors"))


def _keep_others(old_dir: str, new_dir: str, replaced: Iterable[str]) -> None:
    """Hard-link (or copy) every entry of `old_dir` that the new checkpoint does not replace
    (tokenizer files and the like) into `new_dir`."""
    replaced = set(replaced)
    for name in os.listdir(old_dir):
        if _is_checkpoint_file(name) or name in replaced:
            continue
        src, dst = os.path.join(old_dir, name), os.path.join(new_dir, name)
        if os.path.isdir(src) and not os.path.islink(src):
            shutil.copytree(src, dst, symlinks=True, copy_function=_link_or_copy)
        else:
            _link_or_copy(src, dst)


def _link_or_copy(src: str, dst: str) -> None:
    if os.path.islink(src):
        os.symlink(os.readlink(src), dst)
        return
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def save_checkpoint(
    out_dir: str, tensors: Iterable[tuple[str, np.ndarray]], max_shard_bytes: int | None = None,
    extra_files: Mapping[str, bytes] | None = None,
) -> list[str]:
    """Write tensors in HF layout: `model.safetensors`, or when they exceed `max_shard_bytes`,
    `model-0000i-of-0000n.safetensors` shards plus `model.safetensors.index.json`, and
    `extra_files` ({name: bytes}, e.g. config.json) beside them.

    Returns the file names written. The folder appears whole or not at all: it is built in a
    temp folder next to `out_dir` and renamed into place, an existing `out_dir` renamed aside
    first and removed after (so a crash at any point leaves the old checkpoint or the new one,
    whole). Files of the old folder that are not weights (tokenizer, ...) are carried over; old
    weight files of either layout are not, so loaders never pick up a stale checkpoint.
    """
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ValueError(f"{out_dir} is a file, not a checkpoint folder")
    items = [(k, np.asarray(v)) for k, v in tensors]
    total = sum(a.nbytes for _, a in items)
    extra = dict(extra_files or {})
    with checkpointing.atomic_dir(out_dir) as tmp:
        if max_shard_bytes is None or total <= max_shard_bytes:
            write_file(os.path.join(tmp, SINGLE_FILE), dict(items))
            names = [SINGLE_FILE]
        else:
            shards = list(_shards(items, max_shard_bytes))
            names, weight_map = [], {}
            for i, shard in enumerate(shards):
                name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                write_file(os.path.join(tmp, name), dict(shard))
                checkpointing.fault_point("safetensors_shard")
                names.append(name)
                weight_map.update({k: name for k, _ in shard})
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            extra = {INDEX_FILE: json.dumps(index, indent=2).encode(), **extra}
        for name, data in extra.items():  # plain writes: the folder as a whole is renamed into place
            with open(os.path.join(tmp, name), "wb") as f:
                f.write(data)
        if os.path.isdir(out_dir):
            _keep_others(out_dir, tmp, extra)
    return names + list(extra)
