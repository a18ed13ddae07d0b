"""The orphan reaper against real zombies, sweep by sweep.

A probe process (``apps.reaper_probe``) becomes a child subreaper and sweeps only when told, at
a fake monotonic time, so the grace is tested without waiting on the clock; its orphans and
children are real processes that the test kills and watches with psutil. The reaper inside a
real Gru as PID 1 is tested in ``test_pid1``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from apps.deploy_control import poll_until
from conftest import run
from minions.errors import WorkerCrashed
from minions.ops import reaper
from pools import DemoPool

TESTS_DIR = Path(__file__).resolve().parent


class Probe:
    def __init__(self) -> None:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS_DIR), *sys.path])}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "apps.reaper_probe"], env=env, stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, text=True,
        )  # fmt: skip

    def ask(self, command: str) -> Any:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        assert line, f"the probe died answering {command!r}"
        return json.loads(line)

    def sweep(self, now: float) -> tuple[set[int], int]:
        """(pids reaped, zombies still watched) of one sweep at time ``now``."""
        reply = self.ask(f"sweep {now}")
        for _, exit_code, signum in reply["reaped"]:
            assert (exit_code, signum) == (None, 9), reply  # they all died of our SIGKILL
        return {pid for pid, _, _ in reply["reaped"]}, reply["watched"]

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


@pytest.fixture
def probe() -> Iterator[Probe]:
    p = Probe()
    assert p.ask("subreaper") == "SUBREAPER"
    yield p
    p.close()


def kill_to_zombie(pids: list[int]) -> list[psutil.Process]:
    procs = [psutil.Process(pid) for pid in pids]
    for proc in procs:
        proc.kill()
    poll_until(
        lambda: all(p.status() == psutil.STATUS_ZOMBIE for p in procs), "the kills to land"
    )  # fmt: skip
    return procs


def test_no_role_in_an_ordinary_process() -> None:
    """In a fresh interpreter: this test process may have become a subreaper already (a pool
    that forks its workers from a zygote makes its process one)."""
    code = "from minions.ops import reaper; print(reaper.reaper_role())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert out.stdout.strip() == "None", out.stderr


def test_unclaimed_zombies_go_after_the_grace_and_claimed_ones_never(probe: Probe) -> None:
    orphan = probe.ask("orphan")
    assert psutil.Process(orphan).ppid() == probe.proc.pid, "re-parented to the subreaper"
    claimed = probe.ask("child claimed")
    unclaimed = probe.ask("child unclaimed")
    procs = kill_to_zombie([orphan, claimed, unclaimed])

    assert probe.sweep(0.0) == (set(), 2), "first seen: nothing reaped, claimed not watched"
    assert probe.sweep(1.9) == (set(), 2), "younger than the grace"
    assert probe.sweep(2.0) == ({orphan, unclaimed}, 0)
    assert [p.is_running() for p in procs] == [False, True, False]
    assert probe.ask(f"wait {claimed}") == -9, "the claimed child's owner reads its real status"
    # The price of not claiming a child left unreaped past the grace: its status is gone, and
    # Popen reports 0. This is why pools claim their workers.
    assert probe.ask(f"wait {unclaimed}") == 0


def test_a_zombie_its_owner_reaps_between_sweeps_is_forgotten(probe: Probe) -> None:
    child = probe.ask("child unclaimed")
    kill_to_zombie([child])
    assert probe.sweep(0.0) == (set(), 1)
    assert probe.ask(f"wait {child}") == -9, "an owner within the grace keeps the status"
    assert probe.sweep(10.0) == (set(), 0)


def test_a_claim_made_after_the_first_sighting_still_wins(probe: Probe) -> None:
    """The check before reaping reads the claims again (a zygote may learn of a pid late)."""
    orphan = probe.ask("orphan")
    kill_to_zombie([orphan])
    assert probe.sweep(0.0) == (set(), 1)
    assert probe.ask(f"claim {orphan}") == orphan
    assert probe.sweep(5.0) == (set(), 0)
    assert psutil.Process(orphan).status() == psutil.STATUS_ZOMBIE
    assert probe.ask(f"release {orphan}") == orphan
    probe.sweep(6.0)
    assert probe.sweep(8.0) == ({orphan}, 0)


def test_a_pool_claims_each_worker_until_it_has_reaped_it() -> None:
    async def scenario() -> None:
        async with DemoPool() as pool:
            first = pool.snapshot().pids
            assert len(first) == 2 and all(reaper.is_claimed(pid) for pid in first)
            with pytest.raises(WorkerCrashed) as crash:
                await pool.call("segfault")
            assert crash.value.signal == signal.SIGSEGV  # the pool read the real status
            assert crash.value.pid in first and not reaper.is_claimed(crash.value.pid)
        assert not any(reaper.is_claimed(pid) for pid in first), "released once reaped"

    run(scenario())


def test_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="interval_s > 0"):
        reaper.OrphanReaper(_NoLog(), interval_s=0)


class _NoLog:
    def debug(self, *args: object, **kwargs: object) -> None: ...
    def info(self, *args: object, **kwargs: object) -> None: ...
    def warning(self, *args: object, **kwargs: object) -> None: ...


def test_a_standalone_pool_forking_from_a_zygote_reaps_the_orphans_it_adopts() -> None:
    """A zygote pool makes its process a child subreaper (its workers are re-parented to it),
    so a helper a worker orphans is re-parented there too: with no Gru around, the pool itself
    keeps the orphan reaper sweeping. In a fresh interpreter, so no other test's pool counts."""
    script = textwrap.dedent(
        """
        import asyncio, os, sys
        sys.path[:0] = [sys.argv[1], os.path.join(sys.argv[1], "apps")]
        import psutil
        from minions.workers import WorkerPool

        class Pool(WorkerPool):
            service = "orphan_service:OrphanMaker"
            workers = 1

        async def main():
            async with Pool() as pool:
                helper = psutil.Process(await pool.call("spawn_orphan"))
                while helper.ppid() != os.getpid():  # adopted by this process
                    await asyncio.sleep(0.01)
                helper.kill()
                while psutil.pid_exists(helper.pid):  # a zombie until someone reaps it
                    await asyncio.sleep(0.05)
                print("reaped", flush=True)

        asyncio.run(asyncio.wait_for(main(), 30))
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script, os.path.dirname(__file__)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.stdout.strip() == "reaped", out.stderr[-2000:]
