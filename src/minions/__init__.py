"""Minions: event-driven Python workflows that must not die.

The public surface is this module, :mod:`minions.workers` and :mod:`minions.errors`, plus the
established module paths :mod:`minions.interfaces`, :mod:`minions.implementations`,
:mod:`minions.exceptions` and :mod:`minions.types`; everything else may move freely between
releases.

Names are imported lazily (PEP 562): a worker process runs ``python -m minions.ipc.worker``,
which imports this package first, and must not pay for the whole orchestration runtime
(asyncio, SQLite, Prometheus) before it can serve its first call.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from minions.errors import AbortWorkflow
    from minions.resource import Resource
    from minions.runtime.gru import Gru
    from minions.runtime.identity import minion_id, pipeline_id, resource_id
    from minions.runtime.minion import Minion, minion_step
    from minions.runtime.pipeline import Pipeline
    from minions.runtime.results import (
        GruState,
        GruStatus,
        OrchestrationState,
        OrchestrationStatus,
        ResourceStatus,
        ShutdownResult,
        StartResult,
        StopResult,
    )
    from minions.runtime.snapshot import GruRuntimeStateSnapshot

_HOME = {
    "AbortWorkflow": "minions.errors",
    "Gru": "minions.runtime.gru",
    "GruRuntimeStateSnapshot": "minions.runtime.snapshot",
    "GruState": "minions.runtime.results",
    "GruStatus": "minions.runtime.results",
    "Minion": "minions.runtime.minion",
    "OrchestrationState": "minions.runtime.results",
    "OrchestrationStatus": "minions.runtime.results",
    "Pipeline": "minions.runtime.pipeline",
    "Resource": "minions.resource",
    "ResourceStatus": "minions.runtime.results",
    "ShutdownResult": "minions.runtime.results",
    "StartResult": "minions.runtime.results",
    "StopResult": "minions.runtime.results",
    "minion_id": "minions.runtime.identity",
    "minion_step": "minions.runtime.minion",
    "pipeline_id": "minions.runtime.identity",
    "resource_id": "minions.runtime.identity",
}

__all__ = [
    "AbortWorkflow",
    "Gru",
    "GruRuntimeStateSnapshot",
    "GruState",
    "GruStatus",
    "Minion",
    "OrchestrationState",
    "OrchestrationStatus",
    "Pipeline",
    "Resource",
    "ResourceStatus",
    "ShutdownResult",
    "StartResult",
    "StopResult",
    "minion_id",
    "minion_step",
    "pipeline_id",
    "resource_id",
]


_NOT_PROVIDED = {
    "GruShell": "the deprecated in-process shell of the established API is not provided; "
    "drive Gru from your own code, or use the `minions` command",
}


def __getattr__(name: str) -> Any:
    home = _HOME.get(name)
    if home is None:
        why = _NOT_PROVIDED.get(name)
        raise AttributeError(
            f"module 'minions' has no attribute {name!r}" + (f": {why}" if why else "")
        )
    value = getattr(importlib.import_module(home), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_HOME])
