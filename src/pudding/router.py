"""The router (PuDDing §5.2): a pretrained text encoder with one linear layer on top that predicts, from the prompt
alone, the loss of every candidate omission set; a prompt goes to the set with the lowest prediction. This module
holds the network and the trained router as it is used (`LoadedRouter`); `router_training.py` trains it.

Objectives (paper Table 12):
* `mse`        - regress the label vector of tl values (default, the paper's choice);
* `ce-soft`    - cross-entropy against softmax(-tl), i.e. the sets' likelihoods as soft targets;
* `ce-onehot`  - cross-entropy against the single best set.
For the cross-entropy routers the predicted loss of a set is its negative log-probability, so every router answers
the same question ("lower is better") and is used the same way.

Encoders: a pretrained sentence encoder (`minilm-l6`, the paper's size; `mpnet-base`), fine-tuned with its head; or
`embeddings`, the decoder's own input embeddings, mean-pooled, with a ridge-regression head (`TokenTableRouter`):
no encoder runs at all, so choosing a set costs a tokenizer pass and a table lookup instead of an encoder's forward.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .errors import PuddingError
from .omission import OmissionSet

OBJECTIVES = ("mse", "ce-soft", "ce-onehot")
DECODER_EMBEDDINGS = "embeddings"  # RouterSettings.encoder: the decoder's own input embeddings (`TokenTableRouter`)


@dataclass
class RouterSettings:
    encoder: str = "minilm-l6"
    objective: str = "mse"
    lr: float = 1e-5  # the paper's AdamW settings
    weight_decay: float = 0.01
    batch_size: int = 32
    epochs: int = 10
    warmup_steps: int = 500
    max_length: int = 256  # prompt tokens the encoder reads; longer prompts are truncated (and say so)
    val_fraction: float = 0.1  # held out for the convergence curve
    seed: int = 0

    def validate(self) -> None:
        if self.encoder == DECODER_EMBEDDINGS and self.objective != "mse":
            raise PuddingError(f"a router on the decoder's embeddings regresses the labels (mse), not {self.objective}")
        if self.objective not in OBJECTIVES:
            raise PuddingError(f"unknown router objective '{self.objective}' (use {', '.join(OBJECTIVES)})")
        if self.epochs < 1 or self.batch_size < 1 or not 0 < self.lr < math.inf or self.max_length < 8:
            raise PuddingError("router settings must be positive (epochs, batch size, learning rate, max length >= 8)")
        if not 0 <= self.weight_decay < math.inf:
            raise PuddingError("--weight-decay must be a finite number >= 0")
        if not 0 <= self.val_fraction < 1:
            raise PuddingError("--val-fraction must be in [0, 1)")


def mean_pooled(hidden: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """(batch, tokens, dims) -> (batch, dims): the mean over each row's real tokens (all of them without a mask)."""
    if attention_mask is None:
        return hidden.mean(1)
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)


class Router(nn.Module):
    def __init__(self, encoder: nn.Module, num_sets: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(encoder.config.hidden_size, num_sets)

    def pooled(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The prompt's embedding: the encoder's mean-pooled last hidden state, as these encoders were trained;
        without a mask every position is a real token (one unpadded prompt). Pooled and headed in fp32 whatever the
        encoder runs in."""
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state.float()
        return mean_pooled(hidden, attention_mask)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Predicted per-set scores."""
        return self.head(self.pooled(input_ids, attention_mask))


def predicted_losses(output: torch.Tensor, objective: str) -> torch.Tensor:
    """What each set is predicted to cost (lower is better), whatever the objective."""
    return output if objective == "mse" else -torch.log_softmax(output.float(), dim=-1)


def objective_loss(output: torch.Tensor, labels: torch.Tensor, objective: str) -> torch.Tensor:
    if objective == "mse":
        return nn.functional.mse_loss(output.float(), labels)
    if objective == "ce-soft":
        return nn.functional.cross_entropy(output.float(), torch.softmax(-labels, dim=-1))
    return nn.functional.cross_entropy(output.float(), labels.argmin(dim=-1))


# ------------------------------------------------------------------------------------------------------------------
# Routing


def batches(encoded: dict, rows: np.ndarray, size: int, device) -> list[tuple]:
    out = []
    for start in range(0, len(rows), size):
        chunk = rows[start : start + size]
        width = max(len(encoded["input_ids"][i]) for i in chunk)
        ids = torch.zeros(len(chunk), width, dtype=torch.long)
        mask = torch.zeros(len(chunk), width, dtype=torch.long)
        for r, i in enumerate(chunk):
            seq = encoded["input_ids"][i]
            ids[r, : len(seq)] = torch.tensor(seq)
            mask[r, : len(seq)] = 1
        out.append((ids.to(device), mask.to(device), chunk))
    return out


@dataclass
class RouteResult:
    choices: list[int]  # index of the chosen set per prompt
    predicted: np.ndarray  # prompts x sets: predicted loss (lower is better)
    truncated: list[bool]  # prompt longer than the encoder reads
    seconds: float


def load_router(directory: Path, device: str = "cpu", num_blocks: int | None = None, dtype: str = "auto"):
    """The trained router saved in `directory`, of whichever kind its router.json names."""
    from .storage import read_json

    config_path = Path(directory) / "router.json"
    config = read_json(config_path, "router config") if config_path.exists() else {}
    if config.get("settings", {}).get("encoder") == DECODER_EMBEDDINGS:
        return TokenTableRouter.load(directory, config, num_blocks)
    return LoadedRouter(directory, device, num_blocks, dtype)


def untrained_router(encoder: str, sets: list[OmissionSet], device: str = "cpu", dtype: str = "auto",
                     decoder_tokenizer=None):
    """A router with random weights, which routes as fast as a trained one (for speed measurements); a router on the
    decoder's embeddings reads with `decoder_tokenizer`."""
    if encoder == DECODER_EMBEDDINGS:
        return TokenTableRouter.untrained(sets, decoder_tokenizer)
    return LoadedRouter.untrained(encoder, sets, device, dtype)


def router_summary(config: dict) -> str:
    """What a trained router is, in a few words, from its router.json (for reports and packs)."""
    settings = config["settings"]
    if settings["encoder"] == DECODER_EMBEDDINGS:
        strength = config.get("training", {}).get("ridge_strength")
        return "the decoder's input embeddings, mean-pooled, + ridge head" + (f" (strength {strength:g})" if strength else "")
    return f"{settings['encoder']} + linear head, {settings['objective']} objective, {settings['epochs']} epochs"


def check_encoder(name: str) -> None:
    """Refuse a router encoder that is neither the decoder's embeddings nor an installed encoder model."""
    if name != DECODER_EMBEDDINGS:
        from .models import resolve_model

        resolve_model(name, kind="encoder")


class LoadedRouter:
    """A trained router ready to route prompts (on the CPU or next to the model on its GPU)."""

    embeds = True  # has prompt embeddings (`embed`) for a nearest-neighbour policy

    def __init__(self, directory: Path, device: str = "cpu", num_blocks: int | None = None, dtype: str = "auto") -> None:
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        from transformers import AutoModel, AutoTokenizer

        from .storage import read_json

        directory = Path(directory)
        config_path = directory / "router.json"
        if not config_path.exists():
            raise PuddingError(f"no router in {directory.parent}: train one with `pudding train-router --bundle {directory.parent}`")
        config = read_json(config_path, "router config")
        try:
            tokenizer = AutoTokenizer.from_pretrained(directory / "encoder")
            encoder = AutoModel.from_pretrained(directory / "encoder", dtype=torch.float32)
            head = load_file(str(directory / "head.safetensors"))
            router = Router(encoder, len(config["sets"]))
            router.head.load_state_dict(head)
            settings = RouterSettings(**config["settings"])
            num_blocks = num_blocks or int(config["model"]["num_blocks"])
            sets = [OmissionSet(s, num_blocks) for s in config["sets"]]
        except (OSError, ValueError, SafetensorError, RuntimeError, KeyError, TypeError, PuddingError) as err:
            raise PuddingError(f"router in {directory} is damaged ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}): retrain it") from None
        self._setup(router, tokenizer, settings, sets, device, dtype)
        self.config = config

    @classmethod
    def untrained(cls, encoder: str, sets: list[OmissionSet], device: str = "cpu", dtype: str = "auto") -> LoadedRouter:
        """An encoder with a fresh head: routes like a trained router takes time to (for speed measurements)."""
        from transformers import AutoModel, AutoTokenizer

        from .models import resolve_model

        ref = resolve_model(encoder, kind="encoder")
        torch.manual_seed(0)
        router = Router(AutoModel.from_pretrained(ref.directory, dtype=torch.float32), len(sets))
        self = cls.__new__(cls)
        self._setup(router, AutoTokenizer.from_pretrained(ref.directory), RouterSettings(encoder=encoder), sets, device, dtype)
        self.config = {"settings": asdict(self.settings), "sets": [list(s) for s in sets]}
        return self

    def _setup(self, router: Router, tokenizer, settings: RouterSettings, sets: list[OmissionSet], device, dtype: str) -> None:
        self.dtype = encoder_dtype(dtype, device)
        self.router = router.to(device).eval()
        self.router.encoder.to(self.dtype)
        self.tokenizer = tokenizer
        self.settings = settings
        self.sets = sets
        self.device = device
        self._graphs = _GraphedRouter(self.router, settings.objective) if str(device).startswith("cuda") else None

    def _tokenize(self, prompts: list[str]) -> tuple[list[list[int]], list[bool]]:
        return read_tokens(self.tokenizer, prompts, self.settings.max_length, special_tokens=True)

    def warm_up(self, lengths=None) -> None:
        """Capture the batch-1 graphs ahead for prompts of these token lengths (default: every length it reads), so
        no request pays for it."""
        if self._graphs is not None:
            for length in lengths or range(1, self.settings.max_length + 1):
                if length <= self.settings.max_length:
                    self._graphs.scores([self.tokenizer.cls_token_id or 0] * length)

    @torch.inference_mode()
    def route(self, prompts: list[str], batch_size: int = 64) -> RouteResult:
        if any(not p.strip() for p in prompts):
            raise PuddingError("cannot route an empty prompt")
        if len(prompts) == 1 and self._graphs is not None:
            # One prompt on a GPU: a graph replay on the router's own stream, which waits for nothing else the device
            # runs (the engine pre-fills the blocks every set keeps meanwhile, `policy.Pending`).
            started = time.perf_counter()
            ids, truncated = self._tokenize(prompts)
            scores = self._graphs.scores(ids[0])
            if scores is not None:
                return RouteResult([int(scores.argmin())], scores[None], truncated, time.perf_counter() - started)
        sync = torch.cuda.synchronize if str(self.device).startswith("cuda") else (lambda: None)
        sync()
        started = time.perf_counter()
        ids, truncated = self._tokenize(prompts)
        predicted = []
        for batch, mask, _ in batches({"input_ids": ids}, np.arange(len(prompts)), batch_size, self.device):
            predicted.append(predicted_losses(self.router(batch, mask), self.settings.objective).float().cpu().numpy())
        scores = np.concatenate(predicted)
        sync()
        return RouteResult(scores.argmin(1).tolist(), scores, truncated, time.perf_counter() - started)


    @torch.inference_mode()
    def embed(self, prompts: list[str], batch_size: int = 64) -> tuple[np.ndarray, list[bool]]:
        """Unit-length prompt embeddings from the router's (fine-tuned) encoder, and which prompts were truncated."""
        if any(not p.strip() for p in prompts):
            raise PuddingError("cannot route an empty prompt")
        ids, truncated = self._tokenize(prompts)
        out = []
        for batch, mask, _ in batches({"input_ids": ids}, np.arange(len(prompts)), batch_size, self.device):
            out.append(torch.nn.functional.normalize(self.router.pooled(batch, mask).float(), dim=-1).cpu().numpy())
        return np.concatenate(out), truncated


class TokenTableRouter:
    """A router on the decoder's own input embeddings: a linear head on their mean over the prompt's tokens. The mean
    of a linear map is the linear map of the mean, so the head is folded into one row of predicted losses per token
    of the vocabulary (`table`, vocab x sets; trained by `router_training.train_embeddings_router`), and routing is
    tokenize, gather, average: no encoder runs and the device is not touched (the lookup takes ~20 us on a CPU core
    for 256 tokens; tokenizing is most of the cost, `benchmarks/router_cost.py`)."""

    embeds = False  # no prompt embeddings of its own for a nearest-neighbour policy
    dtype = torch.float32

    def __init__(self, table: np.ndarray, bias: np.ndarray, tokenizer, settings: RouterSettings,
                 sets: list[OmissionSet], config: dict | None = None) -> None:
        if table.ndim != 2 or table.shape[1] != len(sets) or bias.shape != (len(sets),):
            raise PuddingError(f"router table of shape {tuple(table.shape)} does not score {len(sets)} sets")
        if len(tokenizer) > len(table):
            raise PuddingError(f"router table has {len(table)} rows for a tokenizer of {len(tokenizer)} tokens")
        self.table = np.ascontiguousarray(table, dtype=np.float32)
        self.bias = np.asarray(bias, dtype=np.float32)
        self.tokenizer = tokenizer
        self.settings = settings
        self.sets = sets
        self.device = "cpu"
        self.config = config or {"settings": asdict(settings), "sets": [list(s) for s in sets]}

    TABLE, TOKENIZER = "table.safetensors", "tokenizer"

    @classmethod
    def load(cls, directory: Path, config: dict, num_blocks: int | None = None) -> TokenTableRouter:
        """The router saved in `directory`, whose router.json is `config`."""
        from safetensors import SafetensorError
        from safetensors.numpy import load_file
        from transformers import AutoTokenizer

        directory = Path(directory)
        try:
            tensors = load_file(str(directory / cls.TABLE))
            tokenizer = AutoTokenizer.from_pretrained(directory / cls.TOKENIZER)
            num_blocks = num_blocks or int(config["model"]["num_blocks"])
            sets = [OmissionSet(s, num_blocks) for s in config["sets"]]
            return cls(tensors["table"], tensors["bias"], tokenizer, RouterSettings(**config["settings"]), sets, config)
        except (OSError, ValueError, SafetensorError, KeyError, TypeError, PuddingError) as err:
            raise PuddingError(f"router in {directory} is damaged ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}): retrain it") from None

    def save(self, directory: Path) -> None:
        """table.safetensors and the tokenizer, into a directory being written (the caller adds router.json)."""
        from safetensors.numpy import save_file

        save_file({"table": self.table, "bias": self.bias}, str(Path(directory) / self.TABLE))
        self.tokenizer.save_pretrained(Path(directory) / self.TOKENIZER)

    @classmethod
    def untrained(cls, sets: list[OmissionSet], tokenizer) -> TokenTableRouter:
        """Random predictions per token: routes as fast as a trained table (for speed measurements)."""
        if tokenizer is None:
            raise PuddingError("a router on the decoder's embeddings needs the decoder's tokenizer")
        table = np.random.default_rng(0).standard_normal((len(tokenizer), len(sets)), dtype=np.float32)
        return cls(table, np.zeros(len(sets), np.float32), tokenizer, RouterSettings(encoder=DECODER_EMBEDDINGS), sets)

    def warm_up(self, lengths=()) -> None:
        """No graphs, no device: one lookup, so that the first prompt does not pay numpy's first call (~0.2 ms)."""
        self.route_tokens([[0]])

    def route(self, prompts: list[str], batch_size: int = 64) -> RouteResult:
        if any(not p.strip() for p in prompts):
            raise PuddingError("cannot route an empty prompt")
        started = time.perf_counter()
        ids, truncated = read_tokens(self.tokenizer, prompts, self.settings.max_length, special_tokens=False)
        return self._scored(ids, truncated, started)

    def route_tokens(self, token_lists: list[list[int]]) -> RouteResult:
        """Route prompts given as the decoder tokenizer's ids of their text (no special tokens): the ids the engine
        pre-fills, so a caller that has them spares the tokenizer's second pass (`Policy.pending`)."""
        started = time.perf_counter()
        limit = self.settings.max_length
        read = [ids[:limit] for ids in token_lists]  # checked as far as they are read: a long prompt costs no more
        if any(len(ids) == 0 for ids in read):
            raise PuddingError("cannot route an empty prompt")
        if any(max(ids) >= len(self.table) or min(ids) < 0 for ids in read):
            raise PuddingError(f"a token id is outside the router's vocabulary of {len(self.table)} tokens")
        return self._scored(read, [len(ids) > limit for ids in token_lists], started)

    def _scored(self, token_lists: list[list[int]], truncated: list[bool], started: float) -> RouteResult:
        scores = np.stack([self.table[ids].mean(0) for ids in token_lists]) + self.bias
        return RouteResult(scores.argmin(1).tolist(), scores, truncated, time.perf_counter() - started)

    def embed(self, prompts: list[str], batch_size: int = 64):
        raise PuddingError("a router on the decoder's embeddings has no prompt embeddings for a nearest-neighbour policy")


def encoder_dtype(name: str, device) -> torch.dtype:
    """What the router's encoder computes in, named as the model's --dtype (`models.parse_dtype`): `auto` is bf16 on
    a GPU, where its fp32 products run on the plain FMA units (0.57 of its 0.80 ms at batch 1 on an H200) and it
    shares the device with the pre-fill it should hide behind, and fp32 on a CPU, whose bf16 products are slower.
    The pooling and the head stay fp32; bf16 choices are checked against fp32 by `benchmarks/router_precision.py`."""
    from .models import parse_dtype

    try:
        return parse_dtype(name, str(device))
    except PuddingError:
        raise PuddingError(f"unknown router dtype '{name}' (use auto, float32, bfloat16 or float16)") from None


READ_CHARS_PER_TOKEN = 6  # English runs ~4.5 characters per WordPiece token: a third more is read before tokenizing


def read_tokens(tokenizer, prompts: list[str], limit: int, special_tokens: bool) -> tuple[list[list[int]], list[bool]]:
    """The token ids a router reads of each prompt (at most `limit`), and which prompts were longer. With
    `special_tokens` (an encoder's [CLS] ... [SEP]) an over-long prompt keeps its first limit - 1 tokens and its
    closing special token, exactly what the tokenizer's own truncation gives; without, its first `limit` tokens.

    Tokenizing costs time in proportion to the text (4.5 ms for 2048 words on one CPU core), and the tokenizer's
    own truncation tokenizes all of it first; so a long prompt is tokenized only up to a whitespace near
    READ_CHARS_PER_TOKEN characters per token the router reads. Words before a whitespace tokenize the same
    whatever follows, so when that head alone has more tokens than the router reads, its first ones are the
    whole prompt's; otherwise (very long words) the whole prompt is tokenized."""
    heads = [_head(p, READ_CHARS_PER_TOKEN * limit) for p in prompts]
    encoded = tokenizer(heads, truncation=False, verbose=False, add_special_tokens=special_tokens)["input_ids"]
    for i, (head, prompt) in enumerate(zip(heads, prompts)):
        if head is not prompt and len(encoded[i]) <= limit:
            encoded[i] = tokenizer(prompt, truncation=False, verbose=False, add_special_tokens=special_tokens)["input_ids"]
    cut = (lambda ids: ids[: limit - 1] + ids[-1:]) if special_tokens else (lambda ids: ids[:limit])
    return [ids if len(ids) <= limit else cut(ids) for ids in encoded], [len(ids) > limit for ids in encoded]


def _head(prompt: str, chars: int) -> str:
    """The prompt up to its last whitespace within `chars` characters (the prompt itself when shorter, or when no
    whitespace is there to cut at)."""
    if len(prompt) <= chars:
        return prompt
    cut = max(prompt.rfind(space, 0, chars) for space in " \n\t\r")
    return prompt[:cut] if cut > 0 else prompt


class _GraphedRouter:
    """Batch-1 routing on a GPU as one CUDA-graph replay per prompt length. An encoder run eagerly at batch 1 is
    bound by kernel launches (about 4 ms for MiniLM-L6 on an H100); the replay launches them all at once. One prompt
    needs no padding, so no mask: the graph holds only the token ids.

    The graphs are captured on the router's own stream, not torch's shared capture stream: a captured product keeps
    the cuBLAS workspace of the stream it was captured on, and the router replays beside the engine's pre-fill graphs
    (`policy.Pending`), so a workspace shared with them would be written by both at once (it was: wrong logits)."""

    def __init__(self, router: Router, objective: str) -> None:
        self.router = router
        self.objective = objective
        self.graphs: dict[int, tuple] = {}
        self.pool = None  # one memory pool for all lengths: graphs replay one at a time
        self.broken = False  # an encoder whose forward cannot be captured falls back to eager routing
        self.stream = None  # the router's stream: captures, warm-ups and replays run on it

    @torch.inference_mode()
    def scores(self, ids: list[int]) -> np.ndarray | None:
        if self.broken:
            return None
        if len(ids) not in self.graphs:
            try:
                self.graphs[len(ids)] = self._capture(len(ids))
            except RuntimeError:
                self.broken = True
                return None
        static_ids, out, graph = self.graphs[len(ids)]
        with torch.cuda.stream(self.stream):  # the copy back waits for this stream only
            static_ids.copy_(torch.tensor(ids).view(1, -1))
            graph.replay()
            return out.float().cpu().numpy()[0]

    def _capture(self, length: int) -> tuple:
        device = next(self.router.parameters()).device
        static_ids = torch.zeros(1, length, dtype=torch.long, device=device)
        side = self.stream = self.stream or torch.cuda.Stream(device)  # one stream: one cuBLAS workspace
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(2):  # warm-up outside the capture: lazy initialisation, allocator
                self.router(static_ids)
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        self.pool = self.pool or torch.cuda.graph_pool_handle()
        with torch.cuda.graph(graph, pool=self.pool, stream=side):
            out = predicted_losses(self.router(static_ids), self.objective)
        return static_ids, out, graph


def router_history(directory: Path) -> dict:
    return json.loads((Path(directory) / "router.json").read_text())["history"]
