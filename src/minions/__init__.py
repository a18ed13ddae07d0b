"""Minions: event-driven Python workflows that must not die.

The public surface is this module, :mod:`minions.workers` and :mod:`minions.errors`; everything
else may move freely between releases.
"""

from minions.errors import AbortWorkflow
from minions.resource import Resource
from minions.runtime.gru import Gru
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

__all__ = [
    "AbortWorkflow",
    "Gru",
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
    "minion_step",
]
