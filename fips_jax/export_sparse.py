"""A compressed model as ONE safetensors file that stores only the nonzeros of every V.

    python -m fips_jax.export_sparse --compressed=/tmp/run/compressed --out=/tmp/run/model.safetensors

Tensors (slash-joined names; written a group at a time, the header first, by `write`):

    base/<param path>        every param outside the grouped MLP kernels, in its own dtype
    fips/gNN/u               [d, r] shared basis (dense)
    fips/gNN/bias/<fc>       [n, out] trained biases (MLPs with biases only)
    fips/gNN/v/values        [nnz] the nonzeros of v [n, F, r, p], row-major
    fips/gNN/v/row_nnz       [n*F*r] uint16 nonzeros in each row of length p
    fips/gNN/v/bitmap        [rows_b, ceil(p/8)] uint8, one bit per entry (np.packbits, little)
    fips/gNN/v/cols          [n_c] uint16 column indices, row-major

Index format ("row-adaptive"): every row of length p picks the cheaper position code from its
count c alone, so no per-row flag is stored: c = 0 or c = p needs nothing; 2c < ceil(p/8) lists
its c columns as uint16; otherwise a p-bit bitmap. A mask at 75% sparsity costs about 1 bit per
entry (4 bits per nonzero) where rows are evenly filled, and 16 bits per nonzero of the rare
entries in the near-empty rows that GMP leaves below the top of the rank (SVD order puts the large
singular directions first; rows past d from hybrid growth are often empty). A 2:4 mask costs
1 bit per entry, as 2-bit in-tile positions would. Indices are uint32 when p > 65535.

`__metadata__` holds `format` and the manifest JSON of `export.save` (the architecture comes from
its hf_config), so the file alone rebuilds the model. Loading reads tensors with `safetensors`
only: nothing is unpickled.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from safetensors import SafetensorError, safe_open

from fips_jax import checkpointing, export
from fips_jax.models import base

FORMAT = "fips_jax.sparse/1"
V_PARTS = ("values", "row_nnz", "bitmap", "cols")


def _index_dtype(p: int) -> np.dtype:
    return np.dtype(np.uint16) if p <= np.iinfo(np.uint16).max else np.dtype(np.uint32)


def _row_kinds(counts: np.ndarray, p: int) -> tuple[np.ndarray, np.ndarray]:
    """(rows coded as column lists, rows coded as bitmaps), from the per-row counts alone."""
    partial = (counts > 0) & (counts < p)
    as_cols = partial & (2 * counts < -(-p // 8))
    return as_cols, partial & ~as_cols


def encode_v(v: Any) -> dict[str, np.ndarray]:
    """v [..., p] (zeros where pruned) -> {values, row_nnz, bitmap, cols} (see module docstring)."""
    v = np.asarray(v)
    p = v.shape[-1]
    rows = v.reshape(-1, p)
    kept = rows != 0
    counts = kept.sum(axis=1)
    as_cols, as_bits = _row_kinds(counts, p)
    return {
        "values": rows[kept],
        "row_nnz": counts.astype(_index_dtype(p)),
        "bitmap": np.packbits(kept[as_bits], axis=1, bitorder="little"),
        "cols": np.nonzero(kept[as_cols])[1].astype(_index_dtype(p)),
    }


def decode_v(parts: Mapping[str, np.ndarray], shape: tuple[int, ...], where: str = "v") -> np.ndarray:
    """Inverse of `encode_v`: the dense v of `shape`, +0 at every pruned entry."""
    p, n_rows = shape[-1], int(np.prod(shape[:-1]))
    counts = np.asarray(parts["row_nnz"]).astype(np.int64)
    values, bitmap, cols = parts["values"], parts["bitmap"], np.asarray(parts["cols"]).astype(np.int64)
    if counts.shape != (n_rows,) or np.any(counts > p) or values.shape != (int(counts.sum()),):
        raise ValueError(f"{where}: row_nnz {counts.shape} / values {values.shape} do not fit v {shape}")
    as_cols, as_bits = _row_kinds(counts, p)
    if bitmap.shape != (int(as_bits.sum()), -(-p // 8)) or cols.shape != (int(counts[as_cols].sum()),):
        raise ValueError(f"{where}: bitmap {bitmap.shape} / cols {cols.shape} do not match row_nnz")
    if cols.size and cols.max() >= p:
        raise ValueError(f"{where}: column index {int(cols.max())} >= p = {p}")
    kept = np.zeros((n_rows, p), bool)
    kept[counts == p] = True
    kept[as_bits] = np.unpackbits(bitmap, axis=1, count=p, bitorder="little").astype(bool)
    kept[np.repeat(np.nonzero(as_cols)[0], counts[as_cols]), cols] = True
    if not np.array_equal(kept.sum(axis=1), counts):  # repeated columns or a wrong bitmap
        raise ValueError(f"{where}: positions disagree with row_nnz")
    out = np.zeros((n_rows, p), values.dtype)
    out[kept] = values  # boolean assignment is row-major, the order encode_v read them in
    return out.reshape(shape)


@dataclasses.dataclass(frozen=True)
class SizeReport:
    """Bytes on disk of the MLP part next to the dense MLP it replaces (biases excluded from both,
    as in the parameter budget)."""

    file_bytes: int
    dense_mlp_bytes: int   # original MLP weights at the basis' dtype (float32: 4 bytes each)
    u_bytes: int
    v_value_bytes: int
    v_index_bytes: int     # row_nnz + bitmap + cols
    bias_bytes: int
    other_bytes: int       # base/ params (attention, norms, embeddings, ...)

    @property
    def mlp_bytes(self) -> int:
        return self.u_bytes + self.v_value_bytes + self.v_index_bytes

    @property
    def mlp_fraction(self) -> float:
        return self.mlp_bytes / self.dense_mlp_bytes

    def as_dict(self) -> dict:
        return {**dataclasses.asdict(self), "mlp_bytes": self.mlp_bytes, "mlp_fraction": self.mlp_fraction}

    def table(self) -> str:
        mb = lambda b: f"{b / 2**20:.2f} MiB" if b >= 2**20 else f"{b / 2**10:.1f} KiB"
        return "\n".join([
            "| part | bytes | of dense MLP |", "|---|---:|---:|",
            f"| dense MLP weights | {mb(self.dense_mlp_bytes)} | 100.0% |",
            f"| U | {mb(self.u_bytes)} | {self.u_bytes / self.dense_mlp_bytes:.1%} |",
            f"| V nonzeros | {mb(self.v_value_bytes)} | {self.v_value_bytes / self.dense_mlp_bytes:.1%} |",
            f"| V indices | {mb(self.v_index_bytes)} | {self.v_index_bytes / self.dense_mlp_bytes:.1%} |",
            f"| **FiPS MLP (U + V + indices)** | {mb(self.mlp_bytes)} | **{self.mlp_fraction:.1%}** |",
            f"| MLP biases | {mb(self.bias_bytes)} | |",
            f"| other params | {mb(self.other_bytes)} | |",
            f"| file | {mb(self.file_bytes)} | |",
        ])


def size_report(sizes: Mapping[str, int], manifest: Mapping[str, Any], file_bytes: int) -> SizeReport:
    """SizeReport from {tensor name: nbytes}."""
    g0 = manifest["groups"][0]
    itemsize = sizes[f"fips/{g0['name']}/u"] // (g0["d"] * g0["rank"])  # the dense MLP's dtype
    dense = itemsize * sum(len(g["blocks"]) * len(g["fc_names"]) * g["d"] * g["p"] for g in manifest["groups"])
    part = lambda pred: sum(b for k, b in sizes.items() if pred(k))
    return SizeReport(
        file_bytes=file_bytes, dense_mlp_bytes=dense,
        u_bytes=part(lambda k: k.startswith("fips/") and k.endswith("/u")),
        v_value_bytes=part(lambda k: k.startswith("fips/") and k.endswith("/v/values")),
        v_index_bytes=part(lambda k: k.startswith("fips/") and k.rsplit("/", 1)[-1] in V_PARTS[1:]),
        bias_bytes=part(lambda k: k.startswith("fips/") and "/bias/" in k),
        other_bytes=part(lambda k: k.startswith("base/")),
    )


def _flat(tree: Mapping[str, Any], prefix: str) -> dict[str, np.ndarray]:
    """{prefix + slash-joined path: leaf as numpy} of a params tree."""
    return {f"{prefix}{base.path_str(k)}": np.asarray(x) for k, x in jax.tree_util.tree_leaves_with_path(tree)}


def save(path: str, tree: Mapping[str, Any], manifest: Mapping[str, Any]) -> SizeReport:
    """Write `{"base", "fips": {gNN: {u, v, bias?}}}` (the tree `export.save` stores) and its
    manifest to one safetensors file (`write`). Returns the sizes."""
    return write(path, tree["base"], lambda: ((g, tree["fips"][g["name"]]) for g in manifest["groups"]), manifest)


def convert(compressed_dir: str, path: str) -> SizeReport:
    """The directory of `export.save` -> one sparse safetensors file, reading one group at a time."""
    saved = export.Saved(compressed_dir)
    return write(path, saved.base(), saved.groups, saved.manifest)


SAFETENSORS_DTYPES = {"float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16",
                      "int64": "I64", "int32": "I32", "int16": "I16", "int8": "I8",
                      "uint64": "U64", "uint32": "U32", "uint16": "U16", "uint8": "U8", "bool": "BOOL"}


def _group_parts(g: Mapping[str, Any], p: Mapping[str, Any], encode: bool) -> dict[str, Any]:
    """{tensor name: array} of one group (encode) or {tensor name: (shape, dtype)} (the layout
    alone: v's row counts decide the index parts' shapes, nothing is encoded)."""
    name = g["name"]
    out: dict[str, Any] = {}
    if encode:
        out[f"fips/{name}/u"] = np.asarray(p["u"])
        for part, arr in encode_v(p["v"]).items():
            out[f"fips/{name}/v/{part}"] = arr
        if "bias" in p:
            out.update(_flat(p["bias"], f"fips/{name}/bias/"))
        return out
    v = np.asarray(p["v"])
    pdim = v.shape[-1]
    counts = np.count_nonzero(v.reshape(-1, pdim), axis=1)
    as_cols, as_bits = _row_kinds(counts, pdim)
    idx = _index_dtype(pdim)
    out[f"fips/{name}/u"] = (tuple(np.shape(p["u"])), np.dtype(p["u"].dtype))
    out[f"fips/{name}/v/values"] = ((int(counts.sum()),), v.dtype)
    out[f"fips/{name}/v/row_nnz"] = (counts.shape, idx)
    out[f"fips/{name}/v/bitmap"] = ((int(as_bits.sum()), -(-pdim // 8)), np.dtype(np.uint8))
    out[f"fips/{name}/v/cols"] = ((int(counts[as_cols].sum()),), idx)
    if "bias" in p:
        for k, x in jax.tree_util.tree_leaves_with_path(p["bias"]):
            out[f"fips/{name}/bias/{base.path_str(k)}"] = (tuple(np.shape(x)), np.dtype(x.dtype))
    return out


def write(path: str, base_params: Mapping[str, Any], groups: Any, manifest: Mapping[str, Any]) -> SizeReport:
    """Write the base params and every group's factors to one safetensors file, holding one
    group at a time. `groups()` yields (manifest group, params) in the manifest's order; it is
    called twice: once for the layout (shapes from v's row counts, so the header comes first),
    once to encode and write each group's tensors at their offsets. The file is built next to
    `path` (a temp file, fsynced, renamed into place) and readable by any safetensors reader.
    Raises ValueError naming the tensors if any value is NaN or infinite. Returns the sizes."""
    export.check_finite({"base": base_params}, where=path)
    base_tensors = _flat(base_params, "base/")
    layout = {k: (x.shape, x.dtype) for k, x in base_tensors.items()}
    n_groups = 0
    for g, p in groups():
        export.check_finite({"fips": {g["name"]: p}}, where=path)
        layout.update(_group_parts(g, p, encode=False))
        n_groups += 1
        del p
    if n_groups != len(manifest["groups"]):
        raise ValueError(f"{path}: {n_groups} groups' params for a manifest of {len(manifest['groups'])} groups")
    header, offsets = _header(layout, {"format": FORMAT, "manifest": json.dumps(manifest, sort_keys=True)}, path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = f"{path}.tmp"  # a fixed name: a killed attempt's leftover is overwritten by the next
    with open(tmp, "wb") as f:
        f.write(header)
        f.truncate(len(header) + max((end for _, end in offsets.values()), default=0))
        _write_at(f, len(header), base_tensors, layout, offsets, path)
        for g, p in groups():
            _write_at(f, len(header), _group_parts(g, p, encode=True), layout, offsets, path)
            del p
    checkpointing.fsync_file(tmp)
    checkpointing.fault_point("export_sparse")
    os.replace(tmp, path)
    checkpointing.fsync_dir(folder)
    return size_report({k: end - begin for k, (begin, end) in offsets.items()}, manifest, os.path.getsize(path))


def _header(layout: Mapping[str, tuple], metadata: Mapping[str, str], path: str) -> tuple[bytes, dict]:
    """The safetensors header (8-byte length + JSON, padded with spaces to a multiple of 8) and
    every tensor's [begin, end) in the data. Tensors are ordered by item size, largest first,
    then by name, so that each starts aligned to its item size."""
    order = sorted(layout, key=lambda k: (-np.dtype(layout[k][1]).itemsize, k))
    entries: dict[str, Any] = {"__metadata__": dict(metadata)}
    offsets, at = {}, 0
    for k in order:
        shape, dtype = layout[k]
        if np.dtype(dtype).name not in SAFETENSORS_DTYPES:
            raise ValueError(f"{path}: {k} has dtype {np.dtype(dtype).name}, which safetensors cannot store")
        nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        offsets[k] = (at, at + nbytes)
        entries[k] = {"dtype": SAFETENSORS_DTYPES[np.dtype(dtype).name], "shape": [int(s) for s in shape],
                      "data_offsets": [at, at + nbytes]}
        at += nbytes
    text = json.dumps(entries, separators=(",", ":")).encode()
    text += b" " * (-(8 + len(text)) % 8)
    return len(text).to_bytes(8, "little") + text, offsets


def _write_at(f, data_start: int, tensors: Mapping[str, np.ndarray], layout: Mapping[str, tuple],
              offsets: Mapping[str, tuple[int, int]], path: str) -> None:
    for k, x in tensors.items():
        x = np.ascontiguousarray(x)
        if (tuple(x.shape), x.dtype) != (tuple(layout[k][0]), np.dtype(layout[k][1])):
            raise ValueError(f"{path}: {k} changed between the layout pass and the write "
                             f"({layout[k][0]} {np.dtype(layout[k][1])} -> {x.shape} {x.dtype})")
        if x.dtype.byteorder == ">":
            x = x.astype(x.dtype.newbyteorder("<"))
        f.seek(data_start + offsets[k][0])
        f.write(x.reshape(-1).view(np.uint8).data)


def _group_tensors(g: Mapping[str, Any]) -> dict[str, tuple[tuple[int, ...] | None, bool]]:
    """{tensor name: (shape the manifest implies, None where it depends on the data; required)}
    of one group; the biases are all there or all absent."""
    name, n, f, r, p = g["name"], len(g["blocks"]), len(g["fc_names"]), g["rank"], g["p"]
    out = {f"fips/{name}/u": ((g["d"], r), True),
           f"fips/{name}/v/values": ((g["v_nonzeros"],), True),
           f"fips/{name}/v/row_nnz": ((n * f * r,), True),
           f"fips/{name}/v/bitmap": (None, True),
           f"fips/{name}/v/cols": (None, True)}
    for fc, tr in zip(g["fc_names"], g["transposed"]):
        out[f"fips/{name}/bias/{fc}"] = ((n, g["d"] if tr else p), False)
    return out


def read(path: str) -> tuple[dict, dict]:
    """(tree, manifest) from a sparse file: the tree `export.save` stores, v decoded to dense
    [n, F, r, p]. The header is checked before any tensor is read: the manifest (`export.
    check_manifest`), the tensor names against its groups, and the shapes it implies (v/values
    holds v_nonzeros values). Every problem is a one-line ValueError naming the file and the
    tensor or group."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"no sparse model file at {path}")
    try:
        with safe_open(path, framework="numpy") as f:
            meta = f.metadata() or {}
            if meta.get("format") != FORMAT:
                raise ValueError(f"{path}: format {meta.get('format')!r}, expected {FORMAT!r}")
            try:
                manifest = json.loads(meta["manifest"])
            except (KeyError, ValueError) as e:
                raise ValueError(f"{path}: no readable manifest in the metadata ({e!r})") from None
            export.check_manifest(manifest, path)
            _check_header(path, manifest, {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()})
            arrays = {k: f.get_tensor(k) for k in f.keys()}
    except SafetensorError as e:  # a corrupt file: the reference reader's message, one line
        raise ValueError(f"{path}: corrupt safetensors file ({' '.join(str(e).split())})") from None
    base_flat = {k[len("base/"):]: jnp.asarray(x) for k, x in arrays.items() if k.startswith("base/")}
    base_tree = traverse_util.unflatten_dict(base_flat, sep="/")
    fips = {}
    for g in manifest["groups"]:
        name = g["name"]
        shape = (len(g["blocks"]), len(g["fc_names"]), g["rank"], g["p"])
        v = decode_v({part: arrays[f"fips/{name}/v/{part}"] for part in V_PARTS}, shape,
                     where=f"{path}: fips/{name}/v")
        fips[name] = {"u": jnp.asarray(arrays[f"fips/{name}/u"]), "v": jnp.asarray(v)}
        if f"fips/{name}/bias/{g['fc_names'][0]}" in arrays:
            fips[name]["bias"] = {fc: jnp.asarray(arrays[f"fips/{name}/bias/{fc}"]) for fc in g["fc_names"]}
        # The kernels' parents exist (empty) in the saved tree; assembly writes into them.
        for row in g["fc_paths"]:
            for kernel in row:
                node = base_tree
                for part in kernel.split("/")[:-1]:
                    node = node.setdefault(part, {})
    tree = {"base": base_tree, "fips": fips}
    export.check_tree(tree, manifest, path)  # e.g. explicit zeros stored as values
    return tree, manifest


def _check_header(path: str, manifest: Mapping[str, Any], shapes: Mapping[str, tuple[int, ...]]) -> None:
    """Tensor names and shapes against the manifest, from the header alone."""
    names = [g["name"] for g in manifest["groups"]]
    stray = sorted({k.split("/")[1] for k in shapes if k.startswith("fips/")} - set(names))
    if stray:
        raise ValueError(f"{path}: tensors of groups {stray} that the manifest lacks (it lists {names})")
    used = {k for k in shapes if k.startswith("base/")}
    for g in manifest["groups"]:
        want = _group_tensors(g)
        biases = [k for k, (_, required) in want.items() if not required]
        has_bias = any(k in shapes for k in biases)
        missing = [k for k, (_, required) in want.items() if (required or has_bias) and k not in shapes]
        if missing:
            raise ValueError(f"{path}: group {g['name']} of the manifest: missing tensors {missing}")
        for k, (shape, required) in want.items():
            if (required or has_bias) and shape is not None and shapes[k] != shape:
                what = "v_nonzeros" if k.endswith("/v/values") else "d/p/rank/blocks/fc_names"
                raise ValueError(f"{path}: {k} has shape {shapes[k]}, the manifest's {what} give {shape}")
            used.add(k)
    extra = sorted(set(shapes) - used)
    if extra:
        raise ValueError(f"{path}: unexpected tensors {extra[:20]}")


def load_sparse(path: str) -> tuple[base.Architecture, dict, dict]:
    """(arch, dense-layout params, manifest): the same params as `export.load` of the directory
    the file was converted from (bit-identical: same arrays, same assembly)."""
    tree, manifest = read(path)
    arch, params = export.assemble_tree(tree, manifest, where=path)
    return arch, params, manifest


def file_size_report(path: str) -> SizeReport:
    """The SizeReport of an existing file, from its header (no tensor data is read)."""
    with safe_open(path, framework="numpy") as f:
        manifest = json.loads((f.metadata() or {})["manifest"])
        sizes = {}
        for k in f.keys():
            sl = f.get_slice(k)
            sizes[k] = int(np.prod(sl.get_shape(), dtype=np.int64)) * _ITEMSIZE[sl.get_dtype()]
    return size_report(sizes, manifest, os.path.getsize(path))


_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "U32": 4, "I16": 2, "U16": 2,
             "I8": 1, "U8": 1, "BOOL": 1}


def main(argv):
    del argv
    from absl import flags, logging  # pylint: disable=import-outside-toplevel

    logging.set_verbosity(logging.WARNING)  # no Orbax INFO chatter
    report = convert(flags.FLAGS.compressed, flags.FLAGS.out)
    print(f"wrote {flags.FLAGS.out}\n{report.table()}")


if __name__ == "__main__":
    from absl import app, flags

    flags.DEFINE_string("compressed", None, "A compressed model directory written by the pipeline (export.save).")
    flags.DEFINE_string("out", None, "The .safetensors file to write.")
    flags.mark_flags_as_required(["compressed", "out"])
    app.run(main)
