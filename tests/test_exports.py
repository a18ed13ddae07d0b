"""The public surface is pinned: changing it must be a decision, not an accident."""

from __future__ import annotations

import subprocess
import sys

import minions
import minions.errors
import minions.workers


def test_public_names_are_pinned() -> None:
    assert sorted(minions.__all__) == [
        "AbortWorkflow", "Gru", "GruRuntimeStateSnapshot", "GruState", "GruStatus", "Minion",
        "OrchestrationState", "OrchestrationStatus", "Pipeline", "Resource", "ResourceStatus",
        "ShutdownResult", "StartResult", "StopResult", "minion_id", "minion_step", "pipeline_id",
        "resource_id",
    ]  # fmt: skip
    assert sorted(minions.workers.__all__) == [
        "Buffer", "Caller", "Circuit", "MemoryLevel", "PoolConfig", "PoolSnapshot", "PoolState",
        "ResultStream", "WorkerPool", "WorkerService", "expose",
    ]  # fmt: skip
    for module in (minions, minions.workers):
        for name in module.__all__:
            assert getattr(module, name) is not None


def test_every_error_is_a_minions_error_with_a_docstring() -> None:
    errors = [
        obj
        for obj in vars(minions.errors).values()
        if isinstance(obj, type) and issubclass(obj, Exception)
    ]
    assert len(errors) >= 12
    for error in errors:
        assert issubclass(error, minions.errors.MinionsError), error
        assert error.__doc__ and len(error.__doc__) > 20, error


def test_worker_processes_do_not_import_the_runtime() -> None:
    """The worker entry point must boot fast: no asyncio runtime, SQLite or Prometheus."""
    code = (
        "import sys, minions.ipc.worker; "
        "print(sorted(m for m in ('minions.runtime.gru', 'sqlite3', 'prometheus_client') "
        "if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
