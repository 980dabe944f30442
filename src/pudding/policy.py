"""Which blocks run for a prompt: the one place where that is decided.

Whatever the user asked for — `--omit`, a bundle's `--set`, a static `--method`, a search result, SLEB per prompt,
a bundle's router, or (the default with a bundle) the bundle's deployed choice — becomes one `PolicySpec`, checked
before any heavy work, and then one `Policy`. Every entry point (eval, pipeline, the lm-eval model, serve, generate,
bench) asks the policy for a `Choice` per prompt and hands the chosen `OmissionSet` down; the layers below (scorer,
engine) never route.

A policy knows whether it is fixed (the same set for every prompt), describes itself for result files, and keeps
its own routing statistics (prompts routed, time spent, prompts the router had to truncate).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .bundle import MAIN_ROUTER
from .errors import PuddingError
from .omission import OmissionSet

BASELINE_METHODS = ("sleb", "shortened-ppl", "shortgpt")
CLI_NAMES = {"omit": "--omit", "set": "--set", "method": "--method", "search": "--search",
             "per_prompt": "--sleb-per-prompt", "bundle": "--bundle"}


@dataclass(frozen=True)
class Choice:
    """The set chosen for one prompt, and how."""

    omit: OmissionSet
    index: int | None = None  # its number among the policy's sets (a bundle's candidate sets), if it is one of them
    routed: bool = False  # chosen by a router for this prompt (not fixed, not forced)
    ms: float = 0.0  # time spent choosing (routing), part of the time to first token


@dataclass
class Pending:
    """A choice the engine asks for only once it has started on the prompt: every set the policy can choose keeps
    the first `shared` blocks, so those pre-fill while the policy chooses (a router runs on its own stream), and the
    router's time hides behind them instead of adding to the time to first token (on GPUs the engine may pre-fill
    more: the leading blocks of the stack it expects, `Engine.start`)."""

    shared: int
    decide: Callable[[], Choice]
    _choice: Choice | None = None

    def result(self) -> Choice:
        if self._choice is None:
            self._choice = self.decide()
        return self._choice


def decided(chosen: Choice | Pending) -> Choice:
    """The choice itself, made now if it was pending."""
    return chosen.result() if isinstance(chosen, Pending) else chosen


def shared_blocks(sets: Sequence[OmissionSet]) -> int:
    """How many leading blocks every one of these sets keeps (the blocks before the first one any of them omits)."""
    if not sets:
        return 0
    return min(min(s) if len(s) else s.num_blocks for s in sets)


@dataclass
class RoutingStats:
    prompts: int = 0
    seconds: float = 0.0
    truncated: int = 0  # prompts longer than the router reads

    def to_json(self) -> dict:
        return {"prompts": self.prompts, "seconds": self.seconds, "truncated": self.truncated}


class Policy:
    """Chooses an omission set per prompt. `sets` are the numbered sets it can name (empty for plain blocks)."""

    kind: str = "static"
    label: str = ""

    def __init__(self, num_blocks: int, sets: Sequence[OmissionSet] = ()) -> None:
        self.num_blocks = num_blocks
        self.sets = list(sets)
        self.stats = RoutingStats()

    def choose(self, prompts: Sequence[str]) -> list[Choice]:
        raise NotImplementedError

    def choose_one(self, prompt: str) -> Choice:
        return self.choose([prompt])[0]

    def pending(self, prompt: str, tokens: Sequence[int] | None = None) -> Pending:
        """The choice for one prompt, made when the engine asks for it (`Engine.stream`): a policy whose choice
        depends on the prompt lets the blocks all its sets keep pre-fill meanwhile. `tokens`: the decoder
        tokenizer's ids of exactly `prompt` (no special tokens), when the caller has them (a router that reads the
        decoder's tokens then skips tokenizing again)."""
        return Pending(self.shared, lambda: self.choose_one(prompt))

    @property
    def shared(self) -> int:
        """How many leading blocks pre-fill while this policy chooses: those every set it can choose keeps (none
        for a fixed policy, which has nothing to choose)."""
        return 0 if self.fixed is not None else shared_blocks(self.sets)

    @property
    def fixed(self) -> OmissionSet | None:
        """The set every prompt gets, or None when the set depends on the prompt."""
        return None

    def describe(self) -> dict:
        """What result files record about how blocks were chosen."""
        fixed = self.fixed
        return {"kind": self.kind, "blocks": None if fixed is None else list(fixed), "label": self.label}

    def index_of(self, omit: OmissionSet) -> int | None:
        return self.sets.index(omit) if omit in self.sets else None

    def forced(self, omit: OmissionSet) -> Choice:
        """A set the caller imposes for one prompt (a request's `pudding` field), numbered if it is one of ours."""
        return Choice(omit, self.index_of(omit))

    def warm_up(self) -> None:
        """Get ready to choose fast (a router captures its graphs); nothing for most policies."""

    def sets_to_prepare(self) -> list[OmissionSet]:
        """The sets an engine should get ready (compile, capture) before the first prompt."""
        return [self.fixed] if self.fixed is not None else list(self.sets)


class FixedPolicy(Policy):
    """The same set for every prompt: dense, `--omit`, a bundle's set, a baseline, a search result."""

    def __init__(self, omit: OmissionSet, kind: str = "static", sets: Sequence[OmissionSet] = ()) -> None:
        super().__init__(omit.num_blocks, sets)
        self.omit = omit
        self.kind = kind
        self.label = omit.label()
        self._choice = Choice(omit, self.index_of(omit))

    def choose(self, prompts: Sequence[str]) -> list[Choice]:
        return [self._choice] * len(prompts)

    @property
    def fixed(self) -> OmissionSet:
        return self.omit


class RoutedPolicy(Policy):
    """PuDDing: a trained router reads each prompt once and picks the set with the lowest predicted loss."""

    kind, label = "pudding", "routed"

    def __init__(self, router, kind: str = "pudding", gate: tuple[int, float] | None = None) -> None:
        super().__init__(router.sets[0].num_blocks, router.sets)
        self.router = router
        self.kind = kind
        self.gate = gate  # (default set, margin): leave the default only for a predicted gain above the margin
        if gate is not None:
            self.label = f"gated router (default set {gate[0]}, margin {gate[1]:.4g})"

    def predict(self, prompts: list[str]) -> tuple[np.ndarray, list[bool], float]:
        """Predicted loss of every set per prompt (lower is better), which prompts were truncated, seconds spent."""
        result = self.router.route(prompts)
        return result.predicted, result.truncated, result.seconds

    def pick(self, predicted: np.ndarray) -> np.ndarray:
        gate = None if self.gate is None else {"default": self.gate[0], "margin": self.gate[1]}
        return apply_rule({"gate": gate} if gate else {}, predicted)

    def choose(self, prompts: Sequence[str]) -> list[Choice]:
        if not prompts:
            return []
        return self._choices(*self.predict(list(prompts)))

    def _choices(self, predicted: np.ndarray, truncated: list[bool], seconds: float) -> list[Choice]:
        self.stats.prompts += len(predicted)
        self.stats.seconds += seconds
        self.stats.truncated += sum(truncated)
        ms = 1000 * seconds / len(predicted)
        return [Choice(self.sets[c], int(c), True, ms) for c in self.pick(predicted)]

    def pending(self, prompt: str, tokens: Sequence[int] | None = None) -> Pending:
        pending = super().pending(prompt)
        if tokens is not None and hasattr(self.router, "route_tokens"):  # a router on the decoder's own tokens
            def from_tokens() -> Choice:
                result = self.router.route_tokens([list(tokens)])
                return self._choices(result.predicted, result.truncated, result.seconds)[0]

            pending.decide = from_tokens
        return pending

    def warm_up(self) -> None:
        self.router.warm_up()

    def explain(self, prompt: str) -> tuple[Choice, list[float], bool]:
        """The choice for one prompt, the predicted loss of every set (lower is better), and whether the prompt was
        longer than the router reads."""
        self.predict([prompt])  # warm-up: the first call pays for allocations
        predicted, truncated, seconds = self.predict([prompt])
        choice = int(self.pick(predicted)[0])
        return Choice(self.sets[choice], choice, True, 1000 * seconds), predicted[0].tolist(), truncated[0]


def gate_choices(predicted: np.ndarray, default: int, margin: float) -> np.ndarray:
    """The lowest predicted set where it beats the default set by more than `margin`, else the default: on small
    models the labels are noisy, and a router that is unsure should not move."""
    best = predicted.argmin(1)
    gain = predicted[:, default] - predicted[np.arange(len(predicted)), best]
    return np.where(gain > margin, best, default)


def neighbour_predictions(queries: np.ndarray, keys: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    """Per query, the mean label vector of its k nearest training prompts (cosine similarity of unit vectors)."""
    k = min(k, len(keys))
    similarity = queries @ keys.T
    nearest = np.argpartition(-similarity, k - 1, axis=1)[:, :k]
    return labels[nearest].mean(1)


class NearestNeighbourPolicy(RoutedPolicy):
    """Routes by the labels of the training prompts most like this one: the mean label vector of its k nearest
    neighbours (cosine, on the router encoder's embeddings). Averaging neighbours denoises the per-prompt labels
    of small models, which a regression head fits poorly."""

    def __init__(self, router, keys: np.ndarray, labels: np.ndarray, k: int, kind: str = "knn",
                 gate: tuple[int, float] | None = None) -> None:
        if not router.embeds:
            raise PuddingError("a nearest-neighbour policy needs a router with prompt embeddings (an encoder's)")
        super().__init__(router, kind, gate)
        self.keys, self.labels, self.k = keys, labels, k
        self.label = f"nearest-neighbour router (k = {k})" + ("" if gate is None else f", {self.label}")

    def predict(self, prompts: list[str]) -> tuple[np.ndarray, list[bool], float]:
        started = time.perf_counter()
        queries, truncated = self.router.embed(prompts)
        return neighbour_predictions(queries, self.keys, self.labels, self.k), truncated, time.perf_counter() - started


def apply_rule(spec: dict, predicted: np.ndarray) -> np.ndarray:
    """The sets a routed policy spec picks from its predictions: the lowest, or gated (see `gate_choices`)."""
    gate = spec.get("gate")
    return predicted.argmin(1) if gate is None else gate_choices(predicted, gate["default"], gate["margin"])


def policy_from_spec(spec: dict, router, neighbour_labels: np.ndarray | None = None, keys: np.ndarray | None = None,
                     kind: str = "deployed") -> Policy:
    """A policy from its description in policy.json: {"static": i}, or {"router": NAME} with optional "knn": k and
    "gate": {"default": i, "margin": m}. `router` is the named router, loaded; a nearest-neighbour policy also needs
    the training prompts' embeddings (`keys`) and labels."""
    gate = (spec["gate"]["default"], spec["gate"]["margin"]) if "gate" in spec else None
    if "knn" in spec:
        return NearestNeighbourPolicy(router, keys, neighbour_labels, spec["knn"], kind, gate)
    return RoutedPolicy(router, kind, gate)


NEIGHBOURS_FILE = "neighbours-{name}.safetensors"


def save_neighbours(bundle, name: str, keys: np.ndarray, labels: np.ndarray) -> None:
    """The training prompts' embeddings and labels a nearest-neighbour policy routes with, kept in the bundle."""
    import torch
    from safetensors.torch import save

    from .storage import atomic_write_bytes

    path = bundle.path / NEIGHBOURS_FILE.format(name=name)
    tensors = {"keys": torch.from_numpy(np.ascontiguousarray(keys, dtype=np.float16)),
               "labels": torch.from_numpy(np.ascontiguousarray(labels, dtype=np.float32))}
    with bundle.writing(path):
        atomic_write_bytes(path, save(tensors))


def load_neighbours(bundle, name: str) -> tuple[np.ndarray, np.ndarray]:
    from safetensors.torch import load_file

    path = bundle.path / NEIGHBOURS_FILE.format(name=name)
    if not path.exists():
        raise PuddingError(f"bundle {bundle.path} deploys a nearest-neighbour router but has no {path.name}: rerun the "
                           "pipeline's select stage")
    tensors = load_file(str(path))
    return tensors["keys"].float().numpy(), tensors["labels"].numpy()


def deployed_policy(bundle, device: str = "cpu") -> Policy:
    """The policy a bundle deploys (policy.json, chosen on held-out prompts by `selection.py`)."""
    from .storage import read_json

    record = read_json(bundle.policy_path, "policy choice")
    spec = record["deployed"]
    if "static" in spec:
        return FixedPolicy(bundle.omission_set(spec["static"]), "deployed", bundle.omission_sets())
    router = bundle.router(spec["router"], device)
    keys, labels = load_neighbours(bundle, spec["router"]) if "knn" in spec else (None, None)
    policy = policy_from_spec(spec, router, labels, keys)
    policy.label = f"deployed: {record['name']}" + ("" if policy.label == "routed" else f" ({policy.label})")
    return policy


class PerPromptPolicy(Policy):
    """The paper's "SLEB per prompt": a greedy perplexity search on each prompt alone (one search per question)."""

    kind, label = "sleb-per-prompt", "per prompt"

    def __init__(self, scorer, k: int) -> None:
        super().__init__(scorer.decoder.num_blocks)
        self.scorer = scorer
        self.k = k

    def choose(self, prompts: Sequence[str]) -> list[Choice]:
        from .search import per_prompt_search

        started = time.perf_counter()
        sets = per_prompt_search(self.scorer, [self.scorer.encoder.text(p) for p in prompts], self.k)
        self.stats.prompts += len(prompts)
        self.stats.seconds += time.perf_counter() - started
        return [Choice(s, routed=True) for s in sets]


# ------------------------------------------------------------------------------------------------------------------
# From what the user asked for to a policy


@dataclass(frozen=True)
class PolicySpec:
    """What the user asked for; at most one field set. None of them: with a bundle, the policy it deploys
    (policy.json; its main router for bundles made before policies were chosen); without, the dense model."""

    omit: str | Sequence[int] | None = None  # blocks to skip for every prompt ("11,17,20" or a list)
    set: int | None = None  # a bundle's candidate set
    method: str | None = None  # a bundle's static baseline (sleb, shortened-ppl, shortgpt)
    search: Path | None = None  # the set of a `pudding search` result
    per_prompt: bool = False  # SLEB per prompt
    router: str | None = None  # a router of the bundle by name ("router": the paper's), instead of the deployed policy
    # How the caller's users spell these (command-line options by default), for messages
    names: dict = field(default_factory=lambda: dict(CLI_NAMES), compare=False)

    def chosen(self) -> list[str]:
        given = [n for n in CLI_NAMES if n != "bundle" and getattr(self, n) is not None and getattr(self, n) is not False]
        return [self.names.get(n, n) for n in given]

    @property
    def routed(self) -> bool:
        return not self.chosen()

    def check_options(self, with_bundle: bool) -> None:
        """Refuse contradictory requests, from the options alone."""
        chosen = self.chosen()
        if len(chosen) > 1:
            raise PuddingError(f"give only one of {', '.join(chosen)}")
        if not with_bundle and (self.set is not None or self.method is not None):
            option = self.names["set" if self.set is not None else "method"]
            raise PuddingError(f"{option} needs {self.names['bundle']}")
        if self.set is not None and (isinstance(self.set, bool) or not isinstance(self.set, int)):
            raise PuddingError(f"a set is given by its index (0-based), not {self.set!r}")
        if self.method is not None and self.method not in BASELINE_METHODS:
            raise PuddingError(f"unknown baseline '{self.method}' (use {', '.join(BASELINE_METHODS)})")

    def check(self, bundle=None, num_blocks: int | None = None) -> None:
        """Refuse contradictory or impossible requests before any model is loaded."""
        self.check_options(bundle is not None)
        if self.set is not None:
            bundle.omission_set(self.set)
        if isinstance(self.omit, str) and not self.omit.strip():
            raise PuddingError(f"{self.names['omit']} is empty: give the blocks to skip (e.g. 11,17,20), or leave it "
                               "out for the dense model")
        if self.omit is not None and num_blocks is not None:
            parse_blocks(self.omit, num_blocks)
        if not self.routed or bundle is None:
            return
        if self.router is None and bundle.policy_path.exists():
            return
        bundle.router_dir(self.router or MAIN_ROUTER, must_exist=True)

    def build(self, num_blocks: int, bundle=None, device: str = "cpu", scorer=None, model_info: dict | None = None,
              data_dir=None) -> Policy:
        """The policy. A baseline missing from the bundle is searched now (it needs `scorer`) and kept in the bundle;
        SLEB per prompt needs `scorer` too."""
        self.check(bundle, num_blocks)
        sets = bundle.omission_sets() if bundle is not None and bundle.has_candidates() else []
        if self.omit is not None:
            return FixedPolicy(parse_blocks(self.omit, num_blocks), "static", sets)
        if self.set is not None:
            return FixedPolicy(bundle.omission_set(self.set), f"bundle set {self.set}", sets)
        if self.search is not None:
            from .search import load_search

            searched = load_search(self.search)
            if model_info is not None and searched.model["fingerprint"] != model_info["fingerprint"]:
                raise PuddingError(f"{self.search} was searched on another model ({searched.model['name']}, "
                                   f"fingerprint {searched.model['fingerprint']})")
            return FixedPolicy(searched.omission(), f"search {searched.method}", sets)
        if self.method is not None:
            return FixedPolicy(baseline_set(bundle, self.method, scorer, model_info, data_dir), f"baseline {self.method}", sets)
        if self.per_prompt:
            if scorer is None:
                raise PuddingError("SLEB per prompt needs the model loaded for scoring")
            from .search import default_k

            return PerPromptPolicy(scorer, bundle.k if bundle is not None else default_k(num_blocks))
        if bundle is None:
            return FixedPolicy(OmissionSet.dense(num_blocks), "static")
        if self.router is None and bundle.policy_path.exists():
            return deployed_policy(bundle, device)
        return RoutedPolicy(bundle.router(self.router or MAIN_ROUTER, device), "pudding")


def parse_blocks(omit: str | Sequence[int], num_blocks: int) -> OmissionSet:
    if isinstance(omit, OmissionSet):
        return omit
    if isinstance(omit, str):
        return OmissionSet.parse(omit, num_blocks)
    return OmissionSet(list(omit), num_blocks)


def baseline_set(bundle, method: str, scorer, model_info: dict | None, data_dir) -> OmissionSet:
    """A static baseline's set for the bundle's k: read from the bundle, or searched once and kept there."""
    from .search import SearchSpec, run_search

    found = bundle.baseline(method)
    if found is not None:
        return found.omission()
    path = bundle.baseline_path(method)
    if scorer is None:
        raise PuddingError(f"bundle {bundle.path} has no {method} baseline yet: run `pudding eval --bundle ... --method {method}`")
    result = run_search(SearchSpec(method, k=bundle.k), scorer, model_info, data_dir)
    bundle.write_json(path, result.to_json())
    return result.omission()
