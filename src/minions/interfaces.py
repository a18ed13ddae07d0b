"""The extension interfaces: subclass these to plug your own logger, state store or metrics
backend into ``Gru.create(state_store, logger, metrics)``.

The shipped implementations (:mod:`minions.implementations`) are subclasses of the same classes,
so what works for them works for yours. See each class for its contract.
"""

from minions.runtime.log import CRITICAL, DEBUG, ERROR, INFO, WARNING, Logger
from minions.runtime.store_contract import StateStore, StoredWorkflowContext, WorkflowRecord
from minions.runtime.telemetry import Metrics

__all__ = [
    "CRITICAL",
    "DEBUG",
    "ERROR",
    "INFO",
    "WARNING",
    "Logger",
    "Metrics",
    "StateStore",
    "StoredWorkflowContext",
    "WorkflowRecord",
]
