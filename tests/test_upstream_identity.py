"""Durable component identity: the ``@minion_id`` family is the key workflows are saved under.

The resume tests are real processes on a real SQLite file: a workflow is SIGKILLed in its
second step, the source changes (the class moves, or ids are stamped), and a new process starts
the orchestration again.
"""

from __future__ import annotations

import hashlib
import json
import signal
import types
from pathlib import Path

import msgspec
import pytest

from apps.upstream.events import Order, OrderCtx, OrderPipeline
from apps.upstream.one_minion import OrderMinion
from apps.upstream_project import launch, minions_cli, read_until, write_project
from minions import Minion, Resource, minion_id, minion_step, pipeline_id, resource_id
from minions.runtime.composition import fallback_orchestration_id, orchestration_id
from minions.runtime.identity import component_identity

MINION_ID = "11111111-1111-4111-8111-111111111111"


# --- the decorators ---------------------------------------------------------------------------


def _minion_class(name: str) -> type[Minion[Order, OrderCtx]]:
    async def step(self: Minion[Order, OrderCtx]) -> None:
        return None

    def body(ns: dict[str, object]) -> None:
        ns["step"] = minion_step(step)
        ns["__module__"] = __name__

    return types.new_class(name, (Minion[Order, OrderCtx],), exec_body=body)


def test_decorators_attach_an_id_without_changing_the_class() -> None:
    cls = _minion_class("Stamped")
    assert minion_id("22222222-2222-4222-8222-222222222222")(cls) is cls
    assert component_identity(cls) == "22222222-2222-4222-8222-222222222222"
    sub = types.new_class("Sub", (cls,), exec_body=lambda ns: ns.update(__module__=__name__))
    assert component_identity(sub) == f"{__name__}:Sub"  # an id is never inherited


@pytest.mark.parametrize(
    ("decorate", "error", "match"),
    [
        (lambda c: minion_id("not-a-uuid")(c), ValueError, "is not a UUID"),
        (lambda c: minion_id("22222222-2222-4222-8222-22222222222A")(c), ValueError, "canonically"),
        (lambda c: minion_id(42)(c), TypeError, "must be a UUID string"),  # type: ignore[arg-type]
        (lambda c: pipeline_id(MINION_ID)(c), TypeError, "only decorate a Pipeline subclass"),
        (lambda c: resource_id(MINION_ID)(c), TypeError, "only decorate a Resource subclass"),
    ],
)  # fmt: skip
def test_bad_ids_and_wrong_targets_are_refused(decorate, error, match) -> None:
    with pytest.raises(error, match=match):
        decorate(_minion_class("Target"))


def test_a_duplicate_id_on_another_class_is_refused_naming_both() -> None:
    dup = "33333333-3333-4333-8333-333333333333"
    minion_id(dup)(_minion_class("Original"))
    with pytest.raises(ValueError, match=r"duplicate minion id .*:Original and .*:Copy"):
        minion_id(dup)(_minion_class("Copy"))
    minion_id(dup)(_minion_class("Original"))  # the same import path again (a reload) is fine
    assert pipeline_id(dup)(types.new_class("P", (OrderPipeline,)))  # ids are unique per kind


def test_resource_id_gives_a_resource_its_identity() -> None:
    @resource_id("55555555-5555-4555-8555-555555555555")
    class Stamped(Resource):
        pass

    assert component_identity(Stamped) == "55555555-5555-4555-8555-555555555555"


# --- orchestration ids ------------------------------------------------------------------------


def test_without_ids_the_orchestration_id_is_the_import_path_digest_it_always_was() -> None:
    digest = hashlib.sha256()
    for part in ("apps.upstream.events:OrderPipeline", "apps.upstream.one_minion:OrderMinion"):
        digest.update(part.encode() + b"\0")
    digest.update(msgspec.json.encode({"region": "eu"}, order="sorted"))
    oid = orchestration_id(OrderPipeline, OrderMinion, {"region": "eu"})
    assert oid == digest.hexdigest()[:16]
    assert oid == fallback_orchestration_id(OrderPipeline, OrderMinion, {"region": "eu"})


def test_a_stamped_id_makes_the_orchestration_id_independent_of_where_the_class_lives() -> None:
    here = minion_id("66666666-6666-4666-8666-666666666666")(_minion_class("Here"))
    stamped, fallback = (
        orchestration_id(OrderPipeline, here, None),
        fallback_orchestration_id(OrderPipeline, here, None),
    )
    assert stamped != fallback
    here.__module__ = "somewhere.else.entirely"  # the class moved
    assert orchestration_id(OrderPipeline, here, None) == stamped
    assert fallback_orchestration_id(OrderPipeline, here, None) != fallback


# --- resume across a move, as real processes --------------------------------------------------


def _kill_in_second_step(root: Path, minion: str) -> None:
    proc = launch(root, minion, APP_BLOCK="1", APP_EVENTS="1")
    try:
        lines = read_until(proc, "STEP second-start 0")
        assert lines[0] == "START True 0 None", lines
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)


def _resume(root: Path, minion: str) -> tuple[str, list[str], str]:
    proc = launch(root, minion, APP_BLOCK="0", APP_EVENTS="0")
    try:
        start = read_until(proc, "START")[-1]
        after = read_until(proc, "STEP second 0") if start == "START True 1 None" else []
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    return start, after, err


def _saved(root: Path) -> list[dict[str, object]]:
    out = minions_cli("workflows", "--db", str(root / "minions.db"), "--json", cwd=root)
    assert out.returncode == 0, out.stderr
    return [json.loads(line) for line in out.stdout.splitlines()]


def _stamp_minion(root: Path) -> None:
    path = root / "shop/minions/order_minion.py"
    text = path.read_text()
    text = text.replace("class OrderMinion(", f'@minion_id("{MINION_ID}")\nclass OrderMinion(')
    path.write_text("from minions import minion_id\n" + text)


def _move_minion(root: Path) -> None:
    moved = root / "shop/workers/order_minion.py"
    moved.parent.mkdir()
    (moved.parent / "__init__.py").touch()
    (root / "shop/minions/order_minion.py").rename(moved)


@pytest.mark.timeout(90)
def test_a_workflow_saved_under_a_stamped_id_resumes_after_the_class_moves(tmp_path: Path) -> None:
    write_project(tmp_path)
    _stamp_minion(tmp_path)
    _kill_in_second_step(tmp_path, "shop.minions.order_minion")
    assert [w["next_step"] for w in _saved(tmp_path)] == [1]
    _move_minion(tmp_path)
    start, steps, _ = _resume(tmp_path, "shop.workers.order_minion")
    assert start == "START True 1 None"
    assert [s.split()[1] for s in steps] == ["second-start", "second"]  # step 1 did not re-run
    assert _saved(tmp_path) == []


@pytest.mark.timeout(90)
def test_without_an_id_a_moved_class_does_not_find_its_workflows(tmp_path: Path) -> None:
    write_project(tmp_path)
    _kill_in_second_step(tmp_path, "shop.minions.order_minion")
    _move_minion(tmp_path)
    start, _, _ = _resume(tmp_path, "shop.workers.order_minion")
    assert start == "START True 0 None"  # a new orchestration id: the fallback moved with it
    assert [w["next_step"] for w in _saved(tmp_path)] == [1]  # kept, never deleted


@pytest.mark.timeout(90)
def test_stamping_ids_keeps_the_workflows_saved_before_it(tmp_path: Path) -> None:
    write_project(tmp_path)
    _kill_in_second_step(tmp_path, "shop.minions.order_minion")
    (before,) = _saved(tmp_path)
    stamped = minions_cli("stamp", "component-ids", "shop", cwd=tmp_path)
    assert stamped.returncode == 0 and "stamped OrderMinion with @minion_id" in stamped.stdout
    start, steps, _ = _resume(tmp_path, "shop.minions.order_minion")
    assert start == "START True 1 None"  # adopted from the pre-stamp id
    assert [s.split()[1] for s in steps] == ["second-start", "second"]
    assert _saved(tmp_path) == [] and before["orchestration"]
