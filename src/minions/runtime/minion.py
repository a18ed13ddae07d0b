"""``Minion[E, Ctx]`` and ``@minion_step``: the user's workflow definition.

Design note: Gru builds **one** minion instance per orchestration (so its ``startup()`` /
``shutdown()`` run once and resources are injected once), yet many workflows run on it
concurrently. ``self.event`` and ``self.context`` therefore read a :class:`contextvars.ContextVar`
that Gru sets in each workflow's own task: every workflow sees its own event and context, and any
task a step spawns inherits them.
"""

from __future__ import annotations

import contextvars
import inspect
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import msgspec

from minions._tasks import TaskOwner

E = TypeVar("E")
Ctx = TypeVar("Ctx")
StepFn = TypeVar("StepFn", bound=Callable[..., Awaitable[None]])

_STEP_MARK = "__minions_step__"


def minion_step(func: StepFn) -> StepFn:
    """Mark an ``async def step(self)`` method as a workflow step; steps run in source order."""
    if not inspect.iscoroutinefunction(func):
        raise TypeError(f"@minion_step {func.__qualname__} must be an `async def` method")
    params = list(inspect.signature(func).parameters.values())
    if len(params) != 1:
        raise TypeError(
            f"@minion_step {func.__qualname__} must take only `self`; the event and context are "
            "self.event and self.context"
        )
    setattr(func, _STEP_MARK, True)
    return func  # type: ignore[return-value]  # mypy widens the TypeVar through the checks


class WorkflowScope(msgspec.Struct, gc=False):
    """What one running workflow sees through ``self.event`` / ``self.context``.

    ``gc=False``: a thousand are alive at once and the cyclic GC need not scan them; nothing a
    user holds refers back to one, so it is never part of a cycle.
    """

    workflow_id: str
    event: Any
    context: Any
    orchestration_id: str = ""


@dataclass(frozen=True, slots=True)
class MinionWorkflowHandle:
    """The running workflow's identity, for correlating business records with Minions' logs."""

    orchestration_id: str
    workflow_id: str


@dataclass
class MinionWorkflowContext(Generic[E, Ctx]):
    """One workflow as the established API describes it: identity, event, context and the
    index of the next step (what a checkpoint holds, decoded)."""

    orchestration_id: str
    workflow_id: str
    event: E
    context: Ctx
    next_step_index: int = 0
    error_msg: str | None = None
    started_at: float | None = None

    def as_dict(self) -> dict[str, object]:
        return dict(vars(self))


CURRENT_WORKFLOW: contextvars.ContextVar[WorkflowScope] = contextvars.ContextVar(
    "minions_current_workflow"
)


class Minion(TaskOwner, Generic[E, Ctx]):
    """Base class of workflows: subclass as ``Minion[MyEvent, MyContext]``.

    Each event the pipeline produces starts one workflow: a fresh ``Ctx()`` and the
    ``@minion_step`` methods run in order. Raise :class:`~minions.AbortWorkflow` in a step to end
    the workflow on purpose. Resources are injected by class annotation before ``startup()``.
    Declare ``config: MyConfig`` to receive a typed configuration (see ``minion_config``).
    """

    _minion_steps: tuple[str, ...] = ()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        steps = list(cls._minion_steps)
        for name, value in vars(cls).items():
            if getattr(value, _STEP_MARK, False) and name not in steps:
                steps.append(name)
        cls._minion_steps = tuple(steps)

    def __init__(self, config: Any = None) -> None:
        self.config = config

    @property
    def event(self) -> E:
        """The event that started the current workflow (only valid inside a step)."""
        return _current(self).event

    @property
    def context(self) -> Ctx:
        """The current workflow's context; checkpointed before every step."""
        return _current(self).context

    @property
    def workflow_id(self) -> str:
        """Id of the current workflow, stable across a resume."""
        return _current(self).workflow_id

    @property
    def workflow_handle(self) -> MinionWorkflowHandle:
        """Orchestration and workflow id of the current workflow (only inside a step)."""
        scope = _current(self)
        return MinionWorkflowHandle(scope.orchestration_id, scope.workflow_id)

    async def load_config(self, config_path: str) -> Any:
        """Override to read ``minion_config_path`` yourself (another format, a remote source);
        return an instance of the declared ``config`` type. Without an override Gru reads
        TOML and JSON files and converts them to that type."""
        raise NotImplementedError(f"{type(self).__name__}.load_config() is not overridden")

    async def startup(self) -> None:
        """Called once when the orchestration starts, after resources are injected."""

    async def shutdown(self) -> None:
        """Called once when the orchestration stops."""


def _current(minion: Minion[Any, Any]) -> WorkflowScope:
    try:
        return CURRENT_WORKFLOW.get()
    except LookupError:
        raise RuntimeError(
            f"{type(minion).__name__}.event/.context/.workflow_handle are only available inside "
            "a @minion_step"
        ) from None


def step_names(minion_cls: type[Minion[Any, Any]]) -> tuple[str, ...]:
    """The step method names of ``minion_cls`` in source order (base class steps first)."""
    return minion_cls._minion_steps
