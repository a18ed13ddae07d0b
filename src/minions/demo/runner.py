"""Runs one demo: a stateless Gru, the demo orchestration, ``/metrics``, progress, the summary.

Design note. The demo writes nothing into the user's directory: Gru is stateless (an event that
was never checkpointed cannot be resumed, so "lost" is measured within the run) and the log goes
to a fresh temporary directory, removed after a clean run and kept (its path printed) when
something was lost. Gru owns SIGINT/SIGTERM as it does in production: the first one starts a
graceful shutdown, in-flight workflows finish, and the summary is printed from what happened.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

from minions import Gru, GruState
from minions.demo.accounting import Counts, read_counts
from minions.demo.app import DemoMinion, DemoPipeline, DemoPool, DemoRun, DemoSettings, activate
from minions.demo.progress import FAULT_NAMES, ProgressLine, progress_text, summary_lines
from minions.runtime.composition import orchestration_id
from minions.runtime.log import StructuredFormatter

_TICK_S = 0.2
_GRACE_S = 10.0


async def run_demo(settings: DemoSettings, out: TextIO, *, tty: bool) -> int:
    """Run the demo to the end (or to the first SIGINT/SIGTERM); return the exit code."""
    workdir = Path(tempfile.mkdtemp(prefix="minions-demo-"))
    log_path = workdir / "minions.log"
    run = DemoRun(settings)
    with _logging_to(log_path) as logger, activate(run):
        _print_header(settings, out, log_path)
        code = await _drive(run, logger, out, tty, log_path)
    if code == 0:
        shutil.rmtree(workdir, ignore_errors=True)
    return code


async def _drive(
    run: DemoRun, logger: logging.Logger, out: TextIO, tty: bool, log_path: Path
) -> int:
    settings = run.settings
    oid = orchestration_id(DemoPipeline, DemoMinion, None)
    base = read_counts(oid, DemoPool.__name__)
    gru = await Gru.create(
        state_store=None, logger=logger, metrics_host=settings.metrics_host,
        metrics_port=settings.metrics_port, max_in_flight=settings.max_in_flight,
        grace_period_s=_GRACE_S,
    )  # fmt: skip
    try:
        _print_metrics(gru, settings, out)
        started = await gru.start_orchestration(DemoPipeline, DemoMinion)
        if not started.success:
            out.write(f"minions demo: the orchestration did not start: {started.reason}\n")
            return 1
        t0 = time.monotonic()
        interrupted = await _watch(gru, run, oid, base, ProgressLine(out, tty), t0)
        elapsed = time.monotonic() - t0
    finally:
        shutdown = await gru.shutdown()
    counts = read_counts(oid, DemoPool.__name__) - base
    ledger = counts.ledger(run.emitted)
    for line in summary_lines(
        elapsed_s=elapsed, ledger=ledger, counts=counts, faults=run.faults,
        workers=settings.workers, spares=DemoPool.spare_workers, interrupted=interrupted,
        log_path=str(log_path),
    ):  # fmt: skip
        out.write(line + "\n")
    if not shutdown.success:
        out.write(f"  shutdown    errors: {shutdown.errors}; see {log_path}\n")
        return 1
    return ledger.exit_code


async def _watch(
    gru: Gru, run: DemoRun, oid: str, base: Counts, line: ProgressLine, t0: float
) -> bool:
    """Redraw progress until every event has ended or Gru was shut down by a signal; return
    whether it was interrupted (the latter)."""
    closed = asyncio.ensure_future(gru.wait_closed())
    try:
        while True:
            await asyncio.wait({closed}, timeout=_TICK_S)
            counts = read_counts(oid, DemoPool.__name__) - base
            ledger = counts.ledger(run.emitted)
            stopping = gru.state is not GruState.RUNNING
            done = closed.done() or (run.exhausted and ledger.ended >= run.emitted)
            line.show(
                progress_text(time.monotonic() - t0, run.settings.events, ledger, counts, stopping),
                force=done,
            )
            if done:
                return closed.done()
    finally:
        line.close()
        closed.cancel()


def _print_header(settings: DemoSettings, out: TextIO, log_path: Path) -> None:
    events = "events until Ctrl-C" if settings.events is None else f"{settings.events} events"
    kinds = ", ".join(FAULT_NAMES.values())
    out.write(
        f"minions demo: {events}, {settings.fault_rate:.0%} with an injected native fault "
        f"({kinds}), {settings.workers} workers + {DemoPool.spare_workers} spare\n"
        f"  log         {log_path}\n"
    )
    out.flush()


def _print_metrics(gru: Gru, settings: DemoSettings, out: TextIO) -> None:
    """Gru serves ``/metrics`` as in production; a busy port costs the endpoint, not the demo."""
    url = gru.status().metrics_url
    if url is None:
        where = f"{settings.metrics_host}:{settings.metrics_port}"
        url = f"not served: {where} could not be bound (in use?), the demo goes on without it"
    out.write(f"  metrics     {url}\n")
    out.flush()


@contextlib.contextmanager
def _logging_to(path: Path) -> Iterator[logging.Logger]:
    """Send every ``minions.*`` record to ``path`` only, so the terminal shows just the demo."""
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(StructuredFormatter())
    package = logging.getLogger("minions")
    saved = (package.level, package.propagate)
    package.addHandler(handler)
    package.setLevel(logging.INFO)
    package.propagate = False
    try:
        yield logging.getLogger("minions.demo")
    finally:
        package.removeHandler(handler)
        handler.close()
        package.setLevel(saved[0])
        package.propagate = saved[1]
