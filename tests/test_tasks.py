"""The task registry reads the raw files in ../shared/data the way lm-evaluation-harness would."""

from __future__ import annotations

import json
import shutil

import pytest

from pudding.errors import PuddingError
from pudding.tasks import get_task, parse_task_list, resolve_data_dir, task_names
from pudding.tasks.registry import _load_docs

# Evaluation split sizes (lm-evaluation-harness splits; see each data folder's SOURCE.md)
EVAL_SIZES = {
    "arc_challenge": 1172, "arc_easy": 2376, "boolq": 3270, "hellaswag": 10042, "piqa": 1838,
    "winogrande": 1267, "openbookqa": 500, "mathqa": 2985, "mmlu": 14042, "pubmedqa": 500, "sciq": 1000,
}


def test_registry_covers_the_papers_tasks():
    assert set(EVAL_SIZES) | {"wikitext2"} == set(task_names())


@pytest.mark.parametrize("name", sorted(EVAL_SIZES))
def test_evaluation_split_is_complete(name):
    docs = get_task(name).docs()
    assert len(docs.docs) == EVAL_SIZES[name]
    assert docs.skipped == 0
    for doc in docs.docs[:50]:
        assert 0 <= doc.gold < len(doc.requests)
        assert all(cont.startswith(" ") for _, cont in doc.requests)


def test_arc_digit_keys_and_odd_choice_counts():
    docs = get_task("arc_easy").docs("train").docs
    counts = {len(d.requests) for d in docs}
    assert counts == {3, 4, 5}
    # a row whose answerKey is a digit: gold is its position among the labels, not ord(key) - ord('A')
    from pudding.tasks.readers import read_rows

    rows = read_rows(get_task("arc_easy").spec["splits"]["train"], resolve_data_dir()).rows
    digit_rows = [i for i, r in enumerate(rows) if r["answerKey"].isdigit()]
    assert digit_rows
    row = rows[digit_rows[0]]
    assert docs[digit_rows[0]].gold == row["choices"]["label"].index(row["answerKey"])


def test_arc_prompt_format():
    doc = get_task("arc_challenge").docs().docs[0]
    context, continuation = doc.requests[0]
    assert context.startswith("Question: ") and context.endswith("\nAnswer:")
    assert doc.prompt == context


def test_hellaswag_preprocessing_matches_the_harness():
    docs = get_task("hellaswag").docs().docs
    assert not any("[title]" in d.requests[0][0] or "[" in d.requests[0][1] for d in docs[:2000])
    first = docs[0]
    assert first.requests[0][0] == "Roof shingle removal: A man is sitting on a roof. He"
    assert first.gold == 3


def test_boolq_question_mark_and_yes_no():
    doc = get_task("boolq").docs().docs[0]
    context = doc.requests[0][0]
    assert context.endswith("?\nAnswer:")
    assert [c for _, c in doc.requests] == [" no", " yes"]
    assert context.startswith("Ethanol fuel -- ")  # the SuperGLUE copy, as the harness loads it
    train = get_task("boolq").docs("train").docs
    assert len(train) == 1000 and {d.gold for d in train} == {0, 1}


def test_winogrande_partial_scoring():
    doc = get_task("winogrande").docs().docs[0]
    (ctx1, cont1), (ctx2, cont2) = doc.requests
    assert cont1 == cont2 and cont1.startswith(" ")
    assert ctx1 != ctx2 and "_" not in ctx1
    assert "_" in doc.prompt  # the router sees the question, not one filled-in option


def test_mmlu_description_names_the_subject():
    doc = get_task("mmlu").docs().docs[0]
    assert doc.requests[0][0].startswith("The following are multiple choice questions (with answers) about abstract algebra.\n\n")
    assert [c for _, c in doc.requests] == [" A", " B", " C", " D"]


def test_mathqa_reconstruction_has_five_options():
    docs = get_task("mathqa").docs().docs
    assert all(len(d.requests) == 5 for d in docs)


def test_pubmedqa_uses_the_official_test_pmids():
    task = get_task("pubmedqa")
    test = task.docs().docs
    train = task.docs("train").docs
    assert len(test) == 500 and len(train) == 500
    assert test[0].requests[0][0].startswith("Abstract: ")


def test_sample_is_seeded_and_without_replacement():
    task = get_task("piqa")
    docs_a, idx_a = task.sample("train", 64, seed=3)
    docs_b, idx_b = task.sample("train", 64, seed=3)
    assert idx_a == idx_b and len(set(idx_a)) == 64
    assert task.sample("train", 64, seed=4)[1] != idx_a
    with pytest.raises(PuddingError, match="fewer than"):
        get_task("pubmedqa").sample("train", 10_000, seed=0)


def test_a_split_cut_from_another_keeps_its_rows():
    """MathQA has no train split offline: its calibration split is the first 1000 test rows, same documents."""
    task = get_task("mathqa")
    assert task.require_calibration_split() == "calibration"
    calibration, test = task.docs("calibration").docs, task.docs("test").docs
    assert len(calibration) == 1000 and len(test) > 2000
    assert [d.requests for d in calibration[:5]] == [d.requests for d in test[:5]]
    assert calibration[-1].requests == test[999].requests and calibration[-1].index == 999


def test_unknown_and_repeated_tasks():
    with pytest.raises(PuddingError, match="unknown task 'arc_medium'"):
        parse_task_list("arc_easy,arc_medium")
    with pytest.raises(PuddingError, match="listed twice"):
        parse_task_list("piqa,piqa")


def test_missing_data_dir_names_the_variable(tmp_path, monkeypatch):
    monkeypatch.setenv("PUDDING_DATA_DIR", str(tmp_path / "nowhere"))
    with pytest.raises(PuddingError, match="PUDDING_DATA_DIR"):
        resolve_data_dir()
    with pytest.raises(PuddingError, match="--data-dir"):
        resolve_data_dir(tmp_path)


def test_malformed_rows_are_skipped_and_counted(tmp_path, data_dir):
    shutil.copytree(data_dir / "arc_easy", tmp_path / "arc_easy")
    path = tmp_path / "arc_easy" / "hf_json" / "validation.json"
    path.chmod(0o644)
    rows = json.loads(path.read_text())
    rows[3].pop("choices")  # a row without choices
    rows[5]["answerKey"] = "Z"  # a gold label that is not among the choices
    path.write_text(json.dumps(rows))
    _load_docs.cache_clear()
    docs = get_task("arc_easy").docs("validation", tmp_path)
    assert docs.skipped == 2
    assert len(docs.docs) == len(rows) - 2
    assert [d.index for d in docs.docs[2:5]] == [2, 4, 6]  # indices stay those of the file
