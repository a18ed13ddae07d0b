"""The logger interface (``minions.interfaces.Logger``) and the loggers Minions ships.

Design note. The interface is the established one: subclass :class:`Logger` and implement
``async def log(self, level, msg, **kwargs)``; ``kwargs`` are structured fields. Gru never waits
for a log line, so what it calls is the synchronous :meth:`Logger.emit`, whose default hands the
record to ``log()`` in a task it keeps (and :meth:`Logger.flush` awaits at shutdown). The shipped
loggers override ``emit`` and write on the spot through :mod:`logging`.

Every record Gru logs carries ``orchestration`` and ``workflow`` fields (``"-"`` when not
applicable), so one grep finds a workflow's whole history. The default file logger writes one
line per record to a rotating ``minions.log``::

    ts=2026-01-01T12:00:00.123Z level=ERROR orchestration=3f2a... workflow=9c1e... msg="..."
"""

from __future__ import annotations

import asyncio
import logging
import logging.handlers
import os
import sys
import time
import traceback
from abc import ABC, abstractmethod
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypedDict

DEBUG, INFO, WARNING, ERROR, CRITICAL = 10, 20, 30, 40, 50
DEFAULT_LOGGER_NAME = "minions.gru"
_MAX_BYTES = 10 * 1024 * 1024
_BACKUPS = 5
_RECORD_ATTRS = frozenset(vars(logging.makeLogRecord({}))) | {"message", "asctime"}


class Extra(TypedDict):
    extra: dict[str, str]


def ids(orchestration: str = "-", workflow: str = "-") -> Extra:
    """``extra=`` keyword for a log call about one orchestration / workflow."""
    return {"extra": {"orchestration": orchestration, "workflow": workflow}}


class Logger(ABC):
    """Base class of loggers; subclass it and implement :meth:`log` to write your own."""

    def __init__(self, level: int = INFO) -> None:
        self._level = level

    @property
    def level(self) -> int:
        return getattr(self, "_level", INFO)

    @abstractmethod
    async def log(self, level: int, msg: str, **kwargs: Any) -> None:
        """Write one record; ``kwargs`` are its structured fields (``traceback`` included when
        the record is about an exception)."""

    async def startup(self) -> None:
        """Called once by ``Gru.create`` before anything is logged."""
        return None

    async def shutdown(self) -> None:
        """Called once, last, by ``Gru.shutdown``."""
        return None

    @property
    def reaches_console(self) -> bool:
        """True when this logger already writes to stderr/stdout, so Gru need not repeat its
        first failures there."""
        return False

    def emit(
        self,
        level: int,
        msg: str,
        exc_info: BaseException | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> None:
        """What Gru calls, on its loop: never blocks and never raises."""
        if level < self.level:
            return
        fields = dict(extra or {})
        if exc_info is not None:
            fields |= exception_fields(exc_info)
        try:
            task = asyncio.get_running_loop().create_task(self._deliver(level, msg, fields))
        except RuntimeError:  # no loop (interpreter exit): say it where someone can see it
            _fallback(msg, fields)
            return
        # Kept in the instance dict: subclasses written for the established API often skip
        # super().__init__(), so nothing here may rely on it having run.
        pending: set[asyncio.Task[None]] = self.__dict__.setdefault("_minions_pending", set())
        pending.add(task)
        task.add_done_callback(pending.discard)

    async def _deliver(self, level: int, msg: str, fields: dict[str, Any]) -> None:
        try:
            await self.log(level, msg, **fields)
        except Exception as exc:
            _fallback(f"{type(self).__name__}.log raised {exc!r}; record: {msg}", fields)

    async def flush(self, timeout_s: float = 5.0) -> None:
        """Wait (at most ``timeout_s``: a stuck sink must not hold shutdown) for every record
        handed to :meth:`log` so far."""
        pending = list(self.__dict__.get("_minions_pending", ()))
        if pending:
            await asyncio.wait(pending, timeout=timeout_s)

    # conveniences with the stdlib's shape, used throughout the runtime
    def debug(self, msg: str, *args: object, exc_info: BaseException | None = None,
              extra: Mapping[str, Any] | None = None) -> None:  # fmt: skip
        self.emit(DEBUG, msg % args if args else msg, exc_info, extra)

    def info(self, msg: str, *args: object, exc_info: BaseException | None = None,
             extra: Mapping[str, Any] | None = None) -> None:  # fmt: skip
        self.emit(INFO, msg % args if args else msg, exc_info, extra)

    def warning(self, msg: str, *args: object, exc_info: BaseException | None = None,
                extra: Mapping[str, Any] | None = None) -> None:  # fmt: skip
        self.emit(WARNING, msg % args if args else msg, exc_info, extra)

    def error(self, msg: str, *args: object, exc_info: BaseException | None = None,
              extra: Mapping[str, Any] | None = None) -> None:  # fmt: skip
        self.emit(ERROR, msg % args if args else msg, exc_info, extra)


LoggerLike = Logger  # the name this interface had before it was the established one


def exception_fields(exc: BaseException) -> dict[str, str]:
    return {
        "error_type": type(exc).__name__,
        "error_message": str(exc),
        "traceback": "".join(traceback.format_exception(exc)),
    }


def _fallback(msg: str, fields: Mapping[str, Any]) -> None:
    try:
        print(f"minions: {msg} {dict(fields)}", file=sys.stderr)
    except Exception:  # a closed stderr: nothing left to tell
        pass


class NoOpLogger(Logger):
    """Discards everything (``Gru.create(logger=None)``)."""

    def __init__(self, level: int = INFO) -> None:
        super().__init__(level)

    def emit(self, level: int, msg: str, exc_info: BaseException | None = None,
             extra: Mapping[str, Any] | None = None) -> None:  # fmt: skip
        return None

    async def log(self, level: int, msg: str, **kwargs: Any) -> None:
        return None


class LoggingLogger(Logger):
    """Writes through a :class:`logging.Logger` (``Gru.create(logger=logging.getLogger(...))``):
    fields become the record's ``extra``, an exception its ``exc_info``."""

    def __init__(self, logger: logging.Logger) -> None:
        super().__init__(logger.getEffectiveLevel())
        self.logger = logger

    @property
    def level(self) -> int:
        return self.logger.getEffectiveLevel()

    @property
    def reaches_console(self) -> bool:
        return _reaches_console(self.logger)

    def emit(self, level: int, msg: str, exc_info: BaseException | None = None,
             extra: Mapping[str, Any] | None = None) -> None:  # fmt: skip
        if not self.logger.isEnabledFor(level):
            return
        fields = {
            k if k not in _RECORD_ATTRS else f"field_{k}": v for k, v in (extra or {}).items()
        }
        fields.setdefault("orchestration", "-")
        fields.setdefault("workflow", "-")
        try:
            self.logger.log(level, "%s", msg, exc_info=exc_info, extra=fields)
        except Exception as exc:  # a broken handler must not take Gru down
            _fallback(f"logging failed ({exc!r}): {msg}", fields)

    async def log(self, level: int, msg: str, **kwargs: Any) -> None:
        self.emit(level, msg, None, kwargs)


def _reaches_console(logger: logging.Logger | None) -> bool:
    consoles = (sys.stderr, sys.stdout, sys.__stderr__, sys.__stdout__)
    while logger is not None:
        for handler in logger.handlers:
            if isinstance(handler, logging.StreamHandler) and handler.stream in consoles:
                return True
        logger = logger.parent if logger.propagate else None
    return False


class StructuredFormatter(logging.Formatter):
    """``key=value`` lines with UTC timestamps; the traceback, if any, follows indented."""

    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        message = record.getMessage().replace("\\", "\\\\").replace('"', '\\"')
        line = (
            f"ts={ts}.{int(record.msecs):03d}Z level={record.levelname} "
            f"orchestration={getattr(record, 'orchestration', '-')} "
            f"workflow={getattr(record, 'workflow', '-')} "
            f'msg="{message}"'
        )
        if record.exc_info:
            trace = self.formatException(record.exc_info)
            line += "\n" + "\n".join("    " + part for part in trace.splitlines())
        return line


class FileLogger(LoggingLogger):
    """The default: ``key=value`` lines in a rotating file (10 MB x 5), through the
    ``minions.gru`` logger so a launcher can add handlers (``minions run`` adds stderr).

    ``path`` defaults to ``minions.log``; the established ``log_dir``/``log_filename_prefix``/
    ``max_log_file_bytes``/``max_log_storage_bytes``/``stdout`` arguments are accepted too.
    """

    def __init__(
        self,
        path: str | os.PathLike[str] | None = None,
        *,
        level: int = INFO,
        log_dir: str | os.PathLike[str] | None = None,
        log_filename_prefix: str = "minions",
        max_log_file_bytes: int | None = _MAX_BYTES,
        max_log_storage_bytes: int | None = _MAX_BYTES * _BACKUPS,
        stdout: bool = False,
    ) -> None:
        if path is None:
            folder = Path(os.fspath(log_dir)) if log_dir is not None else Path()
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / f"{log_filename_prefix}.log"
        max_bytes = max_log_file_bytes or 0
        backups = (max_log_storage_bytes or 0) // max_bytes if max_bytes else 0
        self.path = Path(os.fspath(path))
        self.handler = logging.handlers.RotatingFileHandler(
            self.path, maxBytes=max_bytes, backupCount=max(backups, 1), encoding="utf-8"
        )
        self.handler.setFormatter(StructuredFormatter())
        logger = logging.getLogger(DEFAULT_LOGGER_NAME)
        if logger.level == logging.NOTSET:  # a level set by the launcher wins
            logger.setLevel(level)
        logger.propagate = False
        logger.addHandler(self.handler)
        self._handlers: list[logging.Handler] = [self.handler]
        if stdout:
            echo = logging.StreamHandler(sys.stdout)
            echo.setFormatter(StructuredFormatter())
            logger.addHandler(echo)
            self._handlers.append(echo)
        super().__init__(logger)

    async def shutdown(self) -> None:
        self.close()

    def close(self) -> None:
        """Detach and close this logger's handlers; idempotent."""
        for handler in self._handlers:
            self.logger.removeHandler(handler)
            handler.close()
        self._handlers = []
