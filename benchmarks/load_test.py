"""Load test of the gRPC service: N concurrent streaming clients for a fixed time.

By default it starts `kvbuffer serve` itself (the embedded tiny model on CPU) with the flags given after
`--`; `--target` points it at a running server instead. It reports p50/p99 time to first token and time per
output token, throughput and errors by status. Below capacity (clients <= max_running_requests +
max_waiting_requests) there must be no errors; above it, only RESOURCE_EXHAUSTED. Exit status 1 otherwise.

    python benchmarks/load_test.py --clients 8 --duration 20 -- --max-running-requests 8 --max-waiting-requests 8
    python benchmarks/load_test.py --clients 32 --duration 20 -- --max-running-requests 8 --max-waiting-requests 8
"""

from __future__ import annotations

import argparse
import asyncio
import math
import random
import re
import shutil
import string
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

import grpc
from kvbuffer.service.server.client import KVBufferClient

LISTENING = re.compile(r"serving \S+ on (\S+):(\d+) ")
ALLOWED_ERRORS = {"RESOURCE_EXHAUSTED"}


@dataclass
class Results:
    ttft_s: list[float] = field(default_factory=list)
    tpot_s: list[float] = field(default_factory=list)
    output_tokens: int = 0
    errors: Counter[str] = field(default_factory=Counter)


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in (0, 1]); NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


async def client_loop(client: KVBufferClient, deadline: float, args: argparse.Namespace, rng: random.Random,
                      results: Results) -> None:
    """Back-to-back streaming requests until the deadline; a refused request backs off before the next."""
    while time.perf_counter() < deadline:
        prompt = "".join(rng.choices(string.ascii_letters + " ", k=args.prompt_chars))
        start = time.perf_counter()
        first = last = 0.0
        tokens = 0
        try:
            async for response in client.generate(prompt, max_new_tokens=args.max_new_tokens, ignore_eos=True,
                                                  timeout=args.request_timeout_s):
                if response.token_ids:
                    last = time.perf_counter()
                    first = first or last
                    tokens += len(response.token_ids)
        except grpc.aio.AioRpcError as error:
            results.errors[error.code().name] += 1
            await asyncio.sleep(args.backoff_s)
            continue
        results.ttft_s.append(first - start)
        if tokens > 1:
            results.tpot_s.append((last - first) / (tokens - 1))
        results.output_tokens += tokens


async def run_load(target: str, args: argparse.Namespace) -> tuple[Results, float]:
    results = Results()
    async with KVBufferClient(target, token=args.token) as client:
        await client.model_info(timeout=30)  # connected and serving before the clock starts
        start = time.perf_counter()
        deadline = start + args.duration
        await asyncio.gather(*(client_loop(client, deadline, args, random.Random(i), results)
                               for i in range(args.clients)))
        return results, time.perf_counter() - start


def start_server(serve_flags: list[str]) -> tuple[subprocess.Popen[str], str]:
    """`kvbuffer serve` on a free loopback port; returns the process and its address once it serves."""
    process = subprocess.Popen([sys.executable, "-m", "kvbuffer.service.cli", "serve", "--host", "127.0.0.1",
                                "--port", "0", "--metrics-port", "0", *serve_flags],
                               stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    assert process.stderr is not None
    for line in process.stderr:  # ends when the server exits
        if match := LISTENING.search(line):
            # keep its log flowing (a full pipe would stall the server) and visible
            threading.Thread(target=shutil.copyfileobj, args=(process.stderr, sys.stderr), daemon=True).start()
            return process, f"{match.group(1)}:{match.group(2)}"
    raise SystemExit(f"kvbuffer serve exited with status {process.wait()} before serving")


def report(args: argparse.Namespace, results: Results, elapsed: float) -> str:
    ms = [1000 * percentile(values, q) for values in (results.ttft_s, results.tpot_s) for q in (0.5, 0.99)]
    rejected = results.errors["RESOURCE_EXHAUSTED"]
    other = sum(n for code, n in results.errors.items() if code not in ALLOWED_ERRORS)
    header = ("| clients | duration (s) | requests ok | RESOURCE_EXHAUSTED | other errors | TTFT p50 (ms) "
              "| TTFT p99 (ms) | TPOT p50 (ms) | TPOT p99 (ms) | output tokens/s | requests/s |")
    row = (f"| {args.clients} | {elapsed:.1f} | {len(results.ttft_s)} | {rejected} | {other} | {ms[0]:.1f} "
           f"| {ms[1]:.1f} | {ms[2]:.2f} | {ms[3]:.2f} | {results.output_tokens / elapsed:.0f} "
           f"| {len(results.ttft_s) / elapsed:.2f} |")
    lines = [header, "|" + " --- |" * header.count(" | ") + " --- |", row]
    if other:
        lines.append("other errors: " + ", ".join(f"{code} x{n}" for code, n in results.errors.items()
                                                  if code not in ALLOWED_ERRORS))
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", help="host:port of a running server (default: start one)")
    parser.add_argument("--token", help="bearer token, if the server requires one")
    parser.add_argument("--clients", type=int, default=8, help="concurrent streaming clients")
    parser.add_argument("--duration", type=float, default=20.0, help="seconds during which requests are started")
    parser.add_argument("--prompt-chars", type=int, default=32, help="prompt length (tiny model: 1 token a char)")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="tokens generated per request")
    parser.add_argument("--backoff-s", type=float, default=0.05, help="pause after RESOURCE_EXHAUSTED")
    parser.add_argument("--request-timeout-s", type=float, default=120.0, help="deadline of each request")
    parser.add_argument("serve_flags", nargs="*", help="after --: flags for `kvbuffer serve`")
    args = parser.parse_args()
    process = None
    target = args.target
    if target is None:
        process, target = start_server(args.serve_flags)
    try:
        results, elapsed = asyncio.run(run_load(target, args))
    finally:
        if process is not None:
            process.terminate()
            process.wait(60)
    print(f"command: python {' '.join(sys.argv)}")
    print(report(args, results, elapsed))
    return 1 if set(results.errors) - ALLOWED_ERRORS else 0


if __name__ == "__main__":
    sys.exit(main())
