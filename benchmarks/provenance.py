"""What every benchmark report records about its run (command, machine, software, date), and how it is saved."""

from __future__ import annotations

import argparse
import json
import platform
import sys
from datetime import datetime, timezone
from pathlib import Path

import torch

from pudding.storage import environment
from pudding.storage import atomic_write_json


def provenance(args: argparse.Namespace) -> dict:
    """The command that reproduces the run (every option, the output path left out), the machine, versions, date."""
    device = getattr(args, "device", "cpu")
    def spelled(v):
        return " ".join(map(str, v)) if isinstance(v, list) else v

    options = " ".join(f"--{k.replace('_', '-')} {spelled(v)}" for k, v in vars(args).items() if v is not None and k != "output")
    return {
        "command": f"python benchmarks/{Path(sys.argv[0]).name} {options}",
        "machine": {"device": device, "cpu_threads": torch.get_num_threads(),
                    "processor": platform.processor() or platform.machine(),
                    "gpu": torch.cuda.get_device_name() if device.startswith("cuda") else None},
        "versions": environment(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def save(report: dict, output: Path | None) -> None:
    print(json.dumps(report, indent=2))
    if output:
        output.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(output, report)
