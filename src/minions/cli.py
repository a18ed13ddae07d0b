"""The ``minions`` command: ``demo``, ``run``, ``workflows``, ``stamp``, ``doctor``, ``worker``, and
the operator's commands of :mod:`minions.control.commands` (``status``, ``pools``,
``orchestrations``, ``init-store``).

Design note. Exit codes are part of the contract with systemd: ``0`` a clean run or shutdown,
``1`` a failure at run time (the launch function raised, something was lost), ``2`` a
configuration error (a bad target, option or environment variable, a missing database), which
the units list in ``RestartPreventExitStatus`` because restarting cannot fix it. Every
configuration error is one line on stderr and never a traceback.

``minions run`` is what ``ExecStart`` runs. It imports the launch coroutine, awaits it (it
creates a Gru and starts orchestrations), then waits until Gru has shut down (Gru's own
SIGTERM/SIGINT handler does that gracefully) and exits with the outcome. It sends no systemd
notifications itself: Gru is their one sender, whoever launched it (``READY=1`` as
``Gru.create`` returns, ``STATUS=``, the watchdog, ``STOPPING=1`` as shutdown begins; see
``minions.runtime.operations``). What the CLI adds is the environment (``MINIONS_LOG_LEVEL``,
logging to stderr in journald's format under systemd) and one-line configuration errors.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import importlib.util
import inspect
import json
import logging
import os
import signal
import sys
import time
import traceback
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NoReturn

from minions import stamping
from minions._importing import ImportTargetError, split_target
from minions.runtime.log import StructuredFormatter

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

log = logging.getLogger("minions.cli")

LaunchFn = Callable[[], Awaitable[Any]]


class UsageError(Exception):
    """A configuration error: printed as one line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    """argparse, but errors are one line (no usage dump) and raise instead of exiting."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{self.prog}: {message} (see `{self.prog} --help`)")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``minions`` console script and of ``python -m minions``."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["worker"]:  # the pool's spawn path: no parsing, no logging setup here
        from minions.ipc import worker

        return worker.main(args[1:])
    try:
        ns = build_parser().parse_args(args)
        handler: Callable[[argparse.Namespace], int] = ns.handler
        return handler(ns)
    except UsageError as exc:
        print(_one_line(str(exc)), file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:  # Ctrl-C before Gru installed its handlers, or after it closed
        print("minions: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # `minions demo | head`: the reader left; exit quietly like cat
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_FAILED


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="minions",
        description="Event-driven Python workflows that must not die.",
        epilog="Exit codes: 0 ok, 1 failed at run time, 2 configuration error.",
    )
    commands = parser.add_subparsers(title="commands", metavar="COMMAND", required=True)
    _add_demo(commands)
    _add_run(commands)
    _add_workflows(commands)
    stamping.add_commands(commands)  # stamp component-ids, doctor ids
    from minions.control.commands import add_commands  # status, pools, orchestrations, init-store

    add_commands(commands)
    from minions.remote import commands as remote  # worker-host, keys generate

    remote.add_commands(commands)
    commands.add_parser(
        "worker",
        help="serve a WorkerService (spawned by worker pools; not for interactive use)",
        add_help=False,
    )
    return parser


Subcommands = Any  # argparse's _SubParsersAction is private


def _add_demo(commands: Subcommands) -> None:
    demo = commands.add_parser(
        "demo",
        help="watch workflows survive real segfaults, aborts and hangs (no setup needed)",
        description="Run a few hundred workflows whose steps call a real C extension in worker "
        "processes, some of them crashing on purpose; exit 1 if any event was lost.",
    )
    count = demo.add_mutually_exclusive_group()
    count.add_argument("--events", type=_int_in(1, 10_000_000), default=300, metavar="N",
                       help="events to process (default: 300)")  # fmt: skip
    count.add_argument("--forever", action="store_true",
                       help="keep producing events until Ctrl-C or SIGTERM")  # fmt: skip
    demo.add_argument("--fault-rate", type=_rate, default=0.03, metavar="F",
                      help="fraction of events that segfault, abort or hang, 0..1 "
                      "(default: 0.03)")  # fmt: skip
    demo.add_argument("--workers", type=_int_in(1, 64), default=2, metavar="N",
                      help="worker processes, plus one spare (default: 2)")  # fmt: skip
    demo.add_argument("--metrics-port", type=_int_in(0, 65535), default=8081, metavar="P",
                      help="serve Prometheus metrics on this port, 0 for any free one "
                      "(default: 8081; a busy port is reported and skipped)")  # fmt: skip
    demo.add_argument("--seed", type=int, default=0, help="seed of the work sizes (default: 0)")
    demo.set_defaults(handler=_cmd_demo)


def _add_run(commands: Subcommands) -> None:
    run = commands.add_parser(
        "run",
        help="run a launch coroutine under Gru (what systemd's ExecStart uses)",
        description="Import TARGET and await it; it creates a Gru and starts orchestrations. "
        "Then serve until SIGTERM/SIGINT, speaking systemd's notify protocol. Environment: "
        "MINIONS_LOG_LEVEL, MINIONS_METRICS_HOST, MINIONS_METRICS_PORT.",
    )
    run.add_argument("target", metavar="TARGET",
                     help="package.module:function, path/to/app.py (its `main`) or "
                     "path/to/app.py:function; an `async def` taking no arguments")  # fmt: skip
    run.set_defaults(handler=_cmd_run)


def _add_workflows(commands: Subcommands) -> None:
    workflows = commands.add_parser(
        "workflows",
        help="list saved unfinished workflows (safe while Gru runs)",
        description="List the unfinished workflows checkpointed in a state database, oldest "
        "first. Read-only: safe while a Gru owns the database.",
    )
    workflows.add_argument("--db", default="minions.db", metavar="PATH",
                           help="state database (default: ./minions.db)")  # fmt: skip
    workflows.add_argument("--json", action="store_true", help="one JSON object per line")
    workflows.set_defaults(handler=_cmd_workflows)


# --- option types -------------------------------------------------------------------------


def _int_in(low: int, high: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{value} is not between {low} and {high}")
        return value

    return parse


def _rate(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0.0 <= value <= 1.0:  # also rejects nan
        raise argparse.ArgumentTypeError(f"{text} is not between 0 and 1")
    return value


def _one_line(text: str) -> str:
    return " ".join(text.split())


# --- minions demo -------------------------------------------------------------------------


def _cmd_demo(ns: argparse.Namespace) -> int:
    from minions.demo import DemoSettings, run_demo

    settings = DemoSettings(
        events=None if ns.forever else ns.events,
        fault_rate=ns.fault_rate,
        workers=ns.workers,
        metrics_port=ns.metrics_port,
        seed=ns.seed,
    )
    return asyncio.run(run_demo(settings, sys.stdout, tty=sys.stdout.isatty()))


# --- minions workflows --------------------------------------------------------------------


def _cmd_workflows(ns: argparse.Namespace) -> int:
    from minions.errors import StateStoreError
    from minions.runtime.state import read_workflows

    try:
        records = read_workflows(ns.db)
    except StateStoreError as exc:
        raise UsageError(f"minions workflows: {exc}") from None
    now = time.time()
    if ns.json:
        for r in records:
            entry = {
                "orchestration": r.orchestration_id, "workflow": r.workflow_id,
                "next_step": r.step_index, "created_at": r.created_at,
                "updated_at": r.updated_at,
            }  # fmt: skip
            print(json.dumps(entry))
        return EXIT_OK
    if not records:
        print(f"no unfinished workflows in {ns.db}")
        return EXIT_OK
    rows = [("ORCHESTRATION", "WORKFLOW", "NEXT STEP", "AGE", "LAST CHECKPOINT")]
    rows += [
        (r.orchestration_id, r.workflow_id, str(r.step_index),
         _age(now - r.created_at), _age(now - r.updated_at) + " ago")
        for r in records
    ]  # fmt: skip
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    print(f"{len(records)} unfinished workflow{'s' * (len(records) != 1)} in {ns.db}")
    return EXIT_OK


def _age(seconds: float) -> str:
    s = max(0, int(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


# --- minions run --------------------------------------------------------------------------

_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def _cmd_run(ns: argparse.Namespace) -> int:
    level = _run_environment(os.environ)
    _configure_logging(level, journald=_stderr_is_journal(os.environ))
    if os.getpid() == 1:  # the kernel ignores signals PID 1 has no handler for
        signal.signal(signal.SIGTERM, _exit_on_sigterm)
    launch = load_target(ns.target)
    return asyncio.run(_supervise(launch, ns.target))


def _exit_on_sigterm(signum: int, _frame: object) -> None:
    """SIGTERM to PID 1 (a container without an init) before Gru has installed its graceful
    handler, which replaces this one: do what the kernel does for any other process, exit."""
    raise SystemExit(128 + signum)


def _run_environment(environ: Mapping[str, str]) -> int:
    """Validate the ``MINIONS_*`` settings ``minions run`` owns; return the log level."""
    level = environ.get("MINIONS_LOG_LEVEL", "INFO").strip().upper() or "INFO"
    if level not in _LEVELS:
        raise UsageError(
            f"minions run: MINIONS_LOG_LEVEL={environ['MINIONS_LOG_LEVEL']!r} is not one of "
            + ", ".join(_LEVELS)
        )
    port = environ.get("MINIONS_METRICS_PORT", "").strip()
    if port and not (port.isdigit() and 0 <= int(port) <= 65535):
        raise UsageError(f"minions run: MINIONS_METRICS_PORT={port!r} is not a port (0..65535)")
    if "MINIONS_METRICS_HOST" in environ and not environ["MINIONS_METRICS_HOST"].strip():
        raise UsageError("minions run: MINIONS_METRICS_HOST is set but empty")
    return logging.getLevelName(level)


def _stderr_is_journal(environ: Mapping[str, str]) -> bool:
    """``$JOURNAL_STREAM`` names stderr's device:inode when systemd connected it to journald
    (checked, because a child of the service inherits the variable with other streams)."""
    try:
        device, inode = (int(part) for part in environ.get("JOURNAL_STREAM", "").split(":"))
        stat = os.fstat(sys.stderr.fileno())
    except (ValueError, OSError, AttributeError):
        return False
    return (stat.st_dev, stat.st_ino) == (device, inode)


class _JournalFormatter(StructuredFormatter):
    """journald stamps each line itself and reads the level from a ``<N>`` syslog prefix."""

    _PRIORITY = {"DEBUG": 7, "INFO": 6, "WARNING": 4, "ERROR": 3, "CRITICAL": 2}

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record).split(" ", 1)[1]  # drop ts=...
        return f"<{self._PRIORITY.get(record.levelname, 6)}>{line}"


def _configure_logging(level: int, *, journald: bool) -> None:
    """Everything to stderr (the journal under systemd), in Gru's key=value format.

    Gru's default logger (``minions.gru``) writes its file and does not propagate, so it gets
    the stderr handler directly; the root logger gets it unless the application set one up.
    """
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_JournalFormatter() if journald else StructuredFormatter())
    handler.setLevel(level)
    root = logging.getLogger()
    if not root.handlers:
        root.addHandler(handler)
        root.setLevel(level)
    logging.getLogger("minions").setLevel(level)
    logging.getLogger("minions.gru").addHandler(handler)


def load_target(spec: str) -> LaunchFn:
    """Import ``module:function``, ``file.py`` (its ``main``) or ``file.py:function``.

    Raises :class:`UsageError` with one line for anything that is not an importable ``async
    def`` taking no arguments.
    """
    where, sep, name = spec.rpartition(":")
    if not sep:
        where, name = spec, "main"
    if not where or not name:
        raise UsageError(f"minions run: {spec!r} is not module:function or path/to/file.py")
    is_file = where.endswith(".py") or os.sep in where
    if not is_file:  # the one "module:attr" grammar Gru and worker services use too
        try:
            where, _ = split_target(f"{where}:{name}", what="launch target")
        except ImportTargetError:
            raise UsageError(
                f"minions run: {spec!r} is not module:function or path/to/file.py"
            ) from None
    module = _import_file(where) if is_file else _import_module(where)
    obj: Any = module
    try:
        for part in name.split("."):
            obj = getattr(obj, part)
    except AttributeError:
        raise UsageError(f"minions run: {where} has no {name!r}") from None
    if not inspect.iscoroutinefunction(obj):
        raise UsageError(
            f"minions run: {spec} is not an async function; define `async def {name}() -> None`"
        )
    try:
        inspect.signature(obj).bind()
    except TypeError:
        raise UsageError(f"minions run: {spec} must be callable with no arguments") from None
    return obj


def _import_module(name: str) -> Any:
    # Console scripts do not put the working directory on sys.path; `python -m` does, and
    # `minions run app.launch:main` from a checkout should find `app` the same way.
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name and (name == exc.name or name.startswith(exc.name + ".")):
            raise UsageError(
                f"minions run: no module named {exc.name!r} (is it installed in this "
                "environment, or on PYTHONPATH?)"
            ) from None
        raise UsageError(f"minions run: importing {name} failed: {_describe(exc)}") from None
    except Exception as exc:
        raise UsageError(f"minions run: importing {name} failed: {_describe(exc)}") from None


def _import_file(where: str) -> Any:
    path = Path(where).resolve()
    if not path.is_file():
        raise UsageError(f"minions run: no such file: {where}")
    # The file's stem becomes its module name, so classes defined in it have a stable import
    # path (Gru's orchestration ids) that worker processes can import too.
    name = path.stem if path.stem.isidentifier() else "__minions_launch__"
    sys.path.insert(0, str(path.parent))
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise UsageError(f"minions run: cannot import {where} as Python source")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        del sys.modules[name]
        raise UsageError(f"minions run: importing {where} failed: {_describe(exc)}") from None
    return module


def _describe(exc: BaseException) -> str:
    """``Type: message (file:line)``: enough to find a bug without a traceback."""
    if isinstance(exc, SyntaxError):
        return f"SyntaxError: {exc.msg} ({exc.filename}:{exc.lineno})"
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if "<frozen" not in f.filename]
    where = f" ({frames[-1].filename}:{frames[-1].lineno})" if frames else ""
    return f"{type(exc).__name__}: {exc}{where}"


async def _supervise(launch: LaunchFn, target: str) -> int:
    """Await the launch function, then serve until Gru has shut down; return the exit code."""
    try:
        returned = await launch()
    except Exception as exc:
        log.error("%s raised, shutting down: %r", target, exc, exc_info=exc)
        gru = _live_gru()
        if gru is not None:
            await gru.shutdown()
        return EXIT_FAILED
    gru = returned if _is_gru(returned) else _live_gru()
    if gru is None:
        log.info("%s returned and no Gru is running: nothing to supervise", target)
        return EXIT_OK
    running = len(gru.status().orchestrations)
    if not running:
        log.warning("%s returned without starting an orchestration", target)
    log.info("%s returned, %d orchestration(s) running; serving until SIGTERM", target, running)
    await gru.wait_closed()  # Gru's SIGTERM/SIGINT handler, or the application, shut it down
    result = await gru.shutdown()  # idempotent: the outcome of the shutdown that just ended
    if not result.success:
        log.error("shutdown finished with errors: %s", result.errors)
        return EXIT_FAILED
    return EXIT_OK


def _live_gru() -> Any:
    """The process's running Gru, if the launch function created one and left it running."""
    from minions import GruState
    from minions.runtime import gru as gru_module

    current = getattr(gru_module.Gru, "current", None)
    gru = current() if callable(current) else getattr(gru_module, "_live_gru", None)
    return gru if gru is not None and gru.state is not GruState.CLOSED else None


def _is_gru(value: object) -> bool:
    from minions import Gru

    return isinstance(value, Gru)
