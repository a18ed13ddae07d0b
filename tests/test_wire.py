"""The wire: message round trips, worker-side validation, and hostile peers on the socket."""

from __future__ import annotations

import zlib

import msgspec
import pytest
import zmq

from conftest import run
from minions.ipc import messages as m
from minions.ipc.service import describe, expose
from minions.ipc.worker import _Handler, serve_call
from minions.ops import metrics
from minions.workers import WorkerService
from pools import DemoPool


class Echo(WorkerService):
    @expose
    def add(self, a: int, b: int = 10) -> int:
        return a + b

    @expose
    def explode(self) -> None:
        raise KeyError("no such key")


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


def test_expired_call_is_not_started() -> None:
    call = m.Call(1, "add", msgspec.Raw(m.encoder.encode((1, 2))), msgspec.Raw(m.EMPTY_MAP), 1.0)
    reply = m.parent_decoder.decode(serve_call(_handlers(), call))
    assert isinstance(reply, m.Failure) and reply.kind is m.FailureKind.EXPIRED


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
            worker = next(iter(pool._workers.values()))
            assert pool._channel is not None
            pool._channel.send(worker.identity, [b"\xc1not msgpack"])
            pool._channel.send(worker.identity, [m.encoder.encode(["call", "too", "short"])])
            assert await pool.call("pid") in pool.worker_pids()
            assert worker.pid in pool.worker_pids()

    run(scenario())
