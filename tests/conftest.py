"""Shared fixtures and helpers: the real packaged SmolLM2-135M, tiny models of every supported family built from a
config, the real task data in ../shared/data, the `pudding` command run as a user runs it, a real `pudding serve`
process, and a synthetic label table a router can learn."""

from __future__ import annotations

import contextlib
import io
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
DATA_DIR = Path(os.environ.get("PUDDING_DATA_DIR", REPO.parent / "shared" / "data"))

# Every family the decoder supports, as a tiny random model. Sliding windows are short (4 tokens) so that
# sequences of 16 tokens exercise them; Qwen2 and Gemma 3 mix sliding and full blocks.
TINY_CONFIGS = {
    "llama": ("LlamaConfig", dict(intermediate_size=96, num_key_value_heads=2)),
    "mistral": ("MistralConfig", dict(intermediate_size=96, num_key_value_heads=2, sliding_window=4)),
    "qwen2": ("Qwen2Config", dict(intermediate_size=96, num_key_value_heads=2, use_sliding_window=True, sliding_window=4, max_window_layers=3)),
    "phi3": ("Phi3Config", dict(intermediate_size=96, num_key_value_heads=2, pad_token_id=0)),
    "gemma3": ("Gemma3TextConfig", dict(intermediate_size=96, num_key_value_heads=2, head_dim=16, sliding_window=4, layer_types=[
        "sliding_attention", "full_attention", "sliding_attention", "sliding_attention", "full_attention", "sliding_attention"])),
    "opt": ("OPTConfig", dict(ffn_dim=96, word_embed_proj_dim=32, max_position_embeddings=64)),
}


def build_tiny(family: str, seed: int = 0, init: float = 0.02):
    """A 6-block model of the family; a larger `init` spreads the logits, so greedy decoding meets no near-ties."""
    import transformers

    class_name, extra = TINY_CONFIGS[family]
    config = getattr(transformers, class_name)(
        hidden_size=64, num_hidden_layers=6, num_attention_heads=4, vocab_size=256, initializer_range=init, **extra
    )
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    return model.eval().requires_grad_(False)


# The files whose tests take longest, collected first: scripts/test.sh hands files to its workers in collection order
# (--no-loadscope-reorder), so the long ones start at once and the workers finish together.
LONGEST_FIRST = ["test_router.py", "test_crash.py", "test_lora.py", "test_search.py", "test_export.py", "test_harness.py"]


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the other files keep their order


@pytest.fixture(params=sorted(TINY_CONFIGS))
def tiny_model(request):
    return build_tiny(request.param)


@pytest.fixture(scope="session")
def data_dir() -> Path:
    if not (DATA_DIR / "arc_easy").is_dir():
        pytest.fail(f"task data not found at {DATA_DIR}; set PUDDING_DATA_DIR")
    return DATA_DIR


@pytest.fixture(scope="session", autouse=True)
def _environment(data_dir):
    os.environ["PUDDING_DATA_DIR"] = str(data_dir)
    # The suite runs in parallel workers (scripts/test.sh): the cores are shared out among them, here and in every
    # `pudding` child process, since oversubscribed thread pools spin against each other.
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    threads = max(1, min(2, (os.cpu_count() or 1) // workers))
    os.environ["OMP_NUM_THREADS"] = str(threads)
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def smollm2():
    """The real packaged model (converted once into the cache, then loaded in seconds)."""
    from pudding.models import load_decoder

    return load_decoder("smollm2-135m", device="cpu")


# ------------------------------------------------------------------------------------------------------------------
# The command line, run as a user runs it


def pudding(*args: str, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pudding.cli", *args],
        capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})},
    )


def cli(*args: str) -> SimpleNamespace:
    """`pudding ARGS` through the real entry point, in this process; an escaping exception counts as a traceback."""
    from pudding.cli import main

    stdout, stderr = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        try:
            main(list(args))
        except SystemExit as done:
            code = done.code if isinstance(done.code, int) else 1
        except Exception as problem:  # noqa: BLE001 - what a user would see as a traceback
            code, stderr = 1, io.StringIO(f"Traceback (escaped): {type(problem).__name__}: {problem}")
    return SimpleNamespace(returncode=code, stdout=stdout.getvalue(), stderr=stderr.getvalue())


def assert_clean_failure(result: subprocess.CompletedProcess, fragment: str) -> None:
    assert result.returncode != 0
    assert "Traceback" not in result.stderr + result.stdout
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines and lines[-1].startswith("error: ") and fragment in lines[-1], result.stderr
    assert len([l for l in lines if l.startswith("error:")]) == 1


# ------------------------------------------------------------------------------------------------------------------
# Routers


SETS = [[3, 9], [11, 20], [0, 29], [3, 20]]  # candidate sets of the real SmolLM2-135M (30 blocks)


def synthetic_table(n: int = 96):
    """Prompts of two kinds whose best set differs: a router should learn to tell them apart."""
    from pudding.labels import LabelTable

    rng = np.random.default_rng(0)
    prompts, labels = [], []
    for i in range(n):
        if i % 2:
            prompts.append(f"Question: what does a {['cat', 'dog', 'bird'][i % 3]} eat?\nAnswer:")
            labels.append([1.0, 3.0, 2.0, 2.5] + rng.normal(0, 0.05, 4))
        else:
            prompts.append(f"The man opened the {['door', 'box', 'jar'][i % 3]} and")
            labels.append([3.0, 1.0, 2.0, 2.5] + rng.normal(0, 0.05, 4))
    return LabelTable(["t"] * n, list(range(n)), prompts, np.array(labels, np.float32), SETS, {})


# ------------------------------------------------------------------------------------------------------------------
# A real server


class ServerProcess:
    """`pudding serve ARGS` in a child process on a free loopback port, ready once /health answers (for the tests
    and benchmarks/load_test.py, which talk to the server as any client would)."""

    def __init__(self, args: list[str], log_path, start_timeout: float = 180) -> None:
        import httpx

        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self._http = httpx.Client(timeout=10)
        with open(log_path, "w") as log:
            self.process = subprocess.Popen([sys.executable, "-m", "pudding.cli", "serve", *args, "--port", str(self.port)],
                                            stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + start_timeout
        while not self.healthy():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                tail = Path(log_path).read_text(errors="replace")[-3000:]
                raise RuntimeError(f"the server did not start; its log ends with:\n{tail}")
            time.sleep(0.5)

    def healthy(self) -> bool:
        import httpx

        try:
            return self.health()["status"] == "ok"
        except (httpx.HTTPError, ValueError, KeyError):
            return False

    def health(self) -> dict:
        return self._http.get(f"{self.url}/health").json()

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self._http.close()

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def hopper_resources(fn, signature: dict, constants: dict, config) -> dict[str, int]:
    """A Triton kernel compiled for sm_90 on this machine (no GPU needed: Triton's own ptxas), and the registers a
    thread (REG) and the local-memory stack (STACK, spills) it uses."""
    import re

    from pudding import kernels

    usage = kernels.cuobjdump(kernels.compile_for_hopper(fn, signature, constants, config), "--dump-resource-usage")
    return {key: int(re.search(rf"{key}:(\d+)", usage).group(1)) for key in ("REG", "STACK")}
