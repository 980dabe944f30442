"""Depth-pruned execution: run a Hugging Face decoder block by block, skipping an omission set.

Instead of patching the model, pudding drives the model's own modules (embedding, blocks, final norm, head) in a
short loop of its own. That gives three things the stock forward cannot:

* any omission set runs without touching the weights, and the KV cache is indexed by the original block number,
  so block 0 can be skipped and every block keeps its own attention type (Gemma 3's sliding/full mix);
* hidden states can be taken at any block and resumed from there (the greedy search reuses the unchanged prefix);
* attention is described by a per-token layout (group, branch, position), which lets one row hold a shared context
  followed by several continuations that each see the context but not each other (see `scoring.py`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from .architectures import Architecture, architecture_for, resolve
from .omission import OmissionSet


@dataclass
class TokenLayout:
    """Who may attend to whom, per token.

    group:    which independent sequence the token belongs to (several can share a row); -1 marks padding.
    branch:   0 for tokens every branch of the group sees (a shared prefix), i > 0 for the i-th continuation;
              a token sees its own branch and branch 0, never another continuation.
    position: the position id, used for rotary/learned positions, causality and sliding windows.
    """

    group: torch.Tensor  # (batch, tokens) long
    branch: torch.Tensor
    position: torch.Tensor

    @classmethod
    def causal(cls, batch: int, length: int, device, start: int = 0) -> TokenLayout:
        position = torch.arange(start, start + length, device=device).expand(batch, length)
        zeros = torch.zeros(batch, length, dtype=torch.long, device=device)
        return cls(zeros, zeros.clone(), position.clone())

    def cat(self, later: TokenLayout) -> TokenLayout:
        return TokenLayout(
            torch.cat([self.group, later.group], 1),
            torch.cat([self.branch, later.branch], 1),
            torch.cat([self.position, later.position], 1),
        )


def attention_masks(queries: TokenLayout, keys: TokenLayout, windows: dict[str, int | None]) -> dict[str, torch.Tensor]:
    """Boolean masks (batch, 1, queries, keys), True where attention is allowed, one per attention type."""
    q_group, k_group = queries.group[:, :, None], keys.group[:, None, :]
    q_branch, k_branch = queries.branch[:, :, None], keys.branch[:, None, :]
    distance = queries.position[:, :, None] - keys.position[:, None, :]
    allowed = (q_group == k_group) & (k_group >= 0) & ((k_branch == 0) | (k_branch == q_branch)) & (distance >= 0)
    # Padding queries see everything: their output is discarded, and a fully masked row would give NaN.
    padding = (queries.group < 0)[:, :, None]
    masks = {}
    for layer_type, window in windows.items():
        mask = allowed if window is None else allowed & (distance < window)
        masks[layer_type] = (mask | padding)[:, None]
    return masks


class KVCache:
    """Keys and values per block, appended as tokens arrive.

    The model's attention modules call `update(key, value, layer_idx)` with their original block index, so a pruned
    run simply leaves the skipped blocks' entries empty. `layout` describes every cached token for the masks.
    """

    def __init__(self) -> None:
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}
        self.layout: TokenLayout | None = None

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args, **kwargs):
        if layer_idx in self.keys:
            key = torch.cat([self.keys[layer_idx], key], dim=2)
            value = torch.cat([self.values[layer_idx], value], dim=2)
        self.keys[layer_idx], self.values[layer_idx] = key, value
        return key, value

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0 if self.layout is None else self.layout.position.shape[1]


@dataclass
class BlockContext:
    """Everything the blocks need besides the hidden states; built once per batch and reused across blocks."""

    masks: dict[str, torch.Tensor]
    position_embeddings: dict[str, object]
    position_ids: torch.Tensor
    cache: KVCache | None = None


class PrunableDecoder:
    """A causal LM from transformers, run block by block under any omission set."""

    def __init__(self, model) -> None:
        self.model = model
        self.config = model.config
        self.arch: Architecture = architecture_for(self.config.model_type)
        stack = resolve(model, self.arch.stack)
        self.blocks = getattr(stack, self.arch.blocks)
        self.embed_tokens = getattr(stack, self.arch.embed)
        self.final_norm = resolve(stack, self.arch.final_norm)
        self.head = resolve(model, self.arch.head)
        self.position_module = resolve(stack, self.arch.position_embedding)
        self.input_projection = resolve(stack, self.arch.input_projection)
        self.output_projection = resolve(stack, self.arch.output_projection)
        window = getattr(self.config, "sliding_window", None)
        # Families without `layer_types` (Mistral, Phi-3) apply their sliding window, if any, in every block.
        uniform = "sliding_attention" if window else "full_attention"
        layer_types = getattr(self.config, "layer_types", None) or [uniform] * len(self.blocks)
        self.layer_types: list[str] = list(layer_types)[: len(self.blocks)]
        self.windows = {t: (window if t == "sliding_attention" else None) for t in set(self.layer_types)}

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:  # the input embeddings' (the head may hold quantized codes: `int8+head`)
        return self.embed_tokens.weight.dtype

    def omission(self, blocks: Iterable[int] = ()) -> OmissionSet:
        return OmissionSet(blocks, self.num_blocks)

    # -- the pieces of a forward pass ---------------------------------------------------------------------------

    def embed(self, input_ids: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
        hidden = self.embed_tokens(input_ids)
        if self.input_projection is not None:
            hidden = self.input_projection(hidden)
        if self.arch.positions == "learned":
            hidden = hidden + self.position_module(None, 0, position_ids=layout.position)
        return hidden

    def context(self, layout: TokenLayout, like: torch.Tensor, cache: KVCache | None = None) -> BlockContext:
        """Masks and position embeddings for `layout` (the new tokens), attending to cached tokens too."""
        keys = layout if cache is None or cache.layout is None else cache.layout.cat(layout)
        masks = attention_masks(layout, keys, self.windows)
        types = set(self.layer_types)
        if self.arch.positions == "rotary":
            table = self.position_module(like, layout.position)
            embeddings = {t: table for t in types}
        elif self.arch.positions == "rotary_per_layer_type":
            embeddings = {t: self.position_module(like, layout.position, t) for t in types}
        else:
            embeddings = {t: None for t in types}
        return BlockContext(masks, embeddings, layout.position, cache)

    def run_blocks(self, hidden: torch.Tensor, blocks: Iterable[int], ctx: BlockContext) -> torch.Tensor:
        for index in blocks:
            layer_type = self.layer_types[index]
            out = self.blocks[index](
                hidden,
                attention_mask=ctx.masks[layer_type],
                position_embeddings=ctx.position_embeddings[layer_type],
                position_ids=ctx.position_ids,
                past_key_values=ctx.cache,
            )
            hidden = out[0] if isinstance(out, tuple) else out
        return hidden

    def run_blocks_per_row(self, hidden: torch.Tensor, keep: torch.Tensor, ctx: BlockContext) -> torch.Tensor:
        """Every row under its own omission set (`keep`: rows x blocks, bool).

        A block runs once on all rows and the rows that skip it keep their input. The skipping rows waste that
        block's compute, but many independent searches (one per prompt) then share every forward pass.
        """
        for index in range(self.num_blocks):
            column = keep[:, index]
            if not bool(column.any()):
                continue
            out = self.run_blocks(hidden, [index], ctx)
            hidden = torch.where(column[:, None, None], out, hidden)
        return hidden

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final norm and head; call it only on the positions whose predictions are needed."""
        if self.final_norm is not None:
            hidden = self.final_norm(hidden)
        if self.output_projection is not None:
            hidden = self.output_projection(hidden)
        return self.head(hidden).float()

    # -- whole passes ---------------------------------------------------------------------------------------------

    @torch.inference_mode()
    def hidden_states(
        self,
        input_ids: torch.Tensor,
        omit: OmissionSet,
        layout: TokenLayout | None = None,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        """Last hidden states (before the final norm) of the pruned model."""
        if layout is None:
            start = 0 if cache is None else cache.get_seq_length()
            layout = TokenLayout.causal(input_ids.shape[0], input_ids.shape[1], input_ids.device, start)
        hidden = self.embed(input_ids, layout)
        ctx = self.context(layout, hidden, cache)
        hidden = self.run_blocks(hidden, omit.kept(), ctx)
        if cache is not None:
            cache.layout = layout if cache.layout is None else cache.layout.cat(layout)
        return hidden

    @torch.inference_mode()
    def full_logits(self, input_ids: torch.Tensor, omit: OmissionSet) -> torch.Tensor:
        return self.logits(self.hidden_states(input_ids, omit))

    @torch.inference_mode()
    def generate_greedy(
        self,
        prompt_ids: Sequence[int],
        omit: OmissionSet,
        max_new_tokens: int = 32,
        stop_ids: Iterable[int] = (),
        use_cache: bool = True,
    ) -> list[int]:
        """Greedy decoding of one prompt under an omission set (the reference path; `engine.py` has the fast one)."""
        stop = set(stop_ids)
        tokens = list(prompt_ids)
        cache = KVCache() if use_cache else None
        fresh = tokens
        generated: list[int] = []
        for _ in range(max_new_tokens):
            ids = torch.tensor([fresh if use_cache else tokens], device=self.device)
            hidden = self.hidden_states(ids, omit, cache=cache)
            next_id = int(self.logits(hidden[:, -1]).argmax(-1))
            generated.append(next_id)
            tokens.append(next_id)
            fresh = [next_id]
            if next_id in stop:
                break
        return generated
