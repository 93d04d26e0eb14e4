"""Growing a trained model deeper without changing what it computes, to train on from there.

A new pre-LayerNorm block whose two output projections are zero adds nothing to the residual
stream, so the deeper model starts with exactly the old one's predictions and loss, and training
then finds a use for the extra layer. The new block copies the top block's other weights (its
attention and MLP already read inputs like the ones it will see), which gives the first updates
somewhere to start: a zero projection has gradients only once the layer below it computes something.
"""

from __future__ import annotations

import copy
from dataclasses import replace

import torch

from musicgpt.model import MusicGPT


def deepen(model: MusicGPT, extra: int = 1) -> MusicGPT:
    """`model` with `extra` more blocks on top, each a copy of its top block with zero output
    projections: the same logits for every input (eval mode), more layers to train."""
    grown = MusicGPT(replace(model.config, n_layer=model.config.n_layer + extra), model.controls)
    grown.load_state_dict(model.state_dict(), strict=False)  # every old tensor; the new blocks follow
    top = model.blocks[-1]
    with torch.no_grad():
        for block in grown.blocks[model.config.n_layer:]:
            block.load_state_dict(copy.deepcopy(top.state_dict()))
            for layer in (block.attn.proj, block.mlp.out):
                layer.weight.zero_()
                if layer.bias is not None:
                    layer.bias.zero_()
    return grown.train(model.training)
