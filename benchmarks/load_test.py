"""Load test of the gRPC service: N concurrent clients for a fixed time, at one or more concurrencies; optionally a
cancel storm and a SIGTERM drain.

By default it starts `kvbuffer serve` itself (the embedded tiny model on CPU) with the flags given after `--`;
`--target` points it at a running server instead. It reports, per concurrency, p50/p99 time to first token and
time per output token (streaming; unary requests report their whole latency as TTFT), throughput and errors by
status. Below capacity (clients <= max_running_requests + max_waiting_requests) there must be no errors; above
it, only RESOURCE_EXHAUSTED. Then:
- `--cancel-storm N`: N streams cancelled at random points (before or after their first tokens); the server must
  end up idle (its /metrics: no request in flight, running or queued) and then serve a request;
- `--drain N` (own server only): N streams in flight when SIGTERM arrives must all finish (length), a request
  sent during the drain must get UNAVAILABLE, and the server must exit with status 0.
Exit status 1 if any of that fails.

    python benchmarks/load_test.py --clients 1 8 32 --duration 10 -- --max-running-requests 8 --max-waiting-requests 8
    python benchmarks/load_test.py --clients 4 --unary-clients 4 --cancel-storm 64 --drain 8
"""

from __future__ import annotations

import argparse
import asyncio
import math
import random
import re
import shutil
import signal
import string
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass, field

import grpc
from kvbuffer.service.server.client import KVBufferClient
from kvbuffer.v1 import kvbuffer_pb2 as pb

LISTENING = re.compile(r"serving \S+ on (\S+):(\d+) .*metrics on http://(\S+):(\d+)/metrics")
ALLOWED_ERRORS = {"RESOURCE_EXHAUSTED"}
IDLE_GAUGES = ("kvbuffer_inflight_requests", "kvbuffer_running_requests", "kvbuffer_queue_depth")


@dataclass
class Results:
    ttft_s: list[float] = field(default_factory=list)
    tpot_s: list[float] = field(default_factory=list)
    output_tokens: int = 0
    errors: Counter[str] = field(default_factory=Counter)


@dataclass
class Server:
    target: str
    metrics_url: str | None = None
    process: subprocess.Popen[str] | None = None


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in (0, 1]); NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def random_prompt(rng: random.Random, chars: int) -> str:
    return "".join(rng.choices(string.ascii_letters + " ", k=chars))


async def client_loop(client: KVBufferClient, mode: str, deadline: float, args: argparse.Namespace,
                      rng: random.Random, results: Results) -> None:
    """Back-to-back requests until the deadline; a refused request backs off before the next."""
    while time.perf_counter() < deadline:
        prompt = random_prompt(rng, args.prompt_chars)
        start = time.perf_counter()
        first = last = 0.0
        tokens = 0
        try:
            if mode == "unary":
                response = await client.generate_unary(prompt, max_new_tokens=args.max_new_tokens, ignore_eos=True,
                                                       timeout=args.request_timeout_s)
                first = last = time.perf_counter()
                tokens = len(response.token_ids)
            else:
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
        if tokens > 1 and mode == "stream":
            results.tpot_s.append((last - first) / (tokens - 1))
        results.output_tokens += tokens


async def run_load(client: KVBufferClient, mode: str, clients: int, args: argparse.Namespace
                   ) -> tuple[Results, float]:
    results = Results()
    start = time.perf_counter()
    deadline = start + args.duration
    await asyncio.gather(*(client_loop(client, mode, deadline, args, random.Random(i), results)
                           for i in range(clients)))
    return results, time.perf_counter() - start


async def cancel_storm(client: KVBufferClient, server: Server, n: int, args: argparse.Namespace) -> list[str]:
    """n streams cancelled at random points; then the server must be idle and serve. Problems found, if any."""
    rng = random.Random(n)

    async def one(i: int) -> None:
        call = client.generate(random_prompt(rng, args.prompt_chars), max_new_tokens=args.max_new_tokens * 4,
                               ignore_eos=True, timeout=args.request_timeout_s)
        after = rng.choice([0, 1, 3])  # responses to read before cancelling (0: maybe before the first token)
        with_error = None
        try:
            seen = 0
            async for _ in call:
                seen += 1
                if seen >= after:
                    break
        except grpc.aio.AioRpcError as error:
            with_error = error.code().name
        call.cancel()
        if with_error not in (None, "RESOURCE_EXHAUSTED", "CANCELLED"):
            problems.append(f"storm request {i}: {with_error}")

    problems: list[str] = []
    start = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(n)))
    idle_s = await wait_idle(server, timeout=60) if server.metrics_url else 0.0
    if math.isnan(idle_s):
        problems.append(f"not idle 60 s after the storm: {read_gauges(server)}")
    try:
        after = await client.generate_unary("after the storm", max_new_tokens=4, ignore_eos=True, timeout=60)
        if after.finish_reason != pb.FINISH_REASON_LENGTH:
            problems.append(f"request after the storm finished with {pb.FinishReason.Name(after.finish_reason)}")
    except grpc.aio.AioRpcError as error:
        problems.append(f"request after the storm: {error.code().name}: {error.details()}")
    print(f"cancel storm: {n} streams cancelled in {time.perf_counter() - start:.1f} s, server idle "
          f"{idle_s:.2f} s after, then served a request" if not problems else f"cancel storm FAILED: {problems}")
    return problems


def read_gauges(server: Server) -> dict[str, float]:
    assert server.metrics_url is not None
    text = urllib.request.urlopen(server.metrics_url, timeout=10).read().decode()
    values = dict.fromkeys(IDLE_GAUGES, 0.0)
    for line in text.splitlines():
        name = re.split(r"[{ ]", line, maxsplit=1)[0]
        if name in values:
            values[name] += float(line.rsplit(" ", 1)[1])
    return values


async def wait_idle(server: Server, timeout: float) -> float:
    """Seconds until /metrics shows nothing in flight, running or queued; NaN if not within timeout."""
    start = time.perf_counter()
    while time.perf_counter() - start < timeout:
        if not any((await asyncio.to_thread(read_gauges, server)).values()):
            return time.perf_counter() - start
        await asyncio.sleep(0.1)
    return math.nan


async def drain(client: KVBufferClient, server: Server, n: int, args: argparse.Namespace) -> list[str]:
    """SIGTERM with n streams in flight: they finish, a late request is UNAVAILABLE, the server exits 0."""
    assert server.process is not None
    rng = random.Random(-n)
    calls = [client.generate(random_prompt(rng, args.prompt_chars), max_new_tokens=args.max_new_tokens,
                             ignore_eos=True, timeout=args.request_timeout_s) for _ in range(n)]
    firsts = [await anext(aiter(call)) for call in calls]  # each in flight before the signal
    start = time.perf_counter()
    server.process.send_signal(signal.SIGTERM)
    problems: list[str] = []
    await asyncio.sleep(0.5)
    try:
        await client.generate_unary("late", max_new_tokens=2, timeout=30)
        problems.append("a request during the drain was served")
    except grpc.aio.AioRpcError as error:
        if error.code() != grpc.StatusCode.UNAVAILABLE:
            problems.append(f"a request during the drain got {error.code().name}, not UNAVAILABLE")
    for i, (call, first) in enumerate(zip(calls, firsts, strict=True)):
        try:
            responses = [first, *[response async for response in call]]
        except grpc.aio.AioRpcError as error:
            problems.append(f"drained request {i}: {error.code().name}")
            continue
        tokens = sum(len(r.token_ids) for r in responses)
        if responses[-1].finish_reason != pb.FINISH_REASON_LENGTH or tokens != args.max_new_tokens:
            problems.append(f"drained request {i}: {pb.FinishReason.Name(responses[-1].finish_reason)} after {tokens}")
    status = await asyncio.to_thread(server.process.wait, 120)
    if status != 0:
        problems.append(f"exit status {status}")
    print(f"drain: {n}/{n} in-flight streams finished, late request UNAVAILABLE, exit status 0 after "
          f"{time.perf_counter() - start:.1f} s" if not problems else f"drain FAILED: {problems}")
    server.process = None
    return problems


def start_server(serve_flags: list[str], timeout_s: float) -> Server:
    """`kvbuffer serve` on free loopback ports; returns once it serves (its log then goes on to stderr). It logs
    at info, which its "serving ... on" line needs (serve_flags may ask for debug)."""
    process = subprocess.Popen([sys.executable, "-m", "kvbuffer.service.cli", "serve", "--host", "127.0.0.1",
                                "--port", "0", "--metrics-port", "0", "--log-level", "info", *serve_flags],
                               stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    assert process.stderr is not None
    timer = threading.Timer(timeout_s, process.kill)  # a server that never comes up must not hang the benchmark
    timer.start()
    try:
        for line in process.stderr:  # ends when the server exits
            sys.stderr.write(line)
            if match := LISTENING.search(line):
                # keep its log flowing (a full pipe would stall the server) and visible
                threading.Thread(target=shutil.copyfileobj, args=(process.stderr, sys.stderr), daemon=True).start()
                return Server(f"{match.group(1)}:{match.group(2)}",
                              f"http://{match.group(3)}:{match.group(4)}/metrics", process)
    finally:
        timer.cancel()
    raise SystemExit(f"kvbuffer serve exited with status {process.wait()} before serving")


HEADER = ("| mode | clients | duration (s) | requests ok | RESOURCE_EXHAUSTED | other errors | TTFT p50 (ms) "
          "| TTFT p99 (ms) | TPOT p50 (ms) | TPOT p99 (ms) | output tokens/s | requests/s |")


def report_row(mode: str, clients: int, results: Results, elapsed: float) -> str:
    ms = [1000 * percentile(values, q) for values in (results.ttft_s, results.tpot_s) for q in (0.5, 0.99)]
    rejected = results.errors["RESOURCE_EXHAUSTED"]
    other = sum(n for code, n in results.errors.items() if code not in ALLOWED_ERRORS)
    row = (f"| {mode} | {clients} | {elapsed:.1f} | {len(results.ttft_s)} | {rejected} | {other} | {ms[0]:.1f} "
           f"| {ms[1]:.1f} | {ms[2]:.2f} | {ms[3]:.2f} | {results.output_tokens / elapsed:.0f} "
           f"| {len(results.ttft_s) / elapsed:.2f} |")
    if other:
        row += "\nother errors: " + ", ".join(f"{code} x{n}" for code, n in results.errors.items()
                                             if code not in ALLOWED_ERRORS)
    return row


async def run(server: Server, args: argparse.Namespace) -> bool:
    """The whole test against server; True if everything held."""
    ok = True
    async with KVBufferClient(server.target, token=args.token) as client:
        await client.model_info(timeout=30)  # connected and serving before the clock starts
        print(HEADER)
        print("|" + " --- |" * HEADER.count(" | ") + " --- |")
        rows = [("stream", clients) for clients in args.clients]
        rows += [("unary", args.unary_clients)] if args.unary_clients else []
        for mode, clients in rows:
            results, elapsed = await run_load(client, mode, clients, args)
            print(report_row(mode, clients, results, elapsed), flush=True)
            ok &= not set(results.errors) - ALLOWED_ERRORS
        if args.cancel_storm:
            ok &= not await cancel_storm(client, server, args.cancel_storm, args)
        if args.drain:
            ok &= not await drain(client, server, args.drain, args)
    return ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", help="host:port of a running server (default: start one)")
    parser.add_argument("--token", help="bearer token, if the server requires one")
    parser.add_argument("--clients", type=int, nargs="*", default=[8], help="concurrent streaming clients (Generate), "
                                                                          "one row each")
    parser.add_argument("--unary-clients", type=int, default=0, metavar="N", help="then a row of N concurrent "
                                                                                 "GenerateUnary clients")
    parser.add_argument("--duration", type=float, default=20.0, help="seconds during which requests are started")
    parser.add_argument("--prompt-chars", type=int, default=32, help="prompt length (tiny model: 1 token a char)")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="tokens generated per request")
    parser.add_argument("--backoff-s", type=float, default=0.05, help="pause after RESOURCE_EXHAUSTED")
    parser.add_argument("--request-timeout-s", type=float, default=120.0, help="deadline of each request")
    parser.add_argument("--cancel-storm", type=int, default=0, metavar="N", help="then N streams cancelled at once")
    parser.add_argument("--drain", type=int, default=0, metavar="N",
                        help="then SIGTERM with N streams in flight (own server only)")
    parser.add_argument("--startup-timeout-s", type=float, default=600.0, help="the server must serve within this")
    parser.add_argument("serve_flags", nargs="*", help="after --: flags for `kvbuffer serve`")
    args = parser.parse_args()
    if args.drain and args.target:
        parser.error("--drain needs the server this script starts (no --target)")
    server = Server(args.target) if args.target else start_server(args.serve_flags, args.startup_timeout_s)
    try:
        ok = asyncio.run(run(server, args))
    finally:
        if server.process is not None:
            server.process.terminate()
            server.process.wait(120)
    print(f"command: python {' '.join(sys.argv)}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
