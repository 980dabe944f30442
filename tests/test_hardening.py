"""Hardening, as an adversarial user probes it: damaged model and data files, text that is not text, outputs that
are not plain files, failures that must leave nothing behind, data that changed under a bundle, Ctrl-C. Each case is
a class of inputs, not one example; every failure is one `error:` line and no traceback."""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import pytest
from conftest import DATA_DIR, assert_clean_failure, cli


@pytest.fixture(scope="module")
def model_dir(smollm2) -> Path:
    return smollm2.ref.directory


# ------------------------------------------------------------------------------------------------------------------
# Model files that are not what they claim


def _gguf_variants(tmp: Path, real: Path) -> dict[str, Path]:
    made = {}
    for name, data in {
        "random bytes": os.urandom(50_000),
        "empty": b"",
        "magic then junk": b"GGUF" + os.urandom(5_000),
        "magic, version 3, then junk": b"GGUF\x03\x00\x00\x00" + os.urandom(5_000),
    }.items():
        path = tmp / f"{name.replace(' ', '-').replace(',', '')}.gguf"
        path.write_bytes(data)
        made[name] = path
    truncated = tmp / "truncated.gguf"
    with open(real, "rb") as source:
        truncated.write_bytes(source.read(3_000_000))
    made["a real model cut short"] = truncated
    return made


@pytest.fixture(scope="module")
def gguf_files(tmp_path_factory, smollm2) -> dict[str, Path]:
    from pudding.models import installed_parts, packaged

    return _gguf_variants(tmp_path_factory.mktemp("gguf"), installed_parts(packaged("smollm2-135m"))[0])


@pytest.mark.parametrize("command", [["eval", "--tasks", "piqa", "--limit", "1"], ["generate", "hello"],
                                     ["export", "--omit", "3", "--output", "OUT"]])
def test_damaged_gguf_files_are_refused_in_one_line(gguf_files, command, tmp_path):
    for what, path in gguf_files.items():
        args = [a.replace("OUT", str(tmp_path / "out")) for a in command]
        result = cli(*args[:1], "--model", str(path), *args[1:])
        assert_clean_failure(result, "GGUF" if what != "empty" else "empty")
        assert not (tmp_path / "out").exists()


def _hf_copy(model_dir: Path, target: Path) -> Path:
    target.mkdir()
    for item in model_dir.iterdir():
        if item.is_file():
            shutil.copy2(item, target / item.name)
    return target


@pytest.mark.parametrize("damage, fragment", [
    (lambda d: (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:5000]), "could not load"),
    (lambda d: (d / "model.safetensors").write_bytes(os.urandom(20_000)), "could not load"),
    (lambda d: (d / "model.safetensors").write_bytes(b""), "could not load"),
    (lambda d: (d / "config.json").write_text("{ not json"), "not valid JSON"),
    (lambda d: (d / "config.json").write_text("[1, 2, 3]"), "not a decoder's config"),
    (lambda d: (d / "config.json").write_text('{"model_type": "llama"}'), "not a decoder's config"),
    (lambda d: (d / "config.json").write_text('{"model_type": "llama", "num_hidden_layers": "thirty"}'), "not a decoder's config"),
    (lambda d: (d / "config.json").write_text('{"model_type": "nope", "num_hidden_layers": 3}'), "could not load"),
], ids=["truncated", "garbage", "empty weights", "config not JSON", "config a list", "no depth", "depth a string",
        "unknown family"])
@pytest.mark.parametrize("command", [["eval", "--tasks", "piqa", "--limit", "1"], ["generate", "hi"],
                                     ["export", "--omit", "1", "--output", "OUT"]])
def test_damaged_model_directories_are_refused_in_one_line(model_dir, tmp_path, damage, fragment, command):
    copy = _hf_copy(model_dir, tmp_path / "model")
    damage(copy)
    args = [a.replace("OUT", str(tmp_path / "out")) for a in command]
    assert_clean_failure(cli(*args[:1], "--model", str(copy), *args[1:]), fragment)
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------------------------------
# Data files


def _data_copy(tmp: Path, *tasks: str) -> Path:
    data = tmp / "data"
    data.mkdir()
    for task in tasks:
        shutil.copytree(DATA_DIR / task, data / task)
    return data


@pytest.mark.parametrize("cut", [0, 100, 200_000])
def test_truncated_arrow_files_are_refused(tmp_path, cut):
    data = _data_copy(tmp_path, "hellaswag")
    arrow = data / "hellaswag" / "hf_arrow_validation" / "data-00000-of-00001.arrow"
    arrow.write_bytes(arrow.read_bytes()[:cut])
    assert_clean_failure(cli("eval", "--tasks", "hellaswag", "--limit", "2", "--data-dir", str(data)), "cannot read")


@pytest.mark.parametrize("command, split", [
    (["eval", "--tasks", "arc_challenge", "--limit", "2"], "test"),
    (["search", "--task", "arc_challenge", "--samples", "2", "--blocks", "1", "--output", "OUT"], "train"),
])
def test_rows_that_cannot_be_read_are_announced_on_the_console(tmp_path, smollm2, command, split):
    data = _data_copy(tmp_path, "arc_challenge")
    for name in ("test", "train"):
        raw = data / "arc_challenge" / "hf_jsonl" / f"ARC-Challenge_{name}.jsonl"
        rows = raw.read_text().splitlines()
        rows[1:1] = ['{"question": "truncated', "{}", '{"question": "q", "choices": {"text": ["a"], "label": ["A"]}, "answerKey": "Z"}']
        raw.write_text("\n".join(rows) + "\n")
    args = [a.replace("OUT", str(tmp_path / "out.json")) for a in command]
    result = cli(*args, "--data-dir", str(data))
    assert result.returncode == 0, result.stderr
    assert f"warning: arc_challenge: 3 rows of its {split} split could not be read" in result.stderr


# ------------------------------------------------------------------------------------------------------------------
# Text that is not text


INVALID_UTF8 = [b"caf\xe9 \xff", b"\xc3", b"ok \xed\xa0\x80 surrogate", b"\x80\x80\x80"]


@pytest.mark.parametrize("raw", INVALID_UTF8)
@pytest.mark.parametrize("extra", [[], ["--chat"]])
def test_prompts_that_are_not_utf8_are_refused(raw, extra):
    prompt = raw.decode("utf-8", "surrogateescape")  # what Python makes of such bytes on the command line
    assert_clean_failure(cli("generate", "--max-new-tokens", "2", *extra, prompt), "not valid UTF-8")


def test_a_subprocess_with_a_non_utf8_argument_fails_cleanly():
    result = subprocess.run([sys.executable, "-m", "pudding.cli", "generate", "--max-new-tokens", "2", b"caf\xe9 \xff"],
                            capture_output=True, text=True, timeout=300)
    assert_clean_failure(result, "not valid UTF-8")


# ------------------------------------------------------------------------------------------------------------------
# Outputs that are not plain files, and failures that leave nothing behind


def test_outputs_never_replace_what_is_not_a_regular_file(tmp_path, smollm2):
    args = ["eval", "--tasks", "piqa", "--limit", "2", "--output"]
    # a directory: refused before any work
    assert_clean_failure(cli(*args, str(tmp_path)), "is a directory")
    # a device: written into, never replaced (/dev/full refuses the bytes: one error line, the device intact)
    assert_clean_failure(cli(*args, "/dev/full"), "could not write /dev/full")
    assert stat.S_ISCHR(os.stat("/dev/full").st_mode)
    # a named pipe: written into (someone reads it), still a pipe afterwards
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    received = []
    reader = threading.Thread(target=lambda: received.append(open(fifo, "rb").read()))
    reader.start()
    assert cli(*args, str(fifo)).returncode == 0
    reader.join(timeout=60)
    assert json.loads(received[0])["tasks"]["piqa"]["n"] == 2 and stat.S_ISFIFO(os.stat(fifo).st_mode)
    # a symbolic link: followed; the file it points to gets the results, the link stays a link
    target, link = tmp_path / "target.json", tmp_path / "link.json"
    target.write_text("old")
    link.symlink_to(target)
    assert cli(*args, str(link)).returncode == 0
    assert link.is_symlink() and json.loads(target.read_text())["tasks"]["piqa"]["n"] == 2


@pytest.mark.parametrize("command", [
    ["eval", "--tasks", "piqa", "--limit", "2", "--output", "EXISTING"],
    ["search", "--task", "piqa", "--samples", "2", "--blocks", "1", "--output", "EXISTING"],
    ["bench", "--shape", "", "--output", "EXISTING"],
])
def test_an_output_that_is_a_directory_fails_before_the_work(tmp_path, command):
    existing = tmp_path / "existing"
    existing.mkdir()
    started = time.perf_counter()
    assert_clean_failure(cli(*[a.replace("EXISTING", str(existing)) for a in command]), "is a directory")
    assert time.perf_counter() - started < 20  # refused up front, not after the job
    assert sorted(p.name for p in tmp_path.iterdir()) == ["existing"] and not list(existing.iterdir())


def _pack(tmp: Path, bundle_json: str) -> Path:
    root = tmp / "pack" / "inner"
    root.mkdir(parents=True)
    (root / "bundle.json").write_text(bundle_json)
    archive = tmp / "pack.tar"
    with tarfile.open(archive, "w") as tar:
        tar.add(root, arcname="inner")
    return archive


@pytest.mark.parametrize("manifest", ["{ broken", '{"format": "something-else"}', "[]"])
def test_unpacking_a_pack_whose_bundle_does_not_open_leaves_nothing(tmp_path, manifest):
    archive = _pack(tmp_path, manifest)
    output = tmp_path / "unpacked"
    assert_clean_failure(cli("unpack", str(archive), "--output", str(output)), "bundle")
    assert not output.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".unpacked")]


def test_unpack_names_a_directory_given_as_the_archive(tmp_path):
    assert_clean_failure(cli("unpack", str(tmp_path), "--output", str(tmp_path / "u")), "is a directory")


# ------------------------------------------------------------------------------------------------------------------
# Options that used to be read too generously


@pytest.mark.parametrize("omit, fragment", [
    ("", "--omit is empty"), ("  ", "--omit is empty"), ("１２", "comma-separated"), ("٣", "comma-separated"),
    ("1_2", "comma-separated"), ("+3", "comma-separated"), ("0x3", "comma-separated"),
])
@pytest.mark.parametrize("command", [["eval", "--tasks", "piqa", "--limit", "1"], ["generate", "hi"]])
def test_block_lists_are_ascii_integers_and_never_empty(omit, fragment, command):
    assert_clean_failure(cli(*command[:1], "--omit", omit, *command[1:]), fragment)


# ------------------------------------------------------------------------------------------------------------------
# Ctrl-C


def _wait_for_cpu_seconds(process: subprocess.Popen, seconds: float, timeout: float = 300) -> None:
    """Until the process has run for `seconds` of CPU time (a wall-clock wait is too short on a loaded machine, where
    a Ctrl-C may then land in the middle of Python's imports)."""
    ticks, deadline = os.sysconf("SC_CLK_TCK"), time.monotonic() + timeout
    while process.poll() is None and time.monotonic() < deadline:
        fields = Path(f"/proc/{process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        if (int(fields[11]) + int(fields[12])) / ticks >= seconds:  # user + system time
            return
        time.sleep(0.2)


@pytest.mark.slow
@pytest.mark.parametrize("args", [["eval", "--tasks", "hellaswag", "--limit", "3000"],
                                  ["search", "--task", "hellaswag", "--samples", "64", "--blocks", "3"]])
def test_ctrl_c_says_interrupted(args, tmp_path):
    extra = ["--output", str(tmp_path / "s.json")] if args[0] == "search" else []
    # Ctrl-C as a terminal delivers it: to a process that handles SIGINT (a suite started in the background inherits
    # it ignored, and a child keeps an ignored signal ignored)
    process = subprocess.Popen([sys.executable, "-m", "pudding.cli", *args, *extra], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    _wait_for_cpu_seconds(process, 12)  # the model is loaded and the work under way, however busy the machine is
    process.send_signal(signal.SIGINT)
    try:
        _, stderr = process.communicate(timeout=120)
    finally:
        process.kill()  # never leave the job running on a failure
        process.wait()
    assert process.returncode == 130
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert lines[-1] == "error: interrupted" and "Traceback" not in stderr


def test_ctrl_c_while_the_command_starts_says_interrupted():
    """The `pudding` entry point, with the Ctrl-C arriving while the CLI module is still being imported (simulated by
    an import hook that raises it): one line and exit 130, no traceback."""
    code = ("import builtins, sys\n"
            "real = builtins.__import__\n"
            "def interrupted(name, globals=None, locals=None, fromlist=(), level=0):\n"
            "    if name == 'cli' and level == 1:\n"
            "        raise KeyboardInterrupt\n"
            "    return real(name, globals, locals, fromlist, level)\n"
            "builtins.__import__ = interrupted\n"
            "from pudding.entry import main\n"
            "main()\n")
    result = subprocess.run([sys.executable, "-c", code, "eval"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 130
    assert result.stderr.strip() == "error: interrupted"


# ------------------------------------------------------------------------------------------------------------------
# Bundles and their data, packs


@pytest.fixture(scope="module")
def small_bundle(tmp_path_factory, smollm2) -> Path:
    from pudding.bundle import Bundle, CandidateSet
    from pudding.tasks import data_versions

    path = tmp_path_factory.mktemp("hard") / "bundle"
    bundle = Bundle.create_or_open(path, smollm2.info(), 2, {})
    bundle.write_candidates([CandidateSet([3, 9], [{"task": "piqa", "loss": "tl"}])], {})
    bundle.record_data(data_versions(["arc_easy", "piqa"], DATA_DIR))
    return path


@pytest.mark.parametrize("edit", [
    lambda rows: rows[0].update(question="an edited question"),
    lambda rows: rows.pop(),
    lambda rows: rows.append(dict(rows[0])),
], ids=["edited", "one row fewer", "one row more"])
def test_a_bundle_refuses_data_other_than_its_own(small_bundle, tmp_path, edit):
    data = _data_copy(tmp_path, "arc_easy", "piqa")
    test = data / "arc_easy" / "hf_json" / "test.json"
    rows = json.loads(test.read_text())
    edit(rows)
    test.write_text(json.dumps(rows))
    before = (small_bundle / "bundle.json").read_bytes()
    for args in (["--set", "0"], ["--omit", "3"]):
        result = cli("eval", "--bundle", str(small_bundle), *args, "--tasks", "arc_easy", "--limit", "2", "--data-dir", str(data))
        assert_clean_failure(result, "task data of arc_easy differs")
    assert (small_bundle / "bundle.json").read_bytes() == before


# .tgz takes the .tar.gz path (export.TAR_SUFFIXES): one compressed pack is enough (each compresses the model)
@pytest.mark.parametrize("name", ["b.tar", pytest.param("b.tar.gz", marks=pytest.mark.slow)])
def test_packs_as_tar_and_compressed_tar(small_bundle, tmp_path, name, smollm2):
    archive = tmp_path / name
    assert cli("pack", "--bundle", str(small_bundle), "--output", str(archive)).returncode == 0
    assert archive.is_file() and tarfile.is_tarfile(archive)
    result = cli("unpack", str(archive), "--output", str(tmp_path / "u"))
    assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / "u" / "candidates.json").read_text())["sets"][0]["blocks"] == [3, 9]
