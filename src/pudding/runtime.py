"""The inference engine: route once, make the chosen blocks resident, pre-fill and decode on the shorter stack.

In the spirit of gpt-fast, the engine keeps each transformer block's weights in its own layout (one flat buffer per
block, viewed as fused QKV and gate/up projections), a static KV cache per *stack position* (the j-th block that
runs), and on GPUs a CUDA graph of the whole decode step per stack, so decoding is not bound by Python or kernel
launches. Two residency modes:

* all blocks resident: every block lives on the device; switching omission sets only selects another stack (and its
  pre-captured graph), so it costs nothing but saves compute and memory traffic per token;
* a memory budget of N block slots (the paper's on-device setting): blocks live in pinned host memory; the j-th
  block of the current stack sits in slot j, so one decode graph serves every set of the same size. A new prompt
  moves blocks between slots when it can and copies from the host only the blocks it lacks, on a side stream, slot
  by slot, so pre-fill of the first blocks overlaps the copies of the later ones.

The math follows transformers' implementations of each family exactly (norm order, rotary tables taken from the
model's own rotary module), so greedy decoding gives the same tokens as `model.generate` on the pruned model.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch

from .architectures import architecture_for, resolve
from .errors import PuddingError
from .omission import OmissionSet

# ------------------------------------------------------------------------------------------------------------------
# Families: where each weight of a block lives in the transformers model, and what the block's math needs


@dataclass(frozen=True)
class Family:
    names: dict[str, tuple[str, ...]]  # engine tensor -> parameter names in the HF block, concatenated in order
    norm: str = "llama"  # "llama": w * norm(x).to(dtype); "gemma": (norm(x) * (1 + w)).to(dtype)
    activation: str = "silu"
    sandwich: bool = False  # Gemma: norms after attention and after the MLP too


_LLAMA_NAMES = {
    "attn_norm": ("input_layernorm.weight",),
    "qkv": ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"),
    "o": ("self_attn.o_proj.weight",),
    "mlp_norm": ("post_attention_layernorm.weight",),
    "gate_up": ("mlp.gate_proj.weight", "mlp.up_proj.weight"),
    "down": ("mlp.down_proj.weight",),
}
_OPTIONAL = {
    "qkv_bias": ("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"),
    "q_norm": ("self_attn.q_norm.weight",),
    "k_norm": ("self_attn.k_norm.weight",),
}
FAMILIES = {
    "llama": Family(_LLAMA_NAMES),
    "mistral": Family(_LLAMA_NAMES),
    "qwen2": Family(_LLAMA_NAMES),
    "qwen3": Family(_LLAMA_NAMES),
    "phi3": Family({**_LLAMA_NAMES, "qkv": ("self_attn.qkv_proj.weight",), "gate_up": ("mlp.gate_up_proj.weight",)}),
    "gemma3": Family({
        "attn_norm": ("input_layernorm.weight",),
        "qkv": _LLAMA_NAMES["qkv"],
        "o": ("self_attn.o_proj.weight",),
        "post_attn_norm": ("post_attention_layernorm.weight",),
        "mlp_norm": ("pre_feedforward_layernorm.weight",),
        "gate_up": _LLAMA_NAMES["gate_up"],
        "down": ("mlp.down_proj.weight",),
        "post_mlp_norm": ("post_feedforward_layernorm.weight",),
    }, norm="gemma", activation="gelu_tanh", sandwich=True),
}


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
        arch = architecture_for(config.model_type)
        if arch.family not in FAMILIES:
            raise PuddingError(f"the fast engine does not support {arch.family} models yet (supported: {', '.join(FAMILIES)})")
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        window = getattr(config, "sliding_window", None)
        default_type = "sliding_attention" if window and arch.family in ("mistral", "phi3") else "full_attention"
        layer_types = tuple(getattr(config, "layer_types", None) or [default_type] * config.num_hidden_layers)
        scalar = getattr(config, "query_pre_attn_scalar", None) if arch.family == "gemma3" else None
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
            embed_scale=config.hidden_size**0.5 if arch.family == "gemma3" else 1.0,
            layer_types=layer_types,
            sliding_window=window if "sliding_attention" in layer_types else None,
        )

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


class BlockLayout:
    """Offsets of a block's tensors inside one flat buffer, so host copies, slots and views share a layout."""

    def __init__(self, shape: Shape, present: set[str]) -> None:
        self.shapes = shape.tensor_shapes(present)
        self.offsets, total = {}, 0
        for name, s in self.shapes.items():
            self.offsets[name] = total
            total += math.prod(s)
        self.numel = total

    def views(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        return {n: flat[o : o + math.prod(s)].view(s) for (n, s), o in zip(self.shapes.items(), self.offsets.values())}


def _block_tensors(block: torch.nn.Module, family: Family) -> dict[str, torch.Tensor]:
    params = dict(block.named_parameters())
    tensors = {}
    for name, sources in {**family.names, **_OPTIONAL}.items():
        if all(s in params for s in sources):
            parts = [params[s].detach() for s in sources]
            tensors[name] = torch.cat(parts, dim=0) if len(parts) > 1 else parts[0]
    return tensors


# ------------------------------------------------------------------------------------------------------------------
# The block math (functional: weights are arguments, so one compiled kernel set serves every block and set)


def _norm(x: torch.Tensor, weight: torch.Tensor, eps: float, style: str) -> torch.Tensor:
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


def block_step(
    x: torch.Tensor,  # (batch, tokens, hidden)
    w: dict[str, torch.Tensor],
    k_cache: torch.Tensor,  # (batch, kv_heads, max_len, head_dim)
    v_cache: torch.Tensor,
    positions: torch.Tensor,  # (tokens,) absolute positions of the new tokens
    cos: torch.Tensor,  # (tokens, head_dim)
    sin: torch.Tensor,
    mask: torch.Tensor | None,  # (tokens, keys) bool, or None for causal attention over the new tokens only
    keys: int,  # how many cache positions attention reads
    shape: Shape,
    family: Family,
) -> torch.Tensor:
    batch, tokens, _ = x.shape
    h = _norm(x, w["attn_norm"], shape.eps, family.norm)
    qkv = torch.nn.functional.linear(h, w["qkv"], w.get("qkv_bias"))
    q_size, kv_size = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    q = qkv[..., :q_size].view(batch, tokens, shape.heads, shape.head_dim).transpose(1, 2)
    k = qkv[..., q_size : q_size + kv_size].view(batch, tokens, shape.kv_heads, shape.head_dim).transpose(1, 2)
    v = qkv[..., q_size + kv_size :].view(batch, tokens, shape.kv_heads, shape.head_dim).transpose(1, 2)
    if "q_norm" in w:
        q = _norm(q, w["q_norm"], shape.eps, family.norm)
        k = _norm(k, w["k_norm"], shape.eps, family.norm)
    q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
    k_cache.index_copy_(2, positions, k)
    v_cache.index_copy_(2, positions, v)
    groups = shape.heads // shape.kv_heads
    if mask is None:  # pre-fill from an empty cache: plain causal attention over the new tokens
        attn = torch.nn.functional.scaled_dot_product_attention(
            q, k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1), is_causal=tokens > 1, scale=shape.attn_scale)
    else:  # attend to the cache; query heads grouped by their KV head, so the cache is read once
        qg = q.reshape(batch, shape.kv_heads, groups * tokens, shape.head_dim)
        scores = torch.matmul(qg, k_cache[:, :, :keys].transpose(2, 3)).float() * shape.attn_scale
        scores = scores.view(batch, shape.kv_heads, groups, tokens, keys).masked_fill(~mask, float("-inf"))
        probs = torch.softmax(scores, dim=-1).to(q.dtype).view(batch, shape.kv_heads, groups * tokens, keys)
        attn = torch.matmul(probs, v_cache[:, :, :keys]).view(batch, shape.heads, tokens, shape.head_dim)
    out = torch.nn.functional.linear(attn.transpose(1, 2).reshape(batch, tokens, q_size), w["o"])
    if family.sandwich:
        out = _norm(out, w["post_attn_norm"], shape.eps, family.norm)
    x = x + out
    h = _norm(x, w["mlp_norm"], shape.eps, family.norm)
    gate, up = torch.nn.functional.linear(h, w["gate_up"]).chunk(2, dim=-1)
    out = torch.nn.functional.linear(_act(gate, family.activation) * up, w["down"])
    if family.sandwich:
        out = _norm(out, w["post_mlp_norm"], shape.eps, family.norm)
    return x + out


# ------------------------------------------------------------------------------------------------------------------
# Residency


class ResidentBlocks:
    """Every block on the device; a stack is just a list of them."""

    mode = "all"

    def __init__(self, flats: list[torch.Tensor], layout: BlockLayout) -> None:
        self.flats = flats
        self.views = [layout.views(f) for f in flats]

    def arrange(self, kept: Sequence[int]) -> tuple[list[dict], list[torch.cuda.Event | None], dict]:
        return [self.views[b] for b in kept], [None] * len(kept), {"copied": 0, "moved": 0, "bytes": 0}


class SlotPool:
    """A memory budget: N device slots, blocks in pinned host memory, the j-th block of the stack in slot j."""

    mode = "budget"

    def __init__(self, host: list[torch.Tensor], layout: BlockLayout, slots: int, device) -> None:
        self.host = host
        self.layout = layout
        self.slots = [torch.empty(layout.numel, dtype=host[0].dtype, device=device) for _ in range(slots + 1)]  # +1 spare
        self.views = [layout.views(s) for s in self.slots]
        self.holds: list[int | None] = [None] * len(self.slots)
        self.device = torch.device(device)
        self.stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None

    @property
    def capacity(self) -> int:
        return len(self.slots) - 1

    def arrange(self, kept: Sequence[int]) -> tuple[list[dict], list, dict]:
        """Put kept[j] in slot j: a move between slots where the block is already on the device, a host copy
        otherwise; the spare slot parks a block that is in the way but needed further down the stack.

        Returns the stack views, one event per stack position (its block is in place once the event completes; None
        when nothing was copied) and what was done. Copies run in stack order on a side stream, so pre-fill of the
        first blocks overlaps the copies of the later ones."""
        if len(kept) > self.capacity:
            raise PuddingError(f"the omission set keeps {len(kept)} blocks but the memory budget holds {self.capacity}")
        stats = {"copied": 0, "moved": 0, "bytes": 0}
        spare = len(self.slots) - 1
        events: list = []
        if self.stream is not None:
            self.stream.wait_stream(torch.cuda.current_stream(self.device))  # slots may still be read by earlier work
        with torch.cuda.stream(self.stream) if self.stream is not None else _nullcontext():
            for j, block in enumerate(kept):
                if self.holds[j] == block:
                    events.append(None)
                    continue
                displaced = self.holds[j]
                if displaced is not None and displaced in kept[j + 1 :] and self.holds[spare] is None:
                    self._copy(spare, self.slots[j])
                    self.holds[spare] = displaced
                    stats["moved"] += 1
                # a block still needed can only sit further down the stack or in the spare slot
                source = next((s for s in [*range(j + 1, spare), spare] if self.holds[s] == block), None)
                if source is not None:
                    self._copy(j, self.slots[source])
                    stats["moved"] += 1
                    if source == spare:
                        self.holds[spare] = None
                else:
                    self._copy(j, self.host[block])
                    stats["copied"] += 1
                    stats["bytes"] += self.host[block].numel() * self.host[block].element_size()
                self.holds[j] = block
                events.append(self._event())
        return [self.views[j] for j in range(len(kept))], events, stats

    def _copy(self, slot: int, source: torch.Tensor) -> None:
        self.slots[slot].copy_(source, non_blocking=True)

    def _event(self):
        if self.stream is None:
            return None
        event = torch.cuda.Event()
        event.record(self.stream)
        return event


class _nullcontext:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


# ------------------------------------------------------------------------------------------------------------------
# The engine


@dataclass
class Timings:
    route_ms: float = 0.0
    swap_ms: float = 0.0  # making the chosen blocks resident (host→device copies are overlapped with pre-fill)
    prefill_ms: float = 0.0
    ttft_ms: float = 0.0  # routing + swap + pre-fill: the time to the first generated token
    decode_ms: float = 0.0
    new_tokens: int = 0
    swap: dict = field(default_factory=dict)

    @property
    def tokens_per_second(self) -> float:
        decoded = self.new_tokens - 1  # the first token comes from pre-fill
        return decoded / (self.decode_ms / 1000) if decoded > 0 and self.decode_ms > 0 else 0.0


@dataclass
class Generation:
    text: str
    tokens: list[int]
    blocks: list[int]  # the omission set used
    set_index: int | None  # its index among the router's sets, when routed
    timings: Timings
    prompt_tokens: int = 0
    finish_reason: str = "length"


class TextStream:
    """Incremental detokenizer: the text each new token adds, for the cost of decoding a few tokens (decoding the
    whole generation at every token would make streaming quadratic). It decodes a short window twice, with and
    without the new tokens, and emits the difference; the window restarts after each emitted piece, so a token that
    ends inside a multi-byte character is held back until the character is complete."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.tokens: list[int] = []
        self.prefix_offset = 0  # the window starts here: context for the tokenizer's spacing rules
        self.read_offset = 0  # text of tokens before this has been emitted

    def _decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True)

    def push(self, token: int) -> str:
        if self.tokenizer is None:
            return ""
        self.tokens.append(token)
        before = self._decode(self.tokens[self.prefix_offset : self.read_offset])
        after = self._decode(self.tokens[self.prefix_offset :])
        if len(after) <= len(before) or after.endswith("\ufffd"):  # nothing new yet, or a character still incomplete
            return ""
        self.prefix_offset, self.read_offset = self.read_offset, len(self.tokens)
        return after[len(before) :]

    def full_text(self) -> str:
        return self._decode(self.tokens) if self.tokenizer is not None else ""


class Engine:
    """Generates text with a depth-pruned model; see the module docstring."""

    def __init__(self, shape: Shape, embed: torch.Tensor, final_norm: torch.Tensor, head: torch.Tensor,
                 blocks, layout: BlockLayout, rotary: dict[str, tuple[torch.Tensor, torch.Tensor]], tokenizer=None,
                 max_len: int = 2048, compile: bool | None = None, graphs: bool | None = None, bos: bool = False,
                 compile_mode: str | None = None) -> None:
        self.shape = shape
        self.family = FAMILIES[shape.family]
        self.embed, self.final_norm, self.head = embed, final_norm, head
        self.blocks = blocks
        self.layout = layout
        self.rotary = rotary
        self.tokenizer = tokenizer
        self.max_len = max_len
        self.device = embed.device
        self.dtype = embed.dtype
        on_gpu = self.device.type == "cuda"
        self.use_graphs = on_gpu if graphs is None else graphs and on_gpu
        self.bos = bos
        step = block_step
        if (on_gpu if compile is None else compile):
            step = torch.compile(block_step, fullgraph=True, dynamic=False, mode=compile_mode)
        self._decode_block = step
        capacity = shape.num_blocks if blocks.mode == "all" else blocks.capacity
        cache_shape = (1, shape.kv_heads, max_len, shape.head_dim)
        self.k_cache = [torch.zeros(cache_shape, dtype=self.dtype, device=self.device) for _ in range(capacity)]
        self.v_cache = [torch.zeros(cache_shape, dtype=self.dtype, device=self.device) for _ in range(capacity)]
        self._token = torch.zeros(1, 1, dtype=torch.long, device=self.device)
        self._position = torch.zeros(1, dtype=torch.long, device=self.device)
        self._graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._pool = None
        self.stack: list[dict] = []
        self.stack_types: list[str] = []
        self.kept: tuple[int, ...] = ()
        self.router = None
        self.router_sets: list[OmissionSet] = []

    # -- construction -----------------------------------------------------------------------------------------

    @classmethod
    def from_model(cls, model, tokenizer=None, device: str | None = None, budget: int | None = None, **options) -> Engine:
        """Build from a transformers causal LM; its block weights are copied into the engine's layout."""
        config = model.config
        shape = Shape.from_config(config)
        arch = architecture_for(config.model_type)
        family = FAMILIES[shape.family]
        stack = resolve(model, arch.stack)
        hf_blocks = getattr(stack, arch.blocks)
        device = torch.device(device or model.device)
        dtype = next(model.parameters()).dtype
        present = set(_block_tensors(hf_blocks[0], family))
        layout = BlockLayout(shape, present)

        def flat(block, where, pin=False):
            tensors = _block_tensors(block, family)
            out = torch.empty(layout.numel, dtype=dtype, device=where, pin_memory=pin)
            for name, view in layout.views(out).items():
                view.copy_(tensors[name])
            return out

        if budget is None:
            residency = ResidentBlocks([flat(b, device) for b in hf_blocks], layout)
        else:
            pin = device.type == "cuda"
            residency = SlotPool([flat(b, "cpu", pin) for b in hf_blocks], layout, budget, device)
        norm = resolve(stack, arch.final_norm).weight.detach().to(device)
        embed = getattr(stack, arch.embed).weight.detach().to(device)
        head = resolve(model, arch.head).weight.detach().to(device)
        rotary = _rotary_tables(resolve(stack, arch.position_embedding), arch.positions, shape, options.get("max_len", 2048), device, dtype)
        return cls(shape, embed, norm, head, residency, layout, rotary, tokenizer, bos=arch.bos, **options)

    @classmethod
    def random(cls, config, device: str = "cuda", dtype=torch.bfloat16, budget: int | None = None, seed: int = 0,
               **options) -> Engine:
        """A model of this config with random weights: speed does not depend on weight values."""
        import transformers

        shape = Shape.from_config(config)
        family = FAMILIES[shape.family]
        present = set(family.names) | ({"qkv_bias"} if getattr(config, "attention_bias", False) or shape.family == "qwen2" else set())
        layout = BlockLayout(shape, present)
        generator = torch.Generator(device=device).manual_seed(seed)
        on_gpu = torch.device(device).type == "cuda"

        def filled(n):
            return torch.empty(n, dtype=dtype, device=device).normal_(0, 0.02, generator=generator)

        def pinned(n):
            host = torch.empty(n, dtype=dtype, pin_memory=on_gpu)
            return host.copy_(filled(n))

        if budget is None:
            residency = ResidentBlocks([filled(layout.numel) for _ in range(shape.num_blocks)], layout)
        else:
            residency = SlotPool([pinned(layout.numel) for _ in range(shape.num_blocks)], layout, budget, device)
        with torch.device("meta"):
            skeleton = transformers.AutoModelForCausalLM.from_config(config)
        arch = architecture_for(config.model_type)
        rotary_module = type(resolve(resolve(skeleton, arch.stack), arch.position_embedding))(config=config)
        rotary = _rotary_tables(rotary_module, arch.positions, shape, options.get("max_len", 2048), device, dtype)
        embed = filled(shape.vocab * shape.hidden).view(shape.vocab, shape.hidden)
        head = filled(shape.vocab * shape.hidden).view(shape.vocab, shape.hidden)
        norm = torch.ones(shape.hidden, dtype=dtype, device=device)
        return cls(shape, embed, norm, head, residency, layout, rotary, None, **options)

    # -- stacks, caches, graphs ---------------------------------------------------------------------------------

    def use(self, omit: OmissionSet | Sequence[int]) -> dict:
        """Make the kept blocks of this omission set the running stack; returns what the switch did and cost."""
        omitted = set(omit)
        if any(not 0 <= b < self.shape.num_blocks for b in omitted):
            raise PuddingError(f"block index out of range: this model has {self.shape.num_blocks} blocks")
        kept = tuple(b for b in range(self.shape.num_blocks) if b not in omitted)
        if not kept:
            raise PuddingError("the omission set removes every block")
        started = time.perf_counter()
        if kept == self.kept and self.blocks.mode == "all":
            self._events = [None] * len(kept)
            return {"copied": 0, "moved": 0, "bytes": 0, "ms": 0.0}
        self.stack, self._events, stats = self.blocks.arrange(kept)
        self.stack_types = [self.shape.layer_types[b] for b in kept]
        self.kept = kept
        stats["ms"] = 1000 * (time.perf_counter() - started)  # issuing; the copies themselves overlap pre-fill
        return stats

    def _masks(self, positions: torch.Tensor, keys: int) -> dict[str, torch.Tensor]:
        key_pos = torch.arange(keys, device=self.device)
        causal = key_pos[None, :] <= positions[:, None]
        masks = {"full_attention": causal}
        if self.shape.sliding_window:
            masks["sliding_attention"] = causal & (key_pos[None, :] > positions[:, None] - self.shape.sliding_window)
        return masks

    def _run_stack(self, x: torch.Tensor, positions: torch.Tensor, masks: dict | None, keys: int, step, wait: bool = False) -> torch.Tensor:
        for j, (w, layer_type) in enumerate(zip(self.stack, self.stack_types)):
            if wait and self._events[j] is not None:
                torch.cuda.current_stream().wait_event(self._events[j])
            cos, sin = (t[positions] for t in self.rotary[layer_type])
            mask = None if masks is None else masks[layer_type]
            x = step(x, w, self.k_cache[j], self.v_cache[j], positions, cos, sin, mask, keys, self.shape, self.family)
        return x

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(_norm(x, self.final_norm, self.shape.eps, self.family.norm), self.head).float()

    def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        x = torch.nn.functional.embedding(ids, self.embed)
        return x * torch.tensor(self.shape.embed_scale, dtype=x.dtype) if self.shape.embed_scale != 1.0 else x

    @torch.inference_mode()
    def prefill(self, ids: Sequence[int]) -> torch.Tensor:
        """Run the prompt through the current stack, filling the KV cache; returns the last position's logits."""
        length = len(ids)
        tokens = torch.tensor([list(ids)], device=self.device)
        positions = torch.arange(length, device=self.device)
        # A sliding window shorter than the prompt needs an explicit mask; otherwise plain causal attention.
        needs_mask = self.shape.sliding_window is not None and length > self.shape.sliding_window
        masks = self._masks(positions, length) if needs_mask else None
        x = self._run_stack(self._embed(tokens), positions, masks, length, block_step, wait=True)
        return self._logits(x[:, -1])

    def _decode_eager(self) -> torch.Tensor:
        masks = self._masks(self._position, self.max_len)
        x = self._run_stack(self._embed(self._token), self._position, masks, self.max_len, self._decode_block)
        return self._logits(x[:, -1])

    def _graph_key(self) -> tuple:
        return (self.blocks.mode, self.kept if self.blocks.mode == "all" else len(self.kept))

    def _decode_graph(self) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        key = self._graph_key()
        if key not in self._graphs:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(2):  # warm-up: compilation, allocator
                    self._decode_eager()
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            with torch.cuda.graph(graph, pool=self._pool):
                logits = self._decode_eager()
            self._graphs[key] = (graph, logits)
        return self._graphs[key]

    @torch.inference_mode()
    def decode_step(self, token: torch.Tensor, position: int) -> torch.Tensor:
        """Logits for the next token, given the last token (a device tensor) at `position`."""
        self._token.copy_(token.view(1, 1))
        self._position.fill_(position)
        if self.use_graphs:
            graph, logits = self._decode_graph()
            graph.replay()
            return logits
        return self._decode_eager()

    @torch.inference_mode()
    def warm_up(self, sets: Sequence[Sequence[int]]) -> float:
        """Compile and capture the decode step of every set ahead, so no request pays for it."""
        started = time.perf_counter()
        for omit in sets:
            self.use(omit)
            self.prefill([0, 1])
            self.decode_step(torch.zeros(1, dtype=torch.long, device=self.device), 2)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - started

    # -- routing and generation ---------------------------------------------------------------------------------

    def attach_router(self, router, sets: Sequence[OmissionSet]) -> None:
        self.router = router
        self.router_sets = list(sets)

    def route(self, prompt: str) -> tuple[OmissionSet, int, float]:
        if self.router is None:
            raise PuddingError("this engine has no router: give an omission set, or load a bundle with a trained router")
        result = self.router.route([prompt])
        return self.router_sets[result.choices[0]], result.choices[0], 1000 * result.seconds

    def encode(self, prompt: str) -> list[int]:
        if self.tokenizer is None:
            raise PuddingError("this engine has no tokenizer; pass token ids")
        ids = self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        if self.bos and self.tokenizer.bos_token_id is not None:
            ids = [self.tokenizer.bos_token_id] + ids
        return ids

    def stream(self, prompt: str | Sequence[int], omit: Sequence[int] | None = None, max_new_tokens: int = 128,
               stop_ids: Sequence[int] | None = None, route_text: str | None = None) -> Iterator[tuple[str, Generation]]:
        """Yield (new text, generation so far) as tokens arrive. With no omission set the router chooses one."""
        sync = torch.cuda.synchronize if self.device.type == "cuda" else (lambda: None)
        timings = Timings()
        set_index = None
        started = time.perf_counter()
        if omit is None:
            if not isinstance(prompt, str) and route_text is None:
                raise PuddingError("routing needs the prompt text")
            omit, set_index, timings.route_ms = self.route(route_text or prompt)
        ids = self.encode(prompt) if isinstance(prompt, str) else list(prompt)
        if not ids:
            raise PuddingError("the prompt is empty")
        if len(ids) + max_new_tokens > self.max_len:
            raise PuddingError(f"prompt ({len(ids)} tokens) plus {max_new_tokens} new tokens exceed the engine's "
                               f"context of {self.max_len} tokens")
        swap_started = time.perf_counter()
        timings.swap = self.use(omit)
        timings.swap_ms = 1000 * (time.perf_counter() - swap_started)
        stops = set(stop_ids if stop_ids is not None else self._stop_ids())
        logits = self.prefill(ids)
        token = logits.argmax(-1)
        first = int(token)
        sync()
        timings.prefill_ms = 1000 * (time.perf_counter() - swap_started) - timings.swap_ms
        timings.ttft_ms = 1000 * (time.perf_counter() - started)
        generated = [first]
        detokenizer = TextStream(self.tokenizer)
        decode_started = time.perf_counter()
        result = Generation("", generated, list(omit), set_index, timings, len(ids))
        position = len(ids)
        while True:
            text = detokenizer.push(generated[-1])
            timings.new_tokens = len(generated)
            timings.decode_ms = 1000 * (time.perf_counter() - decode_started)
            if generated[-1] in stops:
                result.finish_reason = "stop"
            done = result.finish_reason == "stop" or len(generated) >= max_new_tokens
            result.text = detokenizer.full_text() if done else result.text + text  # exact at the end, once
            yield text, result
            if done:
                break
            token = self.decode_step(token, position).argmax(-1)
            generated.append(int(token))
            position += 1

    def generate(self, prompt: str | Sequence[int], omit: Sequence[int] | None = None, max_new_tokens: int = 128,
                 stop_ids: Sequence[int] | None = None, on_text: Callable[[str], None] | None = None) -> Generation:
        result = None
        for piece, result in self.stream(prompt, omit, max_new_tokens, stop_ids):
            if on_text and piece:
                on_text(piece)
        return result

    def _stop_ids(self) -> list[int]:
        if self.tokenizer is None or self.tokenizer.eos_token_id is None:
            return []
        return [self.tokenizer.eos_token_id]

    def memory(self) -> dict:
        """Bytes of weights and cache held on the device."""
        def size(t):
            return t.numel() * t.element_size()

        blocks = sum(size(f) for f in (self.blocks.flats if self.blocks.mode == "all" else self.blocks.slots))
        return {"blocks": blocks, "embed_head_norm": size(self.embed) + size(self.head) + size(self.final_norm),
                "kv_cache": sum(size(t) for t in self.k_cache + self.v_cache), "block_bytes": self.layout.numel * self.embed.element_size()}


def _rotary_tables(module, positions_kind: str, shape: Shape, max_len: int, device, dtype) -> dict:
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
