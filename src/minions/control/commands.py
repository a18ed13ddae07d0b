"""The operator's ``minions`` subcommands: ``status``, ``pools restart``, ``orchestrations stop``
and ``init-store``.

Exit codes follow the CLI's contract: 0 done, 1 Gru did it but reported errors (a stop whose
shutdown hooks raised), 2 bad input or no Gru to talk to, always as one line on stderr.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

import msgspec

from minions.control import messages as m
from minions.control.client import ControlClient
from minions.control.endpoint import ControlUnavailable, find_socket

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
MiB = 1 << 20

Subcommands = Any  # argparse's _SubParsersAction is private


def add_commands(commands: Subcommands) -> None:
    """Register the subcommands on the ``minions`` parser (called by ``minions.cli``)."""
    status = commands.add_parser(
        "status",
        help="show a running Gru: orchestrations, workflows in flight, pools and workers",
        description="Ask a running Gru for its orchestrations, workflows in flight, each pool's "
        "workers (pid, RSS, calls, restarts), circuits and the memory level.",
    )
    _locate_options(status, timeout=10.0)
    status.add_argument("--json", action="store_true", help="the same, as one JSON object")
    status.set_defaults(handler=_cmd_status)

    pools = commands.add_parser("pools", help="act on a running Gru's worker pools")
    pool_commands = pools.add_subparsers(metavar="ACTION", required=True)
    restart = pool_commands.add_parser(
        "restart",
        help="replace every worker of pool NAME, one at a time, failing no call",
        description="Rolling replacement: each worker is retired only once a fresh one serves.",
    )
    restart.add_argument("name", metavar="NAME", help="the pool's name, as `minions status` shows")
    _locate_options(restart, timeout=300.0)
    restart.set_defaults(handler=_cmd_pools_restart)

    orchestrations = commands.add_parser("orchestrations", help="act on running orchestrations")
    orch_commands = orchestrations.add_subparsers(metavar="ACTION", required=True)
    stop = orch_commands.add_parser(
        "stop",
        help="stop orchestration ID (in-flight steps get the grace period)",
        description="Stop one orchestration; others keep running. Cancelled workflows keep "
        "their checkpoints and resume when it starts again.",
    )
    stop.add_argument("orchestration_id", metavar="ID", help="as `minions status` shows it")
    _locate_options(stop, timeout=120.0)
    stop.set_defaults(handler=_cmd_orchestrations_stop)

    init = commands.add_parser(
        "init-store",
        help="create an empty state database on purpose (also over an empty 0-byte file)",
        description="Create a new, empty state database at --db. A missing or zero-length "
        "file becomes a store; an existing store is left as it is; anything else is refused.",
    )
    init.add_argument("--db", default="minions.db", metavar="PATH",
                      help="state database (default: ./minions.db)")  # fmt: skip
    init.set_defaults(handler=_cmd_init_store)


def _locate_options(parser: argparse.ArgumentParser, *, timeout: float) -> None:
    where = parser.add_argument_group("finding Gru (first given wins)")
    where.add_argument("--socket", metavar="PATH", help="Gru's control socket")
    where.add_argument(
        "--runtime-dir",
        metavar="DIR",
        help="the unit's runtime directory (default: $RUNTIME_DIRECTORY)",
    )
    where.add_argument("--db", metavar="PATH",
                       help="Gru's state database; its control socket is recorded beside it "
                       "(default: ./minions.db)")  # fmt: skip
    parser.add_argument(
        "--timeout",
        type=_seconds,
        default=timeout,
        metavar="S",
        help=f"seconds to wait for Gru's answer (default: {timeout:g})",
    )


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0 < value <= 86400:
        raise argparse.ArgumentTypeError(f"{text} is not between 0 and 86400 seconds")
    return value


def _client(ns: argparse.Namespace) -> ControlClient:
    path = find_socket(
        socket_path=ns.socket, runtime_dir=ns.runtime_dir, db=ns.db, environ=os.environ
    )
    return ControlClient(path, timeout_s=ns.timeout)


def _fail(command: str, reason: str) -> int:
    print(f"minions {command}: {' '.join(reason.split())}", file=sys.stderr)
    return EXIT_USAGE


# --- minions status ----------------------------------------------------------------------------


def _cmd_status(ns: argparse.Namespace) -> int:
    try:
        reply = _client(ns).status()
    except ControlUnavailable as exc:
        return _fail("status", str(exc))
    if isinstance(reply, m.Refused):
        return _fail("status", reply.reason)
    if ns.json:
        print(msgspec.json.encode(reply).decode())
    else:
        print("\n".join(status_lines(reply, now=time.time())))
    return EXIT_OK


def status_lines(s: m.Status, now: float) -> list[str]:
    """The human form of ``minions status``: a head line, then a table per section."""
    metrics = s.metrics_url or "off"
    lines = [
        f"gru pid {s.pid}: {s.state.replace('_', ' ')} for {_age(now - s.started_at)}, memory "
        f"{s.memory_level}{', pipelines paused' if s.pipelines_paused else ''}, "
        f"{'durable' if s.durable else 'stateless'}, metrics {metrics}",
        f"{len(s.orchestrations)} orchestration{'s' * (len(s.orchestrations) != 1)}, "
        f"{s.workflows_in_flight} workflow{'s' * (s.workflows_in_flight != 1)} in flight",
    ]
    if s.orchestrations:
        rows: list[tuple[str, ...]] = [
            (
                "ORCHESTRATION",
                "PIPELINE",
                "MINION",
                "STATE",
                "IN FLIGHT",
                "SUCCEEDED",
                "FAILED",
                "ABORTED",
            )
        ]
        rows += [
            (o.orchestration_id, o.pipeline, o.minion, o.state.value,
             f"{o.in_flight}/{o.max_in_flight}", str(o.succeeded), str(o.failed), str(o.aborted))
            for o in s.orchestrations
        ]  # fmt: skip
        lines += ["", *_table(rows)]
    for p in s.pools:
        lines += [
            "",
            f"pool {p.name}: {p.state}, circuit {p.circuit}, {p.restarts} restart"
            f"{'s' * (p.restarts != 1)}, {p.in_flight} in flight, {p.queue_depth} queued, "
            f"memory {p.memory_level}",
        ]
        workers: list[tuple[str, ...]] = [
            ("  WORKER", "HOST", "PID", "ROLE", "PHASE", "RSS", "CALLS", "IN FLIGHT")
        ]
        workers += [
            (f"  {w.worker_id}", w.host or "-", str(w.pid), w.role, w.phase,
             f"{w.rss_bytes / MiB:.1f} MiB" if not w.host else "-", str(w.calls_served),
             str(w.in_flight))
            for w in p.workers
        ]  # fmt: skip
        lines += _table(workers)
        if p.listen:
            lines += _host_lines(p)
    return lines


def _host_lines(p: m.PoolRow) -> list[str]:
    lines = [
        f"  worker hosts connect to {p.listen}: {len(p.hosts)} connected, {p.hosts_lost} lost "
        "since start"
    ]
    if p.hosts:
        rows: list[tuple[str, ...]] = [
            ("  HOST", "PID", "MACHINE", "WORKERS", "CONNECTED", "LAST HEARD")
        ]
        rows += [
            (f"  {h.name}", str(h.pid), h.hostname or "?", str(h.workers), _age(h.connected_s),
             f"{h.silent_s:.1f}s ago")
            for h in p.hosts
        ]  # fmt: skip
        lines += _table(rows)
    return lines


def _table(rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows
    ]


def _age(seconds: float) -> str:
    s = max(0, int(seconds))
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


# --- minions pools restart / orchestrations stop ---------------------------------------------


def _cmd_pools_restart(ns: argparse.Namespace) -> int:
    try:
        reply = _client(ns).restart_pool(ns.name, ns.timeout)
    except ControlUnavailable as exc:
        return _fail("pools restart", str(exc))
    if isinstance(reply, m.Refused):
        return _fail("pools restart", reply.reason)
    print(f"pool {reply.pool}: replaced {reply.replaced} worker{'s' * (reply.replaced != 1)}")
    return EXIT_OK


def _cmd_orchestrations_stop(ns: argparse.Namespace) -> int:
    try:
        reply = _client(ns).stop_orchestration(ns.orchestration_id, ns.timeout)
    except ControlUnavailable as exc:
        return _fail("orchestrations stop", str(exc))
    if isinstance(reply, m.Refused):
        return _fail("orchestrations stop", reply.reason)
    result = reply.result
    if not result.success and not result.orchestration_id:  # nothing was running by that id
        return _fail("orchestrations stop", result.reason or "no such orchestration")
    print(
        f"orchestration {result.orchestration_id} stopped ({result.cancelled} workflow"
        f"{'s' * (result.cancelled != 1)} cancelled, checkpoints kept)"
    )
    if not result.success:
        print(f"minions orchestrations stop: with errors: {result.reason}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


# --- minions init-store ------------------------------------------------------------------------


def _cmd_init_store(ns: argparse.Namespace) -> int:
    from minions.errors import StateStoreError
    from minions.runtime.sqlite_open import initialise

    path = Path(ns.db)
    try:
        created = initialise(path)
    except StateStoreError as exc:
        return _fail("init-store", str(exc))
    if created:
        print(f"initialised an empty state database at {path}")
    else:
        print(f"{path} is already a Minions state database; left as it is")
    return EXIT_OK
