"""On the GPU machine: join the carried model pieces, check them, unpack the data, install the wheels.

Prints the environment variables to export (PUDDING_MODELS_DIR, PUDDING_DATA_DIR, PYTHONPATH).
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import tarfile
from pathlib import Path

SHIP = Path("/root/ship")
MODELS = Path("/root/models")
DATA = Path("/root/data")
SITE = Path("/tmp/site")


def main() -> None:
    manifest = json.loads((SHIP / "manifest.json").read_text())
    MODELS.mkdir(exist_ok=True)
    for name, entry in manifest["models"].items():
        target = MODELS / entry["file"]
        if target.exists() or not all((SHIP / piece).exists() for piece in entry["pieces"]):
            continue
        digest = hashlib.sha256()
        with open(target, "wb") as out:
            for piece in entry["pieces"]:
                data = (SHIP / piece).read_bytes()
                digest.update(data)
                out.write(data)
        if digest.hexdigest() != entry["sha256"]:
            target.unlink()
            sys.exit(f"{name}: sha256 mismatch after joining the pieces")
        if target.suffix == ".tar":  # a ready HF directory: unpack it as MODELS/NAME/
            with tarfile.open(target) as tar:
                tar.extractall(MODELS)
        print(f"{name}: {target} ok", file=sys.stderr)
    if not (DATA / "data").exists() and (SHIP / "data.tgz").exists():
        with tarfile.open(SHIP / "data.tgz") as tar:
            tar.extractall(DATA)
    wheels = sorted((SHIP / "wheels").glob("*.whl"))
    if wheels and not SITE.exists():
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                        "--target", str(SITE), *map(str, wheels)], check=True)
    print(f"export PUDDING_MODELS_DIR={MODELS} PUDDING_DATA_DIR={DATA / 'data'} PYTHONPATH=$PWD/src:{SITE}")


if __name__ == "__main__":
    main()
