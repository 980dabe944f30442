"""The benchmark's JSON as Markdown: the paper's Table 6 layout, then the ratios, the goals (figure, measured, target,
met), the profiles and the memory accounting.
"""

from __future__ import annotations


def markdown(report: dict) -> str:
    """The paper's Table 6 layout, then the ratios and targets."""
    lines = [f"# Speed benchmark ({report['device']}, {report['date']})", "", f"Command: `{report['command']}`", ""]
    shape = report.get("shape")
    if shape:
        ar = shape["all_resident"]
        settings = shape["settings"]
        weights = f"{settings['quantize']} weights, bf16 activations" if settings.get("quantize") else "bf16"
        lines += [f"## {shape['model']} ({weights}, batch 1)", "",
                  f"HBM bandwidth measured in the same run: {shape['hbm_bandwidth_gb_s']:.0f} GB/s (copy, read + write). "
                  f"Router (batch 1, {_router_words(shape)}): {shape['router_ms']:.2f} ms. Warm-up (compile + graph capture): {shape['warm_up_s']:.1f} s.", ""]
        routed = shape.get("routed_prefill")
        lines += _table(ar["dense"], ar["pruned"], shape["router_ms"], settings,
                        _key(routed["ttft_ms"], routed["pool_shared_blocks"]) if routed else None)
        lines += _routed_lines(routed, ar["pruned"], shape["router_ms"], settings)
        lines += _prefill_lines(ar, settings)
        lines += ["", "| figure | measured | target | met |", "|---|---|---|---|"]
        for goal in shape_goals(shape):
            lines.append(f"| {goal['figure']} | {goal['detail']} | {goal['target']} | {_yes(goal['met'])} |")
        mb = shape["memory_budget"]
        lines += [""] + _profile_lines(shape.get("decode_profile", {}))
        lines += _prefill_profile_lines(shape.get("prefill_profile", {}), ar)
        if shape.get("prefill_graphs_equal_eager"):
            checks = shape["prefill_graphs_equal_eager"]
            lines += [f"Graphed, bucketed, compiled pre-fill against plain eager pre-fill on the same prompts: next token "
                      f"equal in {sum(c['same_next_token'] for c in checks)} of {len(checks)}, largest logit difference "
                      f"{max(c['max_abs_logit_diff'] for c in checks):.3f} (bf16 kernels round differently).", ""]
        lines += ["", "Block swaps (memory-budget mode, pruned set to a set differing in n blocks):", "",
                  "| n | host→device copy | TTFT after switch | TTFT resident | added | logits after switch vs resident |",
                  "|---|---|---|---|---|---|"]
        for n, s in mb["swaps"].items():
            diff = f"{s['max_abs_logit_diff']:.3g}" if "max_abs_logit_diff" in s else "not checked"
            lines.append(f"| {n} | {s['copy_ms']:.1f} ms | {s['ttft_with_switch_ms']:.1f} ms | {s['ttft_resident_ms']:.1f} ms "
                         f"| {s['exposed_ms']:.1f} ms | {diff} |")
        lines += _memory_lines(ar["memory"], mb)
    if report.get("weights"):
        lines += _weights_lines(report["weights"])
    for bundle in report.get("bundles", []):
        quantized = report["settings"].get("quantize")
        lines += [f"## {bundle['model']} with its bundle{f' ({quantized} weights)' if quantized else ''}", "",
                  f"Router {bundle['router_ms']:.2f} ms (timed with {bundle.get('routing_timed_with', 'its router')}); "
                  f"decode speedup {bundle['comparison']['decode_speedup']:.3f}x "
                  f"(ideal {bundle['comparison']['decode_ideal_speedup']:.3f}x).", ""]
        routed = bundle.get("routed_prefill")  # runs before 2026-12-06 added the router's time instead
        lines += _table(bundle["dense"], bundle["pruned"], bundle["router_ms"], report["settings"],
                        _key(routed["ttft_ms"], routed["pool_shared_blocks"]) if routed else None)
        lines += _routed_lines(routed, bundle["pruned"], bundle["router_ms"], report["settings"])
        c = bundle["comparison"]
        if "dense_decode_of_ceiling" in c:
            lines += ["", f"Decode at {100 * c['dense_decode_of_ceiling']:.1f}% (dense) and {100 * c['pruned_decode_of_ceiling']:.1f}% "
                      f"(set 0) of the bandwidth ceiling ({c['dense_decode_ceiling_tok_s']:.0f} and "
                      f"{c['pruned_decode_ceiling_tok_s']:.0f} tok/s)."]
        lines += [""] + _profile_lines(bundle.get("decode_profile", {}))
    return "\n".join(lines) + "\n"


def _table(dense: dict, pruned: dict, router_ms: float, settings: dict, routed_ttft: dict | None = None) -> list[str]:
    """Table 6's layout. The routed row's TTFT is the measured one where given (`routed_prefill`), else pre-fill plus
    the router's time; its generation times add the router's time."""
    prompts = settings["prompt_lengths"]
    gens = settings["gen_lengths"]
    key = lambda d, k: d[k] if k in d else d[str(k)]  # noqa: E731 - JSON turns int keys into strings
    head = ["| | " + " | ".join(f"TTFT, prompt {p}" for p in prompts) + " | " +
            " | ".join(f"prompt {settings['base_prompt']} + {g} new" for g in gens) + " | decode tok/s |",
            "|---|" + "---|" * (len(prompts) + len(gens) + 1)]
    rows = []
    def ttft(row, p, extra):
        return key(routed_ttft, p) if extra and routed_ttft else key(row["ttft_ms"], p) + extra

    for row, extra in ((dense, 0.0), (pruned, router_ms)):
        cells = [f"{ttft(row, p, extra):.1f} ms" for p in prompts] + [f"{(key(row['generate_ms'], g) + extra) / 1000:.3f} s" for g in gens]
        name = row["label"] + (" + router" if extra else "")
        rows.append(f"| {name} ({row['blocks_run']} blocks) | " + " | ".join(cells) + f" | {row['decode_tok_s']:.1f} |")
    speed = [f"{key(dense['ttft_ms'], p) / ttft(pruned, p, router_ms):.2f}x" for p in prompts] + [
        f"{key(dense['generate_ms'], g) / (key(pruned['generate_ms'], g) + router_ms):.2f}x" for g in gens]
    rows.append("| speedup | " + " | ".join(speed) + f" | {dense['decode_ms_per_token'] / pruned['decode_ms_per_token']:.2f}x |")
    return head + rows


def _routed_lines(routed: dict | None, pruned: dict, router_ms: float, settings: dict) -> list[str]:
    if not routed:
        return []
    prompts = settings["prompt_lengths"]
    lines = ["", f"Pre-fill with routing, measured (`Engine.start` with a pending choice): the router reads the prompt on "
             f"its own stream while the blocks every set keeps pre-fill; the pool's sets all keep the first "
             f"{routed['pool_shared_blocks']} blocks (0 = route, then pre-fill). Largest logit difference from choosing "
             f"first: {routed['max_abs_logit_diff']:.3g}.", "",
             "| blocks pre-filled ahead | " + " | ".join(f"TTFT, prompt {p}" for p in prompts) + " |",
             "|---|" + "---|" * len(prompts),
             "| (pruned pre-fill + router time, added) | " + " | ".join(
                 f"{_key(pruned['ttft_ms'], p) + router_ms:.2f} ms" for p in prompts) + " |"]
    for shared, values in routed["ttft_ms"].items():
        lines.append(f"| {shared} | " + " | ".join(f"{_key(values, p):.2f} ms" for p in prompts) + " |")
    if routed.get("dense_ttft_ms"):  # runs before 2026-12-06 timed dense only beside pruned
        shared = routed["pool_shared_blocks"]
        lines.append(f"| dense, timed in turn with row {shared} (the speedup's numerator) | "
                     + " | ".join(f"{_key(_key(routed['dense_ttft_ms'], shared), p):.2f} ms" for p in prompts) + " |")
    speculative = routed.get("speculative", {})  # runs before 2026-12-06 (evening) did not speculate
    words = {"right": "speculating, the set chosen expected", "wrong": "speculating, the set sharing fewest blocks expected"}
    def cell(row, p):
        if _key(row["ttft_ms"], p) is None:  # the routing time covers no block past the shared ones
            return f"as row {routed['pool_shared_blocks']} ({_key(row['blocks_ahead'], p)} ahead)"
        dense = _key(row["dense_ttft_ms"], p)
        ratio = f"{dense / _key(row['ttft_ms'], p):.2f}x; " if dense else ""
        return f"{_key(row['ttft_ms'], p):.2f} ms ({ratio}{_key(row['blocks_ahead'], p)}, {_key(row['resumed_at'], p)})"

    for name, row in speculative.items():
        lines.append(f"| {words[name]} (vs dense in turn; blocks ahead, resumed at) | "
                     + " | ".join(cell(row, p) for p in prompts) + " |")
    if routed.get("issue_ms"):  # runs before this measurement have no host times
        lines += ["", ("Host time until the call returns, from an idle device (choosing, switching, loading the "
                       "prompt, launching; the device waits for what comes before its first kernel):"), "",
                  "| call | " + " | ".join(f"prompt {p}" for p in prompts) + " |", "|---|" + "---|" * len(prompts),
                  "| `Engine.prefill`, the chosen set | " + " | ".join(
                      f"{_key(routed['prefill_issue_ms'], p):.3f} ms" for p in prompts) + " |"]
        for shared, values in routed["issue_ms"].items():
            lines.append(f"| `Engine.start`, {shared} blocks ahead | " + " | ".join(
                f"{_key(values, p):.3f} ms" for p in prompts) + " |")
    return lines


def _prefill_lines(ar: dict, settings: dict) -> list[str]:
    refs = ar.get("references")
    if not refs:
        return []
    lines = ["", "Pre-fill (TTFT) against the references measured in the same run: the GEMM-only bound (the four "
             "projections of every block that runs, one CUDA graph) and plain transformers (eager, sdpa, no cache, "
             "last-position logits).", "",
             "| | " + " | ".join(f"{p} tokens" for p in settings["prompt_lengths"]) + " |",
             "|---|" + "---|" * len(settings["prompt_lengths"])]
    for name in ("dense", "pruned"):
        for label, values in ((f"pudding {name}", ar[name]["ttft_ms"]), (f"GEMM-only bound, {name}", refs.get(f"{name}_gemm_ms")),
                              (f"transformers eager, {name}", refs.get(f"{name}_transformers_ms"))):
            if values:
                lines.append(f"| {label} | " + " | ".join(f"{_key(values, p):.2f} ms" for p in settings["prompt_lengths"]) + " |")
        lines.append(f"| pudding {name} / GEMM bound | " + " | ".join(
            f"{_key(ar[name]['ttft_ms'], p) / _key(refs[name + '_gemm_ms'], p):.2f}x" for p in settings["prompt_lengths"]) + " |")
        if refs.get(f"{name}_transformers_ms"):
            lines.append(f"| pudding {name} / transformers | " + " | ".join(
                f"{_key(ar[name]['ttft_ms'], p) / _key(refs[name + '_transformers_ms'], p):.2f}x" for p in settings["prompt_lengths"]) + " |")
    return lines


# The allowance's small parts, each split out of the "rest" from the date a report has its key: key, table row, goal
# detail. small_segments_slack_gb (2026-12-05) was the new small segments' free space; small_segments_gb (2026-12-06)
# is those segments less the engine's own tensors in them, so their other tenants (a sampled token) count too.
_ALLOWANCE_EXTRAS = (
    ("small_segments_slack_gb", "free space of new small-tensor segments (2 MB a stream)", "small-tensor segments' free space"),
    ("small_segments_gb", "new small-tensor segments beside the engine's tensors (2 MB a stream)", "small-tensor segments"),
    ("allocator_rounding_gb", "allocator rounding of the engine's tensors (512 B; 2 MiB from 10 MiB)", "allocator rounding"),
)


def _memory_lines(all_resident: dict, mb: dict) -> list[str]:
    mm = mb["memory"]
    lines = ["", f"Memory-budget pruned decode: {mb['pruned']['decode_tok_s']:.1f} tok/s."]
    if "graph_pool_gb" not in mm:  # reports before 2026-12-04 took the allocator's peak
        return lines + [f"Peak GPU memory (allocator): memory budget {mm['peak_allocated_gb']:.2f} GB.", ""]
    parts = {f"blocks ({mb['slots']} slots + 1 spare)": mm["engine_blocks_gb"], "embeddings, head, norm": mm["embed_head_norm_gb"],
             "KV cache": mm["kv_cache_gb"], "buffers (rotary tables, inputs)": mm["buffers_gb"],
             "cuBLAS workspaces": mm["cublas_workspaces_gb"], "graphs' pool (outputs, activations)": mm["graph_pool_gb"]}
    parts.update({label: mm[key] for key, label, _ in _ALLOWANCE_EXTRAS if key in mm})
    rest = round(mm["engine_peak_gb"] - sum(parts.values()), 3) + 0.0  # + 0.0: no "-0.000"
    lines += ["", "Memory-budget engine at its peak (pre-fill 512 + 512 tokens right after a swap, whose pre-fill waits for "
              "the copies and runs eagerly in the graphs' pool), GB the allocator reserved from the device:", "",
              "| part | GB |", "|---|---|"]
    lines += [f"| {name} | {gb:.3f} |" for name, gb in parts.items()]
    rest_name = "rest (anything unaccounted)" if "allocator_rounding_gb" in mm else "rest (allocator rounding, anything unaccounted)"
    lines += [f"| {rest_name} | {rest:.3f} |"
              + (f" (after the run, segments outside the graphs' pools, the router's included, held {mm['outside_pools_unused_gb']:.3f} GB unused)"
                 if "outside_pools_unused_gb" in mm else ""),
              f"| **peak reserved** | **{mm['engine_peak_gb']:.3f}** |", "",
              *([("Segments outside the graphs' pools holding the most unused space after the run (MB unused of "
                  "total, segment type, stream): " + "; ".join(
                      f"{s['total_mb'] - s['allocated_mb']:.1f} of {s['total_mb']:.1f} ({s['type']}, {s['stream']})"
                      for s in mm["slack_segments"]) + "."), ""] if mm.get("slack_segments") else []),
              (f"The graphs' pool includes {mm['cublas_in_graph_pool_gb']:.3f} GB of cuBLAS workspace (its stream's "
               "first product ran in the pool); the cuBLAS row is the workspaces outside it. "
               if "cublas_in_graph_pool_gb" in mm else "")
              + "The graphs' pool after each phase (GB): " + "; ".join(
                  f"{phase} {gb:.3f}" for phase, gb in mb["graph_pool_by_phase_gb"].items()) + ".",
              "", "All resident, same run: " + ", ".join(
                  f"{name} {m['engine_peak_gb']:.2f} GB" for name, m in all_resident.items()) + " reserved at the peak.", ""]
    return lines


def _profile_lines(profile: dict) -> list[str]:
    lines = []
    for name, prof in profile.items():
        if "error" in prof:
            lines += [f"Decode step profile, {name}: not available ({prof['error']}).", ""]
            continue
        bw = prof.get("matmul_bandwidth_gb_s")
        lines += [f"Decode step profile, {name} (compiled step run eagerly, {prof['kernels_per_step']:.0f} kernels per step, "
                  f"{prof['kernels_per_block']:.1f} per block; GPU busy {prof['gpu_us_per_step']:.0f} µs per step, of which "
                  f"matrix products {prof['matmul_us_per_step']:.0f} µs" + (f" at {bw:.0f} GB/s on the weights" if bw else "") + "):", "",
                  "| kernel | launches per step | µs per step |", "|---|---|---|"]
        for k in prof["top_kernels"][:8]:
            lines.append(f"| `{k['name'][:70]}` | {k['launches_per_step']:.0f} | {k['us_per_step']:.0f} |")
        lines.append("")
    return lines


def _prefill_profile_lines(profile: dict, all_resident: dict) -> list[str]:
    lines = []
    for name, prof in profile.items():
        if "error" in prof:
            lines += [f"Pre-fill profile, {name}: not available ({prof['error']}).", ""]
            continue
        other = prof["gpu_us_per_step"] - prof["matmul_us_per_step"] - prof["attention_us"]
        graphed = _key(all_resident[name]["ttft_ms"], prof["length"]) * 1000
        lines += [f"Pre-fill profile, {name}, {prof['length']} tokens (compiled blocks run eagerly; the graphed pre-fill "
                  f"took {graphed:.0f} µs): {prof['kernels_per_step']:.0f} kernels, {prof['kernels_per_block']:.1f} per "
                  f"block; GPU busy {prof['gpu_us_per_step']:.0f} µs: matrix products {prof['matmul_us_per_step']:.0f} µs "
                  f"(the head's last-position product among them), attention {prof['attention_us']:.0f} µs, other "
                  f"kernels {other:.0f} µs.", "", "| kernel | launches | µs |", "|---|---|---|"]
        for k in prof["top_kernels"][:10]:
            lines.append(f"| `{k['name'][:70]}` | {k['launches_per_step']:.0f} | {k['us_per_step']:.0f} |")
        lines.append("")
    return lines


def _weights_lines(compared: dict) -> list[str]:
    rows = compared["weights"]
    base = rows["bf16"]["pruned"]["decode_tok_s"]
    lengths = list(rows["bf16"]["pruned"]["ttft_ms"])
    lines = [f"## Weight-only quantized blocks (shape of {compared.get('shape', 'LLaMA-3.1-8B')}, random weights)", "",
             f"Pruned = {compared['pruned']}." + (" The schemes' engines are resident together and take turns at every "
                                                  "repeat." if compared.get("timing") else ""), "",
             f"| weights | block | head | decode dense | decode pruned | pruned vs bf16 pruned | TTFT "
             f"{' / '.join(map(str, lengths))}, pruned | blocks on device |", "|---|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        ttft = " / ".join(f"{v:.1f}" for v in r["pruned"]["ttft_ms"].values())
        head = f"{r['head_bytes'] / 1e6:.1f} MB" if "head_bytes" in r else "-"  # not recorded before +head schemes
        lines.append(f"| {name} | {r['block_bytes'] / 1e6:.1f} MB | {head} | {r['dense']['decode_tok_s']:.1f} tok/s | "
                     f"{r['pruned']['decode_tok_s']:.1f} tok/s | {r['pruned']['decode_tok_s'] / base:.2f}x | {ttft} ms | "
                     f"{r['blocks_on_device_gb']:.2f} GB |")
    checks = {name: r["gemv"] for name, r in rows.items() if r.get("gemv")}
    if checks:
        lines += ["", ("One-row product alone (the FFN down matrix; error against the dequantized product, and the time "
                       "that product takes with the matrix dequantized first):"), "",
                  "| weights | kernel | max relative error | time per call | codes + scales read | dequantized first |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {name} | {c['kernel']} | {c['max_relative_error']:.1e} | {c['us_per_call']:.1f} us | "
                  f"{c['gb_per_s']:.0f} GB/s | {_optional_us(c.get('dequantized_us_per_call'))} |" for name, c in checks.items()]
    if compared["goals"]:
        lines += ["", "| goal | measured | target | met |", "|---|---|---|---|"]
        lines += [f"| {g['figure']} | {g['measured']:.2f}x | {g['target']} | {_yes(g['met'])} |" for g in compared["goals"]]
    profiles = {f"{name} blocks, pruned": r["decode_profile"] for name, r in rows.items() if r.get("decode_profile")}
    return lines + [""] + (_profile_lines(profiles) if profiles else [])


def shape_goals(shape: dict) -> list[dict]:
    """The engine's targets (issue: engine at the hardware limit), each as figure, measured, target, met."""
    ar, mb = shape["all_resident"], shape["memory_budget"]
    c, refs = ar["comparison"], ar.get("references", {})
    goals = []
    for name in ("dense", "pruned"):
        for p in (128, 512, 2048):
            bound = refs.get(f"{name}_gemm_ms", {})
            if str(p) not in {str(k) for k in bound}:
                continue
            ttft, gemm = _key(ar[name]["ttft_ms"], p), _key(bound, p)
            goals.append({"figure": f"{name} pre-fill TTFT at {p} tokens, of the GEMM-only bound", "measured": ttft / gemm,
                          "target": "≤ 1.25x", "met": ttft / gemm <= 1.25,
                          "detail": f"{ttft:.2f} ms / {gemm:.2f} ms = {ttft / gemm:.2f}x"})
    for p, v in c["prefill"].items():
        goals.append({"figure": f"pre-fill speedup at {p} tokens (routing included), of the FLOP ratio",
                      "measured": v["of_flop_ratio"], "target": "≥ 97%", "met": v["of_flop_ratio"] >= 0.97,
                      "detail": f"{v['speedup_with_router']:.3f}x of {v['flop_ratio']:.3f}x ({100 * v['of_flop_ratio']:.1f}%"
                                f"{', routing measured beside pre-fill' if v.get('routing_measured') else ''}"
                                f"{', dense timed in turn' if v.get('dense_in_turn') else ''})"})
    for name in ("dense", "pruned"):
        of = c.get(f"{name}_decode_of_ceiling")
        if of is not None:
            goals.append({"figure": f"{name} decode, of the bandwidth ceiling", "measured": of, "target": "≥ 85%",
                          "met": of >= 0.85, "detail": f"{100 * of:.1f}% ({ar[name]['decode_tok_s']:.1f} of "
                                                       f"{c[name + '_decode_ceiling_tok_s']:.1f} tok/s)"})
    goals.append({"figure": "decode speedup, of the ideal weight-bytes ratio", "measured": c["decode_speedup_vs_ideal"],
                  "target": "≥ 97%", "met": c["decode_speedup_vs_ideal"] >= 0.97,
                  "detail": f"{c['decode_speedup']:.3f}x of {c['decode_ideal_speedup']:.3f}x"})
    goals.append({"figure": "routing, batch 1", "measured": shape["router_ms"], "target": "≤ 2 ms",
                  "met": shape["router_ms"] <= 2, "detail": f"{shape['router_ms']:.2f} ms"})
    mm = mb["memory"]
    goals.append({"figure": "memory-budget peak, engine", "measured": mm["engine_peak_gb"], "target": "≤ allowance",
                  "met": mb["within_allowed"],
                  "detail": f"{mm['engine_peak_gb']:.2f} GB; allowance {mb['allowed_gb']:.2f} GB ({mb['slots']} blocks + 1 "
                            f"spare slot + embeddings/head + KV + buffers + cuBLAS workspaces "
                            f"{mm.get('cublas_workspaces_gb', 0):.2f} GB"
                            + (f" + activation workspace {mb['activation_workspace_gb']:.2f} GB"
                               if "activation_workspace_gb" in mb else "")
                            + "".join(f" + {short} {mm[key] * 1000:.1f} MB" for key, _, short in _ALLOWANCE_EXTRAS
                                      if key in mm) + ")"})
    return goals


def _router_words(shape: dict) -> str:
    """How the shape's router ran, for the report."""
    from ..router import DECODER_EMBEDDINGS

    encoder = shape.get("router_encoder", "minilm-l6")
    if encoder == DECODER_EMBEDDINGS:
        return "on the decoder's input embeddings: a tokenizer pass and a table lookup on the host"
    return f"{encoder} on the same device, in {shape.get('router_dtype', 'float32')}"


def _key(d: dict, k):
    return d[k] if k in d else d[str(k)]  # JSON turns int keys into strings


def _yes(ok: bool) -> str:
    return "yes" if ok else "**no**"


def _optional_us(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f} us"
