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


@pytest.fixture
def st_file(tmp_path):
    path = str(tmp_path / "model.safetensors")
    safetensors_io.write_file(path, ST_TENSORS)
    return path


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
        safetensors_io.write_file(st_file, ST_TENSORS)


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
