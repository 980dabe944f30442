"""Where each decoder family keeps its parts.

pudding runs every supported model through the same block-by-block loop (see `decoder.py`); what differs between
families is only where the embedding, the blocks, the final norm and the head live, and how positions enter. That
difference is data, one `Architecture` row per family, not a copy of the loop.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import PuddingError


@dataclass(frozen=True)
class Architecture:
    family: str
    model_types: tuple[str, ...]  # values of `config.model_type` that this row serves
    stack: str = "model"  # attribute path from the causal LM to the decoder stack
    blocks: str = "layers"  # ModuleList of transformer blocks, on the stack
    embed: str = "embed_tokens"  # token embedding, on the stack (Gemma's scales itself)
    final_norm: str | None = "norm"  # on the stack
    head: str = "lm_head"  # on the causal LM
    # How positions enter: "rotary" (one cos/sin table for every block), "rotary_per_layer_type"
    # (Gemma 3: local and global blocks use different rotary bases) or "learned" (OPT: added to the input).
    positions: str = "rotary"
    position_embedding: str = "rotary_emb"  # module on the stack that makes them
    input_projection: str | None = None  # OPT-350m projects embeddings up to the hidden size ...
    output_projection: str | None = None  # ... and back down before the head
    # Config entries that hold one value per block; a checkpoint with blocks deleted must slice them.
    per_block_config: tuple[str, ...] = ("layer_types",)
    bos: bool = False  # lm-evaluation-harness prepends BOS for Gemma; its scores depend on it


ARCHITECTURES: tuple[Architecture, ...] = (
    Architecture("llama", ("llama",)),
    Architecture("mistral", ("mistral",)),
    Architecture("qwen2", ("qwen2",)),
    Architecture("qwen3", ("qwen3",)),
    Architecture("phi3", ("phi3",)),
    Architecture("gemma3", ("gemma3_text",), positions="rotary_per_layer_type", bos=True),
    Architecture(
        "opt",
        ("opt",),
        stack="model.decoder",
        final_norm="final_layer_norm",
        positions="learned",
        position_embedding="embed_positions",
        input_projection="project_in",
        output_projection="project_out",
        per_block_config=(),
    ),
)


def architecture_for(model_type: str) -> Architecture:
    for arch in ARCHITECTURES:
        if model_type in arch.model_types:
            return arch
    known = ", ".join(t for a in ARCHITECTURES for t in a.model_types)
    raise PuddingError(f"unsupported model type '{model_type}' (supported: {known})")


def resolve(root: object, path: str | None) -> object | None:
    """Follow a dotted attribute path; None if the path is None or a step is missing/None."""
    if path is None:
        return None
    node = root
    for name in path.split("."):
        node = getattr(node, name, None)
        if node is None:
            return None
    return node
