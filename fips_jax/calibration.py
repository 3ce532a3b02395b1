"""Teacher activations from the dense model, streamed so that no run holds every layer at once.

LLMs (SPEC §4): the calibration tokens flow through the dense model one group of blocks at a
time; for each group we keep only that group's MLP inputs `[n, tokens, d]` and the hidden state
after it. ViTs: the block inputs and outputs of a minibatch are recomputed from the dense model
inside each training step (teacher forcing), so nothing is cached.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from fips_jax.models import base


def _block_fn(arch: base.Architecture, i: int) -> Callable:
    # One compiled function per block index: Gemma-2 alternates local/global attention and
    # Swin alternates shifted windows, so the index is static.
    return jax.jit(lambda params, hidden, ctx: arch.block(params, i, hidden, ctx))


class HiddenStream:
    """Hidden states of a fixed token batch advancing through the dense model block by block.

    Batches of `chunk` sequences are run at a time to bound activation memory; states are kept
    on the host between blocks.
    """

    def __init__(self, arch: base.Architecture, params: Any, inputs: np.ndarray, chunk: int):
        self.arch, self.params, self.chunk = arch, params, max(int(chunk), 1)
        embed = jax.jit(arch.embed)
        self.hidden, self.ctx = [], []
        for s in range(0, inputs.shape[0], self.chunk):
            h, ctx = embed(params, jnp.asarray(inputs[s:s + self.chunk]))
            self.hidden.append(np.asarray(h))
            self.ctx.append(ctx)
        self.next_block = 0
        self._fns: dict[int, Callable] = {}

    def advance(self, blocks: Sequence[int], with_outputs: bool = False):
        """Run `blocks` (which must continue where the stream is) and return their MLP inputs
        flattened over tokens: [len(blocks), n_tokens, d], in the dtype the model computes them
        in (bfloat16 for a bfloat16 model: half the host memory of float32, and exact; consumers
        upcast to float32 for their sums). With `with_outputs`, also each block's output,
        flattened the same way, in float32: (inputs, outputs)."""
        out = None  # filled in place: one group's inputs held once, not also as per-chunk pieces
        block_outs = []
        for k, i in enumerate(blocks):
            if i != self.next_block:
                raise ValueError(f"hidden stream is at block {self.next_block}, asked for block {i}")
            fn = self._fns.setdefault(i, _block_fn(self.arch, i))
            hidden, at = [], 0
            for h, ctx in zip(self.hidden, self.ctx):
                nxt, mlp_in = fn(self.params, jnp.asarray(h), ctx)
                hidden.append(np.asarray(nxt))
                mlp_in = np.asarray(mlp_in).reshape(-1, mlp_in.shape[-1])
                if out is None:
                    per_seq = mlp_in.shape[0] // h.shape[0]  # MLP rows per sequence / image
                    n_tokens = per_seq * sum(x.shape[0] for x in self.hidden)
                    out = np.empty((len(blocks), n_tokens, mlp_in.shape[-1]), mlp_in.dtype)
                out[k, at:at + mlp_in.shape[0]] = mlp_in
                at += mlp_in.shape[0]
            self.hidden = hidden
            if with_outputs:
                block_outs.append(np.concatenate([o.reshape(-1, o.shape[-1]) for o in hidden]).astype(np.float32))
            self.next_block += 1
        return (out, np.stack(block_outs)) if with_outputs else out

    def state(self) -> np.ndarray:
        return np.concatenate(self.hidden)

    def restore(self, hidden: np.ndarray, next_block: int) -> None:
        """Jump to a saved point of the stream (a finished group), skipping recomputation."""
        self.hidden = [hidden[s:s + self.chunk] for s in range(0, hidden.shape[0], self.chunk)]
        self.next_block = next_block


def teacher_blocks(arch: base.Architecture, params: Any, images: jax.Array, blocks: Sequence[int]):
    """Dense block inputs and outputs of one minibatch: ({i: input}, {i: output}, ctx).
    Traced inside the training step; gradients never flow into the teacher."""
    params = jax.lax.stop_gradient(params)
    hidden, ctx = arch.embed(params, images)
    inputs, outputs = {}, {}
    wanted = set(blocks)
    for i in range(max(blocks) + 1):
        out, _ = arch.block(params, i, hidden, ctx)
        if i in wanted:
            inputs[i], outputs[i] = hidden, out
        hidden = out
    return inputs, outputs, ctx
