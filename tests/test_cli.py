"""The command line, run as a user runs it: a real process, real model, real data."""

from __future__ import annotations

import json

import pytest
from conftest import assert_clean_failure, pudding


@pytest.mark.slow
def test_eval_writes_a_table_and_json(tmp_path, smollm2):
    output = tmp_path / "r.json"
    result = pudding("eval", "--model", "smollm2-135m", "--tasks", "arc_easy,winogrande", "--limit", "8",
                     "--omit", "11,17,20", "--output", str(output))
    assert result.returncode == 0, result.stderr
    assert "arc_easy" in result.stdout and "winogrande" in result.stdout
    document = json.loads(output.read_text())
    assert document["omission"]["blocks"] == [11, 17, 20]
    assert document["model"]["fingerprint"] == smollm2.fingerprint
    assert set(document["versions"]) >= {"pudding", "torch", "transformers"}
    arc = document["tasks"]["arc_easy"]
    assert arc["n"] == 8 and set(arc["metrics"]) == {"acc", "acc_norm"}
    assert 0 <= arc["metrics"]["acc"] <= 1
    assert set(document["tasks"]["winogrande"]["metrics"]) == {"acc"}
    assert document["average"]["paper"] is not None


@pytest.mark.slow
def test_eval_matches_the_python_api(smollm2):
    """The CLI's accuracy is the evaluator's accuracy on the same documents."""
    from pudding.evaluate import evaluate_multiple_choice
    from pudding.omission import OmissionSet
    from pudding.policy import FixedPolicy
    from pudding.scoring import Scorer
    from pudding.tasks import get_task

    task = get_task("piqa")
    docs = task.docs().docs[:12]
    result = evaluate_multiple_choice(Scorer(smollm2.decoder, smollm2.tokenizer), task, docs,
                                      FixedPolicy(OmissionSet((), 30)))
    out = pudding("eval", "--tasks", "piqa", "--limit", "12", "--output", "/dev/stdout")
    assert out.returncode == 0, out.stderr
    assert f"{100 * result.metrics['acc']:.2f}" in out.stdout


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["eval", "--model", "llama-9000b"], "unknown model 'llama-9000b'"),
        (["eval", "--tasks", "arc_easy,nope"], "unknown task 'nope'"),
        (["eval", "--omit", "30"], "out of range"),
        (["eval", "--omit", "4,4"], "more than once"),
        (["eval", "--omit", ",".join(map(str, range(30)))], "at least one must remain"),
        (["eval", "--limit", "0"], "--limit"),
        (["eval", "--data-dir", "/nonexistent"], "--data-dir"),
        (["eval", "--model", "/etc"], "not a Hugging Face model directory"),
        (["eval", "--device", "tpu"], "unknown device"),
        (["models", "pull", "gpt-5"], "unknown model 'gpt-5'"),
        (["eval", "--bogus"], "No such option"),
    ],
)
def test_bad_input_gets_one_clear_line(args, fragment, smollm2):
    assert_clean_failure(pudding(*args), fragment)


def test_missing_data_names_the_variable(tmp_path):
    result = pudding("eval", env={"PUDDING_DATA_DIR": str(tmp_path)})
    assert_clean_failure(result, "PUDDING_DATA_DIR")


def test_model_not_installed_says_how_to_install():
    from pudding.models import is_installed, packaged

    missing = [n for n in ("qwen2.5-1.5b", "gemma3-270m", "qwen2.5-0.5b") if not is_installed(packaged(n))]
    if not missing:
        pytest.skip("every packaged decoder is installed here")
    assert_clean_failure(pudding("eval", "--model", missing[0]), f"pudding models pull {missing[0]}")


def test_models_lists_the_registry():
    result = pudding("models")
    assert result.returncode == 0
    for name in ("smollm2-135m", "qwen2.5-0.5b", "qwen2.5-1.5b", "gemma3-270m", "minilm-l6", "mpnet-base"):
        assert name in result.stdout


def test_help_explains_each_command():
    result = pudding("--help")
    assert result.returncode == 0
    for command in ("eval", "models", "tasks"):
        assert command in result.stdout
    assert "--omit" in pudding("eval", "--help").stdout
