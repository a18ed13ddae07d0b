"""The memory monitor: the pure level machine, cgroup v2 parsing against a fake tree, real psutil
sampling, and real memory in a child process driving the levels up and back down."""

from __future__ import annotations

import asyncio
import itertools
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from conftest import run
from minions.ops import cgroup, metrics, sampling
from minions.ops.levels import MemoryLevel
from minions.ops.memory import MemoryMonitor, MemorySample, MemoryThresholds
from minions.ops.metrics import REGISTRY
from minions.ops.thresholds import Budget, LevelTracker, step_level

N, H, C = MemoryLevel.NORMAL, MemoryLevel.HIGH, MemoryLevel.CRITICAL
MiB = 1 << 20
UNIT = "system.slice/minions.service"

# --- the pure level machine -------------------------------------------------------------------


def levels_for(values: list[int], soft: int = 100, hard: int = 200, h: float = 0.1) -> list:
    level, out = N, []
    for v in values:
        level = step_level(level, v, soft, hard, h)
        out.append(level)
    return out


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ([50, 99, 100, 150, 199, 200, 250], [N, N, H, H, H, C, C]),  # rising, one step at a time
        ([50, 500], [N, C]),  # a jump goes straight to critical
        ([250, 195, 181, 179, 120, 91, 89], [C, C, C, H, H, H, N]),  # falls only past the band
        ([250, 10], [C, N]),  # a big drop goes straight back to normal
        ([150, 95, 105, 92, 100, 91, 99], [H] * 7),  # hovering at soft: no flapping
        ([210, 185, 199, 181, 200], [C] * 4 + [C]),  # hovering at hard: no flapping
        ([150, 89, 95, 99, 100], [H, N, N, N, H]),  # re-rises only at the threshold itself
    ],
)
def test_step_level_table(values: list[int], expected: list) -> None:
    assert levels_for(values) == expected


def test_zero_hysteresis_follows_thresholds_exactly() -> None:
    assert levels_for([100, 99, 200, 199], h=0.0) == [H, N, C, H]


def test_tracker_takes_the_worst_measure_and_reports_changes_once() -> None:
    t = LevelTracker(hysteresis=0.1)
    host = lambda used: Budget("host", used, 800, 900)  # noqa: E731
    cg = lambda used: Budget("cgroup", used, 90, 135)  # noqa: E731
    assert t.update([host(100), cg(10)]) is None  # NORMAL, unchanged
    assert t.update([host(100), cg(100)]) is H
    assert t.cause is not None and t.cause.name == "cgroup"
    assert t.update([host(100), cg(100)]) is None  # same level: no second notification
    assert t.update([host(950), cg(100)]) is C
    assert t.cause.name == "host"
    # Host drops; the cgroup's own hysteresis band is not held by the host's level.
    assert t.update([host(100), cg(85)]) is H
    assert t.update([host(100), cg(80)]) is N


def test_tracker_forgets_a_measure_that_disappears() -> None:
    t = LevelTracker(hysteresis=0.1)
    assert t.update([Budget("cgroup", 100, 90, 135)]) is H
    assert t.update([]) is N


# --- thresholds -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        {"soft_bytes": 10},
        {"soft_bytes": 20, "hard_bytes": 10},
        {"soft_bytes": 0, "hard_bytes": 10},
        {"cgroup_soft_fraction": 0},
        {"cgroup_hard_fraction": 1.5},
        {"host_soft_fraction": None},
        {"host_soft_fraction": 0.9, "host_hard_fraction": 0.8},
        {"hysteresis": 0.5},
        {"hysteresis": -0.1},
    ],
)
def test_thresholds_are_validated_once(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        MemoryThresholds(**kwargs)


G = 1 << 30


@pytest.mark.parametrize(
    ("high", "max_", "soft", "hard"),
    [
        (1 * G, 1500 * MiB, int(0.9 * G), int(0.9 * 1500 * MiB)),  # the documented unit
        (None, 1000 * MiB, int(0.9 * int(0.9 * 1000 * MiB)), int(0.9 * 1000 * MiB)),
        (1000 * MiB, None, int(0.9 * 1000 * MiB), 1000 * MiB),
        (2 * G, 1 * G, int(0.9 * int(0.9 * G)), int(0.9 * G)),  # high above max: soft from hard
    ],
)
def test_cgroup_thresholds(high: int | None, max_: int | None, soft: int, hard: int) -> None:
    assert MemoryThresholds().cgroup_thresholds(high, max_) == (soft, hard)


def sample(**kw) -> MemorySample:
    base = {"taken_at": 0.0, "gru_rss": 0, "gru_cpu_seconds": 0.0, "host_total": 1000,
            "host_available": 1000}  # fmt: skip
    return MemorySample(**(base | kw))


def test_budgets_per_measure() -> None:
    cg = cgroup.CgroupMemory(Path("/x"), current=500, high=1000, max=2000, inactive_file=100)
    s = sample(gru_rss=30, workers={"p": {1: 10, 2: 20}}, host_available=250, cgroup=cg)
    assert s.process_rss == 60 and s.host_used == 750
    budgets = {b.name: b for b in MemoryThresholds(soft_bytes=50, hard_bytes=70).budgets(s)}
    assert budgets["process"] == Budget("process", 60, 50, 70)
    assert budgets["cgroup"] == Budget("cgroup", 400, 900, 1800)  # working set, not current
    assert budgets["host"] == Budget("host", 750, 800, 900)
    # Defaults: no process budget; no host budget when disabled; no cgroup budget when unlimited.
    unlimited = cgroup.CgroupMemory(Path("/x"), current=500, high=None, max=None)
    none = MemoryThresholds(host_soft_fraction=None, host_hard_fraction=None).budgets(
        sample(cgroup=unlimited)
    )
    assert none == ()


# --- cgroup v2 against a fake tree ------------------------------------------------------------


def fake_cgroup(tmp_path: Path, files: dict[str, dict[str, str]], line: str = f"0::/{UNIT}"):
    root = tmp_path / "sys-fs-cgroup"
    for rel, content in files.items():
        d = root / rel
        d.mkdir(parents=True, exist_ok=True)
        for name, text in content.items():
            (d / name).write_text(text)
    proc = tmp_path / "proc-self-cgroup"
    proc.write_text(line + "\n")
    return proc, root


UNIT_FILES = {
    "memory.current": "104857600\n",
    "memory.high": "1073741824\n",
    "memory.max": "1572864000\n",
    "memory.stat": "anon 90000000\nfile 14857600\nactive_file 1000\ninactive_file 4194304\n",
}


def test_cgroup_reading_of_a_limited_unit(tmp_path: Path) -> None:
    proc, root = fake_cgroup(tmp_path, {UNIT: UNIT_FILES})
    reader = cgroup.locate(proc, root)
    assert reader is not None and reader.path == (root / UNIT).resolve()
    m = reader.read()
    assert m is not None
    assert (m.current, m.high, m.max, m.inactive_file) == (100 * MiB, G, 1500 * MiB, 4 * MiB)
    assert m.working_set == 96 * MiB and m.limited


def test_cgroup_max_means_unlimited(tmp_path: Path) -> None:
    files = UNIT_FILES | {"memory.high": "max\n", "memory.max": "max\n"}
    proc, root = fake_cgroup(tmp_path, {UNIT: files})
    m = cgroup.locate(proc, root).read()
    assert (m.high, m.max, m.limited) == (None, None, False)


def test_cgroup_limit_on_an_ancestor_is_found(tmp_path: Path) -> None:
    own = {"memory.current": "1000\n", "memory.high": "max\n", "memory.max": "max\n"}
    parent = {"memory.current": "5000\n", "memory.high": "max\n", "memory.max": "8000\n"}
    proc, root = fake_cgroup(
        tmp_path, {"limited.slice": parent, "limited.slice/app.service": own},
        line="0::/limited.slice/app.service",
    )  # fmt: skip
    m = cgroup.locate(proc, root).read()
    assert (m.current, m.max) == (5000, 8000)


def test_cgroup_unlimited_everywhere_still_reports_own_current(tmp_path: Path) -> None:
    own = {"memory.current": "1234\n", "memory.high": "max\n", "memory.max": "max\n"}
    proc, root = fake_cgroup(tmp_path, {UNIT: own})
    m = cgroup.locate(proc, root).read()
    assert m.current == 1234 and not m.limited and m.inactive_file == 0  # no memory.stat


@pytest.mark.parametrize(
    ("line", "why"),
    [
        ("9:memory:/user.slice", "cgroup v1 only"),
        ("0::/", "root of a v1/hybrid mount: no memory.current"),
        ("0::/../../etc", "escapes the cgroup mount"),
        (f"0::/{UNIT} (deleted)", "cgroup removed"),
        ("0::/not-there", "no such cgroup"),
    ],
)
def test_cgroup_absent(tmp_path: Path, line: str, why: str) -> None:
    proc, root = fake_cgroup(tmp_path, {UNIT: UNIT_FILES}, line=line)
    assert cgroup.locate(proc, root) is None, why


def test_cgroup_namespace_root_in_a_container(tmp_path: Path) -> None:
    proc, root = fake_cgroup(tmp_path, {".": UNIT_FILES}, line="0::/")
    m = cgroup.locate(proc, root).read()
    assert m is not None and m.max == 1500 * MiB


def test_cgroup_that_vanishes_reads_as_none(tmp_path: Path) -> None:
    proc, root = fake_cgroup(tmp_path, {UNIT: UNIT_FILES})
    reader = cgroup.locate(proc, root)
    (root / UNIT / "memory.current").unlink()
    assert reader.read() is None


def test_monitor_levels_from_fake_cgroup_with_metrics(tmp_path: Path) -> None:
    """Derived thresholds (soft 0.9*high, hard 0.9*max), one callback and one metric increment
    per transition, nothing on a repeated level."""
    files = UNIT_FILES | {"memory.stat": "inactive_file 0\n"}
    proc, root = fake_cgroup(tmp_path, {UNIT: files})
    current = root / UNIT / "memory.current"
    mon = MemoryMonitor(
        MemoryThresholds(host_soft_fraction=None, host_hard_fraction=None),
        proc_cgroup=proc, cgroup_root=root,
    )  # fmt: skip
    seen: list[MemoryLevel] = []
    mon.subscribe(lambda level, s: seen.append(level))

    def transitions(level: str) -> float:
        v = REGISTRY.get_sample_value("minions_memory_pressure_transitions_total", {"level": level})
        return v or 0.0

    before = {lvl: transitions(lvl) for lvl in ("normal", "high", "critical")}
    for mib in (100, 950, 960, 1400, 1300, 100, 100):
        current.write_text(f"{mib * MiB}\n")
        s = mon.poll()
        assert s.cgroup is not None and s.cgroup.current == mib * MiB
        assert REGISTRY.get_sample_value("minions_cgroup_memory_current_bytes") == mib * MiB
    assert seen == [H, C, N]
    assert REGISTRY.get_sample_value("minions_memory_pressure_level") == 0
    for lvl, n in (("normal", 1), ("high", 1), ("critical", 1)):
        assert transitions(lvl) - before[lvl] == n


# --- real psutil ------------------------------------------------------------------------------


def test_real_sampling_of_gru_host_and_workers(tmp_path: Path) -> None:
    script = "import sys; print('up', flush=True); sys.stdin.read()"
    child = subprocess.Popen([sys.executable, "-c", script],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE)  # fmt: skip
    try:
        assert child.stdout.readline() == b"up\n"  # an interpreter, not a half-exec'd fork
        mon = MemoryMonitor(proc_cgroup=tmp_path / "none", cgroup_root=tmp_path)
        dead = 2**22 + 12345  # above pid_max's default: no such process
        mon.watch_workers("native", lambda: [child.pid, dead])

        def broken() -> list[int]:
            raise RuntimeError("pool is confused")

        unwatch_broken = mon.watch_workers("broken", broken)
        s = mon.sample()
        me = psutil.Process()
        assert abs(s.gru_rss - me.memory_info().rss) < 0.2 * s.gru_rss
        assert s.gru_cpu_seconds > 0
        assert s.host_total == psutil.virtual_memory().total
        assert 0 < s.host_available <= s.host_total
        assert s.cgroup is None
        assert list(s.workers["native"]) == [child.pid]  # the dead pid is skipped
        assert s.workers["native"][child.pid] > 1 * MiB
        assert "broken" not in s.workers  # a raising source is skipped, not fatal
        with pytest.raises(ValueError, match="already watched"):
            mon.watch_workers("native", lambda: [])
        unwatch_broken()
        unwatch_broken()  # idempotent
        assert set(mon.sample().workers) == {"native"}
        mon.poll()
        assert REGISTRY.get_sample_value("minions_host_memory_used_bytes") > 0
    finally:
        child.stdin.close()
        child.wait(10)


def test_refresh_process_metrics_without_a_monitor() -> None:
    metrics.HOST_MEMORY_USED_BYTES.set(0)
    sampling.refresh_process_metrics()
    used = REGISTRY.get_sample_value("minions_host_memory_used_bytes")
    vm = psutil.virtual_memory()
    assert used is not None and 0 < used <= vm.total


def test_monitor_interval_is_validated() -> None:
    with pytest.raises(ValueError, match="interval_s"):
        MemoryMonitor(interval_s=0)


# --- real memory ------------------------------------------------------------------------------

ALLOCATOR = """
import sys
chunks = []
print("ready", flush=True)
for line in sys.stdin:
    cmd, *arg = line.split()
    if cmd == "alloc":
        chunks.append(b"\\x01" * (int(arg[0]) << 20))  # written, so resident (and mmap'd: freeable)
    elif cmd == "free":
        chunks.clear()
    print("ok", flush=True)
"""


def test_real_memory_drives_levels_up_and_back_down(tmp_path: Path) -> None:
    async def main() -> tuple[list[tuple[MemoryLevel, int]], int]:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", ALLOCATOR,
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        )  # fmt: skip
        assert proc.stdin is not None and proc.stdout is not None
        try:
            assert await proc.stdout.readline() == b"ready\n"

            async def command(text: str) -> None:
                proc.stdin.write(text.encode() + b"\n")
                await proc.stdin.drain()
                assert await proc.stdout.readline() == b"ok\n"

            probe = MemoryMonitor(proc_cgroup=tmp_path / "none", cgroup_root=tmp_path)
            probe.watch_workers("demo", lambda: [proc.pid])
            baseline = probe.sample().process_rss
            thresholds = MemoryThresholds(
                soft_bytes=baseline + 48 * MiB, hard_bytes=baseline + 112 * MiB,
                host_soft_fraction=None, host_hard_fraction=None,  # neighbours' memory is noise
            )  # fmt: skip
            mon = MemoryMonitor(
                thresholds, interval_s=0.02, proc_cgroup=tmp_path / "none", cgroup_root=tmp_path
            )
            mon.watch_workers("demo", lambda: [proc.pid])
            changes: asyncio.Queue[tuple[MemoryLevel, int]] = asyncio.Queue()
            mon.subscribe(lambda level, s: changes.put_nowait((level, s.process_rss)))
            mon.start()
            assert mon.level is N and mon.running
            seen = []

            async def expect(level: MemoryLevel) -> None:
                while True:
                    got = await asyncio.wait_for(changes.get(), 20)
                    seen.append(got)
                    if got[0] is level:
                        return

            await command("alloc 64")
            await expect(H)
            await command("alloc 64")
            await expect(C)
            await command("free")
            await expect(N)
            await asyncio.wait_for(mon.wait_level_below(H), 1)
            await mon.stop()
            assert not mon.running
            return seen, baseline
        finally:
            proc.stdin.close()
            await proc.wait()

    seen, baseline = run(main())
    levels = [lvl for lvl, _ in seen]
    # Up one level per allocation; down to NORMAL, possibly via HIGH (the child frees chunk by
    # chunk and a sample may land in between), but never back up.
    assert levels[:2] == [H, C] and levels[-1] is N, seen
    assert all(a > b for a, b in itertools.pairwise(levels[1:])), seen
    (_, high_rss), (_, crit_rss), (_, normal_rss) = seen[0], seen[1], seen[-1]
    assert high_rss >= baseline + 48 * MiB and crit_rss >= baseline + 112 * MiB
    assert normal_rss < (baseline + 48 * MiB) * 0.95


def test_wait_level_below_returns_when_the_monitor_stops(tmp_path: Path) -> None:
    async def main() -> None:
        # A 1-byte budget: Gru alone is over it, so the level is CRITICAL from the first sample.
        mon = MemoryMonitor(
            MemoryThresholds(soft_bytes=1, hard_bytes=2), interval_s=0.01,
            proc_cgroup=tmp_path / "none", cgroup_root=tmp_path,
        )  # fmt: skip
        mon.start()
        assert mon.level is C
        waiter = asyncio.create_task(mon.wait_level_below(H))
        await asyncio.sleep(0)
        assert not waiter.done()
        await mon.stop()
        await asyncio.wait_for(waiter, 1)

    run(main())


def test_a_raising_subscriber_does_not_stop_the_others(tmp_path: Path) -> None:
    mon = MemoryMonitor(
        MemoryThresholds(soft_bytes=1, hard_bytes=2),
        proc_cgroup=tmp_path / "none", cgroup_root=tmp_path,
    )  # fmt: skip
    got: list[MemoryLevel] = []

    def bad(level: MemoryLevel, s: MemorySample) -> None:
        raise RuntimeError("subscriber bug")

    mon.subscribe(bad)
    unsubscribe = mon.subscribe(lambda level, s: got.append(level))
    mon.poll()
    assert got == [C]
    unsubscribe()
    mon.thresholds = MemoryThresholds(host_soft_fraction=None, host_hard_fraction=None)
    mon.poll()  # back to NORMAL: only the raising subscriber is still there
    assert got == [C]
    assert mon.level is N


def test_on_sample_hands_every_poll_its_workers_rss(tmp_path: Path) -> None:
    """The hook pools use instead of measuring their workers themselves: called on the loop
    after every sample, with ``workers[name] == {pid: rss}`` of the pool watched as ``name``."""
    script = "import sys; print('up', flush=True); sys.stdin.read()"
    child = subprocess.Popen([sys.executable, "-c", script],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE)  # fmt: skip

    async def main() -> list[MemorySample]:
        mon = MemoryMonitor(interval_s=0.01, proc_cgroup=tmp_path / "none", cgroup_root=tmp_path)
        mon.watch_workers("native", lambda: [child.pid])
        got: list[MemorySample] = []
        enough = asyncio.Event()

        def broken(sample: MemorySample) -> None:
            raise RuntimeError("hook bug")

        def hook(sample: MemorySample) -> None:
            got.append(sample)
            if len(got) == 5:
                enough.set()

        mon.on_sample(broken)
        unsubscribe = mon.on_sample(hook)
        mon.start()  # the first sample is taken at once, then one per interval on the loop
        await asyncio.wait_for(enough.wait(), 20)
        unsubscribe()
        seen = len(got)
        forced = mon.poll()
        await mon.stop()
        assert len(got) == seen, "an unsubscribed hook is not called again"
        assert forced.workers["native"].keys() == {child.pid}
        return got

    try:
        assert child.stdout.readline() == b"up\n"
        got = run(main())
    finally:
        child.stdin.close()
        child.wait(10)
    assert len(got) >= 5
    assert all(s.workers["native"].keys() == {child.pid} for s in got)
    assert all(s.workers["native"][child.pid] > MiB for s in got)
    assert [s.taken_at for s in got] == sorted(s.taken_at for s in got)
    assert len({s.taken_at for s in got}) == len(got), "one call per sample, never twice"
