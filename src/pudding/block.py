"""One transformer block as a function, for the fast engine: the model's geometry (`Shape`), each block's weights in
one flat buffer (`BlockLayout`, fused QKV and gate/up projections), and the block math itself (`block_step`).

The math follows transformers' implementation of each family exactly (norm order, rotary tables taken from the
model's own rotary module), so greedy decoding gives the same tokens as `model.generate` on the pruned model. It is
functional (weights are arguments), so one compiled kernel set serves every block and every omission set.
Families differ only by data: their row in `architectures.py`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from . import attention, kernels
from .architectures import ARCHITECTURES, OPTIONAL_BLOCK, Architecture, architecture_for
from .errors import PuddingError
from .quantize import cpu_int4_form, product_path, quantized_linear, quantized_shapes


def engine_architecture(model_type: str) -> Architecture:
    arch = architecture_for(model_type)
    if arch.block_weights is None:
        supported = ", ".join(a.family for a in ARCHITECTURES if a.block_weights is not None)
        raise PuddingError(f"the fast engine does not support {arch.family} models yet (supported: {supported})")
    return arch


@dataclass(frozen=True)
class Shape:
    """Everything about the model's geometry that the block math needs."""

    family: str
    vocab: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    num_blocks: int
    eps: float
    attn_scale: float
    embed_scale: float
    layer_types: tuple[str, ...]
    sliding_window: int | None

    @classmethod
    def from_config(cls, config) -> Shape:
        arch = engine_architecture(config.model_type)
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        window = getattr(config, "sliding_window", None)
        default_type = "sliding_attention" if window and arch.uniform_sliding else "full_attention"
        layer_types = tuple(getattr(config, "layer_types", None) or [default_type] * config.num_hidden_layers)
        scalar = getattr(config, arch.attention_scalar, None) if arch.attention_scalar else None
        return cls(
            family=arch.family,
            vocab=config.vocab_size,
            hidden=config.hidden_size,
            heads=heads,
            kv_heads=config.num_key_value_heads,
            head_dim=head_dim,
            intermediate=config.intermediate_size,
            num_blocks=config.num_hidden_layers,
            eps=config.rms_norm_eps,
            attn_scale=(scalar or head_dim) ** -0.5,
            embed_scale=config.hidden_size**0.5 if arch.scaled_embedding else 1.0,
            layer_types=layer_types,
            sliding_window=window if "sliding_attention" in layer_types else None,
        )

    @property
    def arch(self) -> Architecture:
        return next(a for a in ARCHITECTURES if a.family == self.family)

    def tensor_shapes(self, present: set[str]) -> dict[str, tuple[int, ...]]:
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        shapes = {
            "attn_norm": (self.hidden,), "qkv": (q + 2 * kv, self.hidden), "qkv_bias": (q + 2 * kv,),
            "q_norm": (self.head_dim,), "k_norm": (self.head_dim,), "o": (self.hidden, q),
            "post_attn_norm": (self.hidden,), "mlp_norm": (self.hidden,),
            "gate_up": (2 * self.intermediate, self.hidden), "down": (self.hidden, self.intermediate),
            "post_mlp_norm": (self.hidden,),
        }
        return {name: s for name, s in shapes.items() if name in present}


MATRICES = ("qkv", "o", "gate_up", "down")  # the tensors weight-only quantization applies to


class BlockLayout:
    """Where each of a block's tensors sits in one flat byte buffer, so host copies, slots and views share a layout.

    Tensors may differ in dtype (a quantized matrix's codes beside its scales); each starts on a 64-byte boundary."""

    ALIGN = 64

    def __init__(self, entries: dict[str, tuple[tuple[int, ...], torch.dtype]], params: int) -> None:
        self.entries = entries
        self.params = params  # weights of the block as the model defines it: multiply-adds per token
        self.offsets, total = {}, 0
        for name, (s, dtype) in entries.items():
            total = -(-total // self.ALIGN) * self.ALIGN
            self.offsets[name] = total
            total += math.prod(s) * dtype.itemsize
        self.nbytes = -(-total // self.ALIGN) * self.ALIGN

    @classmethod
    def of(cls, shape: Shape, present: set[str], dtype: torch.dtype, quantize: str | None = None,
           device: torch.device | str | None = None) -> BlockLayout:
        """The layout of a block of this shape; with `quantize`, its four matrices as codes + scales, in the form
        their products take on `device` (`quantize.quantized_shapes`)."""
        entries = {}
        for name, s in shape.tensor_shapes(present).items():
            if quantize and name in MATRICES:
                entries[name], entries[name + "_scales"] = quantized_shapes(*s, quantize, dtype, device)
            else:
                entries[name] = (s, dtype)
        return cls(entries, sum(math.prod(s) for s in shape.tensor_shapes(present).values()))

    def empty(self, device, pin: bool = False) -> torch.Tensor:
        return torch.empty(self.nbytes, dtype=torch.uint8, device=device, pin_memory=pin)

    def fill(self, flat: torch.Tensor, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        """Copy a block's tensors (`block_tensors`) into its flat buffer, int4 matrices laid out for a CPU converted
        to that form (`quantize.cpu_int4_form`)."""
        views = self.views(flat)
        for name in MATRICES:
            scales = name + "_scales"
            if scales in views and views[scales].dim() == 3:  # 2-D in the module: (out, groups)
                tensors = {**tensors, **dict(zip((name, scales), cpu_int4_form(tensors[name], tensors[scales])))}
        for name, view in views.items():
            view.copy_(tensors[name])
        return flat

    def views(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        out = {}
        for name, (s, dtype) in self.entries.items():
            start = self.offsets[name]
            out[name] = flat[start : start + math.prod(s) * dtype.itemsize].view(dtype).view(s)
        return out


def lora_layout(shape: Shape, present: set[str], dtype: torch.dtype, rank: int) -> BlockLayout:
    """Where a block's unmerged LoRA update sits: per fused matrix, the A matrices of its sources stacked (R x in)
    and their B matrices block-diagonal (out x R), R = rank x sources (q, k, v for QKV)."""
    entries = {}
    for name, dims in shape.tensor_shapes(present).items():
        if name in MATRICES:
            out_features, in_features = dims
            total = rank * len(shape.arch.block_weights[name])
            entries[name + "_lora_a"] = ((total, in_features), dtype)
            entries[name + "_lora_b"] = ((out_features, total), dtype)
    return BlockLayout(entries, 0)


def lora_block_tensors(modules: dict[str, tuple[torch.Tensor, torch.Tensor]], arch: Architecture) -> dict[str, torch.Tensor]:
    """One block of an adapter (module path -> (A, scaled B), `lora.Adapter`) in the engine's fused layout."""
    tensors = {}
    for name in MATRICES:
        paths = [source.rsplit(".", 1)[0] for source in arch.block_weights[name]]
        missing = [p for p in paths if p not in modules]
        if missing:
            raise PuddingError(f"the LoRA adapter has no update for {', '.join(missing)}: the engine needs one for "
                               "every linear layer of a block (train it with `pudding lora`)")
        tensors[name + "_lora_a"] = torch.cat([modules[p][0] for p in paths])
        tensors[name + "_lora_b"] = torch.block_diag(*[modules[p][1] for p in paths])
    return tensors


def block_tensors(block: torch.nn.Module, arch: Architecture) -> dict[str, torch.Tensor]:
    """A transformers block's weights under the engine's names (QKV and gate/up concatenated). A block quantized by
    `quantize.quantize_blocks` gives its matrices' codes under the same names and their scales as NAME_scales."""
    params = {**dict(block.named_parameters()), **dict(block.named_buffers())}
    tensors = {}
    for name, sources in {**arch.block_weights, **OPTIONAL_BLOCK}.items():
        for suffix, key in (("", name), ("_codes", name), ("_scales", name + "_scales")):
            parts = [params.get(s + suffix) for s in sources]
            if all(p is not None for p in parts):
                parts = [p.detach() for p in parts]
                tensors[key] = torch.cat(parts, dim=0) if len(parts) > 1 else parts[0]
    return tensors


def random_block_tensors(arch: Architecture, config) -> set[str]:
    """The tensors a block of this config holds (for models built with random weights)."""
    return set(arch.block_weights) | ({"qkv_bias"} if getattr(config, "attention_bias", False) or arch.qkv_bias else set())


# ------------------------------------------------------------------------------------------------------------------
# The block math


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, style: str) -> torch.Tensor:
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if style == "gemma":
        return (xf * (1.0 + weight.float())).to(x.dtype)
    return weight * xf.to(x.dtype)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def _act(x: torch.Tensor, kind: str) -> torch.Tensor:
    return torch.nn.functional.silu(x) if kind == "silu" else torch.nn.functional.gelu(x, approximate="tanh")


def _linear(x: torch.Tensor, w: dict[str, torch.Tensor], name: str, bias: torch.Tensor | None = None) -> torch.Tensor:
    scales = w.get(name + "_scales")
    if scales is None:
        out = torch.nn.functional.linear(x, w[name], bias)
    else:
        out = quantized_linear(x, w[name], scales, bias)
    lora_a = w.get(name + "_lora_a")  # an unmerged LoRA update of the set in use (`Engine.set_adapters`)
    if lora_a is not None:
        out = out + torch.nn.functional.linear(torch.nn.functional.linear(x, lora_a), w[name + "_lora_b"])
    return out


def _fuses(x: torch.Tensor, w: dict[str, torch.Tensor], name: str) -> bool:
    """Whether the product `name` of one activation row runs as the low-bit GEMV kernel that takes the element-wise
    work after it in (`kernels.gemv`: the gate, the residual add; `kernels.gemv_rotary`: the rotation and the cache
    writes): quantized weights where Triton runs and no unmerged LoRA update beside them. A decode step of quantized
    blocks so runs five kernels fewer a block."""
    scales = w.get(name + "_scales")
    return (scales is not None and x.numel() == x.shape[-1] and name + "_lora_a" not in w
            and product_path(x, w[name], scales) == "triton")


def _gated_linear(h: torch.Tensor, w: dict[str, torch.Tensor], name: str, arch: Architecture) -> torch.Tensor:
    """act(gate) * up, the halves of the product `name` of h."""
    if _fuses(h, w, name):
        out = kernels.gemv(h.reshape(-1), w[name], w[name + "_scales"], activation=arch.activation)
        return out.view(*h.shape[:-1], out.shape[0])
    gate, up = _linear(h, w, name).chunk(2, dim=-1)
    return _act(gate, arch.activation) * up


def _residual_linear(residual: torch.Tensor, a: torch.Tensor, w: dict[str, torch.Tensor], name: str,
                     post_norm: str, shape: Shape, arch: Architecture) -> torch.Tensor:
    """residual + the product `name` of a (normalized by `post_norm` first in families with sandwich norms)."""
    if not arch.sandwich and _fuses(a, w, name):
        return kernels.gemv(a.reshape(-1), w[name], w[name + "_scales"], residual=residual.reshape(-1)).view_as(residual)
    out = _linear(a, w, name)
    if arch.sandwich:
        out = rms_norm(out, w[post_norm], shape.eps, arch.norm)
    return residual + out


def cache_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, mask: torch.Tensor,
                    shape: Shape) -> torch.Tensor:
    """q (batch, heads, tokens, head_dim) attending to the first `keys` positions of the cache where mask (tokens,
    keys) allows."""
    batch, _, tokens, _ = q.shape
    if tokens == 1 and batch == 1 and attention.supported(q, shape.heads, shape.kv_heads, shape.head_dim):
        # a decode step: one kernel instead of three or four (attention.py)
        attn = attention.decode_attention(q.reshape(shape.heads, shape.head_dim), k_cache[0], v_cache[0],
                                          mask.reshape(-1), shape.attn_scale)
        return attn.view(batch, shape.heads, 1, shape.head_dim)
    return grouped_attention(q, k_cache, v_cache, mask, shape)


def grouped_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, mask: torch.Tensor,
                      shape: Shape) -> torch.Tensor:
    """`cache_attention` in PyTorch ops: query heads grouped by their KV head, so the cache is read once."""
    batch, _, tokens, _ = q.shape
    keys = mask.shape[-1]
    groups = shape.heads // shape.kv_heads
    qg = q.reshape(batch, shape.kv_heads, groups * tokens, shape.head_dim)
    scores = torch.matmul(qg, k_cache[:, :, :keys].transpose(2, 3)).float() * shape.attn_scale
    scores = scores.view(batch, shape.kv_heads, groups, tokens, keys).masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(q.dtype).view(batch, shape.kv_heads, groups * tokens, keys)
    return torch.matmul(probs, v_cache[:, :, :keys]).view(batch, shape.heads, tokens, shape.head_dim)


def _rotated_qkv(h: torch.Tensor, w: dict[str, torch.Tensor], k_cache: torch.Tensor, v_cache: torch.Tensor,
                 positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, shape: Shape,
                 arch: Architecture) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v (batch, heads, tokens, head_dim) of h, q and k normalized (where the family does) and rotated; k and v
    written to the caches at `positions`."""
    batch, tokens, _ = h.shape
    qkv = _linear(h, w, "qkv", w.get("qkv_bias"))
    q_size, kv_size = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    q = qkv[..., :q_size].view(batch, tokens, shape.heads, shape.head_dim).transpose(1, 2)
    k = qkv[..., q_size : q_size + kv_size].view(batch, tokens, shape.kv_heads, shape.head_dim).transpose(1, 2)
    v = qkv[..., q_size + kv_size :].view(batch, tokens, shape.kv_heads, shape.head_dim).transpose(1, 2)
    if "q_norm" in w:
        q = rms_norm(q, w["q_norm"], shape.eps, arch.norm)
        k = rms_norm(k, w["k_norm"], shape.eps, arch.norm)
    q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
    k_cache.index_copy_(2, positions, k)
    v_cache.index_copy_(2, positions, v)
    return q, k, v


def block_step(
    x: torch.Tensor,  # (batch, tokens, hidden)
    w: dict[str, torch.Tensor],
    k_cache: torch.Tensor,  # (batch, kv_heads, max_len, head_dim)
    v_cache: torch.Tensor,
    positions: torch.Tensor,  # (tokens,) absolute positions of the new tokens
    cos: torch.Tensor,  # (tokens, head_dim)
    sin: torch.Tensor,
    mask: torch.Tensor | None,  # (tokens, keys) bool over the first `keys` cache positions, or None for causal
    # attention over the new tokens only
    shape: Shape,
    arch: Architecture,
) -> torch.Tensor:
    batch, tokens, _ = x.shape
    h = rms_norm(x, w["attn_norm"], shape.eps, arch.norm)
    q_size = shape.heads * shape.head_dim
    if mask is not None and "q_norm" not in w and _fuses(h, w, "qkv"):  # one row: batch 1, one token
        # a decode step of quantized blocks: the rotation and the cache writes end the QKV product's kernel
        q = kernels.gemv_rotary(h.reshape(-1), w["qkv"], w["qkv_scales"], cos.reshape(-1), sin.reshape(-1), positions,
                                k_cache[0], v_cache[0], w.get("qkv_bias"))
        attn = cache_attention(q.view(1, shape.heads, 1, shape.head_dim), k_cache, v_cache, mask, shape)
    else:
        q, k, v = _rotated_qkv(h, w, k_cache, v_cache, positions, cos, sin, shape, arch)
        if mask is None:  # pre-fill from an empty cache: plain causal attention over the new tokens, K/V heads shared
            # by their query groups inside the kernel (a copy of K and V per group cost ~0.3 ms at 128 tokens, 8B, H200)
            attn = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=shape.attn_scale,
                                                                    enable_gqa=shape.heads > shape.kv_heads)
        else:  # attend to the cache
            attn = cache_attention(q, k_cache, v_cache, mask, shape)
    x = _residual_linear(x, attn.transpose(1, 2).reshape(batch, tokens, q_size), w, "o", "post_attn_norm", shape, arch)
    hidden = _gated_linear(rms_norm(x, w["mlp_norm"], shape.eps, arch.norm), w, "gate_up", arch)
    # In a pre-fill the residual add is a kernel of its own (~2.5 us at 128 tokens); deferring it into the next
    # block's first norm kernel slowed that kernel by as much (H100, results/prefill-defer-ab-h100.md), so it stays.
    return _residual_linear(x, hidden, w, "down", "post_mlp_norm", shape, arch)


def rotary_tables(module, positions_kind: str, shape: Shape, max_len: int, device, dtype) -> dict:
    """cos/sin for every position, per attention type, from the model's own rotary module (whatever its scaling).

    transformers computes them in float32 and casts them to the activations' dtype; so do we, once."""
    buffer = next(module.buffers(), None)
    where = buffer.device if buffer is not None else torch.device("cpu")
    position = torch.arange(max_len, device=where)[None]
    probe = torch.zeros(1, dtype=torch.float32, device=where)
    tables = {}
    for layer_type in set(shape.layer_types):
        cos, sin = module(probe, position, layer_type) if positions_kind == "rotary_per_layer_type" else module(probe, position)
        tables[layer_type] = (cos[0].to(device=device, dtype=dtype), sin[0].to(device=device, dtype=dtype))
    return tables
