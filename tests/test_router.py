"""Labels, router training and routing, routed evaluation and the oracles."""

from __future__ import annotations

import json

import numpy as np
import torch
import pytest

from pudding.bundle import Bundle
from pudding.errors import PuddingError
from pudding.labels import LabelTable, heldout_split, label_prompts
from pudding.omission import OmissionSet
from pudding.router import LoadedRouter, RouterSettings, objective_loss, predicted_losses
from pudding.router_training import save_router, train_router
from pudding.scoring import Scorer
from conftest import SETS, assert_clean_failure, pudding, synthetic_table

@pytest.fixture(scope="module")
def scorer(smollm2):
    return Scorer(smollm2.decoder, smollm2.tokenizer, max_batch_tokens=1024)


def test_labels_are_tl_under_each_set(scorer):
    sets = [OmissionSet(s, 30) for s in SETS]
    table = label_prompts(scorer, sets, ["piqa", "winogrande"], limit_per_task=3, seed=1)
    assert table.labels.shape == (6, 4) and table.tasks == ["piqa"] * 3 + ["winogrande"] * 3
    from pudding.tasks import get_task

    docs = {d.index: d for d in get_task("piqa").docs("train").docs}
    doc = docs[table.indices[0]]
    assert table.prompts[0] == doc.prompt
    request = scorer.encoder.pair(*doc.requests[doc.gold])
    for j, omit in enumerate(sets):
        expected = scorer.loglikelihoods([[request]], omit).task_likelihood()[0]
        assert table.labels[0, j] == pytest.approx(expected, rel=1e-4)


def test_margin_labels_count_what_accuracy_counts(scorer):
    """A margin label is below zero exactly when the set answers the prompt right under the task's metric, and
    the table keeps its kind through a save."""
    from pudding.evaluate import correctness, score_docs_under_sets
    from pudding.tasks import get_task

    sets = [OmissionSet(s, 30) for s in SETS[:3]]
    table = label_prompts(scorer, sets, ["arc_easy", "piqa"], limit_per_task=4, seed=2, kind="margin")
    assert table.kind == "margin" and table.labels.shape == (8, 3)
    for name in ("arc_easy", "piqa"):
        task = get_task(name)
        by_index = {d.index: d for d in task.docs("train").docs}
        rows = [i for i, t in enumerate(table.tasks) if t == name]
        docs = [by_index[table.indices[i]] for i in rows]
        for j, scored in enumerate(score_docs_under_sets(scorer, docs, sets, "check")):
            right = correctness(scored)[task.primary].astype(bool)
            np.testing.assert_array_equal(table.labels[rows, j] < 0, right)
    with pytest.raises(PuddingError, match="unknown label kind 'accuracy'"):
        label_prompts(scorer, sets, ["piqa"], limit_per_task=1, kind="accuracy")


def test_label_table_round_trip(tmp_path):
    for meta in ({"settings": {"x": 1}}, {"settings": {"x": 1}, "label": "margin"}):
        table = LabelTable(["a", "b"], [4, 7], ["p one", "p two"], np.array([[1.0, 2.0], [3.0, 0.5]], np.float32),
                           [[1], [2]], meta)
        table.save(tmp_path / "labels.parquet")
        back = LabelTable.load(tmp_path / "labels.parquet")
        assert back.prompts == table.prompts and back.sets == [[1], [2]] and back.meta == meta
        assert back.kind == meta.get("label", "tl")
        np.testing.assert_array_equal(back.labels, table.labels)
    (tmp_path / "bad.parquet").write_bytes(b"not parquet")
    with pytest.raises(PuddingError, match="not a readable label table"):
        LabelTable.load(tmp_path / "bad.parquet")


def test_objectives_agree_on_lower_is_better():
    labels = torch.tensor([[1.0, 3.0, 2.0]])
    assert objective_loss(labels.clone(), labels, "mse").item() == 0
    logits = torch.tensor([[5.0, -5.0, 0.0]])  # a CE router confident in set 0
    assert predicted_losses(logits, "ce-soft").argmin().item() == 0
    assert objective_loss(logits, labels, "ce-onehot").item() < objective_loss(-logits, labels, "ce-onehot").item()


def test_router_trains_saves_and_routes(tmp_path):
    table = synthetic_table()
    settings = RouterSettings(epochs=4, warmup_steps=4, lr=3e-4, batch_size=16, max_length=32, val_fraction=0.25)
    router, tokenizer, history, meta = train_router(table, settings)
    assert [e["epoch"] for e in history.epochs] == [1, 2, 3, 4]
    assert history.epochs[-1]["val_loss"] < history.epochs[0]["val_loss"]
    assert meta["val_rows"] == 24
    directory = tmp_path / "router"
    save_router(directory, router, tokenizer, settings, table.sets, history, meta, {"fingerprint": "x", "num_blocks": 30})
    assert (directory / "head.safetensors").exists() and (directory / "training.png").stat().st_size > 1000
    assert not list(directory.rglob("*.bin")) and not list(directory.rglob("*.pt"))  # safetensors only
    loaded = LoadedRouter(directory)
    result = loaded.route(["Question: what does a cow eat?\nAnswer:", "The woman opened the window and"])
    assert result.choices == [0, 1]
    assert result.predicted.shape == (2, 4) and result.seconds > 0
    long = loaded.route(["word " * 200])
    assert long.truncated == [True]
    with pytest.raises(PuddingError, match="empty prompt"):
        loaded.route(["   "])
    # the GPU's default: the encoder in bf16, pooled and headed in fp32; same choices, predictions a rounding apart
    assert loaded.dtype == torch.float32 and next(loaded.router.head.parameters()).dtype == torch.float32
    low = LoadedRouter(directory, dtype="bfloat16")
    assert next(low.router.encoder.parameters()).dtype == torch.bfloat16
    assert next(low.router.head.parameters()).dtype == torch.float32
    prompts = ["Question: what does a cow eat?\nAnswer:", "The woman opened the window and"]
    low_result = low.route(prompts)
    assert low_result.choices == result.choices and low_result.predicted.dtype == np.float32
    np.testing.assert_allclose(low_result.predicted, result.predicted, atol=0.05 * np.ptp(result.predicted))
    with pytest.raises(PuddingError, match="unknown router dtype 'int8'"):
        LoadedRouter(directory, dtype="int8")


def test_router_training_is_deterministic():
    table = synthetic_table(32)
    settings = RouterSettings(epochs=1, warmup_steps=1, batch_size=8, max_length=24, val_fraction=0.25)
    first = train_router(table, settings)[2].steps
    second = train_router(table, settings)[2].steps
    assert first == second


def test_embeddings_router_is_a_ridge_head_on_the_decoders_mean_pooled_input_embeddings(smollm2, tmp_path):
    """The router on the decoder's own embeddings: its folded token table predicts exactly what a ridge regression
    on the prompts' mean-pooled input embeddings (computed here through transformers' embedding module) predicts,
    it learns the synthetic table's two kinds of prompt, and it saves and loads as a router of its own kind."""
    from pudding.router import TokenTableRouter, load_router
    from pudding.router_training import train_embeddings_router

    table = synthetic_table()
    settings = RouterSettings(encoder="embeddings", max_length=32, val_fraction=0.25)
    weight = smollm2.decoder.embed_tokens.weight
    router, history, meta = train_embeddings_router(table, settings, smollm2.tokenizer, weight, 30)
    assert meta["val_rows"] == 24 and history.epochs[0]["picks_best_set"] == 1.0
    assert set(meta["ridge_scores"]) == {"0.001", "0.01", "0.1", "1", "10"}
    # reference: transformers' embeddings of the prompt's tokens, mean-pooled, and a ridge fit by least squares
    train_rows = heldout_split(len(table), 0.25, 0)[0]
    with torch.no_grad():
        pooled = np.stack([smollm2.model.get_input_embeddings()(torch.tensor(smollm2.tokenizer(p, add_special_tokens=False)["input_ids"])).double().mean(0).numpy()
                           for p in table.prompts])
    centered = table.labels - table.labels.mean(1, keepdims=True)
    targets = centered / centered.std()
    mean, scale = pooled[train_rows].mean(0), pooled[train_rows].std(0) + 1e-6
    z = (pooled[train_rows] - mean) / scale
    penalty = np.sqrt(meta["ridge_strength"] * len(z)) * np.eye(z.shape[1])
    solution = np.linalg.lstsq(np.vstack([z, penalty]), np.vstack([targets[train_rows] - targets[train_rows].mean(0),
                                                                 np.zeros((z.shape[1], targets.shape[1]))]), rcond=None)[0]
    expected = ((pooled - mean) / scale) @ solution + targets[train_rows].mean(0)
    result = router.route(table.prompts)
    np.testing.assert_allclose(result.predicted, expected, atol=1e-3 * np.ptp(expected))
    assert result.choices == [1 if i % 2 == 0 else 0 for i in range(len(table))]
    assert router.route(["word " * 40]).truncated == [True]
    with pytest.raises(PuddingError, match="empty prompt"):
        router.route([" \n "])
    # from the decoder's token ids of the text (what the engine pre-fills) it routes as from the text, and a policy
    # handed them routes from them: the door prompt's tokens decide, whatever text comes with them
    from pudding.policy import RoutedPolicy

    tokens = [smollm2.tokenizer(p, add_special_tokens=False)["input_ids"] for p in table.prompts[:4]]
    np.testing.assert_array_equal(router.route_tokens(tokens).predicted, result.predicted[:4])
    policy = RoutedPolicy(router)
    assert policy.pending(table.prompts[1]).result().index == 0 and result.choices[:2] == [1, 0]
    assert policy.pending(table.prompts[1], tokens[0]).result().index == 1 and policy.stats.prompts == 2
    with pytest.raises(PuddingError, match="outside the router's vocabulary"):
        router.route_tokens([[len(router.table)]])
    # saved and loaded by kind, the table and tokenizer only (no encoder, no model weights)
    directory = tmp_path / "router"
    directory.mkdir()
    router.save(directory)
    (directory / "router.json").write_text(json.dumps({"settings": settings.__dict__, "sets": table.sets, "model": {"num_blocks": 30}}))
    loaded = load_router(directory)
    assert isinstance(loaded, TokenTableRouter) and loaded.sets == router.sets
    np.testing.assert_array_equal(loaded.route(table.prompts[:4]).predicted, result.predicted[:4])
    assert sum(f.stat().st_size for f in directory.rglob("*")) < 30e6
    (directory / "table.safetensors").write_bytes(b"broken")
    with pytest.raises(PuddingError, match="is damaged"):
        load_router(directory)
    with pytest.raises(PuddingError, match="regresses the labels"):
        RouterSettings(encoder="embeddings", objective="ce-soft").validate()


PIPELINE = ("pipeline", "--small", "--blocks", "2", "--samples", "2", "--limit", "6", "--label-limit", "8", "--epochs", "1",
            "--per-prompt", "2", "--tasks", "piqa,winogrande,sciq", "--variants", "margin,embeddings",
            "--calibration-tasks", "piqa,arc_easy")


@pytest.fixture(scope="module")
def small_bundle(tmp_path_factory, smollm2):
    """A whole pipeline at toy sizes: candidates, baselines, evaluations, labels, router (and the margin-label
    variant), routed eval, the deployed policy, report."""
    bundle = tmp_path_factory.mktemp("pipe") / "bundle"
    result = pudding(*PIPELINE, "--output", str(bundle), timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    return bundle


@pytest.mark.slow
def test_pipeline_writes_every_stage(small_bundle):
    evals = {p.stem for p in (small_bundle / "evals").glob("*.json")}
    assert {"dense", "sleb", "shortened-ppl", "shortgpt", "set0", "oracle", "oracle-tl", "pudding", "sleb-per-prompt"} <= evals
    assert (small_bundle / "labels.parquet").exists() and (small_bundle / "router" / "router.json").exists()
    report = (small_bundle / "report.md").read_text()
    assert "## Commonsense tasks (Table 2)" in report and "## Unseen tasks (Table 5)" in report
    assert (small_bundle / "omission-heatmap.png").exists() and (small_bundle / "set-usage.png").exists()
    pudding_eval = json.loads((small_bundle / "evals" / "pudding.json").read_text())
    for task, result in pudding_eval["tasks"].items():
        assert sum(result["sets_used"].values()) == result["n"]  # every question routed once
    oracle = json.loads((small_bundle / "evals" / "oracle.json").read_text())
    for task in oracle["tasks"]:
        best_static = max(json.loads(p.read_text())["tasks"][task]["metrics"]["acc"]
                          for p in (small_bundle / "evals").glob("set*.json"))
        assert oracle["tasks"][task]["metrics"]["acc"] >= best_static


@pytest.mark.slow
def test_pipeline_resumes_without_recomputing(small_bundle):
    before = {p.name: p.stat().st_mtime_ns for p in small_bundle.rglob("*.json")}
    again = pudding(*PIPELINE, "--output", str(small_bundle), "--stages", "candidates,baselines,static,labels,router,routed")
    assert again.returncode == 0, again.stderr
    after = {p.name: p.stat().st_mtime_ns for p in small_bundle.rglob("*.json")}
    unchanged = [n for n in before if n in after and before[n] == after[n] and n != "candidates.json"]
    assert len(unchanged) >= len(before) - 1


@pytest.mark.slow
def test_route_and_routed_eval_from_the_cli(small_bundle):
    result = pudding("route", "--bundle", str(small_bundle), "Question: How do I boil an egg?\nAnswer:")
    assert result.returncode == 0, result.stderr
    assert "chosen" in result.stdout and "routing time" in result.stdout
    routed = pudding("eval", "--bundle", str(small_bundle), "--router", "--tasks", "piqa", "--limit", "4")
    assert routed.returncode == 0 and "routed" in routed.stdout
    deployed = pudding("eval", "--bundle", str(small_bundle), "--tasks", "piqa", "--limit", "4")
    assert deployed.returncode == 0 and "deployed" in deployed.stdout, deployed.stdout
    oracle = pudding("eval", "--bundle", str(small_bundle), "--oracle", "--tasks", "piqa", "--limit", "4")
    assert oracle.returncode == 0 and "per question" in oracle.stdout


@pytest.mark.slow
def test_bad_bundle_input(small_bundle, tmp_path):
    assert_clean_failure(pudding("route", "--bundle", str(small_bundle), "  "), "empty prompt")
    bare = tmp_path / "bare"
    Bundle.create_or_open(bare, json.loads((small_bundle / "bundle.json").read_text())["model"], 2, {})
    (bare / "candidates.json").write_text((small_bundle / "candidates.json").read_text())
    assert_clean_failure(pudding("eval", "--bundle", str(bare), "--tasks", "piqa"), "pudding train-router")
    assert_clean_failure(pudding("train-router", "--bundle", str(bare)), "pudding label")
    assert_clean_failure(pudding("route", "--bundle", str(bare), "hi"), "pudding train-router")
    foreign = tmp_path / "foreign"
    Bundle.create_or_open(foreign, {"name": "other", "fingerprint": "0123456789abcdef", "num_blocks": 30}, 2, {})
    assert_clean_failure(pudding("eval", "--model", "smollm2-135m", "--bundle", str(foreign), "--set", "0"), "fingerprint")
    assert_clean_failure(pudding("pipeline", "--output", str(tmp_path / "x"), "--stages", "magic"), "unknown stage 'magic'")


@pytest.mark.slow
def test_objectives_ablation_lands_in_the_report(small_bundle):
    """The CE routers of Table 12 train beside the main one and the report compares them on the same documents."""
    result = pudding(*PIPELINE, "--output", str(small_bundle), "--stages", "report", "--ablations", "objectives", timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    for objective in ("ce-soft", "ce-onehot"):
        assert (small_bundle / f"router-{objective}" / "router.json").exists()
        routed = json.loads((small_bundle / "evals" / f"pudding-{objective}.json").read_text())
        assert routed["tasks"].keys() == {"piqa", "winogrande", "sciq"}
    report = (small_bundle / "report.md").read_text()
    table = report[report.index("## Ablations"):]
    rows = [line for line in table.splitlines() if line.startswith("| router trained with")]
    assert len(rows) == 2
    for row in rows:
        versus, picks = row.rstrip(" |").split(" | ")[-2:]
        assert "±" in versus and picks.endswith("%")  # paired difference from the main router, held-out picks-best


@pytest.mark.slow
def test_routed_accuracy_looked_up_equals_the_routed_evaluation(small_bundle):
    """A variant's accuracy is looked up from the static evaluations of the candidate sets: for the main router that
    gives, document for document, what routing and scoring each question gives."""
    from pudding.bundle import Bundle
    from pudding.policy import RoutedPolicy
    from pudding.selection import lookup_results
    from pudding.tasks import get_task

    bundle = Bundle.open(small_bundle)
    routed = json.loads((small_bundle / "evals" / "pudding.json").read_text())
    sets = bundle.omission_sets()
    set_evals = [json.loads((small_bundle / "evals" / f"set{i}.json").read_text()) for i in range(len(sets))]
    policy = RoutedPolicy(bundle.router())
    choices = {t: np.array([c.index for c in policy.choose([d.prompt for d in get_task(t).docs().docs[:6]])])
               for t in routed["tasks"]}
    for result in lookup_results(set_evals, choices, sets):
        assert result.per_doc == routed["tasks"][result.task]["per_doc"], result.task
        assert result.sets_used == routed["tasks"][result.task]["sets_used"]


@pytest.mark.slow
def test_the_pipeline_deploys_a_policy_chosen_on_held_out_prompts(small_bundle):
    policy = json.loads((small_bundle / "policy.json").read_text())
    names = {c["name"] for c in policy["candidates"]}
    assert {"set0", "router", "router-gated", "router-knn5"} <= names
    fair = policy["fair_static"]
    static_accuracy = {c["name"]: c["heldout_accuracy"] for c in policy["candidates"] if "static" in c["spec"]}
    assert static_accuracy[f"set{fair}"] == max(static_accuracy.values())
    deployed = json.loads((small_bundle / "evals" / "deployed.json").read_text())
    if "static" in policy["deployed"]:  # then the deployed evaluation is that set's
        assert policy["deployed"] == {"static": fair}
        fixed = json.loads((small_bundle / "evals" / f"set{fair}.json").read_text())
        assert {t: r["per_doc"] for t, r in deployed["tasks"].items()} == {t: r["per_doc"] for t, r in fixed["tasks"].items()}
    report = (small_bundle / "report.md").read_text()
    assert "## Deployed policy" in report and "fair best static" in report


@pytest.mark.slow
def test_margin_router_variant_trains_on_margin_labels_and_competes_for_deployment(small_bundle, tmp_path):
    """`--variants margin`: the main table's prompts labelled with decision margins, a router trained on them beside
    the paper's, its routed accuracy looked up, and it among the policies the deployment is chosen from."""
    import shutil

    bundle = tmp_path / "bundle"
    shutil.copytree(small_bundle, bundle)  # the fixture's pipeline ran with --variants margin
    main, margins = LabelTable.load(bundle / "labels.parquet"), LabelTable.load(bundle / "labels-margin.parquet")
    assert margins.kind == "margin" and main.kind == "tl"
    assert margins.prompts == main.prompts and margins.labels.shape == main.labels.shape
    trained = json.loads((bundle / "router-margin" / "router.json").read_text())
    heldout = json.loads((bundle / "heldout.json").read_text())["tasks"]
    assert trained["training"]["val_rows"] == sum(len(t["indices"]) for t in heldout.values())  # the main router's
    routed = json.loads((bundle / "evals" / "pudding-margin.json").read_text())
    assert "looked up" in routed["lookup"]
    names = {c["name"] for c in json.loads((bundle / "policy.json").read_text())["candidates"]}
    assert {"margin", "margin-gated"} <= names
    # the same labels from the command line: `train-router --labels margin` (here with another objective)
    trained = pudding("train-router", "--bundle", str(bundle), "--labels", "margin", "--objective", "ce-soft",
                      "--epochs", "1", "--warmup-steps", "0")
    assert trained.returncode == 0, trained.stderr[-2000:]
    config = json.loads((bundle / "router-margin-ce-soft" / "router.json").read_text())
    assert config["settings"]["objective"] == "ce-soft" and config["training"]["labels"] == "margin"


@pytest.mark.slow
def test_embeddings_router_variant_competes_for_deployment_and_trains_from_the_cli(small_bundle, tmp_path):
    """`--variants embeddings`: a router on the decoder's input embeddings trained beside the paper's (in seconds,
    no encoder), its routed accuracy looked up, it among the deployment's candidates and in the report's ablations;
    `train-router --encoder embeddings` makes one from the command line, which routes and evaluates."""
    import shutil

    bundle = tmp_path / "bundle"
    shutil.copytree(small_bundle, bundle)  # the fixture's pipeline ran with --variants margin,embeddings
    trained = json.loads((bundle / "router-embeddings" / "router.json").read_text())
    assert trained["settings"]["encoder"] == "embeddings" and "ridge_strength" in trained["training"]
    assert not (bundle / "router-embeddings" / "encoder").exists() and (bundle / "router-embeddings" / "table.safetensors").exists()
    routed = json.loads((bundle / "evals" / "pudding-embeddings.json").read_text())
    assert "looked up" in routed["lookup"] and routed["tasks"].keys() == {"piqa", "winogrande", "sciq"}
    names = {c["name"] for c in json.loads((bundle / "policy.json").read_text())["candidates"]}
    assert {"embeddings", "embeddings-gated"} <= names
    assert "| router on the decoder's input embeddings |" in (bundle / "report.md").read_text()
    made = pudding("train-router", "--bundle", str(bundle), "--encoder", "embeddings")
    assert made.returncode == 0, made.stderr[-2000:]
    assert json.loads((bundle / "router" / "router.json").read_text())["settings"]["encoder"] == "embeddings"
    result = pudding("route", "--bundle", str(bundle), "Question: How do I boil an egg?\nAnswer:")
    assert result.returncode == 0 and "chosen" in result.stdout, result.stderr[-2000:]
    routed = pudding("eval", "--bundle", str(bundle), "--router", "--tasks", "piqa", "--limit", "4")
    assert routed.returncode == 0 and "routed" in routed.stdout, routed.stderr[-2000:]
    for chat in ((), ("--chat",)):  # routed from the engine's own ids of the prompt; with --chat, from its text
        generated = pudding("generate", "--bundle", str(bundle), "--router", "--max-new-tokens", "3", *chat,
                            "Question: How do I boil an egg?\nAnswer:")
        assert generated.returncode == 0 and "[set " in generated.stderr, generated.stderr[-2000:]  # routed: its set
    assert_clean_failure(pudding("train-router", "--bundle", str(bundle), "--encoder", "embeddings", "--objective",
                                 "ce-onehot"), "regresses the labels")
    assert_clean_failure(pudding("train-router", "--bundle", str(bundle), "--encoder", "glove"), "glove")


def test_a_long_prompt_is_tokenized_only_as_far_as_the_router_reads():
    """The router tokenizes a long prompt only up to a whitespace past what it reads (tokenizing 2048 words costs
    ~4.5 ms of CPU), and gets exactly the ids and truncation flags of tokenizing it all: long and short prompts,
    newlines, accents and CJK characters, and a prompt without whitespace (tokenized whole: one unknown word)."""
    router = LoadedRouter.untrained("minilm-l6", [OmissionSet([1], 30), OmissionSet([2], 30)])
    prompts = ["Question: what does a cow eat?\nAnswer:", "word " * 200, ("Crème brûlée, 東京 and\tnewlines\n" * 300),
               "x" * 5000, " ".join(str(i) for i in range(3000)), "tail " * 254 + "end"]
    limit = router.settings.max_length
    full = router.tokenizer(prompts, truncation=False, verbose=False)["input_ids"]
    expected = [ids if len(ids) <= limit else ids[: limit - 1] + ids[-1:] for ids in full]
    ids, truncated = router._tokenize(prompts)
    assert ids == expected and truncated == [len(f) > limit for f in full] == [False, False, True, False, True, True]
    assert router.tokenizer(prompts[1:2], truncation=True, max_length=limit)["input_ids"] == ids[1:2]

