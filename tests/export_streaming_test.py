"""The compressed model's exports hold one group's factors at a time (`export.save` from a
generator, `export_sparse.convert` and `export.load` from the directory), the hand-written
safetensors file reads as the `safetensors` package's own writer's does, and directories of the
older one-tree format still load."""

import json
import os
import shutil
import weakref

import jax
import ml_dtypes
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from fips_jax import checkpointing, export, export_sparse, grouping
from fips_jax.models import registry

HF_CONFIG = dict(  # a 4-block Llama, one group per block
    model_type="llama", vocab_size=64, hidden_size=16, intermediate_size=40, num_hidden_layers=4,
    num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32, rms_norm_eps=1e-5,
    rope_theta=10000.0, tie_word_embeddings=False, hidden_act="silu")
RANK = 8


def _model(dtype=np.float32):
    arch = registry.from_hf_config(HF_CONFIG)
    params = jax.tree_util.tree_map(lambda x: np.asarray(x).astype(dtype), jax.jit(arch.init)(jax.random.PRNGKey(0)))
    rng = np.random.default_rng(0)
    plan, groups = [], []
    for g in range(4):
        layout = grouping.group_layout(params, arch.mlp_spec, arch.mlp_path, (g,), group=g)
        v = rng.normal(size=(1, layout.n_fcs, RANK, layout.p)).astype(dtype)
        v[rng.random(v.shape) < 0.75] = 0
        v[0, 0, 1] = 0  # an empty row and a full one: the index code's edge cases
        v[0, 1, 2] = 1
        plan.append((layout, RANK))
        groups.append({"u": rng.normal(size=(layout.d, RANK)).astype(dtype), "v": v})
    return arch, params, plan, groups


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    arch, params, plan, groups = _model()
    directory = str(tmp_path_factory.mktemp("streaming") / "compressed")
    export.save(directory, arch, params, plan, groups, {})
    return directory, groups


def test_save_releases_each_group_before_taking_the_next(tmp_path):
    arch, params, plan, groups = _model()
    refs, alive = [], []

    def one_at_a_time():
        for p in groups:
            alive.append(sum(r() is not None for r in refs))
            fresh = jax.tree_util.tree_map(np.copy, p)
            refs.extend(weakref.ref(x) for x in jax.tree_util.tree_leaves(fresh))
            yield fresh
            del fresh

    directory = str(tmp_path / "compressed")
    export.save(directory, arch, params, plan, one_at_a_time(), {})
    assert alive == [0, 0, 0, 0]
    assert sorted(os.listdir(os.path.join(directory, "params"))) == ["base", "g00", "g01", "g02", "g03"]
    tree, manifest = export.read_tree(directory)
    assert manifest["format"] == export.FORMAT
    for g, p in enumerate(groups):
        np.testing.assert_array_equal(np.asarray(tree["fips"][f"g{g:02d}"]["v"]), p["v"])
        assert manifest["groups"][g]["v_nonzeros"] == np.count_nonzero(p["v"])


def test_convert_and_load_read_one_group_at_a_time(saved, tmp_path, monkeypatch):
    directory, _ = saved
    refs, alive = [], []
    group = export.Saved.group

    def tracked(self, g):
        alive.append(sum(r() is not None for r in refs))
        p = group(self, g)
        refs.extend(weakref.ref(x) for x in jax.tree_util.tree_leaves(p))
        return p

    monkeypatch.setattr(export.Saved, "group", tracked)
    export_sparse.convert(directory, str(tmp_path / "model.safetensors"))
    assert len(alive) == 8 and max(alive) == 0, alive  # two passes over four groups
    alive.clear()
    export.load(directory)
    assert alive == [0, 0, 0, 0]


def _reference_tensors(tree, manifest):
    """What the file must hold, built whole, for the `safetensors` package's writer."""
    tensors = {f"base/{grouping.path_str(k)}": np.asarray(x) for k, x in jax.tree_util.tree_leaves_with_path(tree["base"])}
    for g in manifest["groups"]:
        p = tree["fips"][g["name"]]
        tensors[f"fips/{g['name']}/u"] = np.asarray(p["u"])
        tensors.update({f"fips/{g['name']}/v/{k}": x for k, x in export_sparse.encode_v(p["v"]).items()})
    return tensors


@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16], ids=["float32", "bfloat16"])
def test_sparse_file_reads_as_the_reference_writers_file(tmp_path, dtype):
    arch, params, plan, groups = _model(dtype)
    directory, path, ref = str(tmp_path / "compressed"), str(tmp_path / "ours.safetensors"), str(tmp_path / "ref.safetensors")
    export.save(directory, arch, params, plan, groups, {})
    report = export_sparse.convert(directory, path)
    tree, manifest = export.read_tree(directory)
    tensors = _reference_tensors(tree, manifest)
    save_file(tensors, ref, metadata={"format": export_sparse.FORMAT, "manifest": json.dumps(manifest, sort_keys=True)})
    ours, theirs = load_file(path), load_file(ref)
    assert sorted(ours) == sorted(theirs) == sorted(tensors)
    for k in tensors:
        assert ours[k].dtype == theirs[k].dtype == tensors[k].dtype, k
        np.testing.assert_array_equal(ours[k].view(np.uint8), theirs[k].view(np.uint8), err_msg=k)
    with safe_open(path, framework="numpy") as f, safe_open(ref, framework="numpy") as r:
        assert f.metadata() == r.metadata()
    assert os.path.getsize(path) == os.path.getsize(ref) and report == export_sparse.file_size_report(path)
    # Every tensor starts at a multiple of its item size (the data block at a multiple of 8).
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    assert (8 + n) % 8 == 0
    for k, entry in header.items():
        if k != "__metadata__":
            assert entry["data_offsets"][0] % tensors[k].dtype.itemsize == 0, k


def test_directories_of_the_one_tree_format_still_load(saved, tmp_path):
    directory, _ = saved
    tree, manifest = export.read_tree(directory)
    old = str(tmp_path / "old")
    os.makedirs(old)
    checkpointing.save_tree(os.path.join(old, "params"), tree)
    checkpointing.write_json(os.path.join(old, "manifest.json"), dict(manifest, format=export.FORMAT_ONE_TREE))
    arch, params, _ = export.load(directory)
    arch1, params1, manifest1 = export.load(old)
    assert arch1 == arch and manifest1["format"] == export.FORMAT_ONE_TREE
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), params1, params)
    path, path1 = str(tmp_path / "new.safetensors"), str(tmp_path / "old.safetensors")
    export_sparse.convert(directory, path)
    export_sparse.convert(old, path1)
    a, b = load_file(path), load_file(path1)
    assert sorted(a) == sorted(b) and all(np.array_equal(a[k], b[k]) for k in a)


def test_missing_base_and_too_few_groups_are_named(saved, tmp_path):
    directory, groups = saved
    broken = str(tmp_path / "broken")
    shutil.copytree(directory, broken)
    shutil.rmtree(os.path.join(broken, "params", "base"))
    with pytest.raises(ValueError, match=r"broken/params: base \(the params outside the groups\) is missing"):
        export.load(broken)
    arch, params, plan, _ = _model()
    target = str(tmp_path / "short")
    with pytest.raises(ValueError, match=r"short: 3 groups' params for a plan of 4 groups"):
        export.save(target, arch, params, plan, iter(groups[:3]), {})
    assert not os.path.exists(target)
