"""What the FiPS pipeline needs from a model architecture.

Every architecture (ViT/DeiT, Swin, Llama-3, Gemma-2/3) is a linen module plus an
`Architecture` object that exposes the model as three stages, so that calibration can
stream block by block without ever holding every layer's activations:

    hidden, ctx = arch.embed(params, inputs)
    for i in range(arch.num_blocks):
        hidden, mlp_in = arch.block(params, i, hidden, ctx)
    logits = arch.head(params, hidden, ctx)

`arch.apply(params, inputs)` is exactly that composition (the linen `__call__`).

Param tree convention (slash-joined paths): block `i`'s MLP lives at `arch.mlp_path(i)`,
e.g. `blocks_3/mlp`, with one sub-dict per FC named by `MlpSpec.fc_names`, each holding
`kernel` (flax layout `[in, out]`) and optionally `bias`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Protocol, Sequence

import jax
import jax.numpy as jnp

Params = Mapping[str, Any]

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "silu": jax.nn.silu,
    "relu": jax.nn.relu,
}


@dataclasses.dataclass(frozen=True)
class MlpSpec:
    """Shape of one MLP module.

    fc_names: FC sub-module names in forward order, e.g. ("fc1", "fc2") or ("gate", "up", "down").
    transposed: per FC, True when its flax kernel is `[p, d]` (fc2/down: model width on the
      output side); FiPS writes every FC with d as rows, so these are transposed on grouping.
    gated: True for `down(act(gate(x)) * up(x))`, False for `fc2(act(fc1(x)))`.
    """

    fc_names: tuple[str, ...]
    transposed: tuple[bool, ...]
    activation: str
    gated: bool
    has_bias: bool

    def __post_init__(self):
        if len(self.fc_names) != len(self.transposed):
            raise ValueError(f"MlpSpec: {len(self.fc_names)} fc_names but {len(self.transposed)} transposed flags")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"MlpSpec: activation {self.activation!r} not in {sorted(ACTIVATIONS)}")


VIT_MLP = MlpSpec(("fc1", "fc2"), (False, True), "gelu", gated=False, has_bias=True)


def mlp_apply(spec: MlpSpec, mlp_params: Params, x: jax.Array) -> jax.Array:
    """Dense MLP forward from a param dict laid out as `MlpSpec` says. x: [..., d] -> [..., d]."""
    act = ACTIVATIONS[spec.activation]

    def fc(name, h):
        layer = mlp_params[name]
        y = h @ layer["kernel"].astype(h.dtype)
        if "bias" in layer:
            y = y + layer["bias"].astype(h.dtype)
        return y

    if spec.gated:
        gate, up, down = spec.fc_names
        return fc(down, act(fc(gate, x)) * fc(up, x))
    fc1, fc2 = spec.fc_names
    return fc(fc2, act(fc(fc1, x)))


class Architecture(Protocol):
    """The staged view of a model that the pipeline uses. See the module docstring."""

    name: str            # e.g. "llama", "gemma2", "vit", "swin"
    config: Any          # the architecture's frozen config dataclass
    mlp_spec: MlpSpec
    num_blocks: int
    is_causal_lm: bool   # True: inputs are int tokens [B, T], head gives [B, T, vocab]

    def module(self) -> Any: ...  # the linen module; module().apply({"params": p}, inputs)

    def init(self, rng: jax.Array) -> Params: ...  # random params (tests, shape inference)

    def mlp_path(self, block: int) -> str: ...

    def embed(self, params: Params, inputs: jax.Array) -> tuple[jax.Array, Any]: ...

    def block(self, params: Params, i: int, hidden: jax.Array, ctx: Any) -> tuple[jax.Array, jax.Array]:
        """Block i on `hidden` (its input). Returns (block output, the MLP's input)."""
        ...

    def head(self, params: Params, hidden: jax.Array, ctx: Any) -> jax.Array: ...

    def apply(self, params: Params, inputs: jax.Array) -> jax.Array: ...


def path_str(key_path: Sequence[Any]) -> str:
    """Slash-joined jax key path, e.g. `blocks_3/mlp/up/kernel` (the form `get_path` reads)."""
    return jax.tree_util.keystr(tuple(key_path), simple=True, separator="/")


def get_path(tree: Params, path: str) -> Any:
    node = tree
    for part in path.split("/"):
        if part not in node:
            raise KeyError(f"no {part!r} at {path!r}; have {sorted(node)}")
        node = node[part]
    return node


def set_path(tree: dict, path: str, value: Any) -> dict:
    """Functional update: a copy of `tree` (dicts copied along the path only) with `path` set."""
    head, _, rest = path.partition("/")
    new = dict(tree)
    new[head] = set_path(tree[head], rest, value) if rest else value
    return new


def count_params(tree: Params) -> int:
    return int(sum(x.size for x in jax.tree_util.tree_leaves(tree)))


def stack_trees(trees: Sequence[Params]) -> Params:
    return jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *trees)
