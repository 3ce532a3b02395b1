"""Checkpoint <-> flax param conversion driven by per-architecture name maps.

A key map is a list of `KeyMapEntry(flax_path, hf_key, transform)`; the transform is the name of
a small reversible layout change (torch `Linear.weight` is `[out, in]`, a flax kernel `[in, out]`).
Loading checks every name and shape against the model *before* reading any tensor data, collects
every problem, and raises one ValueError listing them all; tensors are then read one at a time.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Iterator, Mapping, NamedTuple, Protocol, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

Shape = tuple[int, ...]


class TensorSource(Protocol):
    """What `load_params` reads from: safetensors, or GGUF viewed under HF names."""

    source: str

    def keys(self) -> list[str]: ...

    def shape(self, key: str) -> Shape: ...

    def get(self, key: str, dtype: Any = np.float32) -> np.ndarray: ...


@dataclasses.dataclass(frozen=True)
class Transform:
    """A reversible layout change between an HF tensor and a flax param.

    to_flax(hf_array, flax_shape) -> flax array; to_hf(flax_array) -> hf array;
    hf_shape(flax_shape) -> the HF shape this param must have (checked before reading data).
    """

    to_flax: Callable[[np.ndarray, Shape], np.ndarray]
    to_hf: Callable[[np.ndarray], np.ndarray]
    hf_shape: Callable[[Shape], Shape]


TRANSFORMS: dict[str, Transform] = {
    "identity": Transform(lambda a, s: a, lambda a: a, lambda s: tuple(s)),
    # torch Linear [out, in] <-> flax Dense [in, out]
    "transpose": Transform(lambda a, s: a.T, lambda a: a.T, lambda s: tuple(s)[::-1]),
    # torch Conv2d [out, in, kh, kw] <-> flax Conv [kh, kw, in, out]
    "conv": Transform(
        lambda a, s: a.transpose(2, 3, 1, 0), lambda a: a.transpose(3, 2, 0, 1), lambda s: (s[3], s[2], s[0], s[1])
    ),
    # torch Linear [H*hd, d] <-> flax DenseGeneral [d, H, hd] (per-head q/k/v kernels)
    "heads_in": Transform(
        lambda a, s: a.T.reshape(s), lambda a: a.reshape(a.shape[0], -1).T, lambda s: (int(np.prod(s[1:])), s[0])
    ),
    # torch Linear [d, H*hd] <-> flax DenseGeneral [H, hd, d] (per-head output projection)
    "heads_out": Transform(
        lambda a, s: a.T.reshape(s), lambda a: a.reshape(-1, a.shape[-1]).T, lambda s: (s[-1], int(np.prod(s[:-1])))
    ),
    # torch bias [H*hd] <-> flax [H, hd]
    "heads_bias": Transform(lambda a, s: a.reshape(s), lambda a: a.reshape(-1), lambda s: (int(np.prod(s)),)),
}


class KeyMapEntry(NamedTuple):
    """One param: flax path (slash-joined), checkpoint key, and a `TRANSFORMS` name.

    A plain `(flax_path, hf_key, transform)` tuple is an equally valid entry.
    """

    flax_path: str
    hf_key: str
    transform: str = "identity"


def expected_shapes(init_fn: Callable[[jax.Array], Any]) -> dict[str, Shape]:
    """{flax path: shape} of `init_fn(rng)`'s params, without allocating them."""
    shapes = jax.eval_shape(init_fn, jax.random.key(0))
    return {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(shapes, sep="/").items()}


def check_key_map(
    source: TensorSource,
    key_map: Sequence[KeyMapEntry],
    shapes: Mapping[str, Shape],
    ignore: Sequence[str] = (),
) -> list[str]:
    """Every mismatch between checkpoint, key map and model, as readable lines (empty: all good).

    ignore: regexes of checkpoint keys that may be present but are not used (e.g. a tied
      `lm_head.weight`, rotary buffers).
    """
    key_map = [KeyMapEntry(*e) for e in key_map]
    bad = [e for e in key_map if e.transform not in TRANSFORMS]
    if bad:
        return [f"{e.flax_path}: transform {e.transform!r} not in {sorted(TRANSFORMS)}" for e in bad]
    problems = []
    mapped = {e.flax_path for e in key_map}
    problems += [f"no checkpoint key maps to param {path} {shapes[path]}" for path in sorted(set(shapes) - mapped)]
    keys = set(source.keys())
    for e in key_map:
        if e.flax_path not in shapes:
            problems.append(f"key map names {e.flax_path!r} (from {e.hf_key!r}), which the model does not have")
            continue
        want = TRANSFORMS[e.transform].hf_shape(shapes[e.flax_path])
        if e.hf_key not in keys:
            problems.append(f"missing tensor {e.hf_key!r} (for {e.flax_path}, expected shape {want})")
        elif source.shape(e.hf_key) != want:
            problems.append(
                f"tensor {e.hf_key!r} (for {e.flax_path}) has shape {source.shape(e.hf_key)}, expected {want}"
            )
    used = {e.hf_key for e in key_map}
    for k in sorted(keys - used):
        if not any(re.search(pattern, k) for pattern in ignore):
            problems.append(f"unexpected tensor {k!r} with shape {source.shape(k)}")
    return problems


def load_params(
    source: TensorSource,
    key_map: Sequence[KeyMapEntry],
    shapes: Mapping[str, Shape],
    dtype: Any = jnp.float32,
    ignore: Sequence[str] = (),
    place: Callable[[str, np.ndarray], Any] | None = None,
) -> dict[str, Any]:
    """Nested flax params read from `source` through `key_map`.

    shapes: {flax path: shape} the model expects (see `expected_shapes`).
    place(path, array) puts one converted numpy array where it belongs (default `jnp.asarray`;
      pass a sharded `jax.device_put` to never hold the whole model on one device).
    Raises ValueError listing every missing, unexpected and mis-shaped tensor.
    """
    problems = check_key_map(source, key_map, shapes, ignore)
    if problems:
        raise ValueError(f"checkpoint {source.source} does not match the model:\n  - " + "\n  - ".join(problems))
    key_map = [KeyMapEntry(*e) for e in key_map]
    place = place or (lambda path, a: jnp.asarray(a))
    np_dtype = np.dtype(dtype)
    flat = {}
    for e in key_map:
        arr = TRANSFORMS[e.transform].to_flax(source.get(e.hf_key, np_dtype), shapes[e.flax_path])
        flat[e.flax_path] = place(e.flax_path, np.ascontiguousarray(arr))
    return traverse_util.unflatten_dict(flat, sep="/")


def export_params(params: Mapping[str, Any], key_map: Sequence[KeyMapEntry]) -> Iterator[tuple[str, np.ndarray]]:
    """(checkpoint key, numpy array in HF layout) for every param, in key-map order.

    Raises ValueError naming params the key map does not cover (e.g. compressed layers that
    have no HF counterpart) and key-map entries the params lack.
    """
    key_map = [KeyMapEntry(*e) for e in key_map]
    flat = traverse_util.flatten_dict(params, sep="/")
    mapped = {e.flax_path for e in key_map}
    problems = [f"param {path} has no checkpoint key" for path in sorted(set(flat) - mapped)]
    problems += [f"params lack {e.flax_path} (for {e.hf_key!r})" for e in key_map if e.flax_path not in flat]
    if problems:
        raise ValueError("cannot export params:\n  - " + "\n  - ".join(problems))
    # Converted lazily, one tensor at a time.
    return (
        (e.hf_key, np.ascontiguousarray(TRANSFORMS[e.transform].to_hf(np.asarray(flat[e.flax_path]))))
        for e in key_map
    )
