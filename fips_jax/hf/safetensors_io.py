"""Lazy safetensors reading and writing with numpy, bf16 included.

Writes are atomic: one file via a temp file renamed into place, a checkpoint folder via a temp
folder renamed into place (`save_checkpoint`).

File format (https://github.com/huggingface/safetensors): an 8-byte little-endian header length
N, N bytes of JSON `{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {}}`,
then the raw little-endian tensor bytes (offsets relative to the end of the header).

The header is parsed and checked against the file size when a reader opens, so a truncated or
corrupt file fails before any tensor is loaded; tensor bytes are read one tensor at a time.
bf16 goes through `ml_dtypes.bfloat16` (the dtype jax itself uses), which `safetensors.numpy`
cannot produce.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from typing import Iterable, Iterator, Mapping

import ml_dtypes
import numpy as np

from fips_jax import checkpointing

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("bool"),
}
_NAMES = {v: k for k, v in _DTYPES.items()}
_MAX_HEADER = 100 * 1024 * 1024  # the reference implementation's own limit


def _read_header(path: str) -> tuple[int, dict]:
    """(data section start, tensor table) of one .safetensors file, validated against its size."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise ValueError(f"{path}: truncated safetensors file ({size} bytes, no header length)")
        (n,) = struct.unpack("<Q", raw)
        if n > min(_MAX_HEADER, size - 8):
            raise ValueError(f"{path}: corrupt or truncated safetensors file (header of {n} bytes, file has {size})")
        try:
            table = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: corrupt safetensors header ({e})") from None
    table.pop("__metadata__", None)
    data_size = size - 8 - n
    for name, info in table.items():
        if info.get("dtype") not in _DTYPES:
            raise ValueError(f"{path}: tensor {name!r} has unsupported dtype {info.get('dtype')!r}")
        begin, end = info["data_offsets"]
        want = int(np.prod(info["shape"], dtype=np.int64)) * _DTYPES[info["dtype"]].itemsize
        if end - begin != want:
            raise ValueError(f"{path}: tensor {name!r} spans {end - begin} bytes, shape {info['shape']} needs {want}")
        if end > data_size:
            raise ValueError(
                f"{path}: truncated safetensors file: tensor {name!r} ends at byte {end} of the data "
                f"section but only {data_size} bytes are present"
            )
    return 8 + n, table


class SafetensorsReader:
    """Tensors of a checkpoint folder (`model.safetensors` or a sharded index), read lazily.

    `path` may be a folder, a `.safetensors` file, or a `*.safetensors.index.json`.
    All headers are validated on construction; `get` reads one tensor's bytes.
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
        self._where: dict[str, tuple[str, int, dict]] = {}
        for file in files:
            start, table = _read_header(file)
            for name, info in table.items():
                self._where[name] = (file, start, info)
        if path.endswith(".json"):
            self._check_index(path)

    def _files_from_index(self, index_path: str) -> list[str]:
        try:
            with open(index_path) as f:
                self._weight_map = json.load(f)["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise ValueError(f"{index_path}: corrupt safetensors index ({e!r})") from None
        folder = os.path.dirname(index_path)
        files = sorted(set(self._weight_map.values()))
        missing = [f for f in files if not os.path.exists(os.path.join(folder, f))]
        if missing:
            raise ValueError(f"{index_path}: shard files missing: {missing}")
        return [os.path.join(folder, f) for f in files]

    def _check_index(self, index_path: str) -> None:
        folder = os.path.dirname(index_path)
        def found(k):
            return os.path.basename(self._where[k][0]) if k in self._where else "no shard"

        wrong = [
            f"{k!r} (index says {v}, found in {found(k)})"
            for k, v in self._weight_map.items()
            if k not in self._where or self._where[k][0] != os.path.join(folder, v)
        ]
        if wrong:
            raise ValueError(f"{index_path}: index does not match the shards: {', '.join(wrong)}")

    def keys(self) -> list[str]:
        return sorted(self._where)

    def __contains__(self, key: str) -> bool:
        return key in self._where

    def __len__(self) -> int:
        return len(self._where)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._where[key][2]["shape"])

    def dtype_name(self, key: str) -> str:
        """The stored safetensors dtype, e.g. "BF16"."""
        return self._where[key][2]["dtype"]

    def get(self, key: str, dtype: np.dtype | type | None = np.float32) -> np.ndarray:
        """One tensor as a numpy array (torch layout), cast to `dtype` (None: stored dtype)."""
        if key not in self._where:
            raise KeyError(f"{key!r} not in {self.source}")
        file, start, info = self._where[key]
        begin, end = info["data_offsets"]
        with open(file, "rb") as f:
            f.seek(start + begin)
            raw = f.read(end - begin)
        if len(raw) != end - begin:  # the file shrank since the header was checked
            raise ValueError(f"{file}: truncated while reading {key!r}")
        arr = np.frombuffer(raw, dtype=_DTYPES[info["dtype"]]).reshape(info["shape"])
        return arr.copy() if dtype is None else arr.astype(dtype)


def _dtype_name(arr: np.ndarray) -> str:
    name = _NAMES.get(arr.dtype.newbyteorder("<"))
    if name is None:
        raise ValueError(f"dtype {arr.dtype} cannot be stored in safetensors")
    return name


def write_file(path: str, tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None = None) -> None:
    """Write one .safetensors file atomically (a temp file, fsynced, renamed into place)."""
    header: dict = {"__metadata__": dict(metadata or {"format": "pt"})}
    arrays, offset = [], 0
    for name, arr in tensors.items():
        arr = np.ascontiguousarray(arr)
        dtype = _dtype_name(arr)
        arr = arr.astype(arr.dtype.newbyteorder("<"), copy=False)
        header[name] = {"dtype": dtype, "shape": list(arr.shape), "data_offsets": [offset, offset + arr.nbytes]}
        arrays.append(arr)
        offset += arr.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # tensors start 8-byte aligned, as the reference writer does
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for arr in arrays:
            f.write(arr.tobytes())
        f.flush()
        os.fsync(f.fileno())
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
