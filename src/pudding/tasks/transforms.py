"""Row clean-ups that a template cannot express, by name (tasks.yaml says `transform: NAME`).

Each takes a raw row and returns the row with the fields its task's templates use. They follow the preprocessing
of lm-evaluation-harness where one exists, and otherwise bring a reformatted third-party copy back to the schema
of the original dataset.
"""

from __future__ import annotations

import re
from collections.abc import Callable

TRANSFORMS: dict[str, Callable[[dict], dict]] = {}


def transform(name: str):
    def register(fn):
        TRANSFORMS[name] = fn
        return fn

    return register


def _hellaswag_clean(text: str) -> str:
    text = text.strip()
    text = text.replace(" [title]", ". ")  # WikiHow artefacts, removed exactly as the harness does
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


@transform("hellaswag")
def hellaswag(row: dict) -> dict:
    context = row["ctx_a"] + " " + row["ctx_b"].capitalize()
    return {
        **row,
        "query": _hellaswag_clean(row["activity_label"] + ": " + context),
        "endings_clean": [_hellaswag_clean(e) for e in row["endings"]],
        "gold": int(row["label"]),
    }


@transform("boolq")
def boolq(row: dict) -> dict:
    """SuperGLUE rows carry label "true"/"false"; google/boolq rows carry answer true/false."""
    if "answer" in row:
        value = bool(row["answer"])
    else:
        value = {"true": True, "false": False, 1: True, 0: False}[row["label"]]  # True == 1 and False == 0 as keys
    return {**row, "label": int(value)}


_MATHQA_OPTION = re.compile(r"[abcd] \) .*?, |e \) .*?$")


@transform("mathqa_llm_adapters")
def mathqa_llm_adapters(row: dict) -> dict:
    """Rebuild MathQA's Problem/options/correct from the LLM-Adapters copies (problem and options in original
    case from one file, the gold letter from the row-aligned other file)."""
    problem, options = row["instruction"].rsplit(", The options: ", 1)
    choices = [c[4:].rstrip(" ,") for c in _MATHQA_OPTION.findall(options)]
    return {"Problem": problem, "options": options, "choices": choices, "correct": row["letter"].strip().lower()}


_SCIQ_OPTION = re.compile(r"^Answer(\d): (.*)$", re.MULTILINE)


@transform("sciq_llm_adapters")
def sciq_llm_adapters(row: dict) -> dict:
    """The reformatted SciQ test copy lists four shuffled options and names the right one; it has no support
    passage. Bring it back to the original schema (three distractors and the correct answer)."""
    text = row["instruction"]
    question = text.split("Please choose the correct answer to the question: ", 1)[1].split("\n\nAnswer1:", 1)[0]
    options = {int(n): value.strip() for n, value in _SCIQ_OPTION.findall(text)}
    right = int(row["answer"].lower().replace("answer", ""))
    distractors = [options[i] for i in sorted(options) if i != right]
    return {
        "question": question,
        "support": "",
        "distractor1": distractors[0],
        "distractor2": distractors[1],
        "distractor3": distractors[2],
        "correct_answer": options[right],
    }
