"""Prepare .ship/ for the GPU machine, whose calls carry at most 64 MiB each (see ../shared/GPU.md).

    python scripts/gpu/pack.py smollm2-135m qwen2.5-0.5b

writes the task data (compressed), the gguf wheel, and each model's file split into pieces of at most 40 MB, then
prints which paths to carry in which call. On the GPU machine, every call starts with `bash scripts/gpu/receive.sh`
(moves what it carried out of the tree) and the last one runs `python scripts/gpu/assemble.py` before the work.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import tarfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SHIP = REPO / ".ship"
PIECE = 40 * 1000 * 1000
BUDGET = 45 * 1000 * 1000  # per call: 64 MiB (67.1 MB) minus the working tree (18 MB with results/, 2026-12-03)


def main(names: list[str]) -> None:
    sys.path.insert(0, str(REPO / "src"))
    from pudding.models import packaged, require_installed
    from pudding.tasks import resolve_data_dir

    SHIP.mkdir(exist_ok=True)
    manifest = {"models": {}}
    data = SHIP / "data.tgz"
    if not data.exists():
        with tarfile.open(data, "w:gz") as tar:
            tar.add(resolve_data_dir(), arcname="data", filter=lambda t: None if t.name.endswith(".md") else t)
    wheels = SHIP / "wheels"
    if not wheels.exists():
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
                        "--python-version", "3.12", "-d", str(wheels), "gguf==0.19.0"], check=True)
    for name in names:
        spec = packaged(name)
        parts = require_installed(spec)
        if spec.file_format == "dir":  # a ready HF directory travels as a tar of it
            tar_path = SHIP / f"{name}.tar"
            with tarfile.open(tar_path, "w") as tar:
                tar.add(parts[0], arcname=name)
            parts = [tar_path]
        digest, index, written = hashlib.sha256(), 0, 0
        pieces = []
        out = None
        for part in parts:
            with open(part, "rb") as handle:
                while block := handle.read(1 << 20):
                    digest.update(block)
                    if out is None or written >= PIECE:
                        if out:
                            out.close()
                        index += 1
                        pieces.append(f"{name}.part{index:02d}")
                        out = open(SHIP / pieces[-1], "wb")
                        written = 0
                    out.write(block)
                    written += len(block)
        out.close()
        if spec.file_format == "dir":
            parts[0].unlink()
        suffix = {"gguf": ".gguf", "zip": ".zip", "dir": ".tar"}[spec.file_format]
        manifest["models"][name] = {"file": name + suffix, "sha256": digest.hexdigest(), "pieces": pieces}
    (SHIP / "manifest.json").write_text(json.dumps(manifest, indent=2))

    # a carry plan: first-fit in the order the models were named (a lease's first job needs the first model, so its
    # pieces come first), so that few calls carry everything (each call costs device time)
    items = [".ship/manifest.json", ".ship/wheels"] + [
        f".ship/{p}" for m in manifest["models"].values() for p in m["pieces"]] + [".ship/data.tgz"]

    def size(item: str) -> int:
        path = REPO / item
        return sum(f.stat().st_size for f in path.rglob("*")) if path.is_dir() else path.stat().st_size

    calls: list[list[str]] = []
    for item in items:
        fit = next((c for c in calls if sum(map(size, c)) + size(item) <= BUDGET and len(c) < 8), None)
        if fit is None:
            calls.append(fit := [])
        fit.append(item)
    for i, carry in enumerate(calls, 1):
        print(f"call {i}: carry {json.dumps(carry)}")


if __name__ == "__main__":
    main(sys.argv[1:])
