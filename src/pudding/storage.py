"""Where pudding keeps its files, and how it writes them so that a crash never leaves half a file."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .errors import PuddingError


def environment() -> dict:
    """The software and machine a result was made with, recorded beside it."""
    import torch

    from . import __version__
    import transformers

    return {
        "pudding": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }


def cache_dir() -> Path:
    """Converted models and fingerprints live here (override with PUDDING_CACHE_DIR)."""
    root = os.environ.get("PUDDING_CACHE_DIR") or Path.home() / ".cache" / "pudding"
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def sha256_file(path: Path, chunk_size: int = 8 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk_size):
            digest.update(block)
    return digest.hexdigest()


def sha256_files(paths: list[Path], chunk_size: int = 8 << 20) -> str:
    """Hash of the concatenation of several files, without writing the concatenation."""
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as handle:
            while block := handle.read(chunk_size):
                digest.update(block)
    return digest.hexdigest()


def check_parent_writable(path: Path) -> None:
    parent = path.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise PuddingError(f"cannot create directory {parent}: {err.strerror}") from None
    if not os.access(parent, os.W_OK):
        raise PuddingError(f"cannot write to {parent}: permission denied")


def _read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# mkstemp/mkdtemp make owner-only files; what we write should get the usual permissions, as open() would give
_UMASK = _read_umask()


def output_file(path: Path | str) -> tuple[Path, bool]:
    """Where a file output really goes, and whether it is written atomically: a symbolic link is followed (the file
    it points to is replaced, the link stays); a regular file or a new path is replaced atomically; a device, pipe
    or socket that exists (/dev/stdout) is written into directly, never replaced; a directory is refused."""
    path = Path(path)
    if path.exists() and not path.is_file() and not path.is_dir():
        # checked before resolving: /dev/stdout resolves to /proc/PID/fd/pipe:[N], a name that exists nowhere
        return path, False
    target = path.resolve() if path.is_symlink() else path
    if target.is_dir():
        raise PuddingError(f"{path} is a directory: give a file name for the output")
    if target.exists() and not target.is_file():
        return target, False
    return target, True


def check_output_file(path: Path | str | None) -> None:
    """Refuse, before any work, an output that cannot be written: a directory, or a folder we may not write in."""
    if path is None:
        return
    target, atomic = output_file(path)
    if atomic:
        check_parent_writable(target)


def atomic_write_bytes(path: Path | str, data: bytes) -> None:
    """Write to a temporary file in the same directory, then rename: readers see old or new, never half (see
    `output_file` for links, devices and pipes)."""
    target, atomic = output_file(path)
    if not atomic:
        try:
            with open(target, "wb") as handle:
                handle.write(data)
        except OSError as err:
            raise PuddingError(f"could not write {target}: {err.strerror or err}") from None
        return
    with atomic_file(target) as tmp, open(tmp, "wb") as handle:
        handle.write(data)


@contextlib.contextmanager
def atomic_file(path: Path) -> Iterator[Path]:
    """A temporary path beside `path` to write a file at; renamed to `path` (synced first) once the block ends
    without error, removed otherwise."""
    path = Path(path)
    check_parent_writable(path)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    os.chmod(tmp, 0o666 & ~_UMASK)
    try:
        yield tmp
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as err:
        raise PuddingError(f"could not write {path}: {err.strerror or err}") from None
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()


def atomic_write_text(path: Path | str, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def json_text(obj: Any) -> str:
    return json.dumps(obj, indent=2, sort_keys=False) + "\n"


def atomic_write_json(path: Path | str, obj: Any) -> None:
    atomic_write_text(path, json_text(obj))


def read_json(path: Path | str, what: str = "file") -> Any:
    path = Path(path)
    if not path.exists():
        raise PuddingError(f"{what} not found: {path}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise PuddingError(f"{what} {path} is not valid JSON ({err})") from None


@contextlib.contextmanager
def atomic_directory(path: Path) -> Iterator[Path]:
    """Build a directory under a temporary name and move it into place only when complete."""
    path = Path(path)
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        raise PuddingError(f"{path} exists and is not a directory: choose another output directory")
    check_parent_writable(path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    tmp.chmod(0o777 & ~_UMASK)
    try:
        yield tmp
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def partial_path(path: Path) -> Path:
    """Where the checkpoint of a job that writes `path` lives while it runs: beside it."""
    return path.with_name(path.name + ".partial")


def remove_partial(path: Path) -> None:
    """Drop the checkpoint (a file or a directory) of a job whose result at `path` is now safely written."""
    partial = partial_path(Path(path))
    if partial.is_dir():
        shutil.rmtree(partial)
    else:
        partial.unlink(missing_ok=True)


class Checkpoint:
    """Progress of a long job as a list of finished steps, written atomically after each one; a rerun with the same
    identity (model, data, settings) resumes after the last finished step."""

    def __init__(self, path: Path | None, identity: dict, what: str = "search") -> None:
        self.path = path
        self.identity = identity
        self.what = what

    def load(self) -> dict | None:
        if self.path is None or not self.path.exists():
            return None
        try:
            state = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            state = None
        if not isinstance(state, dict) or not isinstance(state.get("steps"), list):
            raise PuddingError(f"checkpoint {self.path} is corrupted: delete it to start the {self.what} over")
        if state.get("identity") != self.identity:
            raise PuddingError(f"checkpoint {self.path} belongs to a different {self.what} (other model, data or settings): "
                               "delete it or choose another output")
        return state

    def save(self, steps: list[dict]) -> None:
        if self.path is not None:
            atomic_write_json(self.path, {"identity": self.identity, "steps": steps})
