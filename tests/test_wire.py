"""The wire: message round trips, worker-side validation, and hostile peers on the socket."""

from __future__ import annotations

import asyncio
import zlib

import msgspec
import pytest
import zmq

from conftest import run
from minions.errors import PoolUnavailable, RemoteError
from minions.ipc import messages as m
from minions.ipc.service import describe, expose
from minions.ipc.worker import _Handler, serve_call
from minions.ops import metrics
from minions.ops.metrics import REGISTRY
from minions.workers import WorkerPool, WorkerService
from pools import DemoPool


class Echo(WorkerService):
    @expose
    def add(self, a: int, b: int = 10) -> int:
        return a + b

    @expose
    def explode(self) -> None:
        raise KeyError("no such key")

    @expose
    def scale(self, x: int, *, factor: int = 2, offset: int) -> int:
        return x * factor + offset


def _handlers() -> dict[str, _Handler]:
    service = Echo()
    return {name: _Handler(spec, getattr(service, name)) for name, spec in describe(Echo).items()}


def _call(method: str, *args: object, **kwargs: object) -> m.ToParent:
    call = m.Call(
        1,
        method,
        msgspec.Raw(m.encoder.encode(args)),
        msgspec.Raw(m.encoder.encode(kwargs) if kwargs else m.EMPTY_MAP),
    )
    wire = m.encoder.encode(call)
    return m.parent_decoder.decode(serve_call(_handlers(), m.worker_decoder.decode(wire)))


@pytest.mark.parametrize(
    ("method", "args", "kwargs", "expected"),
    [
        ("add", (1, 2), {}, 3),
        ("add", (1,), {}, 11),
        ("add", (), {"a": 1, "b": 5}, 6),
        ("add", (1,), {"b": 5}, 6),
    ],
)
def test_worker_binds_and_validates_arguments(
    method: str, args: tuple[object, ...], kwargs: dict[str, object], expected: int
) -> None:
    reply = _call(method, *args, **kwargs)
    assert isinstance(reply, m.Result)
    assert msgspec.msgpack.decode(reply.value) == expected


@pytest.mark.parametrize(
    ("args", "kwargs", "expected"),
    [
        ((3,), {"offset": 1}, 7),
        ((3,), {"factor": 10, "offset": 1}, 31),
        ((), {"x": 3, "offset": 0}, 6),
        ((3, 10, 1), {}, "positional"),  # keyword-only parameters are never positional
        ((3,), {}, "offset"),  # a required keyword-only one is required
    ],
)
def test_keyword_only_parameters_are_passed_by_name(
    args: tuple[object, ...], kwargs: dict[str, object], expected: object
) -> None:
    reply = _call("scale", *args, **kwargs)
    if isinstance(expected, int):
        assert isinstance(reply, m.Result), reply
        assert msgspec.msgpack.decode(reply.value) == expected
    else:
        assert isinstance(reply, m.Failure) and reply.kind is m.FailureKind.INVALID_ARGS
        assert str(expected) in reply.message


@pytest.mark.parametrize(
    ("args", "kwargs", "kind"),
    [
        (("1", 2), {}, m.FailureKind.INVALID_ARGS),
        ((1, 2, 3), {}, m.FailureKind.INVALID_ARGS),
        ((), {}, m.FailureKind.INVALID_ARGS),
        ((1,), {"c": 1}, m.FailureKind.INVALID_ARGS),
        ((1,), {"a": 1}, m.FailureKind.INVALID_ARGS),
    ],
)
def test_worker_rejects_bad_arguments(
    args: tuple[object, ...], kwargs: dict[str, object], kind: m.FailureKind
) -> None:
    reply = _call("add", *args, **kwargs)
    assert isinstance(reply, m.Failure) and reply.kind is kind


def test_worker_reports_handler_exceptions_and_unknown_methods() -> None:
    reply = _call("explode")
    assert isinstance(reply, m.Failure) and reply.kind is m.FailureKind.EXCEPTION
    assert reply.type_name == "KeyError" and "raise KeyError" in reply.traceback
    reply = _call("missing")
    assert isinstance(reply, m.Failure) and reply.kind is m.FailureKind.UNKNOWN_METHOD


def test_expose_rejects_star_args() -> None:
    with pytest.raises(TypeError, match="args"):

        class Bad(WorkerService):
            @expose
            def f(self, *args: int) -> None: ...


def test_every_message_round_trips() -> None:
    raw = msgspec.Raw(m.encoder.encode([1]))
    for msg in (
        m.Hello(1, 2, 3, "svc:S", ("a", "b"), "tok"),
        m.Failure(4, m.FailureKind.INVALID_ARGS, "TypeError", "bad", "tb"),
        m.Heartbeat(1.5),
    ):
        assert m.parent_decoder.decode(m.encoder.encode(msg)) == msg
    for msg in (m.Shutdown("bye"), m.Heartbeat()):
        assert m.worker_decoder.decode(m.encoder.encode(msg)) == msg
    result = m.parent_decoder.decode(m.encoder.encode(m.Result(7, raw)))
    assert isinstance(result, m.Result) and bytes(result.value) == bytes(raw)


def test_rogue_peers_are_counted_and_ignored() -> None:
    """Garbage frames, a forged hello and odd multipart shapes do not disturb the pool."""

    async def scenario() -> None:
        async with DemoPool() as pool:
            counter = metrics.PROTOCOL_ERRORS.labels("DemoPool", "unauthenticated")
            before = counter._value.get()
            ctx = zmq.Context()
            rogue = ctx.socket(zmq.DEALER)
            rogue.setsockopt(zmq.LINGER, 0)
            rogue.connect(pool._endpoint.address)  # type: ignore[union-attr]
            forged = m.Hello(m.PROTOCOL_VERSION, 1, 1, "x:Y", (), "wrong-token")
            rogue.send(b"\xc1garbage")
            rogue.send(m.encoder.encode(forged))
            rogue.send_multipart([b"a", b"b"])
            for i in range(50):  # the pool keeps serving while the rogue talks
                assert await pool.call("crc32", b"%d" % i) == zlib.crc32(b"%d" % i)
            assert await pool._wait_until(lambda: counter._value.get() >= before + 3, 5)
            assert pool.snapshot().workers_ready == 2
            rogue.close()
            ctx.term()

    run(scenario())


def test_garbage_to_a_worker_is_dropped_and_it_keeps_serving() -> None:
    async def scenario() -> None:
        async with DemoPool() as pool:
            pids = pool.worker_pids()
            for identity in pool._supervisor._workers:  # the parent's own channel to each worker
                pool._send(identity, [b"\xc1not msgpack"])
                pool._send(identity, [m.encoder.encode(["call", "too", "short"])])
            for _ in range(4):
                assert await pool.call("pid") in pids
            assert pool.worker_pids() == pids

    run(scenario())


class HostilePool(WorkerPool):
    service = "services:Hostile"
    workers = 1
    call_timeout_s = 10.0


def test_a_worker_survives_whatever_its_handler_returns_or_raises() -> None:
    """Found by fuzzing: an exception whose __str__ raises, and a result nested too deeply to
    encode, each killed the worker; both are RemoteErrors now and the worker serves on."""

    async def scenario() -> None:
        async with HostilePool() as pool:
            pid = await pool.call("ping", 1) and pool.worker_pids()[0]
            with pytest.raises(RemoteError) as info:
                await pool.call("unprintable")
            assert info.value.kind == "exception" and info.value.type_name == "Unprintable"
            assert "unprintable message" in info.value.message
            with pytest.raises(RemoteError) as info:
                await pool.call("deep", 200_000)
            assert info.value.kind == "unencodable-result"
            assert "RecursionError" in info.value.type_name or "recursion" in info.value.message
            assert await pool.call("ping", 2) == 2
            assert pool.worker_pids() == [pid] and pool.snapshot().restarts == 0

    run(scenario())


def test_an_undecodable_reply_fails_its_call_at_once_and_the_drain_goes_on() -> None:
    """Found by fuzzing: a frame nested 200,000 deep made the parent's decoder raise
    RecursionError out of the channel's drain; later an innocent worker's call timed out."""

    async def scenario() -> None:
        decode_errors = metrics.PROTOCOL_ERRORS.labels("HostilePool", "decode")
        before = decode_errors._value.get()
        async with HostilePool() as pool:
            pid = pool.worker_pids()[0]
            for i in range(20):  # measured costs: the calls below are pipelined together
                assert await pool.call("deep_raw", 2) == [[[]]]
                assert await pool.call("ping", i) == i
            bad = asyncio.create_task(pool.call("deep_raw", 200_000))
            pings = [asyncio.create_task(pool.call("ping", i)) for i in range(20)]
            await asyncio.sleep(0)
            assert pool.snapshot().in_flight > 1  # the bad reply arrives amid good ones
            with pytest.raises(RemoteError) as info:
                await bad
            assert info.value.kind == "invalid-result" and "RecursionError" in info.value.message
            assert await asyncio.gather(*pings) == list(range(20))
            assert decode_errors._value.get() == before + 1
            assert pool.worker_pids() == [pid]  # nobody was killed for it

    run(scenario())


def test_unknown_method_names_share_one_metric_label() -> None:
    async def scenario() -> None:
        async with DemoPool() as pool:
            for i in range(20):
                with pytest.raises(RemoteError):
                    await pool.call(f"nope_{i}")
        methods = {
            sample.labels["method"]
            for family in REGISTRY.collect()
            if family.name == "minions_worker_calls"
            for sample in family.samples
            if sample.labels.get("pool") == "DemoPool"
        }
        assert "<unknown>" in methods and not any(m.startswith("nope_") for m in methods)

    run(scenario())


def test_a_worker_from_another_deploy_is_refused_with_a_clear_error() -> None:
    class DriftedPool(WorkerPool):
        service = "services:Drifted"
        workers = 1

    async def scenario() -> None:
        pool = DriftedPool()
        try:
            with pytest.raises(PoolUnavailable) as info:
                await pool.startup()
        finally:
            await pool.shutdown()
        assert "added_by_a_later_deploy" in str(info.value) and "older deploy" in str(info.value)
        assert pool.worker_pids() == []

    run(scenario())
