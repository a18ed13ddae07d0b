"""Typed calls, per-call options and at-most-once calls, against real workers.

Cancellation is in ``test_call_api_cancel.py``, ``map`` in ``test_call_api_map.py``, settling
per policy (fake workers, every position) in ``test_call_api_settle.py``, mypy in
``test_call_api_typing.py``.
"""

from __future__ import annotations

import asyncio
import sys
import textwrap
import zlib
from pathlib import Path

import pytest

from call_services import Journal, lines
from conftest import run
from minions.errors import CallTimeout, PoisonCall, PoolUnavailable, RemoteError, WorkerCrashed
from minions.workers import WorkerPool, WorkerService, expose
from native_demo.service import NativeDemo
from services import Hostile


class TypedPool(WorkerPool[NativeDemo]):
    workers = 1
    call_timeout_s = 20.0


class JournalPool(WorkerPool[Journal]):
    workers = 1
    call_timeout_s = 10.0
    restart_intensity = 50
    poison_ttl_s = 0.0


class RetryingJournalPool(JournalPool):
    retries_on_crash = 1


# --- typed calls -------------------------------------------------------------------------------


def test_a_pool_class_binds_its_service_by_its_type_parameter() -> None:
    assert TypedPool.service == "native_demo.service:NativeDemo"
    assert RetryingJournalPool.service == "call_services:Journal"  # inherited
    with pytest.raises(TypeError, match="drop the service attribute"):

        class Conflicting(WorkerPool[NativeDemo]):
            service = "call_services:Journal"

    class Local(WorkerService):
        @expose
        def ping(self, x: int) -> int:
            return x

    with pytest.raises(TypeError, match="top level of an importable module"):

        class LocalPool(WorkerPool[Local]):
            pass


def test_typed_and_string_calls_reach_the_same_handler() -> None:
    async def scenario() -> None:
        async with TypedPool() as pool:
            typed = await pool.call(NativeDemo.crc32, b"abc")
            assert typed == await pool.call("crc32", b"abc") == zlib.crc32(b"abc")
            assert await pool.call(NativeDemo.crc32, data=b"kw") == zlib.crc32(b"kw")

    run(scenario())


def test_a_handler_of_another_service_is_refused_before_dispatch() -> None:
    async def scenario() -> None:
        async with TypedPool() as pool:
            before = pool.snapshot().pids
            with pytest.raises(TypeError, match=r"Journal\.record is not an @expose'd handler"):
                await pool.call(Journal.record, "/nonexistent", "x")  # type: ignore[arg-type]
            with pytest.raises(TypeError, match=r"Hostile\.ping is not an @expose'd handler"):
                await pool.call(Hostile.ping, 1)  # type: ignore[arg-type]  # same name as ours
            with pytest.raises(TypeError, match=r"NativeDemo\.setup is not an @expose'd"):
                await pool.call(NativeDemo.setup)
            with pytest.raises(TypeError, match="not an @expose'd"):
                await pool.call([], 1)  # type: ignore[call-overload]  # unhashable
            with pytest.raises(RemoteError) as unknown:
                await pool.call("no_such_method")
            assert unknown.value.kind == "unknown-method"
            snap = pool.snapshot()
            assert (snap.in_flight, snap.queue_depth, snap.pids) == (0, 0, before)

    run(scenario())


# --- options -----------------------------------------------------------------------------------

BAD_OPTIONS = [
    ({"timeout_s": 0}, "timeout_s"),
    ({"timeout_s": float("inf")}, "timeout_s"),
    ({"timeout_s": True}, "timeout_s"),
    ({"retries_on_crash": -1}, "retries_on_crash"),
    ({"retries_on_crash": 1.5}, "retries_on_crash"),
    ({"idempotent": "no"}, "idempotent"),
    ({"cancel": "abort"}, "cancel"),
    ({"idempotent": False, "retries_on_crash": 1}, "idempotent=False forbids"),
]


@pytest.mark.parametrize(("options", "message"), BAD_OPTIONS, ids=[m for _, m in BAD_OPTIONS])
def test_bad_options_are_refused_when_the_view_is_made(options: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        TypedPool().options(**options)


def test_a_view_refines_another_and_leaves_the_pool_alone() -> None:
    pool = TypedPool()
    patient = pool.options(timeout_s=300)
    killing = patient.options(cancel="kill")
    assert "timeout_s=300" in repr(killing) and "cancel='kill'" in repr(killing)
    assert "cancel=None" in repr(patient)
    with pytest.raises(ValueError, match="idempotent=False forbids"):
        pool.options(retries_on_crash=2).options(idempotent=False)


def test_a_per_call_timeout_replaces_the_pools() -> None:
    """The pool allows 20 s; the call allows 0.3 s and ends as CallTimeout naming 0.3 s."""

    async def scenario() -> None:
        async with TypedPool() as pool:
            with pytest.raises(CallTimeout) as info:
                await pool.options(timeout_s=0.3).call(NativeDemo.spin)
            assert info.value.timeout_s == 0.3 and "0.3s deadline" in str(info.value)
            assert await pool.call(NativeDemo.ping, 1) == 1

    run(scenario(), timeout=15)


def test_per_call_retries_replace_the_pools(tmp_path: Path) -> None:
    journal = str(tmp_path / "journal")

    async def scenario() -> None:
        async with JournalPool() as pool:  # retries_on_crash = 0
            with pytest.raises(WorkerCrashed) as once:
                await pool.call(Journal.record_then_crash, journal, "plain")
            assert once.value.attempts == 1 and "retries_on_crash = 0" in str(once.value)
            with pytest.raises(PoisonCall) as twice:
                await pool.options(retries_on_crash=1).call(
                    Journal.record_then_crash, journal, "retried"
                )
            assert twice.value.attempts == 2
        assert lines(journal) == ["plain", "retried", "retried"]

    run(scenario())


# --- at most once ------------------------------------------------------------------------------


def test_a_call_that_is_not_idempotent_never_runs_twice_after_a_crash(tmp_path: Path) -> None:
    """The pool retries crashes once; the handler declared not idempotent, and a call marked
    so, each run exactly once and fail saying why they were not retried."""
    journal = str(tmp_path / "journal")

    async def scenario() -> None:
        async with RetryingJournalPool() as pool:
            with pytest.raises(WorkerCrashed) as declared:
                await pool.call(Journal.charge_then_crash, journal, "declared")
            with pytest.raises(WorkerCrashed) as marked:
                await pool.options(idempotent=False).call(
                    Journal.record_then_crash, journal, "marked"
                )
            with pytest.raises(PoisonCall):  # the control: an idempotent call is retried
                await pool.call(Journal.record_then_crash, journal, "idempotent")
            with pytest.raises(ValueError, match="declared @expose"):
                await pool.options(retries_on_crash=1).call(Journal.charge_then_crash, journal, "")
            for error in (declared.value, marked.value):
                assert type(error) is WorkerCrashed and error.attempts == 1
                assert "not idempotent" in str(error)
        assert lines(journal) == ["declared", "marked", "idempotent", "idempotent"]

    run(scenario())


class PipelinedJournalPool(JournalPool):
    call_timeout_s = 5.0
    pipeline_window_s = 0.05  # a loaded machine's slow warm-up still leaves step() pipelined


def test_calls_pipelined_around_a_crash_run_at_most_once(tmp_path: Path) -> None:
    """Cheap non-idempotent calls stream to one worker around one that segfaults. Those before
    it finished: each either returned or, if its reply died with the worker, failed saying it
    had finished; those behind it never started and run once on the fresh worker. Whatever
    the race, the journal holds every call exactly once."""
    journal = str(tmp_path / "journal")

    async def scenario() -> None:
        async with PipelinedJournalPool() as pool:
            for i in range(30):  # the method's cost is now measured: it will be pipelined
                await pool.call(Journal.step, journal, f"warm{i}")
            once = pool.options(idempotent=False)
            tags = [f"t{i}" for i in range(30)]
            tasks = [
                asyncio.create_task(once.call(Journal.step, journal, tag, crash=(tag == "t10")))
                for tag in tags
            ]
            await asyncio.sleep(0)  # every call submitted, none answered
            assert pool.snapshot().workers[0].in_flight > 11  # pipelined past the crash
            outcomes = dict(
                zip(tags, await asyncio.gather(*tasks, return_exceptions=True), strict=True)
            )
            crashed = outcomes.pop("t10")
            assert isinstance(crashed, WorkerCrashed) and "while running step()" in str(crashed)
            for tag, outcome in outcomes.items():
                if isinstance(outcome, WorkerCrashed):
                    assert int(tag[1:]) < 10 and "had finished" in str(outcome), outcome
                else:
                    assert outcome == tag
            assert all(outcomes[f"t{i}"] == f"t{i}" for i in range(11, 30))
        ran = [t for t in lines(journal) if not t.startswith("warm")]
        assert sorted(ran) == sorted(tags)  # each exactly once, t10 included

    run(scenario())


# --- the service module must not load native code into Gru -------------------------------------

NATIVE_AT_IMPORT = """
from native_demo import _native  # the mistake: at import time, in Gru
from minions.workers import WorkerService, expose

class Eager(WorkerService):
    {allow}
    @expose
    def ping(self, x: int) -> int:
        return _native.ping(x)
"""

CRASH_AT_IMPORT = """
from native_demo import _native
_native.segfault()  # a native library that crashes while it loads
from minions.workers import WorkerService

class Doomed(WorkerService):
    pass
"""


def _module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str, text: str) -> None:
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(text))
    monkeypatch.syspath_prepend(str(tmp_path))


def test_a_service_module_that_loads_native_code_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _module(tmp_path, monkeypatch, "eager_service", NATIVE_AT_IMPORT.format(allow=""))

    class EagerPool(WorkerPool):
        service = "eager_service:Eager"
        workers = 1

    async def scenario() -> None:
        with pytest.raises(PoolUnavailable) as info:
            await EagerPool().startup()
        assert "['native_demo._native']" in str(info.value) and "setup()" in str(info.value)
        assert "eager_service" not in sys.modules  # refused before Gru imported it

    run(scenario())


def test_parent_safe_allows_a_package_known_to_be_safe(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    allow = 'parent_safe = ("native_demo",)'
    _module(tmp_path, monkeypatch, "allowed_service", NATIVE_AT_IMPORT.format(allow=allow))

    class AllowedPool(WorkerPool):
        service = "allowed_service:Eager"
        workers = 1

    async def scenario() -> None:
        async with AllowedPool() as pool:
            assert await pool.call("ping", 4) == 4

    run(scenario())


def test_a_service_module_that_crashes_at_import_does_not_kill_gru(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _module(tmp_path, monkeypatch, "doomed_service", CRASH_AT_IMPORT)

    class DoomedPool(WorkerPool):
        service = "doomed_service:Doomed"
        workers = 1

    async def scenario() -> None:
        with pytest.raises(PoolUnavailable, match="killed a fresh interpreter with SIGSEGV"):
            await DoomedPool().startup()
        assert "doomed_service" not in sys.modules

    run(scenario())
