"""The wire between a pool and a worker host: control Structs beside relayed worker frames.

Design note. A host keeps one DEALER connection per pool; the pool's tcp ROUTER sees it as one
routing id, which the host draws at random for each *session* (a hello, the workers it then
announces, up to the moment either side gives up on the other). Every message is
``[worker, payload, ...]``: ``worker`` is the local ipc identity of one of the host's workers
and the payloads are that worker's own frames (:mod:`minions.ipc.messages`), relayed untouched;
or ``worker`` is empty and the one payload is a :data:`HostMessage` or :data:`PoolMessage`.
A worker's results and its host's report of its death travel on the same connection, in that
order, so the pool settles a remote death exactly as a local one: answers first.
"""

from __future__ import annotations

import msgspec

HOST_PROTOCOL = 1

#: The ``worker`` frame of a control message.
CONTROL = b""


class HostHello(msgspec.Struct, frozen=True, tag="host-hello", array_like=True):
    """First message of a session. The host's name is not in it: the pool takes it from the
    CURVE key the connection authenticated with."""

    protocol: int
    worker_protocol: int
    service: str
    methods: tuple[str, ...]
    workers: int
    pid: int
    hostname: str = ""


class WorkerUp(msgspec.Struct, frozen=True, tag="worker-up", array_like=True):
    """A worker of the host booted and takes calls (``worker``: its ipc identity)."""

    worker: bytes
    worker_id: int
    pid: int


class WorkerLeaving(msgspec.Struct, frozen=True, tag="worker-leaving", array_like=True):
    """The host's Supervisor retires (``doomed=False``: it waits for :class:`Drained`) or is
    killing a worker: send it nothing more."""

    worker: bytes
    doomed: bool


class WorkerDown(msgspec.Struct, frozen=True, tag="worker-down", array_like=True):
    """A worker ended, judged once by the host (:class:`~minions.pool.verdict.Verdict`), after
    the host relayed every frame it had written."""

    worker: bytes
    cause: str
    returncode: int
    stack: str = ""
    running_call: int | None = None


class HostBye(msgspec.Struct, frozen=True, tag="host-bye", array_like=True):
    """The host is stopping (SIGTERM) and its workers have ended: a clean end, not a loss."""

    reason: str = ""


class Beat(msgspec.Struct, frozen=True, tag="beat", array_like=True):
    """Either side is alive; sent every ``host_timeout_s / 4``."""


class Welcome(msgspec.Struct, frozen=True, tag="welcome", array_like=True):
    """The pool accepted the hello; ``timeout_s`` is how long either side waits for the other."""

    pool: str
    timeout_s: float


class Refused(msgspec.Struct, frozen=True, tag="refused", array_like=True):
    """The pool will not take this session (``rejoin``: the host should start a fresh one)."""

    reason: str
    rejoin: bool = False


class Kill(msgspec.Struct, frozen=True, tag="kill", array_like=True):
    """Kill a worker for the pool: ``cause`` is ``timeout`` (dump its stack first),
    ``cancelled`` or ``lost``."""

    worker: bytes
    cause: str
    method: str = ""
    timeout_s: float = 0.0


class Retire(msgspec.Struct, frozen=True, tag="retire", array_like=True):
    """Retire a worker (it served ``max_calls_per_worker``, or ``minions pools restart``)."""

    worker: bytes
    reason: str


class Drained(msgspec.Struct, frozen=True, tag="drained", array_like=True):
    """A leaving worker owes the pool nothing any more: stop it."""

    worker: bytes


HostMessage = HostHello | WorkerUp | WorkerLeaving | WorkerDown | HostBye | Beat
PoolMessage = Welcome | Refused | Kill | Retire | Drained | Beat

encoder = msgspec.msgpack.Encoder()
host_decoder: msgspec.msgpack.Decoder[HostMessage] = msgspec.msgpack.Decoder(HostMessage)
pool_decoder: msgspec.msgpack.Decoder[PoolMessage] = msgspec.msgpack.Decoder(PoolMessage)
