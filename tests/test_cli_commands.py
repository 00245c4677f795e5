"""The `kvbuffer` command end to end: `generate` streams from a real server, `serve` drains on SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import grpc
import pytest
from kvbuffer.service.cli import main
from kvbuffer.service.server.client import KVBufferClient, generate_request
from kvbuffer.v1 import kvbuffer_pb2 as pb
from kvbuffer.v1 import kvbuffer_pb2_grpc as pb_grpc
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
    (["--seed", str(2**64)], 2, "kvbuffer generate: error: seed: Input should be less than or equal to 184467"),
    (["--target", "127.0.0.1:1", "--timeout-s", "5"], 1, "kvbuffer generate: UNAVAILABLE: "),
])
def test_generate_errors_are_one_line(flags: list[str], code: int, message: str,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["generate", "hi", *flags]) == code
    err = capsys.readouterr().err.strip()
    assert err.startswith(message) and "\n" not in err and "Traceback" not in err


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"kvbuffer {importlib.metadata.version('kvbuffer')}"


def _lines(stream: object, into: queue.Queue[str]) -> None:
    for line in stream:  # type: ignore[attr-defined]
        into.put(line)


class Serve:
    """`kvbuffer serve` on loopback in a process of its own, its log read line by line; `prelude` runs first in
    that process (e.g. to register an atexit hook)."""

    def __init__(self, *flags: str, prelude: str = "") -> None:
        code = f"{prelude}\nimport sys\nfrom kvbuffer.service.cli import main\nsys.exit(main(sys.argv[1:]))"
        self.process = subprocess.Popen([sys.executable, "-c", code, "serve", "--host", "127.0.0.1", "--port", "0",
                                         "--metrics-port", "0", "--device", "cpu", *flags],
                                        stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
        self._log: queue.Queue[str] = queue.Queue()
        self._reader = threading.Thread(target=_lines, args=(self.process.stderr, self._log), daemon=True)
        self._reader.start()
        self.seen: list[str] = []
        match = self.wait_for(r"serving kvbuffer\.v1\.KVBufferService on 127\.0\.0\.1:(\d+)")
        self.port = int(match.group(1))

    def wait_for(self, pattern: str, timeout: float = 120) -> re.Match[str]:
        """The first log line from now on that matches pattern."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.process.poll() is None:
            try:
                self.seen.append(self._log.get(timeout=1))
            except queue.Empty:
                continue
            if match := re.search(pattern, self.seen[-1]):
                return match
        raise AssertionError(f"no log line matching {pattern!r}:\n" + "".join(self.seen))

    def output(self) -> str:
        self._reader.join(10)
        return "".join(self.seen + list(self._log.queue))

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


def test_serve_drains_on_sigterm() -> None:
    serve = Serve("--shutdown-grace-period-s", "30")
    try:
        async def stream_across_sigterm() -> list[pb.GenerateResponse]:
            responses = []
            async with KVBufferClient(f"127.0.0.1:{serve.port}") as client:
                async for response in client.generate("until the end", max_new_tokens=300, ignore_eos=True):
                    if not responses:
                        serve.process.send_signal(signal.SIGTERM)
                    responses.append(response)
            return responses

        responses = asyncio.run(stream_across_sigterm())
        assert responses[-1].finish_reason == pb.FINISH_REASON_LENGTH
        assert sum(len(r.token_ids) for r in responses) == 300
        assert serve.process.wait(timeout=60) == 0
    finally:
        serve.kill()
    output = serve.output()
    assert "draining: 1 requests in flight" in output and "stopped" in output


def test_serve_exits_once_stopped_without_the_interpreters_teardown() -> None:
    """Once it logs "stopped" nothing is left to do: the process ends there, not after the interpreter's teardown
    (seconds with torch loaded; an atexit hook that would hang stands in for it here)."""
    serve = Serve(prelude="import atexit, time\natexit.register(time.sleep, 600)")
    try:
        serve.process.send_signal(signal.SIGTERM)
        serve.wait_for("stopped")
        assert serve.process.wait(timeout=60) == 0
    finally:
        serve.kill()


def test_a_second_interrupt_exits_at_once() -> None:
    """Ctrl-C drains (here a stream that would keep it 10 minutes); a second Ctrl-C ends the process now."""
    serve = Serve("--shutdown-grace-period-s", "600")
    stream_started = threading.Event()

    def long_stream() -> None:
        with grpc.insecure_channel(f"127.0.0.1:{serve.port}") as channel:
            call = pb_grpc.KVBufferServiceStub(channel).Generate(generate_request("long", max_new_tokens=3000,
                                                                                  ignore_eos=True))
            with contextlib.suppress(grpc.RpcError):
                for _response in call:
                    stream_started.set()

    client = threading.Thread(target=long_stream, daemon=True)
    client.start()
    try:
        assert stream_started.wait(60)
        serve.process.send_signal(signal.SIGINT)
        serve.wait_for("draining: 1 requests in flight")
        serve.process.send_signal(signal.SIGINT)
        assert serve.process.wait(timeout=60) == 128 + signal.SIGINT
    finally:
        serve.kill()
    client.join(30)
    assert "exiting without draining" in serve.output()
