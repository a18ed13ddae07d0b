"""``PoolConfig``: every setting of a worker pool, validated once where it is read.

Users configure a pool with class attributes on their ``WorkerPool`` subclass (the established
style: ``service = "pkg.mod:Service"``, ``workers = 4``); :meth:`PoolConfig.from_class` reads
them into one frozen object, and a bad value raises ``ValueError`` naming the setting.
"""

from __future__ import annotations

import dataclasses
import enum
import math
from dataclasses import dataclass
from typing import Any

from minions.ops.memory import MemoryThresholds
from minions.pool.states import CrashLoopPolicy


class SpawnMode(enum.Enum):
    """How a pool starts its worker processes (the ``spawn`` setting)."""

    ZYGOTE = "zygote"  # forked from the pool's zygote: fast respawn, pages shared (the default)
    EXEC = "exec"  # a fresh interpreter each: for services whose module cannot be forked safely


@dataclass(frozen=True, slots=True)
class PoolConfig:
    """Settings of one pool. Durations are seconds, sizes MiB (``_bytes``: bytes); ``0``
    disables a limit.

    ``arena_mb`` is each worker's shared-memory arena, half for arguments and half for results;
    buffers of ``arena_min_bytes`` or more travel through it (see ``minions.ipc.payload``).

    ``listen`` (``"tcp://0.0.0.0:7000"``) also serves worker hosts on other machines, which
    needs CURVE: ``server_key`` is the pool's ``.key_secret`` file and ``host_keys_dir`` the
    directory of allowed host public keys (``NAME.key``; NAME labels the host). A host silent for
    ``host_timeout_s`` is lost: its calls end with ``WorkerCrashed`` (``host_lost``) or are
    retried. ``workers`` may then be 0: every call goes to the hosts."""

    service: str
    name: str = ""
    workers: int = 2
    spare_workers: int = 0
    call_timeout_s: float = 30.0
    max_calls_per_worker: int = 0
    max_rss_mb: float = 0.0
    retries_on_crash: int = 0
    poison_ttl_s: float = 60.0
    restart_backoff_initial_s: float = 0.05
    restart_backoff_max_s: float = 5.0
    restart_intensity: int = 10
    restart_period_s: float = 10.0
    circuit_reset_s: float = 5.0
    circuit_reset_max_s: float = 60.0  # the reset delay doubles after each failed retry, to this
    on_crash_loop: CrashLoopPolicy = CrashLoopPolicy.CIRCUIT
    max_queue: int = 10_000
    pipeline_depth: int = 16
    pipeline_window_s: float = 0.002
    boot_timeout_s: float = 30.0
    shutdown_grace_s: float = 10.0
    heartbeat_s: float = 1.0
    rss_check_s: float = 1.0
    arena_mb: float = 64.0
    arena_min_bytes: int = 65536
    memory: MemoryThresholds | None = None  # standalone pools: run an own memory monitor
    spawn: SpawnMode = SpawnMode.ZYGOTE
    listen: str = ""
    server_key: str = ""
    host_keys_dir: str = ""
    host_timeout_s: float = 5.0

    def __post_init__(self) -> None:
        if not isinstance(self.service, str) or self.service.count(":") != 1:
            raise ValueError(f"service must be 'module:Class', got {self.service!r}")
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.type in ("int", "float") and (
                isinstance(value, bool)
                or not isinstance(value, int | float)
                or (f.type == "int" and not isinstance(value, int))
                or not math.isfinite(value)
            ):
                raise ValueError(f"{f.name} must be a finite {f.type}, got {value!r}")
        self._check_ranges()
        if not isinstance(self.on_crash_loop, CrashLoopPolicy):
            try:  # a class attribute may name it: on_crash_loop = "escalate"
                object.__setattr__(self, "on_crash_loop", CrashLoopPolicy(self.on_crash_loop))
            except ValueError:
                choices = [p.value for p in CrashLoopPolicy]
                raise ValueError(
                    f"on_crash_loop must be one of {choices}, got {self.on_crash_loop!r}"
                ) from None
        if not isinstance(self.spawn, SpawnMode):
            try:  # a class attribute may name it: spawn = "exec"
                object.__setattr__(self, "spawn", SpawnMode(self.spawn))
            except ValueError:
                choices = [mode.value for mode in SpawnMode]
                raise ValueError(f"spawn must be one of {choices}, got {self.spawn!r}") from None
        self._check_listen()
        if self.memory is not None and not isinstance(self.memory, MemoryThresholds):
            raise ValueError(f"memory must be a MemoryThresholds or None, got {self.memory!r}")

    def _check_listen(self) -> None:
        for name in ("listen", "server_key", "host_keys_dir"):
            if not isinstance(getattr(self, name), str):
                raise ValueError(f"{name} must be a str, got {getattr(self, name)!r}")
        if not self.listen:
            return
        if not self.listen.startswith("tcp://"):
            raise ValueError(f"listen must be a tcp:// address, got {self.listen!r}")
        if not self.server_key or not self.host_keys_dir:
            raise ValueError(
                f"listen={self.listen!r} needs CURVE: set server_key (the pool's .key_secret "
                "file) and host_keys_dir (the allowed host public keys); make keys with "
                "`minions keys generate`"
            )

    def _check_ranges(self) -> None:
        at_least = {
            "workers": 0 if self.listen else 1,
            "pipeline_depth": 1,
            "restart_intensity": 1,
            "max_queue": 1,
            "spare_workers": 0,
            "max_calls_per_worker": 0,
            "max_rss_mb": 0,
            "retries_on_crash": 0,
            "poison_ttl_s": 0,
            "restart_backoff_initial_s": 0,
            "arena_mb": 0,
            "arena_min_bytes": 1,
        }
        for name, low in at_least.items():
            if getattr(self, name) < low:
                raise ValueError(f"{name} must be >= {low}, got {getattr(self, name)!r}")
        for name in (
            "call_timeout_s",
            "restart_period_s",
            "circuit_reset_s",
            "circuit_reset_max_s",
            "boot_timeout_s",
            "shutdown_grace_s",
            "heartbeat_s",
            "rss_check_s",
            "host_timeout_s",
        ):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)!r}")
        if self.circuit_reset_max_s < self.circuit_reset_s:
            raise ValueError(
                "circuit_reset_max_s must be >= circuit_reset_s, got "
                f"{self.circuit_reset_max_s!r} < {self.circuit_reset_s!r}"
            )
        if self.restart_backoff_max_s < self.restart_backoff_initial_s:
            raise ValueError(
                "restart_backoff_max_s must be >= restart_backoff_initial_s, got "
                f"{self.restart_backoff_max_s!r} < {self.restart_backoff_initial_s!r}"
            )

    @classmethod
    def from_class(cls, pool_cls: type, **overrides: Any) -> PoolConfig:
        """Read settings from ``pool_cls``'s class attributes (subclass wins), then overrides."""
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            if hasattr(pool_cls, f.name):
                values[f.name] = getattr(pool_cls, f.name)
        values.update(overrides)
        if not values.get("name"):
            values["name"] = pool_cls.__name__
        if "service" not in values or not values["service"]:
            raise ValueError(
                f"{pool_cls.__name__}.service must name a WorkerService 'module:Class'"
            )
        return cls(**values)
