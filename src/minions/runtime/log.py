"""Gru's default structured logger, and the protocol an injected logger must implement.

Every record Gru logs carries ``orchestration`` and ``workflow`` in ``extra`` (``"-"`` when not
applicable), so one grep finds a workflow's whole history. The default writes one line per record
to a rotating ``minions.log``::

    ts=2026-01-01T12:00:00.123Z level=ERROR orchestration=3f2a... workflow=9c1e... msg="..."

An injected :class:`logging.Logger` (or anything with the same methods accepting ``extra`` and
``exc_info``) replaces it entirely; Gru then installs no handler.
"""

from __future__ import annotations

import logging
import logging.handlers
import os
import time
from typing import Any, Protocol, runtime_checkable

DEFAULT_LOGGER_NAME = "minions.gru"
_MAX_BYTES = 10 * 1024 * 1024
_BACKUPS = 5


@runtime_checkable
class LoggerLike(Protocol):
    """The subset of :class:`logging.Logger` Gru calls (with ``extra=`` and ``exc_info=``)."""

    def debug(self, msg: str, *args: Any, **kwargs: Any) -> None: ...
    def info(self, msg: str, *args: Any, **kwargs: Any) -> None: ...
    def warning(self, msg: str, *args: Any, **kwargs: Any) -> None: ...
    def error(self, msg: str, *args: Any, **kwargs: Any) -> None: ...


def ids(orchestration: str = "-", workflow: str = "-") -> dict[str, dict[str, str]]:
    """``extra=`` keyword for a log call about one orchestration / workflow."""
    return {"extra": {"orchestration": orchestration, "workflow": workflow}}


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


class DefaultLogger:
    """Owns the rotating file handler so Gru can close it on shutdown."""

    def __init__(self, path: str | os.PathLike[str], level: int = logging.INFO) -> None:
        self.handler = logging.handlers.RotatingFileHandler(
            os.fspath(path), maxBytes=_MAX_BYTES, backupCount=_BACKUPS, encoding="utf-8"
        )
        self.handler.setFormatter(StructuredFormatter())
        self.logger = logging.getLogger(DEFAULT_LOGGER_NAME)
        if self.logger.level == logging.NOTSET:  # a level set by the launcher wins
            self.logger.setLevel(level)
        self.logger.propagate = False
        self.logger.addHandler(self.handler)

    def close(self) -> None:
        self.logger.removeHandler(self.handler)
        self.handler.close()
