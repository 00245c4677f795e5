"""The `kvbuffer` command end to end: `generate` streams from a real server, `serve` drains on SIGTERM."""

from __future__ import annotations

import asyncio
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import pytest
from kvbuffer.service.cli import main
from kvbuffer.service.server.client import KVBufferClient
from kvbuffer.v1 import kvbuffer_pb2 as pb
from service_harness import RunningServer

CLI = [sys.executable, "-m", "kvbuffer.service.cli"]


@pytest.fixture(scope="module")
def server() -> Iterator[RunningServer]:
    running = RunningServer()
    yield running
    running.stop()


def test_generate_streams_text_and_reports_usage(server: RunningServer) -> None:
    result = subprocess.run([*CLI, "generate", "Hello", "--target", server.target, "--max-new-tokens", "12",
                             "--ignore-eos"], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHONIOENCODING": "utf-8"})
    assert result.returncode == 0, result.stderr
    assert result.stdout
    assert "finish=LENGTH prompt_tokens=5 completion_tokens=12" in result.stderr


@pytest.mark.parametrize(("flags", "code", "message"), [
    (["--top-p", "0"], 2, "kvbuffer generate: error: top_p: Input should be greater than 0"),
    (["--target", "127.0.0.1:1", "--timeout-s", "5"], 1, "kvbuffer generate: UNAVAILABLE: "),
])
def test_generate_errors_are_one_line(flags: list[str], code: int, message: str,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["generate", "hi", *flags]) == code
    err = capsys.readouterr().err.strip()
    assert err.startswith(message) and "\n" not in err and "Traceback" not in err


def _lines(stream: object, into: queue.Queue[str]) -> None:
    for line in stream:  # type: ignore[attr-defined]
        into.put(line)


def test_serve_drains_on_sigterm() -> None:
    process = subprocess.Popen([*CLI, "serve", "--host", "127.0.0.1", "--port", "0", "--metrics-port", "0",
                                "--device", "cpu", "--shutdown-grace-period-s", "30"],
                               stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    log: queue.Queue[str] = queue.Queue()
    reader = threading.Thread(target=_lines, args=(process.stderr, log), daemon=True)
    reader.start()
    try:
        port, deadline, seen = None, time.monotonic() + 120, []
        while port is None and time.monotonic() < deadline and process.poll() is None:
            try:
                seen.append(log.get(timeout=1))
            except queue.Empty:
                continue
            match = re.search(r"serving kvbuffer\.v1\.KVBufferService on 127\.0\.0\.1:(\d+)", seen[-1])
            port = int(match.group(1)) if match else None
        assert port is not None, "".join(seen)

        async def stream_across_sigterm() -> list[pb.GenerateResponse]:
            responses = []
            async with KVBufferClient(f"127.0.0.1:{port}") as client:
                async for response in client.generate("until the end", max_new_tokens=300, ignore_eos=True):
                    if not responses:
                        process.send_signal(signal.SIGTERM)
                    responses.append(response)
            return responses

        responses = asyncio.run(stream_across_sigterm())
        assert responses[-1].finish_reason == pb.FINISH_REASON_LENGTH
        assert sum(len(r.token_ids) for r in responses) == 300
        assert process.wait(timeout=60) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    reader.join(10)
    output = "".join(seen + list(log.queue))
    assert "draining: 1 requests in flight" in output and "stopped" in output
