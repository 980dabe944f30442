"""lm-eval's model "pudding": a depth-pruned model under a static omission set or a bundle's router.

model_args (lm-eval splits them at commas, so block lists use ';'):

    bundle=DIR                 route every document with the bundle's router (its model unless model= says)
    model=NAME                 registry name, HF directory or .gguf file (default: the bundle's, else smollm2-135m)
    omit=11;17;20              skip these blocks (0-based) for every document
    set=I                      with bundle=DIR: the bundle's candidate set I, for every document
    device, dtype, batch_tokens, quantize  as in `pudding eval`
    lora=true                  with bundle=DIR: run each set with its LoRA adapter from the bundle (`pudding lora`)

lm-eval's batch_size and max_batch_size are accepted and ignored: pudding batches by tokens (batch_tokens).

Routing happens once per document (lm-eval's task name and doc_id), before any of its requests is scored, and all
of a document's requests run under the chosen set. The router reads, per document:
* the context its requests share: for multiple-choice tasks that is the question as the model sees it (the
  prompt `pudding eval` routes on, in zero-shot), with few-shot examples when there are any;
* where the contexts differ (WinoGrande's partial scoring puts each option inside the context): the prompt that
  pudding's task registry makes of the document, when the task is one pudding knows (WinoGrande: the sentence with
  its blank, as `pudding eval`), else the first request's context and continuation, the first option filled in;
* for perplexity (loglikelihood_rolling) and generation requests: the text itself, the context.
"""

from __future__ import annotations

import logging
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field

import lm_eval.models  # noqa: F401  (lm-eval fills its registry with its own models only while it is empty: do it first)
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from ..errors import PuddingError
from ..omission import OmissionSet
from ..progress import progress_bar

log = logging.getLogger(__name__)
DEFAULT_MAX_GEN_TOKS = 256  # lm-eval's default for generate_until


@dataclass
class Document:
    """One harness document: the text the router reads and the positions of its requests in lm-eval's list."""

    prompt: str
    positions: list[int] = field(default_factory=list)


def _block_list(value) -> str:
    """omit= as OmissionSet.parse reads it: lm-eval hands over '11;17;20' as text, a single block as an int."""
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value))
    return str(value).replace(";", ",")


def _router_prompt(instances) -> str:
    """What the router reads for one document's requests (see the module docstring)."""
    contexts = [c for c in dict.fromkeys(r.args[0] for r in instances) if c.strip()]  # "" = unconditional requests
    if len(contexts) == 1:
        return contexts[0]
    first = instances[0]
    if isinstance(first.doc, dict) and first.task_name:
        from ..tasks import get_task

        try:
            prompt = get_task(first.task_name).prompt_for(first.doc)
        except PuddingError:  # a task pudding does not know
            prompt = None
        if prompt:
            return prompt
    return first.args[0] + first.args[1]


def documents_of(requests) -> list[Document]:
    """Requests grouped by document, in order of first appearance."""
    grouped: dict[tuple, list[int]] = defaultdict(list)
    for position, request in enumerate(requests):
        key = (request.task_name, request.doc_id) if request.doc_id is not None else (None, request.args[0])
        grouped[key].append(position)
    return [Document(_router_prompt([requests[p] for p in positions]), positions) for positions in grouped.values()]


def _flag(value, name: str) -> bool:
    """A yes/no model_arg: lm-eval hands over True/False for true/false, the raw text for anything else."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "1", "yes"):
        return True
    if text in ("false", "0", "no", ""):
        return False
    raise PuddingError(f"{name} must be true or false, not {value!r}")


def _pick_device(device: str | None) -> str:
    """lm-eval's command line passes device="cuda:0" unless --device says otherwise: without a GPU, run on the CPU
    (as lm-eval's own HF model does) instead of refusing."""
    import torch

    from ..models import check_device, default_device

    if device and device.startswith("cuda") and not torch.cuda.is_available():
        log.warning("device %s asked for, but no CUDA GPU is visible: running on the CPU", device)
        return "cpu"
    return check_device(device or default_device())


def _generation_settings(gen_kwargs: dict | None) -> tuple[list[str], int]:
    """Stop strings and the token limit; anything but greedy decoding is refused."""
    kwargs = dict(gen_kwargs or {})
    if kwargs.get("do_sample") or float(kwargs.get("temperature") or 0) > 0:
        raise PuddingError("pudding generates greedily only, but this task asks for sampling (do_sample or temperature > 0)")
    until = kwargs.get("until") or []
    until = [until] if isinstance(until, str) else list(until)
    return until, int(kwargs.get("max_gen_toks", DEFAULT_MAX_GEN_TOKS))


def _cut_at_stop(text: str, until: Sequence[str]) -> str | None:
    """The text before the first stop string, or None while no stop string has appeared."""
    cuts = [text.index(stop) for stop in until if stop and stop in text]
    return text[: min(cuts)] if cuts else None


@register_model("pudding")
class PuddingLM(LM):
    def __init__(self, bundle=None, model=None, omit=None, set=None, device=None, dtype="auto", batch_tokens=None,
                 quantize=None, lora=False, batch_size=None, max_batch_size=None, **unknown) -> None:
        super().__init__()
        from ..bundle import Bundle
        from ..models import load_decoder, resolve_model
        from ..policy import PolicySpec
        from ..quantize import check_scheme
        from ..scoring import Scorer

        if unknown:
            raise PuddingError(f"unknown model_args {', '.join(sorted(unknown))} "
                               "(pudding takes bundle, model, omit, set, device, dtype, batch_tokens, quantize, lora)")
        spec = PolicySpec(omit=None if omit is None else _block_list(omit), set=set,
                          names={"omit": "omit=", "set": "set=", "bundle": "bundle=DIR"})
        spec.check_options(bool(bundle))  # the options alone, before anything is opened
        opened = Bundle.open(bundle) if bundle else None
        model = str(model) if model else None
        ref = opened.model_ref(model) if opened else resolve_model(model or "smollm2-135m")
        if batch_tokens is not None and (isinstance(batch_tokens, bool) or not isinstance(batch_tokens, int) or batch_tokens < 64):
            raise PuddingError(f"batch_tokens must be an integer of at least 64, not {batch_tokens!r}")
        check_scheme(None if quantize is None else str(quantize), "quantize=")
        lora = _flag(lora, "lora=")
        if lora and opened is None:
            raise PuddingError("lora=true needs bundle=DIR (the adapters live in it)")
        spec.check(opened, ref.num_blocks)  # before the model loads
        self._device = _pick_device(str(device) if device else None)
        self.bundle = opened
        self.sets_used: Counter = Counter()  # omission set label -> documents run under it
        self._engine = None
        self.policy = spec.build(ref.num_blocks, opened, self._device)
        self.loaded = load_decoder(ref, self._device, str(dtype), None if quantize is None else str(quantize))
        self.scorer = Scorer(self.loaded.decoder, self.loaded.tokenizer, max_batch_tokens=batch_tokens)
        self.adapters = None
        if lora:
            from ..lora import AdapterStore

            self.adapters = AdapterStore(opened.path, self.loaded.model)
            self.scorer.use_adapters(self.adapters, self.policy.sets_to_prepare())

    def _assign(self, documents: Sequence[Document]) -> dict[OmissionSet, list[Document]]:
        """Route (or not) every document once; documents grouped by the set they run under."""
        by_set: dict[OmissionSet, list[Document]] = defaultdict(list)
        for document, choice in zip(documents, self.policy.choose([d.prompt for d in documents])):
            by_set[choice.omit].append(document)
            self.sets_used[choice.omit.label()] += 1
        return by_set

    # -- the three request types ------------------------------------------------------------------------------

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """Each document's requests are packed together (shared context once), under the document's set."""
        pairs = [request.args for request in requests]
        results: list = [None] * len(requests)
        for omission, documents in self._assign(documents_of(requests)).items():
            prepared = self.scorer.prepare_texts([[pairs[p] for p in d.positions] for d in documents])
            with progress_bar(f"loglikelihood · omit {omission.label()}", prepared.num_tokens) as advance:
                scores = self.scorer.score(prepared, omission, None if disable_tqdm else advance)
            positions = [p for d in documents for p in d.positions]  # the order prepare() numbered them in
            for position, logprob, greedy in zip(positions, scores.logprob, scores.greedy):
                results[position] = (float(logprob), bool(greedy))
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of whole texts in lm-eval's rolling windows: every token predicted once, from the
        model's full window of context (BOS, else end-of-text, before the first)."""
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        from ..scoring import Request

        texts = [request.args[0] for request in requests]
        totals = [0.0] * len(texts)
        prefix = self.scorer.encoder.empty_context[-1]
        documents = [Document(text, [i]) for i, text in enumerate(texts)]
        for omission, members in self._assign(documents).items():
            groups, owners = [], []
            for document in members:
                tokens = list(self.scorer.encoder.encode(texts[document.positions[0]]))
                for window in get_rolling_token_windows(tokens, prefix, self.scorer.max_length, context_len=1):
                    context, continuation = make_disjoint_window(window)
                    groups.append([Request(tuple(context), tuple(continuation))])
                    owners.append(document.positions[0])
            prepared = self.scorer.prepare(groups)
            with progress_bar(f"rolling · omit {omission.label()}", prepared.num_tokens) as advance:
                scores = self.scorer.score(prepared, omission, None if disable_tqdm else advance)
            for owner, logprob in zip(owners, scores.logprob):
                totals[owner] += float(logprob)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy generation with pudding's engine (KV cache on the pruned stack), stopped at lm-eval's stop
        strings or the end-of-text token."""
        settings = [_generation_settings(request.args[1]) for request in requests]  # refuse sampling up front
        outputs: list = [None] * len(requests)
        documents = [Document(request.args[0], [i]) for i, request in enumerate(requests)]
        for omission, members in self._assign(documents).items():
            for document in members:
                position = document.positions[0]
                outputs[position] = self._generate(document.prompt, omission, *settings[position])
        return outputs

    def _generate(self, context: str, omission: OmissionSet, until: list[str], max_new_tokens: int) -> str:
        engine = self._generation_engine()
        room = engine.max_len - max_new_tokens
        if room < 1:
            raise PuddingError(f"max_gen_toks {max_new_tokens} leaves no room for a context in {engine.max_len} tokens")
        ids = engine.encode(context)[-room:]  # the end of a context that does not fit, as lm-eval's models keep
        text = ""
        for _, result in engine.stream(ids, omission, max_new_tokens):
            text = result.text
            cut = _cut_at_stop(text, until)
            if cut is not None:
                return cut
        return text

    def _generation_engine(self):
        """Built on first use (it holds its own copy of the block weights)."""
        if self._engine is None:
            from ..engine import Engine

            # 2048 tokens of context, as `pudding generate`: each decode step attends over the whole static cache
            adapters = self.adapters.for_sets(self.policy.sets_to_prepare()) if self.adapters else {}
            rank = next(iter(adapters.values())).rank if adapters else 0
            self._engine = Engine.from_model(self.loaded.model, self.loaded.tokenizer, self._device,
                                             max_len=min(self.scorer.max_length, 2048), lora_rank=rank)
            if adapters:
                self._engine.set_adapters(adapters)
        return self._engine

    # -- what lm-eval records ---------------------------------------------------------------------------------

    def get_model_info(self) -> dict:
        return {"pudding": {
            **self.loaded.info(),
            "omission": self.policy.label,
            "lora": self.adapters is not None,
            "bundle": str(self.bundle.path) if self.bundle else None,
            "sets_used": dict(self.sets_used),
            "routing": self.policy.stats.to_json() if self.policy.fixed is None else None,
        }}
