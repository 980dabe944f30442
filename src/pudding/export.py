"""Standard checkpoints of a depth-pruned model: blocks deleted, renumbered, config sliced."""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch

from .architectures import architecture_for, resolve


def delete_blocks(model, omit: Sequence[int]):
    """A copy of `model` whose omitted blocks are gone, so that plain transformers runs the pruned model.

    The kept blocks are renumbered 0..n-1 (their attention modules index the KV cache by that number) and every
    per-block list in the config (e.g. `layer_types`) is sliced to match.
    """
    pruned = copy.deepcopy(model)
    arch = architecture_for(pruned.config.model_type)
    stack = resolve(pruned, arch.stack)
    blocks = getattr(stack, arch.blocks)
    omitted = set(omit)
    kept = [i for i in range(len(blocks)) if i not in omitted]
    new_blocks = torch.nn.ModuleList([blocks[i] for i in kept])
    for new_index, block in enumerate(new_blocks):
        for module in block.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = new_index
    setattr(stack, arch.blocks, new_blocks)
    config = pruned.config
    for key in arch.per_block_config:
        values = getattr(config, key, None)
        if isinstance(values, (list, tuple)) and len(values) == len(blocks):
            setattr(config, key, [values[i] for i in kept])
    config.num_hidden_layers = len(kept)
    return pruned
