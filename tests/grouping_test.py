import numpy as np
import pytest

from fips_jax import grouping
from fips_jax.models import base

GATED = base.MlpSpec(("gate", "up", "down"), (False, False, True), "silu", gated=True, has_bias=False)


def _params(spec, n_blocks, d, p, seed=0):
    rng = np.random.default_rng(seed)
    blocks = {}
    for b in range(n_blocks):
        mlp = {}
        for name, tr in zip(spec.fc_names, spec.transposed):
            mlp[name] = {"kernel": rng.standard_normal((p, d) if tr else (d, p)).astype(np.float32)}
        blocks[f"blocks_{b}"] = {"mlp": mlp, "norm": {"scale": np.ones(d, np.float32)}}
    return blocks


@pytest.mark.parametrize("spec", [base.VIT_MLP, GATED], ids=["vit", "gated"])
def test_round_trip_is_bit_exact(spec):
    d, p = 6, 10  # p != 4d
    params = _params(spec, 4, d, p)
    layout = grouping.group_layout(params, spec, lambda b: f"blocks_{b}/mlp", (1, 2, 3))
    w = grouping.concat_group(params, layout)
    assert w.shape == (d, 3 * len(spec.fc_names) * p)
    # block-major: the second column block is FC 1 of block 1, transposed if it is fc2/down
    second = params["blocks_1"]["mlp"][spec.fc_names[1]]["kernel"]
    np.testing.assert_array_equal(np.asarray(w[:, p:2 * p]), second.T if spec.transposed[1] else second)
    back = grouping.split_group(w, layout)
    assert len(back) == 3 * len(spec.fc_names)
    for path, k in back.items():
        np.testing.assert_array_equal(np.asarray(k), base.get_path(params, path))
    rebuilt = grouping.replace_kernels(params, back)
    for a, b in zip(np.asarray(w).ravel(), np.asarray(grouping.concat_group(rebuilt, layout)).ravel()):
        assert a == b


def test_make_groups():
    assert grouping.make_groups(12, group_size=4) == ((0, 1, 2, 3), (4, 5, 6, 7), (8, 9, 10, 11))
    assert grouping.make_groups(5, group_size=2) == ((0, 1), (2, 3), (4,))
    assert grouping.make_groups(4, groups=[[0, 1], [2, 3]]) == ((0, 1), (2, 3))
    with pytest.raises(ValueError, match=r"blocks \[3\] are in no group"):
        grouping.make_groups(4, groups=[[0, 1], [2]])
    with pytest.raises(ValueError, match=r"block 1 is in group 0 and group 1"):
        grouping.make_groups(3, groups=[[0, 1], [1, 2]])
    with pytest.raises(ValueError, match=r"out of range"):
        grouping.make_groups(3, groups=[[0, 1, 2, 3]])


def test_unequal_shapes_in_a_group_are_an_error():
    params = _params(base.VIT_MLP, 2, 6, 10)
    params["blocks_1"]["mlp"]["fc1"]["kernel"] = np.zeros((6, 12), np.float32)
    with pytest.raises(ValueError, match=r"blocks_1/mlp/fc1/kernel is \(6, 12\)"):
        grouping.group_layout(params, base.VIT_MLP, lambda b: f"blocks_{b}/mlp", (0, 1))


def test_missing_kernel_is_named():
    params = _params(base.VIT_MLP, 2, 6, 10)
    with pytest.raises(ValueError, match=r"block 2 has no MLP kernel at 'blocks_2/mlp/fc1/kernel'"):
        grouping.group_layout(params, base.VIT_MLP, lambda b: f"blocks_{b}/mlp", (1, 2))


def test_select_paths():
    params = _params(GATED, 2, 4, 8)
    assert grouping.select_paths(params, r"mlp/(gate|up)/kernel$") == [
        "blocks_0/mlp/gate/kernel", "blocks_0/mlp/up/kernel", "blocks_1/mlp/gate/kernel", "blocks_1/mlp/up/kernel"]
