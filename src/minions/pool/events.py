"""What the Supervisor tells the Dispatcher: which worker, and how it ended.

The Supervisor owns processes and the Dispatcher owns calls; they meet only through these
values (and a few narrow methods on the pool front). A :class:`WorkerRef` names a worker
without handing out its process record; a :class:`Death` is emitted exactly once per worker
that ended, after its process was reaped and judged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from minions.pool.verdict import Verdict

if TYPE_CHECKING:
    from minions.ipc.arena import ParentArena


@dataclass(frozen=True, slots=True)
class WorkerRef:
    """A worker as the calls side knows it: the wire identity plus the ids errors name, and its
    shared-memory arena (``None`` when the pool runs without one, and for a remote worker), valid
    until its Death."""

    worker_id: int
    pid: int
    identity: bytes
    arena: ParentArena | None = None
    host: str = ""  # the worker host it runs on; "" for a local worker


@dataclass(frozen=True, slots=True)
class Death:
    """One worker ended. ``running_call`` is the id of the call it had started and not finished
    (from its shared call marker), ``None`` if it died between calls. The calls it still owed
    are the Dispatcher's to look up: they are its state, not the Supervisor's."""

    worker: WorkerRef
    verdict: Verdict
    running_call: int | None


@dataclass(frozen=True, slots=True)
class Settlement:
    """What settling a Death did, for the Supervisor's one log line about it: the method the
    worker was running (``None``: it died between calls) and how many calls it owed went back
    to the queue."""

    method: str | None = None
    requeued: int = 0
