"""The end-to-end PuDDing pipeline, stage by stage, every stage's output kept in the bundle.

    candidates   greedy tl/tld searches on the calibration tasks (PuDDing §5.1)
    baselines    static depth pruning: SLEB, Shortened LLaMA (PPL), ShortGPT, for the same k
    static       dense, every baseline and every candidate set on the evaluation tasks, in one pass per task,
                 and the oracles over the pool
    labels       tl of the right answer under every set for the training prompts (§5.2, eq. 11)
    router       encoder + linear head trained on the labels (MSE by default)
    routed       PuDDing: every question routed once, scored under its set
    per-prompt   SLEB per prompt, on the first documents of each task (it runs a search per question)
    report       report.md with the tables, the heatmap of omitted blocks and how often each set is chosen

Each stage writes its results atomically and is skipped when its results exist for the same settings, so an
interrupted pipeline resumes where it stopped. Ablations (number of sets, tl vs perplexity candidates, router
objective) run the same stages in sub-bundles under ablations/.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from .bundle import Bundle, labels_path, router_path
from .errors import PuddingError
from .evaluate import ORACLES, evaluate_sets, evaluate_tasks, per_prompt_policy, results_document
from .labels import LabelTable, label_bundle
from .omission import OmissionSet
from .router import LoadedRouter, RouterSettings, routed_policy, train_bundle_router
from .scoring import Scorer
from .search import BASELINE_CORPUS, SearchSpec, build_pool, load_search, run_search
from .storage import partial_path, read_json
from .tasks import data_versions, get_task, parse_task_list

PAPER_TASKS = ["arc_challenge", "arc_easy", "boolq", "hellaswag", "piqa", "winogrande"]  # Table 2
UNSEEN_TASKS = ["openbookqa", "mathqa", "mmlu", "pubmedqa", "sciq"]  # Table 5
CALIBRATION_TASKS = ["arc_challenge", "arc_easy", "hellaswag", "piqa", "winogrande"]  # BoolQ left out, as the paper
BASELINES = ["sleb", "shortened-ppl", "shortgpt"]


def default_k(num_blocks: int) -> int:
    """20% of the blocks, rounded: the paper's 7 of 32; 6 of 30 for SmolLM2-135M, 5 of 24 for Qwen2.5-0.5B."""
    return max(1, round(0.2 * num_blocks))


@dataclass
class PipelineConfig:
    k: int | None = None
    calibration_tasks: list[str] = field(default_factory=lambda: list(CALIBRATION_TASKS))
    losses: list[str] = field(default_factory=lambda: ["tl", "tld"])
    samples: int = 128  # calibration samples per (task, loss) search, as the paper
    seeds: list[int] = field(default_factory=lambda: [0])  # several seeds: several calibration draws per (task, loss)
    baseline_samples: int = 128  # text windows for SLEB / Shortened LLaMA / ShortGPT
    baseline_seqlen: int = 2048
    eval_tasks: list[str] = field(default_factory=lambda: PAPER_TASKS + UNSEEN_TASKS)
    limit: int | None = None  # evaluation documents per task (None: the full split)
    label_limit: int | None = None  # training prompts per task (None: the whole train split, as the paper)
    router: RouterSettings = field(default_factory=RouterSettings)
    per_prompt_limit: int = 100  # documents per task for SLEB per prompt (0: skip it)

    @classmethod
    def small(cls) -> PipelineConfig:
        """Sizes that finish on 2 CPU cores in about a quarter of an hour (the README's demo)."""
        return cls(samples=2, baseline_samples=2, baseline_seqlen=64, limit=8, label_limit=24,
                   router=RouterSettings(epochs=3, warmup_steps=10, max_length=128), per_prompt_limit=0)


STAGES = ("candidates", "baselines", "static", "labels", "router", "routed", "per-prompt", "report")


class Pipeline:
    def __init__(self, bundle_dir: Path, scorer: Scorer, model_info: dict, config: PipelineConfig, data_dir=None,
                 log=print, device: str = "cpu"):
        self.scorer = scorer
        self.model = model_info
        self.config = config
        self.data_dir = data_dir
        self.log = log
        self.device = device
        if config.k is None:
            config.k = default_k(model_info["num_blocks"])
        parse_task_list(",".join(config.eval_tasks))  # fail early on bad input
        for task in config.calibration_tasks:
            get_task(task).require_calibration_split()
        config.router.validate()
        self.bundle = Bundle.create_or_open(bundle_dir, model_info, config.k, {"pipeline": asdict(config)})
        used = sorted({*config.calibration_tasks, *config.eval_tasks, BASELINE_CORPUS})
        self.bundle.record_data(data_versions(used, data_dir))

    # -- candidates and baselines ----------------------------------------------------------------------------

    def candidates(self) -> None:
        c = self.config
        self.log(f"candidates: {len(c.calibration_tasks)} tasks x {len(c.losses)} losses x {len(c.seeds)} draws, "
                 f"k = {c.k}, {c.samples} samples each")

        def done(spec, result):
            self.log(f"  {spec.task:14s} {spec.loss:4s} seed {spec.seed}  omit {result.blocks}  ({result.seconds:.0f} s)")

        pool = build_pool(self.bundle, self.scorer, self.model, c.calibration_tasks, c.losses, c.samples, c.seeds,
                          self.data_dir, on_done=done)
        self.log(f"  {len(pool)} distinct sets")

    def baselines(self) -> None:
        for method in BASELINES:
            path = self.bundle.baseline_path(method)
            spec = SearchSpec(method, k=self.config.k, samples=self.config.baseline_samples,
                              seqlen=self.config.baseline_seqlen, seed=self.config.seeds[0])
            if path.exists() and load_search(path).settings == asdict(spec):
                continue
            result = run_search(spec, self.scorer, self.model, self.data_dir, partial_path(path))
            self.bundle.write_json(path, result.to_json())  # drops the checkpoint
            self.log(f"baseline {method:14s} omit {result.blocks}  ({result.seconds:.0f} s)")

    # -- evaluations -----------------------------------------------------------------------------------------

    def _eval_path(self, name: str) -> Path:
        return self.bundle.path / "evals" / f"{name}.json"

    def _evaluated(self, name: str, settings: dict) -> bool:
        path = self._eval_path(name)
        return path.exists() and read_json(path, "evaluation").get("settings", {}).get("pipeline") == settings

    def _eval_settings(self, **extra) -> dict:
        return {"tasks": self.config.eval_tasks, "limit": self.config.limit, **extra}

    def _doc_sets(self, tasks) -> dict:
        return {t.name: t.docs(data_dir=self.data_dir) for t in tasks if t.kind == "multiple_choice"}

    def _write_eval(self, name: str, omission: dict, results, settings: dict, seconds: float, **extra) -> dict:
        document = results_document(self.model, omission, results, {"pipeline": settings}, seconds)
        document.update(extra)
        self.bundle.write_json(self._eval_path(name), document)
        average = document["average"]["paper"]
        self.log(f"eval {name:16s} {omission['label']:24s} average {100 * average:.2f}" if average is not None else f"eval {name}")
        return document

    def static_methods(self) -> dict[str, OmissionSet]:
        methods = {"dense": OmissionSet.dense(self.model["num_blocks"])}
        for method in BASELINES:
            if self.bundle.baseline_path(method).exists():
                methods[method] = load_search(self.bundle.baseline_path(method)).omission()
        for i, omit in enumerate(self.bundle.omission_sets()):
            methods[f"set{i}"] = omit
        return methods

    def static(self) -> None:
        """Dense, the baselines and every candidate set, in one pass over each task; also the oracles."""
        methods = self.static_methods()
        settings = self._eval_settings()
        done = all(self._evaluated(n, {**settings, "blocks": list(o)}) for n, o in methods.items())
        if done and all(self._evaluated(o, settings) for o in ORACLES):
            return
        tasks = [t for t in parse_task_list(",".join(self.config.eval_tasks)) if t.kind == "multiple_choice"]
        started = time.perf_counter()
        results = evaluate_sets(self.scorer, tasks, self._doc_sets(tasks), methods, self.config.limit)
        seconds = time.perf_counter() - started
        for name, task_results in results.items():
            omit = methods.get(name)
            if omit is not None:
                self._write_eval(name, {"kind": name, "blocks": list(omit), "label": omit.label()}, task_results,
                                 {**settings, "blocks": list(omit)}, seconds)
            else:
                self._write_eval(name, {"kind": name, "blocks": None, "label": "per question"}, task_results, settings, seconds)

    # -- router --------------------------------------------------------------------------------------------

    def labels(self) -> None:
        path = labels_path(self.bundle)
        sets = self.bundle.omission_sets()
        wanted = {"sets": [list(s) for s in sets], "tasks": self.config.calibration_tasks,
                  "limit_per_task": self.config.label_limit, "seed": self.config.seeds[0]}
        if path.exists():
            table = LabelTable.load(path)
            if {"sets": table.sets, **table.meta.get("settings", {})} == wanted:
                return
        self.log(f"labels: tl of the right answer under {len(sets)} sets")
        label_bundle(self.bundle, self.scorer, self.config.calibration_tasks, self.config.label_limit,
                     self.config.seeds[0], self.data_dir, self.model, self.log)

    def router(self, objective: str | None = None) -> None:
        settings = replace(self.config.router, objective=objective or self.config.router.objective)
        directory = router_path(self.bundle, settings.objective)
        table = LabelTable.load(labels_path(self.bundle))
        if (directory / "router.json").exists():
            previous = read_json(directory / "router.json", "router config")
            if previous["settings"] == asdict(settings) and previous["sets"] == table.sets:
                return
        self.log(f"router: {settings.encoder}, {settings.objective}, {len(table)} prompts, {settings.epochs} epochs")
        train_bundle_router(self.bundle, table, settings, self.device, self.log)

    def routed(self, objective: str | None = None) -> None:
        objective = objective or self.config.router.objective
        name = "pudding" if objective == "mse" else f"pudding-{objective}"
        directory = router_path(self.bundle, objective)
        router_config = read_json(directory / "router.json", "router config")
        settings = self._eval_settings(router=router_config["settings"], trained=router_config["training"])
        if self._evaluated(name, settings):
            return
        router = LoadedRouter(directory, self.device)
        sets = [OmissionSet(s, self.model["num_blocks"]) for s in router.sets]
        if [list(s) for s in sets] != [list(s) for s in self.bundle.omission_sets()]:
            raise PuddingError(f"the router in {directory} was trained on other sets than the bundle's: rerun the router stage")
        timing = {"prompts": 0, "seconds": 0.0, "truncated": 0}

        def count(docs, result):
            timing["prompts"] += len(docs)
            timing["seconds"] += result.seconds
            timing["truncated"] += sum(result.truncated)

        tasks = parse_task_list(",".join(self.config.eval_tasks))
        started = time.perf_counter()
        results = evaluate_tasks(self.scorer, tasks, self._doc_sets(tasks), routed_policy(router, sets, count),
                                 self.config.limit, self.data_dir)
        self._write_eval(name, {"kind": name, "blocks": None, "label": "routed"}, results, settings,
                         time.perf_counter() - started, routing=timing)

    def per_prompt(self) -> None:
        if self.config.per_prompt_limit <= 0:
            return
        limit = min(self.config.per_prompt_limit, self.config.limit or self.config.per_prompt_limit)
        tasks = [t for t in parse_task_list(",".join(self.config.eval_tasks)) if t.name in PAPER_TASKS]
        settings = {"tasks": [t.name for t in tasks], "limit": limit, "k": self.config.k}
        if self._evaluated("sleb-per-prompt", settings):
            return
        self.log(f"SLEB per prompt on the first {limit} documents of {len(tasks)} tasks")
        started = time.perf_counter()
        results = evaluate_tasks(self.scorer, tasks, self._doc_sets(tasks), per_prompt_policy(self.scorer, self.config.k),
                                 limit, self.data_dir)
        self._write_eval("sleb-per-prompt", {"kind": "sleb-per-prompt", "blocks": None, "label": "per prompt"},
                         results, settings, time.perf_counter() - started)

    def report(self) -> None:
        from .report import FIGURES, write_report

        with self.bundle.writing("report.md", *FIGURES):
            path = write_report(self.bundle, self.config)
        self.log(f"report: {path}")

    def run(self, stages: tuple[str, ...] = STAGES) -> None:
        for stage in stages:
            if stage not in STAGES:
                raise PuddingError(f"unknown stage '{stage}' (stages: {', '.join(STAGES)})")
        for stage in stages:
            getattr(self, stage.replace("-", "_"))()


# ------------------------------------------------------------------------------------------------------------------
# Ablations (paper appendix B): sub-bundles that rerun some stages with other settings

ABLATIONS = ("sets-5", "sets-30", "ppl-candidates", "objectives")


def run_ablations(pipeline: Pipeline, which: tuple[str, ...] = ABLATIONS) -> None:
    """Number of candidate sets (Table 9), tl vs perplexity candidates (Tables 10-11), router objective (Table 12)."""
    main = pipeline.config
    variants = {
        "sets-5": replace(main, losses=["tl"]),  # one tl set per task
        "sets-30": replace(main, seeds=[0, 1, 2]),  # three calibration draws per (task, loss)
        "ppl-candidates": replace(main, losses=["ppl"]),  # one perplexity ("batch-ppl") set per task
    }
    for name in which:
        if name not in ABLATIONS:
            raise PuddingError(f"unknown ablation '{name}' (ablations: {', '.join(ABLATIONS)})")
        if name == "objectives":
            for objective in ("ce-soft", "ce-onehot"):
                pipeline.router(objective)
                pipeline.routed(objective)
            continue
        directory = pipeline.bundle.path / "ablations" / name
        sub = Pipeline(directory, pipeline.scorer, pipeline.model, variants[name], pipeline.data_dir,
                       lambda m, n=name: pipeline.log(f"[{n}] {m}"), pipeline.device)
        # searches already made in the main bundle are reused (same settings, same file name)
        for search in (pipeline.bundle.path / "searches").glob("*.json"):
            target = sub.bundle.path / "searches" / search.name
            if not target.exists():
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(search, target)
                sub.bundle.track(target)
        stages = ("candidates", "labels", "router", "routed")
        if name == "ppl-candidates":
            stages = ("candidates", "static", "labels", "router", "routed")
        sub.run(stages)
