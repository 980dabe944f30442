"""Standard checkpoints of a depth-pruned model (blocks deleted, renumbered, config sliced), and packs: a bundle with
its model in one directory, with a model card."""

from __future__ import annotations

import copy
import os
import shutil
import tarfile
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from .architectures import architecture_for, resolve
from .bundle import PACKED_MODEL
from .errors import PuddingError
from .omission import OmissionSet
from .storage import atomic_directory, atomic_file, atomic_write_json, atomic_write_text, check_parent_writable


def delete_blocks(model, omit: Sequence[int]):
    """A copy of `model` whose omitted blocks are gone, so that plain transformers runs the pruned model.

    Only the module structure and config are copied: the weights are shared with `model`, so exporting a large model
    needs no second copy of it in memory. The kept blocks are renumbered 0..n-1 (their attention modules index the KV
    cache by that number) and every per-block list in the config (e.g. `layer_types`) is sliced to match.
    """
    shared = {id(t): t for t in (*model.parameters(), *model.buffers())}  # deepcopy's memo: reuse, do not copy
    pruned = copy.deepcopy(model, shared)
    arch = architecture_for(pruned.config.model_type)
    stack = resolve(pruned, arch.stack)
    blocks = getattr(stack, arch.blocks)
    omitted = set(omit)
    kept = [i for i in range(len(blocks)) if i not in omitted]
    new_blocks = torch.nn.ModuleList([blocks[i] for i in kept])
    for new_index, block in enumerate(new_blocks):
        for module in block.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = new_index
    setattr(stack, arch.blocks, new_blocks)
    config = pruned.config
    for key in arch.per_block_config:
        values = getattr(config, key, None)
        if isinstance(values, (list, tuple)) and len(values) == len(blocks):
            setattr(config, key, [values[i] for i in kept])
    config.num_hidden_layers = len(kept)
    return pruned


# ------------------------------------------------------------------------------------------------------------------
# Writing checkpoints and packs. Both are written into a temporary sibling directory and renamed into place, so an
# interrupted export leaves nothing that looks finished.


def _refuse_existing(output: Path) -> None:
    if output.exists() and not (output.is_dir() and not any(output.iterdir())):
        raise PuddingError(f"{output} already exists: choose a new name (nothing was overwritten)")


def _write_dir_atomically(output: Path, fill) -> Path:
    """Run fill(tmp) on a temporary sibling directory, then rename it to `output` (new, or an empty directory)."""
    _refuse_existing(output)
    with atomic_directory(output) as tmp:
        fill(tmp)
    return output


def export_checkpoint(model, tokenizer, omit: OmissionSet, output: Path, provenance: dict, adapt=None) -> Path:
    """A standard Hugging Face checkpoint of the model without the blocks in `omit`: it loads with plain
    `AutoModelForCausalLM.from_pretrained(output)` and computes what pudding computes with that omission set.
    `adapt(pruned_model)`, if given, changes the pruned model before it is saved (e.g. merges a LoRA adapter)."""

    def fill(tmp: Path) -> None:
        pruned = delete_blocks(model, omit)
        if adapt is not None:
            adapt(pruned)
        pruned.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        info = {**provenance, "omitted_blocks": list(omit), "kept_blocks": omit.kept()}
        atomic_write_json(tmp / "pudding.json", info)
        atomic_write_text(tmp / "README.md", _checkpoint_card(info))

    return _write_dir_atomically(Path(output), fill)


def _checkpoint_card(info: dict) -> str:
    return (f"# {info['source_model']} without blocks {','.join(map(str, info['omitted_blocks']))}\n\n"
            f"A depth-pruned checkpoint written by pudding (prompt-routed depth pruning, PuDDing): "
            f"{len(info['kept_blocks'])} of {len(info['kept_blocks']) + len(info['omitted_blocks'])} transformer blocks "
            f"of `{info['source_model']}` (fingerprint `{info['source_fingerprint']}`), renumbered 0..n-1.\n"
            f"Kept blocks, in order: {', '.join(map(str, info['kept_blocks']))}.\n\n"
            "Load it with plain transformers: `AutoModelForCausalLM.from_pretrained(this_directory)`.\n")


# ------------------------------------------------------------------------------------------------------------------
# Pruned GGUF files, for llama.cpp and other GGUF runtimes: the kept blocks' tensors copied byte for byte


GGUF_ARCHITECTURES = ("llama", "qwen2", "qwen3", "phi3")  # no per-block layout implied by a block's number


def export_gguf(parts: Sequence[Path], omit: OmissionSet, output: Path, provenance: dict,
                quantize: str | None = None) -> Path:
    """A GGUF file of the source GGUF (one file, or its parts in order) without the blocks in `omit`: the other
    tensors copied byte for byte (no re-quantization), blocks renumbered 0..n-1, `{arch}.block_count` and any
    per-block metadata array sliced. With `quantize` (int8 or int4) the kept blocks' matrices are written instead as
    llama.cpp's Q8_0 / Q4_0 holding the codes and scales that `--quantize` computes (`_gguf_quantized`)."""
    output = Path(output)
    if len(parts) == 1:
        return _export_gguf_file(Path(parts[0]), omit, output, provenance, quantize)
    with tempfile.TemporaryDirectory(dir=output.parent, prefix=f".{output.name}.source-") as scratch:
        joined = Path(scratch) / "source.gguf"  # GGUF readers map one file
        with open(joined, "wb") as out:
            for part in parts:
                with open(part, "rb") as handle:
                    shutil.copyfileobj(handle, out, 8 << 20)
        return _export_gguf_file(joined, omit, output, provenance, quantize)


def _export_gguf_file(source: Path, omit: OmissionSet, output: Path, provenance: dict, quantize: str | None) -> Path:
    import gguf

    reader = gguf.GGUFReader(str(source))
    arch = _gguf_field(reader, "general.architecture")
    if arch not in GGUF_ARCHITECTURES:
        raise PuddingError(f"GGUF export handles {', '.join(GGUF_ARCHITECTURES)} files, not {arch}: in other families a "
                           "block's number decides its layout (e.g. Gemma 3's sliding-window layers), which deleting "
                           "blocks would shift; export a checkpoint (--format hf) instead")
    count_key = f"{arch}.block_count"
    num_blocks = _gguf_field(reader, count_key)
    if num_blocks != omit.num_blocks:
        raise PuddingError(f"{source} has {num_blocks} blocks, the omission set is for {omit.num_blocks}")
    kept = omit.kept()
    renumber = {old: new for new, old in enumerate(kept)}
    with atomic_file(output) as tmp:
        writer = gguf.GGUFWriter(str(tmp), arch, endianess=reader.endianess)
        for field in reader.fields.values():
            if field.name.startswith("GGUF.") or field.name == "general.architecture":
                continue  # the writer writes these itself
            value, kind = field.contents(), field.types[0]
            sub_type = field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
            if field.name == count_key:
                value = len(kept)
            elif field.name.startswith(f"{arch}.") and isinstance(value, list) and len(value) == num_blocks:
                value = [value[i] for i in kept]  # per-block hyper-parameters (head counts, FFN widths, ...)
            elif field.name == "general.alignment":
                writer.data_alignment = value
            writer.add_key_value(field.name, value, kind, sub_type=sub_type)
        writer.add_array("pudding.omitted_blocks", list(omit))
        writer.add_string("pudding.source", str(provenance.get("source_model", "")))
        if quantize:
            writer.add_string("pudding.quantize", quantize)
        written = []  # (source tensor, re-quantized?) in file order: the bytes are made only when written, one
        for tensor in reader.tensors:  # matrix at a time, so a large model is never held whole in memory
            name = _renumbered(tensor.name, renumber)
            if name is None:
                continue
            requantize = bool(quantize) and _is_block_matrix(tensor)
            if requantize:
                shape, kind = _gguf_quantized_layout(tensor, quantize)
                writer.add_tensor_info(name, shape, np.dtype(np.uint8), shape[0] * shape[1], kind)
            else:
                writer.add_tensor_info(name, tensor.data.shape, tensor.data.dtype, tensor.data.nbytes, tensor.tensor_type)
            written.append((tensor, requantize))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for tensor, requantize in written:
            data = _gguf_quantized(tensor, quantize) if requantize else tensor.data
            writer.write_tensor_data(data, tensor_endianess=reader.endianess)
        writer.close()
    return output


def _gguf_field(reader, key: str):
    field = reader.get_field(key)
    if field is None:
        raise PuddingError(f"the GGUF file has no '{key}'")
    return field.contents()


def _is_block_matrix(tensor) -> bool:
    """A weight matrix of a transformer block (what `--quantize` quantizes), not a norm, bias or embedding."""
    return tensor.name.startswith("blk.") and tensor.name.endswith(".weight") and len(tensor.shape) == 2


def _gguf_quantized_layout(tensor, scheme: str):
    """(byte shape, GGUF type) that `_gguf_quantized` gives this block matrix, known before any weight is read."""
    import gguf

    kind = gguf.GGMLQuantizationType.Q8_0 if scheme == "int8" else gguf.GGMLQuantizationType.Q4_0
    block, block_bytes = gguf.GGML_QUANT_SIZES[kind]  # 32 weights per block for both
    cols, rows = (int(n) for n in tensor.shape)  # GGUF lists dimensions innermost first
    if cols % block:
        raise PuddingError(f"{tensor.name}: GGUF's Q8_0 / Q4_0 need rows of a multiple of {block} weights (this one has {cols})")
    return (rows, cols // block * block_bytes), kind


def _gguf_quantized(tensor, scheme: str):
    """The bytes of a block matrix as llama.cpp's Q8_0 (int8) or Q4_0 (int4): blocks of 32 inputs, each an fp16
    scale d and 32 codes q with weight = q * d (Q4_0 stores q + 8, the first 16 in the low nibbles). Both hold
    pudding's own codes and scales of the bf16 weights (`quantize_weight`), so llama.cpp and `--quantize` run the
    same weights: an int8 row's one scale is repeated in each of its blocks, an int4 group is a Q4_0 block. Exact
    while a scale is within fp16's normal range (bf16 -> fp16 then loses nothing)."""
    import gguf

    from .quantize import INT4_GROUP, quantize_weight, unpack_int4

    layout, kind = _gguf_quantized_layout(tensor, scheme)
    block = gguf.GGML_QUANT_SIZES[kind][0]
    assert block == INT4_GROUP  # an int4 group is one Q4_0 block
    weight = torch.from_numpy(np.array(gguf.quants.dequantize(tensor.data, tensor.tensor_type), dtype=np.float32))
    rows, cols = weight.shape
    codes, scales = quantize_weight(weight.to(torch.bfloat16), scheme)
    if scheme == "int8":
        scales = scales[:, None].expand(rows, cols // block)
        packed = codes.view(rows, cols // block, block).view(torch.uint8)
    else:
        nibbles = (unpack_int4(codes) + 8).to(torch.uint8).view(rows, cols // block, block)
        packed = nibbles[..., : block // 2] | (nibbles[..., block // 2 :] << 4)
    d = scales.float().numpy().astype(np.float16).view(np.uint8).reshape(rows, cols // block, 2)
    data = np.concatenate([d, packed.numpy()], axis=-1).reshape(rows, -1)
    assert data.shape == layout  # what the header announced
    return data


def _renumbered(name: str, renumber: dict[int, int]) -> str | None:
    """A tensor's name in the pruned file ('blk.12.attn_q.weight' -> 'blk.9.attn_q.weight'), None if its block goes."""
    parts = name.split(".")
    if parts[0] != "blk" or len(parts) < 3 or not parts[1].isdigit():
        return name
    new = renumber.get(int(parts[1]))
    return None if new is None else ".".join(["blk", str(new), *parts[2:]])


# ------------------------------------------------------------------------------------------------------------------
# Packs: a bundle and its model in one self-contained directory (or .tar file), with a model card


TAR_SUFFIXES = {".tar": "", ".tar.gz": ":gz", ".tgz": ":gz"}  # pack outputs that are archives, and their compression


def pack_bundle(bundle, model_dir: Path, output: Path) -> Path:
    """Copy the bundle (minus checkpoints and scratch files) and the model's directory into one directory, with a
    README.md model card; `output` ending in .tar (or .tar.gz, .tgz: compressed) gives a tar file of it instead."""
    output = Path(output)
    compression = next((c for suffix, c in TAR_SUFFIXES.items() if output.name.endswith(suffix)), None)
    as_tar = compression is not None
    directory = output.parent / output.name[: -len(next(x for x in TAR_SUFFIXES if output.name.endswith(x)))] if as_tar else output

    def fill(tmp: Path) -> None:
        shutil.copytree(bundle.path, tmp, dirs_exist_ok=True, ignore=shutil.ignore_patterns(
            "*.ckpt*", "*.partial*", "*.tmp*", "checkpoints", PACKED_MODEL))
        shutil.copytree(model_dir, tmp / PACKED_MODEL, ignore=shutil.ignore_patterns("*.partial*", "*.tmp*"))
        atomic_write_text(tmp / "README.md", model_card(bundle))

    if not as_tar:
        return _write_dir_atomically(directory, fill)
    _refuse_existing(output)
    check_parent_writable(output)
    tmp_tar = output.parent / f".{output.name}.partial-{os.getpid()}"
    try:
        with tempfile.TemporaryDirectory(dir=output.parent, prefix=f".{output.name}.staging-") as staging:
            fill(Path(staging))
            # weights barely compress: gzip's fastest level saves nearly what its slowest does, in a fraction of the time
            level = {"compresslevel": 1} if compression else {}
            with tarfile.open(tmp_tar, f"w{compression}", **level) as tar:
                tar.add(staging, arcname=directory.name)
        os.replace(tmp_tar, output)
    finally:
        tmp_tar.unlink(missing_ok=True)  # an interrupted tar leaves no partial file behind
    return output


def unpack(archive: Path, output: Path) -> Path:
    """Extract a packed .tar into `output` (its single top-level directory becomes `output`)."""
    archive, output = Path(archive), Path(output)
    if archive.is_dir():
        raise PuddingError(f"{archive} is a directory: a packed bundle (.tar) is unpacked; a pack directory is used as it is")
    if not archive.is_file():
        raise PuddingError(f"{archive} does not exist")
    try:
        with tarfile.open(archive) as tar:
            members = tar.getmembers()
            tops = {m.name.split("/", 1)[0] for m in members}
            if len(tops) != 1 or not any(m.name.endswith("/bundle.json") for m in members):
                raise PuddingError(f"{archive} is not a pudding pack (one directory holding bundle.json)")

            def fill(tmp: Path) -> None:
                from .bundle import Bundle

                tar.extractall(tmp, filter="data")  # refuses absolute paths, links out of the tree, devices
                inner = tmp / tops.pop()
                for item in inner.iterdir():
                    item.rename(tmp / item.name)
                inner.rmdir()
                Bundle.open(tmp)  # a pack whose bundle does not open leaves nothing behind

            return _write_dir_atomically(output, fill)
    except tarfile.TarError as err:
        raise PuddingError(f"{archive} is not a readable tar file ({err})") from None


def model_card(bundle) -> str:
    """A short README for a pack: method, model, the sets, the router and the evaluation averages."""
    from .router import router_summary
    from .storage import read_json

    m = bundle.model
    lines = [f"# PuDDing bundle for {m['name']}", "",
             "Prompt-routed depth pruning (PuDDing, ICML 2025): a small router reads each prompt and picks one of the "
             f"candidate omission sets below; the model then runs without those {bundle.k} of its {m['num_blocks']} blocks.",
             "", f"- Model: `{m['name']}`, fingerprint `{m['fingerprint']}` (in `{PACKED_MODEL}/`)",
             f"- Made with pudding {bundle.manifest.get('versions', {}).get('pudding', '?')}, "
             f"{bundle.manifest.get('created', '')}", "",
             "Use it: `pudding generate --bundle THIS_DIRECTORY \"prompt\"`, `pudding serve --bundle THIS_DIRECTORY`.", "",
             "## Candidate omission sets", "", "| set | omitted blocks | found by |", "|---|---|---|"]
    for i, c in enumerate(bundle.candidates()):
        found = ", ".join(f"{s['task']}/{s['loss']}" for s in c.sources)
        lines.append(f"| {i} | {c.label()} | {found} |")
    router_json = bundle.router_dir() / "router.json"
    if router_json.exists():
        router = read_json(router_json, "router config")
        last = (router.get("history", {}).get("epochs") or [{}])[-1]
        lines += ["", "## Router", "", router_summary(router)
                  + (f"; on held-out prompts it picks the best set {100 * last['picks_best_set']:.1f}% of the time."
                     if "picks_best_set" in last else ".")]
    if bundle.policy_path.exists():
        policy = read_json(bundle.policy_path, "policy choice")
        lines += ["", "## Deployed policy", "", f"**{policy['name']}** (the default of `--bundle`): {policy['reason']}."]
    evals = sorted((bundle.path / "evals").glob("*.json")) if (bundle.path / "evals").is_dir() else []
    rows = []
    for path in evals:
        result = read_json(path, "evaluation")
        if "average" in result and "paper" in result["average"]:
            tasks = ", ".join(result.get("tasks", {}))
            rows.append(f"| {path.stem} | {100 * result['average']['paper']:.2f} | {tasks} |")
    if rows:
        lines += ["", "## Evaluations (average accuracy, %)", "", "| method | average | tasks |", "|---|---|---|", *rows]
    return "\n".join(lines) + "\n"
