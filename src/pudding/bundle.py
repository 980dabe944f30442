"""A bundle: everything PuDDing learns about one model, in one directory.

    bundle.json          which model (name, fingerprint, depth), k, how it was made
    candidates.json      the pool of candidate omission sets, each with the searches that produced it
    searches/            one search result per (task, loss), plus checkpoints while a search runs
    baselines/           static baselines (sleb, shortened-ppl, shortgpt) for the same model and k
    labels.parquet       soft labels for router training (made by `pudding label`)
    router/              the trained router (made by `pudding train-router`)
    evals/, report.md    evaluations and the report (made by `pudding eval`, `pudding pipeline`)
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from .errors import PuddingError
from .omission import OmissionSet
from .storage import atomic_write_json, read_json

FORMAT = "pudding-bundle/1"


@dataclass
class CandidateSet:
    blocks: list[int]
    sources: list[dict]  # {"task", "loss", "search"} for every search that found this set

    def label(self) -> str:
        return ",".join(map(str, self.blocks))


class Bundle:
    def __init__(self, path: Path, manifest: dict) -> None:
        self.path = Path(path)
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
        from .evaluate import environment

        manifest = {
            "format": FORMAT,
            "model": {k_: model[k_] for k_ in ("name", "fingerprint", "num_blocks")},
            "k": k,
            "settings": settings,
            "versions": environment(),
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        path.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path / "bundle.json", manifest)
        return cls(path, manifest)

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
        return cls(path, manifest)

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

    def search_path(self, task: str, loss: str, seed: int = 0) -> Path:
        suffix = "" if seed == 0 else f"-seed{seed}"
        return self.path / "searches" / f"{task}-{loss}{suffix}.json"

    def baseline_path(self, method: str) -> Path:
        return self.path / "baselines" / f"{method}.json"

    def write_candidates(self, sets: list[CandidateSet], settings: dict) -> None:
        atomic_write_json(self.path / "candidates.json", {
            "sets": [{"blocks": s.blocks, "sources": s.sources} for s in sets],
            "settings": settings,
        })

    def candidates(self) -> list[CandidateSet]:
        path = self.path / "candidates.json"
        if not path.exists():
            raise PuddingError(f"bundle {self.path} has no candidate sets: make them with `pudding candidates`")
        data = read_json(path, "candidate sets")
        return [CandidateSet(list(s["blocks"]), list(s["sources"])) for s in data["sets"]]

    def omission_sets(self) -> list[OmissionSet]:
        return [OmissionSet(s.blocks, self.model["num_blocks"]) for s in self.candidates()]

    def omission_set(self, index: int) -> OmissionSet:
        sets = self.omission_sets()
        if not 0 <= index < len(sets):
            raise PuddingError(f"set {index} does not exist: bundle {self.path} has sets 0 to {len(sets) - 1}")
        return sets[index]


def labels_path(bundle: "Bundle") -> Path:
    return bundle.path / "labels.parquet"


def router_path(bundle: "Bundle", objective: str = "mse") -> Path:
    return bundle.path / ("router" if objective == "mse" else f"router-{objective}")


def deduplicate(found: list[tuple[list[int], dict]]) -> list[CandidateSet]:
    """One candidate per distinct set, in order of first appearance, remembering every search that found it."""
    sets: dict[tuple[int, ...], CandidateSet] = {}
    for blocks, source in found:
        key = tuple(sorted(blocks))
        if key not in sets:
            sets[key] = CandidateSet(list(key), [])
        sets[key].sources.append(source)
    return list(sets.values())
