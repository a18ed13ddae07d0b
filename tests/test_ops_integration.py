"""Gru's operations, end to end with real parts: real worker crashes seen over real HTTP, real
memory driving the levels through Gru, sd_notify on a real AF_UNIX datagram socket, and a busy
metrics port that Gru survives."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import tempfile
import threading
import time
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

from apps.ops_app import (
    SERVICE,
    CrashMinion,
    Job,
    JobPipeline,
    LeakMinion,
    QuietMinion,
    use_bench,
)
from conftest import run
from minions import Gru, GruState
from minions.errors import Overloaded, WorkerCallError
from minions.ops.levels import MemoryLevel
from minions.ops.memory import MemorySample, MemoryThresholds
from minions.runtime.state import SQLiteStateStore
from minions.workers import WorkerPool

MiB = 2**20
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # minions.log lands here
    for name in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
        monkeypatch.delenv(name, raising=False)


@contextlib.asynccontextmanager
async def running_gru(**kwargs: object) -> AsyncIterator[Gru]:
    kwargs.setdefault("state_store", None)
    kwargs.setdefault("metrics", False)
    gru = await Gru.create(**kwargs)
    try:
        yield gru
    finally:
        await gru.shutdown()


def scrape(port: int) -> Samples:
    """GET /metrics over real HTTP and parse it with prometheus-client's own parser."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


# --- (a) metrics after real crashes ---------------------------------------------------------


def test_metrics_move_with_real_segfaults_and_are_served_over_http() -> None:
    jobs = [Job(n, "segfault" if n % 5 == 4 else "crc32") for n in range(20)]
    crashes = sum(job.op == "segfault" for job in jobs)

    async def main() -> None:
        bench = use_bench()
        async with running_gru(metrics=True, metrics_port=0) as gru:
            port = gru.metrics_port
            assert port and gru.status().metrics_url == f"http://127.0.0.1:{port}/metrics"
            before = await asyncio.to_thread(scrape, port)
            started = await gru.start_orchestration(JobPipeline, CrashMinion)
            assert started.success, started.reason
            oid = started.orchestration_id
            for job in jobs:
                bench.jobs.put_nowait(job)
            ends = dict(await bench.take(len(jobs)))
            assert sorted(n for n, end in ends.items() if end == "failed") == [4, 9, 14, 19]

            def delta(name: str, **labels: str) -> float:
                return value(after, name, **labels) - value(before, name, **labels)

            after = await _scrape_until(port, 'minions_workers_alive{pool="CrashPool"} == 2')
            t0 = time.perf_counter()
            after = await asyncio.to_thread(scrape, port)
            print(f"scrape of {len(after)} samples: {(time.perf_counter() - t0) * 1e3:.1f} ms")

            workflows = {e: delta("minions_workflows_total", orchestration=oid, event=e)
                         for e in ("started", "succeeded", "failed", "aborted")}  # fmt: skip
            assert workflows == {"started": 20, "succeeded": 16, "failed": 4, "aborted": 0}
            assert value(after, "minions_workflows_in_flight", orchestration=oid) == 0
            assert delta("minions_pipeline_events_total", pipeline="JobPipeline") == 20
            steps = delta("minions_step_duration_seconds_count", orchestration=oid, step="report")
            assert steps == 16
            pool = {"pool": "CrashPool"}
            assert delta("minions_worker_crashes_total", **pool, reason="SIGSEGV") == crashes
            assert delta("minions_worker_restarts_total", **pool) >= crashes
            assert delta("minions_worker_calls_total", **pool, method="crc32", outcome="ok") == 16
            assert delta("minions_worker_calls_total", **pool, method="segfault",
                         outcome="crashed") == crashes  # fmt: skip
            assert delta("minions_worker_call_duration_seconds_count", **pool, method="crc32") == 16
            assert value(after, "minions_workers_alive", **pool) == 2
            assert ("minions_memory_pressure_level", frozenset()) in after
            assert value(after, "minions_memory_pressure_level") == 0
            for gauge in ("process_resident_memory_bytes", "minions_host_memory_used_bytes",
                          "process_cpu_seconds_total"):  # fmt: skip
                assert value(after, gauge) > 0, gauge
            (row,) = [r for r in gru.status().resources if r.is_pool]
            assert row.workers_alive == 2
            assert len(bench.outcomes) == 20
            assert all(isinstance(o, int | WorkerCallError) for o in bench.outcomes)
        with pytest.raises(OSError):  # shutdown released the port
            await asyncio.to_thread(scrape, port)

    run(main())


async def _scrape_until(port: int, what: str, timeout: float = 10.0) -> Samples:
    """Pool gauges are published on the pool's housekeeping tick (50 ms): poll the endpoint."""
    name, rest = what.split("{")
    labels_text, expected = rest.split("} == ")
    key, label = labels_text.split("=")
    deadline = time.monotonic() + timeout
    while True:
        samples = await asyncio.to_thread(scrape, port)
        if value(samples, name, **{key: label.strip('"')}) == float(expected):
            return samples
        assert time.monotonic() < deadline, f"never saw {what}"
        await asyncio.sleep(0.05)


async def _until(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition never held"
        await asyncio.sleep(0.01)


# --- (b) memory pressure through Gru, with real memory ---------------------------------------


class ProbePool(WorkerPool):
    service = SERVICE
    workers = 1


async def _baseline() -> int:
    """RSS of this process plus one idle demo worker: what the leak is measured against."""
    async with ProbePool() as pool:
        pids = [os.getpid(), *pool.worker_pids()]
        return sum(psutil.Process(p).memory_info().rss for p in pids)


@pytest.mark.timeout(90)
def test_real_leak_pauses_sheds_and_recovers_through_gru(tmp_path: Path) -> None:
    async def main() -> None:
        bench = use_bench()
        base = await _baseline()
        memory = MemoryThresholds(
            soft_bytes=base + 100 * MiB, hard_bytes=base + 250 * MiB,
            host_soft_fraction=None, host_hard_fraction=None,
        )  # fmt: skip
        store = SQLiteStateStore(tmp_path / "minions.db")
        async with running_gru(state_store=store, memory=memory, memory_interval_s=0.1) as gru:
            bench.monitor = gru.memory_monitor
            started = await gru.start_orchestration(JobPipeline, LeakMinion)
            assert started.success, started.reason
            (pool,) = bench.pools
            seen: list[MemoryLevel] = []
            at: dict[MemoryLevel, asyncio.Event] = {lvl: asyncio.Event() for lvl in MemoryLevel}
            queued_at_normal: list[int] = []

            def follow(level: MemoryLevel, _sample: MemorySample) -> None:
                seen.append(level)
                at[level].set()
                if level is MemoryLevel.HIGH:
                    assert gru.status().pipelines_paused  # Gru acted before us
                    assert pool.snapshot().memory_level is MemoryLevel.HIGH  # the pool too
                if level is MemoryLevel.CRITICAL:
                    bench.gates.setdefault((0, "probe"), asyncio.Event()).set()  # shed now
                if level is MemoryLevel.NORMAL:
                    queued_at_normal.append(bench.jobs.qsize())
                    assert not gru.status().pipelines_paused

            gru.memory_monitor.subscribe(follow)
            bench.jobs.put_nowait(Job(0, "leak", 150, gated=True))
            await asyncio.wait_for(at[MemoryLevel.HIGH].wait(), 20)
            for n in (1, 2, 3):  # pipelines paused: at most the pull already waiting takes one
                bench.jobs.put_nowait(Job(n, "ping", n))
            assert await store.list_all()  # job 0, in flight, is saved

            bench.gates.setdefault((0, "more"), asyncio.Event()).set()  # leak 150 MiB more
            await asyncio.wait_for(at[MemoryLevel.CRITICAL].wait(), 20)
            await asyncio.wait_for(at[MemoryLevel.NORMAL].wait(), 30)
            ends = dict(await bench.take(4, timeout=30))

            assert ends == {n: "succeeded" for n in range(4)}
            assert seen[:2] == [MemoryLevel.HIGH, MemoryLevel.CRITICAL]
            assert seen[-1] is MemoryLevel.NORMAL
            assert queued_at_normal[0] >= 2  # nothing was pulled while HIGH but the pending one
            assert set(bench.pulls) == {MemoryLevel.NORMAL}  # no pull ever began above NORMAL
            assert all(isinstance(o, int | WorkerCallError) for o in bench.outcomes)
            assert sum(isinstance(o, Overloaded) for o in bench.outcomes) >= 1  # shed
            assert 300 in bench.outcomes  # the worker really held 300 MiB
            # A workflow reports from its last step, then deletes its checkpoint and ends.
            await _until(lambda: gru.status().orchestrations[0].in_flight == 0)
            (orch,) = gru.status().orchestrations
            assert (orch.succeeded, orch.failed, orch.aborted) == (4, 0, 0)
            assert gru.status().memory_level is MemoryLevel.NORMAL
        reopened = SQLiteStateStore(tmp_path / "minions.db")
        await reopened.open()
        try:
            assert await reopened.list_all() == []  # every saved workflow finished, none lost
        finally:
            await reopened.close()

    run(main(), timeout=85)


# --- (c) sd_notify through Gru ---------------------------------------------------------------


class NotifyListener:
    """systemd's end of the protocol: a bound AF_UNIX datagram socket read by a thread."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(path)
        self.messages: list[str] = []
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while (data := self.sock.recv(4096)) != b"__stop__":
            with self._cond:
                self.messages.append(data.decode())
                self._cond.notify_all()

    def wait_for(self, predicate: Callable[[list[str]], bool], timeout: float = 10.0) -> list[str]:
        with self._cond:
            assert self._cond.wait_for(lambda: predicate(self.messages), timeout), self.messages
            return list(self.messages)

    def close(self) -> None:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.sendto(b"__stop__", self.path)
        self._thread.join(5)
        self.sock.close()


@pytest.fixture
def systemd(monkeypatch: pytest.MonkeyPatch) -> Iterator[NotifyListener]:
    with tempfile.TemporaryDirectory(prefix="sdn") as d:  # sun_path is only 108 bytes
        listener = NotifyListener(str(Path(d) / "notify"))
        monkeypatch.setenv("NOTIFY_SOCKET", listener.path)
        monkeypatch.setenv("WATCHDOG_USEC", "200000")
        monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
        yield listener
        listener.close()


def count(word: str, n: int) -> Callable[[list[str]], bool]:
    return lambda messages: sum(word in m for m in messages) >= n


def test_gru_speaks_sd_notify_ready_status_watchdog_stopping(systemd: NotifyListener) -> None:
    async def main() -> None:
        bench = use_bench()
        gru = await Gru.create(state_store=None, metrics=False)
        first = (await asyncio.to_thread(systemd.wait_for, count("READY=1", 1)))[0]
        assert first.splitlines() == [
            "READY=1",
            "STATUS=running: 0 orchestrations, 0 workflows in flight, 0 workers alive, "
            "memory NORMAL",
        ]
        await asyncio.to_thread(systemd.wait_for, count("WATCHDOG=1", 3))  # the loop pings
        assert (await gru.start_orchestration(JobPipeline, QuietMinion)).success
        await asyncio.to_thread(systemd.wait_for, count("STATUS=running: 1 orchestration,", 1))
        bench.jobs.put_nowait(Job(7))
        assert await bench.take(1) == [(7, "succeeded")]
        assert (await gru.shutdown()).success and gru.state is GruState.CLOSED
        messages = await asyncio.to_thread(systemd.wait_for, count("STOPPING=1", 1))
        (stopping,) = [m for m in messages if "STOPPING=1" in m]
        assert stopping.startswith("STOPPING=1\nSTATUS=shutting down: 1 orchestration")
        assert messages[0] == first and sum("READY=1" in m for m in messages) == 1
        # Every helper task (watchdog, status refresher, monitor) was awaited on the way out.
        assert not [t for t in asyncio.all_tasks() if t.get_name().startswith("minions-")]

    run(main())


# --- (d) a busy metrics port -----------------------------------------------------------------


def test_busy_metrics_port_is_one_logged_error_and_gru_runs_on() -> None:
    records: list[logging.LogRecord] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    logger = logging.getLogger("test.ops.busy_port")
    logger.addHandler(Collect())
    logger.propagate = False

    async def main() -> None:
        bench = use_bench()
        with socket.socket() as squatter:
            squatter.bind(("127.0.0.1", 0))
            squatter.listen()
            port = squatter.getsockname()[1]
            async with running_gru(metrics=True, metrics_port=port, logger=logger) as gru:
                assert gru.metrics_port is None and gru.status().metrics_url is None
                assert (await gru.start_orchestration(JobPipeline, QuietMinion)).success
                bench.jobs.put_nowait(Job(1))
                assert await bench.take(1) == [(1, "succeeded")]
        errors = [r.getMessage() for r in records if r.levelno >= logging.ERROR]
        assert len(errors) == 1, errors
        assert f"cannot serve metrics on 127.0.0.1:{port}" in errors[0]

    run(main())


# --- configuration ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"metrics_host": 1}, TypeError, "metrics_host"),
        ({"metrics_host": " "}, ValueError, "metrics_host"),
        ({"memory": {"soft_bytes": 1}}, TypeError, "memory"),
        ({"memory_interval_s": 0}, ValueError, "memory_interval_s"),
        ({"memory_interval_s": "1"}, TypeError, "memory_interval_s"),
        ({"metrics": "yes"}, TypeError, "metrics"),
    ],
)
def test_bad_operations_arguments_name_the_argument(kwargs, error, match) -> None:
    async def main() -> None:
        with pytest.raises(error, match=match):
            await Gru.create(state_store=None, **kwargs)
        gru = await Gru.create(state_store=None, metrics=None)  # None also means off
        assert gru.metrics_port is None
        await gru.shutdown()

    run(main())
