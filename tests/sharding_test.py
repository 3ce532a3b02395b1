"""Meshes, logical-axis rules, sharded loading, and the local step sharded on a 2x4 mesh.

Runs on the 8 host-platform CPU devices that tests/conftest.py asks for.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from fips_jax import budget, calibration, checkpointing, factors, grouping, local_opt, sharding, sparsity, svd_init
from fips_jax.hf import checkpoint
from fips_jax.models import registry

RULES = sharding.DEFAULT_RULES
TINY_LLAMA = dict(
    model_type="llama", vocab_size=256, hidden_size=32, intermediate_size=80, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5,
    rope_theta=10000.0, tie_word_embeddings=False, hidden_act="silu")
MESH_2x4 = {"data": 2, "fsdp": 4, "tensor": 1}
U_SPEC, V_SPEC = P("fsdp", None), P(None, None, None, ("fsdp", "tensor"))


@pytest.fixture(scope="module")
def tiny():
    arch = registry.from_hf_config(TINY_LLAMA)
    return arch, jax.jit(arch.init)(jax.random.PRNGKey(0))


# --- meshes and rules ------------------------------------------------------------------------


def test_make_mesh_shapes_and_errors():
    assert dict(sharding.make_mesh(MESH_2x4).shape) == MESH_2x4
    assert dict(sharding.make_mesh({"data": 2, "fsdp": -1, "tensor": 1}).shape) == MESH_2x4
    assert sharding.make_mesh({"data": 1, "fsdp": 2, "tensor": 1}).devices.size == 2  # a subset
    with pytest.raises(ValueError, match="multiple of 3 devices, have 8"):
        sharding.make_mesh({"data": 3, "fsdp": -1})
    with pytest.raises(ValueError, match="at most one mesh axis may be -1"):
        sharding.make_mesh({"data": -1, "fsdp": -1})
    with pytest.raises(ValueError, match=">= 1 or -1"):
        sharding.make_mesh({"data": 0})


def test_rules_resolve_each_mesh_axis_once_and_only_where_it_divides():
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    spec = lambda axes, shape: sharding.logical_to_spec(axes, mesh, RULES, shape)
    assert spec(sharding.U_AXES, (32, 47)) == P("fsdp", None)
    assert spec(sharding.V_AXES, (2, 3, 47, 80)) == V_SPEC  # never split on the rank, split on p
    assert spec(sharding.V_AXES, (2, 3, 47, 6)) == P(None, None, None, "tensor")  # 6 % 4: next candidate
    assert spec(sharding.ACTIVATION_AXES, (2, 128, 32)) == P(None, ("data", "fsdp"), None)
    assert spec(sharding.GROUP_MATRIX_AXES, (32, 480)) == P(None, ("data", "fsdp", "tensor"))
    # First free candidate wins.
    two = (("x", "fsdp"), ("x", "tensor"), ("y", "fsdp"))
    assert sharding.logical_to_spec(("y", "x"), mesh, two) == P("fsdp", "tensor")
    assert spec(P(), (4, 8)) == P()  # unannotated: replicated
    with pytest.raises(ValueError, match=r"logical axes \('embed',\) do not match shape \(4, 8\)"):
        spec(("embed",), (4, 8))
    with pytest.raises(ValueError, match="'nope' has no sharding rule"):
        spec(("nope",), (4,))
    with pytest.raises(ValueError, match=r"mesh axes \['model'\] not in the mesh"):
        sharding.logical_to_spec(("embed",), mesh, (("embed", "model"),))


def test_rules_from_config():
    assert sharding.rules_from_config(()) is RULES
    assert sharding.rules_from_config([["embed", "fsdp"], ["tokens", ["data", "fsdp"]], ["mlp", None]]) == (
        ("embed", "fsdp"), ("tokens", ("data", "fsdp")), ("mlp", None))
    with pytest.raises(ValueError, match="is not \\(logical name"):
        sharding.rules_from_config([("embed",)])


def test_model_params_follow_the_rules(tiny):
    arch, params = tiny
    mesh = sharding.make_mesh(MESH_2x4)
    sh = sharding.logical_to_sharding(arch.logical_axes(), mesh, RULES, params)
    assert sh["blocks_0"]["mlp"]["gate"]["kernel"].spec == P("fsdp", "tensor")
    assert sh["blocks_0"]["mlp"]["down"]["kernel"].spec == P(("fsdp", "tensor"), None)  # p comes first
    assert sh["blocks_1"]["attn"]["k"]["kernel"].spec == P("fsdp", "tensor")
    assert sh["embed"]["embedding"].spec == P("tensor", "fsdp")
    placed = jax.device_put(params, sh)
    assert placed["embed"]["embedding"].addressable_shards[0].data.shape == (256, 8)
    assert sharding.check_replication(placed, 0) == 0  # even norm scales split: 32 % 4 == 0
    replicated_embed = placed | {"embed": jax.device_put(params["embed"], NamedSharding(mesh, P()))}
    assert sharding.check_replication(replicated_embed, 256 * 32 * 4) == 256 * 32 * 4
    with pytest.raises(ValueError, match=r"replicated on every device.*\['embed'\]\['embedding'\] \[256, 32\]"):
        sharding.check_replication(replicated_embed, 1000)


def test_place_fn_loads_each_tensor_onto_its_shards(tiny, tmp_path):
    arch, params = tiny
    checkpoint.save_pretrained(arch, params, str(tmp_path))
    mesh = sharding.make_mesh(MESH_2x4)
    _, loaded = checkpoint.load_pretrained(str(tmp_path), place=sharding.place_fn(mesh, RULES, arch.logical_axes()))
    gate = loaded["blocks_1"]["mlp"]["gate"]["kernel"]
    assert gate.sharding.spec == P("fsdp", "tensor")
    assert {s.data.shape for s in gate.addressable_shards} == {(8, 80)}
    for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(params)):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="no logical axes for 'blocks_9/x'"):
        sharding.place_fn(mesh, RULES, arch.logical_axes())("blocks_9/x", np.zeros(3))


def test_distributed_reason_reads_the_environment():
    assert sharding.distributed_reason({}) is None
    assert sharding.distributed_reason({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "1", "SLURM_STEP_NODELIST": "n1"}) is None
    assert "2 tasks" in sharding.distributed_reason(
        {"SLURM_JOB_ID": "7", "SLURM_NTASKS": "2", "SLURM_STEP_NODELIST": "n[1-2]"})
    assert sharding.distributed_reason({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "2"}) is None  # sbatch shell
    assert sharding.distributed_reason({"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234"})
    assert sharding.distributed_reason({"TPU_WORKER_HOSTNAMES": "w0,w1,w2,w3"}) == "multi-host TPU slice"
    assert sharding.distributed_reason({"TPU_WORKER_HOSTNAMES": "localhost"}) is None
    assert sharding.distributed_reason({"FIPS_DISTRIBUTED": "0", "JAX_COORDINATOR_ADDRESS": "a:1"}) is None
    assert not sharding.initialize_distributed({})


def test_distributed_kwargs_fill_what_jax_does_not_detect():
    assert sharding.distributed_kwargs({}) == {}
    assert sharding.distributed_kwargs({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "4",
                                        "JAX_PROCESS_ID": "2"}) == {"num_processes": 4, "process_id": 2}
    slurm = {"SLURM_NTASKS": "2", "SLURM_NNODES": "2", "SLURM_GPUS_ON_NODE": "8"}
    assert sharding.distributed_kwargs(slurm) == {"local_device_ids": list(range(8))}
    assert sharding.distributed_kwargs(slurm | {"SLURM_NTASKS": "16"}) == {}  # one task per GPU: jax's default
    assert sharding.distributed_kwargs(slurm | {"JAX_LOCAL_DEVICE_IDS": "0,1"}) == {}


# --- the local step, sharded -------------------------------------------------------------------


@pytest.fixture(scope="module")
def group_problem(tiny):
    """One group (blocks 0-1) of the tiny Llama: initial params, MLP inputs/targets, optimiser."""
    arch, params = tiny
    spec = arch.mlp_spec
    layout = grouping.group_layout(params, spec, arch.mlp_path, (0, 1))
    tokens = np.random.default_rng(0).integers(0, 256, (4, 32))
    x = calibration.HiddenStream(arch, params, tokens, chunk=4).advance(layout.blocks)  # [2, 128, 32]
    y = np.asarray(local_opt.mlp_targets(spec, local_opt.stack_dense_mlps(params, layout), jnp.asarray(x)))
    rank = budget.rank_for_budget(layout.d, layout.p, 2, 3, 0.5, 0.75, round_to=8)
    assert rank == 48
    init = svd_init.init_group(grouping.concat_group(params, layout), rank, 2, 3)
    p0 = factors.init_group_params(init, params, layout, spec)
    cfg = local_opt.LocalOptConfig(steps=10, lr=1e-2, end_lr=1e-4, weight_decay=0.01, update_freq=3)
    tx, updater = local_opt.make_optimizer(cfg)
    key = jax.random.PRNGKey(1)

    def loss_fn(p, step, x, y):
        idx = local_opt.minibatch_indices(key, step, x.shape[1], 64)
        return local_opt.mlp_group_loss(p, spec, x[:, idx], y[:, idx])

    return p0, x, y, tx, updater, local_opt.make_step(loss_fn, tx, updater)


def _run(step, params, opt_state, x, y, steps=10):
    for s in range(steps):
        params, opt_state, _, _ = step(params, opt_state, jnp.int32(s), x, y)
    return params, opt_state


def _adam_leaves(opt_state):
    """{"mu/v": leaf, ...} for Adam's moment trees inside the wrapped optimiser state."""
    out = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(opt_state):
        names = [str(getattr(k, "name", getattr(k, "key", ""))) for k in path]
        if "mu" in names or "nu" in names:
            out["/".join(names[-2:])] = leaf
    return out


def _flat(state):
    return {str(i): x for i, x in enumerate(jax.tree.leaves(state))}


def test_sharded_local_step_matches_unsharded_and_restores_on_another_mesh(group_problem, tmp_path):
    p0, x, y, tx, updater, step_fn = group_problem
    opt0 = tx.init(p0)
    p0 = updater.post_gradient_update(p0, opt0)  # the schedule's initial masks, as in train()
    ref_params, ref_opt = _run(jax.jit(step_fn), p0, opt0, jnp.asarray(x), jnp.asarray(y))

    mesh = sharding.make_mesh(MESH_2x4)
    psh = sharding.group_shardings(p0, mesh, RULES)
    params = jax.device_put(p0, psh)
    opt_state = sharding.sharded_init(tx.init, params, shardings=lambda a: sharding.shadow_shardings(a, p0, psh))
    osh = jax.tree.map(lambda a: a.sharding, opt_state)
    act = sharding.logical_to_sharding(sharding.ACTIVATION_AXES, mesh, RULES, x)
    rep = NamedSharding(mesh, P())
    step = jax.jit(step_fn, in_shardings=(psh, osh, rep, act, act), out_shardings=(psh, osh, rep, rep),
                   donate_argnums=(0, 1))
    x_s, y_s = sharding.put(x, act), sharding.put(y, act)
    assert {s.data.shape for s in x_s.addressable_shards} == {(2, 16, 32)}  # tokens over data x fsdp
    params, opt_state = _run(step, params, opt_state, x_s, y_s)

    for a, b in zip(jax.tree.leaves((params, opt_state)), jax.tree.leaves((ref_params, ref_opt))):
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), atol=1e-5, rtol=1e-5)
    masks = sparsity.get_sparse_state(opt_state).masks
    assert 0.25 < 1 - float(jnp.mean(masks["v"])) <= 0.75  # GMP pruned past its initial 25%
    np.testing.assert_array_equal(params["v"] == 0, ~masks["v"])

    # Shardings are what the rules say: params, their masks and Adam moments alike; scalars replicated.
    assert params["u"].sharding.spec == U_SPEC and params["v"].sharding.spec == V_SPEC
    assert masks["v"].sharding.spec == V_SPEC and masks["u"] is None
    adam = _adam_leaves(opt_state)
    assert set(adam) == {"mu/u", "mu/v", "nu/u", "nu/v"}
    for name, leaf in adam.items():
        assert leaf.sharding.spec == (U_SPEC if name.endswith("u") else V_SPEC), name
    assert sparsity.get_sparse_state(opt_state).count.sharding.spec == P()
    assert sparsity.get_sparse_state(opt_state).target_sparsities["v"].sharding.spec == P()

    # Orbax: save the sharded state, restore it onto a 1x8 mesh with target shardings.
    ckpt = checkpointing.LoopCheckpointer(str(tmp_path / "loop"))
    ckpt.save(10, {"leaves": _flat({"params": params, "opt_state": opt_state})})
    ckpt.wait()
    mesh8 = sharding.make_mesh({"data": 1, "fsdp": 8, "tensor": 1})
    psh8 = sharding.group_shardings(p0, mesh8, RULES)
    osh8 = sharding.shadow_shardings(jax.eval_shape(tx.init, p0), p0, psh8)
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          {"params": ref_params, "opt_state": ref_opt}, {"params": psh8, "opt_state": osh8})
    restored = ckpt.restore(10, {"leaves": _flat(target)})["leaves"]
    ckpt.close()
    saved = jax.tree.leaves({"params": params, "opt_state": opt_state})
    for i, (want, like) in enumerate(zip(saved, jax.tree.leaves(target))):
        got = restored[str(i)]
        assert got.sharding.mesh.shape == mesh8.shape and got.sharding.spec == like.sharding.spec, i
        np.testing.assert_array_equal(got, want)
    u = restored[str(len(saved) - 1 - 1)]  # params {"u", "v"} are the last leaves
    assert u.shape == (32, 48) and {s.data.shape for s in u.addressable_shards} == {(4, 48)}


def test_shadow_shardings_match_by_path_and_shape():
    mesh = sharding.make_mesh(MESH_2x4)
    params = {"u": jnp.zeros((8, 4)), "bias": {"gate": jnp.zeros((2, 8))}}
    psh = {"u": NamedSharding(mesh, P("fsdp", None)), "bias": {"gate": NamedSharding(mesh, P(None, "fsdp"))}}
    state = jax.eval_shape(optax.adam(1e-3).init, params)
    sh = sharding.shadow_shardings(state, params, psh)
    assert sh[0].mu["bias"]["gate"].spec == P(None, "fsdp") and sh[0].nu["u"].spec == P("fsdp", None)
    assert sh[0].count.spec == P()
    # A same-named leaf of another shape is not a shadow.
    assert sharding.shadow_shardings({"u": jnp.zeros(())}, params, psh)["u"].spec == P()
