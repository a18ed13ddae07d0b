"""Reading Gru's own cgroup v2 memory accounting: what systemd's MemoryHigh/MemoryMax enforce.

Design note. Under systemd every process of the unit (Gru and its workers) lives in the unit's
cgroup, and the kernel enforces ``memory.high`` (reclaim and throttle) and ``memory.max`` (OOM
kill) on the *sum*. So this is the one measure that predicts what the kernel will do; the memory
monitor compares it with thresholds derived from those very limits.

The limit that binds may sit on an ancestor (a slice, or a container's root) rather than on the
process's own cgroup, so :func:`locate` walks up from ``/proc/self/cgroup``'s ``0::/path`` to the
nearest cgroup that has a limit. Only cgroup v2 is read; on a v1 or hybrid host without a v2
memory controller :func:`locate` returns ``None`` and the monitor relies on host and process
measures alone. Limits are re-read on every sample because ``systemctl set-property`` can change
them at run time. The paths are parameters so tests can point them at a fake tree.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

PROC_SELF_CGROUP = Path("/proc/self/cgroup")
CGROUP_ROOT = Path("/sys/fs/cgroup")


@dataclass(frozen=True, slots=True)
class CgroupMemory:
    """One reading of a cgroup's memory files. A limit of ``None`` means ``max`` (unlimited)."""

    path: Path
    current: int
    high: int | None
    max: int | None
    inactive_file: int = 0

    @property
    def working_set(self) -> int:
        """``memory.current`` minus inactive page cache, which the kernel reclaims before it
        throttles or kills anyone; the same "working set" container tooling alerts on."""
        return max(0, self.current - self.inactive_file)

    @property
    def limited(self) -> bool:
        return self.high is not None or self.max is not None


class CgroupReader:
    """Reads ``memory.current``/``high``/``max``/``stat`` of one cgroup directory, each call."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def read(self) -> CgroupMemory | None:
        """The current reading, or ``None`` if the cgroup vanished or its files are unreadable."""
        try:
            current = _read_limit(self.path / "memory.current")
            if current is None:
                return None
            return CgroupMemory(
                path=self.path,
                current=current,
                high=_read_limit(self.path / "memory.high"),
                max=_read_limit(self.path / "memory.max"),
                inactive_file=_read_stat(self.path / "memory.stat", "inactive_file"),
            )
        except (OSError, ValueError):
            return None


def own_cgroup(proc_cgroup: Path = PROC_SELF_CGROUP, root: Path = CGROUP_ROOT) -> Path | None:
    """The directory of this process's cgroup v2 (the ``0::/path`` line), if it is readable."""
    try:
        text = proc_cgroup.read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("0::"):
            rel = line[3:].strip()
            if rel.endswith(" (deleted)"):
                return None
            path = (root / rel.lstrip("/")).resolve()
            if path != root.resolve() and root.resolve() not in path.parents:
                return None  # ".." games: stay inside the cgroup mount
            return path if (path / "memory.current").is_file() else None
    return None


def locate(proc_cgroup: Path = PROC_SELF_CGROUP, root: Path = CGROUP_ROOT) -> CgroupReader | None:
    """A reader for the nearest cgroup (own or ancestor) with a memory limit.

    Falls back to the process's own cgroup when nothing up the tree is limited (its
    ``memory.current`` is still worth exporting), and to ``None`` without cgroup v2 memory.
    """
    own = own_cgroup(proc_cgroup, root)
    if own is None:
        return None
    top = root.resolve()
    path = own
    while True:
        reading = CgroupReader(path).read()
        if reading is not None and reading.limited:
            return CgroupReader(path)
        if path == top or top not in path.parents:
            return CgroupReader(own)
        path = path.parent


def _read_limit(path: Path) -> int | None:
    """An integer file, where ``max`` (and a missing limit file) means unlimited."""
    try:
        text = path.read_text().strip()
    except FileNotFoundError:
        return None
    return None if text == "max" else int(text)


def _read_stat(path: Path, key: str) -> int:
    try:
        text = path.read_text()
    except FileNotFoundError:
        return 0
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name == key:
            return int(value)
    return 0
