"""What choosing a set costs at batch 1, per router and prompt length: the paper's encoder router (MiniLM-L6:
tokenize, encoder forward, head; on a GPU one CUDA-graph replay) against the router on the decoder's own input
embeddings (`router.TokenTableRouter`: tokenize with the decoder's tokenizer, gather one row of predicted losses per
token, average), from the prompt's text and from the engine's own ids of it (as `generate` and `serve` hand them
over). Untrained weights: routing time does not depend on them. Both read at most 256 tokens.

    python benchmarks/router_cost.py [--device cuda] [--decoder smollm2-135m] [--output results/router-cost-cpu.json]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
from datetime import datetime, timezone
from pathlib import Path

from pudding.bench.timing import router_text, router_timing
from pudding.models import load_tokenizer, resolve_model
from pudding.omission import OmissionSet
from pudding.policy import RoutedPolicy
from pudding.router import DECODER_EMBEDDINGS, untrained_router
from pudding.storage import atomic_write_json, atomic_write_text, environment

WORDS = (16, 64, 128, 256, 512)
POOL = [[b, b + 1, b + 3] for b in range(10)]  # ten sets, as the paper's pool; their blocks do not matter here


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--decoder", default="smollm2-135m", help="whose tokenizer the embeddings router reads with")
    parser.add_argument("--encoder", default="minilm-l6")
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--output", type=Path)
    args = parser.parse_args()
    decoder = resolve_model(args.decoder)
    tokenizer = load_tokenizer(decoder)
    sets = [OmissionSet(s, decoder.num_blocks) for s in POOL]
    routers = {args.encoder: untrained_router(args.encoder, sets, args.device),
               DECODER_EMBEDDINGS: untrained_router(DECODER_EMBEDDINGS, sets, args.device, decoder_tokenizer=tokenizer)}
    rows = []
    for words in WORDS:
        text = router_text(words)
        row = {"words": words}
        for name, router in routers.items():
            policy = RoutedPolicy(router)
            policy.warm_up()
            row[name] = {"ms": router_timing(policy, [text], args.repeats),
                         "tokens_read": min(len(router.tokenizer(text)["input_ids"]), router.settings.max_length)}
        # the same router handed the engine's ids of the prompt (`Policy.pending(prompt, tokens)`): no tokenizer pass
        table = routers[DECODER_EMBEDDINGS]
        tokens = table.tokenizer(text, add_special_tokens=False)["input_ids"]
        row[DECODER_EMBEDDINGS]["from_ids_ms"] = statistics.median(
            1000 * table.route_tokens([tokens]).seconds for _ in range(args.repeats))
        rows.append(row)
        print(f"{words} words: " + ", ".join(f"{n} {row[n]['ms']:.3f} ms" for n in routers)
              + f", embeddings from ids {row[DECODER_EMBEDDINGS]['from_ids_ms']:.3f} ms", file=sys.stderr)
    device = __import__("torch").cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "cpu"
    report = {"command": "python " + " ".join(sys.argv), "device": device, "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "decoder_tokenizer": args.decoder, "versions": environment(), "rows": rows}
    lines = [f"# Router cost at batch 1 ({device}, {report['date']})", "", f"Command: `{report['command']}`", "",
             (f"| prompt words | {args.encoder}: tokens read | {args.encoder}: ms | embeddings ({args.decoder} tokenizer): "
              "tokens read | embeddings, from the text: ms | embeddings, from the engine's ids: ms |"),
             "|---|---|---|---|---|---|"]
    for row in rows:
        enc, emb = row[args.encoder], row[DECODER_EMBEDDINGS]
        lines.append(f"| {row['words']} | {enc['tokens_read']} | {enc['ms']:.3f} | {emb['tokens_read']} | {emb['ms']:.3f} | "
                     f"{emb['from_ids_ms']:.3f} |")
    print("\n".join(lines))
    if args.output:
        atomic_write_json(args.output, report)
        atomic_write_text(args.output.with_suffix(".md"), "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
