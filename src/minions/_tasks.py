"""``self.safe_create_task(...)``: background work a component owns, supervised and drained.

A bare ``asyncio.create_task`` in a step or a resource can outlive its workflow, lose its
exception to "Task exception was never retrieved", and keep running through shutdown. A task
made here is kept by the component that made it; if it raises, the failure is reported (to
Gru's log and console when Gru runs the component, else to the ``minions`` logger); and when Gru
stops the component, after its ``shutdown()`` hook, the tasks still running are cancelled and
awaited. Tasks inherit the caller's context, so one started in a step sees that workflow's
``self.event``/``self.context``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from typing import Any, final

TaskFailureHook = Callable[[object, str, BaseException], None]

_TASKS = "_minions_tasks"
_HOOK = "_minions_on_task_failure"


class TaskOwner:
    """Mixin of ``Minion``, ``Pipeline`` and ``Resource``."""

    @final
    def safe_create_task(
        self, coro: Coroutine[Any, Any, object], name: str | None = None
    ) -> asyncio.Task[None]:
        """Run ``coro`` as a task this component owns (see the module docstring)."""
        if not asyncio.iscoroutine(coro):
            raise TypeError(
                f"safe_create_task() takes a coroutine, got {type(coro).__name__}; "
                "call the async function: self.safe_create_task(work())"
            )
        label: str = name or getattr(coro, "__qualname__", None) or "task"
        task = asyncio.get_running_loop().create_task(_supervise(self, coro, label), name=name)
        tasks: set[asyncio.Task[None]] = self.__dict__.setdefault(_TASKS, set())
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        return task


async def _supervise(owner: object, coro: Coroutine[Any, Any, object], label: str) -> None:
    try:
        await coro
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        hook: TaskFailureHook | None = vars(owner).get(_HOOK)
        if hook is not None:
            hook(owner, label, exc)
        else:
            logging.getLogger("minions").error(
                "%s task %s raised %r", type(owner).__name__, label, exc, exc_info=exc
            )


def supervise_tasks(owner: object, hook: TaskFailureHook) -> None:
    """Route ``owner``'s task failures to ``hook`` (Gru, as it creates each component)."""
    vars(owner)[_HOOK] = hook


async def cancel_tasks(owner: object, timeout_s: float = 5.0) -> list[str]:
    """Cancel and await the tasks ``owner`` still runs. Returns the names of those that ignored
    cancellation for ``timeout_s`` (they are left behind: nothing more can be done in-process)."""
    tasks: set[asyncio.Task[None]] = vars(owner).get(_TASKS, set())
    pending = [task for task in tasks if not task.done()]
    for task in pending:
        task.cancel()
    if not pending:
        return []
    _, stuck = await asyncio.wait(pending, timeout=timeout_s)
    return sorted(task.get_name() for task in stuck)
