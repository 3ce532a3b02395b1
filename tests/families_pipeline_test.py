"""FiPS end to end on the random tiny decoder models (configs/tiny_<family>.py), in process on one
device, one group of all blocks: budget kept, FiPS beats per-layer SVD and its own init on
held-out MLP error, and the exported model reloads to the same perplexity. The hub configs parse
and group every block."""

import os
import time

import jax
import numpy as np
import pytest

from fips_jax import config_base, export, pipeline
from fips_jax.tasks import causal_lm
from fips_jax.evaluators import perplexity
from fips_jax.models import registry

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUIET = lambda msg: None  # noqa: E731
# family -> (architecture name, blocks, local.epochs): few steps, raised where FiPS needs more to
# beat its init.
FAMILIES = {
    "qwen2": ("qwen2", 4, 4.0),
    "qwen3": ("qwen3", 4, 4.0),
    "gemma": ("gemma", 4, 4.0),
    "gemma2": ("gemma2", 4, 4.0),
    "gemma3": ("gemma3_text", 6, 4.0),
}
FCS = 3  # gate, up, down


def _config(name, **overrides):
    one = {"mesh.data": 1, "mesh.fsdp": 1, "mesh.tensor": 1}
    return config_base.load_config(os.path.join(ROOT, "configs", f"{name}.py"), {**one, **overrides})


@pytest.mark.parametrize("family", list(FAMILIES))
def test_tiny_pipeline_compresses_and_reloads(tmp_path, family):
    name, blocks, epochs = FAMILIES[family]
    cfg = _config(f"tiny_{family}", **{"local.epochs": epochs, "fips.group_size": blocks,
                                        "data.eval.max_windows": 4})
    start = time.time()
    m = pipeline.run(cfg, str(tmp_path), log=QUIET)
    assert [g["blocks"] for g in m["groups"]] == [list(range(blocks))]
    # Within budget, by less than one rank's worth per group (a column of U and a row of each V).
    fips = m["budget"]["fips"]
    assert fips["fraction_of_mlp_weights"] <= 0.5
    keep = 1 - cfg["fips"]["sparsity"]
    assert fips["dense_mlp"] * 0.5 - fips["kept_mlp"] < sum(
        g["d"] + keep * FCS * len(g["blocks"]) * g["p"] for g in m["groups"])
    pb = {k: float(np.mean(v)) for k, v in m["per_block"].items() if k.startswith("heldout_rel_error")}
    print(f"\n{family}: {time.time() - start:.1f}s; held-out rel. error FiPS final "
          f"{pb['heldout_rel_error_fips_final']:.4f}, init {pb['heldout_rel_error_fips_init']:.4f}, per-layer SVD "
          f"{pb['heldout_rel_error_per_layer_svd']:.4f}; ppl dense {m['evals']['dense']['ppl']:.3f}, "
          f"FiPS {m['evals']['fips_final']['ppl']:.3f}", end="")
    assert pb["heldout_rel_error_fips_final"] < pb["heldout_rel_error_per_layer_svd"], pb
    assert pb["heldout_rel_error_fips_final"] < pb["heldout_rel_error_fips_init"], pb

    # The exported compressed model reloads to the same perplexity.
    arch, params, manifest = export.load(str(tmp_path / "compressed"))
    assert arch.name == name and manifest["hf_config"]["model_type"] == name
    _, _, tokenizer = registry.load_model(cfg["model"], seed=cfg["seed"])
    ev = cfg["data"]["eval"]
    n = ev["context"] * ev["max_windows"]
    ids = causal_lm.tokens(ev, tokenizer, n)[:n]  # pylint: disable=protected-access
    apply = jax.jit(arch.apply)
    got = perplexity.perplexity(lambda t: apply(params, t), ids, ev["context"], ev["protocol"],
                                batch_size=cfg["eval"]["batch_size"], jit=False)
    assert got["ppl"] == pytest.approx(m["evals"]["fips_final"]["ppl"], rel=1e-5)


@pytest.mark.parametrize("name, path, blocks, groups", [
    ("qwen2_5_0_5b", "Qwen/Qwen2.5-0.5B", 24, 4), ("qwen3_0_6b", "Qwen/Qwen3-0.6B-Base", 28, 4),
    ("gemma_2b", "google/gemma-2b", 18, 5)])
def test_hub_configs(name, path, blocks, groups):
    cfg = _config(name)
    assert cfg["model"]["source"] == "hf" and cfg["model"]["path"] == path
    fips = cfg["fips"]
    if fips["groups"]:
        assert [b for g in fips["groups"] for b in g] == list(range(blocks)) and len(fips["groups"]) == groups
    else:
        assert blocks % fips["group_size"] == 0 and blocks // fips["group_size"] == groups
