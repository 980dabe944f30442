"""The task registry: tasks.yaml turned into documents.

A multiple-choice document is a list of (context, continuation) pairs, one per answer, plus the index of the right
one and the prompt a user would send (what the router sees). Perplexity tasks give raw text instead.
"""

from __future__ import annotations

import functools
import logging
import os
import random
from dataclasses import dataclass, field
from pathlib import Path

import jinja2
import yaml

from ..errors import PuddingError
from .readers import read_rows, source_files
from .transforms import TRANSFORMS

log = logging.getLogger("pudding")

DATA_DIR_ENV = "PUDDING_DATA_DIR"

# The paper's task lists
PAPER_TASKS = ["arc_challenge", "arc_easy", "boolq", "hellaswag", "piqa", "winogrande"]  # Table 2
UNSEEN_TASKS = ["openbookqa", "mathqa", "mmlu", "pubmedqa", "sciq"]  # Table 5
CALIBRATION_TASKS = ["arc_challenge", "arc_easy", "hellaswag", "piqa", "winogrande"]  # BoolQ left out, as the paper
_TARGET_DELIMITER = " "  # lm-evaluation-harness puts one space between context and answer


@dataclass(frozen=True)
class Doc:
    task: str
    split: str
    index: int  # position in its split, before any --limit
    prompt: str  # the question as a user would send it: the router's input
    requests: tuple[tuple[str, str], ...]  # (context, continuation) per answer choice
    gold: int
    choice_texts: tuple[str, ...]  # their character lengths normalise acc_norm, as the harness does


@dataclass
class DocSet:
    task: str
    split: str
    docs: list[Doc]
    skipped: int = 0  # rows that could not be parsed or rendered
    sources: list[str] = field(default_factory=list)


def resolve_data_dir(explicit: str | os.PathLike | None = None) -> Path:
    """--data-dir, else PUDDING_DATA_DIR, else a shared/data folder beside the checkout or the working directory."""
    if explicit:
        candidates, origin = [Path(explicit)], "--data-dir"
    elif os.environ.get(DATA_DIR_ENV):
        candidates, origin = [Path(os.environ[DATA_DIR_ENV])], DATA_DIR_ENV
    else:
        repo = Path(__file__).resolve().parents[3]
        candidates = [Path.cwd() / "../shared/data", Path.cwd() / "shared/data", repo.parent / "shared/data"]
        origin = None
    for path in candidates:
        path = path.expanduser()
        if path.is_dir() and any((path / name).is_dir() for name in task_names()):
            return path.resolve()
    if origin:
        raise PuddingError(f"{origin} points to {candidates[0]}, which holds no task data (expected folders such as arc_easy/, piqa/)")
    raise PuddingError(f"no task data found: pass --data-dir or set {DATA_DIR_ENV} to the folder holding arc_easy/, piqa/, …")


@functools.cache
def _registry() -> dict[str, dict]:
    return yaml.safe_load((Path(__file__).with_name("tasks.yaml")).read_text())


def task_names() -> list[str]:
    return list(_registry())


_ENV = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True, autoescape=False)
_ROW_ERRORS = (KeyError, ValueError, TypeError, IndexError, AttributeError, jinja2.exceptions.UndefinedError)


class Task:
    def __init__(self, name: str, spec: dict) -> None:
        self.name = name
        self.spec = spec
        self.kind: str = spec.get("kind", "multiple_choice")
        self.metrics: list[str] = spec.get("metrics", ["acc"])
        self.primary: str = spec.get("primary", self.metrics[0])
        self.eval_split: str = spec["eval_split"]
        self.calibration_split: str | None = spec.get("calibration_split")
        self.notes: str = spec.get("notes", "")
        if self.kind == "multiple_choice":
            self._description = _ENV.from_string(spec.get("description", ""))
            self._text = _ENV.from_string(spec["text"]) if "text" in spec else None
            self._choices = _ENV.compile_expression(spec["choices"]) if "choices" in spec else None
            self._contexts = _ENV.compile_expression(spec["contexts"]) if "contexts" in spec else None
            self._target = _ENV.from_string(spec["target"]) if "target" in spec else None
            self._gold = _ENV.compile_expression(str(spec["gold"]))
            self._prompt = _ENV.from_string(spec["prompt"]) if "prompt" in spec else None

    @property
    def splits(self) -> list[str]:
        return list(self.spec["splits"])

    def _split_spec(self, split: str) -> dict:
        if split not in self.spec["splits"]:
            raise PuddingError(f"task {self.name} has no '{split}' split (it has: {', '.join(self.splits)})")
        return self.spec["splits"][split]

    def require_calibration_split(self) -> str:
        if not self.calibration_split:
            raise PuddingError(f"task {self.name} has no train split to calibrate on")
        return self.calibration_split

    def docs(self, split: str | None = None, data_dir: Path | None = None) -> DocSet:
        split = split or self.eval_split
        if self.kind != "multiple_choice":
            raise PuddingError(f"task {self.name} is a {self.kind} task, not a multiple-choice one")
        return _load_docs(self.name, split, resolve_data_dir(data_dir))

    def rows(self, split: str | None = None, data_dir: Path | None = None) -> list[dict]:
        """The rows behind a split's documents, transformed, in document order (rows that make no document are
        left out): what another evaluator (the lm-evaluation-harness plugin) reads to see the same documents."""
        split = split or self.eval_split
        data_path = resolve_data_dir(data_dir)
        spec = self._split_spec(split)
        raw = read_rows(spec, data_path).rows
        transform = TRANSFORMS[spec["transform"]] if "transform" in spec else (lambda row: row)
        return [transform(raw[doc.index]) for doc in self.docs(split, data_path).docs]

    def prompt_for(self, row: dict) -> str | None:
        """The router's input for one (transformed) row, or None if the row makes no document."""
        try:
            return self.make_doc(row, "", 0).prompt
        except _ROW_ERRORS:
            return None

    def text(self, split: str | None = None, data_dir: Path | None = None) -> str:
        """The raw text of a perplexity task's split."""
        split = split or self.eval_split
        rows = read_rows(self._split_spec(split), resolve_data_dir(data_dir)).rows
        return "".join(row["text"] for row in rows)

    def make_doc(self, row: dict, split: str, index: int) -> Doc:
        description = self._description.render(row)
        if self._choices is not None:
            context = description + self._text.render(row)
            answers = [str(a) for a in self._choices(**row)]
            requests = tuple((context, _TARGET_DELIMITER + a) for a in answers)
            choice_texts = tuple(answers)
            prompt = self._prompt.render(row) if self._prompt else context
        else:  # partial scoring: options live in the contexts, the continuation is shared
            contexts = [description + str(c) for c in self._contexts(**row)]
            target = _TARGET_DELIMITER + self._target.render(row)
            requests = tuple((c, target) for c in contexts)
            choice_texts = tuple(contexts)
            prompt = self._prompt.render(row) if self._prompt else description
        gold = int(self._gold(**row))
        if len(requests) < 2 or not 0 <= gold < len(requests):
            raise ValueError("needs two or more answers and a gold index among them")
        return Doc(self.name, split, index, prompt, requests, gold, choice_texts)

    def sample(self, split: str, count: int, seed: int, data_dir: Path | None = None) -> tuple[list[Doc], list[int]]:
        """`count` documents drawn without replacement (seeded); also their indices in the split."""
        docs = self.docs(split, data_dir).docs
        if count > len(docs):
            raise PuddingError(f"task {self.name} split {split} has {len(docs)} documents, fewer than the {count} asked for")
        picked = random.Random(seed).sample(range(len(docs)), count)
        return [docs[i] for i in picked], picked


@functools.lru_cache(maxsize=64)
def _load_docs(name: str, split: str, data_dir: Path) -> DocSet:
    task = get_task(name)
    spec = task._split_spec(split)
    raw = read_rows(spec, data_dir)
    transform = TRANSFORMS[spec["transform"]] if "transform" in spec else None
    docs, skipped = [], raw.malformed
    for index, row in enumerate(raw.rows):
        try:
            row = transform(row) if transform else row
            docs.append(task.make_doc(row, split, index))
        except _ROW_ERRORS:
            skipped += 1
    if not docs:
        raise PuddingError(f"task {name} split {split}: no usable documents in {', '.join(raw.sources)}")
    if skipped:  # once per split (this function is cached): they are left out of every result
        log.warning("%s: %d rows of its %s split could not be read and are left out", name, skipped, split)
    return DocSet(name, split, docs, skipped, raw.sources)


@functools.cache
def get_task(name: str) -> Task:
    registry = _registry()
    if name not in registry:
        raise PuddingError(f"unknown task '{name}' (known: {', '.join(registry)})")
    return Task(name, registry[name])


def data_versions(names: list[str], data_dir: Path | None = None) -> dict[str, str]:
    """Per task, a hash of the data files it reads (every split): which data a result was made from."""
    from ..storage import sha256_files

    root = resolve_data_dir(data_dir)
    versions = {}
    for name in names:
        task = get_task(name)
        files = sorted({f for split in task.splits for f in source_files(task._split_spec(split), root)})
        versions[name] = sha256_files(files)[:16]
    return versions


def parse_task_list(text: str) -> list[Task]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise PuddingError("no tasks given")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise PuddingError(f"task '{repeated[0]}' is listed twice")
    return [get_task(n) for n in names]
