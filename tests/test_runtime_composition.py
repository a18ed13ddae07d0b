"""Composition errors: every invalid orchestration is refused with a reason, nothing started."""

from __future__ import annotations

from dataclasses import dataclass

import msgspec
import pytest

from apps.harness import CycleA, Ev, QPipeline, running_gru, use_harness
from conftest import run
from minions import Minion, Pipeline, minion_step
from minions.runtime.composition import CompositionError, compose, orchestration_id
from minions.runtime.resources import ResourceGraph


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)


class Opaque:
    pass


@dataclass
class BadEvent:
    handle: Opaque


class StructEvent(msgspec.Struct):
    n: int = 0


@dataclass
class Ctx:
    n: int = 0


@dataclass
class NeedsArgs:
    n: int


class NotRecord:
    pass


class StepMinion(Minion[Ev, Ctx]):
    @minion_step
    async def one(self) -> None:
        pass


class NoSteps(Minion[Ev, Ctx]):
    async def helper(self) -> None:
        pass


class WrongEvent(Minion[StructEvent, Ctx]):
    @minion_step
    async def one(self) -> None:
        pass


class BadEventMinion(Minion[BadEvent, Ctx]):
    @minion_step
    async def one(self) -> None:
        pass


class BadEventPipeline(Pipeline[BadEvent]):
    pass


class UntypedPipeline(Pipeline):  # type: ignore[type-arg]
    pass


class BadContextMinion(Minion[Ev, NeedsArgs]):
    @minion_step
    async def one(self) -> None:
        pass


class NotRecordContext(Minion[Ev, NotRecord]):
    @minion_step
    async def one(self) -> None:
        pass


class CyclicMinion(StepMinion):
    a: CycleA


class Unresolvable(StepMinion):
    thing: DoesNotExist  # type: ignore[name-defined]  # noqa: F821


class StructPipeline(Pipeline[StructEvent]):
    pass


class StructMinion(Minion[StructEvent, Ctx]):
    @minion_step
    async def one(self) -> None:
        pass


CASES = [
    (QPipeline, NoSteps, None, "has no @minion_step methods"),
    (QPipeline, WrongEvent, None, "handles StructEvent but QPipeline produces Ev"),
    (BadEventPipeline, BadEventMinion, None, "field msgspec cannot encode"),
    (UntypedPipeline, StepMinion, None, "does not declare its event type"),
    (QPipeline, BadContextMinion, None, "constructible with no arguments"),
    (QPipeline, NotRecordContext, None, "must be a @dataclass or a msgspec.Struct"),
    (QPipeline, "apps.harness:Nope", None, "cannot import minion"),
    (QPipeline, "not a path", None, "'package.module:ClassName'"),
    (QPipeline, "no_such_module", None, "cannot import minion module 'no_such_module'"),
    (StepMinion, QPipeline, None, "pipeline must be a subclass of Pipeline"),
    (QPipeline, StepMinion, {"handle": Opaque()}, "minion_config must be JSON-encodable"),
    (QPipeline, StepMinion, 42, "minion_config must be a mapping"),
    (QPipeline, CyclicMinion, None, "resource dependency cycle: CycleA -> CycleB -> CycleA"),
    (QPipeline, Unresolvable, None, "cannot resolve the annotations of Unresolvable"),
]


@pytest.mark.parametrize(("pipeline", "minion", "config", "reason"), CASES)
def test_invalid_orchestrations_are_refused_with_a_reason(pipeline, minion, config, reason):
    async def main():
        harness = use_harness()
        async with running_gru() as gru:
            result = await gru.start_orchestration(pipeline, minion, minion_config=config)
            assert gru.status().orchestrations == () and gru.status().resources == ()
        assert harness.lifecycle == []  # nothing was started
        return result

    result = run(main())
    assert not result.success and reason in result.reason, result.reason


def test_struct_events_and_dataclass_contexts_compose():
    comp = compose(StructPipeline, StructMinion, None)
    assert comp.event_type is StructEvent and comp.steps == ("one",)


def test_orchestration_id_depends_on_paths_and_config_only():
    a = orchestration_id(QPipeline, StepMinion, {"x": 1, "y": 2})
    assert a == orchestration_id(QPipeline, StepMinion, {"y": 2, "x": 1})
    assert a != orchestration_id(QPipeline, StepMinion, {"x": 2, "y": 2})
    assert a != orchestration_id(QPipeline, NoSteps, {"x": 1, "y": 2})
    assert len(a) == 16 and int(a, 16) >= 0


def test_steps_run_in_source_order_with_inherited_steps_first():
    class Base(Minion[Ev, Ctx]):
        @minion_step
        async def zeta(self) -> None: ...

        @minion_step
        async def alpha(self) -> None: ...

    class Child(Base):
        @minion_step
        async def middle(self) -> None: ...

    assert compose(QPipeline, Child, None).steps == ("zeta", "alpha", "middle")


def test_minion_step_rejects_sync_and_parameterised_methods():
    with pytest.raises(TypeError, match="async def"):
        minion_step(lambda self: None)  # type: ignore[arg-type]

    async def takes_args(self, x):
        return None

    with pytest.raises(TypeError, match="only `self`"):
        minion_step(takes_args)


def test_plan_orders_dependencies_first():
    from apps.harness import Api, Cache, Db, RecMinion

    assert ResourceGraph().plan([QPipeline, RecMinion]) == [Db, Cache, Api]
    with pytest.raises(CompositionError, match="cycle"):
        ResourceGraph().plan([CycleA])
