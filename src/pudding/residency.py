"""Where the blocks of the running stack live on the device.

* `ResidentBlocks`: every block on the device; switching omission sets only selects another stack, so it costs
  nothing but saves compute and memory traffic per token.
* `SlotPool`, a memory budget of N block slots (the paper's on-device setting): blocks live in pinned host memory;
  the j-th block of the current stack sits in slot j, so one decode graph serves every set of the same size. A new
  prompt moves blocks between slots when it can and copies from the host only the blocks it lacks, on a side
  stream, slot by slot, so pre-fill of the first blocks overlaps the copies of the later ones.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch

from .block import BlockLayout
from .errors import PuddingError


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
        # +1 spare; one allocation for all slots, so that the allocator rounds up once rather than once a slot
        stride = -(-layout.nbytes // 512) * 512  # each slot starts aligned for any kernel
        rows = torch.empty(slots + 1, stride, dtype=torch.uint8, device=device)
        self.slots = [row[: layout.nbytes] for row in rows.unbind(0)]
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
        with torch.cuda.stream(self.stream) if self.stream is not None else contextlib.nullcontext():
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
