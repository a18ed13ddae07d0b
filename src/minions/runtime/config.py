"""``GruConfig``: every ``Gru.create`` setting, validated once where it is read.

Wrong types raise :class:`TypeError`, out-of-range values :class:`ValueError`, both naming the
argument, so a misconfigured service fails at startup with a message instead of at 3 a.m.
"""

from __future__ import annotations

import enum
import logging
import math
import os
from dataclasses import dataclass, field
from typing import Any, Literal

from minions.ops.memory import MemoryThresholds
from minions.runtime.log import Logger
from minions.runtime.store_contract import StateStore
from minions.runtime.telemetry import Metrics

PersistenceFailurePolicy = Literal["continue-on-failure", "idle-until-persisted"]
_PERSISTENCE_POLICIES = ("continue-on-failure", "idle-until-persisted")


class Default(enum.Enum):
    """Sentinel type: "argument omitted" (distinct from an explicit ``None``)."""

    TOKEN = "default"


DEFAULT = Default.TOKEN


@dataclass(frozen=True, slots=True)
class PersistencePolicy:
    """What a workflow does when its checkpoint cannot be saved or deleted.

    ``"continue-on-failure"`` (the default) logs the failure, counts it and runs the step
    anyway; the previous checkpoint stays, so a crash resumes from an earlier step.
    ``"idle-until-persisted"`` retries the save (or the final delete) with capped exponential
    backoff and jitter until it succeeds: the workflow does not advance without durable
    progress. A context that no longer encodes is never retried: the workflow stops and keeps
    its last checkpoint.
    """

    on_failure: PersistenceFailurePolicy = "continue-on-failure"
    retry_delay_s: float = 1.0
    retry_max_delay_s: float = 60.0
    backoff_multiplier: float = 2.0
    jitter_ratio: float = 0.1
    warning_interval_s: float = 30.0
    error_after_s: float | None = 60.0

    def __post_init__(self) -> None:
        if self.on_failure not in _PERSISTENCE_POLICIES:
            raise ValueError(
                "workflow_persistence_failure_policy must be 'continue-on-failure' or "
                f"'idle-until-persisted', got {self.on_failure!r}"
            )
        for name in ("retry_delay_s", "retry_max_delay_s", "warning_interval_s"):
            if _check_seconds(f"workflow_persistence_{name}", getattr(self, name)) == 0:
                raise ValueError(f"workflow_persistence_{name} must be > 0")
        if self.retry_max_delay_s < self.retry_delay_s:
            raise ValueError(
                "workflow_persistence_retry_max_delay_seconds must be >= "
                "workflow_persistence_retry_delay_seconds"
            )
        if _check_seconds("backoff_multiplier", self.backoff_multiplier) < 1:
            raise ValueError("workflow_persistence_retry_backoff_multiplier must be >= 1")
        if not 0 <= _check_seconds("jitter_ratio", self.jitter_ratio) <= 1:
            raise ValueError("workflow_persistence_retry_jitter_ratio must be between 0 and 1")
        if self.error_after_s is not None:
            _check_seconds("workflow_persistence_retry_error_after_seconds", self.error_after_s)

    def next_delay(self, delay: float) -> float:
        """The backoff after ``delay`` (0 for the first retry), before jitter."""
        if delay <= 0:
            return self.retry_delay_s
        return min(self.retry_max_delay_s, delay * self.backoff_multiplier)


@dataclass(frozen=True, slots=True)
class GruConfig:
    """Settings of one Gru. See :meth:`minions.Gru.create` for what each one means.

    ``metrics`` ``False`` or ``None`` serves no endpoint. ``status_interval_s`` (how often the
    systemd ``STATUS=`` line is refreshed) and ``pipeline_retry_s`` are not ``create`` arguments.
    """

    state_store: Any = DEFAULT
    db_path: str | os.PathLike[str] = "minions.db"
    logger: Any = DEFAULT
    log_file: str | os.PathLike[str] = "minions.log"
    metrics: Any = True
    metrics_host: str = "127.0.0.1"
    metrics_port: int = 8081
    memory: MemoryThresholds | None = None
    memory_interval_s: float = 0.5
    max_in_flight: int = 64
    grace_period_s: float = 10.0
    stop_timeout_s: float = 40.0
    handle_signals: bool = True
    pipeline_retry_s: tuple[float, float] = (0.1, 30.0)
    status_interval_s: float = 5.0
    workflow_failure_policy: str = "delete"
    persistence: PersistencePolicy = field(default_factory=PersistencePolicy)

    def __post_init__(self) -> None:
        self._check_store()
        if not (
            self.logger is DEFAULT
            or self.logger is None
            or isinstance(self.logger, logging.Logger | Logger)
        ):
            raise TypeError(
                "logger must be a minions.interfaces.Logger (subclass it and implement "
                "`async def log(self, level, msg, **kwargs)`), a logging.Logger, None to "
                f"discard logs, or omitted for the default file logger; got {self.logger!r}"
            )
        if self.workflow_failure_policy != "delete":
            raise ValueError(
                "workflow_failure_policy must be 'delete' (a failed workflow's checkpoint is "
                f"deleted; no other policy exists yet), got {self.workflow_failure_policy!r}"
            )
        for name in ("db_path", "log_file"):
            if not isinstance(getattr(self, name), str | os.PathLike):
                raise TypeError(f"{name} must be a path, got {type(getattr(self, name)).__name__}")
        if not (
            self.metrics is None or self.metrics is DEFAULT or isinstance(self.metrics, Metrics)
        ):
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
        if _check_seconds("stop_timeout_s", self.stop_timeout_s) == 0:
            raise ValueError("stop_timeout_s must be > 0 (keep it under systemd's TimeoutStopSec)")
        first, cap = _check_pair("pipeline_retry_s", self.pipeline_retry_s)
        if first <= 0 or cap < first:
            raise ValueError("pipeline_retry_s must be (initial > 0, maximum >= initial)")

    def _check_store(self) -> None:
        store = self.state_store
        if store is DEFAULT or store is None or isinstance(store, StateStore):
            return
        hint = f"an instance, {store.__name__}()," if isinstance(store, type) else "an instance"
        raise TypeError(
            f"state_store must be {hint} of a minions.interfaces.StateStore subclass "
            "(implementing save_context, delete_context, get_contexts_for_orchestration and "
            "get_all_contexts), None for stateless, or omitted for SQLite at db_path; "
            f"got {store!r}"
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
