"""Engine sglang when SGLang fails while it starts: `kvbuffer serve` must stop with one line, never wait forever,
and leave no SGLang process behind.

SGLang's start cannot run without a GPU, so `launch_like_sglang` plays SGLang 0.5.17's `Engine` start-up with real
child processes: it installs the adapter's SIGQUIT handler as SGLang installs `custom_sigquit_handler`
(engine.py `_set_envs_and_config`), starts its "processes", then waits for the scheduler's ready message while
the scheduler process is alive and raises when it has died (engine.py `_wait_for_scheduler_ready`). A scheduler
that hit an exception sends SIGQUIT to its parent (scheduler.py `run_scheduler_process`) and stays alive while
its non-daemon threads run: the wait alone would never end. The stand-in gives up after WAIT_S so that a
regression fails the test instead of hanging it.

A start-up that goes well must say so in serve's log (`load_test.py` waits for its "serving ... on" line), also
after SGLang has set up logging for the process it starts in; one that stalls past startup_report_s must say
where every process is (the stacks of serve and of the SGLang processes, which the plugin makes dump on SIGUSR1).
There `launch_like_sglang` calls SGLang's real `configure_logger` and a child process runs the real plugin."""

from __future__ import annotations

import asyncio
import io
import logging
import os
import random
import re
import runpy
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
from kvbuffer.service.engine.api import EngineFailedError
from kvbuffer.service.server import app
from kvbuffer.service.server.settings import ServiceSettings, load_settings
from kvbuffer.service.sglang import engine as sglang_engine
from kvbuffer.service.sglang.engine import SGLangEngine, SGLangRuntime
from kvbuffer.service.sglang.settings import server_arguments
from sglang_cpu import import_sglang
from sglang_standin import StandInSGLang, make_tokenizer

WAIT_S = 30.0
# A scheduler that raised: SIGQUIT to its parent, then alive (its threads keep it running)
FAILED_SCHEDULER = "import os, signal, time; os.kill(os.getppid(), signal.SIGQUIT); time.sleep(300)"
KILLED_SCHEDULER = "import sys; sys.exit(137)"  # e.g. the OOM killer: no SIGQUIT, the process is gone
DETOKENIZER = "import time; time.sleep(300)"  # SGLang's other process, alive and waiting

TESTS = Path(__file__).resolve().parent
# How the benchmarks tell that `kvbuffer serve` is up: load_test.py's pattern for serve's "serving ... on" line.
LISTENING = runpy.run_path(str(TESTS.parent / "benchmarks" / "load_test.py"))["LISTENING"]
# An SGLang process that registered the plugin, then stalls (as a scheduler stuck after its CUDA-graph capture).
STALLED_SGLANG_PROCESS = """
import sys, time
from sglang_cpu import import_sglang
import_sglang()
from kvbuffer.service.sglang.plugin import register
register()
print("registered", flush=True)
def stalled_after_capture():
    time.sleep(120)
stalled_after_capture()
"""

main_thread_only = pytest.mark.skipif(threading.current_thread() is not threading.main_thread(),
                                      reason="signals need the main thread")


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen[bytes]]]:
    """The stand-in's processes; whatever the adapter left alive is killed afterwards (and fails the test)."""
    started: list[subprocess.Popen[bytes]] = []
    try:
        yield started
    finally:
        for process in started:
            if process.poll() is None:
                process.kill()
            process.wait()
        signal.signal(signal.SIGQUIT, signal.SIG_DFL)


def launch_like_sglang(processes: list[subprocess.Popen[bytes]], scheduler: str) -> Callable[[], SGLangRuntime]:
    def launch() -> SGLangRuntime:
        signal.signal(signal.SIGQUIT, sglang_engine._launch_failed)  # SGLang: custom_sigquit_handler
        processes.append(subprocess.Popen([sys.executable, "-c", DETOKENIZER]))
        processes.append(subprocess.Popen([sys.executable, "-c", scheduler]))
        deadline = time.monotonic() + WAIT_S
        while time.monotonic() < deadline:  # no ready message will come: the scheduler failed
            if processes[-1].poll() is not None:
                raise RuntimeError(f"Rank 0 scheduler died during initialization (exit code: "
                                   f"{processes[-1].returncode}).")
            time.sleep(0.05)
        raise TimeoutError(f"the stand-in waited {WAIT_S} s for the scheduler's ready message")

    return launch


def settings(**overrides: object) -> ServiceSettings:
    return load_settings({"engine": "sglang", "model": "/models/qwen3-next", "host": "127.0.0.1", "port": 0,
                          "metrics_port": 0, **overrides})


def assert_all_stopped(processes: list[subprocess.Popen[bytes]]) -> None:
    assert len(processes) == 2
    assert [process.poll() is not None for process in processes] == [True, True], "SGLang processes left running"


@main_thread_only
def test_a_scheduler_that_fails_while_sglang_starts_stops_serve_with_one_line(
        processes: list[subprocess.Popen[bytes]], monkeypatch: pytest.MonkeyPatch) -> None:
    """The SIGQUIT of a failed scheduler ends the wait for its ready message: `serve` raises StartupError (the CLI
    prints it as its one line and exits 1) and SGLang's processes are stopped."""
    monkeypatch.setattr(app, "make_engine", lambda s: SGLangEngine(s, launch_like_sglang(processes,
                                                                                         FAILED_SCHEDULER)))
    with pytest.raises(app.StartupError) as error:
        asyncio.run(app.serve(settings()))
    message = str(error.value)
    assert len(message.splitlines()) == 1
    assert "SGLang did not start: an SGLang process died or failed while SGLang started" in message
    assert_all_stopped(processes)


@main_thread_only
def test_a_scheduler_killed_while_sglang_starts_leaves_no_sglang_process(
        processes: list[subprocess.Popen[bytes]]) -> None:
    """SGLang sees a dead scheduler itself and raises; its detokenizer, a non-daemon child the interpreter's exit
    would wait for, is stopped by the adapter."""
    engine = SGLangEngine(settings(), launch_like_sglang(processes, KILLED_SCHEDULER))
    with pytest.raises(EngineFailedError) as error:
        asyncio.run(engine.start())
    assert str(error.value) == "SGLang did not start: Rank 0 scheduler died during initialization (exit code: 137)."
    assert_all_stopped(processes)


@pytest.fixture
def service_log() -> Iterator[io.StringIO]:
    """serve's log as the CLI sets it up (one root handler at the settings' level), into a buffer; the logging
    set-up before the test, the level of SGLang's loggers included, comes back afterwards."""
    root, sglang_logger = logging.getLogger(), logging.getLogger("sglang")
    handlers, level, sglang_level = list(root.handlers), root.level, sglang_logger.level
    out = io.StringIO()
    root.handlers[:] = [logging.StreamHandler(out)]
    try:
        yield out
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
        sglang_logger.setLevel(sglang_level)


def sglang_or_skip() -> None:
    try:
        import_sglang()
    except Exception as e:  # any import failure: a missing optional package, another SGLang release
        pytest.skip(f"sglang is not importable here ({type(e).__name__}: {e})")


def serve_until_up_then_drain(s: ServiceSettings, log: io.StringIO) -> None:
    """app.serve until its log says it is up (load_test's LISTENING), then SIGTERM drains it."""
    async def go() -> None:
        serving = asyncio.create_task(app.serve(s))
        deadline = time.monotonic() + WAIT_S
        while not LISTENING.search(log.getvalue()):
            assert not serving.done() or serving.result() is None, "serve ended before it was up"
            assert time.monotonic() < deadline, f"serve never logged that it was up; its log:\n{log.getvalue()}"
            await asyncio.sleep(0.05)
        os.kill(os.getpid(), signal.SIGTERM)
        await asyncio.wait_for(serving, timeout=WAIT_S)

    asyncio.run(go())


@main_thread_only
def test_serve_logs_that_it_is_up_after_sglang_set_up_logging(service_log: io.StringIO, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """`sglang.Engine` sets up logging for the process it starts in (configure_logger: basicConfig(force=True)
    at SGLang's level, a step quieter than serve's); serve's own INFO lines must still reach its log, the one the
    benchmark waits for among them (before, the benchmark killed a server that was up), and SGLang's loggers stay
    at SGLang's level."""
    sglang_or_skip()
    from sglang.srt.utils.common import configure_logger

    level = random.choice(["debug", "info"])
    logging.getLogger().setLevel(level.upper())
    s = settings(log_level=level)
    sglang_level = next(arg.value for arg in server_arguments(s) if arg.name == "log_level")
    runtime = StandInSGLang(make_tokenizer(tmp_path))

    def launch() -> SGLangRuntime:
        configure_logger(SimpleNamespace(log_level=sglang_level))  # as Engine._launch_subprocesses does
        return runtime

    monkeypatch.setattr(app, "make_engine", lambda st: SGLangEngine(st, launch))
    serve_until_up_then_drain(s, service_log)
    sglang_log = logging.getLogger("sglang.srt.managers.tokenizer_manager")
    sglang_log.info("an INFO line of SGLang")
    sglang_log.warning("a WARNING line of SGLang")
    log = service_log.getvalue()
    assert "draining: 0 requests in flight" in log and "stopped" in log  # serve's INFO lines after the start
    assert "a WARNING line of SGLang" in log
    assert ("an INFO line of SGLang" in log) == (sglang_level == "info")


@main_thread_only
def test_a_stalled_start_logs_one_line_and_the_stacks_of_serve_and_of_the_sglang_processes(
        service_log: io.StringIO, capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
        tmp_path: Path) -> None:
    """Past startup_report_s, serve logs one line and the stacks: its own (the launch holding the event loop, as
    SGLang's does) and, through SIGUSR1, those of its child processes that catch it: the one that registered the
    plugin. A child that does not catch SIGUSR1 (which would end it) is left alone."""
    sglang_or_skip()
    logging.getLogger().setLevel(logging.INFO)
    # no empty entry: it would put the working directory (the repo root, whose operator/ is not the stdlib's) first
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")]))}
    stalled = subprocess.Popen([sys.executable, "-c", STALLED_SGLANG_PROCESS], env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        assert stalled.stdout is not None and stalled.stdout.readline() == "registered\n", stalled.communicate()[1]
        limit_s = random.uniform(0.5, 1.5)
        runtime = StandInSGLang(make_tokenizer(tmp_path))

        def stalled_launch() -> SGLangRuntime:
            time.sleep(limit_s + 2)  # blocks the event loop, as SGLang's wait for its schedulers does
            return runtime

        monkeypatch.setattr(app, "make_engine", lambda st: SGLangEngine(st, stalled_launch))
        serve_until_up_then_drain(settings(startup_report_s=limit_s), service_log)
        assert bystander.poll() is None, "SIGUSR1 went to a process that does not catch it"
    finally:
        stalled.terminate()
        bystander.kill()
        _, stalled_stderr = stalled.communicate(timeout=WAIT_S)
        bystander.wait()
    reports = [line for line in service_log.getvalue().splitlines() if "has not started" in line]
    assert len(reports) == 1
    report = re.fullmatch(rf"the server has not started after {limit_s:.0f} s; Python stacks follow on stderr: "
                          r"this process's, and those of its processes \[([\d, ]*)\] \(SIGUSR1\)", reports[0])
    assert report is not None, reports[0]
    signalled = {int(pid) for pid in report.group(1).split(",")}  # the test's other children may catch it too
    assert stalled.pid in signalled and bystander.pid not in signalled
    assert "in stalled_launch" in capfd.readouterr().err  # serve's own stacks
    assert "in stalled_after_capture" in stalled_stderr  # the SGLang process's, through the plugin's handler
