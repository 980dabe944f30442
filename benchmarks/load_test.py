"""Load test of `pudding serve`: concurrent clients, mixed prompts and omission sets, streaming and not, some clients
hanging up mid-stream. Every answer must equal the same request served alone (decoding is greedy), no request may
fail, and the server must still be up at the end; the script reports latency percentiles and throughput.

It starts the server itself (`pudding serve` in a child process on a loopback port). Prompts are real task prompts
(the first few of each task's evaluation split). Requests go to several sets: forced with the `pudding` body field
(`--sets`), and, with `--bundle`, also routed by the bundle's router. References are computed first, one request at
a time, once per distinct (prompt, set, endpoint).

    python benchmarks/load_test.py --requests 512 --clients 8 --max-tokens 16 --output results/load-test-cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import queue
import random
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import httpx

from pudding.storage import atomic_write_json, atomic_write_text, environment
from pudding.tasks import get_task

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from conftest import ServerProcess  # noqa: E402  (the tests' real-server helper: `pudding serve` in a child process)


@dataclass(frozen=True)
class Spec:
    """One kind of request: which prompt, which set (None: routed), which endpoint."""

    prompt: int
    variant: int
    chat: bool


@dataclass
class Answer:
    status: int
    text: str = ""
    usage: dict | None = None
    latency_ms: float = 0.0
    first_token_ms: float | None = None  # streamed only: when the first text arrived, as the client saw it
    server: dict = field(default_factory=dict)  # the response's `pudding` field
    error: str | None = None

    @property
    def omitted(self) -> list | None:
        return self.server.get("omitted_blocks")


class Client:
    """One simulated user: an HTTP connection and the request formats of both endpoints."""

    def __init__(self, url: str, model: str, prompts: list[str], variants: list[dict | None], max_tokens: int) -> None:
        self.http = httpx.Client(base_url=url, timeout=600)
        self.model, self.prompts, self.variants, self.max_tokens = model, prompts, variants, max_tokens

    def body(self, spec: Spec, stream: bool, max_tokens: int | None = None) -> dict:
        body = {"model": self.model, "max_tokens": max_tokens or self.max_tokens, "stream": stream}
        if spec.chat:
            body["messages"] = [{"role": "user", "content": self.prompts[spec.prompt]}]
        else:
            body["prompt"] = self.prompts[spec.prompt]
        if stream:
            body["stream_options"] = {"include_usage": True}
        if self.variants[spec.variant] is not None:
            body["pudding"] = self.variants[spec.variant]
        return body

    @staticmethod
    def path(spec: Spec) -> str:
        return "/v1/chat/completions" if spec.chat else "/v1/completions"

    def ask(self, spec: Spec) -> Answer:
        started = time.perf_counter()
        response = self.http.post(self.path(spec), json=self.body(spec, stream=False))
        latency = 1000 * (time.perf_counter() - started)
        if response.status_code != 200:
            return Answer(response.status_code, latency_ms=latency, error=response.text[:300])
        body = response.json()
        choice = body["choices"][0]
        text = choice["message"]["content"] if spec.chat else choice["text"]
        return Answer(200, text, usage=body["usage"], latency_ms=latency, server=body["pudding"])

    def ask_streaming(self, spec: Spec) -> Answer:
        started = time.perf_counter()
        answer = Answer(0)
        pieces = []
        with self.http.stream("POST", self.path(spec), json=self.body(spec, stream=True)) as response:
            answer.status = response.status_code
            if response.status_code != 200:
                answer.error = response.read().decode(errors="replace")[:300]
                return answer
            for line in response.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    answer.error = json.dumps(event["error"])
                if event.get("usage"):
                    answer.usage = event["usage"]
                if "pudding" in event:
                    answer.server = event["pudding"]
                for choice in event.get("choices", []):
                    piece = choice["delta"].get("content") if spec.chat else choice["text"]
                    if piece:
                        answer.first_token_ms = answer.first_token_ms or 1000 * (time.perf_counter() - started)
                        pieces.append(piece)
        answer.text = "".join(pieces)
        answer.latency_ms = 1000 * (time.perf_counter() - started)
        return answer

    def hang_up_mid_stream(self, spec: Spec, max_tokens: int) -> bool:
        """Start a long streamed answer, read its first piece, close the connection. True if a piece came."""
        with self.http.stream("POST", self.path(spec), json=self.body(spec, True, max_tokens)) as response:
            if response.status_code != 200:
                return False
            return any(line.startswith("data: ") for line in response.iter_lines())  # stops at the first one

    def close(self) -> None:
        self.http.close()


def load_prompts(tasks: list[str], per_task: int) -> list[str]:
    return [doc.prompt for task in tasks for doc in get_task(task).docs().docs[:per_task]]


def parse_variants(text: str) -> list[dict | None]:
    """'routed;dense;11,17,20' → [None, {"set": "dense"}, {"omit": [11, 17, 20]}]."""
    variants = []
    for item in (part.strip() for part in text.split(";")):
        if item == "routed":
            variants.append(None)
        elif item == "dense":
            variants.append({"set": "dense"})
        elif item.startswith("set"):
            variants.append({"set": int(item[3:])})
        else:
            variants.append({"omit": [int(b) for b in item.split(",")]})
    return variants


def percentiles(values: list[float]) -> dict:
    if not values:
        return {}
    ordered = sorted(values)

    def at(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 1)

    return {"p50": at(0.50), "p90": at(0.90), "p99": at(0.99), "max": round(ordered[-1], 1),
            "mean": round(statistics.fmean(ordered), 1), "n": len(ordered)}


def plan(specs: list[Spec], requests: int, disconnects: int, stream_fraction: float, seed: int) -> list[tuple]:
    """The work list: (kind, spec) with kind 'plain', 'stream' or 'hang-up', shuffled."""
    rng = random.Random(seed)
    work = [("stream" if rng.random() < stream_fraction else "plain", specs[i % len(specs)]) for i in range(requests)]
    work += [("hang-up", rng.choice(specs)) for _ in range(disconnects)]
    rng.shuffle(work)
    return work


def run_clients(make_client, work: list[tuple], clients: int, references: dict,
                hang_up_tokens: int) -> tuple[list, list, float]:
    """Drain the work list with `clients` threads; returns (results, problems, wall seconds)."""
    pending: queue.Queue = queue.Queue()
    for item in work:
        pending.put(item)
    results, problems, lock = [], [], threading.Lock()

    def worker() -> None:
        client = make_client()
        try:
            while True:
                try:
                    kind, spec = pending.get_nowait()
                except queue.Empty:
                    return
                try:
                    if kind == "hang-up":
                        if not client.hang_up_mid_stream(spec, hang_up_tokens):
                            with lock:
                                problems.append(f"hang-up request {spec} got no first piece")
                        continue
                    answer = client.ask_streaming(spec) if kind == "stream" else client.ask(spec)
                except httpx.HTTPError as err:
                    answer = Answer(-1, error=f"{type(err).__name__}: {err}")
                problem = check(answer, references[spec])
                with lock:
                    results.append((kind, spec, answer))
                    if problem:
                        problems.append(f"{kind} {spec}: {problem}")
        finally:
            client.close()

    started = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results, problems, time.perf_counter() - started


def check(answer: Answer, reference: Answer) -> str | None:
    if answer.status != 200 or answer.error:
        return f"status {answer.status}: {answer.error}"
    if answer.text != reference.text:
        return f"text {answer.text!r} differs from the request served alone: {reference.text!r}"
    if answer.omitted != reference.omitted:
        return f"ran without blocks {answer.omitted}, alone it ran without {reference.omitted}"
    if answer.usage != reference.usage:
        return f"usage {answer.usage} differs from {reference.usage}"
    return None


def markdown(report: dict) -> str:
    lat, run = report["latency_ms"], report["run"]
    lines = [
        "# Load test: `pudding serve` on CPU", "",
        f"`{report['command']}`", "",
        (f"{report['date']} · {report['machine']['processor']} · {report['machine']['cpus']} CPU cores "
        f"(load average {report['machine']['load_average_before']} before the run) · {report['model']} · "
        f"context {report['settings']['max_len']} · max_tokens {report['settings']['max_tokens']}"), "",
        (f"{run['requests']} requests from {report['settings']['clients']} concurrent clients "
        f"({run['streamed']} streamed, {run['chat']} chat) over {run['distinct']} distinct (prompt, set, endpoint) "
        f"across sets {report['sets_used']}; {run['hang_ups']} more clients hung up mid-stream."), "",
        (f"**errors: {run['errors']}** · answers equal to the request served alone: {run['matching']}/{run['requests']} · "
        f"server up afterwards: {report['server_after']['up']} (cancelled generations: "
        f"{report['server_after']['requests']['cancelled']})"), "",
        "| latency (ms) | p50 | p90 | p99 | max | mean |", "|---|---:|---:|---:|---:|---:|",
    ]
    for name, values in lat.items():
        if values:
            lines.append(f"| {name} | {values['p50']} | {values['p90']} | {values['p99']} | {values['max']} | {values['mean']} |")
    for huge in report.get("huge_prompt") or []:
        h = huge["health_during_ms"]
        lines += ["", (f"One request of {huge['megabytes']:g} MB ({huge['prompt']} prompt) among the traffic: answered "
                       f"{huge['status']} in {huge['seconds']} s ({huge['answer'] or 'ok'}); meanwhile /health answered "
                       f"in {h.get('p50')} ms (p50), {h.get('p99')} ms (p99), {h.get('max')} ms at most, over "
                       f"{huge['health_polls']} polls (goal: under 100 ms).")]
    lines += ["", (f"Throughput: {run['requests_per_second']} requests/s, {run['tokens_per_second']} generated tokens/s "
                  f"({run['completion_tokens']} tokens in {run['seconds']} s)."), "",
              ("One engine serves one request at a time (a single worker thread), so latency under load is mostly "
              "time spent waiting in the queue behind the other clients' requests; the server-side columns "
              "(queue, engine TTFT) separate the two."), ""]
    return "\n".join(lines)


class HugeRequest(threading.Thread):
    """Requests of many megabytes sent among the normal traffic, one after the other (a text prompt, then a prompt of
    token ids, which is valid at any length until it is counted), while /health is asked every 20 ms: the server must
    read, check and tokenize them off its event loop, so /health keeps answering at once."""

    def __init__(self, url: str, model: str, megabytes: float) -> None:
        super().__init__(daemon=True)
        self.url, self.model, self.megabytes = url, model, megabytes
        self.results: list[dict] = []

    def bodies(self) -> dict[str, bytes]:
        size = int(self.megabytes * 1e6)
        text = ("The quick brown fox jumps over the lazy dog. " * (size // 45 + 1))[:size]
        ids = [1234] * (size // 6)  # "1234, " is six bytes
        small = [1234] * (4_000_000 // 6)  # the most the default --max-body-mb (4) lets through
        return {"text": json.dumps({"model": self.model, "prompt": text, "max_tokens": 4}).encode(),
                "token ids": json.dumps({"model": self.model, "prompt": ids, "max_tokens": 4}).encode(),
                "token ids, 4 MB": json.dumps({"model": self.model, "prompt": small, "max_tokens": 4}).encode()}

    def run(self) -> None:
        for kind, body in self.bodies().items():
            self.results.append(self._send(kind, body))

    def _send(self, kind: str, body: bytes) -> dict:
        done, health_ms = threading.Event(), []

        def poll() -> None:
            with httpx.Client(timeout=30) as client:
                while not done.is_set():
                    started = time.perf_counter()
                    client.get(f"{self.url}/health")
                    health_ms.append(1000 * (time.perf_counter() - started))
                    time.sleep(0.02)

        poller = threading.Thread(target=poll, daemon=True)
        poller.start()
        time.sleep(0.2)
        started = time.perf_counter()
        response = httpx.post(f"{self.url}/v1/completions", content=body, timeout=300,
                              headers={"content-type": "application/json"})
        seconds = time.perf_counter() - started
        done.set()
        poller.join()
        answer = response.json().get("error", {}).get("message", "")[:160] if response.status_code != 200 else ""
        return {"prompt": kind, "megabytes": round(len(body) / 1e6, 1), "status": response.status_code,
                "seconds": round(seconds, 2), "answer": answer, "health_during_ms": percentiles(health_ms),
                "health_polls": len(health_ms)}

    def report(self) -> list[dict]:
        return self.results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--bundle", type=Path, help="serve with this bundle's router ('routed' joins the sets)")
    parser.add_argument("--sets", default="dense;11,17,20;4,11,17,20,25,29;3,9,14,22",
                        help="';'-separated: dense, routed, setN, or blocks to omit such as 11,17,20")
    parser.add_argument("--tasks", default="arc_easy,piqa,hellaswag,winogrande")
    parser.add_argument("--prompts-per-task", type=int, default=3)
    parser.add_argument("--requests", type=int, default=512)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--stream-fraction", type=float, default=0.5)
    parser.add_argument("--chat", action=argparse.BooleanOptionalAction, default=True, help="chat requests too")
    parser.add_argument("--hang-ups", type=int, default=24, help="extra streamed requests that disconnect early")
    parser.add_argument("--max-len", type=int, default=512)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--huge-prompt-mb", type=float, default=20,
                        help="one request with a prompt this large among the traffic (0: none); /health is timed meanwhile")
    parser.add_argument("--output", type=Path)
    args = parser.parse_args()

    variants = parse_variants(args.sets + (";routed" if args.bundle and "routed" not in args.sets else ""))
    prompts = load_prompts(args.tasks.split(","), args.prompts_per_task)
    specs = [Spec(p, v, chat) for p in range(len(prompts)) for v in range(len(variants))
             for chat in ((False, True) if args.chat else (False,))]
    source = ["--bundle", str(args.bundle)] if args.bundle else ["--model", args.model]
    serve_args = [*source, "--max-len", str(args.max_len), "--device", args.device,
                  "--queue-size", str(args.clients + 2), "--max-body-mb", str(args.huge_prompt_mb + 4)]
    load_before = os.getloadavg()[0]
    log = Path(tempfile.mkdtemp(prefix="pudding-load-")) / "serve.log"
    print(f"starting: pudding serve {' '.join(serve_args)} (log {log})", file=sys.stderr)
    with ServerProcess(serve_args, log) as server:
        model = httpx.get(f"{server.url}/v1/models").json()["data"][0]["id"]

        def make_client() -> Client:
            return Client(server.url, model, prompts, variants, args.max_tokens)

        reference_client = make_client()
        references = {}
        started = time.perf_counter()
        for spec in specs:  # each served alone, one after the other
            references[spec] = reference_client.ask(spec)
            if references[spec].status != 200:
                raise SystemExit(f"reference request {spec} failed: {references[spec].error}")
        reference_seconds = time.perf_counter() - started
        print(f"{len(specs)} references in {reference_seconds:.1f} s; now {args.requests} requests from "
              f"{args.clients} clients", file=sys.stderr)

        work = plan(specs, args.requests, args.hang_ups, args.stream_fraction, args.seed)
        huge = HugeRequest(server.url, model, args.huge_prompt_mb) if args.huge_prompt_mb else None
        if huge:
            huge.start()
        results, problems, seconds = run_clients(make_client, work, args.clients, references,
                                                 hang_up_tokens=min(256, args.max_len // 2))
        if huge:
            huge.join()
        up = server.healthy()
        after = server.health() if up else {}
        again = reference_client.ask(specs[0]) if up else Answer(-1)
        if problem := check(again, references[specs[0]]):
            problems.append(f"after the run: {problem}")
        reference_client.close()

    answers = [a for _, _, a in results]
    streamed = [a for kind, _, a in results if kind == "stream"]
    tokens = sum(a.usage["completion_tokens"] for a in answers if a.usage)
    report = {
        "benchmark": "pudding serve under concurrent load",
        "command": "python benchmarks/load_test.py " + " ".join(sys.argv[1:]),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"processor": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                    "device": args.device, "load_average_before": round(load_before, 2),
                    "load_average_after": round(os.getloadavg()[0], 2)},
        "versions": environment(),
        "model": model,
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "output"},
        "sets_used": sorted({",".join(map(str, a.omitted)) or "dense" for a in answers if a.omitted is not None}),
        "run": {
            "requests": len(results), "streamed": len(streamed), "chat": sum(spec.chat for _, spec, _ in results),
            "hang_ups": sum(kind == "hang-up" for kind, _ in work), "distinct": len(specs),
            "errors": len(problems), "matching": sum(check(a, references[s]) is None for _, s, a in results),
            "seconds": round(seconds, 2), "requests_per_second": round(len(results) / seconds, 2),
            "completion_tokens": tokens, "tokens_per_second": round(tokens / seconds, 1),
            "references_seconds": round(reference_seconds, 2),
        },
        "huge_prompt": huge.report() if huge else None,
        "latency_ms": {
            "end to end, all": percentiles([a.latency_ms for a in answers]),
            "end to end, streamed": percentiles([a.latency_ms for a in streamed]),
            "first text, streamed (client)": percentiles([a.first_token_ms for a in streamed if a.first_token_ms]),
            "queue wait (server)": percentiles([a.server["queue_ms"] for a in answers if a.server]),
            "engine TTFT: route + swap + pre-fill (server)": percentiles([a.server["ttft_ms"] for a in answers if a.server]),
            "served alone, end to end": percentiles([r.latency_ms for r in references.values()]),
        },
        "server_after": {"up": up, **after},
        "problems": problems[:20],
    }
    print(json.dumps({k: report[k] for k in ("run", "latency_ms", "server_after")}, indent=2))
    if args.output:
        atomic_write_json(args.output, report)
        atomic_write_text(args.output.with_suffix(".md"), markdown(report))
        print(f"→ {args.output} and {args.output.with_suffix('.md')}", file=sys.stderr)
    if problems or not up:
        raise SystemExit(f"{len(problems)} problems, server up: {up}; first: {problems[:3]}")


if __name__ == "__main__":
    main()
