"""A process that drives one ``OrphanReaper`` by hand: ``python -m apps.reaper_probe``.

The test sends one command per line on stdin and reads one JSON reply per line on stdout, so the
reaper sweeps exactly when the test says, at the (fake) time it says, while its children are
real processes the test can watch and kill from outside:

- ``subreaper``: become a child subreaper (orphans of descendants come here); reply the role;
- ``orphan``: start a helper whose parent exits at once, so it is re-parented here; reply its pid;
- ``child claimed|unclaimed``: start a child we own, claimed or not; reply its pid;
- ``sweep <now>``: one sweep at monotonic time ``now``; reply the reaped and the watched count;
- ``claim <pid>`` / ``release <pid>``: as an owner would; reply the pid;
- ``wait <pid>``: reap our own child the way its owner would (``Popen.wait``); reply the code.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import signal
import subprocess
import sys

from minions.ops import reaper

_PR_SET_CHILD_SUBREAPER = 36


class _Quiet:
    def debug(self, *args: object, **kwargs: object) -> None: ...
    def info(self, *args: object, **kwargs: object) -> None: ...
    def warning(self, *args: object, **kwargs: object) -> None: ...


def main() -> None:
    now = [0.0]
    sweeper = reaper.OrphanReaper(_Quiet(), grace_s=2.0, clock=lambda: now[0])
    children: dict[int, subprocess.Popen[bytes]] = {}
    orphans: list[int] = []
    try:
        serve(sweeper, now, children, orphans)
    finally:  # whatever the test did not end, so no process outlives the probe
        for pidfd in orphans:  # a pidfd, not a pid: a reaped orphan's pid may be reused
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        for popen in children.values():
            popen.kill()
            popen.wait()


def serve(
    sweeper: reaper.OrphanReaper,
    now: list[float],
    children: dict[int, subprocess.Popen[bytes]],
    orphans: list[int],
) -> None:
    for line in sys.stdin:
        command, *args = line.split()
        reply: object
        if command == "subreaper":
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
            role = reaper.reaper_role()
            reply = role.name if role else None
        elif command == "orphan":
            shell = subprocess.run(
                ["sh", "-c", "sleep 3600 </dev/null >/dev/null 2>&1 & echo $!"],
                capture_output=True, check=True, text=True,
            )  # fmt: skip
            reply = int(shell.stdout)
            orphans.append(os.pidfd_open(reply))
        elif command == "child":
            popen = subprocess.Popen(["sleep", "3600"])
            if args[0] == "claimed":
                reaper.claim(popen.pid)
            children[popen.pid] = popen
            reply = popen.pid
        elif command == "sweep":
            now[0] = float(args[0])
            reaped = [[r.pid, r.exit_code, r.signal] for r in sweeper.sweep()]
            reply = {"reaped": reaped, "watched": sweeper.watched}
        elif command in ("claim", "release"):
            getattr(reaper, command)(int(args[0]))
            reply = int(args[0])
        elif command == "wait":
            pid = int(args[0])
            reply = children.pop(pid).wait()
            reaper.release(pid)
        else:
            reply = f"unknown command {command!r}"
        print(json.dumps(reply), flush=True)


if __name__ == "__main__":
    main()
