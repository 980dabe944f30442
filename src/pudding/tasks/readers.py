"""Reading raw task files: JSON Lines, JSON arrays or objects, CSV, Arrow IPC streams (alone or inside a zip), text.

A file source is data (a dict from tasks.yaml), so adding a task never means writing a reader:

    file: piqa/hf_arrow/piqa.zip      # relative to the data directory; may be a glob (mmlu/original_csv/test/*.csv)
    member: "*/piqa-train.arrow"      # for zips: which member to read
    columns: [question, A, B, C, D, answer]   # for CSV files without a header row
    keys_from: pubmedqa/test_ground_truth.json  # for JSON objects keyed by id: keep only these keys ...
    exclude_keys_from: ...                      # ... or drop these
    join: {file: ..., fields: {answer: letter}} # a second, row-aligned file: copy its `answer` into `letter`
    transform: hellaswag                        # a named row function from transforms.py
    rows: [0, 1000]                             # only these rows (start, stop), after any join: a split cut from another
"""

from __future__ import annotations

import csv
import fnmatch
import io
import json
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import PuddingError


@dataclass
class RawRows:
    rows: list[dict]
    malformed: int = 0  # lines or rows that could not be parsed and were skipped
    sources: list[str] = field(default_factory=list)


def _arrow_rows(data: bytes | Path) -> list[dict]:
    import pyarrow as pa

    stream = pa.BufferReader(data) if isinstance(data, bytes) else pa.memory_map(str(data))
    try:
        table = pa.ipc.open_stream(stream).read_all()
    except pa.ArrowInvalid:
        stream = pa.BufferReader(data) if isinstance(data, bytes) else pa.memory_map(str(data))
        table = pa.ipc.open_file(stream).read_all()
    return table.to_pylist()


def _jsonl_rows(text: str) -> tuple[list[dict], int]:
    rows, bad = [], 0
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            bad += 1  # e.g. HellaSwag's train copy ends in a truncated line
            continue
        if isinstance(row, dict):
            rows.append(row)
        else:
            bad += 1
    return rows, bad


def _json_rows(text: str, spec: dict, data_dir: Path) -> list[dict]:
    data = json.loads(text)
    if isinstance(data, list):
        return data
    if isinstance(data, dict):  # an object keyed by id (PubMedQA): one row per key, the key kept as `id`
        keys = list(data)
        if "keys_from" in spec:
            wanted = json.loads(_resolve_one(data_dir, spec["keys_from"]).read_text())
            keys = [k for k in wanted if k in data]
        if "exclude_keys_from" in spec:
            unwanted = set(json.loads(_resolve_one(data_dir, spec["exclude_keys_from"]).read_text()))
            keys = [k for k in keys if k not in unwanted]
        return [{"id": k, **data[k]} for k in keys]
    raise PuddingError("unexpected JSON layout")


def _csv_rows(text: str, columns: list[str] | None) -> tuple[list[dict], int]:
    reader = csv.reader(io.StringIO(text))
    rows, bad = [], 0
    header = columns
    for record in reader:
        if header is None:
            header = record
            continue
        if len(record) != len(header):
            bad += 1
            continue
        rows.append(dict(zip(header, record)))
    return rows, bad


def _expand(data_dir: Path, pattern: str) -> list[Path]:
    """The paths a file name or glob in tasks.yaml stands for (a plain name: that one path, existing or not)."""
    return sorted(data_dir.glob(pattern)) if any(ch in pattern for ch in "*?[") else [data_dir / pattern]


def _resolve(data_dir: Path, pattern: str) -> list[Path]:
    paths = _expand(data_dir, pattern)
    missing = [p for p in paths if not p.exists()]
    if not paths or missing:
        shown = missing[0] if missing else data_dir / pattern
        raise PuddingError(f"data file not found: {shown} (is the data directory right?)")
    return paths


def source_files(spec: dict, data_dir: Path) -> list[Path]:
    """Every existing file a split reads (its file or glob, key lists, joined file)."""
    patterns = [spec["file"], spec.get("keys_from"), spec.get("exclude_keys_from"), spec.get("join", {}).get("file")]
    found = []
    for pattern in filter(None, patterns):
        found += [p for p in _expand(data_dir, pattern) if p.is_file()]
    return found


def _resolve_one(data_dir: Path, pattern: str) -> Path:
    return _resolve(data_dir, pattern)[0]


def _read_one(path: Path, spec: dict, data_dir: Path) -> tuple[list[dict], int]:
    suffix = path.suffix
    if suffix == ".zip":
        member_pattern = spec.get("member")
        with zipfile.ZipFile(path) as archive:
            names = [n for n in archive.namelist() if member_pattern and fnmatch.fnmatch(n, member_pattern)]
            if len(names) != 1:
                raise PuddingError(f"{path}: expected one member matching '{member_pattern}', found {len(names)}")
            return _arrow_rows(archive.read(names[0])), 0
    if suffix == ".arrow":
        return _arrow_rows(path), 0
    text = path.read_text(encoding="utf-8")
    if suffix == ".jsonl":
        return _jsonl_rows(text)
    if suffix == ".json":
        return _json_rows(text, spec, data_dir), 0
    if suffix == ".csv":
        return _csv_rows(text, spec.get("columns"))
    if suffix in (".raw", ".txt"):
        return [{"text": text}], 0
    raise PuddingError(f"{path}: no reader for '{suffix}' files")


def read_rows(spec: dict, data_dir: Path) -> RawRows:
    """All rows of one split; each row also gets `source_file` (the file's stem), useful for MMLU's subject."""
    out = RawRows([])
    for path in _resolve(data_dir, spec["file"]):
        try:
            rows, bad = _read_one(path, spec, data_dir)
        except (UnicodeDecodeError, json.JSONDecodeError, csv.Error, zipfile.BadZipFile, OSError, ValueError) as err:
            # ValueError covers pyarrow's ArrowInvalid (a truncated or damaged Arrow stream)
            raise PuddingError(f"cannot read {path}: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}") from None
        for row in rows:
            row.setdefault("source_file", path.stem)
        out.rows.extend(rows)
        out.malformed += bad
        out.sources.append(str(path.relative_to(data_dir)))
    if "join" in spec:
        _join_rows(out, spec["join"], data_dir)
    if "rows" in spec:
        start, stop = spec["rows"]
        out.rows = out.rows[start:stop]
    return out


def _join_rows(out: RawRows, join: dict, data_dir: Path) -> None:
    other = read_rows({k: v for k, v in join.items() if k != "fields"}, data_dir)
    if len(other.rows) != len(out.rows):
        raise PuddingError(f"{join['file']} has {len(other.rows)} rows, expected {len(out.rows)} to join row by row")
    for row, extra in zip(out.rows, other.rows):
        for source_field, target_field in join["fields"].items():
            row[target_field] = extra.get(source_field)
    out.sources.extend(other.sources)
