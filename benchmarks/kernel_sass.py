"""What the one-row low-bit kernels (kernels.py) ask of an H100/H200's SMs, read from their machine code: every tiling
the autotuner may pick is compiled for sm_90 on this machine (Triton's own ptxas; no GPU needed) and its SASS
disassembled, and for the loop over the inputs this reports the instructions a thread issues per weight, the bytes of
codes it has in flight per iteration, and the shared-memory round trips and shuffles Triton put in the loop.

A decode step's products are bound by bytes read only while the SMs can issue the instructions those bytes need: an
H200 issues about 132 SMs x 4 warp instructions x 1.98 GHz, some 33 thread instructions per ns, against ~4.8 bytes per
ns of HBM, so a kernel needing more than ~7 instructions per byte of weights is bound by issue, not by bandwidth.
Static counts, not a profile: they say where a kernel cannot reach the bandwidth, not how fast it runs.

    python benchmarks/kernel_sass.py [--rows 4096] [--inputs 14336] [--output results/kernel-sass-sm90.json]
"""

from __future__ import annotations

import argparse
import collections
import re
import sys
from datetime import datetime, timezone
from pathlib import Path

from pudding import kernels
from pudding.storage import atomic_write_json, atomic_write_text, environment

ROUND_TRIPS = ("LDS", "STS", "STSM", "BAR", "SHFL")  # layout conversions and cross-thread sums inside the loop


def sass(cubin: bytes) -> list[tuple[int, str]]:
    """(address, instruction) of the kernel's machine code."""
    lines = []
    for line in kernels.cuobjdump(cubin, "-sass").splitlines():
        match = re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;", line)
        if match:
            lines.append((int(match.group(1), 16), match.group(2)))
    return lines


def main_loop(code: list[tuple[int, str]]) -> list[str]:
    """The instructions of the longest backward branch's loop (empty when the compiler unrolled it entirely)."""
    best = None
    for address, instruction in code:
        target = re.search(r"BRA\s.*0x([0-9a-f]+)", instruction)
        if target and int(target.group(1), 16) < address:
            start = int(target.group(1), 16)
            if best is None or address - start > best[1] - best[0]:
                best = (start, address)
    return [] if best is None else [i for a, i in code if best[0] <= a <= best[1]]


def opcode(instruction: str) -> str:
    return re.sub(r"^@!?U?P\w+\s+", "", instruction).split()[0].split(".")[0]


def analyse(fn, signature: dict, constants: dict, config, codes_per_iteration: int, weights_per_byte: int) -> dict:
    cubin = kernels.compile_for_hopper(fn, signature, constants, config)
    usage = kernels.cuobjdump(cubin, "--dump-resource-usage")
    loop = main_loop(sass(cubin))
    counts = collections.Counter(opcode(i) for i in loop)
    threads = 32 * config.num_warps
    loads = [i for i in loop if opcode(i) == "LDG"]
    bytes_per_thread = codes_per_iteration / threads
    row = {"tiling": {**config.kwargs, "num_warps": config.num_warps}, "registers": int(re.search(r"REG:(\d+)", usage).group(1)),
           "spills": int(re.search(r"STACK:(\d+)", usage).group(1)) > 0, "loop_instructions": len(loop),
           "code_bytes_per_thread_per_iteration": bytes_per_thread,
           "round_trips_in_loop": {k: counts[k] for k in ROUND_TRIPS if counts[k]},
           "loads_in_loop": dict(collections.Counter(re.sub(r"^@!?P\w+\s+", "", i).split()[0] for i in loads))}
    if loop:  # one iteration per pass of the body (the loads listed show it: one set of code and activation loads)
        row["instructions_per_weight"] = len(loop) / (bytes_per_thread * weights_per_byte)
    return row


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=4096, help="output rows of the matrix (the 8B shape's FFN down)")
    parser.add_argument("--inputs", type=int, default=14336)
    parser.add_argument("--output", type=Path)
    args = parser.parse_args()
    bf16 = {"x_ptr": "*bf16", "scales_ptr": "*bf16", "out_ptr": "*bf16"}
    rows = []
    for config in kernels._int8_tuned.configs:
        row = analyse(kernels._gemv_int8_kernel, {**bf16, "codes_ptr": "*i8"},
                      {"N": args.rows, "K": args.inputs, "PACKED": True}, config,
                      config.kwargs["BLOCK_N"] * config.kwargs["BLOCK_K"], 1)
        rows.append({"scheme": "int8", **row})
    for config in kernels._int4_tuned.configs:
        row = analyse(kernels._gemv_int4_kernel, {**bf16, "codes_ptr": "*u8"},
                      {"N": args.rows, "HALF": args.inputs // 2, "GROUPS": args.inputs // kernels.INT4_GROUP,
                       "GROUP": kernels.INT4_GROUP, "PACKED": True}, config,
                      config.kwargs["BLOCK_N"] * config.kwargs["BLOCK_B"], 2)
        rows.append({"scheme": "int4", **row})
    report = {"command": " ".join(sys.argv), "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "target": "sm_90 (compiled here by Triton's ptxas)", "matrix": [args.rows, args.inputs],
              "versions": environment(), "kernels": rows}
    table = markdown(report)
    print(table)
    if args.output:
        atomic_write_json(args.output, report)
        atomic_write_text(args.output.with_suffix(".md"), table)


def markdown(report: dict) -> str:
    lines = [f"# One-row low-bit kernels in sm_90 machine code ({report['date']})", "",
             f"Command: `{report['command']}`; matrix {report['matrix'][0]} x {report['matrix'][1]} (rows x inputs).", "",
             ("| scheme | tiling | registers | code bytes a thread loads per iteration | loop instructions | "
              "instructions per weight | shared-memory / shuffle ops in the loop | loads in the loop |"),
             "|---|---|---|---|---|---|---|---|"]
    for r in report["kernels"]:
        tiling = ", ".join(f"{k} {v}" for k, v in r["tiling"].items())
        per = f"{r['instructions_per_weight']:.1f}" if "instructions_per_weight" in r else "unrolled"
        trips = ", ".join(f"{k} {v}" for k, v in r["round_trips_in_loop"].items()) or "none"
        loads = ", ".join(f"{k} x{v}" for k, v in r["loads_in_loop"].items())
        lines.append(f"| {r['scheme']} | {tiling} | {r['registers']}{' (spills)' if r['spills'] else ''} | "
                     f"{r['code_bytes_per_thread_per_iteration']:g} | {r['loop_instructions']} | {per} | {trips} | {loads} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
