"""The compressed model on disk: an Orbax checkpoint plus a JSON manifest.

    <dir>/params/      Orbax: {"base": dense params without the grouped MLP kernels,
                               "fips": {"g00": {"u", "v", "bias"?}, ...}}
    <dir>/manifest.json  architecture + HF config, groups (blocks, kernel paths, rank), realised
                         sparsity, budget three ways, evaluation numbers

`load` rebuilds the architecture from the manifest alone (no original checkpoint needed) and
returns dense-layout params with every grouped kernel equal to U V_t. Nothing is unpickled.

`save` writes the directory whole or not at all (built next to it, then renamed into place) and
refuses a tree holding a NaN or an infinity.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from fips_jax import checkpointing, grouping, local_opt, sharding
from fips_jax.models import base, registry

FORMAT = "fips_jax.compressed/1"


def _without(tree: dict, paths: Sequence[str]) -> dict:
    out = jax.tree_util.tree_map(lambda x: x, tree)  # copies the dict structure
    for path in paths:
        *parents, leaf = path.split("/")
        node = out
        for p in parents:
            node = node[p]
        del node[leaf]
    return out


def check_finite(tree: Any, where: str) -> None:
    """Raise ValueError naming every leaf of `tree` (slash-joined path) that holds a NaN or an
    infinity: an export must never carry them. Reduced on device for jax arrays."""
    bad = []
    for path, x in jax.tree_util.tree_leaves_with_path(tree):
        if not jnp.issubdtype(x.dtype, jnp.inexact):
            continue
        finite = jnp.all(jnp.isfinite(x)) if isinstance(x, jax.Array) else np.all(np.isfinite(x))
        if not bool(finite):
            bad.append(grouping.path_str(path))
    if bad:
        raise ValueError(f"{where}: refusing to export non-finite values (NaN or inf) in "
                         f"{', '.join(bad[:10])}{', ...' if len(bad) > 10 else ''}")


def save(directory: str, arch: base.Architecture, dense_params: Any,
         plan: Sequence[tuple[grouping.GroupLayout, int]], group_params: Sequence[dict], manifest: dict) -> None:
    """Write the compressed model to `directory` (layout in the module docstring). Collective:
    every process calls it (the Orbax save is); process 0 alone writes the manifest and puts the
    directory in place. An existing `directory` is replaced only once the new one is complete.
    Raises ValueError naming the tensors if any value is NaN or infinite."""
    kernel_paths = [p for layout, _ in plan for row in layout.fc_paths for p in row]
    tree = {
        "base": _without(dict(dense_params), kernel_paths),
        "fips": {f"g{g:02d}": p for g, p in enumerate(group_params)},
    }
    check_finite(tree, where=directory)
    groups = []
    for g, ((layout, rank), p) in enumerate(zip(plan, group_params)):
        v = np.asarray(p["v"])
        groups.append({
            "name": f"g{g:02d}", "blocks": list(layout.blocks), "rank": rank, "d": layout.d, "p": layout.p,
            "fc_names": list(layout.fc_names), "transposed": list(layout.transposed),
            "fc_paths": [list(row) for row in layout.fc_paths],
            "v_sparsity": float(np.mean(v == 0)), "v_nonzeros": int(np.count_nonzero(v)),
        })
    with checkpointing.atomic_dir(directory, collective=True) as tmp:
        checkpointing.save_tree(os.path.join(tmp, "params"), tree)
        checkpointing.fault_point("export_orbax")
        if sharding.is_writer():
            checkpointing.write_json(os.path.join(tmp, "manifest.json"), {
                "format": FORMAT, "architecture": arch.name, "hf_config": registry.to_hf_config(arch),
                "groups": groups, **manifest,
            })


def load(directory: str) -> tuple[base.Architecture, dict, dict]:
    """(arch, dense-layout params of the compressed model, manifest)."""
    tree, manifest = read_tree(directory)
    arch, params = assemble_tree(tree, manifest, where=directory)
    return arch, params, manifest


def read_tree(directory: str) -> tuple[dict, dict]:
    """The saved tree `{"base", "fips": {gNN: {"u", "v", "bias"?}}}` and the manifest, unassembled
    (what a converter such as `export_sparse` starts from)."""
    mpath = os.path.join(directory, "manifest.json")
    if not os.path.exists(mpath):
        raise FileNotFoundError(f"no compressed model at {directory}: {mpath} is missing")
    manifest = checkpointing.read_json(mpath)
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{mpath}: format {manifest.get('format')!r}, expected {FORMAT!r}")
    return checkpointing.restore_tree(os.path.join(directory, "params")), manifest


def assemble_tree(tree: dict, manifest: dict, where: str = "compressed model") -> tuple[base.Architecture, dict]:
    """(arch, dense-layout params) from a saved tree and its manifest: every grouped kernel set to
    U V_t and every grouped bias to the trained one, then checked against the architecture's
    shapes (every missing, extra or mis-shaped param is named)."""
    arch = registry.from_hf_config(manifest["hf_config"])
    params = tree["base"]
    for g in manifest["groups"]:
        p = tree["fips"][g["name"]]
        layout = grouping.GroupLayout(tuple(g["blocks"]), tuple(g["fc_names"]), tuple(g["transposed"]),
                                      tuple(tuple(r) for r in g["fc_paths"]), g["d"], g["p"])
        for path, k in local_opt.group_kernels(p, layout).items():
            params = base.set_path(params, path, jnp.asarray(k))
        if "bias" in p:
            for f, name in enumerate(layout.fc_names):
                for b, row in enumerate(layout.fc_paths):
                    params = base.set_path(params, f"{row[f].rsplit('/', 1)[0]}/bias", jnp.asarray(p["bias"][name][b]))
    expected = jax.eval_shape(arch.init, jax.random.PRNGKey(0))
    want = {grouping.path_str(k): v.shape for k, v in jax.tree_util.tree_leaves_with_path(expected)}
    have = {grouping.path_str(k): np.shape(v) for k, v in jax.tree_util.tree_leaves_with_path(params)}
    problems = [f"missing {k}" for k in sorted(set(want) - set(have))]
    problems += [f"extra {k}" for k in sorted(set(have) - set(want))]
    problems += [f"{k}: {have[k]} != expected {want[k]}" for k in sorted(set(want) & set(have))
                 if tuple(have[k]) != tuple(want[k])]
    if problems:
        raise ValueError(f"{where}: compressed params do not match {arch.name}: " + "; ".join(problems[:20]))
    return arch, params
