"""The demo's live progress line and its final summary, as plain text.

On a terminal the line is redrawn in place (``\\r`` and erase-to-end-of-line) a few times a
second; anywhere else (a pipe, CI, journald) a plain line is printed every few seconds, so logs
stay readable. Formatting is pure: it takes counts and returns strings.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Mapping
from typing import TextIO

from minions.demo.accounting import Counts, Ledger

#: What users call each injected fault (the ``NativeDemo`` method names it calls).
FAULT_NAMES = {"segfault": "segfault", "abort": "abort", "spin": "hang"}


class ProgressLine:
    """One status line: redrawn in place on a TTY, printed every ``interval_s`` otherwise."""

    def __init__(self, out: TextIO, tty: bool, interval_s: float = 2.0) -> None:
        self._out = out
        self._tty = tty
        self._interval_s = interval_s
        self._next = 0.0
        self._drawn = False

    def show(self, text: str, *, force: bool = False) -> None:
        now = time.monotonic()
        if self._tty:
            width = shutil.get_terminal_size((100, 24)).columns - 1
            self._out.write("\r" + text[:width] + "\x1b[K")
            self._drawn = True
        elif force or now >= self._next:
            self._out.write(text + "\n")
            self._next = now + self._interval_s
        self._out.flush()

    def close(self) -> None:
        """End the redrawn line so the next output starts on a fresh one."""
        if self._tty and self._drawn:
            self._out.write("\n")
            self._out.flush()
            self._drawn = False


def progress_text(
    elapsed_s: float, total: int | None, ledger: Ledger, counts: Counts, stopping: bool
) -> str:
    """One line, most important first (a narrow terminal cuts the end off)."""
    of = f"/{total}" if total is not None else ""
    rate = (ledger.completed + ledger.survived) / elapsed_s if elapsed_s > 0 else 0.0
    text = (
        f"{_clock(elapsed_s)} {ledger.emitted}{of} events: {ledger.completed} ok, "
        f"{ledger.survived} survived, {ledger.failed} failed | "
        f"{_total(counts.crashes)} crashes{_breakdown(counts.crashes, parens=True)}, "
        f"{int(counts.retries)} retried | {rate:.1f} wf/s"
    )
    if stopping:
        text += f" | stopping, {max(0, ledger.emitted - ledger.ended)} in flight"
    return text


def summary_lines(
    *,
    elapsed_s: float,
    ledger: Ledger,
    counts: Counts,
    faults: Mapping[str, int],
    workers: int,
    spares: int,
    interrupted: bool,
    log_path: str,
) -> list[str]:
    """The final report; every number comes from the metrics registry or the pipeline's count."""
    ended_ok = ledger.completed + ledger.survived
    calls = _total(counts.calls)
    injected = ", ".join(f"{faults[k]} {name}" for k, name in FAULT_NAMES.items() if faults.get(k))
    how = "interrupted after" if interrupted else "done in"
    return [
        f"minions demo: {how} {elapsed_s:.1f} s",
        f"  events      {ledger.emitted} emitted, {sum(faults.values())} with an injected fault"
        + (f" ({injected})" if injected else ""),
        f"  workflows   {ledger.completed} completed, {ledger.survived} survived their fault, "
        f"{ledger.failed} failed, {ledger.unfinished} unfinished",
        f"  crashes     {_total(counts.crashes)} worker crashes survived"
        + (f": {_breakdown(counts.crashes)}" if counts.crashes else "")
        + f" ({int(counts.restarts)} workers respawned)",
        f"  calls       {calls} worker calls: {_breakdown(counts.calls) or 'none'}; "
        f"{int(counts.retries)} retried on a fresh worker",
        f"  throughput  {ended_ok / elapsed_s if elapsed_s else 0:.1f} workflows/s, "
        f"{calls / elapsed_s if elapsed_s else 0:.1f} worker calls/s "
        f"({workers} workers + {spares} spare)",
        "  result      " + _verdict(ledger, log_path),
    ]


def _verdict(ledger: Ledger, log_path: str) -> str:
    if ledger.exit_code == 0:
        return "OK, nothing lost: every event ended as a completed workflow or a survived fault"
    problems = []
    if ledger.failed:
        problems.append(f"{ledger.failed} failed unexpectedly")
    if ledger.unfinished:
        problems.append(f"{ledger.unfinished} never finished")
    if ledger.overcounted:
        problems.append(f"{ledger.overcounted} more workflows ended than events were emitted")
    head = f"LOST {ledger.lost}" if ledger.lost else "INCONSISTENT"
    return f"{head}: {', '.join(problems)}; see {log_path}"


def _total(values: Mapping[str, float]) -> int:
    return int(sum(values.values()))


def _breakdown(values: Mapping[str, float], parens: bool = False) -> str:
    if not values:
        return ""
    text = ", ".join(f"{int(v)} {k}" for k, v in sorted(values.items(), key=lambda kv: -kv[1]))
    return f" ({text})" if parens else text


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes}m{secs:02d}s" if minutes else f"{seconds:4.1f}s"
