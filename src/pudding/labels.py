"""Soft labels for router training (PuDDing §5.2, eq. 11).

For every training prompt (the calibration tasks' train splits), a loss under every candidate set: the paper's tl of
the right answer, or (label kind `margin`) how far the set's pick is from the right answer. All sets are scored in
one pass over the data: they share the blocks they agree on (`Scorer.score_sets`). The table is stored as Parquet in
the bundle: one row per prompt, the label vector as a list column, the sets and model in the file's metadata.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import PuddingError
from .omission import OmissionSet
from .progress import progress_bar
from .scoring import Scorer
from .tasks import get_task

# What a label table can hold per prompt and set (lower is better for both)
LABEL_KINDS = {
    "tl": "tl of the right answer",  # the paper's soft label
    # tl rewards a set that makes the right answer likelier even when it makes a wrong one likelier still; the
    # margin is what accuracy counts: the best wrong answer's score minus the right one's under the task's metric
    # (below zero: answered right), in units of its spread over the task's prompts so that tasks weigh alike
    "margin": "decision margin of the task's metric (best wrong answer minus the right one)",
}


@dataclass
class LabelTable:
    tasks: list[str]  # per row
    indices: list[int]  # document index in its split
    prompts: list[str]  # what the router sees
    labels: np.ndarray  # rows x sets: the label kind's loss under each set (lower is better)
    sets: list[list[int]]
    meta: dict

    @property
    def kind(self) -> str:
        return self.meta.get("label", "tl")

    def __len__(self) -> int:
        return len(self.prompts)

    def subset(self, rows: np.ndarray) -> LabelTable:
        return LabelTable([self.tasks[i] for i in rows], [self.indices[i] for i in rows],
                          [self.prompts[i] for i in rows], self.labels[rows], self.sets, self.meta)

    def digest(self) -> str:
        """Identity of the table's content (prompts, sets and labels), for checkpoints and derived results."""
        import hashlib

        digest = hashlib.sha256(json.dumps([self.prompts, self.sets]).encode())
        digest.update(np.ascontiguousarray(self.labels, dtype=np.float32).tobytes())
        return digest.hexdigest()[:16]

    def save(self, path: Path) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        from .storage import atomic_write_bytes

        table = pa.table({
            "task": self.tasks,
            "index": self.indices,
            "prompt": self.prompts,
            self.kind: pa.array(self.labels.tolist(), type=pa.list_(pa.float32())),
        })
        meta = {"sets": self.sets, **self.meta}
        table = table.replace_schema_metadata({"pudding": json.dumps(meta)})
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink)
        atomic_write_bytes(path, sink.getvalue().to_pybytes())

    @classmethod
    def load(cls, path: Path) -> LabelTable:
        import pyarrow.parquet as pq

        if not path.exists():
            raise PuddingError(f"no labels in {path.parent}: make them with `pudding label --bundle {path.parent}`")
        try:
            table = pq.read_table(path)
            meta = json.loads(table.schema.metadata[b"pudding"])
        except Exception as err:
            raise PuddingError(f"{path} is not a readable label table ({type(err).__name__}): rerun `pudding label`") from None
        labels = np.array(table.column(meta.get("label", "tl")).to_pylist(), dtype=np.float32)
        sets = meta.pop("sets")
        return cls(table.column("task").to_pylist(), table.column("index").to_pylist(), table.column("prompt").to_pylist(),
                   labels, sets, meta)


LABEL_CHUNK = 512  # prompts scored between two checkpoints


def heldout_split(rows: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(training rows, held-out rows) of a label table: a seeded permutation, the first `fraction` held out. The
    router validates on the held-out rows, and the deployed policy is chosen on them (`selection.py`)."""
    order = np.random.default_rng(seed).permutation(rows)
    held = int(round(fraction * rows)) if fraction else 0
    return order[held:], order[:held]




def training_docs(task_name: str, limit_per_task: int | None, seed: int, data_dir) -> list:
    """The train prompts of a task: all of them, or a seeded sample."""
    task = get_task(task_name)
    split = task.require_calibration_split()
    docs = task.docs(split, data_dir).docs
    if limit_per_task is not None and limit_per_task < len(docs):
        docs = task.sample(split, limit_per_task, seed, data_dir)[0]
    return docs


def label_prompts(scorer: Scorer, sets: list[OmissionSet], tasks: list[str], limit_per_task: int | None = None,
                  seed: int = 0, data_dir=None, log=None, checkpoint: Path | None = None,
                  identity: dict | None = None, chunk_size: int = LABEL_CHUNK, kind: str = "tl") -> LabelTable:
    """The `kind` label (LABEL_KINDS) under every set, for the train prompts of each task (all, or a seeded sample).

    Prompts are scored in chunks of `chunk_size`, always the same chunks, so that a run resumed from `checkpoint`
    (the finished chunks, written atomically after each one) gives exactly the labels of an uninterrupted run.
    `identity` (model, data, settings) must match the checkpoint's for it to be resumed.
    """
    from .storage import Checkpoint

    if kind not in LABEL_KINDS:
        raise PuddingError(f"unknown label kind '{kind}' (kinds: {', '.join(LABEL_KINDS)})")
    identity = {**(identity or {}), "sets": [list(s) for s in sets], "tasks": list(tasks),
                "limit_per_task": limit_per_task, "seed": seed, "chunk_size": chunk_size,
                **({"label": kind} if kind != "tl" else {})}
    store = Checkpoint(checkpoint, identity, what="labelling")
    state = store.load()
    finished: list[dict] = state["steps"] if state else []
    if finished and log:
        log(f"  resuming: {len(finished)} chunks already labelled in {checkpoint}")
    names, indices, prompts, rows = [], [], [], []
    position = 0  # chunks seen so far, across tasks
    for name in tasks:
        docs = training_docs(name, limit_per_task, seed, data_dir)
        metric = get_task(name).primary
        task_rows = []
        with progress_bar(f"label {name} x{len(sets)} sets", total=len(docs), unit="prompt") as advance:
            for start in range(0, len(docs), chunk_size):
                chunk = docs[start : start + chunk_size]
                if position < len(finished):
                    labels = np.array(finished[position]["labels"], dtype=np.float64)
                else:
                    labels = label_docs(scorer, sets, chunk, kind, metric)
                    finished.append({"task": name, "indices": [d.index for d in chunk], "labels": labels.tolist()})
                    store.save(finished)
                    if log:
                        log(f"  {name:14s} chunk {position + 1}: {len(chunk)} prompts labelled")
                position += 1
                task_rows.append(labels)
                advance(len(chunk))
        task_labels = np.concatenate(task_rows)
        if kind == "margin":  # the task's spread, so that a task scored in log-likelihood and one per character weigh alike
            task_labels = task_labels / max(float(task_labels.std()), 1e-6)
        rows.append(task_labels)
        names += [name] * len(docs)
        indices += [d.index for d in docs]
        prompts += [d.prompt for d in docs]
        if log:
            log(f"  {name:14s} {len(docs):6d} prompts labelled")
    # the caller removes the checkpoint once the table is saved: a crash in between loses nothing
    meta = {"label": kind} if kind != "tl" else {}
    return LabelTable(names, indices, prompts, np.concatenate(rows).astype(np.float32), [list(s) for s in sets], meta)


def label_bundle(bundle, scorer: Scorer, tasks: list[str], limit_per_task: int | None, seed: int, data_dir,
                 model_info: dict, log=None, chunk_size: int = LABEL_CHUNK, path: Path | None = None,
                 kind: str = "tl") -> LabelTable:
    """Label the train prompts of `tasks` under every candidate set of a bundle and save the table in it (at
    labels.parquet unless `path` says otherwise). Resumable: a checkpoint beside the table holds the finished chunks
    until the table is recorded."""
    import time

    from .storage import partial_path
    from .tasks import data_versions

    bundle.record_data(data_versions(tasks, data_dir))
    path = path or bundle.label_table_path(kind)
    started = time.perf_counter()
    identity = {"model": model_info["fingerprint"], "data": bundle.manifest["data"]}
    table = label_prompts(scorer, bundle.omission_sets(), tasks, limit_per_task, seed, data_dir, log, partial_path(path),
                          identity, chunk_size, kind)
    table.meta = {**table.meta, "settings": {"tasks": list(tasks), "limit_per_task": limit_per_task, "seed": seed}, "model": model_info,
                  "seconds": round(time.perf_counter() - started, 1)}
    with bundle.writing(path):  # drops the checkpoint once the table is recorded
        table.save(path)
    return table


def label_docs(scorer: Scorer, sets: list[OmissionSet], docs: list, kind: str = "tl", metric: str = "acc") -> np.ndarray:
    """docs x sets: each document's label under each set, all sets in one pass. tl scores the right answer only;
    the margin scores every answer and reads them with the task's metric."""
    if kind == "margin":
        from .evaluate import decision_margin, score_docs_under_sets

        scored = score_docs_under_sets(scorer, docs, sets, "margins")
        return np.stack([decision_margin(s, metric) for s in scored], axis=1).astype(np.float64)
    prepared = scorer.prepare(scorer.encoder.groups([[d.requests[d.gold]] for d in docs]))
    scores = scorer.score_sets(prepared, sets)
    return np.stack([s.task_likelihood() for s in scores], axis=1).astype(np.float64)
