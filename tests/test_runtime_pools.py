"""Gru and its worker pools: one shutdown budget with pools stopping side by side, and a
crash-looping pool reported to the operator (or, if it asks to, stopping the service)."""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import eventually, run
from minions import Gru, Minion, Pipeline, minion_step
from minions.errors import WorkerCallError
from minions.ops.metrics import REGISTRY
from minions.runtime.operations import summary_line
from minions.workers import WorkerPool
from pools import SERVICE, running_pid


class StubbornA(WorkerPool):
    service = "services:Stubborn"
    workers = 1
    call_timeout_s = 120.0


class StubbornB(StubbornA):
    pass


@dataclass
class Tick:
    n: int = 0


@dataclass
class Nothing:
    pass


class OnePipeline(Pipeline[Tick]):
    async def startup(self) -> None:
        self.sent = False

    async def produce_event(self) -> Tick:
        if self.sent:
            await asyncio.Event().wait()
        self.sent = True
        return Tick()


class HoldBoth(Minion[Tick, Nothing]):
    a: StubbornA
    b: StubbornB

    @minion_step
    async def hold(self) -> None:
        await asyncio.gather(self.a.call("hold", 300.0), self.b.call("hold", 300.0))


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    for name in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
        monkeypatch.delenv(name, raising=False)


@pytest.mark.parametrize(
    ("budget", "grace", "limit"),
    [
        (3.0, 10.0, 4.0),  # tight: the steps' grace and the pools' escalation shrink to fit
        (10.0, 0.5, 6.0),  # roomy: 2 s steps, side by side (one after the other: over 8 s)
    ],
    ids=["tight-budget", "side-by-side"],
)
def test_two_pools_stop_within_the_one_stop_budget(
    budget: float, grace: float, limit: float
) -> None:
    """Each pool's call ignores SIGTERM, so each pool needs its polite, SIGTERM and SIGKILL
    steps (2 s apart on their own); two pools stopped one after the other with their own
    escalation took twice that, beyond a unit's TimeoutStopSec."""

    async def scenario() -> None:
        gru = await Gru.create(
            state_store=None, metrics=False, grace_period_s=grace, stop_timeout_s=budget
        )
        try:
            res = await gru.start_orchestration(OnePipeline, HoldBoth)
            assert res.success, res.reason
            pools = [r for r in gru.live_resources() if isinstance(r, WorkerPool)]
            assert len(pools) == 2
            await eventually(lambda: all(running_pid(p, "hold") for p in pools))
            held = [running_pid(p, "hold") for p in pools]
        finally:
            started = time.monotonic()
            result = await gru.shutdown()
            took = time.monotonic() - started
        assert took < limit, f"shutdown took {took:.1f}s (budget {budget}s)"
        assert result.cancelled == 1  # the held workflow, checkpoint kept
        assert all(not os.path.exists(f"/proc/{pid}") for pid in held if pid)

    run(scenario(), timeout=40)


class Fragile(WorkerPool):
    service = SERVICE
    workers = 1
    restart_intensity = 1
    restart_period_s = 60.0
    circuit_reset_s = 0.3


class CrashTwice(Minion[Tick, Nothing]):
    pool: Fragile

    @minion_step
    async def crash(self) -> None:
        for _ in range(2):
            try:
                await self.pool.call("segfault")
            except WorkerCallError:
                pass


def test_a_crash_looping_pool_is_reported_to_the_operator(
    caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    def logged(text: str) -> bool:
        return any(text in r.getMessage() for r in caplog.records)

    async def scenario() -> None:
        key = {"resource": "Fragile", "phase": "crash_loop"}
        before = REGISTRY.get_sample_value("minions_resource_errors_total", key) or 0.0
        gru = await Gru.create(state_store=None, metrics=False, grace_period_s=1.0)
        try:
            with caplog.at_level(logging.WARNING):
                assert (await gru.start_orchestration(OnePipeline, CrashTwice)).success
                await eventually(
                    lambda: any("crash-looping" in r.getMessage() for r in caplog.records)
                )
                looping = next(r for r in gru.status().resources if r.is_pool)
                assert looping.circuit == "open"
                assert "crash-looping (circuit open): Fragile" in summary_line(gru.status())
                after = REGISTRY.get_sample_value("minions_resource_errors_total", key)
                assert after == before + 1
                await eventually(lambda: logged("recovered"))
                assert next(r for r in gru.status().resources if r.is_pool).circuit == "closed"
        finally:
            await gru.shutdown()
        assert gru.status().state.value == "closed"  # the default policy never stopped Gru
        assert "on_crash_loop = 'escalate'" in capsys.readouterr().err  # the console heard too

    run(scenario())


def test_an_escalating_pool_stops_the_service_with_a_failure(tmp_path: Path) -> None:
    app = tmp_path / "escalating_app.py"
    app.write_text(
        textwrap.dedent(
            f"""
            import asyncio, sys
            sys.path.insert(0, {os.path.dirname(__file__)!r})
            from minions import Gru
            from test_runtime_pools import OnePipeline, CrashTwice, Fragile

            Fragile.on_crash_loop = "escalate"

            async def main():
                gru = await Gru.create(state_store=None, metrics=False, grace_period_s=1.0)
                await gru.start_orchestration(OnePipeline, CrashTwice)
            """
        )
    )
    minions = Path(sys.executable).with_name("minions")
    proc = subprocess.run(
        [str(minions), "run", f"{app}:main"], cwd=tmp_path, capture_output=True, text=True,
        timeout=60,
    )  # fmt: skip
    assert proc.returncode == 1, proc.stderr  # a failure: Restart=on-failure restarts it
    assert "crash-looping" in proc.stderr and "Gru stops with a failure" in proc.stderr
