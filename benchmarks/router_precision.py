"""Does the router choose the same sets with its encoder in bf16 (the default on a GPU, `router.encoder_dtype`) as
in fp32? A bundle's trained router routes its held-out prompts (heldout.json: every answer scored under every set)
both ways; reported: how many choices agree, how far the predicted losses move, and what the flips cost on the
held-out accuracy (paired with fp32's choices). Also the batch-1 choice time of each on the device it runs on.

Usage: PYTHONPATH=src python benchmarks/router_precision.py --bundle BUNDLE --output results/router-precision-cpu.json
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import numpy as np

from provenance import provenance, save
from pudding.bundle import Bundle
from pudding.selection import HeldOut
from pudding.storage import read_json

DTYPES = ("float32", "bfloat16")


def compare(heldout: HeldOut, routed: dict) -> dict:
    """bf16 choices against fp32 ones on the same prompts."""
    ref, low = routed["float32"], routed["bfloat16"]
    flips = np.flatnonzero(ref.choices != low.choices)
    rows = np.arange(len(heldout))
    # how close fp32 itself found the two sets where bf16 chose otherwise: the predicted loss it gives up
    given_up = ref.predicted[flips, low.choices[flips]] - ref.predicted[flips, ref.choices[flips]]
    diff, se = heldout.paired(low.choices, ref.choices)
    return {"prompts": len(heldout), "agree": float(1 - len(flips) / len(heldout)), "flips": int(len(flips)),
            "max_abs_predicted_diff": float(np.abs(low.predicted - ref.predicted).max()),
            "mean_abs_predicted_diff": float(np.abs(low.predicted - ref.predicted).mean()),
            "spread_of_predictions": float(np.median(ref.predicted.max(1) - ref.predicted.min(1))),
            "fp32_gap_at_flips": {"median": float(np.median(given_up)) if len(flips) else 0.0,
                                  "max": float(given_up.max()) if len(flips) else 0.0},
            "heldout_accuracy": {d: heldout.accuracy(routed[d].choices) for d in DTYPES},
            "bf16_minus_fp32_accuracy": diff, "paired_se": se,
            "tl_of_chosen": {d: float(heldout.tl[routed[d].choices, rows].mean()) for d in DTYPES}}


class Routed:
    def __init__(self, result) -> None:
        self.choices = np.array(result.choices)
        self.predicted = np.asarray(result.predicted, dtype=np.float64)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", type=Path, required=True)
    parser.add_argument("--router", default="router", help="which router of the bundle")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--timed-prompts", type=int, default=50, help="prompts timed one at a time")
    parser.add_argument("--output", type=Path)
    args = parser.parse_args()
    bundle = Bundle.open(args.bundle)
    heldout = HeldOut.from_json(read_json(bundle.path / "heldout.json", "held-out scores")["tasks"])
    routed, batch1_ms = {}, {}
    for dtype in DTYPES:
        router = bundle.router(args.router, args.device, dtype)
        routed[dtype] = Routed(router.route(heldout.prompts))
        router.warm_up()
        timed = heldout.prompts[: args.timed_prompts]
        batch1_ms[dtype] = statistics.median(1000 * router.route([p]).seconds for p in timed)
    report = {**provenance(args), "model": bundle.model["name"], "sets": len(bundle.omission_sets()),
              **compare(heldout, routed), "batch1_ms": batch1_ms}
    save(report, args.output)


if __name__ == "__main__":
    main()
