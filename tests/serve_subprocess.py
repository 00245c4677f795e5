"""`kvbuffer serve` as a real subprocess on 127.0.0.1 with ephemeral ports (read back from its start-up log), for
tests that need the command itself: its /metrics as Prometheus scrapes it, several replicas side by side."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterable, Sequence

from prometheus_client.parser import text_string_to_metric_families

CLI = [sys.executable, "-m", "kvbuffer.service.cli"]
START_TIMEOUT_S = 180.0
_SERVING = re.compile(r"serving kvbuffer\.v1\.KVBufferService on 127\.0\.0\.1:(\d+) .*metrics on "
                      r"http://127\.0\.0\.1:(\d+)/metrics")


class ServeProcess:
    """Starts `kvbuffer serve FLAGS` on construction (without waiting); `wait_serving()` reads its ports."""

    def __init__(self, *flags: str) -> None:
        env = {**os.environ, "OTEL_TRACES_EXPORTER": "none"}
        self.process = subprocess.Popen([*CLI, "serve", "--host", "127.0.0.1", "--port", "0", "--metrics-port", "0",
                                         "--device", "cpu", *flags],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
        self.log: list[str] = []
        self.port = self.metrics_port = 0
        self._serving = threading.Event()
        self._reader = threading.Thread(target=self._read_log, daemon=True)
        self._reader.start()

    def _read_log(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.log.append(line)
            if match := _SERVING.search(line):
                self.port, self.metrics_port = int(match.group(1)), int(match.group(2))
                self._serving.set()

    def wait_serving(self, timeout: float = START_TIMEOUT_S) -> ServeProcess:
        deadline = time.monotonic() + timeout
        while not self._serving.wait(0.5):
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError("kvbuffer serve did not start:\n" + "".join(self.log))
        return self

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def scrape(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10) as response:
            return response.read().decode()

    def samples(self, name: str) -> dict[frozenset[tuple[str, str]], float]:
        """The scraped samples called name, keyed by their label sets."""
        return {frozenset(sample.labels.items()): sample.value
                for family in text_string_to_metric_families(self.scrape()) for sample in family.samples
                if sample.name == name}

    def stop(self) -> None:
        """SIGTERM (a drain), then kill if it does not end."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._reader.join(10)


def sample_names(exposition: str) -> set[str]:
    """Every sample name in a Prometheus text exposition (histograms give NAME_bucket, NAME_sum, NAME_count)."""
    return {sample.name for family in text_string_to_metric_families(exposition) for sample in family.samples}


def start_all(flag_sets: Iterable[Sequence[str]]) -> list[ServeProcess]:
    """Starts the servers side by side (start-up is mostly importing torch), then waits for each."""
    servers = [ServeProcess(*flags) for flags in flag_sets]
    try:
        return [server.wait_serving() for server in servers]
    except BaseException:
        for server in servers:
            server.stop()
        raise
