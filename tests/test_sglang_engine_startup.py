"""Engine sglang when SGLang fails while it starts: `kvbuffer serve` must stop with one line, never wait forever,
and leave no SGLang process behind.

SGLang's start cannot run without a GPU, so `launch_like_sglang` plays SGLang 0.5.17's `Engine` start-up with real
child processes: it installs the adapter's SIGQUIT handler as SGLang installs `custom_sigquit_handler`
(engine.py `_set_envs_and_config`), starts its "processes", then waits for the scheduler's ready message while
the scheduler process is alive and raises when it has died (engine.py `_wait_for_scheduler_ready`). A scheduler
that hit an exception sends SIGQUIT to its parent (scheduler.py `run_scheduler_process`) and stays alive while
its non-daemon threads run: the wait alone would never end. The stand-in gives up after WAIT_S so that a
regression fails the test instead of hanging it."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator

import pytest
from kvbuffer.service.engine.api import EngineFailedError
from kvbuffer.service.server import app
from kvbuffer.service.server.settings import ServiceSettings, load_settings
from kvbuffer.service.sglang import engine as sglang_engine
from kvbuffer.service.sglang.engine import SGLangEngine, SGLangRuntime

WAIT_S = 30.0
# A scheduler that raised: SIGQUIT to its parent, then alive (its threads keep it running)
FAILED_SCHEDULER = "import os, signal, time; os.kill(os.getppid(), signal.SIGQUIT); time.sleep(300)"
KILLED_SCHEDULER = "import sys; sys.exit(137)"  # e.g. the OOM killer: no SIGQUIT, the process is gone
DETOKENIZER = "import time; time.sleep(300)"  # SGLang's other process, alive and waiting

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


def settings() -> ServiceSettings:
    return load_settings({"engine": "sglang", "model": "/models/qwen3-next", "host": "127.0.0.1", "port": 0,
                          "metrics_port": 0})


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
