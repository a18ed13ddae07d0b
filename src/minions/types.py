"""Value types of the orchestration API: lifecycle results and workflow identities."""

from minions.runtime.minion import MinionWorkflowContext, MinionWorkflowHandle
from minions.runtime.results import ShutdownResult, StartResult, StopResult
from minions.runtime.snapshot import GruRuntimeStateSnapshot
from minions.runtime.store_contract import StoredWorkflowContext

__all__ = [
    "GruRuntimeStateSnapshot",
    "MinionWorkflowContext",
    "MinionWorkflowHandle",
    "ShutdownResult",
    "StartResult",
    "StopResult",
    "StoredWorkflowContext",
]
