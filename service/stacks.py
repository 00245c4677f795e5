"""Python stacks of a stalled server and of its engine's processes, on demand.

`install` makes a process write every thread's stack to its stderr when it gets SIGUSR1 (faulthandler, in C: it
works while the process is stuck, GIL held or not). `kvbuffer serve` installs it, and so does the SGLang plugin in
every SGLang process. `report_if_slow` is for a start-up that may stall where nothing logs (SGLang's launch holds
the event loop while it waits for its schedulers): once past its limit it logs one line, dumps this process's
stacks and sends SIGUSR1 to each descendant that catches it (to one that does not, SIGUSR1 would be fatal).
"""

from __future__ import annotations

import contextlib
import faulthandler
import logging
import os
import signal
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger(__name__)

DUMP_SIGNAL = signal.SIGUSR1


def install() -> None:
    """This process dumps all its threads' stacks to stderr on DUMP_SIGNAL (`kill -USR1 PID`)."""
    faulthandler.register(DUMP_SIGNAL, all_threads=True)


def catches(pid: int, signum: int) -> bool:
    """Whether process pid has a handler for signum (Linux: SigCgt in /proc/PID/status)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    caught = next((line.split()[1] for line in status.splitlines() if line.startswith("SigCgt:")), "0")
    return bool(int(caught, 16) >> (signum - 1) & 1)


def descendants(pid: int) -> list[int]:
    """pid's children, their children, ... (Linux: the parent ids in /proc; elsewhere none)."""
    children: dict[int, list[int]] = {}
    with contextlib.suppress(OSError):
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text()
            except OSError:  # ended meanwhile
                continue
            parent = int(stat.rsplit(")", 1)[1].split()[1])  # after "pid (comm) state"
            children.setdefault(parent, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), ()):
            found.append(child)
            todo.append(child)
    return found


@contextlib.contextmanager
def report_if_slow(limit_s: float, what: str) -> Iterator[None]:
    """If the block still runs after limit_s seconds (0: never), logs one line saying `what`, dumps this process's
    stacks to stderr and sends DUMP_SIGNAL to its descendants that catch it, once; from a thread, so it works while
    the block holds the event loop."""
    if limit_s <= 0:
        yield
        return

    def report() -> None:
        pids = [pid for pid in descendants(os.getpid()) if catches(pid, DUMP_SIGNAL)]
        log.warning("%s after %.0f s; Python stacks follow on stderr: this process's, and those of its processes %s "
                    "(SIGUSR1)", what, limit_s, pids)
        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, DUMP_SIGNAL)

    timer = threading.Timer(limit_s, report)
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()
