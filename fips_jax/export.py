"""The compressed model on disk (an Orbax checkpoint plus a JSON manifest), and its export for interop.

    <dir>/params/base/   Orbax: dense params without the grouped MLP kernels
    <dir>/params/gNN/    Orbax, one per group: {"u", "v", "bias"?}
    <dir>/manifest.json  architecture + HF config, groups (blocks, kernel paths, rank), realised
                         sparsity, budget three ways, evaluation numbers

One Orbax item per group (format /2) so that writing, converting and loading hold one group's
factors at a time: every group at once is the size of the dense MLP times the rank fraction
(40 GiB for Llama-3.1-8B in float32). Format /1 directories (one tree {"base", "fips": {gNN}}
under params/) still load.

`load` rebuilds the architecture from the manifest alone (no original checkpoint needed) and
returns dense-layout params with every grouped kernel equal to U V_t. Nothing is unpickled.

`save` writes the directory whole or not at all (built next to it, then renamed into place) and
refuses a tree holding a NaN or an infinity.

`to_hf` / `to_gguf` materialise a finished run's compressed model (W = U V_t) for other tools:

    python -m fips_jax.export --workdir=/tmp/run --to=hf --out=/tmp/run-hf [--dtype=bfloat16]
    python -m fips_jax.export --workdir=/tmp/run --to=gguf --out=/tmp/run.gguf [--gguf_type=Q8_0]

Both are dense: they run anywhere at the dense model's speed and size; only `compressed/` and
`export_sparse`'s file keep the factored form and its memory saving.
"""

from __future__ import annotations

import os
from typing import Any, Iterable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from fips_jax import checkpointing, factors, grouping, sharding
from fips_jax.models import base, registry

FORMAT = "fips_jax.compressed/2"
FORMAT_ONE_TREE = "fips_jax.compressed/1"  # every group in one Orbax tree; read, no longer written


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
         plan: Sequence[tuple[grouping.GroupLayout, int]], group_params: Iterable[dict], manifest: dict) -> None:
    """Write the compressed model to `directory` (layout in the module docstring). Groups are
    written in turn, so `group_params` may be a generator reading each group from disk: one
    group's factors are in memory at a time. Collective: every process calls it (the Orbax saves
    are); process 0 alone writes the manifest and puts the directory in place. An existing
    `directory` is replaced only once the new one is complete. Raises ValueError naming the
    tensors if any value is NaN or infinite (nothing is then left behind)."""
    kernel_paths = [p for layout, _ in plan for row in layout.fc_paths for p in row]
    base_tree = _without(dict(dense_params), kernel_paths)
    check_finite({"base": base_tree}, where=directory)
    groups = []
    with checkpointing.atomic_dir(directory, collective=True) as tmp:
        os.makedirs(os.path.join(tmp, "params"), exist_ok=True)
        checkpointing.save_tree(os.path.join(tmp, "params", "base"), base_tree)
        del base_tree
        given = iter(group_params)  # not zip: its reused result tuple would keep the last group alive
        for g, (layout, rank) in enumerate(plan):
            p = next(given, None)
            if p is None:
                raise ValueError(f"{directory}: {g} groups' params for a plan of {len(plan)} groups")
            name = f"g{g:02d}"
            check_finite({"fips": {name: p}}, where=directory)
            v = np.asarray(p["v"])
            nonzeros = int(np.count_nonzero(v))
            groups.append({
                "name": name, "blocks": list(layout.blocks), "rank": rank, "d": layout.d, "p": layout.p,
                "fc_names": list(layout.fc_names), "transposed": list(layout.transposed),
                "fc_paths": [list(row) for row in layout.fc_paths],
                "v_sparsity": 1.0 - nonzeros / v.size, "v_nonzeros": nonzeros,
            })
            del v
            checkpointing.save_tree(os.path.join(tmp, "params", name), p)
            del p
        if next(given, None) is not None:
            raise ValueError(f"{directory}: more groups' params than the plan's {len(plan)} groups")
        checkpointing.fault_point("export_orbax")
        if sharding.is_writer():
            checkpointing.write_json(os.path.join(tmp, "manifest.json"), {
                "format": FORMAT, "architecture": arch.name, "hf_config": registry.to_hf_config(arch),
                "groups": groups, **manifest,
            })


def load(directory: str) -> tuple[base.Architecture, dict, dict]:
    """(arch, dense-layout params of the compressed model, manifest), assembled a group at a time."""
    saved = Saved(directory)
    arch, params = assemble(saved.base(), saved.groups(), saved.manifest, where=directory)
    return arch, params, saved.manifest


def read_manifest(directory: str) -> dict:
    """The checked manifest of a compressed model directory (either format)."""
    mpath = os.path.join(directory, "manifest.json")
    if not os.path.exists(mpath):
        raise FileNotFoundError(f"no compressed model at {directory}: {mpath} is missing")
    try:
        manifest = checkpointing.read_json(mpath)
    except ValueError as e:
        raise ValueError(f"{mpath}: corrupt manifest ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") not in (FORMAT, FORMAT_ONE_TREE):
        got = manifest.get("format") if isinstance(manifest, dict) else manifest
        raise ValueError(f"{mpath}: format {got!r}, expected {FORMAT!r} (or the older {FORMAT_ONE_TREE!r})")
    check_manifest(manifest, mpath)
    return manifest


class Saved:
    """A compressed model directory opened for reading one group at a time. The manifest is
    checked on opening, and the groups held under params/ against its list; `base()` and
    `group(g)` restore one Orbax item each, checked against the manifest (shapes, nonzeros).
    A format /1 directory is restored whole on opening (its one tree) and served from memory."""

    def __init__(self, directory: str):
        self.directory = directory
        self.manifest = read_manifest(directory)
        self.where = os.path.join(directory, "params")
        names = [g["name"] for g in self.manifest["groups"]]
        self._tree = None
        if self.manifest["format"] == FORMAT_ONE_TREE:
            self._tree = checkpointing.restore_tree(self.where)
            check_tree(self._tree, self.manifest, self.where)
            return
        held = sorted(n for n in (os.listdir(self.where) if os.path.isdir(self.where) else []) if n != "base")
        _check_names(names, held, self.where)
        if not os.path.isdir(os.path.join(self.where, "base")):
            raise ValueError(f"{self.where}: base (the params outside the groups) is missing")

    def base(self) -> dict:
        if self._tree is not None:
            return self._tree["base"]
        tree = checkpointing.restore_tree(os.path.join(self.where, "base"))
        if not isinstance(tree, dict):
            raise ValueError(f"{self.where}: base is a {type(tree).__name__}, not a params tree")
        return tree

    def group(self, g: dict) -> dict:
        """The params of the manifest's group `g`, checked against it."""
        if self._tree is not None:
            return self._tree["fips"][g["name"]]
        p = checkpointing.restore_tree(os.path.join(self.where, g["name"]))
        check_group(p, g, self.where)
        return p

    def groups(self) -> Iterator[tuple[dict, dict]]:
        """(manifest group, its params) in the manifest's order, one restored at a time."""
        for g in self.manifest["groups"]:
            yield g, self.group(g)


def read_tree(directory: str) -> tuple[dict, dict]:
    """The saved tree `{"base", "fips": {gNN: {"u", "v", "bias"?}}}` and the manifest, unassembled,
    every group at once (`Saved` reads one at a time). The manifest is checked before the params
    are read, and the params against the manifest (`check_tree`) before they are returned."""
    saved = Saved(directory)
    return {"base": saved.base(), "fips": {g["name"]: p for g, p in saved.groups()}}, saved.manifest


MANIFEST_KEYS = ("format", "architecture", "hf_config", "groups")
GROUP_KEYS = ("name", "blocks", "rank", "d", "p", "fc_names", "transposed", "fc_paths", "v_nonzeros")


def _is_int(x: Any, least: int) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool) and x >= least


def check_manifest(manifest: Any, where: str) -> None:
    """Every key that loading reads is there with a usable value, and each group is consistent
    with itself (fc_paths is blocks x fc_names, ...). One-line ValueError naming `where` and the group."""
    if not isinstance(manifest, dict):
        raise ValueError(f"{where}: manifest is a JSON {type(manifest).__name__}, not an object")
    missing = [k for k in MANIFEST_KEYS if k not in manifest]
    if missing:
        raise ValueError(f"{where}: manifest lacks required keys {missing}")
    if not isinstance(manifest["hf_config"], dict):
        raise ValueError(f"{where}: manifest hf_config is not an object")
    groups = manifest["groups"]
    if not isinstance(groups, list) or not groups or not all(isinstance(g, dict) for g in groups):
        raise ValueError(f"{where}: manifest groups must be a non-empty list of objects")
    names = [g.get("name", f"groups[{i}]") for i, g in enumerate(groups)]
    for i, g in enumerate(groups):
        name = names[i]
        missing = [k for k in GROUP_KEYS if k not in g]
        if missing:
            raise ValueError(f"{where}: manifest group {name} lacks required keys {missing}")
        if not isinstance(name, str) or not name or "/" in name or names.count(name) > 1:
            raise ValueError(f"{where}: manifest group name {name!r} is empty, has a '/' or is used twice")
        bad = [k for k in ("rank", "d", "p") if not _is_int(g[k], 1)]
        if not _is_int(g["v_nonzeros"], 0):
            bad.append("v_nonzeros")
        blocks, fcs = g["blocks"], g["fc_names"]
        if not isinstance(blocks, list) or not blocks or not all(_is_int(b, 0) for b in blocks):
            bad.append("blocks")
        if not isinstance(fcs, list) or not fcs or not all(isinstance(f, str) and f for f in fcs):
            bad.append("fc_names")
        if bad:
            raise ValueError(f"{where}: manifest group {name}: bad {', '.join(f'{k}={g[k]!r}' for k in bad)}")
        tr, paths = g["transposed"], g["fc_paths"]
        if not isinstance(tr, list) or len(tr) != len(fcs) or not all(isinstance(t, bool) for t in tr):
            raise ValueError(f"{where}: manifest group {name}: transposed {tr!r} is not one bool per fc_names {fcs}")
        if (not isinstance(paths, list) or len(paths) != len(blocks)
                or not all(isinstance(r, list) and len(r) == len(fcs) and all(isinstance(x, str) for x in r)
                           for r in paths)):
            raise ValueError(
                f"{where}: manifest group {name}: fc_paths is not {len(blocks)} blocks x {len(fcs)} kernel paths")


def _check_names(names: Sequence[str], held: Sequence[str], where: str) -> None:
    absent = [n for n in names if n not in held]
    if absent:
        raise ValueError(f"{where}: manifest groups {absent} are not in the params (they hold {sorted(held)})")
    extra = sorted(set(held) - set(names))
    if extra:
        raise ValueError(f"{where}: params hold groups {extra} that the manifest lacks (it lists {list(names)})")


def check_tree(tree: Any, manifest: dict, where: str, count_nonzeros: bool = True) -> None:
    """The saved tree holds exactly the manifest's groups, each as `check_group` wants it.
    One-line ValueError naming `where` and the tensor."""
    check_manifest(manifest, where)
    if not isinstance(tree, dict) or not isinstance(tree.get("base"), dict) or not isinstance(tree.get("fips"), dict):
        raise ValueError(f"{where}: params are not {{'base': ..., 'fips': {{group: ...}}}}")
    _check_names([g["name"] for g in manifest["groups"]], list(tree["fips"]), where)
    for g in manifest["groups"]:
        check_group(tree["fips"][g["name"]], g, where, count_nonzeros)


def check_group(p: Any, g: dict, where: str, count_nonzeros: bool = True) -> None:
    """One group's params against its manifest entry: u [d, rank], v [blocks, fc_names, rank, p],
    optional biases [blocks, out] per FC, and (count_nonzeros) as many nonzeros in v as the
    entry's v_nonzeros. One-line ValueError naming `where` and the tensor."""
    name = g["name"]
    n, f = len(g["blocks"]), len(g["fc_names"])
    want = {"u": (g["d"], g["rank"]), "v": (n, f, g["rank"], g["p"])}
    if not isinstance(p, dict) or not {"u", "v"} <= set(p) or set(p) - {"u", "v", "bias"}:
        raise ValueError(f"{where}: fips/{name} holds {sorted(p) if isinstance(p, dict) else p!r}, "
                         f"expected u, v and optionally bias")
    if "bias" in p:
        held = sorted(p["bias"]) if isinstance(p["bias"], dict) else type(p["bias"]).__name__
        if held != sorted(g["fc_names"]):
            raise ValueError(f"{where}: fips/{name}/bias holds {held}, manifest fc_names {g['fc_names']}")
        for fc, tr in zip(g["fc_names"], g["transposed"]):
            want[f"bias/{fc}"] = (n, g["d"] if tr else g["p"])
    for key, shape in want.items():
        x = p["bias"][key[5:]] if key.startswith("bias/") else p[key]
        if tuple(np.shape(x)) != shape:
            raise ValueError(
                f"{where}: fips/{name}/{key} has shape {tuple(np.shape(x))}, the manifest's "
                f"blocks={g['blocks']} fc_names={g['fc_names']} d={g['d']} p={g['p']} rank={g['rank']} give {shape}")
    if count_nonzeros:
        nnz = int(np.count_nonzero(np.asarray(p["v"])))
        if nnz != g["v_nonzeros"]:
            raise ValueError(f"{where}: fips/{name}/v has {nnz} nonzeros, the manifest's v_nonzeros says {g['v_nonzeros']}")


def assemble_tree(tree: dict, manifest: dict, where: str = "compressed model") -> tuple[base.Architecture, dict]:
    """(arch, dense-layout params) from a saved tree and its manifest (`assemble`). The groups are
    checked against the manifest first (`check_tree`; the nonzero count is left to the readers,
    which already did it)."""
    check_tree(tree, manifest, where, count_nonzeros=False)
    return assemble(tree["base"], ((g, tree["fips"][g["name"]]) for g in manifest["groups"]), manifest, where)


def assemble(base_params: dict, groups: Iterable[tuple[dict, dict]], manifest: dict,
             where: str = "compressed model") -> tuple[base.Architecture, dict]:
    """(arch, dense-layout params): every grouped kernel of the base params set to U V_t and every
    grouped bias to the trained one, group by group as `groups` gives (manifest group, params),
    then checked against the architecture's shapes (every missing, extra or mis-shaped param is
    named)."""
    arch = registry.from_hf_config(manifest["hf_config"])
    params = base_params
    for g, p in groups:
        layout = grouping.GroupLayout.from_json(g)
        for path, k in factors.group_kernels(p, layout).items():
            params = base.set_path(params, path, jnp.asarray(k))
        if "bias" in p:
            for f, name in enumerate(layout.fc_names):
                for b, row in enumerate(layout.fc_paths):
                    params = base.set_path(params, f"{row[f].rsplit('/', 1)[0]}/bias", jnp.asarray(p["bias"][name][b]))
        del p
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


# ---- Export for interop: the compressed model materialised (W = U V_t) in formats other tools load.

HF_DTYPES = {"float32": np.float32, "bfloat16": jnp.bfloat16, "float16": np.float16}


def _compressed_dir(workdir: str) -> str:
    directory = os.path.join(workdir, "compressed")
    if not os.path.exists(os.path.join(directory, "manifest.json")):
        raise FileNotFoundError(f"workdir {workdir} has no compressed model ({directory}/manifest.json is "
                                "missing): run the pipeline to the end first")
    return directory


def run_model_config(workdir: str) -> dict:
    """The `model` section of the run's config.json ({} when the workdir has none)."""
    path = os.path.join(workdir, "config.json")
    return dict(checkpointing.read_json(path).get("model", {})) if os.path.exists(path) else {}


def _source_gguf(model: dict) -> str | None:
    """The GGUF file the run's model and tokenizer came from (None for other sources)."""
    if model.get("source") != "gguf" or model.get("tokenizer", "model") != "model":
        return None
    from fips_jax.hf import gguf  # pylint: disable=import-outside-toplevel

    return os.path.expanduser(model.get("path") or "") or gguf.smollm2_gguf_path()


def run_tokenizer(workdir: str) -> Any:
    """The run's own tokenizer as a transformers tokenizer, or None for a run without one
    (byte-tokenizer tiny models, ViTs): `model.tokenizer=model` of an hf or gguf source."""
    model = run_model_config(workdir)
    if model.get("tokenizer", "model") != "model" or model.get("source") not in ("hf", "gguf"):
        return None
    if model["source"] == "gguf":
        from fips_jax.hf import gguf  # pylint: disable=import-outside-toplevel

        return gguf.load_gguf_tokenizer(_source_gguf(model))
    from transformers import AutoTokenizer  # pylint: disable=import-outside-toplevel

    from fips_jax.hf import checkpoint  # pylint: disable=import-outside-toplevel

    folder = checkpoint.resolve(os.path.expanduser(model["path"]))
    if not any(os.path.exists(os.path.join(folder, f)) for f in ("tokenizer.json", "tokenizer_config.json",
                                                                  "tokenizer.model")):
        return None  # e.g. a vision checkpoint
    return AutoTokenizer.from_pretrained(folder)


def _tokenizer_files(tokenizer: Any) -> dict[str, bytes]:
    """The files `tokenizer.save_pretrained` writes, as bytes (written with the weights, atomically)."""
    import tempfile  # pylint: disable=import-outside-toplevel

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        out = {}
        for name in sorted(os.listdir(tmp)):
            with open(os.path.join(tmp, name), "rb") as f:
                out[name] = f.read()
    return out


def _materialised(workdir: str) -> tuple[base.Architecture, dict]:
    arch, params, _ = load(_compressed_dir(workdir))
    check_finite(params, where=workdir)
    return arch, params


def to_hf(workdir: str, out: str, dtype: str = "float32") -> list[str]:
    """A run's compressed model as an HF folder at `out`: config.json, safetensors with every
    grouped kernel materialised (W = U V_t) in `dtype`, and the run's tokenizer files when it has
    a tokenizer. Any family of `hf.checkpoint.FAMILIES`. The folder appears whole or not at all.
    Returns the files written."""
    from fips_jax.hf import checkpoint  # pylint: disable=import-outside-toplevel

    if dtype not in HF_DTYPES:
        raise ValueError(f"dtype {dtype!r} not supported; supported: {sorted(HF_DTYPES)}")
    manifest = checkpointing.read_json(os.path.join(_compressed_dir(workdir), "manifest.json"))
    checkpoint.family(manifest.get("architecture"))  # an unsupported family fails before the params are read
    arch, params = _materialised(workdir)
    params = jax.tree_util.tree_map(lambda x: np.asarray(x).astype(HF_DTYPES[dtype]), params)
    tokenizer = run_tokenizer(workdir)
    extra = _tokenizer_files(tokenizer) if tokenizer is not None else {}
    # Shards of at most 4 GiB, as HF writes them (one file for every model this repo runs on CPU).
    return checkpoint.save_pretrained(arch, params, out, max_shard_bytes=4 << 30, extra_files=extra)


def to_gguf(workdir: str, out: str, gguf_type: str = "F32") -> str | None:
    """A run's compressed model as one GGUF file at `out` (llama.cpp), 2-D tensors in
    `gguf_type` (F32, F16, Q8_0, ...). Tokenizer metadata is copied from the run's source GGUF;
    returns that file, or None when the GGUF carries no vocabulary (see `gguf_export.write_gguf`)."""
    from fips_jax.hf import gguf_export  # pylint: disable=import-outside-toplevel

    gguf_export.qtype_of(gguf_type)
    manifest = checkpointing.read_json(os.path.join(_compressed_dir(workdir), "manifest.json"))
    gguf_export.gguf_arch(manifest.get("architecture"))  # before the params are read
    model = run_model_config(workdir)
    source = _source_gguf(model)
    if source is None and model.get("source") == "hf" and model.get("tokenizer", "model") == "model":
        raise ValueError("GGUF export of an hf-sourced run: its tokenizer cannot be converted to GGUF metadata "
                         "here; export --to=hf and convert that folder with llama.cpp's convert_hf_to_gguf.py")
    arch, params = _materialised(workdir)
    gguf_export.write_gguf(out, arch, params, gguf_type, tokenizer_gguf=source,
                           name=os.path.basename(os.path.normpath(workdir)))
    return source


def main(argv):
    import sys  # pylint: disable=import-outside-toplevel

    from absl import app, flags, logging  # pylint: disable=import-outside-toplevel

    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)  # no Orbax INFO chatter
    f = flags.FLAGS
    try:
        if f.to == "hf":
            files = to_hf(f.workdir, f.out, f.dtype or "float32")
            note = "" if any(n.startswith("tokenizer") for n in files) else " (the run has no tokenizer: none written)"
            print(f"wrote {f.out}: {', '.join(files)}{note}")
        else:
            if f.dtype:
                raise ValueError("--dtype is for --to=hf; a GGUF's tensor type is --gguf_type")
            source = to_gguf(f.workdir, f.out, f.gguf_type)
            note = f"tokenizer from {source}" if source else "no vocabulary (tokenizer.ggml.model=none)"
            print(f"wrote {f.out} ({f.gguf_type}, {os.path.getsize(f.out)} bytes, {note})")
    except (ValueError, FileNotFoundError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def _parse_flags(argv):
    import sys  # pylint: disable=import-outside-toplevel

    from absl import flags  # pylint: disable=import-outside-toplevel

    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    from absl import app, flags

    flags.DEFINE_string("workdir", None, "A finished run's workdir (holding compressed/).")
    flags.DEFINE_enum("to", None, ["hf", "gguf"], "hf: an HF folder; gguf: one llama.cpp file.")
    flags.DEFINE_string("out", None, "The folder (hf) or .gguf file (gguf) to write.")
    flags.DEFINE_enum("dtype", None, sorted(HF_DTYPES), "hf: the weights' dtype (default float32).")
    flags.DEFINE_string("gguf_type", "F32", "gguf: type of the 2-D tensors, F32, F16, Q8_0 or another type "
                        "the gguf package quantises to (1-D tensors stay F32).")
    flags.mark_flags_as_required(["workdir", "to", "out"])
    app.run(main, flags_parser=_parse_flags)
