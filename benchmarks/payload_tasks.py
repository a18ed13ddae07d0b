"""What every contender of ``bench_payload.py`` runs in its child process, for one payload.

``length`` returns how many bytes arrived, ``echo`` sends them back. The executors call the
module-level functions (picklable); Minions serves the same two through a ``WorkerService``,
once with ``Buffer`` parameters (the zero-copy form) and once with ``bytes`` (a private copy in
the worker, which is what a handler written without thinking about payloads gets).
"""

from __future__ import annotations

from minions.workers import Buffer, WorkerService, expose


def length(data: bytes) -> int:
    return len(data)


def echo(data: bytes) -> bytes:
    return data


class PayloadBench(WorkerService):
    @expose
    def length(self, data: Buffer) -> int:
        return len(data)

    @expose
    def echo(self, data: Buffer) -> Buffer:
        return data  # the argument's own arena space: no copy in the worker

    @expose
    def length_bytes(self, data: bytes) -> int:
        return len(data)

    @expose
    def echo_bytes(self, data: bytes) -> bytes:
        return data
