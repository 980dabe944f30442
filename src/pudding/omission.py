"""Omission sets: which transformer blocks to skip. Block indices are 0-based everywhere."""

from __future__ import annotations

import re
from collections.abc import Iterable

from .errors import PuddingError


class OmissionSet(tuple):
    """A sorted tuple of distinct 0-based block indices, validated against the model's depth."""

    def __new__(cls, blocks: Iterable[int], num_blocks: int) -> OmissionSet:
        blocks = list(blocks)
        for block in blocks:
            if isinstance(block, bool) or not isinstance(block, int):
                raise PuddingError(f"block index {block!r} is not an integer")
            if not 0 <= block < num_blocks:
                raise PuddingError(
                    f"block index {block} is out of range: this model has {num_blocks} blocks, numbered 0 to {num_blocks - 1}"
                )
        repeated = sorted({b for b in blocks if blocks.count(b) > 1})
        if repeated:
            raise PuddingError(f"block index {repeated[0]} is given more than once")
        if len(blocks) >= num_blocks:
            raise PuddingError(f"the omission set removes all {num_blocks} blocks; at least one must remain")
        self = super().__new__(cls, sorted(blocks))
        self.num_blocks = num_blocks
        return self

    @classmethod
    def parse(cls, text: str | None, num_blocks: int) -> OmissionSet:
        """Parse '11,17,20' (empty or None means dense)."""
        if text is None or not text.strip():
            return cls((), num_blocks)
        blocks = []
        for piece in text.split(","):
            piece = piece.strip()
            if not re.fullmatch(r"-?[0-9]+", piece):  # ASCII digits only: int() would also take '１２' or '1_2'
                raise PuddingError(f"block list '{text}' is not a comma-separated list of integers (0-based block numbers)")
            blocks.append(int(piece))
        return cls(blocks, num_blocks)

    @classmethod
    def dense(cls, num_blocks: int) -> OmissionSet:
        return cls((), num_blocks)

    def kept(self) -> list[int]:
        omitted = set(self)
        return [b for b in range(self.num_blocks) if b not in omitted]

    def with_block(self, block: int) -> OmissionSet:
        return OmissionSet((*self, block), self.num_blocks)

    def label(self) -> str:
        return ",".join(map(str, self)) if self else "dense"

    def __reduce__(self):  # keep num_blocks when pickled (multiprocessing, Ray)
        return (OmissionSet, (tuple(self), self.num_blocks))
