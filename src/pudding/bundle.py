"""A bundle: everything PuDDing learns about one model, in one directory.

    bundle.json          which model (name, fingerprint, depth), k, how it was made
    candidates.json      the pool of candidate omission sets, each with the searches that produced it
    searches/            one search result per (task, loss), plus checkpoints while a search runs
    baselines/           static baselines (sleb, shortened-ppl, shortgpt) for the same model and k
    labels.parquet       soft labels for router training (made by `pudding label`)
    router/              the trained router (made by `pudding train-router`); router-NAME/: other routers
    heldout.json         held-out training prompts scored under every set, for choosing the deployed policy
    policy.json          the deployed policy (the default wherever the bundle is used) and the evidence for it
    evals/, report.md    evaluations and the report (made by `pudding eval`, `pudding pipeline`)
    checksums.json       sha256 of every file written through the bundle, checked whenever the bundle is opened

bundle.json also records the versions of the software and of the task data (a hash per task) that made it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from .errors import PuddingError
from .omission import OmissionSet
from .storage import (
    atomic_write_json, atomic_write_text, environment, json_text, read_json, remove_partial, sha256_file,
)

FORMAT = "pudding-bundle/1"
PACKED_MODEL = "model"  # the subdirectory of a pack (`pudding pack`) that holds the decoder the bundle was made for
CHECKSUMS = "checksums.json"
MAIN_ROUTER = "router"  # the paper's router; others are router-NAME/


@dataclass
class CandidateSet:
    blocks: list[int]
    sources: list[dict]  # {"task", "loss", "search"} for every search that found this set

    def label(self) -> str:
        return ",".join(map(str, self.blocks))


class Bundle:
    def __init__(self, path: Path, manifest: dict) -> None:
        self.path = Path(path).absolute()  # absolute: files inside are named relative to it
        self.manifest = manifest

    # -- creating and opening -------------------------------------------------------------------------------------

    @classmethod
    def create_or_open(cls, path: Path, model: dict, k: int, settings: dict) -> Bundle:
        path = Path(path)
        if (path / "bundle.json").exists():
            bundle = cls.open(path)
            bundle.check_model(model)
            if bundle.k != k:
                raise PuddingError(f"bundle {path} was made for k = {bundle.k} blocks, not {k}: choose another directory")
            return bundle
        if path.exists() and any(path.iterdir()):
            raise PuddingError(f"{path} exists and is not a pudding bundle: choose an empty or new directory")
        manifest = {
            "format": FORMAT,
            "model": {k_: model[k_] for k_ in ("name", "fingerprint", "num_blocks")},
            "k": k,
            "settings": settings,
            "versions": environment(),
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise PuddingError(f"cannot create bundle directory {path}: {err.strerror}") from None
        bundle = cls(path, manifest)
        bundle.write_json("bundle.json", manifest)
        return bundle

    @classmethod
    def open(cls, path: Path) -> Bundle:
        path = Path(path)
        if not path.is_dir():
            raise PuddingError(f"bundle directory not found: {path}")
        if not (path / "bundle.json").exists():
            raise PuddingError(f"{path} is not a pudding bundle (no bundle.json): make one with `pudding candidates`")
        manifest = read_json(path / "bundle.json", "bundle manifest")
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            raise PuddingError(f"{path}/bundle.json is not a {FORMAT} manifest")
        bundle = cls(path, manifest)
        bundle.verify()
        return bundle

    # -- integrity: every file written through the bundle has its sha256 in checksums.json --------------------

    def _checksums(self) -> dict[str, str | None]:
        path = self.path / CHECKSUMS
        if not path.exists():
            return {}
        data = read_json(path, "bundle checksums")
        if not isinstance(data, dict) or not isinstance(data.get("files"), dict):
            raise PuddingError(f"{path} is damaged: restore it or delete it (the bundle's files are then no longer checked)")
        return data["files"]

    def verify(self) -> None:
        """Refuse a bundle whose files were truncated or edited after they were written. A deleted file is allowed
        (deleting a result is how one asks for it to be made again); whatever needs it then says it is missing."""
        for name, expected in self._checksums().items():
            file = self.path / name
            if expected is not None and file.is_file() and sha256_file(file) != expected:
                raise PuddingError(f"bundle {self.path} is damaged: {name} was changed or truncated after it was written "
                                   f"(sha256 differs from {CHECKSUMS}); restore it, or delete it and rerun the command that made it")

    def _save_checksums(self, checksums: dict, before: dict) -> None:
        if checksums != before:  # a rerun that changes nothing leaves the file alone
            atomic_write_json(self.path / CHECKSUMS, {"algorithm": "sha256", "files": dict(sorted(checksums.items()))})

    @contextlib.contextmanager
    def writing(self, *paths: Path | str) -> Iterator[None]:
        """Around (atomic) writes of files or directories into the bundle: they are marked as being written (None:
        not checked) first and recorded after, so that a crash in between leaves a bundle that opens, holding the
        old or the new version of each file, never one that looks damaged. The checkpoint of the job that made a
        file (`partial_path`) is dropped once the file is recorded: not before, so a crash loses nothing."""
        before = self._checksums()
        pending = dict(before)
        for path in paths:
            name = (self.path / path).relative_to(self.path).as_posix()
            pending.update({n: None for n in before if n == name or n.startswith(name + "/")})
            pending[name] = None
        self._save_checksums(pending, before)
        yield
        self.track(*paths)
        for path in paths:
            remove_partial(self.path / path)

    def track(self, *paths: Path | str) -> None:
        """Record the sha256 of files just written into the bundle (a directory: every file under it, and files
        that used to be under it are forgotten; a path that was not written: forgotten)."""
        before = self._checksums()
        checksums = dict(before)
        for path in paths:
            path = self.path / path
            name = path.relative_to(self.path).as_posix()
            checksums = {n: h for n, h in checksums.items() if n != name and not n.startswith(name + "/")}
            files = sorted(f for f in path.rglob("*") if f.is_file()) if path.is_dir() else [path] if path.is_file() else []
            for file in files:
                checksums[file.relative_to(self.path).as_posix()] = sha256_file(file)
        self._save_checksums(checksums, before)

    def write_json(self, name: Path | str, obj) -> Path:
        """Write a JSON file into the bundle atomically and record its checksum."""
        path = self.path / name
        text = json_text(obj)
        if path.is_file() and path.read_bytes() == text.encode():  # unchanged: a resumed job rewrites nothing
            self.track(path)
            remove_partial(path)
            return path
        with self.writing(path):
            atomic_write_text(path, text)
        return path

    def check_data(self, versions: dict[str, str]) -> None:
        """Refuse task data that differs from what the bundle's results were made with (tasks it never saw pass)."""
        recorded = self.manifest.get("data", {})
        changed = sorted(t for t, v in versions.items() if t in recorded and recorded[t] != v)
        if changed:
            raise PuddingError(f"the task data of {', '.join(changed)} differs from the data bundle {self.path} was made with: "
                               "use that data (--data-dir) or a new bundle")

    def record_data(self, versions: dict[str, str]) -> None:
        """Remember which task data (a hash per task) the bundle's results come from; refuse data that changed."""
        self.check_data(versions)
        recorded = self.manifest.setdefault("data", {})
        if all(t in recorded for t in versions):
            return
        recorded.update(versions)
        self.write_json("bundle.json", self.manifest)

    # -- what it holds ----------------------------------------------------------------------------------------

    @property
    def model(self) -> dict:
        return self.manifest["model"]

    @property
    def k(self) -> int:
        return int(self.manifest["k"])

    def check_model(self, model: dict) -> None:
        if model["fingerprint"] != self.model["fingerprint"]:
            raise PuddingError(
                f"bundle {self.path} was made for model {self.model['name']} (fingerprint {self.model['fingerprint']}), "
                f"not {model['name']} (fingerprint {model['fingerprint']})"
            )

    def model_ref(self, model: str | None = None):
        """The decoder to use the bundle with: `model` if given, else the one packed inside it, else the one it
        names (from the registry); refused unless its fingerprint is the bundle's."""
        from .models import resolve_model

        packed = self.path / PACKED_MODEL
        ref = resolve_model(model or (str(packed) if (packed / "config.json").exists() else self.model["name"]))
        self.check_model({"name": ref.name, "fingerprint": ref.fingerprint, "num_blocks": ref.num_blocks})
        return ref

    def search_path(self, task: str, loss: str, seed: int = 0) -> Path:
        suffix = "" if seed == 0 else f"-seed{seed}"
        return self.path / "searches" / f"{task}-{loss}{suffix}.json"

    def baseline_path(self, method: str) -> Path:
        return self.path / "baselines" / f"{method}.json"

    def baseline(self, method: str):
        """A static baseline's search for this bundle's k (cut from a longer one a sweep made), or None."""
        from .search import load_search

        path = self.baseline_path(method)
        return load_search(path).prefix(self.k) if path.exists() else None

    def write_candidates(self, sets: list[CandidateSet], settings: dict) -> None:
        self.write_json("candidates.json", {
            "sets": [{"blocks": s.blocks, "sources": s.sources} for s in sets],
            "settings": settings,
        })

    def has_candidates(self) -> bool:
        return (self.path / "candidates.json").exists()

    def candidates(self) -> list[CandidateSet]:
        path = self.path / "candidates.json"
        if not path.exists():
            raise PuddingError(f"bundle {self.path} has no candidate sets: make them with `pudding candidates`")
        data = read_json(path, "candidate sets")
        try:
            return [CandidateSet(list(s["blocks"]), list(s["sources"])) for s in data["sets"]]
        except (KeyError, TypeError):
            raise PuddingError(f"{path} is not a valid list of candidate sets: make it again with `pudding candidates`") from None

    def omission_sets(self) -> list[OmissionSet]:
        return [OmissionSet(s.blocks, self.model["num_blocks"]) for s in self.candidates()]

    @property
    def labels_path(self) -> Path:
        return self.label_table_path("tl")

    def label_table_path(self, kind: str) -> Path:
        """labels.parquet for the paper's tl labels, labels-KIND.parquet for another kind (labels.LABEL_KINDS)."""
        return self.path / ("labels.parquet" if kind == "tl" else f"labels-{kind}.parquet")

    def router_dir(self, name: str = MAIN_ROUTER, must_exist: bool = False) -> Path:
        """Where a router lives: router/ for the main one, router-NAME/ for the others (the ablations' objectives,
        encoders and label sets)."""
        directory = self.path / (MAIN_ROUTER if name == MAIN_ROUTER else f"{MAIN_ROUTER}-{name}")
        if must_exist and not (directory / "router.json").exists():
            which = "" if name == MAIN_ROUTER else f" named {name}"
            held = self.routers()
            has = f" (it has: {', '.join(held)})" if held else ""
            raise PuddingError(f"bundle {self.path} has no router{which}{has}: make one with `pudding label` then "
                               "`pudding train-router`" + ("" if name == MAIN_ROUTER else f" --objective {name}"))
        return directory

    def routers(self) -> list[str]:
        """Names of the routers the bundle holds, the main one first."""
        found = sorted(p.name[len(MAIN_ROUTER) + 1:] for p in self.path.glob(f"{MAIN_ROUTER}-*") if (p / "router.json").exists())
        return ([MAIN_ROUTER] if (self.router_dir() / "router.json").exists() else []) + found

    def router(self, name: str = MAIN_ROUTER, device: str = "cpu", dtype: str = "auto"):
        """A trained router of the bundle, routing to the bundle's candidate sets (refused if trained on others)."""
        from .router import load_router

        router = load_router(self.router_dir(name, must_exist=True), device, self.model["num_blocks"], dtype)
        if router.sets != self.omission_sets():
            raise PuddingError(f"the router in {self.router_dir(name)} was trained on other sets than the bundle's "
                               "candidates: train it again (`pudding train-router`)")
        return router

    @property
    def policy_path(self) -> Path:
        """The deployed policy and the held-out evidence for it (`selection.py`)."""
        return self.path / "policy.json"

    def omission_set(self, index: int) -> OmissionSet:
        sets = self.omission_sets()
        if not 0 <= index < len(sets):
            raise PuddingError(f"set {index} does not exist: bundle {self.path} has sets 0 to {len(sets) - 1}")
        return sets[index]


def deduplicate(found: list[tuple[list[int], dict]]) -> list[CandidateSet]:
    """One candidate per distinct set, in order of first appearance, remembering every search that found it."""
    sets: dict[tuple[int, ...], CandidateSet] = {}
    for blocks, source in found:
        key = tuple(sorted(blocks))
        if key not in sets:
            sets[key] = CandidateSet(list(key), [])
        sets[key].sources.append(source)
    return list(sets.values())
