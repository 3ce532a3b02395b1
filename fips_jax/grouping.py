"""Groups of consecutive blocks and their concatenated MLP matrices.

Inside a group every FC weight is written with the model width d as rows (fc1/gate/up as their
`[d, p]` kernels, fc2/down transposed from `[p, d]`), then concatenated block-major along the
long axis:

    W_s = [fc1_b0, fc2_b0, fc1_b1, fc2_b1, ...]            shape [d, n*F*p]

`concat_group` builds W_s from a param tree and `split_group` is its exact inverse.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp

from fips_jax.models import base


path_str = base.path_str  # the name export.py and the tests know it by


def select_paths(params: Mapping[str, Any], pattern: str) -> list[str]:
    """Slash-joined paths of the leaves whose path matches `pattern` (re.search), in tree order."""
    rx = re.compile(pattern)
    return [path for path in (path_str(k) for k, _ in jax.tree_util.tree_leaves_with_path(params)) if rx.search(path)]


def make_groups(
    num_blocks: int,
    groups: Sequence[Sequence[int]] | None = None,
    group_size: int | None = None,
) -> tuple[tuple[int, ...], ...]:
    """Blocks split into groups, from an explicit list or a size (the last group may be smaller).

    Raises ValueError unless every block in [0, num_blocks) is in exactly one group.
    """
    if (groups is None) == (group_size is None):
        raise ValueError("give exactly one of `groups` (explicit block lists) or `group_size`")
    if group_size is not None:
        if group_size < 1:
            raise ValueError(f"group_size {group_size} must be >= 1")
        groups = [range(s, min(s + group_size, num_blocks)) for s in range(0, num_blocks, group_size)]
    out = tuple(tuple(int(b) for b in g) for g in groups)
    seen: dict[int, int] = {}
    for gi, g in enumerate(out):
        if not g:
            raise ValueError(f"group {gi} is empty")
        for b in g:
            if not 0 <= b < num_blocks:
                raise ValueError(f"group {gi}: block {b} out of range [0, {num_blocks})")
            if b in seen:
                raise ValueError(f"block {b} is in group {seen[b]} and group {gi}")
            seen[b] = gi
    missing = sorted(set(range(num_blocks)) - set(seen))
    if missing:
        raise ValueError(f"blocks {missing} are in no group (groups={out})")
    return out


@dataclasses.dataclass(frozen=True)
class GroupLayout:
    """Where a group's MLP kernels live and how they concatenate.

    fc_paths[b][f] is the kernel path of FC f of the group's b-th block.
    """

    blocks: tuple[int, ...]
    fc_names: tuple[str, ...]
    transposed: tuple[bool, ...]
    fc_paths: tuple[tuple[str, ...], ...]
    d: int
    p: int

    @property
    def n_blocks(self) -> int:
        return len(self.blocks)

    @property
    def n_fcs(self) -> int:
        return len(self.fc_names)

    @property
    def dense_weights(self) -> int:
        return self.n_blocks * self.n_fcs * self.d * self.p

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "GroupLayout":
        """The layout from its JSON form (lists for tuples; extra keys such as a manifest's are ignored)."""
        return cls(tuple(d["blocks"]), tuple(d["fc_names"]), tuple(d["transposed"]),
                   tuple(tuple(row) for row in d["fc_paths"]), d["d"], d["p"])


def group_layout(params: Mapping[str, Any], spec: base.MlpSpec, mlp_path_of, blocks: Sequence[int], *, group: Any = 0) -> GroupLayout:
    """Check that every FC of every block in the group is `d x p` (after transposing fc2/down)
    with the same d and p, and return the layout."""
    fc_paths, shapes = [], []
    for b in blocks:
        row = []
        for name, tr in zip(spec.fc_names, spec.transposed):
            path = f"{mlp_path_of(b)}/{name}/kernel"
            try:
                k = base.get_path(params, path)
            except KeyError as e:
                raise ValueError(f"group {group}: block {b} has no MLP kernel at {path!r}: {e}") from None
            if k.ndim != 2:
                raise ValueError(f"group {group}: {path} has shape {tuple(k.shape)}, expected a 2-D kernel")
            shapes.append((path, tuple(k.shape[::-1]) if tr else tuple(k.shape)))
            row.append(path)
        fc_paths.append(tuple(row))
    (first_path, (d, p)) = shapes[0]
    for path, shape in shapes[1:]:
        if shape != (d, p):
            raise ValueError(
                f"group {group}: {path} is {shape} as d x p but {first_path} is {(d, p)}; "
                "blocks of a group must have equal MLP shapes"
            )
    return GroupLayout(tuple(blocks), spec.fc_names, spec.transposed, tuple(fc_paths), d, p)


def concat_group(params: Mapping[str, Any], layout: GroupLayout) -> jax.Array:
    """W_s: [d, n*F*p], block-major (all FCs of block 0, then block 1, ...)."""
    cols = []
    for row in layout.fc_paths:
        for path, tr in zip(row, layout.transposed):
            k = base.get_path(params, path)
            cols.append(k.T if tr else k)
    return jnp.concatenate(cols, axis=1)


def split_group(w: jax.Array, layout: GroupLayout) -> dict[str, jax.Array]:
    """Inverse of concat_group: {kernel path: kernel in its flax layout}."""
    expected = (layout.d, layout.n_blocks * layout.n_fcs * layout.p)
    if tuple(w.shape) != expected:
        raise ValueError(f"group {layout.blocks}: matrix of shape {tuple(w.shape)}, expected {expected}")
    out = {}
    j = 0
    for row in layout.fc_paths:
        for path, tr in zip(row, layout.transposed):
            k = w[:, j * layout.p:(j + 1) * layout.p]
            out[path] = k.T if tr else k
            j += 1
    return out


def replace_kernels(params: Mapping[str, Any], kernels: Mapping[str, jax.Array]) -> dict:
    """A copy of `params` with the kernels at the given paths replaced (dtypes preserved)."""
    new = params
    for path, k in kernels.items():
        old = base.get_path(params, path)
        if tuple(old.shape) != tuple(k.shape):
            raise ValueError(f"{path}: replacement has shape {tuple(k.shape)}, expected {tuple(old.shape)}")
        new = base.set_path(new, path, k.astype(old.dtype))
    return new
