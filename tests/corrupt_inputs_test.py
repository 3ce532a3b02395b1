"""Corrupt inputs fail at open with one-line errors that name the file and the tensor or group.

Each case starts from a valid file written by the project's own writers (or the `gguf` package's
GGUFWriter), breaks one thing, and checks that opening it raises a ValueError naming the file and
the tensor/group, before any tensor is returned. The valid originals are checked to load too.
"""

import json
import os
import re
import shutil
import struct

import gguf
import numpy as np
import pytest

from fips_jax.hf import gguf_file, safetensors_io

# --------------------------------------------------------------------------------------------
# safetensors
# --------------------------------------------------------------------------------------------

ST_TENSORS = {  # written in this order: a [0, 24), b [24, 32), c [32, 36)
    "a": np.arange(6, dtype=np.float32).reshape(2, 3),
    "b": np.arange(4, dtype=np.int16),
    "c": np.ones(1, np.float32),
}


def _st_split(path):
    data = open(path, "rb").read()
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + n]), data[8 + n:]


def _st_join(path, header, body):
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob + body)


def _st_entry(name, **changes):
    def edit(header, body):
        header[name].update(changes)
        return header, body
    return edit


def _st_write(path):
    """ST_TENSORS in the order the cases edit (the package's own writer orders by dtype, then name)."""
    header, offset = {}, 0
    for name, arr in ST_TENSORS.items():
        dtype = {"float32": "F32", "int16": "I16"}[arr.dtype.name]
        header[name] = {"dtype": dtype, "shape": list(arr.shape), "data_offsets": [offset, offset + arr.nbytes]}
        offset += arr.nbytes
    _st_join(path, header, b"".join(a.tobytes() for a in ST_TENSORS.values()))


def _st_body(fn):
    return lambda header, body: (header, fn(body))


ST_CASES = {
    # id: (edit(header, body) -> (header, body), tensor named, expected message)
    "overlapping_offsets": (_st_entry("b", data_offsets=[20, 28]), "b", r"at bytes \[20, 28\) overlaps tensor 'a'"),
    "gap_between_tensors": (
        lambda h, b: (h | {"b": dict(h["b"], data_offsets=[28, 36])}, b[:24] + b"\0" * 4 + b[24:]),
        "b", "starts at byte 28, leaving a gap of 4 bytes after tensor 'a'"),
    "trailing_bytes": (_st_body(lambda b: b + b"\0" * 8), "c", "8 trailing bytes in the data section"),
    "offsets_past_the_data": (_st_entry("c", data_offsets=[36, 40]), "c", "truncated safetensors file: tensor 'c' ends at byte 40"),
    "begin_after_end": (_st_entry("b", data_offsets=[32, 24]), "b", "begin > end"),
    "negative_dim": (_st_entry("a", shape=[-2, -3]), "a", r"shape \[-2, -3\]; dims must be integers >= 0"),
    "non_integer_dim": (_st_entry("a", shape=[2, 3.0]), "a", r"shape \[2, 3\.0\]; dims must be integers >= 0"),
    "byte_count_not_shape_x_dtype": (_st_entry("a", shape=[2, 2]), "a", r"spans 24 bytes, shape \[2, 2\] F32 needs 16"),
    "truncated_data": (_st_body(lambda b: b[:-2]), "c", "truncated safetensors file: tensor 'c' ends at byte 36"),
    "entry_without_offsets": (
        lambda h, b: (h | {"a": {"dtype": "F32", "shape": [2, 3]}}, b), "a", "malformed header entry"),
}


def _valid_file_fixture(name, write):
    """A fixture: the path of a valid file `name` in tmp_path, written by `write(path)`."""
    @pytest.fixture
    def fixture(tmp_path):
        path = str(tmp_path / name)
        write(path)
        return path
    return fixture


st_file = _valid_file_fixture("model.safetensors", _st_write)


def test_valid_safetensors_file_loads(st_file):
    reader = safetensors_io.SafetensorsReader(st_file)
    for k, v in ST_TENSORS.items():
        np.testing.assert_array_equal(reader.get(k, None), v)


@pytest.mark.parametrize("case", sorted(ST_CASES))
def test_corrupt_safetensors_file(st_file, case):
    edit, tensor, message = ST_CASES[case]
    header, body = _st_split(st_file)
    _st_join(st_file, *edit(header, body))
    with pytest.raises(ValueError, match=re.escape(st_file) + r": .*" + message) as err:
        safetensors_io.SafetensorsReader(st_file)
    _one_line_naming(err, st_file, repr(tensor))


def test_the_safetensors_package_refuses_what_the_reader_refuses(st_file):
    """The layout rules (no gap, no overlap, no trailing bytes) are the reference's own."""
    safetensors = pytest.importorskip("safetensors")
    for case in ("overlapping_offsets", "gap_between_tensors", "trailing_bytes"):
        _st_join(st_file, *ST_CASES[case][0](*_st_split(st_file)))
        with pytest.raises(Exception, match="invalid offset|not fully covered"):
            with safetensors.safe_open(st_file, framework="numpy") as f:
                [f.get_tensor(k) for k in f.keys()]
        _st_write(st_file)


def test_tensor_named_twice_in_a_safetensors_header(st_file):
    header, body = _st_split(st_file)
    entry = json.dumps(header["c"])
    blob = json.dumps(header)[:-1] + f', "c": {entry}}}'  # json.dumps cannot write a key twice
    blob = blob.encode() + b" " * (-len(blob) % 8)
    with open(st_file, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob + body)
    with pytest.raises(ValueError, match=re.escape(st_file) + r": corrupt safetensors header \(key 'c' appears twice\)") as err:
        safetensors_io.SafetensorsReader(st_file)
    _one_line_naming(err, st_file, "'c'")


def _sharded(tmp_path):
    folder = tmp_path / "sharded"
    safetensors_io.save_checkpoint(str(folder), list(ST_TENSORS.items()), max_shard_bytes=24)
    index = str(folder / safetensors_io.INDEX_FILE)
    with open(index) as f:
        return folder, index, json.load(f)


def test_valid_sharded_checkpoint_loads(tmp_path):
    folder, _, index = _sharded(tmp_path)
    assert len(set(index["weight_map"].values())) == 2
    reader = safetensors_io.SafetensorsReader(str(folder))
    for k, v in ST_TENSORS.items():
        np.testing.assert_array_equal(reader.get(k, None), v)


def test_index_naming_a_missing_shard(tmp_path):
    folder, index, content = _sharded(tmp_path)
    content["weight_map"]["c"] = "model-00003-of-00003.safetensors"
    with open(index, "w") as f:
        json.dump(content, f)
    with pytest.raises(ValueError, match=r"shard files missing: \['model-00003-of-00003.safetensors'\]") as err:
        safetensors_io.SafetensorsReader(str(folder))
    _one_line_naming(err, index, "'c'")


def test_index_naming_a_tensor_its_shard_lacks(tmp_path):
    folder, index, content = _sharded(tmp_path)
    content["weight_map"]["d"] = content["weight_map"]["a"]
    with open(index, "w") as f:
        json.dump(content, f)
    with pytest.raises(ValueError, match=r"index does not match the shards: 'd' \(index says model-00001-of-00002"
                       r"\.safetensors, found in no shard\)") as err:
        safetensors_io.SafetensorsReader(str(folder))
    _one_line_naming(err, index, "'d'")


def test_tensor_in_two_shards(tmp_path):
    folder, _, content = _sharded(tmp_path)
    second = str(folder / "model-00002-of-00002.safetensors")
    safetensors_io.write_file(second, {"a": ST_TENSORS["a"], **{k: ST_TENSORS[k] for k in ("b", "c")}})
    with pytest.raises(ValueError, match=r"tensor 'a' is also in") as err:
        safetensors_io.SafetensorsReader(str(folder))
    _one_line_naming(err, second, "'a'")


def _one_line_naming(err, path, name):
    msg = str(err.value)
    assert "\n" not in msg and path in msg and name in msg, msg


# --------------------------------------------------------------------------------------------
# GGUF
# --------------------------------------------------------------------------------------------

Q = gguf.GGMLQuantizationType
GG_TENSORS = {  # name: (array, type); numpy shapes, so GGUF dims are reversed
    "t.q8": (np.linspace(-1, 1, 2 * 64, dtype=np.float32).reshape(2, 64), Q.Q8_0),
    "t.f3": (np.arange(12, dtype=np.float32).reshape(3, 4), Q.F32),
    "t.f6": (np.arange(8, dtype=np.float16), Q.F16),
}


def _write_gguf(path, alignment=None):
    w = gguf.GGUFWriter(str(path), "llama")
    if alignment is not None:
        w.add_custom_alignment(alignment)
    for name, (arr, qtype) in GG_TENSORS.items():
        if qtype in (Q.F32, Q.F16):
            w.add_tensor(name, arr)
        else:
            w.add_tensor(name, gguf.quants.quantize(arr, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _gg_entry(data, name):
    """Byte positions of a tensor-table entry: (n_dims, [dims], type, offset)."""
    key = struct.pack("<Q", len(name)) + name.encode()
    assert data.count(key) == 1
    pos = data.index(key) + len(key)
    (n_dims,) = struct.unpack_from("<I", data, pos)
    dims = [pos + 4 + 8 * i for i in range(n_dims)]
    return pos, dims, pos + 4 + 8 * n_dims, pos + 8 + 8 * n_dims


def _gg_patch(name, part, fmt, value):
    def edit(data):
        n_dims, dims, qtype, offset = _gg_entry(data, name)
        at = {"n_dims": n_dims, "dim0": dims[0], "dim1": dims[-1], "type": qtype, "offset": offset}[part]
        if callable(value):
            (old,) = struct.unpack_from(fmt, data, at)
            new = value(old, data)
        else:
            new = value
        struct.pack_into(fmt, data, at, new)
        return data
    return edit


def _gg_offset_of(name):
    return lambda old, data: struct.unpack_from("<Q", data, _gg_entry(data, name)[3])[0]


def _gg_rename(old, new):
    def edit(data):
        key = struct.pack("<Q", len(old)) + old.encode()
        pos = data.index(key)
        data[pos:pos + len(key)] = struct.pack("<Q", len(new)) + new.encode()
        return data
    return edit


GG_CASES = {
    # id: (edit(bytearray) -> bytearray, tensor named, expected message)
    # t.f6 is 16 bytes, then 16 bytes of padding to the alignment: cut into its data.
    "truncated_tensor_data": (lambda d: d[:-24], "t.f6", r"truncated GGUF file: tensor t\.f6 ends at byte \d+, file has"),
    "row_not_a_multiple_of_the_block": (_gg_patch("t.q8", "dim0", "<Q", 48), "t.q8",
                                        r"has 48 elements per row \(96 in all\), not a multiple of the Q8_0 block of 32"),
    "overlapping_tensor_data": (_gg_patch("t.f6", "offset", "<Q", _gg_offset_of("t.f3")), "t.f6",
                                r"tensor t\.f(3|6) at bytes \[\d+, \d+\) overlaps tensor t\.f(3|6)"),
    "offset_before_the_data_section": (_gg_patch("t.f3", "offset", "<Q", 2**64 - 32), "t.f3",
                                       r"has offset \d+ \(negative as int64\), before the data section"),
    "offset_not_aligned": (_gg_patch("t.f3", "offset", "<Q", lambda o, d: o + 4), "t.f3",
                           r"has offset \d+, not a multiple of general\.alignment=32"),
    "zero_dim": (_gg_patch("t.f3", "dim1", "<Q", 0), "t.f3", r"has dims \[4, 0\]"),
    "negative_looking_dim": (_gg_patch("t.f3", "dim0", "<Q", 2**64 - 4), "t.f3", r"has dims \[18446744073709551612, 3\]"),
    "too_many_dims": (_gg_patch("t.f6", "n_dims", "<I", 7), "t.f6", r"has 7 dims \(GGUF allows at most 4\)"),
    "duplicate_tensor_name": (_gg_rename("t.f6", "t.f3"), "t.f3", "appears twice in the tensor table"),
    "unknown_ggml_type": (_gg_patch("t.f3", "type", "<I", 99), "t.f3", "has unknown ggml type 99"),
}


gg_file = _valid_file_fixture("tiny.gguf", _write_gguf)


def test_valid_gguf_file_loads(gg_file):
    f = gguf_file.GgufFile(gg_file)
    assert list(f.tensors) == list(GG_TENSORS)
    theirs = {t.name: t for t in gguf.GGUFReader(gg_file).tensors}
    for name, (arr, qtype) in GG_TENSORS.items():
        assert f.tensors[name].shape == arr.shape and f.tensors[name].qtype == qtype
        np.testing.assert_array_equal(f.read(name), gguf.quants.dequantize(theirs[name].data, qtype))


@pytest.mark.parametrize("case", sorted(GG_CASES))
def test_corrupt_gguf_file(gg_file, case):
    edit, tensor, message = GG_CASES[case]
    with open(gg_file, "rb") as f:
        data = edit(bytearray(f.read()))
    with open(gg_file, "wb") as f:
        f.write(data)
    with pytest.raises(ValueError, match=re.escape(gg_file) + r": .*" + message) as err:
        gguf_file.GgufFile(gg_file)
    _one_line_naming(err, gg_file, f"tensor {tensor}")


def test_gguf_alignment_that_is_not_a_power_of_two(tmp_path):
    path = str(tmp_path / "odd.gguf")
    _write_gguf(path, alignment=64)  # GGUFWriter itself refuses 48
    data = bytearray(open(path, "rb").read())
    key = struct.pack("<Q", len("general.alignment")) + b"general.alignment"
    at = data.index(key) + len(key)
    assert struct.unpack_from("<II", data, at) == (gguf.GGUFValueType.UINT32, 64)
    struct.pack_into("<I", data, at + 4, 48)
    open(path, "wb").write(data)
    with pytest.raises(ValueError, match=re.escape(path) + r": general\.alignment is 48; ggml needs a power of two"):
        gguf_file.GgufFile(path)


# --------------------------------------------------------------------------------------------
# Compressed model: the Orbax directory of export.save and the sparse file of export_sparse
# --------------------------------------------------------------------------------------------

HF_CONFIG = dict(  # a 4-block Llama in two groups of two blocks
    model_type="llama", vocab_size=64, hidden_size=16, intermediate_size=40, num_hidden_layers=4,
    num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32, rms_norm_eps=1e-5,
    rope_theta=10000.0, tie_word_embeddings=False, hidden_act="silu")
RANK = 8


@pytest.fixture(scope="module")
def compressed(tmp_path_factory):
    """(export.save directory, export_sparse file) of a random tiny Llama with random 75%-sparse groups."""
    import jax  # pylint: disable=import-outside-toplevel

    from fips_jax import export, export_sparse, grouping  # pylint: disable=import-outside-toplevel
    from fips_jax.models import registry  # pylint: disable=import-outside-toplevel

    arch = registry.from_hf_config(HF_CONFIG)
    params = jax.jit(arch.init)(jax.random.PRNGKey(0))
    rng = np.random.default_rng(0)
    plan, groups = [], []
    for g, blocks in enumerate([(0, 1), (2, 3)]):
        layout = grouping.group_layout(params, arch.mlp_spec, arch.mlp_path, blocks, group=g)
        v = rng.normal(size=(layout.n_blocks, layout.n_fcs, RANK, layout.p)).astype(np.float32)
        v[rng.random(v.shape) < 0.75] = 0
        plan.append((layout, RANK))
        groups.append({"u": rng.normal(size=(layout.d, RANK)).astype(np.float32), "v": v})
    root = tmp_path_factory.mktemp("compressed")
    directory, path = str(root / "compressed"), str(root / "model.safetensors")
    export.save(directory, arch, params, plan, groups, {})
    export_sparse.convert(directory, path)
    return directory, path


def _group(i, **changes):
    """Manifest edit: update group i (a None value deletes the key)."""
    def edit(m):
        g = m["groups"][i]
        for k, val in changes.items():
            if val is None:
                del g[k]
            else:
                g[k] = val(g[k]) if callable(val) else val
        return m
    return edit


def _drop_group(i):
    return lambda m: m | {"groups": [g for j, g in enumerate(m["groups"]) if j != i]}


def _extra_group(m):
    return m | {"groups": m["groups"] + [dict(m["groups"][1], name="g02")]}


def _one_fc(g):
    return g | {"fc_names": g["fc_names"][:2], "transposed": g["transposed"][:2],
                "fc_paths": [row[:2] for row in g["fc_paths"]]}


DIR_CASES = {
    # id: (manifest edit, group/tensor named, expected message); the message follows "<dir>/params: "
    # or "<dir>/manifest.json: " (manifest-only problems)
    "manifest_group_missing_from_params": (_extra_group, "g02", r"manifest groups \['g02'\] are not in the params"),
    "params_group_missing_from_manifest": (_drop_group(1), "g01", r"params hold groups \['g01'\] that the manifest lacks"),
    "u_shape_vs_manifest_rank": (_group(0, rank=7), "fips/g00/u", r"fips/g00/u has shape \(16, 8\), .* give \(16, 7\)"),
    "u_shape_vs_manifest_d": (_group(1, d=17), "fips/g01/u", r"fips/g01/u has shape \(16, 8\), .* give \(17, 8\)"),
    "v_shape_vs_manifest_p": (_group(1, p=41), "fips/g01/v", r"fips/g01/v has shape \(2, 3, 8, 40\), .* give \(2, 3, 8, 41\)"),
    "v_shape_vs_manifest_blocks": (_group(0, blocks=lambda b: b[:1], fc_paths=lambda r: r[:1]), "fips/g00/v",
                                   r"fips/g00/v has shape \(2, 3, 8, 40\), the manifest's blocks=\[0\] .* give \(1, 3, 8, 40\)"),
    "v_shape_vs_manifest_fc_names": (lambda m: m | {"groups": [_one_fc(m["groups"][0]), m["groups"][1]]}, "fips/g00/v",
                                     r"fips/g00/v has shape \(2, 3, 8, 40\), .* give \(2, 2, 8, 40\)"),
    "v_nonzeros_vs_manifest": (_group(1, v_nonzeros=lambda n: n + 1), "fips/g01/v",
                               r"fips/g01/v has \d+ nonzeros, the manifest's v_nonzeros says \d+"),
    "manifest_group_lacks_rank": (_group(0, rank=None), "g00", r"manifest group g00 lacks required keys \['rank'\]"),
    "manifest_lacks_hf_config": (lambda m: {k: x for k, x in m.items() if k != "hf_config"}, "hf_config",
                                 r"manifest lacks required keys \['hf_config'\]"),
    "manifest_fc_paths_vs_blocks": (_group(1, fc_paths=lambda r: r[:1]), "g01",
                                    r"manifest group g01: fc_paths is not 2 blocks x 3 kernel paths"),
}
MANIFEST_ONLY = {"manifest_group_lacks_rank", "manifest_lacks_hf_config", "manifest_fc_paths_vs_blocks"}


def test_valid_compressed_dir_and_sparse_file_load(compressed):
    from fips_jax import export, export_sparse  # pylint: disable=import-outside-toplevel

    directory, path = compressed
    arch, params, manifest = export.load(directory)
    arch2, params2, manifest2 = export_sparse.load_sparse(path)
    assert arch2 == arch and manifest2 == manifest and len(manifest["groups"]) == 2
    np.testing.assert_array_equal(params2["blocks_3"]["mlp"]["down"]["kernel"], params["blocks_3"]["mlp"]["down"]["kernel"])


@pytest.mark.parametrize("case", sorted(DIR_CASES))
def test_corrupt_compressed_dir(compressed, tmp_path, case):
    from fips_jax import export  # pylint: disable=import-outside-toplevel

    edit, name, message = DIR_CASES[case]
    directory = str(tmp_path / "compressed")
    shutil.copytree(compressed[0], directory)
    mpath = os.path.join(directory, "manifest.json")
    with open(mpath) as f:
        manifest = edit(json.load(f))
    with open(mpath, "w") as f:
        json.dump(manifest, f)
    where = mpath if case in MANIFEST_ONLY else os.path.join(directory, "params")
    with pytest.raises(ValueError, match=re.escape(where) + ": " + message) as err:
        export.load(directory)
    _one_line_naming(err, where, name)


def test_compressed_dir_with_a_misshaped_v_in_the_params(compressed, tmp_path):
    from fips_jax import checkpointing, export  # pylint: disable=import-outside-toplevel

    directory = str(tmp_path / "compressed")
    shutil.copytree(compressed[0], directory)
    tree, _ = export.read_tree(directory)
    group = dict(tree["fips"]["g01"], v=tree["fips"]["g01"]["v"][:, :, :, :39])
    checkpointing.save_tree(os.path.join(directory, "params", "g01"), group)
    where = os.path.join(directory, "params")
    with pytest.raises(ValueError, match=re.escape(where) + r": fips/g01/v has shape \(2, 3, 8, 39\)") as err:
        export.load(directory)
    _one_line_naming(err, where, "fips/g01/v")


def _sparse_manifest(edit):
    return lambda tensors, manifest: (tensors, edit(manifest))


def _sparse_tensors(edit):
    return lambda tensors, manifest: (edit(tensors), manifest)


def _zero_a_value(tensors):
    values = tensors["fips/g00/v/values"].copy()
    values[3] = 0
    return tensors | {"fips/g00/v/values": values}


SPARSE_CASES = {
    # id: (edit(tensors, manifest) -> (tensors, manifest), group/tensor named, expected message)
    "values_count_vs_v_nonzeros": (_sparse_manifest(_group(0, v_nonzeros=lambda n: n + 1)), "fips/g00/v/values",
                                   r"fips/g00/v/values has shape \((\d+),\), the manifest's v_nonzeros give \(\d+,\)"),
    "group_tensors_missing": (_sparse_manifest(_extra_group), "g02", r"group g02 of the manifest: missing tensors \['fips/g02/u'"),
    "group_the_manifest_lacks": (_sparse_manifest(_drop_group(1)), "g01", r"tensors of groups \['g01'\] that the manifest lacks"),
    "u_shape_vs_manifest_rank": (_sparse_manifest(_group(1, rank=9)), "fips/g01/u",
                                 r"fips/g01/u has shape \(16, 8\), the manifest's d/p/rank/blocks/fc_names give \(16, 9\)"),
    "manifest_group_lacks_v_nonzeros": (_sparse_manifest(_group(1, v_nonzeros=None)), "g01",
                                        r"manifest group g01 lacks required keys \['v_nonzeros'\]"),
    "stored_zero_vs_v_nonzeros": (_sparse_tensors(_zero_a_value), "fips/g00/v",
                                  r"fips/g00/v has (\d+) nonzeros, the manifest's v_nonzeros says \d+"),
}


@pytest.mark.parametrize("case", sorted(SPARSE_CASES))
def test_corrupt_sparse_file(compressed, tmp_path, case):
    from safetensors import safe_open  # pylint: disable=import-outside-toplevel
    from safetensors.numpy import save_file  # pylint: disable=import-outside-toplevel

    from fips_jax import export_sparse  # pylint: disable=import-outside-toplevel

    edit, name, message = SPARSE_CASES[case]
    with safe_open(compressed[1], framework="numpy") as f:
        tensors, meta = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    tensors, manifest = edit(tensors, json.loads(meta["manifest"]))
    path = str(tmp_path / "model.safetensors")
    save_file(tensors, path, metadata=meta | {"manifest": json.dumps(manifest)})
    with pytest.raises(ValueError, match=re.escape(path) + ": " + message) as err:
        export_sparse.load_sparse(path)
    _one_line_naming(err, path, name)


def test_sparse_file_with_overlapping_offsets(compressed, tmp_path):
    """A corrupt safetensors layout is reported by the reference reader, as a ValueError."""
    from fips_jax import export_sparse  # pylint: disable=import-outside-toplevel

    path = str(tmp_path / "model.safetensors")
    header, body = _st_split(compressed[1])
    header["fips/g01/u"]["data_offsets"] = [o - 4 for o in header["fips/g01/u"]["data_offsets"]]
    _st_join(path, header, body)
    with pytest.raises(ValueError, match=re.escape(path) + r": corrupt safetensors file \(.*invalid offset") as err:
        export_sparse.load_sparse(path)
    _one_line_naming(err, path, "fips/g01/u")
