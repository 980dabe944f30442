"""Where each decoder family keeps its parts, and what its block math needs.

pudding runs every supported model through the same block-by-block loop (see `decoder.py`) and the same functional
block (see `block.py`); what differs between families is only where the embedding, the blocks, the final norm and
the head live, how positions enter, which parameters the fast engine fuses into one projection, and the norm and
activation of the block. That difference is data, one `Architecture` row per family, not a copy of the loop.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .errors import PuddingError


# Where a block's weights live in a transformers block, for the fast engine: engine tensor -> parameter names in the
# block, concatenated in this order (fused QKV, fused gate/up).
LLAMA_BLOCK = {
    "attn_norm": ("input_layernorm.weight",),
    "qkv": ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"),
    "o": ("self_attn.o_proj.weight",),
    "mlp_norm": ("post_attention_layernorm.weight",),
    "gate_up": ("mlp.gate_proj.weight", "mlp.up_proj.weight"),
    "down": ("mlp.down_proj.weight",),
}
PHI3_BLOCK = {**LLAMA_BLOCK, "qkv": ("self_attn.qkv_proj.weight",), "gate_up": ("mlp.gate_up_proj.weight",)}
GEMMA3_BLOCK = {
    "attn_norm": ("input_layernorm.weight",),
    "qkv": LLAMA_BLOCK["qkv"],
    "o": ("self_attn.o_proj.weight",),
    "post_attn_norm": ("post_attention_layernorm.weight",),
    "mlp_norm": ("pre_feedforward_layernorm.weight",),
    "gate_up": LLAMA_BLOCK["gate_up"],
    "down": ("mlp.down_proj.weight",),
    "post_mlp_norm": ("post_feedforward_layernorm.weight",),
}
# Present in some models of a family only (Qwen2's QKV bias, Qwen3's and Gemma 3's per-head norms).
OPTIONAL_BLOCK = {
    "qkv_bias": ("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"),
    "q_norm": ("self_attn.q_norm.weight",),
    "k_norm": ("self_attn.k_norm.weight",),
}


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
    # The fast engine's block (None: the family runs in the reference decoder only, e.g. OPT)
    block_weights: dict[str, tuple[str, ...]] | None = field(default=None, hash=False, compare=False)
    norm: str = "llama"  # "llama": w * norm(x).to(dtype); "gemma": (norm(x) * (1 + w)).to(dtype)
    activation: str = "silu"  # or "gelu_tanh"
    sandwich: bool = False  # Gemma: norms after attention and after the MLP too
    uniform_sliding: bool = False  # a `sliding_window` without `layer_types` applies to every block (Mistral, Phi-3)
    qkv_bias: bool = False  # the QKV projections always carry a bias (Qwen2)
    scaled_embedding: bool = False  # embeddings are multiplied by sqrt(hidden size) (Gemma)
    attention_scalar: str | None = None  # config key of the query scaling that replaces head_dim (Gemma 3)


ARCHITECTURES: tuple[Architecture, ...] = (
    Architecture("llama", ("llama",), block_weights=LLAMA_BLOCK),
    Architecture("mistral", ("mistral",), block_weights=LLAMA_BLOCK, uniform_sliding=True),
    Architecture("qwen2", ("qwen2",), block_weights=LLAMA_BLOCK, qkv_bias=True),
    Architecture("qwen3", ("qwen3",), block_weights=LLAMA_BLOCK),
    Architecture("phi3", ("phi3",), block_weights=PHI3_BLOCK, uniform_sliding=True),
    Architecture("gemma3", ("gemma3_text",), positions="rotary_per_layer_type", bos=True, block_weights=GEMMA3_BLOCK,
                 norm="gemma", activation="gelu_tanh", sandwich=True, scaled_embedding=True,
                 attention_scalar="query_pre_attn_scalar"),
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
