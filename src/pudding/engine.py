"""The inference engine: make the chosen blocks resident, pre-fill and decode on the shorter stack.

In the spirit of gpt-fast, the engine keeps each transformer block's weights in its own layout (one flat buffer per
block, viewed as fused QKV and gate/up projections: `block.py`), a static KV cache per *stack position* (the j-th
block that runs), and on GPUs a CUDA graph of the whole decode step per stack and context bucket (attention reads the
cache only as far as the bucket holding the position, in one Triton kernel a block: `attention.py`), so decoding is
not bound by Python or kernel launches. Where the blocks live (all on the device, or a memory budget of slots) is
`residency.py`.

The engine never chooses blocks: callers ask a policy (`policy.py`) for a `Choice` and pass it in, and the time the
choice took counts in the time to first token; or they pass the policy's `Pending` choice, which the engine resolves
only after the blocks every candidate set keeps have started to pre-fill, so a router's time hides behind them. On
GPUs it goes further and guesses: the stack most recent routed prompts got pre-fills ahead, as many blocks as the router's
time covers, and a different choice resumes from the blocks both stacks share.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch

from .architectures import resolve
from .block import (BlockLayout, Shape, block_step, block_tensors, engine_architecture, lora_block_tensors, lora_layout,
                    random_block_tensors, rms_norm, rotary_tables)
from .errors import PuddingError
from .omission import OmissionSet
from .policy import Choice, Pending
from .quantize import (QuantizedLinear, device_form, quantized_linear, quantized_shapes, random_codes, scheme_of,
                       split_scheme)
from .residency import ResidentBlocks, SlotPool

PREFILL_BUCKETS = (16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)  # pre-fill lengths a graph is captured for
# Context lengths a decode graph attends over: a step reads the cache only up to the bucket holding its position, not
# the whole context (~5% of an 8B-shape step at a 4096 context on an H200). Four apart: each is one more compile.
DECODE_BUCKETS = (256, 1024, 4096, 16384, 65536)
RECENT_CHOICES = 32  # routed choices whose most frequent stack speculation pre-fills ahead of the next one


def _tokens_dynamic(compiled_step: Callable) -> Callable:
    """A compiled block step whose token count (and a mask's key count) is symbolic from its first call: one compile
    serves every pre-fill length. Only those: the model's geometry stays static, where automatic dynamic shapes would
    make it symbolic as soon as a second model ran in the process (slower kernels for it, and its pre-fill failed to
    compile: a symbolic `heads > kv_heads` is no bool for `scaled_dot_product_attention`). A one-token call stays
    static."""

    def step(x, w, k_cache, v_cache, positions, cos, sin, mask, *rest):
        for tensor, dim in ((x, 1), (positions, 0), (cos, 0), (sin, 0), (mask, 0), (mask, 1)):
            if tensor is not None:
                torch._dynamo.maybe_mark_dynamic(tensor, dim)
        return compiled_step(x, w, k_cache, v_cache, positions, cos, sin, mask, *rest)

    return step


class _Pace:
    """How long one pre-fill block and a choice take at each padded length, measured as requests run (CUDA events
    read once they have completed, so nothing waits for them): how many blocks can pre-fill ahead of a choice in the
    time the router takes. Both keep the fastest time seen: routing slowed down by the blocks beside it must not make
    the next guess longer (and so slow it down more)."""

    def __init__(self, cuda: bool) -> None:
        self.cuda = cuda
        self.block_ms: dict[int, float] = {}
        self.routing_ms: dict[int, float] = {}
        self._open: list[tuple] = []  # (padded, blocks, start event, end event) not read yet

    @contextlib.contextmanager
    def timing(self, padded: int, blocks: int):
        """Time what runs inside (a graph replay, an eager pre-fill) as `blocks` blocks at this padded length."""
        if not self.cuda:
            started = time.perf_counter()
            yield
            _keep_fastest(self.block_ms, padded, 1000 * (time.perf_counter() - started) / max(1, blocks))
            return
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        yield
        end.record()
        self._open = [*self._open[-15:], (padded, max(1, blocks), start, end)]

    def routed(self, padded: int, ms: float) -> None:
        _keep_fastest(self.routing_ms, padded, ms)

    def blocks_within(self, padded: int) -> int:
        """How many blocks pre-fill in the routing time at this length (an even number, so that fewer distinct
        graphs get captured); 0 until both have been measured."""
        still_open = []
        for length, blocks, start, end in self._open:
            if end.query():
                _keep_fastest(self.block_ms, length, start.elapsed_time(end) / blocks)
            else:
                still_open.append((length, blocks, start, end))
        self._open = still_open
        per_block, routing = self.block_ms.get(padded), self.routing_ms.get(padded)
        if not per_block or routing is None:
            return 0
        return 2 * int(routing / per_block / 2)


def _keep_fastest(times: dict[int, float], key: int, ms: float) -> None:
    times[key] = min(ms, times.get(key, ms))


def _first_kept(keep_from: int, blocks: int) -> int:
    """The first position whose output blocks pre-filled ahead keep (`prefill_ahead`): after the `keep_from`-th
    block, at least the first, at most the last."""
    return max(1, min(keep_from, blocks))


def common_start(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading blocks two stacks share."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


@dataclass
class Timings:
    route_ms: float = 0.0
    swap_ms: float = 0.0  # making the chosen blocks resident (host→device copies are overlapped with pre-fill)
    prefill_ms: float = 0.0  # the rest of the time to first token (tokenizing, the pre-fill routing did not hide)
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
    set_index: int | None  # its number among the policy's sets, when it is one of them
    timings: Timings
    prompt_tokens: int = 0
    finish_reason: str = "length"
    routed: bool = False  # a router chose the set for this prompt
    logprobs: list[tuple[float, dict[int, float]]] | None = None  # per generated token: its log-prob, the top ones


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
                 compile_mode: str | None = None, buckets: bool | None = None, lora_rank: int = 0,
                 head_scales: torch.Tensor | None = None) -> None:
        self.shape = shape
        self.arch = shape.arch
        self.embed, self.final_norm, self.head = embed, final_norm, head
        self.head_scales = head_scales  # a quantized head (`int8+head`, `int4+head`): `head` holds its codes
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
        self._longest_token_bytes: int | None = None  # see tokens_at_least
        # Pre-fill pads the prompt to a length bucket, so that one captured graph serves every prompt of the bucket:
        # the padding comes after the prompt, so causal attention keeps it out of every real token's result. Decode
        # attends over a context bucket (DECODE_BUCKETS): positions beyond the step's own are masked either way.
        self.bucketed = on_gpu if buckets is None else buckets
        self._decode_block = self._prefill_block = block_step
        if on_gpu if compile is None else compile:
            for limit in ("recompile_limit", "cache_size_limit"):  # the name changed across torch versions
                if hasattr(torch._dynamo.config, limit):
                    setattr(torch._dynamo.config, limit, max(getattr(torch._dynamo.config, limit), 64))
            torch._inductor.config.coordinate_descent_tuning = True  # tunes the fused small kernels of a step
            self._decode_block = torch.compile(block_step, fullgraph=True, dynamic=False, mode=compile_mode)
            self._prefill_block = _tokens_dynamic(torch.compile(block_step, fullgraph=True, dynamic=False))
        capacity = shape.num_blocks if blocks.mode == "all" else blocks.capacity
        cache_shape = (1, shape.kv_heads, max_len, shape.head_dim)
        # one allocation per K and V (the allocator rounds each up), a view per stack position
        self.k_cache = list(torch.zeros((capacity, *cache_shape), dtype=self.dtype, device=self.device).unbind(0))
        self.v_cache = list(torch.zeros((capacity, *cache_shape), dtype=self.dtype, device=self.device).unbind(0))
        self._token = torch.zeros(1, 1, dtype=torch.long, device=self.device)
        self._position = torch.zeros(1, dtype=torch.long, device=self.device)
        # Pre-fill's input, one buffer: the prompt's last position in its bucket, then the (padded) prompt. The host
        # writes both into a pinned copy and sends them in one transfer (`_load_prompt`).
        self._prompt_input = torch.zeros(max_len + 1, dtype=torch.long, device=self.device)
        self._last, self._prompt = self._prompt_input[:1], self._prompt_input[1:].view(1, max_len)
        self._prompt_host = torch.zeros(max_len + 1, dtype=torch.long, pin_memory=on_gpu)
        self._prompt_sent = torch.cuda.Event() if on_gpu else None  # recorded after each transfer out of it
        self._positions = torch.arange(max_len, device=self.device)
        self._graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._pool = None  # the graphs' memory pool (`_memory_pool`), and their stream (`_side_stream`)
        self._capture_stream = None
        self._ahead: tuple | None = None  # (padded length, prompt length, blocks) of `prefill_ahead`
        self._resume: dict[int, torch.Tensor] = {}  # after p blocks pre-filled ahead, their output (graphs write it)
        # Speculation (`start`): a pending choice is expected to pick the stack most of the last RECENT_CHOICES
        # routed prompts got (on the bundles' evaluations, right 29-58% of the time against 22-45% for the last
        # one's: results/speculation-hits.md), so that stack's leading blocks pre-fill while the router runs, as many
        # as its time covers (`_pace`). Only on GPUs: on the CPU the router and the blocks take turns, so a wrong
        # guess would cost its blocks in full.
        self.speculate = on_gpu
        self.expected: tuple[int, ...] | None = None
        self._recent: collections.deque = collections.deque(maxlen=RECENT_CHOICES)
        self.last_ahead = 0  # blocks the last `start` pre-filled ahead of its choice
        self.last_resumed = 0  # and the stack position its chosen stack went on from (0: from the start)
        self._pace = _Pace(on_gpu)
        # A server (`defer_captures`) speculates only with graphs already captured: a guess or a resume point whose
        # graph is missing is left for `capture_wanted`, run when no request waits, instead of a request paying a
        # capture (tens of ms; each length bucket, guess, blocks ahead and resume point has a graph of its own).
        self.defer_captures = False
        self._wanted: dict[tuple, None] = {}  # graph keys, oldest first
        self.stack: list[dict] = []
        self.stack_types: list[str] = []
        self.kept: tuple[int, ...] = ()
        self._events: list = []  # per stack position: the copy bringing its block in (memory budget), or None
        # Unmerged LoRA (`set_adapters`): each stack position has a small buffer that holds the update of the block
        # running there under the set in use, written when the set changes (graphs read it in place).
        self.lora_rank = lora_rank
        self.adapters: dict[OmissionSet, dict[int, torch.Tensor]] = {}
        if lora_rank:
            present = {n for n in layout.entries if not n.endswith("_scales")}
            self.lora_layout = lora_layout(shape, present, self.dtype, lora_rank)
            self._lora_slots = [self.lora_layout.empty(self.device).zero_() for _ in range(capacity)]
            self._lora_views = [self.lora_layout.views(slot) for slot in self._lora_slots]
            self._lora_at: list[tuple | None] = [None] * capacity  # (set, block) whose update each slot holds

    # -- construction -----------------------------------------------------------------------------------------

    @classmethod
    def from_model(cls, model, tokenizer=None, device: str | None = None, budget: int | None = None, **options) -> Engine:
        """Build from a transformers causal LM; its block weights are copied into the engine's layout (quantized
        blocks, see `quantize.quantize_blocks`, as their codes and scales)."""
        config = model.config
        shape = Shape.from_config(config)
        arch = engine_architecture(config.model_type)
        stack = resolve(model, arch.stack)
        hf_blocks = getattr(stack, arch.blocks)
        device = torch.device(device or model.device)
        dtype = next(model.parameters()).dtype
        present = {name for name in block_tensors(hf_blocks[0], arch) if not name.endswith("_scales")}
        layout = BlockLayout.of(shape, present, dtype, scheme_of(model), device)

        def flat(block, where, pin=False):
            return layout.fill(layout.empty(where, pin), block_tensors(block, arch))

        if budget is None:
            residency = ResidentBlocks([flat(b, device) for b in hf_blocks], layout)
        else:
            pin = device.type == "cuda"
            residency = SlotPool([flat(b, "cpu", pin) for b in hf_blocks], layout, budget, device)
        norm = resolve(stack, arch.final_norm).weight.detach().to(device)
        embed = getattr(stack, arch.embed).weight.detach().to(device)
        head_module = resolve(model, arch.head)
        if isinstance(head_module, QuantizedLinear):
            head, head_scales = (t.to(device) for t in device_form(head_module.weight_codes, head_module.weight_scales,
                                                                   device, dtype))
        else:
            head, head_scales = head_module.weight.detach().to(device), None
        rotary = rotary_tables(resolve(stack, arch.position_embedding), arch.positions, shape, options.get("max_len", 2048), device, dtype)
        return cls(shape, embed, norm, head, residency, layout, rotary, tokenizer, bos=arch.bos, head_scales=head_scales,
                   **options)

    @classmethod
    def random(cls, config, device: str = "cuda", dtype=torch.bfloat16, budget: int | None = None, seed: int = 0,
               quantize: str | None = None, **options) -> Engine:
        """A model of this config with random weights: speed does not depend on weight values."""
        import transformers

        shape = Shape.from_config(config)
        arch = engine_architecture(config.model_type)
        scheme, quantized_head = split_scheme(quantize) if quantize else (None, False)
        layout = BlockLayout.of(shape, random_block_tensors(arch, config), dtype, scheme, device)
        generator = torch.Generator(device=device).manual_seed(seed)
        on_gpu = torch.device(device).type == "cuda"

        def filled(n):
            return torch.empty(n, dtype=dtype, device=device).normal_(0, 0.02, generator=generator)

        def random_block(where, pin=False):
            flat = layout.empty(where, pin)
            for view in layout.views(flat).values():
                if view.dtype.is_floating_point:
                    view.copy_(filled(view.numel()).view(view.shape))
                else:
                    view.copy_(random_codes(view.shape, view.dtype, generator, device))
            return flat

        if budget is None:
            residency = ResidentBlocks([random_block(device) for _ in range(shape.num_blocks)], layout)
        else:
            residency = SlotPool([random_block("cpu", on_gpu) for _ in range(shape.num_blocks)], layout, budget, device)
        with torch.device("meta"):
            skeleton = transformers.AutoModelForCausalLM.from_config(config)
        rotary_module = type(resolve(resolve(skeleton, arch.stack), arch.position_embedding))(config=config)
        rotary = rotary_tables(rotary_module, arch.positions, shape, options.get("max_len", 2048), device, dtype)
        embed = filled(shape.vocab * shape.hidden).view(shape.vocab, shape.hidden)
        if quantized_head:
            (codes, codes_dtype), (scales, _) = quantized_shapes(shape.vocab, shape.hidden, scheme, dtype, device)
            head = random_codes(codes, codes_dtype, generator, device)
            head_scales = filled(math.prod(scales)).view(scales)
        else:
            head, head_scales = filled(shape.vocab * shape.hidden).view(shape.vocab, shape.hidden), None
        norm = torch.ones(shape.hidden, dtype=dtype, device=device)
        if on_gpu:  # the blocks were filled through device temporaries (up to a whole gate/up matrix): hand their
            torch.cuda.empty_cache()  # cached segments back, or the KV caches land in them with the rest unused
        return cls(shape, embed, norm, head, residency, layout, rotary, None, head_scales=head_scales, **options)

    # -- stacks, caches, graphs ---------------------------------------------------------------------------------

    def set_adapters(self, adapters: dict) -> None:
        """The LoRA adapter of each set (`lora.Adapter`), applied unmerged while that set is in use; sets without
        one (the dense model) run with a zero update. Needs an engine built with `lora_rank` = the adapters' rank."""
        if not self.lora_rank:
            raise PuddingError("this engine was built without LoRA slots (lora_rank=0)")
        for omit, adapter in adapters.items():
            self._check_set(omit)
            blocks = {}
            for block, modules in adapter.weights.items():
                flat = self.lora_layout.empty(self.device)
                tensors = lora_block_tensors(modules, self.arch)
                for name, view in self.lora_layout.views(flat).items():
                    if tensors[name].shape != view.shape:
                        raise PuddingError(f"the LoRA adapter of the set omitting {omit.label()} has rank "
                                           f"{modules[next(iter(modules))][0].shape[0]}, the engine {self.lora_rank}")
                    view.copy_(tensors[name])
                blocks[block] = flat
            self.adapters[omit] = blocks
        self._lora_at = [None] * len(self._lora_at)
        self.kept = ()  # the next `use` arranges the stack and writes the updates, even for the same set

    def random_adapters(self, sets, seed: int = 0) -> None:
        """Random updates for these sets (speed benchmarks: the cost of an unmerged adapter does not depend on it)."""
        generator = torch.Generator(device=self.device).manual_seed(seed)
        for omit in sets:
            self.adapters[omit] = {}
            for block in omit.kept():
                flat = self.lora_layout.empty(self.device)
                for view in self.lora_layout.views(flat).values():
                    view.normal_(0, 0.01, generator=generator)
                self.adapters[omit][block] = flat
        self._lora_at = [None] * len(self._lora_at)
        self.kept = ()

    def _place_adapters(self, omit: OmissionSet, kept: tuple[int, ...]) -> None:
        """Write the set's update of each kept block into its stack position (only where another one is there)."""
        updates = self.adapters.get(omit, {})
        for j, block in enumerate(kept):
            update = updates.get(block)
            held = (omit, block) if update is not None else None
            if self._lora_at[j] != held:
                self._lora_slots[j].copy_(update) if update is not None else self._lora_slots[j].zero_()
                self._lora_at[j] = held
        self.stack = [{**w, **self._lora_views[j]} for j, w in enumerate(self.stack)]

    def omission(self, blocks=()) -> OmissionSet:
        """An omission set of this model (validated: 0-based, in range, at least one block left)."""
        return OmissionSet(blocks, self.shape.num_blocks)

    def check_fits(self, omit: OmissionSet) -> None:
        """Refuse a set that keeps more blocks than a memory budget holds."""
        kept = self.shape.num_blocks - len(omit)
        if self.blocks.mode == "budget" and kept > self.blocks.capacity:
            raise PuddingError(f"the omission set keeps {kept} blocks but the memory budget holds {self.blocks.capacity}")

    def _check_set(self, omit) -> None:
        if not isinstance(omit, OmissionSet) or omit.num_blocks != self.shape.num_blocks:
            raise PuddingError(f"the engine takes an omission set of this model's {self.shape.num_blocks} blocks "
                               "(engine.omission(blocks))")

    def use(self, omit: OmissionSet) -> dict:
        """Make the kept blocks of this omission set the running stack; returns what the switch did and cost."""
        self._check_set(omit)
        kept = tuple(omit.kept())
        started = time.perf_counter()
        if kept == self.kept and self.blocks.mode == "all":
            self._events = [None] * len(kept)
            return {"copied": 0, "moved": 0, "bytes": 0, "ms": 0.0}
        self.stack, self._events, stats = self.blocks.arrange(kept)
        if self.lora_rank:
            self._place_adapters(omit, kept)
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

    def _run_stack(self, x: torch.Tensor, positions: torch.Tensor, masks: dict | None, step, wait: bool = False,
                   start: int = 0, layers: list[tuple[dict, str]] | None = None,
                   saves: dict[int, torch.Tensor] | None = None) -> torch.Tensor:
        """x through the stack from position `start` (or through `layers`, from position 0), each stack position
        with its own KV cache; `saves` (p -> buffer) keeps the output after the first p positions."""
        layers = list(zip(self.stack, self.stack_types))[start:] if layers is None else layers
        # cos / sin of these positions once per attention type, not once per block (a gather kernel each)
        rotary = {kind: (self.rotary[kind][0][positions], self.rotary[kind][1][positions])
                  for kind in {layer_type for _, layer_type in layers}}
        for j, (w, layer_type) in enumerate(layers, start):
            if wait and self._events[j] is not None:
                torch.cuda.current_stream().wait_event(self._events[j])
            cos, sin = rotary[layer_type]
            mask = None if masks is None else masks[layer_type]
            x = step(x, w, self.k_cache[j], self.v_cache[j], positions, cos, sin, mask, self.shape, self.arch)
            if saves and j + 1 in saves:
                saves[j + 1].copy_(x)
        return x

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        h = rms_norm(x, self.final_norm, self.shape.eps, self.arch.norm)
        if self.head_scales is None:
            return torch.nn.functional.linear(h, self.head).float()
        return quantized_linear(h, self.head, self.head_scales).float()

    @property
    def head_bytes(self) -> int:
        """Bytes of the output head (its codes and scales when quantized), which every decode step reads."""
        return sum(t.numel() * t.element_size() for t in self._head_tensors())

    def _head_tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.head, self.head_scales) if t is not None]

    def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        x = torch.nn.functional.embedding(ids, self.embed)
        return x * torch.tensor(self.shape.embed_scale, dtype=x.dtype) if self.shape.embed_scale != 1.0 else x

    def bucket(self, length: int) -> int:
        """The padded length a prompt of `length` tokens runs at: the next bucket, or itself beyond the last."""
        return next((b for b in PREFILL_BUCKETS if length <= b <= self.max_len), length)

    @torch.inference_mode()
    def prefill(self, ids: Sequence[int]) -> torch.Tensor:
        """Run the prompt through the current stack, filling the KV cache; returns the last position's logits (a
        buffer the next pre-fill or decode step may overwrite). On GPUs a captured graph per (stack, length bucket)
        runs it, unless a memory-budget swap is still copying blocks in (then the pre-fill waits for each block's
        copy as it reaches it, eagerly)."""
        padded = self._load_prompt(ids)
        return self._prefill_loaded(padded, len(ids))

    def _prefill_loaded(self, padded: int, length: int) -> torch.Tensor:
        """`prefill` of the prompt already in the pre-fill buffer."""
        copying = any(event is not None for event in self._events)
        if self._graphed(padded, length) and not copying:
            graph, logits = self._prefill_graph(padded)
            with self._timed(padded, len(self.kept)):
                graph.replay()
            return logits
        with self._graph_memory():
            logits = self._prefill_padded(padded, wait=True)
        self._events = [None] * len(self._events)  # the copies are waited for: the stack is resident now
        return logits

    def can_prefill_ahead(self) -> bool:
        """Whether blocks can pre-fill before the set is chosen: only when every block sits at a fixed place (all
        resident) and carries no per-set LoRA update."""
        return self.blocks.mode == "all" and not self.lora_rank

    @torch.inference_mode()
    def prefill_ahead(self, ids: Sequence[int], blocks: Sequence[int], keep_from: int | None = None) -> None:
        """Start the pre-fill of a stack's first blocks before the omission set is known: those every candidate keeps,
        or more of the stack the choice is expected to be (`start`). On GPUs one graph per (length bucket, blocks),
        owned by no set, queued without waiting, so a router can choose meanwhile. The output after each block from
        the `keep_from`-th on (default: only after the last) is kept: `prefill_rest` finishes under the chosen stack
        from the last of those it shares with these blocks."""
        if not self.can_prefill_ahead():
            raise PuddingError("blocks can pre-fill ahead of the choice only with every block resident and no LoRA")
        blocks = tuple(blocks)
        if not blocks or list(blocks) != sorted(set(blocks)) or not 0 <= blocks[0] <= blocks[-1] < self.shape.num_blocks:
            raise PuddingError(f"cannot pre-fill blocks {list(blocks)} ahead: they must be increasing block numbers "
                               f"of the model's {self.shape.num_blocks}")
        padded = self._load_prompt(ids)
        first = len(blocks) if keep_from is None else _first_kept(keep_from, len(blocks))
        key, run = self._ahead_graph(padded, blocks, first)
        if self._graphed(padded, len(ids)):
            graph, _ = self._captured(key, run)
            with self._timed(padded, len(blocks)):
                graph.replay()
        else:
            with self._timed(padded, len(blocks)):
                run()
        self._ahead = (padded, len(ids), blocks, first, keep_from or 0)

    @torch.inference_mode()
    def prefill_rest(self) -> torch.Tensor:
        """Finish the pre-fill `prefill_ahead` started, through the rest of the current stack from the last kept
        output of the blocks it shares with those pre-filled ahead (from the start if none); returns the last
        position's logits, like `prefill`. Cache positions past that point are written again."""
        if self._ahead is None:
            raise PuddingError("nothing was pre-filled ahead")
        padded, length, blocks, first, shared = self._ahead
        self._ahead = None
        start = self._resume_point(padded, length, min(common_start(blocks, self.kept), len(blocks)), first, shared)
        self.last_resumed = start if start >= first else 0
        if start < first:
            return self._prefill_loaded(padded, length)
        key, run = self._rest_graph(padded, start)
        if self._graphed(padded, length):
            graph, logits = self._captured(key, run)
            graph.replay()
            return logits
        return run()

    def _ahead_graph(self, padded: int, blocks: tuple[int, ...], first: int) -> tuple[tuple, Callable]:
        """The graph key and step of `blocks` pre-filled ahead, keeping the output after each from the `first`-th."""
        saves = {p: self._resumed(p, padded) for p in range(first, len(blocks) + 1)}
        return ("ahead", padded, blocks, first), functools.partial(self._ahead_hidden, padded, blocks, saves)

    def _rest_graph(self, padded: int, start: int) -> tuple[tuple, Callable]:
        """The graph key and step of the current stack from position `start`, on the output kept there."""
        return self._rest_key(padded, start), functools.partial(self._rest_logits, padded, start,
                                                                self._resumed(start, padded))

    def _rest_key(self, padded: int, start: int) -> tuple:
        return ("rest", padded, start, *self._graph_key())

    def _resume_point(self, padded: int, length: int, start: int, first: int, shared: int) -> int:
        """Where the chosen stack goes on after blocks pre-filled ahead: `start`, the last kept output the stacks
        share (before `first`, the first one kept: from the start). With `defer_captures` and the graph from
        `start` not captured, the latest kept output before it whose graph is, or the one after the blocks every set
        keeps (`shared`: not speculation's, its graph is captured when needed), else 0."""
        if start < first or start == shared or self._ready(self._rest_key(padded, start), padded, length):
            return start
        return next((s for s in range(start - 1, first - 1, -1)
                     if s == shared or self._rest_key(padded, s) in self._graphs), 0)

    def _timed(self, padded: int, blocks: int):
        """Time a pre-fill for the speculation's pace (`_Pace`), only while speculating: nothing else reads it, and
        each timing adds two CUDA events to the pre-fill's launches."""
        return self._pace.timing(padded, blocks) if self.speculate else contextlib.nullcontext()

    def _resumed(self, position: int, padded: int) -> torch.Tensor:
        """The kept output after `position` blocks pre-filled ahead, for a prompt padded to `padded`: the front of
        one flat buffer per position, so that it has the strides of any pre-fill's hidden states (a strided slice
        would compile the blocks again, to kernels that round differently)."""
        width = self.embed.shape[1]
        if position not in self._resume:
            self._resume[position] = torch.empty(self.max_len * width, dtype=self.dtype, device=self.device)
        return self._resume[position][: padded * width].view(1, padded, width)

    def _load_prompt(self, ids: Sequence[int], exact: bool = False) -> int:
        """Write the prompt into the pre-fill buffer, padded to its bucket (unless `exact`); returns the padded
        length. One transfer from pinned memory, which the device runs without the host waiting, instead of three
        operations (a pageable copy, zeroing the padding, setting the last position): 0.03 instead of 0.09 ms of host
        time for a 512-token prompt on an H100 (results/prompt-load-ab-h100.md)."""
        length = len(ids)
        if not 0 < length <= self.max_len:  # direct callers (benchmarks, the lm-eval model) skip generate's check
            raise PuddingError(f"the prompt ({length} tokens) must have 1 to {self.max_len} tokens (the engine's context)")
        padded = length if exact else self._padded(length)
        if self._prompt_sent is not None:
            self._prompt_sent.synchronize()  # the last transfer has read the pinned buffer
        host = self._prompt_host.numpy()
        host[0] = length - 1
        host[1 : length + 1] = ids
        host[length + 1 : padded + 1] = 0
        self._prompt_input[: padded + 1].copy_(self._prompt_host[: padded + 1], non_blocking=True)
        if self._prompt_sent is not None:
            self._prompt_sent.record()
        return padded

    def _padded(self, length: int) -> int:
        return self.bucket(length) if self.bucketed else length

    def _graphed(self, padded: int, length: int) -> bool:
        return self.use_graphs and padded == self.bucket(length)

    def _prefill_padded(self, length: int, wait: bool = False) -> torch.Tensor:
        return self._last_logits(self._prompt_hidden(length, wait))

    def _last_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self._logits(hidden.index_select(1, self._last)[:, 0])

    def _prompt_context(self, length: int) -> tuple[torch.Tensor, dict | None]:
        """Positions of the first `length` tokens of the pre-fill buffer, and the masks they need: a sliding window
        shorter than the prompt needs an explicit one; otherwise attention is plainly causal."""
        positions = self._positions[:length]
        needs_mask = self.shape.sliding_window is not None and length > self.shape.sliding_window
        return positions, self._masks(positions, length) if needs_mask else None

    def _prompt_hidden(self, length: int, wait: bool = False) -> torch.Tensor:
        """The last hidden states of the first `length` tokens of the pre-fill buffer, filling the KV cache."""
        positions, masks = self._prompt_context(length)
        return self._run_stack(self._embed(self._prompt[:, :length]), positions, masks, self._prefill_block, wait)

    def _ahead_hidden(self, length: int, blocks: tuple[int, ...], saves: dict[int, torch.Tensor]) -> torch.Tensor:
        """The prompt through `blocks` as the first stack positions, keeping the output after each in `saves`."""
        positions, masks = self._prompt_context(length)
        layers = [(self.blocks.views[b], self.shape.layer_types[b]) for b in blocks]
        return self._run_stack(self._embed(self._prompt[:, :length]), positions, masks, self._prefill_block,
                               layers=layers, saves=saves)

    def _rest_logits(self, length: int, start: int, hidden: torch.Tensor) -> torch.Tensor:
        """The stack from position `start` on, given the hidden states there; the last position's logits."""
        positions, masks = self._prompt_context(length)
        return self._last_logits(self._run_stack(hidden, positions, masks, self._prefill_block, start=start))

    @torch.inference_mode()
    def prompt_logprobs(self, ids: Sequence[int], chosen: Choice | OmissionSet, top: int = 0,
                        chunk: int = 512) -> tuple[list[float | None], list[dict[int, float] | None]]:
        """Log-probability of every prompt token given the ones before it (None for the first), and the `top` most
        likely tokens at each position, under the chosen set: what an OpenAI `echo` request returns."""
        choice = chosen if isinstance(chosen, Choice) else Choice(chosen)
        self.use(choice.omit)
        ids = list(ids)
        self._load_prompt(ids, exact=True)  # checks the length against the context
        token_logprobs: list[float | None] = [None]
        tops: list[dict[int, float] | None] = [None]
        with self._graph_memory():
            hidden = self._prompt_hidden(len(ids), wait=True)[0]
            self._events = [None] * len(self._events)
            targets = torch.tensor(ids[1:], device=self.device)
            for start in range(0, len(ids) - 1, chunk):  # logits over the vocabulary a chunk of positions at a time
                logprobs = self._logits(hidden[start : start + chunk][: len(ids) - 1 - start]).log_softmax(-1)
                token_logprobs += logprobs.gather(1, targets[start : start + len(logprobs), None])[:, 0].tolist()
                tops += _top(logprobs, top)
        return token_logprobs, tops

    def decode_keys(self, position: int) -> int:
        """How many cache positions a decode step at `position` attends over: the smallest context bucket that holds
        the position (the whole context when not bucketed, or beyond the last bucket)."""
        if not self.bucketed:
            return self.max_len
        return next((b for b in DECODE_BUCKETS if position < b < self.max_len), self.max_len)

    def _decode_eager(self, keys: int) -> torch.Tensor:
        masks = self._masks(self._position, keys)
        x = self._run_stack(self._embed(self._token), self._position, masks, self._decode_block)
        return self._logits(x[:, -1])

    def _graph_key(self) -> tuple:
        return (self.blocks.mode, self.kept if self.blocks.mode == "all" else len(self.kept))

    def _decode_graph(self, keys: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        return self._captured(("decode", keys, *self._graph_key()), lambda: self._decode_eager(keys))

    def _prefill_graph(self, length: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        return self._captured(("prefill", length, *self._graph_key()), lambda: self._prefill_padded(length))

    def _captured(self, key: tuple, step) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        """A CUDA graph of `step` (compiled on its first run), captured once per key; all share one memory pool,
        since they replay one at a time."""
        if key not in self._graphs:
            side = self._side_stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(2):  # warm-up: compilation, allocator
                    step()
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._memory_pool().id, stream=side):  # its products keep this stream's workspace
                logits = step()
            self._graphs[key] = (graph, logits)
        return self._graphs[key]

    def _side_stream(self) -> torch.cuda.Stream:
        """The stream of every warm-up, capture and pooled eager run: each new stream would get its own cuBLAS
        workspace (about 1 GB across the ~30 graphs of the 8B benchmark), and torch's shared capture stream would
        share its workspace with the router's graphs, which replay beside pre-fill (policy.Pending)."""
        if self._capture_stream is None:
            self._capture_stream = torch.cuda.Stream()
        return self._capture_stream

    def _memory_pool(self) -> torch.cuda.MemPool:
        if self._pool is None:
            self._pool = torch.cuda.MemPool()
        return self._pool

    @contextlib.contextmanager
    def _graph_memory(self):
        """Run eager work (a pre-fill that waits for a swap's copies, prompt log-probabilities) in the graphs' memory
        pool and on their stream, so that its activations reuse the graphs' intermediates instead of adding their
        own: the activation memory stays that of the longest captured pre-fill. What it returns lives in the pool
        like a graph's output, valid until the next pre-fill or decode step (which `prefill` already says)."""
        if not self.use_graphs:
            yield
            return
        side, main = self._side_stream(), torch.cuda.current_stream()
        side.wait_stream(main)
        with torch.cuda.stream(side), torch.cuda.use_mem_pool(self._memory_pool()):
            yield
        main.wait_stream(side)

    @torch.inference_mode()
    def decode_step(self, token: torch.Tensor, position: int) -> torch.Tensor:
        """Logits for the next token, given the last token (a device tensor) at `position`."""
        self._token.copy_(token.view(1, 1))
        self._position.fill_(position)
        keys = self.decode_keys(position)
        if self.use_graphs:
            graph, logits = self._decode_graph(keys)
            graph.replay()
            return logits
        return self._decode_eager(keys)

    @torch.inference_mode()
    def warm_up(self, sets: Sequence[OmissionSet], prefill_up_to: int = 0, ahead: int = 0) -> float:
        """Compile and capture the decode step of every set and context bucket ahead, so no request pays for it. With
        `prefill_up_to` (a server's context), also the pre-fill graph of every length bucket up to it, where the first
        prompt of each length would pay for a capture: the whole stack's per set or, with `ahead` (the blocks every
        set a routed policy can choose keeps, `Policy.shared`), the graph of those blocks and each set's rest from
        them, as `start` runs a pending choice. The graphs' memory pool then holds the longest pre-fill's activations
        from the start."""
        started = time.perf_counter()
        contexts = sorted({self.decode_keys(p) for p in (2, *DECODE_BUCKETS) if p < self.max_len})
        for omit in sets:
            self.use(omit)
            self.prefill([0, 1])
            for keys in contexts:  # the last position of each bucket (what it writes to the cache is never read)
                self.decode_step(torch.zeros(1, dtype=torch.long, device=self.device), keys - 1)
        if self.use_graphs:
            for length in (b for b in PREFILL_BUCKETS if b <= min(prefill_up_to, self.max_len)):
                for omit in sets:
                    self._warm_prefill([0] * length, omit, ahead)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - started

    def _warm_prefill(self, ids: list[int], omit: OmissionSet, ahead: int) -> None:
        """Capture the pre-fill graphs a prompt of this length runs under this set (see `warm_up`)."""
        if ahead and self.can_prefill_ahead():
            shared = tuple(range(min(ahead, self.shape.num_blocks)))
            self.prefill_ahead(ids, shared, keep_from=len(shared))  # one graph per bucket: replayed for later sets
            self.use(omit)
            self.prefill_rest()
            return
        self.use(omit)
        for event in self._events:  # a memory-budget swap: the graph runs once the copies are in
            if event is not None:
                torch.cuda.current_stream().wait_event(event)
        self._events = [None] * len(self._events)
        self.prefill(ids)

    # -- generation -------------------------------------------------------------------------------------------

    def encode(self, prompt: str) -> list[int]:
        return self.with_bos(self.text_tokens(prompt))

    def text_tokens(self, text: str) -> list[int]:
        """The tokenizer's ids of `text` alone, no special tokens: what a router on the decoder's tokens reads
        (`Policy.pending`), and the prompt's ids once `with_bos` puts the model's start token in front."""
        if self.tokenizer is None:
            raise PuddingError("this engine has no tokenizer; pass token ids")
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def with_bos(self, tokens: Sequence[int]) -> list[int]:
        if self.bos and self.tokenizer.bos_token_id is not None:
            return [self.tokenizer.bos_token_id, *tokens]
        return list(tokens)

    def tokens_at_least(self, text: str) -> int:
        """A lower bound on the number of tokens of `text`, without tokenizing it: no token spans more bytes than the
        vocabulary's longest string (at most 4 bytes a character), halved again for normalizers that shorten text.
        Lets a server refuse a prompt of megabytes at once instead of spending seconds (and the interpreter lock)
        tokenizing it."""
        if self._longest_token_bytes is None:
            self._longest_token_bytes = 4 * max(map(len, self.tokenizer.get_vocab()))
        return len(text.encode("utf-8", "replace")) // (2 * max(1, self._longest_token_bytes))

    @torch.inference_mode()
    def start(self, ids: Sequence[int], chosen: Choice | Pending) -> tuple[Choice, dict, torch.Tensor]:
        """Make the chosen set the running stack and pre-fill the prompt: returns the choice, what the switch did
        (`use`) and the last position's logits. A pending choice (`Policy.pending`) is asked for only after some
        blocks have started to pre-fill, so routing overlaps them: those every candidate keeps, or, when speculating,
        the leading blocks of the stack expected (`_blocks_ahead`). The chosen stack resumes from the blocks it shares
        with those (from the start if none: a set the policy could not name)."""
        ahead: tuple[int, ...] = ()
        padded = self._padded(len(ids))
        if isinstance(chosen, Pending):
            if self.can_prefill_ahead():
                ahead = self._blocks_ahead(chosen.shared, padded, len(ids))
            if ahead:  # a candidate keeps the shared blocks: its stack resumes after them, or later
                self.prefill_ahead(ids, ahead, keep_from=min(chosen.shared, len(ahead)))
            chosen = chosen.result()
            self._check_set(chosen.omit)
            if chosen.routed:
                self._pace.routed(padded, chosen.ms)
                self._recent.append(tuple(chosen.omit.kept()))
                counts = collections.Counter(self._recent)
                self.expected = max(reversed(self._recent), key=counts.__getitem__)  # ties: the latest
        self.last_ahead, self.last_resumed = len(ahead), 0
        swap = self.use(chosen.omit)
        return chosen, swap, self.prefill_rest() if ahead else self.prefill(ids)

    def _blocks_ahead(self, shared: int, padded: int, length: int) -> tuple[int, ...]:
        """The blocks to pre-fill before a choice: the `shared` every candidate keeps, or, when speculating, the
        expected stack's first blocks, as many as pre-fill in the routing time (at least the shared ones). A wrong
        guess costs the blocks past those the stacks share, run while the router ran. With `defer_captures`, a guess
        whose graph is not captured yet pre-fills only the shared blocks (and its graph is wanted)."""
        floor = tuple(range(min(shared, self.shape.num_blocks)))
        guess = self.expected
        if not self.speculate or guess is None or guess[: len(floor)] != floor:
            return floor
        ahead = guess[: max(len(floor), min(len(guess), self._pace.blocks_within(padded)))]
        if len(ahead) > len(floor) and not self._ready(("ahead", padded, ahead, _first_kept(shared, len(ahead))),
                                                       padded, length):
            return floor
        return ahead

    def _ready(self, key: tuple, padded: int, length: int) -> bool:
        """Whether a speculative graph can run now: always unless captures are deferred; then only if captured
        (else it is wanted, for `capture_wanted`)."""
        if not self.defer_captures or not self._graphed(padded, length) or key in self._graphs:
            return True
        self._wanted[key] = None
        return False

    @torch.inference_mode()
    def capture_wanted(self, limit: int = 1) -> int:
        """Capture up to `limit` of the graphs speculation wanted and went without (`defer_captures`), oldest first;
        returns how many. For a server's idle moments: it runs each graph's steps (writing the KV cache) and may
        change the running stack, which the next request sets again."""
        done = 0
        while self._wanted and done < limit:
            key = next(iter(self._wanted))
            del self._wanted[key]
            if key in self._graphs:
                continue
            if key[0] == "ahead":
                _, step = self._ahead_graph(*key[1:])
            else:  # ("rest", padded, start, "all", kept): the stack from `start` of the set keeping `kept`
                _, padded, start, _, kept = key
                self.use(self.omission(sorted(set(range(self.shape.num_blocks)) - set(kept))))
                _, step = self._rest_graph(padded, start)
            self._captured(key, step)
            done += 1
        return done

    def stream(self, prompt: str | Sequence[int], chosen: Choice | OmissionSet | Pending, max_new_tokens: int = 128,
               stop_ids: Sequence[int] | None = None, logprobs: int | None = None) -> Iterator[tuple[str, Generation]]:
        """Yield (new text, generation so far) as tokens arrive, under the chosen set: a policy's `Choice` (its
        routing time counts in the time to first token), a `Pending` one (routing runs inside, beside the pre-fill of
        the blocks every candidate keeps: `start`), or a plain omission set. With `logprobs` (the number of most likely
        alternatives to keep), each generated token's log-probability is recorded too."""
        pending = isinstance(chosen, Pending)
        if not pending:
            chosen = chosen if isinstance(chosen, Choice) else Choice(chosen)
            self._check_set(chosen.omit)
        sync = torch.cuda.synchronize if self.device.type == "cuda" else (lambda: None)
        started = time.perf_counter()
        ids = self.encode(prompt) if isinstance(prompt, str) else list(prompt)
        if not ids:
            raise PuddingError("the prompt is empty")
        if len(ids) + max_new_tokens > self.max_len:
            raise PuddingError(f"prompt ({len(ids)} tokens) plus {max_new_tokens} new tokens exceed the engine's "
                               f"context of {self.max_len} tokens")
        stops = set(stop_ids if stop_ids is not None else self._stop_ids())
        choice, swap, logits = self.start(ids, chosen)
        token = logits.argmax(-1)
        first = int(token)
        scored = [] if logprobs is None else [_scored(logits, token, logprobs)]
        sync()
        # A choice made before the call adds its time; a pending one was made inside (partly hidden by pre-fill).
        ttft = 1000 * (time.perf_counter() - started) + (0.0 if pending else choice.ms)
        timings = Timings(route_ms=choice.ms, swap_ms=swap["ms"], ttft_ms=ttft, swap=swap,
                          prefill_ms=max(0.0, ttft - choice.ms - swap["ms"]))
        generated = [first]
        detokenizer = TextStream(self.tokenizer)
        decode_started = time.perf_counter()
        result = Generation("", generated, list(choice.omit), choice.index, timings, len(ids), routed=choice.routed,
                            logprobs=scored if logprobs is not None else None)
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
            logits = self.decode_step(token, position)
            token = logits.argmax(-1)
            generated.append(int(token))
            if logprobs is not None:
                scored.append(_scored(logits, token, logprobs))
            position += 1

    def generate(self, prompt: str | Sequence[int], chosen: Choice | OmissionSet | Pending, max_new_tokens: int = 128,
                 stop_ids: Sequence[int] | None = None, on_text: Callable[[str], None] | None = None) -> Generation:
        result = None
        for piece, result in self.stream(prompt, chosen, max_new_tokens, stop_ids):
            if on_text and piece:
                on_text(piece)
        return result

    def _stop_ids(self) -> list[int]:
        if self.tokenizer is None or self.tokenizer.eos_token_id is None:
            return []
        return [self.tokenizer.eos_token_id]

    def resident(self) -> dict[str, list[torch.Tensor]]:
        """The tensors the engine keeps on the device, by part (views of one allocation may appear more than once)."""
        blocks = self.blocks.flats if self.blocks.mode == "all" else self.blocks.slots
        tables = [t for pair in self.rotary.values() for t in pair]
        inputs = [self._token, self._position, self._prompt_input, self._positions, *self._resume.values()]
        lora = (self._lora_slots if self.lora_rank else []) + [t for per_set in self.adapters.values() for t in per_set.values()]
        tied = self.head.data_ptr() == self.embed.data_ptr()  # one tensor
        head = [] if tied else self._head_tensors()
        return {"blocks": list(blocks), "embed_head_norm": [self.embed, *head, self.final_norm],
                "kv_cache": self.k_cache + self.v_cache, "buffers": tables + inputs + lora}

    def memory(self) -> dict:
        """Bytes held on the device: weights, cache, and the engine's own buffers (rotary tables, inputs, LoRA
        slots); not the graphs' pool (activations and outputs) nor cuBLAS's workspaces."""
        sizes = {part: sum(t.numel() * t.element_size() for t in tensors) for part, tensors in self.resident().items()}
        return {**sizes, "block_bytes": self.layout.nbytes}


def _top(logprobs: torch.Tensor, k: int) -> list[dict[int, float]]:
    """Per row, the k most likely token ids and their log-probabilities."""
    if k <= 0:
        return [{} for _ in range(len(logprobs))]
    values, indices = logprobs.topk(k, dim=-1)
    return [dict(zip(i.tolist(), v.tolist())) for i, v in zip(indices, values)]


def _scored(logits: torch.Tensor, token: torch.Tensor, k: int) -> tuple[float, dict[int, float]]:
    logprobs = logits.float().log_softmax(-1).view(1, -1)
    return float(logprobs[0, int(token)]), _top(logprobs, k)[0]


def open_engine(ref, device: str | None = None, dtype: str = "auto", budget: int | None = None,
                max_len: int = 2048, quantize: str | None = None, lora=None, merge_lora: bool = False) -> Engine:
    """An engine for a resolved model (`models.ModelRef`): loaded, its blocks copied into the engine's layout (to
    pinned host memory with a memory budget), the transformers model then let go. `lora`: (bundle directory, sets)
    to run each of those sets with its LoRA adapter from the bundle (`pudding lora`), unmerged; with `merge_lora` and
    a single set, its adapter is merged into the weights instead (no cost per token; only that set may then run)."""
    from .models import check_device, default_device, load_decoder

    context = ref.config.get("max_position_embeddings")
    if context and max_len > context:
        raise PuddingError(f"--max-len {max_len} is longer than {ref.name}'s context of {context} tokens")
    device = check_device(device or default_device())
    loaded = load_decoder(ref, "cpu" if budget is not None else device, dtype, quantize)
    if lora is None:
        return Engine.from_model(loaded.model, loaded.tokenizer, device, budget=budget, max_len=max_len)
    from .lora import AdapterStore

    bundle_dir, sets = lora
    adapters = AdapterStore(bundle_dir, loaded.model).for_sets(sets)
    if merge_lora and len(set(sets)) == 1 and quantize is None:
        from .lora import merge_adapter

        for adapter in adapters.values():
            merge_adapter(loaded.model, adapter)
        return Engine.from_model(loaded.model, loaded.tokenizer, device, budget=budget, max_len=max_len)
    rank = next(iter(adapters.values())).rank if adapters else 1
    engine = Engine.from_model(loaded.model, loaded.tokenizer, device, budget=budget, max_len=max_len, lora_rank=rank)
    engine.set_adapters(adapters)
    return engine
