"""GPU memory accounting: what the allocator holds at an engine's peak, split into weights, cache, buffers, cuBLAS
workspaces, the CUDA graphs' pool and the allocator's own slack, so the memory-budget allowance is measured, not
guessed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..engine import Engine
from ..omission import OmissionSet
from .timing import prompt_ids


def graph_pool_bytes() -> int:
    """Bytes the CUDA-graph private memory pools hold from the device: the captured graphs' outputs and
    intermediates (a replay writes these while the allocator counts them free, since replays do not go through it),
    and the eager work the engine runs in its pool."""
    return sum(s["total"] for s in _segments() if s["in_pool"])


def cublas_workspace_bytes() -> tuple[int, int]:
    """Memory the cuBLAS handles hold as workspaces (allocated through PyTorch's allocator), freed and measured:
    (outside the graphs' pools, inside them). A stream's workspace is allocated where its first product runs: for the
    engine's graphs' stream that may be inside their pool (the eager pre-fill after a swap), and `graph_pool_bytes`
    already counts it there."""
    torch.cuda.synchronize()
    before = _allocated_by_pool(_segments())
    torch._C._cuda_clearCublasWorkspaces()
    after = _allocated_by_pool(_segments())
    return before[False] - after[False], before[True] - after[True]


def _segments() -> list[dict]:
    """The allocator's segments: whether each belongs to a CUDA graph's private pool, its stream and kind, the bytes it
    holds from the device and the bytes allocated in it."""
    return [{"in_pool": tuple(s.get("segment_pool_id", (0, 0))) != (0, 0), "stream": s["stream"],
             "address": s.get("address"), "type": s.get("segment_type", "?"), "total": s["total_size"],
             "used": sum(b["size"] for b in s["blocks"] if b["state"] == "active_allocated")}
            for s in torch.cuda.memory_snapshot()]


def _allocated_by_pool(segments: list[dict]) -> dict[bool, int]:
    """Bytes allocated outside (False) and inside (True) the CUDA-graph private pools."""
    return {in_pool: sum(s["used"] for s in segments if s["in_pool"] == in_pool) for in_pool in (False, True)}


@dataclass(frozen=True)
class AllocatorBaseline:
    """What the device holds before an engine is built (the router, which lives beside the model): the bytes reserved,
    the graphs' pools among them, and the addresses of the segments."""

    reserved: int = 0
    pools: int = 0
    addresses: frozenset = frozenset()


def allocator_baseline() -> AllocatorBaseline:
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    return AllocatorBaseline(torch.cuda.memory_reserved(), graph_pool_bytes(), frozenset(s["address"] for s in _segments()))


def new_small_segment_bytes(segments: list[dict], baseline_addresses: set, engine_tensors: list[torch.Tensor] = ()) -> int:
    """Bytes of the small-tensor segments outside the graphs' pools that appeared since the baseline, less the blocks
    the engine's own tensors take in them (counted in their parts and `allocator_rounding`). PyTorch's allocator
    serves tensors of 1 MiB or less from 2 MiB segments of their stream, so the engine's first small tensor on a
    stream costs a whole segment unless one is already there (a router's small tensors, say): a fixed cost per stream
    the engine allocates on, not growth. The segments' other tenants count here too: the caller's sampled token and
    two small tensors on a side stream (1.5 KB in all on an H100, 2026-12-06)."""
    new = [s for s in segments
           if not s["in_pool"] and s["type"] == "small" and s["address"] not in baseline_addresses]
    engine_blocks = sum(allocator_size(n) for ptr, n in _storages(engine_tensors).items()
                        if any(s["address"] <= ptr < s["address"] + s["total"] for s in new))
    return sum(s["total"] for s in new) - engine_blocks


# PyTorch's CUDA caching allocator hands out blocks in multiples of 512 bytes, and gives a tensor of 10 MiB or more a
# segment of its own rounded up to 2 MiB (smaller ones share 2 MiB or 20 MiB segments: their free space is counted
# per segment, `new_small_segment_bytes`, or stays in the rest).
_BLOCK_ROUND = 512
_OWN_SEGMENT = 10 * 2**20
_SEGMENT_ROUND = 2 * 2**20


def _round_up(n: int, step: int) -> int:
    return -(-n // step) * step


def allocator_size(nbytes: int) -> int:
    """Bytes the caching allocator sets aside for one allocation of nbytes."""
    size = _round_up(max(nbytes, 1), _BLOCK_ROUND)
    return _round_up(size, _SEGMENT_ROUND) if size >= _OWN_SEGMENT else size


def allocator_rounding(tensors: list[torch.Tensor]) -> int:
    """Bytes the allocator rounds the allocations under these tensors up by (views of one allocation count once): a
    fixed cost of the tensors' sizes (the blocks' slots of the 8B shape: 1.7 MB), not growth."""
    return sum(allocator_size(n) - n for n in _storages(tensors).values())


def _storages(tensors) -> dict[int, int]:
    """The allocations under these tensors, by address: their bytes (views of one allocation appear once)."""
    return {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}


def slack_segments(segments: list[dict], top: int = 8) -> list[dict]:
    """The segments outside the graphs' pools that hold the most space nothing is allocated in: where the memory-budget
    peak's "rest" sits (rounding to segment sizes, blocks cached free, one small-block segment per stream)."""
    outside = sorted((s for s in segments if not s["in_pool"]), key=lambda s: s["used"] - s["total"])[:top]
    return [{"stream": s["stream"], "type": s["type"], "total_mb": s["total"] / 1e6, "allocated_mb": s["used"] / 1e6}
            for s in outside]


def peak_memory(engine: Engine, omit: OmissionSet, prompt: int, new_tokens: int,
                baseline: AllocatorBaseline = AllocatorBaseline(), switch_from: OmissionSet | None = None) -> dict:
    """Peak GPU memory the engine holds during a pre-fill + generation: the most the allocator reserved from the
    device (weights, cache, buffers, cuBLAS workspaces, the graphs' pool, rounding), beside what each of those
    parts holds. With `switch_from` the run starts from that set (memory budget: the switch copies blocks in, and
    the pre-fill that waits for them runs eagerly). `baseline`: what the router held before the engine was built."""
    ids = prompt_ids(prompt, engine.shape.vocab)
    if switch_from is not None:
        engine.use(switch_from)
        engine.prefill(ids)
    torch.cuda.synchronize()
    torch.cuda.empty_cache()  # what earlier runs (references, other engines) left cached is not the engine's
    torch.cuda.reset_peak_memory_stats()
    engine.use(omit)
    token = engine.prefill(ids).argmax(-1)
    for i in range(new_tokens):
        token = engine.decode_step(token, prompt + i).argmax(-1)
    torch.cuda.synchronize()
    mem = engine.memory()
    resident = [t for part in engine.resident().values() for t in part]
    segments = _segments()  # after the run: the segments' slack
    return {"outside_pools_unused_gb": sum(s["total"] - s["used"] for s in segments if not s["in_pool"]) / 1e9,
            "slack_segments": slack_segments(segments),
            "small_segments_gb": new_small_segment_bytes(segments, baseline.addresses, resident) / 1e9,
            "allocator_rounding_gb": allocator_rounding(resident) / 1e9,
            "engine_peak_gb": (torch.cuda.max_memory_reserved() - baseline.reserved) / 1e9,
            "reserved_gb": (torch.cuda.memory_reserved() - baseline.reserved) / 1e9,
            "peak_allocated_gb": torch.cuda.max_memory_allocated() / 1e9,  # the allocator's view (router included)
            "router_reserved_gb": baseline.reserved / 1e9, "switched": switch_from is not None,
            "graph_pool_gb": (sum(s["total"] for s in segments if s["in_pool"]) - baseline.pools) / 1e9,
            "engine_blocks_gb": mem["blocks"] / 1e9, "embed_head_norm_gb": mem["embed_head_norm"] / 1e9,
            "kv_cache_gb": mem["kv_cache"] / 1e9, "buffers_gb": mem["buffers"] / 1e9, "block_gb": mem["block_bytes"] / 1e9}
