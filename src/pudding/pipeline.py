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
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from .bundle import MAIN_ROUTER, Bundle, CandidateSet, deduplicate
from .errors import PuddingError
from .evaluate import ORACLES, evaluate_sets, evaluate_tasks, oracle_description, results_document
from .labels import LABEL_KINDS, LabelTable, heldout_split, label_bundle
from .omission import OmissionSet
from .policy import (
    BASELINE_METHODS, FixedPolicy, PerPromptPolicy, RoutedPolicy, apply_rule, deployed_policy, neighbour_predictions,
    policy_from_spec, save_neighbours,
)
from .router import RouterSettings
from .router_training import train_bundle_router
from .scoring import Scorer
from .lora import TABLE4_GROUPS, AdapterStore, LoraRecipe, bundle_sets, train_bundle_adapters
from .report import FIGURES, write_report
from .selection import (
    HeldOut, choose_deployed, fair_best_static, lookup_results, neighbour_candidates, routed_candidates, score_heldout,
    static_candidates,
)
from .search import BASELINE_CORPUS, SearchSpec, default_k, load_search, run_search
from .storage import partial_path, read_json
from .tasks import CALIBRATION_TASKS, PAPER_TASKS, UNSEEN_TASKS, data_versions, get_task, parse_task_list

BASELINES = list(BASELINE_METHODS)


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
    variants: list[str] = field(default_factory=list)  # other routers to train and compare (ROUTER_VARIANTS)
    lora: LoraRecipe | None = None  # LoRA per set (paper Table 4): off unless given (`pipeline --lora`)

    @classmethod
    def small(cls) -> PipelineConfig:
        """Sizes that finish on 2 CPU cores in about a quarter of an hour (the README's demo)."""
        return cls(samples=2, baseline_samples=2, baseline_seqlen=64, limit=8, label_limit=24,
                   router=RouterSettings(epochs=3, warmup_steps=10, max_length=128), per_prompt_limit=0)


STAGES = ("candidates", "baselines", "static", "labels", "heldout", "router", "routed", "variants", "select", "deployed",
          "per-prompt", "lora", "report")

# Routers besides the paper's, trained on the same bundle: what each changes in the main router's settings
ROUTER_VARIANTS = {
    "ce-soft": {"objective": "ce-soft"},  # paper Table 12
    "ce-onehot": {"objective": "ce-onehot"},
    "mpnet": {"encoder": "mpnet-base"},  # BERT-base size, as the paper
    "nocap": {"labels": "all"},  # every training prompt labelled (no per-task cap), as many steps as the main router
    "margin": {"labels": "margin"},  # labels that count what accuracy counts (labels.LABEL_KINDS), same prompts
    "embeddings": {"encoder": "embeddings"},  # no encoder: the decoder's own input embeddings, a ridge head
}


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
            if get_task(task).kind != "multiple_choice":  # before any work: tl and tld score answers
                raise PuddingError(f"calibration task {task} is a text corpus; the tl and tld losses need question-answering tasks")
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
            if path.exists() and load_search(path).same_search(asdict(spec), self.model["fingerprint"]):
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
            baseline = self.bundle.baseline(method)
            if baseline is not None:
                methods[method] = baseline.omission()
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
                self._write_eval(name, FixedPolicy(omit, kind=name).describe(), task_results,
                                 {**settings, "blocks": list(omit)}, seconds)
            else:
                self._write_eval(name, oracle_description(name), task_results, settings, seconds)

    # -- router --------------------------------------------------------------------------------------------

    def labels(self) -> None:
        self._labels(self.bundle.labels_path, self.config.label_limit)

    def _labels(self, path: Path, limit: int | None, kind: str = "tl") -> LabelTable:
        sets = self.bundle.omission_sets()
        wanted = {"sets": [list(s) for s in sets], "tasks": self.config.calibration_tasks,
                  "limit_per_task": limit, "seed": self.config.seeds[0], "label": kind}
        if path.exists():
            table = LabelTable.load(path)
            if {"sets": table.sets, "label": table.kind, **table.meta.get("settings", {})} == wanted:
                return table
        self.log(f"labels: {LABEL_KINDS[kind]} under {len(sets)} sets" + ("" if limit else ", every training prompt"))
        return label_bundle(self.bundle, self.scorer, self.config.calibration_tasks, limit, self.config.seeds[0],
                            self.data_dir, self.model, self.log, path=path, kind=kind)

    def _heldout_rows(self, table: LabelTable):
        """The label rows the routers do not train on: the main table's held-out tenth."""
        return heldout_split(len(table), self.config.router.val_fraction, self.config.router.seed)[1]

    def heldout(self) -> None:
        """Every answer of the held-out training prompts scored under every candidate set: what the deployed policy
        is chosen on."""
        table = LabelTable.load(self.bundle.labels_path)
        rows = self._heldout_rows(table)
        settings = {"sets": table.sets, "labels": table.digest(), "fraction": self.config.router.val_fraction,
                    "seed": self.config.router.seed}
        path = self.bundle.path / "heldout.json"
        if path.exists() and read_json(path, "held-out scores").get("settings") == settings:
            return
        self.log(f"held-out: {len(rows)} training prompts, every answer under {len(table.sets)} sets")
        tasks = score_heldout(self.scorer, self.bundle.omission_sets(), table, rows, self.data_dir)
        self.bundle.write_json(path, {"settings": settings, "tasks": tasks})

    def _router_inputs(self, name: str) -> tuple[RouterSettings, LabelTable, object]:
        """A router's settings, label table and held-out rows: the main router's, changed as its variant says."""
        variant = dict(ROUTER_VARIANTS.get(name, {}))
        if name != MAIN_ROUTER and name not in ROUTER_VARIANTS:
            raise PuddingError(f"unknown router variant '{name}' (variants: {', '.join(ROUTER_VARIANTS)})")
        main = LabelTable.load(self.bundle.labels_path)
        labels = variant.pop("labels", None)
        if labels is None:
            return replace(self.config.router, **variant), main, None
        if labels == "all":
            table = self._labels(self.bundle.path / "labels-all.parquet", None)
        else:  # the main table's prompts, another label kind
            table = self._labels(self.bundle.label_table_path(labels), self.config.label_limit, labels)
        held = {(main.tasks[i], main.indices[i]) for i in self._heldout_rows(main)}
        val_rows = [i for i in range(len(table)) if (table.tasks[i], table.indices[i]) in held]
        # as many optimisation steps as the main router: more prompts, not more training
        epochs = max(1, round(self.config.router.epochs * len(main) / len(table)))
        return replace(self.config.router, epochs=epochs, **variant), table, val_rows

    def router(self, name: str = MAIN_ROUTER) -> None:
        settings, table, val_rows = self._router_inputs(name)
        directory = self.bundle.router_dir(name)
        if (directory / "router.json").exists():
            previous = read_json(directory / "router.json", "router config")
            if previous["settings"] == asdict(settings) and previous["sets"] == table.sets:
                return
        self.log(f"router {name}: {settings.encoder}, {settings.objective}, {len(table)} prompts, {settings.epochs} epochs")
        decoder = (self.scorer.encoder.tokenizer, self.scorer.decoder.embed_tokens.weight)
        train_bundle_router(self.bundle, table, settings, self.device, self.log, name, val_rows, decoder)

    def _router_eval_settings(self, name: str) -> dict:
        router_config = read_json(self.bundle.router_dir(name, must_exist=True) / "router.json", "router config")
        return self._eval_settings(router=router_config["settings"], trained=router_config["training"])

    def routed(self) -> None:
        """PuDDing itself: every question routed once by the main router and scored under the set it chose."""
        settings = self._router_eval_settings(MAIN_ROUTER)
        if self._evaluated("pudding", settings):
            return
        self._evaluate_policy("pudding", RoutedPolicy(self.bundle.router(MAIN_ROUTER, self.device)), settings)

    def _evaluate_policy(self, name: str, policy, settings: dict) -> None:
        tasks = parse_task_list(",".join(self.config.eval_tasks))
        started = time.perf_counter()
        results = evaluate_tasks(self.scorer, tasks, self._doc_sets(tasks), policy, self.config.limit, self.data_dir)
        extra = {} if policy.fixed is not None else {"routing": policy.stats.to_json()}
        self._write_eval(name, policy.describe(), results, settings, time.perf_counter() - started, **extra)

    def variants(self, names: Sequence[str] | None = None) -> None:
        """Routers other than the paper's (another objective, encoder or label set), each trained and evaluated; the
        evaluation is looked up from the candidate sets' static evaluations when they exist (no model compute)."""
        for name in names if names is not None else self.config.variants:
            self.router(name)
            settings = self._router_eval_settings(name)
            if not self._evaluated(f"pudding-{name}", settings):
                self._evaluate_variant(f"pudding-{name}", RoutedPolicy(self.bundle.router(name, self.device)), settings)

    def _static_evals(self) -> list[dict] | None:
        """The static evaluations of every candidate set on the evaluation documents, or None if one is missing."""
        settings = self._eval_settings()
        found = []
        for i, omit in enumerate(self.bundle.omission_sets()):
            if not self._evaluated(f"set{i}", {**settings, "blocks": list(omit)}):
                return None
            found.append(read_json(self._eval_path(f"set{i}"), "evaluation"))
        return found

    def _evaluate_variant(self, name: str, policy, settings: dict, predicted=None) -> None:
        set_evals = self._static_evals()
        if set_evals is None:
            self._evaluate_policy(name, policy, settings)
            return
        started = time.perf_counter()
        choices = predicted if predicted is not None else self._eval_choices(policy)
        results = lookup_results(set_evals, choices, self.bundle.omission_sets())
        extra = {"routing": policy.stats.to_json()} if predicted is None else {}
        self._write_eval(name, policy.describe(), results, settings, time.perf_counter() - started,
                         lookup="accuracy looked up from the static evaluations of the candidate sets", **extra)

    def _eval_documents(self) -> dict[str, list]:
        tasks = [t for t in parse_task_list(",".join(self.config.eval_tasks)) if t.kind == "multiple_choice"]
        limit = self.config.limit
        return {name: doc_set.docs[:limit] if limit else doc_set.docs for name, doc_set in self._doc_sets(tasks).items()}

    def _eval_choices(self, policy) -> dict:
        return {task: np.array([c.index for c in policy.choose([d.prompt for d in docs])])
                for task, docs in self._eval_documents().items()}

    def select(self) -> None:
        """Choose the deployed policy on the held-out prompts (selection.py) and evaluate every routed candidate on
        the evaluation documents by lookup."""
        if not (self.bundle.path / "heldout.json").exists():
            return
        held = read_json(self.bundle.path / "heldout.json", "held-out scores")
        routers = [n for n in self.bundle.routers() if n == MAIN_ROUTER or n in self.config.variants]
        trained = {n: read_json(self.bundle.router_dir(n) / "router.json", "router config")["training"] for n in routers}
        settings = {"heldout": held["settings"], "routers": trained, "eval": self._eval_settings()}
        if self.bundle.policy_path.exists() and read_json(self.bundle.policy_path, "policy choice").get("settings") == settings:
            return
        heldout = HeldOut.from_json(held["tasks"])
        fair = fair_best_static(heldout)
        candidates = static_candidates(heldout)
        documents = self._eval_documents()
        eval_prompts = [d.prompt for docs in documents.values() for d in docs]
        predictions: dict[str, dict] = {}
        routers_loaded = {}
        table = LabelTable.load(self.bundle.labels_path)
        train_rows = heldout_split(len(table), self.config.router.val_fraction, self.config.router.seed)[0]
        for name in routers:
            router = routers_loaded[name] = self.bundle.router(name, self.device)
            policy = RoutedPolicy(router)
            on_heldout, on_eval = policy.predict(heldout.prompts)[0], policy.predict(eval_prompts)[0]
            knn_heldout, knn_eval, keys = {}, {}, None
            if name == MAIN_ROUTER and router.embeds:
                knn_heldout, keys = neighbour_candidates(router, [table.prompts[i] for i in train_rows],
                                                         table.labels[train_rows], heldout)
                queries, _ = router.embed(eval_prompts)
                knn_eval = {k: neighbour_predictions(queries, keys, table.labels[train_rows], k) for k in knn_heldout}
            predictions[name] = {"heldout": (on_heldout, knn_heldout), "eval": (on_eval, knn_eval), "keys": keys}
            candidates += routed_candidates(name, on_heldout, fair, heldout, knn_heldout)
        record = choose_deployed(heldout, candidates, fair)
        self.log(f"deployed policy: {record['name']} ({record['reason']})")
        sizes = [len(docs) for docs in documents.values()]
        for candidate in candidates:
            if "static" in candidate.spec:
                continue
            name = candidate.spec["router"]
            raw, knn = predictions[name]["eval"]
            values = knn[candidate.spec["knn"]] if "knn" in candidate.spec else raw
            picked = apply_rule(candidate.spec, values)
            choices = dict(zip(documents, np.split(picked, np.cumsum(sizes)[:-1])))
            policy = policy_from_spec(candidate.spec, routers_loaded[name], table.labels[train_rows], predictions[name]["keys"])
            if "gate" in candidate.spec or "knn" in candidate.spec:  # a router alone is the routed/variants stages' row
                self._evaluate_variant(f"pudding-{candidate.name}", policy, self._eval_settings(policy=candidate.spec), choices)
        deployed = record["deployed"]
        if "knn" in deployed:  # the neighbours a deployed nearest-neighbour router needs, kept in the bundle
            save_neighbours(self.bundle, deployed["router"], predictions[deployed["router"]]["keys"], table.labels[train_rows])
        self.bundle.write_json(self.bundle.policy_path, {"settings": settings, **record})

    def deployed(self) -> None:
        """The deployed policy (policy.json), evaluated for real: routed once per question, scored under its set."""
        if not self.bundle.policy_path.exists():
            return
        record = read_json(self.bundle.policy_path, "policy choice")
        settings = self._eval_settings(policy=record["deployed"], chosen=record["settings"])
        if self._evaluated("deployed", settings):
            return
        self._evaluate_policy("deployed", deployed_policy(self.bundle, self.device), settings)

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
        policy = PerPromptPolicy(self.scorer, self.config.k)
        results = evaluate_tasks(self.scorer, tasks, self._doc_sets(tasks), policy, limit, self.data_dir)
        self._write_eval("sleb-per-prompt", policy.describe(), results, settings, time.perf_counter() - started)

    def lora(self) -> None:
        """LoRA per omission set (paper Table 4), only when the config asks for it: an adapter for every candidate set
        and for the SLEB and Shortened LLaMA sets, then PuDDing, those two and the deployed policy evaluated with
        their adapters applied (evals/*-lora.json)."""
        recipe = self.config.lora
        if recipe is None:
            return
        groups = [g for g in TABLE4_GROUPS if g == "candidates" or self.bundle.baseline(g) is not None]
        sets = bundle_sets(self.bundle, groups)
        model = self.scorer.decoder.model
        train_bundle_adapters(self.bundle, model, self.scorer.encoder.tokenizer, sets, recipe,
                              self.config.calibration_tasks, self.data_dir, self.log)
        rows = {f"{m}-lora": FixedPolicy(sets[m], kind=m) for m in groups if m != "candidates"}
        if MAIN_ROUTER in self.bundle.routers():
            rows["pudding-lora"] = RoutedPolicy(self.bundle.router(MAIN_ROUTER, self.device))
        if self.bundle.policy_path.exists():
            rows["deployed-lora"] = deployed_policy(self.bundle, self.device)
        settings = self._eval_settings(lora=recipe.identity())
        with self.scorer.adapters_applied(AdapterStore(self.bundle.path, model), list(sets.values())):
            for name, policy in rows.items():
                if not self._evaluated(name, settings):
                    self._evaluate_policy(name, policy, settings)

    def report(self) -> None:
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
# The candidate pool, kept in the bundle


def build_pool(bundle, scorer: Scorer, model_info: dict, tasks: Sequence[str], losses: Sequence[str], samples: int,
               seeds: Sequence[int] = (0,), data_dir=None, evaluator_factory=None, tld_reduce: str = "mean",
               on_done=None) -> list[CandidateSet]:
    """The candidate pool: one greedy search per (task, loss, calibration draw), duplicates dropped (PuDDing §5.1:
    m = t x l sets; more draws give more sets, as in the paper's 30-set ablation).

    Each search is written to the bundle when it finishes and checkpointed after every step while it runs, so
    rerunning the command skips finished searches and resumes the interrupted one.
    """
    specs = [SearchSpec("greedy", task, loss, bundle.k, samples, seed, tld_reduce=tld_reduce)
             for seed in seeds for task in tasks for loss in losses]
    for spec in specs:  # fail on bad input before hours of work
        spec.validate(scorer.decoder.num_blocks)
        get_task(spec.task).require_calibration_split()
    found = []
    for spec in specs:
        path = bundle.search_path(spec.task, spec.loss, spec.seed)
        result = load_search(path) if path.exists() else None
        if result is None or not result.same_search(asdict(spec), model_info["fingerprint"]):
            result = run_search(spec, scorer, model_info, data_dir, partial_path(path), evaluator_factory)
            bundle.write_json(path, result.to_json())  # drops the checkpoint
        result = result.prefix(spec.k)  # a sweep's longer search serves this k too
        if on_done:
            on_done(spec, result)
        found.append((result.blocks, {"task": spec.task, "loss": spec.loss, "seed": spec.seed,
                                      "search": str(path.relative_to(bundle.path))}))
    pool = deduplicate(found)
    bundle.write_candidates(pool, {"tasks": list(tasks), "losses": list(losses), "samples": samples,
                                   "seeds": list(seeds), "tld_reduce": tld_reduce})
    return pool


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
            pipeline.variants(["ce-soft", "ce-onehot"])
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
