"""Exceptions of the orchestration API under their established module path.

:class:`AbortWorkflow` is the same class as ``minions.AbortWorkflow`` and
``minions.errors.AbortWorkflow``: raise it in a step to end the workflow on purpose.
"""

from minions.errors import AbortWorkflow, MinionsError


class TaskCancellationError(MinionsError):
    """A task owned by a component (``safe_create_task``) could not be cancelled cleanly when
    the component stopped. Named in ``StopResult.errors``/``ShutdownResult.errors``; the process
    may still run that task, so restart it for a hard cleanup boundary."""


class TaskCancellationTimeoutError(TaskCancellationError, TimeoutError):
    """A component's task ignored cancellation for longer than the stop allowed."""

    def __init__(self, label: str, timeout: float) -> None:
        self.label = label
        self.timeout = timeout
        super().__init__(
            f"task {label!r} was still running {timeout:g}s after it was cancelled; it ignores "
            "cancellation (a bare `except BaseException`, or blocking code): restart the process "
            "to be sure it is gone"
        )


__all__ = ["AbortWorkflow", "TaskCancellationError", "TaskCancellationTimeoutError"]
