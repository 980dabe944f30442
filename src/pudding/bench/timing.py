"""Timing primitives of the speed benchmark: a clock (CUDA events on a GPU), the bandwidth ceiling's inputs, and the
timed runs themselves: pre-fill and generation per omission set, routing, block swaps, and graphed calls of one
kernel or product.

GPU figures are timed with CUDA events after warm-up and reported as medians.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from ..engine import Engine, common_start
from ..errors import PuddingError
from ..omission import OmissionSet
from ..policy import Pending, shared_blocks


class Clock:
    """Wall time of a region; on GPUs with CUDA events on the current stream."""

    def __init__(self, device) -> None:
        self.cuda = torch.device(device).type == "cuda"

    def time(self, fn: Callable[[], object]) -> float:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end)
        started = time.perf_counter()
        fn()
        return 1000 * (time.perf_counter() - started)

    def median(self, fn: Callable[[], object], repeats: int, warmup: int = 1) -> float:
        for _ in range(warmup):
            self.time(fn)
        return statistics.median(self.time(fn) for _ in range(repeats))


def measure_bandwidth(device, gigabytes: float = 2.0) -> float:
    """Device memory bandwidth in bytes/s: a large copy, counting bytes read plus written."""
    numel = int(gigabytes * 1e9 / 2)
    a = torch.empty(numel, dtype=torch.bfloat16, device=device).normal_()
    b = torch.empty_like(a)
    ms = Clock(device).median(lambda: b.copy_(a), repeats=10, warmup=3)
    return 2 * numel * 2 / (ms / 1000)


def weight_bytes_per_token(engine: Engine, kept: int) -> int:
    """Weights decode reads per generated token: the blocks that run, the final norm and the LM head."""
    norm = engine.final_norm.numel() * engine.final_norm.element_size()
    return kept * engine.layout.nbytes + norm + engine.head_bytes


def prefill_flops(engine: Engine, kept: int, prompt: int) -> float:
    """Matrix-multiply FLOPs of a pre-fill: every block that runs on every prompt token (attention included), and
    the LM head once (pre-fill computes only the last position's logits)."""
    s = engine.shape
    block = 2 * engine.layout.params  # one multiply-add per weight
    attention = 2 * 2 * s.heads * s.head_dim * (prompt + 1) / 2  # QK^T and PV, causal: half the square on average
    return kept * prompt * (block + attention) + 2 * s.vocab * s.hidden


@dataclass
class SetTimings:
    label: str
    kept: int
    ttft_ms: dict[int, float]  # prompt length -> time to first token (pre-fill and first token)
    generate_ms: dict[int, float]  # new tokens -> pre-fill of the base prompt + generation
    decode_tok_s: float
    decode_ms_per_token: float


def prompt_ids(length: int, vocab: int) -> list[int]:
    """A random prompt of `length` token ids, the same for every run of that length (speed does not depend on it)."""
    return torch.randint(10, vocab - 10, (length,), generator=torch.Generator().manual_seed(length)).tolist()


@dataclass(frozen=True)
class Arm:
    """One thing `time_arms` times: an engine running an omission set, under a label."""

    engine: Engine
    omit: OmissionSet
    label: str


def time_set(engine: Engine, omit: OmissionSet, label: str, prompt_lengths: Sequence[int], base_prompt: int,
             gen_lengths: Sequence[int], repeats: int) -> SetTimings:
    return time_sets(engine, [(omit, label)], prompt_lengths, base_prompt, gen_lengths, repeats)[0]


def time_sets(engine: Engine, sets: Sequence[tuple[OmissionSet, str]], prompt_lengths: Sequence[int], base_prompt: int,
              gen_lengths: Sequence[int], repeats: int) -> list[SetTimings]:
    """`time_arms` for several (set, label) of one engine."""
    return time_arms([Arm(engine, omit, label) for omit, label in sets], prompt_lengths, base_prompt, gen_lengths, repeats)


def time_arms(arms: Sequence[Arm], prompt_lengths: Sequence[int], base_prompt: int, gen_lengths: Sequence[int],
              repeats: int) -> list[SetTimings]:
    """Time to first token per prompt length, and pre-fill of the base prompt plus generation per number of new
    tokens, for each arm: medians of `repeats` (generation: half as many). The arms take turns at every repeat, so
    that a machine whose speed drifts (a shared CPU, a GPU's clocks) slows them alike instead of whichever ran last:
    on two shared CPU cores, timing one set after the other put 1.17-1.56x into ratios of ~1.25x
    (results/bench-smollm2-cpu.md), and timing bf16, int8 and int4 engines one after another moved their ratios by up
    to 30% between runs (results/quantized-cpu.md). Arms may run different engines of one model shape."""
    clock = Clock(arms[0].engine.device)
    vocab = arms[0].engine.shape.vocab
    if any(arm.engine.shape.vocab != vocab for arm in arms):
        raise PuddingError("the arms timed together must share a vocabulary (one model shape)")
    base_ids = prompt_ids(base_prompt, vocab)

    def prefill(ids: list[int]) -> Callable[[Engine], Callable[[], object]]:
        def make(engine: Engine) -> Callable[[], object]:
            return lambda: engine.prefill(ids).argmax(-1)
        return make

    def generate(new_tokens: int) -> Callable[[Engine], Callable[[], object]]:
        def make(engine: Engine) -> Callable[[], object]:
            def run() -> None:
                token = engine.prefill(base_ids).argmax(-1)
                for i in range(new_tokens - 1):
                    token = engine.decode_step(token, base_prompt + i).argmax(-1)
                token.item()
            return run
        return make

    jobs = {("ttft", n): (prefill(prompt_ids(n, vocab)), repeats) for n in prompt_lengths}
    jobs.setdefault(("ttft", base_prompt), (prefill(base_ids), repeats))  # generation's own pre-fill, subtracted
    jobs.update({("generate", n): (generate(n), max(1, repeats // 2)) for n in gen_lengths})
    samples = {(i, key): [] for i in range(len(arms)) for key in jobs}
    for key, (make, count) in jobs.items():
        runs = [make(arm.engine) for arm in arms]
        for arm, run in zip(arms, runs):  # warm-up
            arm.engine.use(arm.omit)
            clock.time(run)
        for _ in range(count):
            for i, (arm, run) in enumerate(zip(arms, runs)):
                arm.engine.use(arm.omit)
                samples[i, key].append(clock.time(run))
    out = []
    longest = max(gen_lengths)
    for i, arm in enumerate(arms):
        median = {key: statistics.median(samples[i, key]) for key in jobs}
        per_token = (median["generate", longest] - median["ttft", base_prompt]) / (longest - 1)
        out.append(SetTimings(arm.label, arm.engine.shape.num_blocks - len(arm.omit),
                              {n: median["ttft", n] for n in prompt_lengths}, {n: median["generate", n] for n in gen_lengths},
                              1000 / per_token, per_token))
    return out


ROUTER_PROMPTS = [
    "Question: Which of these would help to prevent infections from spreading?\nAnswer:",
    "A man is sitting on a roof. He",
    "Question: How do I ready a guinea pig cage for its new occupants?\nAnswer:",
    "Sarah was a much better surgeon than Maria so _ always got the harder cases.",
]


def router_timing(policy, prompts: Sequence[str], repeats: int = 20) -> float:
    """Median batch-1 time a policy takes to choose (for a router: tokenization, encoder, head, choice), after
    warm-up."""
    for p in prompts[:3]:
        policy.choose_one(p)
    return statistics.median(policy.choose_one(p).ms for _ in range(repeats) for p in prompts)


def router_text(words: int) -> str:
    """A prompt of about `words` words (the router reads at most its max_length tokens of it)."""
    pool = " ".join(ROUTER_PROMPTS).split()
    return " ".join(pool[i % len(pool)] for i in range(words))


def routed_prefill(engine: Engine, policy, lengths: Sequence[int], shared_values: Sequence[int], repeats: int,
                   dense: OmissionSet | None = None) -> dict:
    """Time to first token with routing included, measured rather than added: per number of blocks pre-filled ahead
    of the choice (0: route, then pre-fill), per prompt length, the median of `Engine.start` with a pending choice
    (the router reads a prompt about as long as the engine's, on its own stream; a router on the decoder's tokens
    reads the engine's prompt ids themselves, as `generate` and `serve` hand them over). With `dense`, that set's
    pre-fill takes turns with every routed one (`dense_ttft_ms`), so that the speedup compares times of the same
    minutes: timed minutes apart, the ratio at 128 tokens moved by 3% between runs on one H100 (2026-12-06).
    Then the same with speculation (`speculative`): the engine expects the set the router picks ("right", as when
    consecutive prompts get the same set) or the candidate sharing the fewest leading blocks with it ("wrong"). At a
    length where the routing time covers no block past those every set keeps, speculating runs what the shared row
    ran: not timed again (its TTFT is None)."""
    out: dict = {"ttft_ms": {}, "issue_ms": {}, "prefill_issue_ms": {}, "max_abs_logit_diff": 0.0}
    if dense is not None:
        out["dense_ttft_ms"] = {}
    speculate, engine.speculate = engine.speculate, False
    prompts = {}
    for shared in shared_values:
        out["ttft_ms"][shared], out["issue_ms"][shared] = {}, {}
        for length in lengths:
            ids, text = prompt_ids(length, engine.shape.vocab), router_text(length)
            tokens = _router_tokens(policy, text, length)
            if tokens is not None:  # a router on the decoder's tokens reads the engine's own ids (`Policy.pending`)
                ids = [t % engine.shape.vocab for t in tokens]  # (a test model's small vocabulary wraps them)
            decide = policy.pending(text, tokens).decide
            prompts[length] = (ids, decide)

            def run(ids=ids, decide=decide, shared=shared):
                return engine.start(ids, Pending(shared, decide))

            ms, dense_ms = _timed_start(engine, run, dense, ids, repeats)
            out["ttft_ms"][shared][length] = ms
            if dense is not None:
                out["dense_ttft_ms"].setdefault(shared, {})[length] = dense_ms
            out["issue_ms"][shared][length] = _issue_ms(engine, run, repeats)
            _check_logits(engine, ids, run, out)
            out["prefill_issue_ms"][length] = _issue_ms(engine, lambda ids=ids: engine.prefill(ids), repeats)
    engine.speculate = True
    out["speculative"] = {}
    shared = shared_blocks(policy.sets)  # what `Policy.pending` says
    for length, (ids, decide) in prompts.items():
        chosen = tuple(decide().omit.kept())
        others = [tuple(s.kept()) for s in policy.sets if tuple(s.kept()) != chosen]
        guesses = {"right": chosen}
        if others:
            guesses["wrong"] = min(others, key=lambda kept: common_start(kept, chosen))
        for name, guess in guesses.items():
            def run(guess=guess, ids=ids, decide=decide):
                engine.expected = guess
                return engine.start(ids, Pending(shared, decide))

            row = out["speculative"].setdefault(name, {"ttft_ms": {}, "dense_ttft_ms": {}, "blocks_ahead": {},
                                                       "resumed_at": {}})
            _check_logits(engine, ids, run, out)  # also the pace's first measurements at this length
            run()
            if engine.last_ahead > shared:
                row["ttft_ms"][length], row["dense_ttft_ms"][length] = _timed_start(engine, run, dense, ids, repeats)
            else:  # no block past the shared ones: the shared row's run
                row["ttft_ms"][length] = row["dense_ttft_ms"][length] = None
            row["blocks_ahead"][length] = engine.last_ahead
            row["resumed_at"][length] = engine.last_resumed
    engine.speculate = speculate
    return out


def _timed_start(engine: Engine, run: Callable, dense: OmissionSet | None, ids: list[int],
                 repeats: int) -> tuple[float, float | None]:
    """Median TTFT of `run` (an `Engine.start`), and of the dense pre-fill timed in turn with it where given."""
    if dense is None:
        return Clock(engine.device).median(lambda: run()[2].argmax(-1), repeats), None
    dense_ms, routed_ms = _in_turn(engine, dense, ids, lambda: run()[2].argmax(-1), repeats)
    return routed_ms, dense_ms


def _check_logits(engine: Engine, ids: list[int], run: Callable, out: dict) -> None:
    """Record how far `run`'s logits are from choosing first, then one pre-fill graph."""
    choice, _, logits = run()
    ahead = logits.clone()
    engine.use(choice.omit)
    diff = (engine.prefill(ids) - ahead).abs().max().item()
    out["max_abs_logit_diff"] = max(out["max_abs_logit_diff"], diff)


def _in_turn(engine: Engine, dense: OmissionSet, ids: list[int], routed: Callable[[], object],
             repeats: int) -> tuple[float, float]:
    """Medians of the dense set's pre-fill and of `routed`, timed alternately (one warm-up each); the switch to the
    dense set happens before its clock starts, the routed call's own switch inside its clock."""
    clock = Clock(engine.device)
    times: tuple[list[float], list[float]] = ([], [])
    for i in range(repeats + 1):
        engine.use(dense)
        dense_ms = clock.time(lambda: engine.prefill(ids).argmax(-1))
        routed_ms = clock.time(routed)
        if i:
            times[0].append(dense_ms)
            times[1].append(routed_ms)
    return statistics.median(times[0]), statistics.median(times[1])


def _issue_ms(engine: Engine, fn: Callable[[], object], repeats: int) -> float:
    """Median host time fn takes to return from an idle device: on a GPU, the host's work before the device's
    (choosing, switching, loading the prompt) and the launches, which the device waits for when it starts idle."""
    sync = torch.cuda.synchronize if engine.device.type == "cuda" else (lambda: None)
    times = []
    for _ in range(repeats):
        sync()
        started = time.perf_counter()
        fn()
        times.append(1000 * (time.perf_counter() - started))
    sync()
    return statistics.median(times)


def _router_tokens(policy, text: str, length: int) -> list[int] | None:
    """`length` decoder tokens of `text` when the policy's router reads the decoder's tokens, else None."""
    router = getattr(policy, "router", None)
    if not hasattr(router, "route_tokens"):
        return None
    tokens = router.tokenizer(text, add_special_tokens=False)["input_ids"]
    return (tokens * (length // len(tokens) + 1))[:length]


def swap_timing(engine: Engine, base: OmissionSet, targets: dict[int, OmissionSet], prompt: int, repeats: int) -> dict:
    """Memory-budget mode: switching from `base` to sets that differ in n blocks. Reports the host→device copy time
    on its own, and how much the switch adds to the time to first token when the copies overlap pre-fill."""
    clock = Clock(engine.device)
    ids = prompt_ids(prompt, engine.shape.vocab)
    out = {}
    for differ, target in targets.items():
        copy_ms, ttft_switch = [], []
        for _ in range(repeats):
            engine.use(base)
            engine.prefill(ids)
            torch.cuda.synchronize()

            def switch_only():
                engine.use(target)
                for event in engine._events:
                    if event is not None:
                        torch.cuda.current_stream().wait_event(event)

            copy_ms.append(clock.time(switch_only))
            engine.use(base)
            engine.prefill(ids)
            torch.cuda.synchronize()

            def switch_and_prefill():
                engine.use(target)
                engine.prefill(ids).argmax(-1)

            ttft_switch.append(clock.time(switch_and_prefill))
        engine.use(base)
        engine.prefill(ids)
        engine.use(target)
        switched = engine.prefill(ids).clone()  # eager, waiting for the copies
        resident = clock.median(lambda: engine.prefill(ids).argmax(-1), repeats)
        out[differ] = {"copy_ms": statistics.median(copy_ms), "ttft_with_switch_ms": statistics.median(ttft_switch),
                       "ttft_resident_ms": resident,
                       "exposed_ms": statistics.median(ttft_switch) - resident,
                       "blocks_copied": differ,
                       # the pre-fill right after the switch against the graphed one of the resident stack
                       "max_abs_logit_diff": (switched - engine.prefill(ids)).abs().max().item()}
    return out


def graphed(fn: Callable[[], object], device) -> Callable[[], object]:
    """fn as the engine runs its kernels: on a GPU one CUDA graph of it (after warm-up calls on a side stream, where
    compilation and autotuning happen), so that timing it measures the kernels rather than their launch from Python;
    on a CPU fn itself."""
    if torch.device(device).type != "cuda":
        return fn
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def seconds_per_call(step: Callable[[int], object], device, calls: int = 20, replays: int = 10) -> float:
    """Seconds one call of step takes as the engine runs kernels: step(0) .. step(calls - 1) captured together
    (`graphed`: timed from Python, a call would measure its launch), the median of `replays` runs. The index lets a
    benchmark cycle over copies of its weights so that none is served from L2."""
    def steps():
        for i in range(calls):
            step(i)

    return Clock(device).median(graphed(steps, device), replays) / 1000 / calls
