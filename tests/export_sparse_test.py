"""One-file sparse export: exact index round trips, same logits as `export.load`, and the size."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fips_jax import config_base, export, export_sparse, pipeline

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(name, **overrides):
    return config_base.load_config(os.path.join(ROOT, "configs", f"{name}.py"), overrides)


@pytest.fixture(scope="module")
def compressed(tmp_path_factory):
    """The tiny Llama compressed by the pipeline at a 50% MLP budget, 75% sparse V (GMP)."""
    wd = str(tmp_path_factory.mktemp("tiny_llama_sparse"))
    cfg = _config("tiny_llama", **{"local.epochs": 2.0})
    assert cfg["fips"]["budget"] == 0.5 and cfg["fips"]["sparsity"] == 0.75
    pipeline.run(cfg, wd, log=lambda m: None)
    path = os.path.join(wd, "model.safetensors")
    report = export_sparse.convert(os.path.join(wd, "compressed"), path)
    return os.path.join(wd, "compressed"), path, report


def test_reload_gives_the_same_params_and_logits(compressed):
    directory, path, _ = compressed
    arch, params, manifest = export.load(directory)
    arch2, params2, manifest2 = export_sparse.load_sparse(path)
    assert arch2 == arch and manifest2 == manifest
    flat = {jax.tree_util.keystr(k): np.asarray(x) for k, x in jax.tree_util.tree_leaves_with_path(params)}
    flat2 = {jax.tree_util.keystr(k): np.asarray(x) for k, x in jax.tree_util.tree_leaves_with_path(params2)}
    assert flat.keys() == flat2.keys()
    for k in flat:
        np.testing.assert_array_equal(flat2[k], flat[k], err_msg=k)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 256, (2, 48)), jnp.int32)
    apply = jax.jit(arch.apply)  # one compile for both: same function, same shapes
    logits, logits2 = np.asarray(apply(params, tokens)), np.asarray(apply(params2, tokens))
    assert np.abs(logits).max() > 0.1
    np.testing.assert_array_equal(logits2, logits)


def test_v_round_trips_exactly_and_only_nonzeros_are_stored(compressed):
    directory, path, _ = compressed
    tree, _ = export.read_tree(directory)
    tree2, manifest = export_sparse.read(path)
    for g in manifest["groups"]:
        v = np.asarray(tree["fips"][g["name"]]["v"])
        np.testing.assert_array_equal(np.asarray(tree2["fips"][g["name"]]["v"]), v)
        assert export_sparse.encode_v(v)["values"].size == g["v_nonzeros"] == np.count_nonzero(v)


def test_50_percent_budget_fits_in_55_percent_of_the_dense_mlp_bytes(compressed):
    _, path, report = compressed
    # Every byte of the file is accounted for (the rest is the JSON header).
    parts = report.mlp_bytes + report.bias_bytes + report.other_bytes
    assert 0 < report.file_bytes - parts < 16384
    assert report.v_index_bytes > 0
    assert report.mlp_fraction <= 0.55, report.table()
    # Indices included, the file is not allowed to hide anything: at float32 the nonzeros alone
    # are the budget (49.5% kept for this model), the indices cost the rest.
    assert report.u_bytes + report.v_value_bytes <= 0.5 * report.dense_mlp_bytes
    assert export_sparse.file_size_report(path) == report


def test_encode_decode_every_row_kind():
    rng = np.random.default_rng(1)
    p = 200  # bitmap row: 25 bytes, so rows with < 13 nonzeros list their columns
    v = np.zeros((2, 3, 6, p), np.float32)
    v[0, 0, 0] = rng.standard_normal(p)                 # full row: no index
    v[0, 1, 2, [3, 77, 199]] = [1.5, -2.0, 3.0]         # column list
    v[1, 2, 5] = np.where(rng.random(p) < 0.3, rng.standard_normal(p), 0)  # bitmap
    v[1, 0, 1, 0] = -0.0                                # a signed zero is not a nonzero
    parts = export_sparse.encode_v(v)
    assert parts["row_nnz"].dtype == np.uint16 and parts["cols"].dtype == np.uint16
    assert parts["cols"].tolist() == [3, 77, 199] and parts["bitmap"].shape == (1, 25)
    np.testing.assert_array_equal(export_sparse.decode_v(parts, v.shape), v)
    bad = dict(parts, cols=np.asarray([3, 77, 77], np.uint16))
    with pytest.raises(ValueError, match="disagree"):
        export_sparse.decode_v(bad, v.shape)
    with pytest.raises(ValueError, match="do not fit"):
        export_sparse.decode_v(dict(parts, values=parts["values"][:-1]), v.shape)


def test_refuses_other_files(tmp_path):
    from safetensors.numpy import save_file

    path = str(tmp_path / "other.safetensors")
    save_file({"w": np.zeros(3, np.float32)}, path, metadata={"format": "pt"})
    with pytest.raises(ValueError, match="format"):
        export_sparse.load_sparse(path)
    with pytest.raises(FileNotFoundError):
        export_sparse.load_sparse(str(tmp_path / "missing.safetensors"))


def test_missing_tensor_is_named(compressed, tmp_path):
    from safetensors import safe_open
    from safetensors.numpy import save_file

    _, path, _ = compressed
    with safe_open(path, framework="numpy") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys() if k != "fips/g01/v/cols"}
        meta = f.metadata()
    broken = str(tmp_path / "broken.safetensors")
    save_file(tensors, broken, metadata=meta)
    with pytest.raises(ValueError, match="g01/v/cols"):
        export_sparse.read(broken)
    assert json.loads(meta["manifest"])["format"] == export.FORMAT
