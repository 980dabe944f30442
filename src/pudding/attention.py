"""Decode attention in one kernel (Triton): one new token's query heads against a block's KV cache, at batch 1.

Written in PyTorch ops, a decode step's attention is a score product, a masked softmax and a value product: three or
four kernels a block once compiled (inductor splits the softmax differently from build to build), each reading at
most a few MB, so each costs its launch and latency rather than its bytes (~7 µs a block together on an H100 for
the 8B shape). Here it is one kernel, split over the keys as flash-decoding does: a program per (KV head, slice of
the keys) holds that KV head's query heads together (the slice of the cache is read once for all of them), runs an
online softmax over its slice and writes its partial result; the last program of a KV head to finish, known by an
atomic ticket, combines the slices' partials and writes the output. One kernel needs no second launch for the
combination, which is what the two-kernel form of flash-decoding spends. It is no faster than the kernels it
replaces (6.3-6.7 µs a block): what it saves is their launches, 64 a dense step of the 8B shape, worth +0.9 to +2.7%
decode speed on an H100 (results/decode-attention-ab-h100.md).

The mask is read as data (True where a key may be attended): the engine's decode mask, causal up to the step's
position within the context bucket, and a sliding window where the block has one.
"""

from __future__ import annotations

import torch

from .kernels import available, triton

if triton is not None:
    import triton.language as tl

BLOCK_N = 64  # keys per iteration of a program
MAX_SPLITS = 16  # slices of the keys per KV head: 8 KV heads x 16 = 128 programs fill an H100's 132 SMs
COMBINED = 16384  # floats: 64 registers a thread of 8 warps
NUM_WARPS = 8  # with 4, a 128-wide head's program needs 191-255 registers a thread and spills at 256 keys a slice


def supported(q: torch.Tensor, heads: int, kv_heads: int, head_dim: int) -> bool:
    """Whether the kernel serves this attention: Triton on q's device, a power-of-two head size (a tile's width) and
    at most 64 query heads per KV head."""
    return (available(q) and head_dim & (head_dim - 1) == 0 and 16 <= head_dim <= 256 and heads // kv_heads <= 64
            and q.dtype in (torch.bfloat16, torch.float16, torch.float32))


if triton is not None:

    @triton.jit
    def _dot(a, b, FP32: tl.constexpr):
        if FP32:  # fp32 inputs, or the interpreter (whose dot does not take bf16): exact fp32 products
            return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
        return tl.dot(a, b)

    @triton.jit
    def _decode_attention_kernel(q_ptr, k_ptr, v_ptr, mask_ptr, out_ptr, partial_ptr, max_ptr, sum_ptr, tickets_ptr,
                                 scale, keys, cache_stride, GROUPS: tl.constexpr, GROUPS_P2: tl.constexpr,
                                 GROUPS_PAD: tl.constexpr, D: tl.constexpr, SPLIT: tl.constexpr,
                                 SPLITS: tl.constexpr, BLOCK_N: tl.constexpr, FP32: tl.constexpr):
        head = tl.program_id(0)  # the KV head
        split = tl.program_id(1)
        g = tl.arange(0, GROUPS_PAD)  # its query heads, padded to a tensor-core tile (rows past GROUPS are zeros)
        d = tl.arange(0, D)
        real = g < GROUPS
        rows = head * GROUPS + g
        q = tl.load(q_ptr + rows[:, None] * D + d[None, :], mask=real[:, None], other=0.0)
        running_max = tl.full((GROUPS_PAD,), float("-inf"), tl.float32)
        running_sum = tl.zeros((GROUPS_PAD,), tl.float32)
        acc = tl.zeros((GROUPS_PAD, D), tl.float32)
        k_head = k_ptr + head * cache_stride
        v_head = v_ptr + head * cache_stride
        for offset in range(0, SPLIT, BLOCK_N):
            n = split * SPLIT + offset + tl.arange(0, BLOCK_N)
            inside = n < keys
            valid = tl.load(mask_ptr + n, mask=inside, other=0) != 0
            # K is read without waiting for the mask (one memory latency less; the scores of masked keys are dropped
            # below, whatever they hold); V only where the mask allows, as a masked key's weight 0 times a stale
            # value must not make a NaN
            k = tl.load(k_head + n[:, None] * D + d[None, :], mask=inside[:, None], other=0.0)
            scores = _dot(q, tl.trans(k), FP32) * scale
            scores = tl.where(valid[None, :], scores, float("-inf"))
            new_max = tl.maximum(running_max, tl.max(scores, 1))
            shift = tl.where(new_max == float("-inf"), 0.0, new_max)  # no key yet: keep exp() away from inf - inf
            weights = tl.exp(scores - shift[:, None])
            rescale = tl.exp(running_max - shift)
            v = tl.load(v_head + n[:, None] * D + d[None, :], mask=valid[:, None], other=0.0)
            acc = acc * rescale[:, None] + _dot(weights.to(v.dtype), v, FP32)
            running_sum = running_sum * rescale + tl.sum(weights, 1)
            running_max = new_max

        if SPLITS == 1:  # one slice: nothing to combine
            single = acc / running_sum[:, None]
            tl.store(out_ptr + rows[:, None] * D + d[None, :], single.to(out_ptr.dtype.element_ty), mask=real[:, None])
        else:
            _combine(out_ptr, partial_ptr, max_ptr, sum_ptr, tickets_ptr, head, split, acc, running_max, running_sum,
                     GROUPS, GROUPS_P2, GROUPS_PAD, D, SPLITS)

    @triton.jit
    def _combine(out_ptr, partial_ptr, max_ptr, sum_ptr, tickets_ptr, head, split, acc, running_max, running_sum,
                 GROUPS: tl.constexpr, GROUPS_P2: tl.constexpr, GROUPS_PAD: tl.constexpr, D: tl.constexpr,
                 SPLITS: tl.constexpr):
        """Store this slice's partial result; the KV head's last slice to finish combines them all."""
        g = tl.arange(0, GROUPS_PAD)
        d = tl.arange(0, D)
        slot = (head * SPLITS + split) * GROUPS_PAD + g
        tl.store(partial_ptr + slot[:, None] * D + d[None, :], acc, mask=(g < GROUPS)[:, None])
        tl.store(max_ptr + slot, running_max)
        tl.store(sum_ptr + slot, running_sum)
        # acq_rel: this program's stores are visible to whichever program draws the last ticket
        ticket = tl.atomic_add(tickets_ptr + head, 1, sem="acq_rel", scope="gpu")
        if ticket == SPLITS - 1:  # every slice of this KV head is done: combine them, all loaded at once
            h = tl.arange(0, GROUPS_P2)  # the real query heads only, padded to a power of two
            live = (h < GROUPS)[None, :]
            slots = (head * SPLITS + tl.arange(0, SPLITS))[:, None] * GROUPS_PAD + h[None, :]  # (SPLITS, GROUPS_P2)
            maxes = tl.load(max_ptr + slots, mask=live, other=float("-inf"), cache_modifier=".cg")
            top = tl.max(maxes, 0)
            weight = tl.exp(maxes - tl.where(top == float("-inf"), 0.0, top)[None, :])  # a slice with no key: 0
            total = tl.sum(weight * tl.load(sum_ptr + slots, mask=live, other=0.0, cache_modifier=".cg"), 0)
            parts = tl.load(partial_ptr + slots[:, :, None] * D + d[None, None, :], mask=live[:, :, None], other=0.0,
                            cache_modifier=".cg")  # (SPLITS, GROUPS_P2, D)
            out = tl.sum(parts * weight[:, :, None], 0) / total[:, None]
            tl.store(out_ptr + (head * GROUPS + h)[:, None] * D + d[None, :], out.to(out_ptr.dtype.element_ty),
                     mask=(h < GROUPS)[:, None])
            tl.atomic_xchg(tickets_ptr + head, 0)  # ready for the next launch


_tickets: dict[torch.device, torch.Tensor] = {}


def _tickets_on(device: torch.device, kv_heads: int) -> torch.Tensor:
    """The per-KV-head counters of finished slices, one buffer per device, zero between launches (the combining
    program resets its own). Made on the first call, which the engine runs before it captures a graph. Launches on one
    device must not overlap: the engine decodes on one stream."""
    tickets = _tickets.get(device)
    if tickets is None or tickets.numel() < kv_heads:
        tickets = _tickets[device] = torch.zeros(max(kv_heads, 256), dtype=torch.int32, device=device)
    return tickets


def launch_settings(heads: int, kv_heads: int, dim: int, keys: int) -> dict[str, int]:
    """The kernel's compile-time constants for an attention geometry: query heads a KV head (real, to a power of two,
    to a tensor-core tile), the head size, and how the keys are sliced."""
    groups = heads // kv_heads
    groups_p2 = triton.next_power_of_2(groups)
    # the combining program holds every slice's partial result at once: at most COMBINED floats
    splits = min(MAX_SPLITS, triton.next_power_of_2(triton.cdiv(keys, BLOCK_N)), max(1, COMBINED // (groups_p2 * dim)))
    split = triton.cdiv(triton.cdiv(keys, splits), BLOCK_N) * BLOCK_N
    return {"GROUPS": groups, "GROUPS_P2": groups_p2, "GROUPS_PAD": max(16, groups_p2), "D": dim, "SPLIT": split,
            "SPLITS": splits, "BLOCK_N": BLOCK_N}


@torch.library.custom_op("pudding::decode_attention", mutates_args=())
def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, mask: torch.Tensor,
                     scale: float) -> torch.Tensor:
    """softmax(q k^T * scale, masked) v for one token. q: (heads, head_dim); k_cache, v_cache: (kv_heads, max_len,
    head_dim), of which the first `mask.numel()` positions are read; mask: (keys,) bool, True where attention is
    allowed (at least one key). Query heads are grouped by KV head in order (GQA). Returns (heads, head_dim)."""
    heads, dim = q.shape
    kv_heads, _, _ = k_cache.shape
    if k_cache.stride()[1:] != (dim, 1) or v_cache.stride() != k_cache.stride():
        raise ValueError("decode_attention reads K and V caches laid out (kv_heads, positions, head_dim), alike")
    keys = mask.numel()
    settings = launch_settings(heads, kv_heads, dim, keys)
    splits, groups_pad = settings["SPLITS"], settings["GROUPS_PAD"]
    partial = torch.empty(kv_heads * splits * groups_pad * dim, dtype=torch.float32, device=q.device)
    stats = torch.empty(2, kv_heads * splits * groups_pad, dtype=torch.float32, device=q.device)
    out = torch.empty_like(q)
    _decode_attention_kernel[(kv_heads, splits)](
        q.contiguous(), k_cache, v_cache, mask.contiguous().view(torch.uint8), out, partial, stats[0], stats[1],
        _tickets_on(q.device, kv_heads), scale, keys, k_cache.stride(0), **settings,
        FP32=q.dtype == torch.float32 or not q.is_cuda, num_warps=NUM_WARPS)
    return out


@decode_attention.register_fake
def _(q, k_cache, v_cache, mask, scale):
    return torch.empty_like(q)
