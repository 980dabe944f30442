"""The job queue behind the server: one engine, one worker thread, a bounded queue.

The engine is shared state (the running stack, the KV cache), so requests run one at a time on a single worker
thread while the event loop stays free to accept, validate, stream and refuse requests. At most `queue_size`
requests wait behind the running one; more are answered 503. Each request gets its set from the policy (routed
once, on the engine thread) unless it forces one with the extra body field `pudding`.
"""

from __future__ import annotations

import asyncio
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

from ..engine import Generation, Timings
from ..errors import PuddingError
from ..omission import OmissionSet
from ..policy import Choice, Policy, decided
from .wire import (
    MAX_STOP_STRINGS, ApiError, ChatMessage, OpenAIRequest, PuddingOptions, chat_logprobs, completion_logprobs,
)


@dataclass(eq=False)  # kept in a set by identity
class Job:
    ids: list[int]
    route_text: str  # what the router reads: the prompt, or the last user message of a chat
    forced: Choice | None  # a set the request imposes; None: the policy chooses
    max_tokens: int  # 0: no completion, only the echoed prompt's log-probabilities
    stops: list[str]
    logprobs: int | None = None  # record log-probabilities, with this many alternatives per token
    echo: bool = False  # also score the prompt (completions with echo and logprobs)
    route_tokens: list[int] | None = None  # the decoder's ids of route_text, when the prompt is that text
    cancelled: threading.Event = field(default_factory=threading.Event)
    queued_at: float = field(default_factory=time.perf_counter)


@dataclass
class Outcome:
    generation: object  # engine.Generation
    finish_reason: str | None  # None when cancelled
    queue_ms: float
    prompt_scores: tuple | None = None  # with echo: per prompt token its log-probability and the top alternatives


class StopScanner:
    """Cuts generated text at the first stop string. It holds back a tail that could be the start of a stop string,
    so a streamed piece never shows text that a later token turns into a stop."""

    def __init__(self, stops: list[str]) -> None:
        self.stops = stops
        self.pending = ""

    def feed(self, piece: str) -> tuple[str, bool]:
        """The text now safe to show, and whether a stop string was reached."""
        self.pending += piece
        found = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if found:
            safe, self.pending = self.pending[: min(found)], ""
            return safe, True
        keep = self._partial_stop_length()
        safe, self.pending = self.pending[: len(self.pending) - keep], self.pending[len(self.pending) - keep :]
        return safe, False

    def flush(self) -> str:
        rest, self.pending = self.pending, ""
        return rest

    def _partial_stop_length(self) -> int:
        """The longest tail of the pending text that is the start of a stop string."""
        longest = 0
        for stop in self.stops:
            for length in range(min(len(stop) - 1, len(self.pending)), longest, -1):
                if self.pending.endswith(stop[:length]):
                    longest = length
                    break
        return longest


_FINISHED = object()


class Service:
    """One engine, one worker thread, a bounded queue; turns validated requests into jobs and jobs into text."""

    def __init__(self, engine, policy: Policy, model_name: str, queue_size: int) -> None:
        self.engine = engine
        self.policy = policy
        self.model_name = model_name
        self.queue_size = queue_size
        self.num_blocks = policy.num_blocks
        self.sets: list[OmissionSet] = policy.sets
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pudding-engine")
        self._lock = threading.Lock()
        self._live: set[Job] = set()  # admitted and not finished: the running job and those waiting
        self.counts = {"completed": 0, "cancelled": 0, "refused": 0, "failed": 0}
        # Requests run only captured graphs when the engine speculates; the graphs they went without are captured
        # on the engine thread while no request waits (`_capture_while_idle`).
        engine.defer_captures = True

    # -- validation -------------------------------------------------------------------------------------------

    def check_model(self, name: str) -> None:
        if name != self.model_name:
            raise ApiError(404, f"the model '{name}' does not exist: this server serves '{self.model_name}'",
                           "model", "model_not_found")

    def job(self, prompt: str | list[int], route_text: str | None, request: OpenAIRequest, requested: int | None,
            default_max: int | None, param: str, logprobs: int | None = None, echo: bool = False) -> Job:
        """Validate what every request shares: the set, the context (text, or token ids), max_tokens, stop strings.
        Runs off the event loop: tokenizing a long prompt takes a while."""
        if isinstance(prompt, str) and (least := self.engine.tokens_at_least(prompt)) >= self.engine.max_len:
            raise ApiError(400, f"the prompt has at least {least} tokens, more than this server's context of "
                                f"{self.engine.max_len} tokens", param, "context_length_exceeded")
        tokens = self.engine.text_tokens(prompt) if isinstance(prompt, str) else None
        ids = self.engine.with_bos(tokens) if tokens is not None else self._token_ids(prompt, param)
        route_text = route_text if route_text is not None else self.engine.tokenizer.decode(ids)
        if not route_text.strip():
            raise ApiError(400, "the prompt is empty", param, "empty_prompt")
        forced = self._forced(request.pudding)
        return Job(ids, route_text, forced, self._max_tokens(len(ids), requested, default_max, param, zero_ok=echo),
                   _stop_strings(request.stop), logprobs, echo, route_tokens=tokens if route_text == prompt else None)

    def check_length(self, tokens: int, param: str = "prompt") -> None:
        """A prompt of token ids must leave room for one token in the context."""
        if tokens >= self.engine.max_len:
            raise ApiError(400, f"the prompt has {tokens} tokens, which leaves no room in this server's context of "
                                f"{self.engine.max_len} tokens", param, "context_length_exceeded")

    def _token_ids(self, ids: list[int], param: str) -> list[int]:
        vocab = len(self.engine.tokenizer)
        if not ids:
            raise ApiError(400, "the prompt is empty", param, "empty_prompt")
        self.check_length(len(ids), param)
        bad = next((t for t in ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise ApiError(400, f"token id {bad} is not in the vocabulary (0 to {vocab - 1})", param, "invalid_value")
        return list(ids)

    def _forced(self, options: PuddingOptions | None) -> Choice | None:
        """The set a request forces with the `pudding` field, or None (the policy chooses)."""
        if options is None or (options.set is None and options.omit is None):
            return None
        if options.set is not None and options.omit is not None:
            raise ApiError(400, "give pudding.set or pudding.omit, not both", "pudding")
        if options.omit is not None:
            chosen = _omission_set(options.omit, self.num_blocks)
        elif options.set == "dense":
            chosen = OmissionSet.dense(self.num_blocks)
        elif not self.sets:
            raise ApiError(400, "this server has no router and so no numbered sets: force blocks with pudding.omit",
                           "pudding.set")
        elif not 0 <= options.set < len(self.sets):
            raise ApiError(400, f"set {options.set} does not exist: the router's sets are numbered 0 to "
                                f"{len(self.sets) - 1}", "pudding.set")
        else:
            chosen = self.sets[options.set]
        try:
            self.engine.check_fits(chosen)
        except PuddingError as err:
            raise ApiError(400, str(err), "pudding") from None
        return self.policy.forced(chosen)

    def _max_tokens(self, prompt_tokens: int, requested: int | None, default: int | None, param: str,
                    zero_ok: bool = False) -> int:
        room = self.engine.max_len - prompt_tokens
        if requested == 0 and zero_ok and room >= 0:  # echo with nothing generated: the prompt's log-probabilities
            return 0
        if room < 1:
            raise ApiError(400, f"the prompt has {prompt_tokens} tokens, which leaves no room in this server's context "
                                f"of {self.engine.max_len} tokens", param, "context_length_exceeded")
        if requested is None:
            return min(default, room) if default else room
        if requested < 1:
            why = "" if requested != 0 else " (0 only with echo, for the prompt's log-probabilities)"
            raise ApiError(400, f"max_tokens must be at least 1{why}, not {requested}", "max_tokens", "invalid_value")
        if requested > room:
            raise ApiError(400, f"this server's context is {self.engine.max_len} tokens: the prompt takes "
                                f"{prompt_tokens} and max_tokens asks for {requested}", "max_tokens",
                           "context_length_exceeded")
        return requested

    def chat_text(self, messages: list[ChatMessage]) -> str:
        import jinja2

        tokenizer = self.engine.tokenizer
        if not getattr(tokenizer, "chat_template", None):
            raise ApiError(400, f"{self.model_name} has no chat template: use /v1/completions", "messages")
        turns = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in messages]
        try:
            return tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
        except (jinja2.TemplateError, ValueError, TypeError) as err:
            raise ApiError(400, f"the model's chat template rejected these messages: {err}", "messages") from None

    # -- running ------------------------------------------------------------------------------------------------

    def start(self, job: Job) -> AsyncIterator[str | Outcome]:
        """Queue the job on the engine thread (or refuse it: 503 when the queue is full). The returned iterator
        yields its text pieces as they come, then its Outcome."""
        with self._lock:
            if len(self._live) > self.queue_size:  # one running, queue_size waiting
                self.counts["refused"] += 1
                raise ApiError(503, f"the server is busy: {self.queue_size} requests are already waiting",
                               None, "server_overloaded", "server_error")
            self._live.add(job)
        loop = asyncio.get_running_loop()
        items: asyncio.Queue = asyncio.Queue()

        def put(item) -> None:
            try:
                loop.call_soon_threadsafe(items.put_nowait, item)
            except RuntimeError:  # the event loop has closed: the server is shutting down
                pass

        future = self._worker.submit(self._generate, job, put)
        future.add_done_callback(lambda done: (self._finished(job, done), put(_FINISHED)))
        return self._results(job, items, future)

    async def _results(self, job: Job, items: asyncio.Queue, future: Future) -> AsyncIterator[str | Outcome]:
        try:
            while (item := await items.get()) is not _FINISHED:
                yield item
            if future.cancelled() or future.result().generation is None:  # never ran: the server is stopping
                raise ApiError(503, "the server is shutting down", None, "shutting_down", "server_error")
            yield future.result()
        finally:
            job.cancelled.set()  # the consumer is gone (client disconnected): stop generating

    def _generate(self, job: Job, emit: Callable[[str], None]) -> Outcome:
        """On the engine thread: route (unless forced), swap, pre-fill, decode; emit text as it becomes safe."""
        queue_ms = 1000 * (time.perf_counter() - job.queued_at)
        if job.cancelled.is_set():
            return Outcome(None, None, queue_ms)
        # a routed choice is made when the engine asks for it, beside the pre-fill of the blocks every set keeps
        choice = job.forced or self.policy.pending(job.route_text, job.route_tokens)
        scores = None
        if job.echo and job.logprobs is not None:
            choice = decided(choice)
            scores = self.engine.prompt_logprobs(job.ids, choice, job.logprobs or 0)
        if job.max_tokens == 0:  # the prompt's log-probabilities only
            choice = decided(choice)
            generation = Generation("", [], list(choice.omit), choice.index, Timings(route_ms=choice.ms), len(job.ids),
                                    routed=choice.routed, logprobs=[])
            return Outcome(generation, "length", queue_ms, scores)
        scanner = StopScanner(job.stops)
        result, finish = None, None
        for piece, result in self.engine.stream(job.ids, choice, job.max_tokens, logprobs=job.logprobs):
            if job.cancelled.is_set():
                break
            text, stopped = scanner.feed(piece)
            if text:
                emit(text)
            if stopped:
                finish = "stop"
                break
        else:
            rest = scanner.flush()
            if rest:
                emit(rest)
            finish = result.finish_reason
        return Outcome(result, finish, queue_ms, scores)

    def _finished(self, job: Job, future: Future) -> None:
        with self._lock:
            self._live.discard(job)
            if future.cancelled():  # never started: the server is stopping
                self.counts["cancelled"] += 1
                return
            if future.exception() is not None:
                self.counts["failed"] += 1
            else:
                self.counts["completed" if future.result().finish_reason else "cancelled"] += 1
        self._when_idle(self._capture_while_idle)

    def _when_idle(self, work: Callable[[], None]) -> None:
        """Queue `work` on the engine thread if no request is waiting (a request that comes meanwhile waits for it)."""
        with self._lock:
            if self._live:
                return
        try:
            self._worker.submit(work)
        except RuntimeError:  # the server is shutting down
            pass

    def _capture_while_idle(self) -> None:
        """Capture one graph a request went without (`Engine.capture_wanted`), then the next while still idle: one
        at a time, so a request arriving meanwhile waits for one capture at most."""
        with self._lock:
            if self._live:
                return
        try:
            captured = self.engine.capture_wanted(limit=1)
        except Exception as err:  # noqa: BLE001 - a failed capture must not stop the server; speculation goes on without it
            print(f"pudding serve: capturing a speculation graph failed ({type(err).__name__}: {err})", file=sys.stderr)
            return
        if captured:
            self._when_idle(self._capture_while_idle)

    def close(self) -> None:
        with self._lock:
            for job in self._live:
                job.cancelled.set()
        self._worker.shutdown(wait=False, cancel_futures=True)

    # -- describing -----------------------------------------------------------------------------------------------

    def prompt_text(self, prompt: str | list[int]) -> str:
        return prompt if isinstance(prompt, str) else self.engine.tokenizer.decode(prompt)

    def _piece(self, token: int) -> str:
        return self.engine.tokenizer.decode([token])

    def logprobs(self, job: Job, outcome: Outcome, chat: bool) -> dict | None:
        """The `logprobs` field of a choice, in the shape of its endpoint (None unless asked for)."""
        if job.logprobs is None or outcome.generation is None:
            return None
        if chat:
            return chat_logprobs(self._piece, outcome.generation)
        return completion_logprobs(self._piece, job.ids if job.echo else None, outcome.prompt_scores, outcome.generation)

    def pudding_field(self, outcome: Outcome) -> dict:
        generation = outcome.generation
        t = generation.timings
        return {"set_index": generation.set_index, "omitted_blocks": generation.blocks, "routed": generation.routed,
                "router_ms": round(t.route_ms, 3), "swap_ms": round(t.swap_ms, 3), "ttft_ms": round(t.ttft_ms, 3),
                "queue_ms": round(outcome.queue_ms, 3), "tokens_per_second": round(t.tokens_per_second, 2)}

    def count(self, what: str) -> None:
        with self._lock:
            self.counts[what] += 1

    def health(self) -> dict:
        with self._lock:
            live = len(self._live)
            counts = dict(self.counts)
        return {"status": "ok", "model": self.model_name, "routed": self.policy.fixed is None,
                "busy": live > 0, "waiting": max(0, live - 1), "queue_size": self.queue_size, "requests": counts}


def _omission_set(blocks: list[int], num_blocks: int) -> OmissionSet:
    try:
        return OmissionSet(blocks, num_blocks)
    except PuddingError as err:
        raise ApiError(400, str(err), "pudding.omit") from None


def _stop_strings(stop: str | list[str] | None) -> list[str]:
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > MAX_STOP_STRINGS:
        raise ApiError(400, f"at most {MAX_STOP_STRINGS} stop strings, not {len(stops)}", "stop")
    if any(not s for s in stops):
        raise ApiError(400, "a stop string is empty", "stop")
    return stops
