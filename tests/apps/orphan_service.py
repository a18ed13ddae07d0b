"""A worker service whose calls leave helper processes behind, as native libraries do."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

from minions.workers import expose
from native_demo.service import NativeDemo

HELPER = "sleep"  # the helpers' process name, which tests look for among Gru's children


class OrphanMaker(NativeDemo):
    """``NativeDemo`` (real native work and faults) plus a call that orphans a helper."""

    @expose
    def spawn_orphan(self) -> int:
        """Start a helper that outlives its parent: the shell that starts it exits at once, so
        the kernel re-parents the helper to the nearest child subreaper, or to PID 1 of the PID
        namespace. It lives until someone kills it. Returns its pid (in this namespace)."""
        shell = subprocess.run(
            ["sh", "-c", f"{HELPER} 3600 </dev/null >/dev/null 2>&1 & echo $!"],
            capture_output=True, check=True, text=True, timeout=10,
        )  # fmt: skip
        return int(shell.stdout)

    @expose
    def hold(self, effects: str, n: int) -> int:
        """A call that is busy until the test says so: note ``<n> holding <pid>`` in the app's
        effects file, then wait for ``release-<n>`` beside it. Returns this worker's pid."""
        path = Path(effects)
        fd = os.open(path, os.O_WRONLY | os.O_APPEND)
        try:
            os.write(fd, f"{n} holding {os.getpid()}\n".encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        release = path.with_name(f"release-{n}")
        while not release.exists():
            time.sleep(0.01)  # stands in for a long native call
        return os.getpid()
