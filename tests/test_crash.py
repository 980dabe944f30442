"""Long jobs survive a crash: the real CLI is killed with SIGKILL at a random (seeded) point once some progress is
checkpointed, rerun, and must give exactly the result of an uninterrupted run without recomputing finished steps."""

from __future__ import annotations

import json
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import pudding

from pudding.bundle import Bundle, CandidateSet
from pudding.labels import LabelTable

# three candidate sets of k = 6 (the default k of the 30-block model, so that the pipeline accepts the bundle)
SETS = [[3, 9, 11, 17, 20, 25], [4, 14, 18, 20, 24, 29], [0, 2, 5, 12, 20, 28]]
LABEL_LIMIT = "8"  # prompts per calibration task (five tasks): one checkpointed chunk per task
EPOCHS = "3"  # router checkpoints after epochs 1 and 2

pytestmark = pytest.mark.slow  # every test here kills and resumes real jobs


def start(*args: str, log: Path) -> subprocess.Popen:
    with open(log, "w") as handle:
        return subprocess.Popen([sys.executable, "-m", "pudding.cli", *args], stdout=handle, stderr=subprocess.STDOUT)


def progress(checkpoint: Path) -> int:
    """Finished steps in a checkpoint (search steps, label chunks or router epochs); 0 while there is none."""
    state = checkpoint / "state.json" if checkpoint.is_dir() else checkpoint
    try:
        data = json.loads(state.read_text())
    except (OSError, ValueError):  # not written yet, or the directory is being replaced
        return 0
    return data["epochs_done"] if "epochs_done" in data else len(data["steps"])


def kill_after(process: subprocess.Popen, checkpoint: Path, steps: int, timeout: float = 300) -> int:
    """SIGKILL the job as soon as its checkpoint holds `steps` finished steps; returns the steps it had saved."""
    deadline = time.monotonic() + timeout
    while progress(checkpoint) < steps:
        assert process.poll() is None, f"the job ended (rc {process.returncode}) before checkpointing {steps} steps"
        assert time.monotonic() < deadline, "no progress checkpointed in time"
        time.sleep(0.01)
    assert process.poll() is None, "the job finished before it could be killed: give it more work"
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL
    return progress(checkpoint)


def crash_and_resume(args: list[str], checkpoint: Path, total_steps: int, tmp_path: Path, seed: int):
    """Run, kill after a seeded number of finished steps (1 to total - 1), rerun; returns (saved steps, rerun)."""
    point = random.Random(seed).randint(1, total_steps - 1)
    saved = kill_after(start(*args, log=tmp_path / "killed.log"), checkpoint, point)
    assert saved >= point
    rerun = pudding(*args)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert not checkpoint.exists(), "the checkpoint is removed once the result is written"
    return saved, rerun


def count(pattern: str, output: str) -> int:
    """Lines of a job's log that report one computed step (`epoch  2:`, `chunk 3:`, `step 1:`)."""
    return len(re.findall(rf"^\s+.*\b{pattern} +\d+:", output, flags=re.MULTILINE))


def _bundle_with_candidates(path: Path, smollm2) -> Path:
    bundle = Bundle.create_or_open(path, smollm2.info(), 6, {})
    bundle.write_candidates([CandidateSet(s, [{"task": "hand-picked"}]) for s in SETS], {})
    return path


@pytest.fixture(scope="module")
def reference(tmp_path_factory, smollm2) -> Path:
    """Uninterrupted runs: labels, then a router trained on them."""
    bundle = _bundle_with_candidates(tmp_path_factory.mktemp("reference") / "bundle", smollm2)
    labelled = pudding("label", "--bundle", str(bundle), "--limit", LABEL_LIMIT, "--checkpoint-every", LABEL_LIMIT)
    assert labelled.returncode == 0, labelled.stderr[-3000:]
    trained = pudding("train-router", "--bundle", str(bundle), "--epochs", EPOCHS)
    assert trained.returncode == 0, trained.stderr[-3000:]
    return bundle


def assert_same_labels(bundle: Path, reference: Path) -> None:
    ours, theirs = LabelTable.load(bundle / "labels.parquet"), LabelTable.load(reference / "labels.parquet")
    assert (ours.tasks, ours.indices, ours.prompts, ours.sets) == (theirs.tasks, theirs.indices, theirs.prompts, theirs.sets)
    np.testing.assert_array_equal(ours.labels, theirs.labels)  # bit for bit


def assert_same_router(bundle: Path, reference: Path) -> None:
    from safetensors.torch import load_file

    history = [json.loads((b / "router" / "router.json").read_text())["history"] for b in (bundle, reference)]
    assert history[0] == history[1]  # every step's loss
    for name in ("head.safetensors", "encoder/model.safetensors"):
        ours, theirs = load_file(bundle / "router" / name), load_file(reference / "router" / name)
        assert ours.keys() == theirs.keys()
        assert all(ours[k].equal(theirs[k]) for k in ours), f"{name} differs"


def test_search_resumes_after_sigkill(tmp_path, smollm2):
    output = tmp_path / "search.json"
    args = ["search", "--task", "piqa", "--samples", "2", "--blocks", "3", "--seed", "1", "--output", str(output)]
    saved, rerun = crash_and_resume(args, output.with_name("search.json.partial"), 3, tmp_path, seed=11)
    assert f"{saved} of 3 steps done" in rerun.stdout
    assert count("step", rerun.stdout) == 3 - saved  # finished steps were not computed again
    reference = tmp_path / "reference.json"
    uninterrupted = pudding(*args[:-1], str(reference))
    assert uninterrupted.returncode == 0, uninterrupted.stderr[-3000:]
    resumed, expected = json.loads(output.read_text()), json.loads(reference.read_text())
    for key in ("blocks", "removal_order", "loss_after_step", "candidate_losses", "calibration", "model"):
        assert resumed[key] == expected[key], key


def test_router_training_resumes_bit_identically(tmp_path, reference):
    bundle = tmp_path / "bundle"
    shutil.copytree(reference, bundle, ignore=shutil.ignore_patterns("router"))  # labels, no router yet
    args = ["train-router", "--bundle", str(bundle), "--epochs", EPOCHS]
    saved, rerun = crash_and_resume(args, bundle / "router.partial", 3, tmp_path, seed=13)
    assert f"resuming after epoch {saved}" in rerun.stdout
    assert count("epoch", rerun.stdout) == 3 - saved
    assert_same_router(bundle, reference)


def test_pipeline_resumes_after_sigkill(tmp_path, smollm2, reference):
    """Killed while labelling, the pipeline picks up there (the labels' checkpoint is the one `pudding label` keeps),
    then trains the router: labels and router equal the uninterrupted `label` and `train-router` runs."""
    bundle = _bundle_with_candidates(tmp_path / "bundle", smollm2)
    args = ["pipeline", "--output", str(bundle), "--stages", "labels,router", "--label-limit", LABEL_LIMIT,
            "--epochs", EPOCHS, "--tasks", "piqa"]
    saved, rerun = crash_and_resume(args, bundle / "labels.parquet.partial", 5, tmp_path, seed=14)
    assert f"resuming: {saved} chunks already labelled" in rerun.stdout
    assert count("chunk", rerun.stdout) == 5 - saved
    assert_same_labels(bundle, reference)
    assert_same_router(bundle, reference)


def test_lora_training_resumes_bit_identically(tmp_path, smollm2):
    """Killed after a seeded number of optimiser steps, `pudding lora` resumes from its checkpoint and writes the
    adapter an uninterrupted run writes, byte for byte."""
    from safetensors.torch import load_file

    small = ["--per-task", "4", "--text-windows", "4", "--batch-size", "4", "--micro-batch", "2", "--max-length", "32",
             "--epochs", "2", "--save-every", "1"]  # 24 examples: 6 steps an epoch, 12 in all
    adapters = []
    for name, crash in (("reference", False), ("crashed", True)):
        bundle = Bundle.create_or_open(tmp_path / name, smollm2.info(), 6, {})
        bundle.write_candidates([CandidateSet(SETS[0], [{"task": "hand-picked"}])], {})
        args = ["lora", "--bundle", str(bundle.path), *small]
        folder = bundle.path / "adapters" / ("omit-" + "-".join(map(str, SETS[0])))
        if crash:
            saved, rerun = crash_and_resume(args, folder.with_name(folder.name + ".partial"), 12, tmp_path, seed=15)
            assert f"resuming after step {saved} of 12" in rerun.stdout + rerun.stderr
        else:
            assert pudding(*args).returncode == 0
        adapters.append(load_file(str(folder / "adapter_model.safetensors")))
    assert adapters[0].keys() == adapters[1].keys()
    assert all(torch.equal(adapters[0][k], adapters[1][k]) for k in adapters[0])
