"""Bad input to every command: one clear `error:` line, a non-zero exit, no traceback, no partial output, nothing
written before lost. Most cases run the real entry point in this process (each would otherwise pay for importing
torch); those that need a process of their own (file size limit, read-only mount) run as subprocesses."""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import assert_clean_failure, cli, pudding

from pudding.bundle import Bundle, CandidateSet

SETS = [[3, 9], [11, 20], [0, 29]]


def no_leftovers(directory: Path) -> list[str]:
    """Temporary files of interrupted atomic writes that a failure left behind."""
    return [p.name for p in directory.rglob(".*") if p.name.endswith(".tmp") or p.is_dir()]


@pytest.fixture(scope="module")
def bundle(tmp_path_factory, smollm2) -> Path:
    """A bundle with candidate sets, labels and a tiny router (trained for one step), made through the API."""
    from pudding.labels import LabelTable
    from pudding.router import RouterSettings
    from pudding.router_training import save_router, train_router

    path = tmp_path_factory.mktemp("bad") / "bundle"
    opened = Bundle.create_or_open(path, smollm2.info(), 2, {})
    opened.write_candidates([CandidateSet(s, []) for s in SETS], {})
    import numpy as np

    prompts = [f"Question: what is {i} plus {i}?\nAnswer:" for i in range(4)]
    table = LabelTable(["piqa"] * 4, list(range(4)), prompts, np.arange(12, dtype=np.float32).reshape(4, 3), SETS, {})
    table.save(path / "labels.parquet")
    opened.track(path / "labels.parquet")
    settings = RouterSettings(epochs=1, warmup_steps=0, batch_size=4, max_length=16, val_fraction=0)
    router, tokenizer, history, meta = train_router(table, settings)
    save_router(path / "router", router, tokenizer, settings, SETS, history, meta, opened.model)
    opened.track(path / "router")
    return path


@pytest.fixture
def damaged(bundle, tmp_path):
    """A fresh copy of the bundle to damage."""
    copy = tmp_path / "copy"
    shutil.copytree(bundle, copy)
    return copy


# ------------------------------------------------------------------------------------------------------------------
# Arguments: unknown names, bad block lists, numbers out of range


@pytest.mark.parametrize("args, fragment", [
    # unknown model or encoder, for every command that takes one
    (["search", "--model", "nope-7b", "--output", "x.json"], "unknown model 'nope-7b'"),
    (["candidates", "--model", "nope-7b", "--output", "b"], "unknown model 'nope-7b'"),
    (["pipeline", "--model", "nope-7b", "--output", "b"], "unknown model 'nope-7b'"),
    (["generate", "--model", "nope-7b", "hi"], "unknown model 'nope-7b'"),
    (["pipeline", "--encoder", "bert-9000", "--output", "b"], "unknown model 'bert-9000'"),
    (["pipeline", "--encoder", "smollm2-135m", "--output", "b"], "is a decoder, not a router encoder"),
    (["eval", "--model", "minilm-l6"], "is a router encoder, not a decoder"),
    (["eval", "--model", "/nonexistent/model.gguf"], "unknown model"),
    # unknown task
    (["search", "--task", "nope", "--output", "x.json"], "unknown task 'nope'"),
    (["candidates", "--tasks", "piqa,nope", "--output", "b"], "unknown task 'nope'"),
    (["pipeline", "--tasks", "nope", "--output", "b"], "unknown task 'nope'"),
    (["eval", "--tasks", "piqa,piqa"], "listed twice"),
    (["eval", "--tasks", " , "], "no tasks given"),
    # block indices: negative, non-numeric, duplicate, out of range
    (["eval", "--omit", "-1"], "out of range"),
    (["eval", "--omit", "3,x"], "comma-separated list of integers"),
    (["eval", "--omit", "1.5"], "comma-separated list of integers"),
    (["eval", "--omit", "3,,4"], "comma-separated list of integers"),
    (["eval", "--omit", "99999999999999999999999"], "out of range"),
    (["generate", "--omit", "3,3", "hi"], "more than once"),
    (["generate", "--omit", "30", "hi"], "out of range"),
    (["generate", "--omit", "a", "hi"], "comma-separated list of integers"),
    # numbers: negative, zero, huge
    (["eval", "--limit", "-5"], "--limit"),
    (["eval", "--batch-tokens", "10"], "--batch-tokens"),
    (["search", "--samples", "0", "--output", "x.json"], "at least 1"),
    (["search", "--samples", "-3", "--output", "x.json"], "at least 1"),
    (["search", "--task", "piqa", "--samples", "10000000000000000000000", "--output", "x.json"], "fewer than the"),
    (["search", "--blocks", "-2", "--output", "x.json"], "at least 1"),
    (["search", "--seqlen", "1", "--method", "sleb", "--output", "x.json"], "--seqlen"),
    (["search", "--tld-reduce", "max", "--loss", "tld", "--output", "x.json"], "unknown tld reduction"),
    (["candidates", "--blocks", "99", "--output", "b"], "cannot remove 99 blocks"),
    (["candidates", "--samples", "0", "--output", "b"], "at least 1"),
    (["pipeline", "--blocks", "30", "--output", "b"], "cannot remove 30 blocks"),
    (["pipeline", "--samples", "0", "--output", "b"], "--samples"),
    (["pipeline", "--epochs", "0", "--output", "b"], "--epochs"),
    (["pipeline", "--ablations", "sets-99", "--output", "b"], "unknown ablation"),
    (["pipeline", "--calibration-tasks", "piqa,nope", "--output", "b"], "unknown task 'nope'"),
    (["pipeline", "--calibration-tasks", "wikitext2", "--output", "b"], "need question-answering tasks"),
    (["pipeline", "--lora-option", "micro-batch=8", "--output", "b"], "--lora-option is for --lora"),
    (["pipeline", "--lora", "--lora-option", "ranks=8", "--output", "b"], "not NAME=VALUE with NAME one of rank, alpha"),
    (["pipeline", "--lora", "--lora-option", "rank", "--output", "b"], "not NAME=VALUE"),
    (["pipeline", "--lora", "--lora-option", "lr=fast", "--output", "b"], "lr: 'fast' is not a number"),
    (["pipeline", "--lora", "--lora-option", "rank=0", "--output", "b"], "LoRA rank must be at least 1"),
    (["pipeline", "--lora", "--lora-option", "per-task=0", "--output", "b"], "per task must be at least 1"),
    (["generate", "--max-new-tokens", "0", "hi"], "--max-new-tokens"),
    (["generate", "--max-new-tokens", "-1", "hi"], "--max-new-tokens"),
    (["generate", "--budget", "0", "hi"], "--budget"),
    (["generate", "--max-len", "99999999999", "hi"], "--max-len"),
    (["generate", "  "], "prompt is empty"),
    (["generate", "--dtype", "int3", "hi"], "unknown dtype"),
    (["bench", "--repeats", "0", "--output", "x.json"], "--repeats"),
    (["bench", "--shape", "", "--output", "x.json", "--bundle", "/nonexistent"], "not found"),
    (["eval", "--search", "/nonexistent/s.json"], "not found"),
    (["eval", "--bundle", "/nonexistent", "--set", "0"], "bundle directory not found"),
    (["label", "--bundle", "/nonexistent"], "bundle directory not found"),
    (["train-router", "--bundle", "/nonexistent"], "bundle directory not found"),
    (["route", "--bundle", "/nonexistent", "hi"], "bundle directory not found"),
    (["generate", "--bundle", "/nonexistent", "hi"], "bundle directory not found"),
    (["models", "pull", ""], "unknown model"),
    (["lora", "--bundle", "/nonexistent"], "bundle directory not found"),
    (["generate", "--lora", "hi"], "--lora needs --bundle"),
    (["export", "--omit", "3", "--lora", "--output", "x"], "--lora needs --bundle"),
    (["export", "--omit", "3", "--lora", "--format", "gguf", "--output", "x.gguf"], "--lora is for --format hf"),
    (["bench", "--weights", "int3", "--output", "x.json"], "unknown --weights value 'int3'"),
    (["bench", "--router-dtype", "int3", "--output", "x.json"], "unknown router dtype 'int3'"),
    (["bench", "--router-encoder", "bert-9000", "--output", "x.json"], "unknown model 'bert-9000'"),
    (["bench", "--shape", "", "--bundle", "b", "--router-encoder", "bert-9000", "--output", "x.json"], "unknown model 'bert-9000'"),
    # --weights runs no router, so an encoder that is not installed is no reason to refuse (this machine has no GPU)
    (["bench", "--weights", "int8", "--router-encoder", "bert-9000", "--output", "x.json"], "needs a GPU"),
    (["bench", "--shape", "gpt-9000", "--weights", "int8", "--output", "x.json"], "unknown shape 'gpt-9000'"),
    (["bench", "--shape", "smollm2-135m", "--output", "x.json"], "benchmarked with --weights only"),
])
def test_bad_arguments(args, fragment, tmp_path, monkeypatch, smollm2):
    monkeypatch.chdir(tmp_path)
    result = cli(*args)
    assert_clean_failure(result, fragment)
    assert list(tmp_path.iterdir()) == [], "a failed command left files behind"


@pytest.mark.parametrize("args, fragment", [
    (["train-router", "--epochs", "0"], "--epochs"),
    (["train-router", "--lr", "-1"], "must be positive"),
    (["train-router", "--lr", "nan"], "must be positive"),
    (["train-router", "--batch-size", "0"], "--batch-size"),
    (["train-router", "--val-fraction", "1.5"], "--val-fraction"),
    (["train-router", "--max-length", "4"], "--max-length"),
    (["train-router", "--objective", "hinge"], "unknown router objective"),
    (["train-router", "--encoder", "bert-9000"], "unknown model 'bert-9000'"),
    (["route", "--router", "ce-soft", "hello"], "no router named ce-soft"),
    (["eval", "--set", "7"], "set 7 does not exist"),
    (["eval", "--set", "-1"], "set -1 does not exist"),
    (["eval", "--method", "magic"], "unknown baseline"),
    (["label", "--tasks", "wikitext2"], "not a multiple-choice one"),
    (["label", "--limit", "0"], "--limit"),
    (["label", "--checkpoint-every", "0"], "--checkpoint-every"),
    (["label", "--kind", "hinge"], "unknown label kind 'hinge'"),
    (["train-router", "--labels", "hinge"], "unknown --labels 'hinge'"),
    (["train-router", "--labels", "margin"], "pudding label --kind margin"),
    (["lora", "--epochs", "0"], "--epochs"),
    (["lora", "--lr", "nan"], "must be positive and finite"),
    (["lora", "--sets", "magic"], "unknown set group 'magic'"),
    (["lora", "--tasks", "nope"], "unknown task"),
    (["eval", "--set", "0", "--tasks", "piqa", "--lora"], "has no LoRA adapter"),
])
def test_bad_arguments_with_a_bundle(args, fragment, bundle):
    before = {p: p.stat().st_mtime_ns for p in bundle.rglob("*")}
    assert_clean_failure(cli(*args[:1], "--bundle", str(bundle), *args[1:]), fragment)
    assert {p: p.stat().st_mtime_ns for p in bundle.rglob("*")} == before, "a failed command changed the bundle"


# ------------------------------------------------------------------------------------------------------------------
# Files: missing, not UTF-8, corrupted, another model's


def test_non_utf8_files(tmp_path, smollm2):
    latin = "café".encode("latin-1")
    search = tmp_path / "search.json"
    search.write_bytes(b'{"method": "' + latin + b'"}')
    assert_clean_failure(cli("eval", "--search", str(search)), "not valid JSON")
    data = tmp_path / "data"
    (data / "arc_challenge" / "hf_jsonl").mkdir(parents=True)
    (data / "arc_challenge" / "hf_jsonl" / "ARC-Challenge_test.jsonl").write_bytes(b'{"question": "' + latin + b'"}\n')
    assert_clean_failure(cli("eval", "--tasks", "arc_challenge", "--data-dir", str(data)), "UnicodeDecodeError")
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "bundle.json").write_bytes(latin)
    assert_clean_failure(cli("label", "--bundle", str(bundle)), "not valid JSON")


def test_search_result_that_is_not_one(tmp_path, smollm2):
    for text in ("[]", '{"method": "greedy"}', "null", '"a string"'):
        (tmp_path / "s.json").write_text(text)
        assert_clean_failure(cli("eval", "--search", str(tmp_path / "s.json")), "not a pudding search result")


@pytest.mark.parametrize("damage, fragment", [
    ("truncate candidates.json", "candidates.json was changed or truncated"),
    ("edit bundle.json", "bundle.json was changed or truncated"),
    ("truncate labels.parquet", "labels.parquet was changed or truncated"),
    ("truncate router/head.safetensors", "router/head.safetensors was changed or truncated"),
    ("edit router/router.json", "router/router.json was changed or truncated"),
    ("truncate router/encoder/model.safetensors", "model.safetensors was changed or truncated"),
    ("garble checksums.json", "bundle checksums"),
])
def test_damaged_bundle_is_refused(damage, fragment, damaged):
    verb, name = damage.split(" ", 1)
    target = damaged / name
    if verb == "truncate":
        target.write_bytes(target.read_bytes()[: target.stat().st_size // 2])
    elif verb == "edit":
        target.write_text(target.read_text().replace('"num_blocks": 30', '"num_blocks": 31').replace('"lr": ', '"lr": 1'))
    else:
        target.write_text("{garbage")
    for command, *args in (["eval", "--tasks", "piqa", "--limit", "2"], ["route", "hello"], ["train-router"], ["label"],
                           ["generate", "hello"]):
        assert_clean_failure(cli(command, "--bundle", str(damaged), *args), fragment)


def test_bundle_files_damaged_without_checksums(damaged):
    """Bundles without a checksum list (or whose files were deleted) still fail cleanly where a file is needed."""
    (damaged / "checksums.json").unlink()
    (damaged / "labels.parquet").write_bytes(b"PAR1 not really")
    assert_clean_failure(cli("train-router", "--bundle", str(damaged)), "not a readable label table")
    (damaged / "router" / "head.safetensors").write_bytes(b"\x00" * 10)
    assert_clean_failure(cli("route", "--bundle", str(damaged), "hello"), "router")
    (damaged / "router" / "head.safetensors").unlink()
    assert_clean_failure(cli("route", "--bundle", str(damaged), "hello"), "router")
    (damaged / "candidates.json").write_text('{"sets": [{"blocks": [3, 9]}]}')
    assert_clean_failure(cli("label", "--bundle", str(damaged)), "not a valid list of candidate sets")
    (damaged / "candidates.json").write_text('{"sets": [{"blocks": [3, 99], "sources": []}]}')
    assert_clean_failure(cli("label", "--bundle", str(damaged)), "out of range")


def test_bundle_of_another_model(bundle, tmp_path):
    """A real other model (a tiny Llama saved as a Hugging Face directory) against the bundle."""
    from conftest import build_tiny

    other = tmp_path / "tiny-llama"
    build_tiny("llama").save_pretrained(other)
    shutil.copy(Path(__file__).parent / "conftest.py", other / "unused.txt")  # any extra file is ignored
    for args in (["label", "--bundle", str(bundle), "--model", str(other)],
                 ["eval", "--bundle", str(bundle), "--model", str(other), "--set", "0", "--tasks", "piqa"],
                 ["generate", "--bundle", str(bundle), "--model", str(other), "hi"],
                 ["pipeline", "--output", str(bundle), "--model", str(other), "--blocks", "2"]):
        assert_clean_failure(cli(*args), "fingerprint")


def test_labels_for_other_sets_are_refused(damaged):
    from pudding.labels import LabelTable

    opened = Bundle.open(damaged)
    table = LabelTable.load(damaged / "labels.parquet")
    table.sets = [[1, 2], [3, 4], [5, 6]]
    table.save(damaged / "labels.parquet")
    opened.track(damaged / "labels.parquet")
    assert_clean_failure(cli("train-router", "--bundle", str(damaged)), "other candidate sets")


# ------------------------------------------------------------------------------------------------------------------
# Writing: read-only directories, a full disk


@pytest.fixture
def read_only_dir(tmp_path):
    """A directory nobody can write to: permissions where they bind, else (as root) a read-only tmpfs mount."""
    path = tmp_path / "ro"
    path.mkdir()
    (path / "old.json").write_text('{"kept": true}\n')
    if os.geteuid() != 0:
        path.chmod(0o555)
        yield path
        path.chmod(0o755)
        return
    staging = tmp_path / "staging"
    shutil.copytree(path, staging)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(path)], capture_output=True, check=False)
    if mounted.returncode != 0:
        pytest.skip("running as root without permission to mount a read-only file system")
    shutil.copytree(staging, path, dirs_exist_ok=True)
    subprocess.run(["mount", "-o", "remount,ro", str(path)], check=True)
    yield path
    subprocess.run(["umount", str(path)], check=True)


@pytest.mark.slow
def test_read_only_output(read_only_dir, smollm2, tmp_path):
    for args in (["search", "--samples", "1", "--blocks", "1", "--task", "piqa", "--output", str(read_only_dir / "s.json")],
                 ["eval", "--tasks", "piqa", "--limit", "2", "--output", str(read_only_dir / "old.json")],
                 ["candidates", "--output", str(read_only_dir / "bundle")],
                 ["bench", "--shape", "", "--output", str(read_only_dir / "b.json")]):
        assert_clean_failure(cli(*args), str(read_only_dir))
    assert sorted(p.name for p in read_only_dir.iterdir()) == ["old.json"]
    assert json.loads((read_only_dir / "old.json").read_text()) == {"kept": True}


def _limit_file_size(size: int):
    return lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (size, size))


@pytest.mark.slow
def test_full_disk(tmp_path, smollm2):
    """Writes beyond a file size limit fail with EFBIG, as on a full disk: a clean error, the old result intact."""
    output = tmp_path / "eval.json"
    output.write_text('{"previous": "result"}\n')
    result = subprocess.run([sys.executable, "-m", "pudding.cli", "eval", "--tasks", "piqa", "--limit", "2",
                             "--output", str(output)], capture_output=True, text=True, check=False, preexec_fn=_limit_file_size(512))
    assert_clean_failure(result, f"could not write {output}")
    assert json.loads(output.read_text()) == {"previous": "result"}
    assert no_leftovers(tmp_path) == []


@pytest.mark.slow
def test_full_disk_while_labelling(bundle, tmp_path):
    """Labels bigger than the disk allows: the command fails cleanly and the bundle keeps its labels."""
    copy = tmp_path / "bundle"
    shutil.copytree(bundle, copy)
    before = (copy / "labels.parquet").read_bytes()
    result = subprocess.run([sys.executable, "-m", "pudding.cli", "label", "--bundle", str(copy), "--tasks", "piqa",
                             "--limit", "16", "--checkpoint-every", "16"],
                            capture_output=True, text=True, check=False, preexec_fn=_limit_file_size(1024))
    assert_clean_failure(result, "could not write")
    assert (copy / "labels.parquet").read_bytes() == before
    assert no_leftovers(copy) == []
    Bundle.open(copy)  # still whole: its checksums hold


def test_pudding_subprocess_sees_one_line(tmp_path):
    """The same clean failure from a real process (no traceback on stderr either)."""
    assert_clean_failure(pudding("label", "--bundle", str(tmp_path)), "not a pudding bundle")
