"""Real Gru processes: SIGTERM exits 0 within the grace period keeping checkpoints, and kill -9
at several points loses no workflow and re-runs only the interrupted step.

Tests synchronise on the app's fsync'd effects file (``<seq> <step> <pid>`` per executed step),
never on sleeps; every Gru and worker process is accounted for with psutil.
"""

from __future__ import annotations

import itertools
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest

from minions.runtime.state import read_workflows

TESTS_DIR = Path(__file__).resolve().parent
STEPS = ("a", "b", "c")


class App:
    """One run of ``apps.durable_app`` in ``workdir``."""

    def __init__(self, workdir: Path, **settings: str) -> None:
        self.workdir = workdir
        self.effects = workdir / "effects.txt"
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(TESTS_DIR), os.environ.get("PYTHONPATH", "")]),
            "APP_DB": str(workdir / "minions.db"),
            "APP_EFFECTS": str(self.effects),
            **settings,
        }
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "apps.durable_app"], cwd=workdir, env=env,
            stderr=subprocess.PIPE, text=True,
        )  # fmt: skip

    def lines(self) -> list[tuple[int, str, int]]:
        if not self.effects.exists():
            return []
        out = []
        for line in self.effects.read_text().splitlines():
            seq, step, pid = line.split()
            out.append((int(seq), step, int(pid)))
        return out

    def wait_until(self, condition: Callable[[list[tuple[int, str, int]]], bool], what: str):
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if condition(self.lines()):
                return
            if self.proc.poll() is not None:
                pytest.fail(f"app exited ({self.proc.returncode}) before {what}: {self.stderr()}")
            time.sleep(0.01)  # polling a file for a condition, not a timing assumption
        pytest.fail(f"timed out waiting for {what}; effects: {len(self.lines())} lines")

    def wait_started(self) -> None:
        """Wait for the app's marker: Gru is created and its signal handlers are installed."""
        marker = Path(str(self.effects) + ".started")
        self.wait_until(
            lambda _: marker.exists() and marker.read_text() == str(self.proc.pid), "Gru started"
        )

    def workers(self) -> list[psutil.Process]:
        return psutil.Process(self.proc.pid).children(recursive=True)

    def stderr(self) -> str:
        if self.proc.poll() is None:
            return ""
        return self.proc.stderr.read() if self.proc.stderr else ""


def assert_gone(procs: list[psutil.Process]) -> None:
    _, alive = psutil.wait_procs(procs, timeout=10)
    for proc in alive:
        proc.kill()
    assert not alive, f"worker processes survived their Gru: {[p.pid for p in alive]}"


def integrity(db: Path) -> str:
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        return conn.execute("PRAGMA integrity_check").fetchone()[0]


def test_sigterm_exits_zero_within_grace_keeping_checkpoints(tmp_path):
    grace = 1.0
    app = App(tmp_path, APP_MINION="hang", APP_HANG="1", APP_EVENTS="3", APP_GRACE=str(grace))
    app.wait_until(lambda lines: len(lines) == 3, "three workflows hang in step a")
    workers = app.workers()
    assert workers, "the pool should have started worker processes"
    started = time.monotonic()
    app.proc.send_signal(signal.SIGTERM)
    assert app.proc.wait(timeout=grace + 20) == 0, app.stderr()
    assert time.monotonic() - started < grace + 5
    assert_gone(workers)
    saved = read_workflows(tmp_path / "minions.db")
    assert sorted(r.step_index for r in saved) == [0, 0, 0]
    assert integrity(tmp_path / "minions.db") == "ok"

    # The kept checkpoints resume: step a (interrupted) runs again, then b; nothing is left.
    app = App(tmp_path, APP_MINION="hang", APP_HANG="0", APP_EVENTS="3", APP_GRACE=str(grace))
    app.wait_until(lambda lines: sum(step == "b" for _, step, _ in lines) == 3, "resume")
    app.wait_started()
    app.proc.send_signal(signal.SIGTERM)
    assert app.proc.wait(timeout=grace + 20) == 0, app.stderr()
    assert read_workflows(tmp_path / "minions.db") == []
    per_seq = defaultdict(list)
    for seq, step, _ in app.lines():
        per_seq[seq].append(step)
    assert per_seq == {n: ["a", "a", "b"] for n in range(3)}


@pytest.mark.parametrize("kill_after", [(1, 25, 55, 80)])
def test_kill_9_loses_nothing_and_reruns_only_the_interrupted_step(tmp_path, kill_after):
    jobs = 30
    settings = {"APP_MINION": "work", "APP_EVENTS": str(jobs), "APP_IN_FLIGHT": "4"}
    db = tmp_path / "minions.db"
    for point in kill_after:
        app = App(tmp_path, **settings)
        app.wait_until(lambda lines, p=point: len(lines) >= p, f"{point} effects")
        workers = app.workers()
        app.proc.kill()
        app.proc.wait(timeout=10)
        assert_gone(workers)
        assert integrity(db) == "ok"
    app = App(tmp_path, **settings)
    done = lambda lines: len({seq for seq, s, _ in lines if s == "c"}) == jobs  # noqa: E731
    app.wait_until(done, "every job done")
    app.wait_started()  # the last kills may leave nothing to do: do not SIGTERM a booting app
    app.proc.send_signal(signal.SIGTERM)
    assert app.proc.wait(timeout=30) == 0, app.stderr()
    assert read_workflows(db) == [] and integrity(db) == "ok"
    check_effects(app.lines(), jobs, kills=len(kill_after))


def check_effects(lines: list[tuple[int, str, int]], jobs: int, kills: int) -> None:
    """Every job ran every step in order; a step ran twice only across a restart, never twice
    in one process, and only the step in progress at the kill was repeated."""
    per_seq: dict[int, list[tuple[str, int]]] = defaultdict(list)
    for seq, step, pid in lines:
        per_seq[seq].append((step, pid))
    assert sorted(per_seq) == list(range(jobs))
    reruns = 0
    for seq, runs in per_seq.items():
        steps = [s for s, _ in runs]
        assert sorted(set(steps)) == list(STEPS), f"job {seq} skipped a step: {steps}"
        assert steps == sorted(steps, key=STEPS.index), f"job {seq} went backwards: {steps}"
        for (step, pid), (next_step, next_pid) in itertools.pairwise(runs):
            if step == next_step:
                assert pid != next_pid, f"job {seq} repeated {step} within one process"
                reruns += 1
    assert reruns <= kills * 4, f"{reruns} re-runs for {kills} kills of 4 in-flight workflows"
