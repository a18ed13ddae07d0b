"""Reading the memory accounting of Gru's cgroup: what systemd's MemoryHigh/MemoryMax enforce.

Design note. Under systemd every process of the unit (Gru and its workers) lives in the unit's
cgroup, and the kernel enforces its limits on the *sum*. So this is the one measure that predicts
what the kernel will do; the memory monitor compares it with thresholds derived from those very
limits.

Both hierarchies are read, because hybrid hosts (cgroup v2 mounted, but the memory controller
still on v1) remain common on container hosts:

- **v2** (``0::/path`` in ``/proc/self/cgroup``): ``memory.current``, ``memory.high`` (soft:
  reclaim and throttle), ``memory.max`` (hard: OOM kill), ``inactive_file`` from ``memory.stat``.
- **v1** (``N:memory:/path``, under the ``memory`` mount): ``memory.usage_in_bytes``,
  ``memory.soft_limit_in_bytes`` (soft), ``memory.limit_in_bytes`` (hard) and
  ``total_inactive_file`` (hierarchical, like the usage). v1 has no "max": an unlimited value is
  the page counter's maximum rounded to pages, about 2**63, which is read as no limit.

v2 wins when the process's v2 cgroup has the memory controller. The limit that binds may sit on
an ancestor (a slice, or a container's root) rather than on the process's own cgroup, so
:func:`locate` walks up to the nearest cgroup that has a limit. Limits are re-read on every
sample because ``systemctl set-property`` can change them at run time. The paths are parameters
so tests can point them at a fake tree.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

PROC_SELF_CGROUP = Path("/proc/self/cgroup")
CGROUP_ROOT = Path("/sys/fs/cgroup")

# v1 reports "no limit" as PAGE_COUNTER_MAX pages in bytes (0x7FFFFFFFFFFFF000 with 4 KiB pages,
# a little less with larger pages); no real limit comes near 4 EiB.
_V1_UNLIMITED = 1 << 62


@dataclass(frozen=True, slots=True)
class Layout:
    """Which files of one hierarchy hold usage, soft and hard limit, and reclaimable cache."""

    version: int
    usage: str
    soft: str
    hard: str
    inactive_key: str


V2 = Layout(2, "memory.current", "memory.high", "memory.max", "inactive_file")
V1 = Layout(
    1,
    "memory.usage_in_bytes",
    "memory.soft_limit_in_bytes",
    "memory.limit_in_bytes",
    "total_inactive_file",
)


@dataclass(frozen=True, slots=True)
class CgroupMemory:
    """One reading of a cgroup's memory files. A limit of ``None`` means unlimited.

    ``high`` is the soft limit (v2 ``memory.high``, v1 ``memory.soft_limit_in_bytes``) and
    ``max`` the hard one (v2 ``memory.max``, v1 ``memory.limit_in_bytes``); ``current`` is the
    usage of the cgroup and everything below it.
    """

    path: Path
    current: int
    high: int | None
    max: int | None
    inactive_file: int = 0
    version: int = 2

    @property
    def working_set(self) -> int:
        """Usage minus inactive page cache, which the kernel reclaims before it throttles or
        kills anyone; the same "working set" container tooling alerts on."""
        return max(0, self.current - self.inactive_file)

    @property
    def limited(self) -> bool:
        return self.high is not None or self.max is not None


class CgroupReader:
    """Reads the usage, limits and ``memory.stat`` of one cgroup directory, each call."""

    def __init__(self, path: Path, layout: Layout = V2) -> None:
        self.path = path
        self.layout = layout

    def read(self) -> CgroupMemory | None:
        """The current reading, or ``None`` if the cgroup vanished or its files are unreadable."""
        lay = self.layout
        try:
            current = _read_bytes(self.path / lay.usage)
            if current is None:
                return None
            return CgroupMemory(
                path=self.path,
                current=current,
                high=_read_limit(self.path / lay.soft),
                max=_read_limit(self.path / lay.hard),
                inactive_file=_read_stat(self.path / "memory.stat", lay.inactive_key),
                version=lay.version,
            )
        except (OSError, ValueError):
            return None


def own_cgroup(proc_cgroup: Path = PROC_SELF_CGROUP, root: Path = CGROUP_ROOT) -> Path | None:
    """The directory of this process's cgroup v2 (the ``0::/path`` line), if it has the memory
    controller (a ``memory.current`` file)."""
    return _own(proc_cgroup, root, V2)


def own_cgroup_v1(proc_cgroup: Path = PROC_SELF_CGROUP, root: Path = CGROUP_ROOT) -> Path | None:
    """The directory of this process's v1 memory cgroup (``N:memory:/path`` under
    ``root/memory``), if it is readable."""
    return _own(proc_cgroup, root / "memory", V1)


def locate(proc_cgroup: Path = PROC_SELF_CGROUP, root: Path = CGROUP_ROOT) -> CgroupReader | None:
    """A reader for the nearest cgroup (own or ancestor) with a memory limit, v2 before v1.

    Falls back to the process's own cgroup when nothing up the tree is limited (its usage is
    still worth exporting), and to ``None`` when neither hierarchy's memory files are readable.
    """
    own = own_cgroup(proc_cgroup, root)
    if own is not None:
        return _nearest_limited(own, root, V2)
    own = own_cgroup_v1(proc_cgroup, root)
    if own is not None:
        return _nearest_limited(own, root / "memory", V1)
    return None


def _own(proc_cgroup: Path, mount: Path, layout: Layout) -> Path | None:
    try:
        text = proc_cgroup.read_text()
    except OSError:
        return None
    for line in text.splitlines():
        rel = _relative_path(line, layout)
        if rel is None:
            continue
        if rel.endswith(" (deleted)"):
            return None
        path = (mount / rel.lstrip("/")).resolve()
        top = mount.resolve()
        if path != top and top not in path.parents:
            return None  # ".." games: stay inside the cgroup mount
        return path if (path / layout.usage).is_file() else None
    return None


def _relative_path(line: str, layout: Layout) -> str | None:
    """The path of a ``hierarchy-id:controllers:path`` line, if it is the layout's hierarchy."""
    hierarchy, sep, rest = line.partition(":")
    controllers, sep2, path = rest.partition(":")
    if not (sep and sep2):
        return None
    if layout.version == 2:
        return path.strip() if hierarchy == "0" and controllers == "" else None
    return path.strip() if "memory" in controllers.split(",") else None


def _nearest_limited(own: Path, mount: Path, layout: Layout) -> CgroupReader:
    top = mount.resolve()
    path = own
    while True:
        reading = CgroupReader(path, layout).read()
        if reading is not None and reading.limited:
            return CgroupReader(path, layout)
        if path == top or top not in path.parents:
            return CgroupReader(own, layout)
        path = path.parent


def _read_bytes(path: Path) -> int | None:
    """An integer file; ``None`` if it does not exist."""
    try:
        return int(path.read_text().strip())
    except FileNotFoundError:
        return None


def _read_limit(path: Path) -> int | None:
    """A limit file, where v2's ``max``, v1's near-2**63 and a missing file mean unlimited."""
    try:
        text = path.read_text().strip()
    except FileNotFoundError:
        return None
    if text == "max":
        return None
    value = int(text)
    return None if value >= _V1_UNLIMITED else value


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
