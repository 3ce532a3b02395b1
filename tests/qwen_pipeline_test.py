"""FiPS end to end on random tiny Qwen2 and Qwen3 models (configs/tiny_qwen{2,3}.py), in process on
one device: budget kept, FiPS beats per-layer SVD and its own init on held-out error, and the
exported model reloads to the same perplexity; the hub configs parse and group every block."""

import os

import jax
import numpy as np
import pytest

from fips_jax import config_base, export, pipeline
from fips_jax.evaluators import perplexity
from fips_jax.models import registry

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUIET = lambda msg: None  # noqa: E731


def _config(name, **overrides):
    one = {"mesh.data": 1, "mesh.fsdp": 1, "mesh.tensor": 1}
    return config_base.load_config(os.path.join(ROOT, "configs", f"{name}.py"), {**one, **overrides})


@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
def test_tiny_pipeline_compresses_and_reloads(tmp_path, family):
    cfg = _config(f"tiny_{family}", **{"local.epochs": 4.0, "fips.group_size": 4, "data.eval.max_windows": 4})
    m = pipeline.run(cfg, str(tmp_path), log=QUIET)
    fips = m["budget"]["fips"]
    assert fips["fraction_of_mlp_weights"] <= 0.5
    pb = {k: float(np.mean(v)) for k, v in m["per_block"].items() if k.startswith("heldout_rel_error")}
    print(f"\n{family}: held-out rel. error FiPS final {pb['heldout_rel_error_fips_final']:.4f}, "
          f"init {pb['heldout_rel_error_fips_init']:.4f}, per-layer SVD {pb['heldout_rel_error_per_layer_svd']:.4f}; "
          f"ppl dense {m['evals']['dense']['ppl']:.3f}, FiPS {m['evals']['fips_final']['ppl']:.3f}", end="")
    assert pb["heldout_rel_error_fips_final"] < pb["heldout_rel_error_per_layer_svd"]
    assert pb["heldout_rel_error_fips_final"] < pb["heldout_rel_error_fips_init"]

    arch, params, manifest = export.load(str(tmp_path / "compressed"))
    assert arch.name == family and manifest["hf_config"]["model_type"] == family
    _, _, tokenizer = registry.load_model(cfg["model"], seed=cfg["seed"])
    ev = cfg["data"]["eval"]
    n = ev["context"] * ev["max_windows"]
    ids = pipeline._tokens(ev, tokenizer, n)[:n]
    apply = jax.jit(arch.apply)
    got = perplexity.perplexity(lambda t: apply(params, t), ids, ev["context"], ev["protocol"],
                                batch_size=cfg["eval"]["batch_size"], jit=False)
    assert got["ppl"] == pytest.approx(m["evals"]["fips_final"]["ppl"], rel=1e-5)


@pytest.mark.parametrize("name, path, blocks", [("qwen2_5_0_5b", "Qwen/Qwen2.5-0.5B", 24),
                                                ("qwen3_0_6b", "Qwen/Qwen3-0.6B-Base", 28)])
def test_hub_configs(name, path, blocks):
    cfg = _config(name)
    assert cfg["model"]["source"] == "hf" and cfg["model"]["path"] == path
    assert blocks % cfg["fips"]["group_size"] == 0 and blocks // cfg["fips"]["group_size"] == 4
