"""The test side of ``deploy_app``: its control directory, its effects, and Gru's processes."""

from __future__ import annotations

import os
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

APP = Path(__file__).resolve().parent / "deploy_app.py"
MINIONS = str(Path(sys.executable).with_name("minions"))  # the console script, as deployed
WORKER_MODULE = "minions.ipc.worker"

T = TypeVar("T")


class Control:
    """``$APP_DIR`` of one test: the jobs FIFO and the effects file (see ``deploy_app``)."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        directory.mkdir(parents=True, exist_ok=True)
        os.mkfifo(directory / "jobs")
        self.effects = directory / "effects"
        self._n = 0

    def env(self, **extra: str) -> dict[str, str]:
        return {**os.environ, "APP_DIR": str(self.dir), "MINIONS_METRICS_PORT": "0", **extra}

    def lines(self) -> list[list[str]]:
        if not self.effects.exists():
            return []
        return [line.split() for line in self.effects.read_text().splitlines()]

    def wait_for(
        self,
        find: Callable[[list[list[str]]], T | None],
        what: str,
        *,
        running: Callable[[], bool] = lambda: True,
        timeout: float = 60.0,
    ) -> T:
        """Poll the effects file (an fsync'd fact, not a timing guess) until ``find`` gives a
        value; fail at once if ``running()`` says the app is gone, or after ``timeout``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = find(self.lines())
            if found is not None:
                return found
            if not running():
                pytest.fail(f"the app ended before {what}; effects: {self.lines()}")
            time.sleep(0.02)
        pytest.fail(f"timed out waiting for {what}; effects: {self.lines()}")

    def wait_started(self, running: Callable[[], bool], after: int = 0) -> tuple[int, int]:
        """(pid, metrics port) of the ``after``-th start (0: the first one)."""

        def find(lines: list[list[str]]) -> tuple[int, int] | None:
            starts = [(int(line[1]), int(line[2])) for line in lines if line[0] == "started"]
            return starts[after] if len(starts) > after else None

        return self.wait_for(find, f"start #{after + 1} of Gru", running=running)

    def send(self, op: str) -> int:
        """Write one job into the FIFO; return its number."""
        self._n += 1
        fd = os.open(self.dir / "jobs", os.O_WRONLY | os.O_NONBLOCK)  # the app holds a reader
        try:
            os.write(fd, f"{self._n} {op}\n".encode())
        finally:
            os.close(fd)
        return self._n

    def wait_line(self, n: int, tag: str, running: Callable[[], bool]) -> str:
        """The rest of the first ``<n> <tag> ...`` line, once it exists."""

        def find(lines: list[list[str]]) -> str | None:
            found = [" ".join(line[2:]) for line in lines if line[:2] == [str(n), tag]]
            return found[0] if found else None

        return self.wait_for(find, f"job {n}: {tag}", running=running)

    def submit(self, op: str, running: Callable[[], bool]) -> str:
        """Send one job and wait for its outcome line; return the outcome."""
        return self.wait_line(self.send(op), op, running)

    def release(self, n: int) -> None:
        (self.dir / f"release-{n}").touch()


def poll_until(
    check: Callable[[], T | None], what: str, *, timeout: float = 60.0, interval: float = 0.02
) -> T:
    """Poll an observable fact (a process table, a supervisor's status) until ``check`` gives
    a truthy value, and return that value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = check()
        if found:
            return found
        time.sleep(interval)
    pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}")


def workers_of(gru: psutil.Process) -> list[psutil.Process]:
    """Gru's worker processes: exec'd ones by their command line, forked ones (which carry
    the zygote's command line) by the name they give themselves, ``minions-w<id>``."""
    out = []
    for child in gru.children():
        try:
            if child.name().startswith("minions-w") or WORKER_MODULE in " ".join(child.cmdline()):
                out.append(child)
        except psutil.NoSuchProcess:
            continue
    return out


def named_children(gru: psutil.Process, name: str) -> list[psutil.Process]:
    out = []
    for child in gru.children():
        try:
            if child.name() == name:
                out.append(child)
        except psutil.NoSuchProcess:
            continue
    return out


def zombies_of(gru: psutil.Process) -> list[int]:
    out = []
    for child in gru.children():
        try:
            if child.status() == psutil.STATUS_ZOMBIE:
                out.append(child.pid)
        except psutil.NoSuchProcess:
            continue
    return out


def scrape(port: int) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of a real ``/metrics`` scrape, keyed by name and labels."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def assert_all_gone(procs: list[psutil.Process], what: str) -> None:
    _, alive = psutil.wait_procs(procs, timeout=15)
    left = []
    for p in alive:
        try:
            left.append(f"{p.pid} {' '.join(p.cmdline()[:3])}")
            p.kill()
        except psutil.NoSuchProcess:
            continue
    assert not left, f"{what} left alive: {left}"
