"""Soft labels for router training (PuDDing §5.2, eq. 11).

For every training prompt (the calibration tasks' train splits), the tl of its right answer under every candidate
set. All sets are scored in one pass over the data: they share the blocks they agree on (`Scorer.score_sets`).
The table is stored as Parquet in the bundle: one row per prompt, the label vector as a list column, the sets and
model in the file's metadata.
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


@dataclass
class LabelTable:
    tasks: list[str]  # per row
    indices: list[int]  # document index in its split
    prompts: list[str]  # what the router sees
    labels: np.ndarray  # rows x sets: tl of the right answer under each set (lower is better)
    sets: list[list[int]]
    meta: dict

    def __len__(self) -> int:
        return len(self.prompts)

    def subset(self, rows: np.ndarray) -> LabelTable:
        return LabelTable([self.tasks[i] for i in rows], [self.indices[i] for i in rows],
                          [self.prompts[i] for i in rows], self.labels[rows], self.sets, self.meta)

    def save(self, path: Path) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        from .storage import atomic_write_bytes

        table = pa.table({
            "task": self.tasks,
            "index": self.indices,
            "prompt": self.prompts,
            "tl": pa.array(self.labels.tolist(), type=pa.list_(pa.float32())),
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
        labels = np.array(table.column("tl").to_pylist(), dtype=np.float32)
        sets = meta.pop("sets")
        return cls(table.column("task").to_pylist(), table.column("index").to_pylist(), table.column("prompt").to_pylist(),
                   labels, sets, meta)


def label_prompts(scorer: Scorer, sets: list[OmissionSet], tasks: list[str], limit_per_task: int | None = None,
                  seed: int = 0, data_dir=None, log=None) -> LabelTable:
    """tl of the right answer under every set, for the train prompts of each task (all, or a seeded sample)."""
    names, indices, prompts, rows = [], [], [], []
    for name in tasks:
        task = get_task(name)
        split = task.require_calibration_split()
        docs = task.docs(split, data_dir).docs
        if limit_per_task is not None and limit_per_task < len(docs):
            docs = task.sample(split, limit_per_task, seed, data_dir)[0]
        requests = scorer.encoder.groups([[d.requests[d.gold]] for d in docs])
        prepared = scorer.prepare(requests)
        with progress_bar(f"label {name} x{len(sets)} sets", total=prepared.num_tokens) as advance:
            scores = scorer.score_sets(prepared, sets, advance)
        rows.append(np.stack([s.task_likelihood() for s in scores], axis=1))
        names += [name] * len(docs)
        indices += [d.index for d in docs]
        prompts += [d.prompt for d in docs]
        if log:
            log(f"  {name:14s} {len(docs):6d} prompts labelled")
    return LabelTable(names, indices, prompts, np.concatenate(rows).astype(np.float32), [list(s) for s in sets], {})
