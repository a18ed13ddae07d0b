"""Pool lifecycle: configuration, boot, recycling, circuit breaking, shedding and shutdown."""

from __future__ import annotations

import asyncio
import os
import pathlib
import shutil
import stat
import subprocess
import sys
import tempfile
import textwrap
import time

import psutil
import pytest

from conftest import eventually, run
from minions.errors import Overloaded, PoolUnavailable, RemoteError, WorkerCrashed
from minions.ops import metrics
from minions.workers import Circuit, MemoryLevel, PoolConfig, WorkerPool
from pools import SERVICE, BadServicePool, DemoPool, running_pid


@pytest.mark.parametrize(
    ("setting", "value"),
    [
        ("workers", 0),
        ("workers", 1.5),
        ("call_timeout_s", 0),
        ("call_timeout_s", float("nan")),
        ("max_queue", 0),
        ("retries_on_crash", -1),
        ("restart_backoff_max_s", 0.0001),
        ("spare_workers", True),
        ("circuit_reset_max_s", 1.0),
        ("on_crash_loop", "panic"),
    ],
)
def test_bad_settings_raise_value_error_naming_the_setting(setting: str, value: object) -> None:
    with pytest.raises(ValueError, match=setting):
        PoolConfig(service=SERVICE, **{setting: value})  # type: ignore[arg-type]


def test_settings_come_from_class_attributes() -> None:
    class Tuned(WorkerPool):
        service = SERVICE
        workers = 3
        max_rss_mb = 256

    cfg = Tuned().config
    assert (cfg.workers, cfg.max_rss_mb, cfg.name) == (3, 256, "Tuned")
    with pytest.raises(ValueError, match="service"):
        type("NoService", (WorkerPool,), {})()


def test_service_that_cannot_boot_fails_startup_with_its_traceback() -> None:
    async def scenario() -> None:
        pool = BadServicePool()
        with pytest.raises(PoolUnavailable, match="NoSuchService"):
            await pool.startup()
        assert pool.worker_pids() == []

    run(scenario())


def test_worker_whose_setup_raises_fails_startup_with_the_remote_traceback() -> None:
    class Broken(WorkerPool):
        service = "services:BrokenSetup"
        workers = 1

    async def scenario() -> None:
        with pytest.raises(PoolUnavailable) as info:
            await Broken().startup()
        assert "RuntimeError: cannot open the device" in str(info.value)

    run(scenario())


def test_shutdown_removes_socket_dir_and_reaps_every_worker() -> None:
    async def scenario() -> None:
        pool = DemoPool()
        await pool.startup()
        directory = pool._endpoint.directory  # type: ignore[union-attr]
        assert stat.S_IMODE(directory.stat().st_mode) == 0o700
        pids = pool.worker_pids()
        assert len(pids) == 2
        await pool.shutdown()
        assert not directory.exists()
        assert not any(psutil.pid_exists(p) for p in pids)
        with pytest.raises(PoolUnavailable, match=r"shutting down|not started"):
            await pool.call("ping", 1)

    run(scenario())


def test_shutdown_lets_in_flight_calls_finish() -> None:
    async def scenario() -> None:
        pool = DemoPool()
        await pool.startup()
        calls = [asyncio.create_task(pool.call("count_primes", 200_000)) for _ in range(4)]
        await asyncio.sleep(0)
        await pool.shutdown()
        assert await asyncio.gather(*calls) == [17984] * 4

    run(scenario())


def test_workers_are_recycled_after_max_calls_without_the_caller_noticing() -> None:
    class Recycled(DemoPool):
        workers = 1
        max_calls_per_worker = 5

    async def scenario() -> None:
        recycles = metrics.WORKER_RECYCLES.labels("Recycled", "max_calls")
        before = recycles._value.get()
        async with Recycled() as pool:
            pids = {await pool.call("pid") for _ in range(12)}
            assert len(pids) == 3  # 5 + 5 + 2 calls
            assert recycles._value.get() - before >= 2

    run(scenario())


def test_workers_above_max_rss_are_recycled_between_calls() -> None:
    class Lean(DemoPool):
        workers = 1
        max_rss_mb = 80
        rss_check_s = 0.05

    async def scenario() -> None:
        async with Lean() as pool:
            first = await pool.call("pid")
            assert await pool.call("leak", 100) == 100  # the caller sees a normal result
            assert await pool._wait_until(lambda: first not in pool.worker_pids(), 10)
            assert await pool.call("pid") != first
            assert await pool.call("leak", 0) == 0  # fresh process: nothing leaked yet

    run(scenario(), timeout=30)


def test_crash_loop_opens_the_circuit_then_recovers() -> None:
    class Fragile(DemoPool):
        workers = 1
        restart_intensity = 2
        restart_period_s = 30.0
        circuit_reset_s = 0.5

    async def scenario() -> None:
        async with Fragile() as pool:
            for _ in range(3):
                with pytest.raises(WorkerCrashed):
                    await pool.call("segfault")
            assert pool.snapshot().circuit is Circuit.OPEN
            with pytest.raises(PoolUnavailable) as info:
                await pool.call("ping", 1)
            assert info.value.retry_after_s is not None
            assert metrics.POOL_CIRCUIT_OPEN.labels("Fragile")._value.get() == 1
            ok = await pool._wait_until(lambda: pool.snapshot().circuit is Circuit.CLOSED, 10)
            assert ok, pool.snapshot()
            assert await pool.call("ping", 2) == 2

    run(scenario())


def test_full_queue_sheds_with_overloaded_and_loses_nothing_accepted() -> None:
    class Tiny(DemoPool):
        workers = 1
        max_queue = 3
        pipeline_depth = 1

    async def scenario() -> None:
        async with Tiny() as pool:
            accepted = [asyncio.create_task(pool.call("ping", i)) for i in range(4)]
            await asyncio.sleep(0)  # one sent, three queued
            with pytest.raises(Overloaded, match="max_queue"):
                await pool.call("ping", 99)
            assert await asyncio.gather(*accepted) == [0, 1, 2, 3]

    run(scenario())


def test_memory_levels_throttle_and_shed() -> None:
    async def scenario() -> None:
        async with DemoPool() as pool:
            pool.apply_memory_level(MemoryLevel.HIGH)
            calls = [asyncio.create_task(pool.call("ping", i)) for i in range(10)]
            await asyncio.sleep(0)
            assert pool.snapshot().in_flight == 1  # workers // 2 calls in flight, rest queued
            assert await asyncio.gather(*calls) == list(range(10))
            pool.apply_memory_level(MemoryLevel.CRITICAL)
            with pytest.raises(Overloaded, match="memory"):
                await pool.call("ping", 1)
            pool.apply_memory_level(MemoryLevel.NORMAL)
            assert await pool.call("ping", 5) == 5

    run(scenario())


def test_sigkilled_parent_leaves_no_worker_alive(tmp_path: os.PathLike[str]) -> None:
    script = textwrap.dedent(
        """
        import asyncio, sys
        sys.path.insert(0, sys.argv[1])
        from pools import DemoPool

        async def main():
            async with DemoPool() as pool:
                await pool.wait_ready()
                print(*pool.worker_pids(), flush=True)
                await asyncio.Event().wait()

        asyncio.run(main())
        """
    )
    tests_dir = os.path.dirname(__file__)
    parent = subprocess.Popen(
        [sys.executable, "-c", script, tests_dir], stdout=subprocess.PIPE, text=True
    )
    try:
        assert parent.stdout is not None
        pids = [int(p) for p in parent.stdout.readline().split()]
        assert len(pids) == 2
        workers = [psutil.Process(p) for p in pids]
        parent.kill()
        parent.wait(timeout=10)
        _, alive = psutil.wait_procs(workers, timeout=10)
        assert not alive, f"orphaned workers: {alive}"
    finally:
        parent.kill()
        parent.wait()


def test_workers_volunteer_for_the_oom_killer_before_gru() -> None:
    async def scenario() -> None:
        async with DemoPool() as pool:
            for pid in pool.worker_pids():
                with open(f"/proc/{pid}/oom_score_adj") as f:
                    assert int(f.read()) == 500
            with open("/proc/self/oom_score_adj") as f:
                assert int(f.read()) < 500

    run(scenario())


def test_setup_that_hangs_fails_startup_after_boot_timeout_and_leaves_nothing() -> None:
    class Hanging(WorkerPool):
        service = "services:SlowBoot"
        workers = 1
        boot_timeout_s = 1.0

    async def scenario() -> None:
        pool = Hanging()
        with pytest.raises(PoolUnavailable, match="boot_timeout_s"):
            await pool.startup()
        assert pool.worker_pids() == []

    run(scenario())


def test_result_that_breaks_the_declared_type_is_a_remote_error() -> None:
    class Lying(WorkerPool):
        service = "services:Liar"
        workers = 1

    async def scenario() -> None:
        async with Lying() as pool:
            with pytest.raises(RemoteError) as info:
                await pool.call("answer")
            assert info.value.kind == "invalid-result"

    run(scenario())


def test_restart_workers_replaces_every_worker_without_failing_a_call() -> None:
    async def scenario() -> None:
        async with DemoPool() as pool:
            before = {w.pid for w in pool.snapshot().workers}
            assert len(before) == 2
            stop = asyncio.Event()
            served = 0

            async def load() -> None:
                nonlocal served
                while not stop.is_set():
                    assert await pool.call("crc32", b"abc") == 891568578
                    served += 1

            loaders = [asyncio.create_task(load()) for _ in range(4)]
            while served < 20:  # the load really runs before the restart begins
                await asyncio.sleep(0.01)
            replaced = await pool.restart_workers()
            stop.set()
            await asyncio.gather(*loaders)  # any failed call raises here
            snap = pool.snapshot()
            after = {w.pid for w in snap.workers if w.phase == "ready"}
            assert replaced == 2
            assert len(after) == 2 and not after & before
            assert snap.restarts == 0  # planned replacements are not crash restarts
            assert all(w.role == "active" for w in snap.workers if w.phase == "ready")

    run(scenario())


def test_socket_dirs_of_a_sigkilled_parent_are_swept_at_the_next_start() -> None:
    """Found by chaos runs: a SIGKILLed Gru left its pools' directories behind forever. The next
    pool to start removes the stale ones of this user, and only those."""
    base = tempfile.mkdtemp(prefix="mx")  # short: the socket path must fit in sun_path
    env = {**os.environ, "XDG_RUNTIME_DIR": base}
    script = textwrap.dedent(
        """
        import asyncio, sys
        sys.path.insert(0, sys.argv[1])
        from pools import DemoPool

        async def main():
            async with DemoPool() as pool:
                print(pool._endpoint.directory, flush=True)
                await asyncio.Event().wait()

        asyncio.run(main())
        """
    )
    parent = subprocess.Popen(
        [sys.executable, "-c", script, os.path.dirname(__file__)],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert parent.stdout is not None
        stale = pathlib.Path(parent.stdout.readline().strip())
        parent.kill()
        parent.wait(timeout=10)
        assert stale.is_dir() and (stale / "owner").exists()  # really left behind
        assert not list(stale.glob(".owner"))
        foreign = pathlib.Path(base, "minions-not-ours")  # no owner record: never touched
        foreign.mkdir()

        async def scenario() -> None:
            os.environ["XDG_RUNTIME_DIR"] = base
            try:
                async with DemoPool() as first:
                    assert not stale.exists()
                    assert foreign.is_dir()
                    mine = first._endpoint.directory  # type: ignore[union-attr]
                    async with DemoPool() as second:  # its sweep keeps a live owner's dir
                        assert mine.is_dir() and second.snapshot().workers_ready == 2
            finally:
                del os.environ["XDG_RUNTIME_DIR"]

        run(scenario())
    finally:
        parent.kill()
        parent.wait()
        shutil.rmtree(base, ignore_errors=True)


def test_shutdown_does_not_wait_for_callers_that_gave_up() -> None:
    class Patient(DemoPool):
        workers = 1
        shutdown_grace_s = 30.0
        call_timeout_s = 60.0  # only the shutdown can end that call early

    async def scenario() -> None:
        pool = Patient()
        await pool.startup()
        abandoned = asyncio.create_task(pool.call("sleep", 60))
        await eventually(lambda: running_pid(pool, "sleep"))
        abandoned.cancel()
        started = time.monotonic()
        await pool.shutdown()
        # nobody waits for that answer: the pool went straight to stopping its worker
        assert time.monotonic() - started < Patient.shutdown_grace_s / 2
        assert pool.worker_pids() == []

    run(scenario(), timeout=40)


def test_shutdown_keeps_to_the_deadline_it_is_given() -> None:
    class Stubborn(DemoPool):
        workers = 1
        shutdown_grace_s = 30.0
        call_timeout_s = 60.0

    async def scenario() -> None:
        pool = Stubborn()
        await pool.startup()
        stuck = asyncio.create_task(pool.call("spin"))  # holds the GIL: only SIGKILL ends it
        await eventually(lambda: running_pid(pool, "spin"))
        deadline = time.monotonic() + 3.0
        await pool.shutdown(deadline=deadline)
        assert time.monotonic() < deadline + 1.0  # the reaping of the SIGKILL, at most
        with pytest.raises(PoolUnavailable, match="shut down while the call ran"):
            await stuck

    run(scenario(), timeout=40)


def test_circuit_listeners_hear_a_crash_loop_open_and_close() -> None:
    class Fragile(DemoPool):
        workers = 1
        restart_intensity = 1
        restart_period_s = 30.0
        circuit_reset_s = 0.2

    async def scenario() -> None:
        heard: list[Circuit] = []
        async with Fragile() as pool:
            unsubscribe = pool.subscribe_circuit(lambda p, c: heard.append(c))
            for _ in range(2):
                with pytest.raises(WorkerCrashed):
                    await pool.call("segfault")
            assert heard == [Circuit.OPEN]
            assert await pool._wait_until(lambda: Circuit.CLOSED in heard, 10)
            assert heard == [Circuit.OPEN, Circuit.HALF_OPEN, Circuit.CLOSED]
            assert pool.snapshot().circuit_opened == 1
            unsubscribe()

    run(scenario())


def _unshare_pid_works() -> bool:
    unshare = shutil.which("unshare")
    if unshare is None or os.geteuid() != 0:
        return False
    probe = [unshare, "--pid", "--fork", "--mount-proc", "true"]
    return subprocess.run(probe, capture_output=True, timeout=10).returncode == 0


@pytest.mark.skipif(not _unshare_pid_works(), reason="needs root and unshare --pid (util-linux)")
def test_a_live_pool_in_another_pid_namespace_keeps_its_directory() -> None:
    """Two PID namespaces on one /tmp (containers, a test's own namespace): a pid recorded by
    one means nothing in the other. Found when a pool as PID 1 of a namespace lost its socket
    directory to a sweep from outside; the owner's lock is the same fact from everywhere."""
    base = tempfile.mkdtemp(prefix="mx")
    script = textwrap.dedent(
        """
        import asyncio, os, sys
        sys.path.insert(0, sys.argv[1])
        from pools import DemoPool

        async def main():
            async with DemoPool() as pool:
                print(os.getpid(), pool._endpoint.directory, flush=True)
                sys.stdin.readline()
                print(await pool.call("ping", 7), flush=True)

        asyncio.run(main())
        """
    )
    unshare = shutil.which("unshare")
    assert unshare is not None
    other = subprocess.Popen(
        [unshare, "--pid", "--fork", "--mount-proc", "--kill-child", sys.executable, "-c",
         script, os.path.dirname(__file__)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        env={**os.environ, "XDG_RUNTIME_DIR": base},
    )  # fmt: skip
    try:
        assert other.stdin is not None and other.stdout is not None
        pid_inside, directory = other.stdout.readline().split()
        assert int(pid_inside) < 10  # really another namespace: a pid that means another here

        async def scenario() -> None:
            os.environ["XDG_RUNTIME_DIR"] = base
            try:
                async with DemoPool():  # its start sweeps the shared directory
                    assert pathlib.Path(directory).is_dir()
            finally:
                del os.environ["XDG_RUNTIME_DIR"]

        run(scenario())
        other.stdin.write("go\n")
        other.stdin.flush()
        assert other.stdout.readline().strip() == "7"  # and it still serves
        assert other.wait(timeout=30) == 0
    finally:
        other.kill()
        other.wait()
        shutil.rmtree(base, ignore_errors=True)


def test_call_metrics_are_exact_at_once_though_counted_in_batches() -> None:
    """Successful calls are counted in plain numbers (ops/tally.py); a read of the registry
    right after them still sees every one, in the counter and in the histogram."""
    from minions.ops.metrics import REGISTRY

    labels = {"pool": "DemoPool", "method": "ping"}

    def read() -> tuple[float, float]:
        ok = REGISTRY.get_sample_value("minions_worker_calls_total", {**labels, "outcome": "ok"})
        seen = REGISTRY.get_sample_value("minions_worker_call_duration_seconds_count", labels)
        return ok or 0.0, seen or 0.0

    async def scenario() -> None:
        async with DemoPool() as pool:
            before = read()
            for i in range(25):
                assert await pool.call("ping", i) == i
            assert read() == (before[0] + 25, before[1] + 25)

    run(scenario())
