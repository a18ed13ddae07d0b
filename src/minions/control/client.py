"""The client side of the control endpoint: one request, one reply, a deadline on both.

Used by the ``minions`` CLI in a fresh process, so it is synchronous. Before any ZeroMQ traffic
the socket is probed with a plain ``connect()``: a Gru that is not running (no socket, a stale
one, another user's) is then one clear line at once instead of a wait for a reply that never
comes.
"""

from __future__ import annotations

from pathlib import Path

import zmq

from minions.control import messages as m
from minions.control.endpoint import ControlUnavailable, check_reachable


class ControlClient:
    """Talks to the Gru whose control socket is ``path``."""

    def __init__(self, path: Path, *, timeout_s: float = 10.0) -> None:
        self.path = path
        self.timeout_s = timeout_s

    def request(self, request: m.Request, timeout_s: float | None = None) -> m.Reply:
        """Send ``request`` and return Gru's reply; :class:`ControlUnavailable` if none came."""
        check_reachable(self.path)
        timeout = self.timeout_s if timeout_s is None else timeout_s
        ctx = zmq.Context()
        sock = ctx.socket(zmq.REQ)
        try:
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.SNDTIMEO, int(timeout * 1000))
            sock.setsockopt(zmq.RCVTIMEO, int(timeout * 1000))
            sock.connect(f"ipc://{self.path}")
            sock.send(m.encoder.encode(request))
            payload = sock.recv()
        except zmq.Again:
            raise ControlUnavailable(
                f"Gru at {self.path} did not answer within {timeout:g}s; it may be blocked "
                "(see its logs) or still working on the request (try a longer --timeout)"
            ) from None
        finally:
            sock.close(linger=0)
            ctx.term()
        try:
            return m.reply_decoder.decode(payload)
        except Exception as exc:
            raise ControlUnavailable(
                f"Gru at {self.path} answered with something this client does not understand "
                f"({exc}); are both the same Minions version?"
            ) from None

    def status(self) -> m.Status | m.Refused:
        reply = self.request(m.StatusRequest())
        return reply if isinstance(reply, m.Status | m.Refused) else _unexpected(reply)

    def restart_pool(self, pool: str, timeout_s: float) -> m.PoolRestarted | m.Refused:
        reply = self.request(m.RestartPool(pool), timeout_s)
        return reply if isinstance(reply, m.PoolRestarted | m.Refused) else _unexpected(reply)

    def stop_orchestration(self, oid: str, timeout_s: float) -> m.OrchestrationStopped | m.Refused:
        reply = self.request(m.StopOrchestration(oid), timeout_s)
        if isinstance(reply, m.OrchestrationStopped | m.Refused):
            return reply
        return _unexpected(reply)


def _unexpected(reply: m.Reply) -> m.Refused:
    return m.Refused(f"Gru answered with an unexpected {type(reply).__name__}")
