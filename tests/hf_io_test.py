"""safetensors reading/writing, name-map conversion and checkpoint loading errors."""

import copy
import json
import os
import shutil

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import traverse_util

from fips_jax.hf import checkpoint, convert, safetensors_io
from fips_jax.hf import llama as hf_llama

TINY = dict(
    vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=32, tie_word_embeddings=False,
)
UP = "model.layers.1.mlp.up_proj.weight"


@pytest.fixture(scope="module")
def hf_model():
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM._from_config(transformers.LlamaConfig(**TINY), attn_implementation="eager")


@pytest.fixture(scope="module")
def hf_dir(hf_model, tmp_path_factory):
    path = tmp_path_factory.mktemp("hf")
    hf_model.save_pretrained(path)
    return path


def _copy_with(src, dst, edit):
    """Copy a single-file checkpoint folder, rewriting its tensors through edit(dict)."""
    shutil.copytree(src, dst)
    reader = safetensors_io.SafetensorsReader(str(dst))
    tensors = {k: reader.get(k, None) for k in reader.keys()}
    edit(tensors)
    safetensors_io.write_file(str(dst / safetensors_io.SINGLE_FILE), tensors)
    return str(dst)


def _flat(params):
    return {k: np.asarray(v) for k, v in traverse_util.flatten_dict(params, sep="/").items()}


def test_writer_reader_round_trip_and_library_compatibility(tmp_path):
    safetensors_numpy = pytest.importorskip("safetensors.numpy")
    rng = np.random.RandomState(0)
    tensors = {
        "f32": rng.randn(3, 5).astype(np.float32),
        "f16": rng.randn(7).astype(np.float16),
        "bf16": rng.randn(2, 3).astype(ml_dtypes.bfloat16),
        "i64": np.arange(6, dtype=np.int64).reshape(2, 3),
    }
    path = str(tmp_path / "t.safetensors")
    safetensors_io.write_file(path, tensors)
    reader = safetensors_io.SafetensorsReader(path)
    assert reader.keys() == sorted(tensors) and reader.dtype_name("bf16") == "BF16"
    for k, v in tensors.items():
        got = reader.get(k, None)
        assert got.dtype == v.dtype and got.shape == v.shape
        np.testing.assert_array_equal(got, v)
    np.testing.assert_array_equal(reader.get("bf16"), tensors["bf16"].astype(np.float32))
    # The safetensors package reads every one of them, bf16 included (as ml_dtypes.bfloat16),
    # and what it writes reads back here bit for bit.
    lib = safetensors_numpy.load_file(path)
    assert set(lib) == set(tensors)
    for k, v in tensors.items():
        assert lib[k].dtype == v.dtype
        np.testing.assert_array_equal(lib[k], v)
    safetensors_numpy.save_file(tensors, path)
    reader = safetensors_io.SafetensorsReader(path)
    assert reader.dtype_name("bf16") == "BF16"
    for k, v in tensors.items():
        np.testing.assert_array_equal(reader.get(k, None), v)


def test_transforms_are_reversible():
    rng = np.random.RandomState(0)
    for name, flax_shape in [("identity", (3, 4)), ("transpose", (3, 4)), ("conv", (2, 3, 4, 5)),
                             ("heads_in", (6, 2, 3)), ("heads_out", (2, 3, 6)), ("heads_bias", (2, 3))]:
        t = convert.TRANSFORMS[name]
        hf = rng.randn(*t.hf_shape(flax_shape))
        flax = t.to_flax(hf, flax_shape)
        assert flax.shape == flax_shape, name
        np.testing.assert_array_equal(t.to_hf(flax), hf)


def test_sharded_and_bf16_checkpoints_load(hf_model, hf_dir, tmp_path):
    torch = pytest.importorskip("torch")
    _, ref = checkpoint.load_pretrained(str(hf_dir))
    hf_model.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    shards = [f for f in os.listdir(tmp_path / "sharded") if f.endswith(".safetensors")]
    assert len(shards) > 2 and os.path.exists(tmp_path / "sharded" / safetensors_io.INDEX_FILE)
    _, sharded = checkpoint.load_pretrained(str(tmp_path / "sharded"))
    for k, v in _flat(ref).items():
        np.testing.assert_array_equal(_flat(sharded)[k], v)

    copy.deepcopy(hf_model).to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    assert safetensors_io.SafetensorsReader(str(tmp_path / "bf16")).dtype_name(UP) == "BF16"
    arch, bf16 = checkpoint.load_pretrained(str(tmp_path / "bf16"))
    up = bf16["blocks_1"]["mlp"]["up"]["kernel"]
    assert up.dtype == jnp.float32
    want = hf_model.model.layers[1].mlp.up_proj.weight.detach().to(torch.bfloat16).float().numpy().T
    np.testing.assert_array_equal(np.asarray(up), want)
    assert 0 < np.abs(np.asarray(up) - _flat(ref)["blocks_1/mlp/up/kernel"]).max() < 1e-2
    arch16, p16 = checkpoint.load_pretrained(str(tmp_path / "bf16"), dtype=jnp.bfloat16)
    assert arch16.dtype == jnp.bfloat16 and p16["embed"]["embedding"].dtype == jnp.bfloat16


def test_save_pretrained_sharded_reloads_everywhere(hf_model, hf_dir, tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    arch, params = checkpoint.load_pretrained(str(hf_dir))
    files = checkpoint.save_pretrained(arch, params, str(tmp_path / "out"), max_shard_bytes=30_000)
    assert safetensors_io.INDEX_FILE in files and len(files) > 4
    with open(tmp_path / "out" / safetensors_io.INDEX_FILE) as f:
        assert len(json.load(f)["weight_map"]) == len(hf_model.state_dict())
    _, again = checkpoint.load_pretrained(str(tmp_path / "out"))
    for k, v in _flat(params).items():
        np.testing.assert_array_equal(_flat(again)[k], v)
    tokens = np.arange(10)[None] % 64
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", attn_implementation="eager")
    with torch.no_grad():
        want = hf_model.eval()(torch.tensor(tokens)).logits.numpy()
        got = reloaded.eval()(torch.tensor(tokens)).logits.numpy()
    np.testing.assert_allclose(got, want, atol=1e-6)


def test_missing_extra_and_misshaped_tensors_are_all_named(hf_dir, tmp_path):
    def drop(t):
        del t[UP]

    def add(t):
        t["model.layers.0.mlp.extra_proj.weight"] = np.zeros((3, 4), np.float32)

    def reshape(t):
        t[UP] = np.zeros((40, 32), np.float32)

    cases = [(drop, [UP, "missing", "(48, 32)"]),
             (add, ["extra_proj", "unexpected", "(3, 4)"]),
             (reshape, [UP, "(40, 32)", "(48, 32)"])]
    for i, (edit, words) in enumerate(cases):
        folder = _copy_with(hf_dir, tmp_path / f"case{i}", edit)
        with pytest.raises(ValueError) as err:
            checkpoint.load_pretrained(folder)
        for w in words:
            assert w in str(err.value), (w, str(err.value))

    def all_three(t):
        drop(t), add(t)
        t["model.norm.weight"] = np.zeros((31,), np.float32)

    folder = _copy_with(hf_dir, tmp_path / "all", all_three)
    with pytest.raises(ValueError) as err:
        checkpoint.load_pretrained(folder)
    msg = str(err.value)
    assert UP in msg and "extra_proj" in msg and "model.norm.weight" in msg and msg.count("\n  - ") == 3


def test_truncated_and_corrupt_files_fail_before_loading(hf_dir, tmp_path):
    folder = tmp_path / "cut"
    shutil.copytree(hf_dir, folder)
    path = folder / safetensors_io.SINGLE_FILE
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])
    with pytest.raises(ValueError, match=r"model\.safetensors: truncated"):
        checkpoint.load_pretrained(str(folder))
    path.write_bytes(data[:5])
    with pytest.raises(ValueError, match="truncated"):
        checkpoint.load_pretrained(str(folder))
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all" + data[24:])
    with pytest.raises(ValueError, match="corrupt"):
        checkpoint.load_pretrained(str(folder))


def test_sharded_index_naming_an_absent_shard_fails(hf_model, tmp_path):
    hf_model.save_pretrained(tmp_path / "s", max_shard_size="20KB")
    first = sorted(f for f in os.listdir(tmp_path / "s") if f.endswith(".safetensors"))[0]
    os.remove(tmp_path / "s" / first)
    with pytest.raises(ValueError, match=first):
        checkpoint.load_pretrained(str(tmp_path / "s"))


def test_unsupported_model_type_names_the_supported_ones(hf_dir, tmp_path):
    folder = tmp_path / "bert"
    shutil.copytree(hf_dir, folder)
    with open(folder / "config.json") as f:
        cfg = json.load(f)
    with open(folder / "config.json", "w") as f:
        json.dump({**cfg, "model_type": "bert"}, f)
    with pytest.raises(ValueError, match=r"'bert'.*'gemma2'.*'llama'"):
        checkpoint.load_pretrained(str(folder))
    with pytest.raises(ValueError, match="not a checkpoint folder"):
        checkpoint.load_pretrained(str(tmp_path / "nowhere"))


def test_key_map_covers_every_param_exactly_once():
    cfg = hf_llama.config_from_hf(TINY)
    arch = hf_llama.build_architecture(cfg)
    shapes = convert.expected_shapes(arch.init)
    paths = [e.flax_path for e in hf_llama.key_map(cfg)]
    assert sorted(paths) == sorted(shapes) and len(set(paths)) == len(paths)


def test_hub_ids_go_through_snapshot_download(hf_dir, monkeypatch):
    huggingface_hub = pytest.importorskip("huggingface_hub")
    calls = []

    def fake_snapshot_download(repo_id, allow_patterns):
        calls.append((repo_id, allow_patterns))
        return str(hf_dir)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    arch, _ = checkpoint.load_pretrained("someone/tiny-llama")
    assert arch.name == "llama" and calls[0][0] == "someone/tiny-llama"
    assert "*.safetensors" in calls[0][1] and not any(p.endswith(".bin") for p in calls[0][1])
