"""Workers forked from a zygote: every promise checked on real forks, crashes and SIGKILLs.

What a zygote holds (threads, ZeroMQ, faulthandler, the native extension) is read from outside,
in ``/proc/<pid>``, never taken from the zygote's word. These tests go through pools; the zygote's
wire and Gru's handle of it are driven directly in ``test_zygote_wire.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import psutil
import pytest

from conftest import eventually, run
from minions.errors import WorkerCrashed
from minions.ops import metrics
from minions.pool import zygote as parent_side
from minions.workers import PoolConfig, WorkerPool
from pools import SERVICE, DemoPool, running_pid

IMPORTS_A_WORKER_MUST_NOT_MAKE = [
    "argparse", "asyncio", "minions.pool", "minions.runtime", "prometheus_client", "psutil",
    "sqlite3",
]  # fmt: skip


class ZygotePool(DemoPool):
    spawn = "zygote"


class ExecPool(DemoPool):
    spawn = "exec"


class ProbePool(WorkerPool):
    service = "services:Probe"
    workers = 1


# --- reading a process from outside ------------------------------------------------------------


def threads(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


def fd_links(pid: int) -> list[str]:
    links = []
    for name in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            links.append(os.readlink(f"/proc/{pid}/fd/{name}"))
    return links


def caught_signals(pid: int) -> set[int]:
    """Signals the process has a handler for (faulthandler catches SIGSEGV, for one)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigCgt:"):
            mask = int(line.split()[1], 16)
            return {n for n in range(1, 65) if mask & (1 << (n - 1))}
    raise AssertionError("no SigCgt line")


def live_children() -> list[psutil.Process]:
    """Our children that still run (orphans this subreaper adopted may be zombies)."""
    alive = []
    for child in psutil.Process().children():
        with contextlib.suppress(psutil.Error):
            if child.status() != psutil.STATUS_ZOMBIE:
                alive.append(child)
    return alive


def cmdline(proc: psutil.Process) -> list[str]:
    try:
        return proc.cmdline()
    except psutil.Error:  # it ended since it was listed
        return []


def maps(pid: int) -> str:
    return Path(f"/proc/{pid}/maps").read_text()


def spawns(pool: str, via: str) -> float:
    labels = {"pool": pool, "via": via}
    return metrics.REGISTRY.get_sample_value("minions_worker_spawns_total", labels) or 0.0


# --- the zygote and its workers, from outside --------------------------------------------------


def test_zygote_holds_no_thread_zeromq_faulthandler_or_extension_and_workers_make_their_own() -> (
    None
):
    async def scenario() -> None:
        async with ZygotePool() as pool:
            zygote = pool.snapshot().zygote_pid
            assert zygote and psutil.Process(zygote).ppid() == os.getpid()
            with pytest.raises(WorkerCrashed):  # one more fork from the same zygote
                await pool.call("segfault")
            assert await pool.wait_ready()  # the replacement said hello: it is fully booted
            assert threads(zygote) == 1
            links = fd_links(zygote)
            assert not [x for x in links if "eventfd" in x or "eventpoll" in x], links  # no ZMQ
            assert sum(x.startswith("socket:") for x in links) == 1  # its control socket only
            assert signal.SIGSEGV not in caught_signals(zygote)  # no faulthandler
            assert "_native" not in maps(zygote)  # setup() never ran here
            assert psutil.Process(zygote).name() == "minions-zygote"
            for pid in pool.worker_pids():
                worker = psutil.Process(pid)
                assert worker.ppid() == os.getpid()  # re-parented to us: we reap it
                assert worker.name().startswith("minions-w")
                assert worker.cmdline()[1:3] == ["-m", "minions.ipc.zygote"]  # a fork of it
                assert threads(pid) > 1 and any("eventfd" in x for x in fd_links(pid))
                assert signal.SIGSEGV in caught_signals(pid)
                assert "_native" in maps(pid)

    run(scenario())


def test_the_token_is_in_no_zygote_environment_or_command_line() -> None:
    async def scenario() -> None:
        async with ZygotePool() as pool:
            token = pool._endpoint.token  # type: ignore[union-attr]
            zygote = pool.snapshot().zygote_pid
            assert pool.snapshot().workers_ready == 2  # so the token reached each worker
            environ = Path(f"/proc/{zygote}/environ").read_bytes()
            cmdline = Path(f"/proc/{zygote}/cmdline").read_bytes()
            assert token.encode() not in environ + cmdline
            assert b"MINIONS_WORKER_TOKEN" not in environ

    run(scenario())


# --- the zygote's death and the exec fallback --------------------------------------------------


def test_zygote_sigkilled_while_the_pool_is_busy_costs_no_worker_and_no_call() -> None:
    async def scenario() -> None:
        async with ZygotePool() as pool:
            zygote = pool.snapshot().zygote_pid
            before_exec = spawns("ZygotePool", "exec")
            os.kill(zygote, signal.SIGSTOP)  # it takes requests now, and answers none
            busy = [asyncio.ensure_future(pool.call("ping", i)) for i in range(300)]
            with pytest.raises(WorkerCrashed):
                await pool.call("segfault")  # its replacement is asked of the stopped zygote
            survivor = pool.worker_pids()
            assert len(survivor) == 1 and pool.snapshot().booting == 1
            os.kill(zygote, signal.SIGKILL)
            assert await asyncio.gather(*busy) == list(range(300))
            await eventually(lambda: pool.snapshot().workers_ready == 2)
            assert set(survivor) <= set(pool.worker_pids())  # the zygote's death killed none
            assert spawns("ZygotePool", "exec") == before_exec + 1  # the one it never answered
            await eventually(lambda: pool.snapshot().zygote_pid not in (0, zygote))
            assert pool.snapshot().zygote_restarts == 1
            before_fork = spawns("ZygotePool", "zygote")
            with pytest.raises(WorkerCrashed):
                await pool.call("segfault")
            assert await pool.call("ping", 5) == 5
            await eventually(lambda: pool.snapshot().workers_ready == 2)
            assert spawns("ZygotePool", "zygote") == before_fork + 1  # forked again

    run(scenario())


def test_a_zygote_that_stops_answering_is_killed_and_replaced(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(parent_side, "FORK_REPLY_S", 0.3)

    async def scenario() -> None:
        async with ZygotePool() as pool:
            zygote = psutil.Process(pool.snapshot().zygote_pid)
            zygote.suspend()
            with pytest.raises(WorkerCrashed):
                await pool.call("segfault")
            assert await pool.call("ping", 2) == 2
            await eventually(lambda: pool.snapshot().workers_ready == 2)
            assert not zygote.is_running()  # killed, and reaped by the pool
            await eventually(lambda: pool.snapshot().zygote_pid not in (0, zygote.pid))
        assert "died of SIGKILL: the pool killed it because it did not answer" in caplog.text

    with caplog.at_level(logging.WARNING, logger="minions.pool"):
        run(scenario())


def test_a_service_that_starts_a_thread_at_import_is_refused_and_spawned_by_exec(
    caplog: pytest.LogCaptureFixture,
) -> None:
    class Threaded(WorkerPool):
        service = "threaded_service:StartsThreadAtImport"
        workers = 2

    async def scenario() -> None:
        before = spawns("Threaded", "exec")
        async with Threaded() as pool:
            assert await pool.call("ping", 3) == 3
            assert pool.snapshot().zygote_pid == 0
            for pid in pool.worker_pids():
                assert psutil.Process(pid).cmdline()[1:3] == ["-m", "minions.ipc.worker"]
            assert spawns("Threaded", "exec") == before + 2
            assert spawns("Threaded", "zygote") == 0
        assert "will not fork threaded_service:StartsThreadAtImport" in caplog.text
        assert "threads running in the zygote" in caplog.text

    with caplog.at_level(logging.ERROR, logger="minions.pool"):
        run(scenario())


# --- exit statuses, the exec setting, the parent's death ---------------------------------------

STATUSES = [
    ("segfault", (), {"signal": signal.SIGSEGV, "exit_code": None}),
    ("abort", (), {"signal": signal.SIGABRT, "exit_code": None}),
    ("exit", (7,), {"signal": None, "exit_code": 7}),
    ("kill", (), {"signal": signal.SIGKILL, "exit_code": None}),
]


@pytest.mark.parametrize("pool_cls", [ZygotePool, ExecPool], ids=["zygote", "exec"])
@pytest.mark.parametrize(("how", "args", "expected"), STATUSES, ids=[s[0] for s in STATUSES])
def test_exact_exit_statuses_reach_the_caller(
    pool_cls: type[WorkerPool], how: str, args: tuple[Any, ...], expected: dict[str, Any]
) -> None:
    async def scenario() -> None:
        async with pool_cls() as pool:
            if how == "kill":  # from outside, like the OOM killer
                call = asyncio.ensure_future(pool.call("sleep", 30.0))
                await eventually(lambda: running_pid(pool, "sleep"))
                os.kill(running_pid(pool, "sleep") or 0, signal.SIGKILL)
            else:
                call = asyncio.ensure_future(pool.call(how, *args))
            with pytest.raises(WorkerCrashed) as info:
                await call
            for name, value in expected.items():
                assert getattr(info.value, name) == value, (name, info.value)

    run(scenario())


def test_exec_spawn_is_a_setting_with_no_zygote() -> None:
    async def scenario() -> None:
        async with ExecPool() as pool:
            assert pool.snapshot().zygote_pid == 0
            for pid in pool.worker_pids():
                worker = psutil.Process(pid)
                assert worker.ppid() == os.getpid()
                assert worker.cmdline()[1:3] == ["-m", "minions.ipc.worker"]
            assert not [p for p in live_children() if "minions.ipc.zygote" in cmdline(p)]

    run(scenario())
    with pytest.raises(ValueError, match="spawn must be one of"):
        PoolConfig(SERVICE, spawn="vfork")


def test_sigkilled_gru_leaves_neither_zygote_nor_workers() -> None:
    """A worker stuck in native code never runs its idle parent check: only PDEATHSIG, armed
    against Gru after the re-parenting, ends it."""
    script = textwrap.dedent(
        """
        import asyncio, sys
        sys.path.insert(0, sys.argv[1])
        from conftest import eventually
        from pools import DemoPool, running_pid

        async def main():
            async with DemoPool() as pool:
                spin = asyncio.ensure_future(pool.call("spin"))
                await eventually(lambda: running_pid(pool, "spin"))
                print(pool.snapshot().zygote_pid, *pool.worker_pids(), flush=True)
                await spin

        asyncio.run(main())
        """
    )
    parent = subprocess.Popen(
        [sys.executable, "-c", script, os.path.dirname(__file__)], stdout=subprocess.PIPE, text=True
    )
    procs: list[psutil.Process] = []
    try:
        assert parent.stdout is not None
        pids = [int(p) for p in parent.stdout.readline().split()]
        assert len(pids) == 3 and pids[0] != 0  # the zygote and two workers
        procs = [psutil.Process(p) for p in pids]
        assert [p.ppid() for p in procs] == [parent.pid] * 3
        parent.kill()
        parent.wait(timeout=10)
        _, alive = psutil.wait_procs(procs, timeout=10)
        assert not alive, f"survived Gru: {alive}"
    finally:
        parent.kill()
        parent.wait()
        for proc in procs:  # survivors of a failed run are no longer our children: end them
            with contextlib.suppress(psutil.Error):
                proc.kill()


# --- the worker's boot path -------------------------------------------------------------------


@pytest.mark.parametrize("pool_cls", [ZygotePool, ExecPool], ids=["zygote", "exec"])
def test_workers_import_nothing_of_the_parent_side(pool_cls: type[WorkerPool]) -> None:
    class Probing(ProbePool):
        spawn = pool_cls.spawn

    async def scenario() -> None:
        async with Probing() as probe:
            assert await probe.call("imported", IMPORTS_A_WORKER_MUST_NOT_MAKE) == []
        async with pool_cls() as pool:  # the demo service too: psutil only if a call needs it
            for pid in pool.worker_pids():
                assert "_psutil_linux" not in maps(pid)

    run(scenario())
