"""cgroup v1 memory accounting (hybrid hierarchies), against fake trees of both layouts and
against this machine's real files; the v2 cases live in test_memory_monitor.py."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from minions.ops import cgroup
from minions.ops.levels import MemoryLevel
from minions.ops.memory import MemoryMonitor, MemoryThresholds

MiB = 1 << 20
V1_UNLIMITED = "9223372036854771712\n"  # what the kernel writes for "no limit" with 4 KiB pages
APP = "system.slice/minions.service"


def tree(tmp_path: Path, files: dict[str, dict[str, str]], *lines: str) -> tuple[Path, Path]:
    """A fake ``/sys/fs/cgroup`` (paths relative to it) and ``/proc/self/cgroup``."""
    root = tmp_path / "sys-fs-cgroup"
    for rel, content in files.items():
        d = root / rel
        d.mkdir(parents=True, exist_ok=True)
        for name, text in content.items():
            (d / name).write_text(text)
    proc = tmp_path / "proc-self-cgroup"
    proc.write_text("".join(line + "\n" for line in lines))
    return proc, root


def v1(usage: int, limit: str = V1_UNLIMITED, soft: str = V1_UNLIMITED, **stat: int) -> dict:
    stat = {"inactive_file": 0, "total_inactive_file": 0} | stat
    return {
        "memory.usage_in_bytes": f"{usage}\n",
        "memory.limit_in_bytes": limit,
        "memory.soft_limit_in_bytes": soft,
        "memory.stat": "".join(f"{k} {v}\n" for k, v in stat.items()),
    }


# A hybrid host as in /proc/self/cgroup here: v2 mounted (no memory controller), memory on v1.
HYBRID = ("9:name=systemd:/" + APP, "4:memory:/" + APP, "1:cpu:/", "0::/" + APP)
UNIFIED_WITHOUT_MEMORY = {"cgroup.controllers": "hugetlb\n", "cgroup.procs": ""}


def test_v1_limit_on_the_own_cgroup(tmp_path: Path) -> None:
    files = v1(300 * MiB, limit=f"{512 * MiB}\n", total_inactive_file=40 * MiB, inactive_file=1)
    proc, root = tree(tmp_path, {"memory/" + APP: files, "unified/" + APP: {}}, *HYBRID)
    reader = cgroup.locate(proc, root)
    assert reader is not None and reader.path == (root / "memory" / APP).resolve()
    m = reader.read()
    assert m is not None and m.version == 1
    assert (m.current, m.high, m.max) == (300 * MiB, None, 512 * MiB)
    # The hierarchical inactive cache, like the usage (which counts children too).
    assert m.inactive_file == 40 * MiB and m.working_set == 260 * MiB and m.limited


def test_v1_soft_limit_alone_is_the_soft_threshold(tmp_path: Path) -> None:
    proc, root = tree(tmp_path, {"memory/" + APP: v1(1, soft=f"{256 * MiB}\n")}, *HYBRID)
    m = cgroup.locate(proc, root).read()
    assert (m.high, m.max) == (256 * MiB, None)
    assert MemoryThresholds().cgroup_thresholds(m.high, m.max) == (int(0.9 * 256 * MiB), 256 * MiB)


def test_v1_walks_up_to_the_nearest_limited_ancestor(tmp_path: Path) -> None:
    files = {
        "memory": v1(900 * MiB),
        "memory/system.slice": v1(500 * MiB, limit=f"{800 * MiB}\n"),
        "memory/" + APP: v1(100 * MiB),
    }
    proc, root = tree(tmp_path, files, *HYBRID)
    reader = cgroup.locate(proc, root)
    assert reader.path == (root / "memory" / "system.slice").resolve()
    assert (reader.read().current, reader.read().max) == (500 * MiB, 800 * MiB)


def test_v1_unlimited_everywhere_reports_the_own_usage(tmp_path: Path) -> None:
    files = {"memory": v1(900 * MiB), "memory/" + APP: v1(123 * MiB)}
    proc, root = tree(tmp_path, files, *HYBRID)
    m = cgroup.locate(proc, root).read()
    assert m.current == 123 * MiB and not m.limited and m.version == 1


def test_v1_in_a_cgroup_namespace_reads_the_mount_root(tmp_path: Path) -> None:
    proc, root = tree(tmp_path, {"memory": v1(5 * MiB, limit=f"{64 * MiB}\n")}, "4:memory:/")
    m = cgroup.locate(proc, root).read()
    assert m.max == 64 * MiB and m.current == 5 * MiB


def test_v1_controller_shared_with_others_on_one_line(tmp_path: Path) -> None:
    proc, root = tree(tmp_path, {"memory/x": v1(7, limit="100\n")}, "3:cpu,memory:/x")
    assert cgroup.locate(proc, root).read().max == 100


def test_v2_wins_over_v1_when_it_has_the_memory_controller(tmp_path: Path) -> None:
    files = {
        APP: {"memory.current": "1000\n", "memory.max": "4000\n", "memory.high": "max\n"},
        "memory/" + APP: v1(2000, limit="3000\n"),
    }
    proc, root = tree(tmp_path, files, "4:memory:/" + APP, "0::/" + APP)
    m = cgroup.locate(proc, root).read()
    assert (m.version, m.current, m.max) == (2, 1000, 4000)


@pytest.mark.parametrize(
    ("lines", "why"),
    [
        (("4:memory:/../../etc",), "escapes the v1 mount"),
        (("4:memory:/gone (deleted)",), "cgroup removed"),
        (("4:memory:/not-there",), "no such cgroup"),
        (("4:cpu:/" + APP,), "no memory hierarchy at all"),
        (("garbage",), "not a cgroup line"),
    ],
)
def test_v1_absent(tmp_path: Path, lines: tuple[str, ...], why: str) -> None:
    proc, root = tree(tmp_path, {"memory/" + APP: v1(1, limit="100\n")}, *lines)
    assert cgroup.locate(proc, root) is None, why


def test_v1_that_vanishes_reads_as_none(tmp_path: Path) -> None:
    proc, root = tree(tmp_path, {"memory/" + APP: v1(1, limit="100\n")}, *HYBRID)
    reader = cgroup.locate(proc, root)
    (root / "memory" / APP / "memory.usage_in_bytes").unlink()
    assert reader.read() is None


def test_monitor_levels_from_a_fake_v1_limit(tmp_path: Path) -> None:
    """The monitor sees a v1 limit: HIGH at 90% of 90% of it (no soft limit), CRITICAL at 90%."""
    proc, root = tree(tmp_path, {"memory/" + APP: v1(0, limit=f"{1000 * MiB}\n")}, *HYBRID)
    usage = root / "memory" / APP / "memory.usage_in_bytes"
    mon = MemoryMonitor(
        MemoryThresholds(host_soft_fraction=None, host_hard_fraction=None),
        proc_cgroup=proc, cgroup_root=root,
    )  # fmt: skip
    levels = []
    for mib in (100, 820, 905, 100):
        usage.write_text(f"{mib * MiB}\n")
        mon.poll()
        levels.append(mon.level)
    assert levels == [MemoryLevel.NORMAL, MemoryLevel.HIGH, MemoryLevel.CRITICAL,
                      MemoryLevel.NORMAL]  # fmt: skip


# --- this machine's real files ------------------------------------------------------------------


def _real_v1_memory_line() -> str | None:
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    return next((ln for ln in lines if "memory" in ln.split(":")[1].split(",")), None)


def test_this_machines_real_cgroup_files() -> None:
    reader = cgroup.locate()
    if reader is None:
        pytest.skip("no readable cgroup memory controller on this machine")
    m = reader.read()
    assert m is not None
    if reader.layout.version == 2:
        assert (reader.path / "memory.current").is_file()
        return
    # v1: the reader is on our own memory cgroup's line, or an ancestor of it with a limit.
    line = _real_v1_memory_line()
    assert line is not None, "a v1 reading needs a memory line in /proc/self/cgroup"
    own = (cgroup.CGROUP_ROOT / "memory" / line.split(":", 2)[2].lstrip("/")).resolve()
    assert reader.path == own or reader.path in own.parents
    # Limits are stable between two reads, so they must equal the raw files.
    raw_limit = int((reader.path / "memory.limit_in_bytes").read_text())
    assert m.max == (None if raw_limit >= 1 << 62 else raw_limit)
    raw_soft = int((reader.path / "memory.soft_limit_in_bytes").read_text())
    assert m.high == (None if raw_soft >= 1 << 62 else raw_soft)
    # Usage moves, but this process alone is resident in that cgroup.
    rss = int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    assert 0 < m.working_set <= m.current
    assert m.current >= rss // 4, (m.current, rss)
