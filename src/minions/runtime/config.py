"""``GruConfig``: every ``Gru.create`` setting, validated once where it is read.

Wrong types raise :class:`TypeError`, out-of-range values :class:`ValueError`, both naming the
argument, so a misconfigured service fails at startup with a message instead of at 3 a.m.
"""

from __future__ import annotations

import enum
import logging
import math
import os
from dataclasses import dataclass
from typing import Any

from minions.ops.memory import MemoryThresholds
from minions.runtime.log import LoggerLike

_STORE_METHODS = ("open", "save", "delete", "load", "list_all", "close")


class Default(enum.Enum):
    """Sentinel type: "argument omitted" (distinct from an explicit ``None``)."""

    TOKEN = "default"


DEFAULT = Default.TOKEN


@dataclass(frozen=True, slots=True)
class GruConfig:
    """Settings of one Gru. See :meth:`minions.Gru.create` for what each one means.

    ``metrics`` ``False`` or ``None`` serves no endpoint. ``status_interval_s`` (how often the
    systemd ``STATUS=`` line is refreshed) and ``pipeline_retry_s`` are not ``create`` arguments.
    """

    state_store: Any = DEFAULT
    db_path: str | os.PathLike[str] = "minions.db"
    logger: LoggerLike | None = None
    log_file: str | os.PathLike[str] = "minions.log"
    metrics: bool | None = True
    metrics_host: str = "127.0.0.1"
    metrics_port: int = 8081
    memory: MemoryThresholds | None = None
    memory_interval_s: float = 0.5
    max_in_flight: int = 64
    grace_period_s: float = 10.0
    handle_signals: bool = True
    pipeline_retry_s: tuple[float, float] = (0.1, 30.0)
    status_interval_s: float = 5.0

    def __post_init__(self) -> None:
        self._check_store()
        if self.logger is not None and not isinstance(self.logger, logging.Logger | LoggerLike):
            raise TypeError(
                "logger must be a logging.Logger or implement debug/info/warning/error, got "
                f"{type(self.logger).__name__}"
            )
        for name in ("db_path", "log_file"):
            if not isinstance(getattr(self, name), str | os.PathLike):
                raise TypeError(f"{name} must be a path, got {type(getattr(self, name)).__name__}")
        if self.metrics is not None:
            _check_bool("metrics", self.metrics)
        _check_bool("handle_signals", self.handle_signals)
        if not isinstance(self.metrics_host, str):
            raise TypeError(f"metrics_host must be a str, got {type(self.metrics_host).__name__}")
        if not self.metrics_host.strip():
            raise ValueError("metrics_host must name an address, e.g. 127.0.0.1 or 0.0.0.0")
        _check_int("metrics_port", self.metrics_port, 0, 65535)
        if self.memory is not None and not isinstance(self.memory, MemoryThresholds):
            raise TypeError(
                "memory must be a minions.ops.memory.MemoryThresholds or None (defaults from the "
                f"cgroup and host), got {type(self.memory).__name__}"
            )
        for name in ("memory_interval_s", "status_interval_s"):
            if _check_seconds(name, getattr(self, name)) == 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        check_max_in_flight(self.max_in_flight)
        _check_seconds("grace_period_s", self.grace_period_s)
        first, cap = _check_pair("pipeline_retry_s", self.pipeline_retry_s)
        if first <= 0 or cap < first:
            raise ValueError("pipeline_retry_s must be (initial > 0, maximum >= initial)")

    @property
    def serves_metrics(self) -> bool:
        return bool(self.metrics)

    def _check_store(self) -> None:
        store = self.state_store
        if store is DEFAULT or store is None:
            return
        missing = [m for m in _STORE_METHODS if not callable(getattr(store, m, None))]
        if missing or isinstance(store, type):
            raise TypeError(
                "state_store must be a StateStore instance (async open/save/delete/load/list_all/"
                f"close), None for stateless, or omitted for SQLite; got {store!r}"
            )


def check_max_in_flight(value: object) -> int:
    return _check_int("max_in_flight", value, 1, 1_000_000)


def _check_bool(name: str, value: object) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")


def _check_int(name: str, value: object, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if not low <= value <= high:
        raise ValueError(f"{name} must be between {low} and {high}, got {value}")
    return value


def _check_seconds(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{name} must be a number of seconds, got {type(value).__name__}")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value}")
    return float(value)


def _check_pair(name: str, value: object) -> tuple[float, float]:
    if not isinstance(value, tuple) or len(value) != 2:
        raise TypeError(f"{name} must be a (initial, maximum) tuple of seconds")
    return _check_seconds(name, value[0]), _check_seconds(name, value[1])


def metrics_address(host: str | None, port: int | None) -> tuple[str, int]:
    """Fill an omitted metrics host/port from ``$MINIONS_METRICS_HOST``/``$MINIONS_METRICS_PORT``
    (how ``minions@.service`` gives each shard its own port), else 127.0.0.1:8081."""
    if host is None:
        host = os.environ.get("MINIONS_METRICS_HOST") or "127.0.0.1"
    if port is None:
        raw = os.environ.get("MINIONS_METRICS_PORT") or "8081"
        try:
            port = int(raw)
        except ValueError:
            raise ValueError(f"$MINIONS_METRICS_PORT must be a port number, got {raw!r}") from None
    return host, port
