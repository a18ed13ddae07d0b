"""How a pool starts worker processes: forked from its zygote, or exec'd, with a fallback.

Design note. The :class:`Spawner` is the Supervisor's one door to new processes. With
``spawn = "zygote"`` (the default) it keeps one zygote per pool (``pool/zygote.py``) and asks it
for each worker; with ``spawn = "exec"``, and whenever the zygote cannot serve, it starts a fresh
interpreter (``python -m minions.ipc.worker``). Either way the Supervisor gets the same thing
back, a :class:`Spawned` child of this process with a pidfd on it, and reaps it the same way.

The default is the zygote: a respawn then costs a fork and ``setup()`` instead of an interpreter
start and every import, and forked workers share the zygote's pages (see
``docs/deployment/performance.md``). It is safe because the zygote is a fresh interpreter that
never ran ``setup()`` nor touched native code, and it refuses to fork a service whose import
started a thread. Exec stays for services whose *module* must not be forked (it opens
connections or devices at import), and as the fallback:

- until the pool's first zygote is ready, requests wait for it (it is importing what exec would
  import anyway); after it has died they go to exec until a new one is ready, so no spawn, and
  no call, ever waits on a zygote that is down;
- requests a dying zygote never answered are spawned by exec at once;
- a zygote that refused the service is not restarted: the pool spawns by exec from then on.

The zygote is restarted with the pool's restart backoff (the first restart is immediate) and
counted (``minions_zygote_restarts_total``, ``PoolSnapshot.zygote_restarts``); spawns are
counted by how they were made (``minions_worker_spawns_total{via}``).

Workers forked by the zygote are re-parented to this process, which therefore becomes a child
subreaper (``PR_SET_CHILD_SUBREAPER``): that is what keeps their exact exit statuses ours. It
also makes this process the new parent of any orphaned descendant (a helper a native library
started, say); those are reaped by Gru's orphan reaper, and nothing here ever waits for a pid it
did not spawn, so no status is stolen from their owners.
"""

from __future__ import annotations

import asyncio
import ctypes
import dataclasses
import logging
import os
import secrets
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Protocol

from minions.ipc.endpoint import Endpoint
from minions.ipc.worker import TOKEN_ENV, WorkerArgs
from minions.ops import metrics, reaper
from minions.pool.config import PoolConfig, SpawnMode
from minions.pool.intensity import Backoff
from minions.pool.zygote import Zygote, ZygoteState

log = logging.getLogger("minions.pool")

_PR_SET_CHILD_SUBREAPER = 36


@dataclass(frozen=True, slots=True)
class WorkerSpec:
    """Everything one worker needs to boot, whichever way it is spawned. ``pass_fds`` are
    descriptors of this process handed to the worker (a shared-memory arena, say); the worker
    finds them, in this order, in ``WorkerArgs.fds`` under the numbers it received them as. The
    caller keeps them open until ``spawned`` or ``spawn_failed`` came for this spec."""

    args: WorkerArgs
    token: str
    pass_fds: tuple[int, ...] = ()

    @property
    def worker_id(self) -> int:
        return self.args.worker_id

    @classmethod
    def for_pool(cls, endpoint: Endpoint, config: PoolConfig, worker_id: int) -> WorkerSpec:
        """The spec of worker ``worker_id`` of the pool listening at ``endpoint``."""
        args = WorkerArgs(
            endpoint=endpoint.address,
            service=config.service,
            worker_id=worker_id,
            identity=f"w{worker_id}-{secrets.token_hex(4)}",  # unguessable
            crash_file=str(endpoint.crash_file(worker_id, 0)),
            parent_pid=os.getpid(),
            heartbeat_s=config.heartbeat_s,
        )
        return cls(args, endpoint.token)


@dataclass(frozen=True, slots=True)
class Spawned:
    """A worker process that exists: a child of this process, watched through ``pidfd``."""

    spec: WorkerSpec
    pid: int
    pidfd: int
    via: SpawnMode
    popen: subprocess.Popen[bytes] | None = None  # exec only


class SpawnEvents(Protocol):
    """What the Spawner reports to the Supervisor, on the event loop (or inside ``spawn``)."""

    def spawned(self, worker: Spawned) -> None: ...
    def spawn_failed(self, spec: WorkerSpec, why: str) -> None: ...


def child_env(token: str | None) -> dict[str, str]:
    """The environment of a worker (``token`` set) or of a zygote (no token, ever)."""
    env = dict(os.environ)
    env.pop(TOKEN_ENV, None)
    if token is None:
        env.pop("PYTHONFAULTHANDLER", None)  # the zygote must not install faulthandler
    else:
        env[TOKEN_ENV] = token
    # The child must import what the parent can: its sys.path, '' made explicit.
    paths = [p or os.getcwd() for p in sys.path]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    return env


def spawn_exec(spec: WorkerSpec) -> Spawned:
    """Start a fresh interpreter running the worker; raises ``OSError`` if it cannot."""
    args = dataclasses.replace(spec.args, fds=spec.pass_fds)  # pass_fds keeps their numbers
    popen = subprocess.Popen(
        [sys.executable, "-m", "minions.ipc.worker", *args.argv()],
        env=child_env(spec.token),
        stdin=subprocess.DEVNULL,
        pass_fds=spec.pass_fds,
    )
    reaper.claim(popen.pid)  # we read its exit status: the orphan reaper must leave it
    try:
        pidfd = os.pidfd_open(popen.pid)
    except OSError:
        popen.kill()
        popen.wait()
        reaper.release(popen.pid)
        raise
    return Spawned(spec, popen.pid, pidfd, SpawnMode.EXEC, popen)


def become_subreaper() -> bool:
    """Make this process the parent of orphaned descendants (forked workers among them).
    Process-wide and never undone; ``False`` where the kernel does not offer it."""
    try:
        return bool(
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
        )
    except (OSError, AttributeError):
        return False


class Spawner:
    """Spawns a pool's workers through its zygote, or by exec; owns the zygote's lifecycle."""

    def __init__(self, config: PoolConfig, pool_name: str, events: SpawnEvents) -> None:
        self.cfg = config
        self.pool_name = pool_name
        self.mode = config.spawn
        self.zygote_restarts = 0
        self._events = events
        self._zygote: Zygote | None = None
        self._asked: dict[int, WorkerSpec] = {}  # requests the zygote has not answered
        self._backoff = Backoff(config.restart_backoff_initial_s, config.restart_backoff_max_s)
        self._restart_at: float | None = None
        self._first = True  # the pool's first zygote: spawns wait for it to be ready
        self._closing = False
        self._holds_reaper = False
        self._gone: asyncio.Future[None] | None = None
        self._spawns = {
            mode: metrics.WORKER_SPAWNS.labels(pool_name, mode.value) for mode in SpawnMode
        }

    @property
    def zygote_pid(self) -> int:
        """Pid of the zygote workers are forked from now; 0 while there is none ready (exec
        mode, refused, down or restarting: spawns go to exec)."""
        zygote = self._zygote
        return zygote.pid if zygote is not None and zygote.state is ZygoteState.READY else 0

    def start(self) -> None:
        """Start the zygote (zygote mode); on the running event loop."""
        if self.mode is not SpawnMode.ZYGOTE:
            return
        if not become_subreaper():
            log.warning(
                "pool %s: this kernel cannot make Gru a child subreaper; workers are spawned "
                "with exec", self.pool_name,
            )  # fmt: skip
            self.mode = SpawnMode.EXEC
            return
        reaper.hold(log)  # a subreaper adopts orphans (a native helper's): someone reaps them
        self._holds_reaper = True
        self._start_zygote()

    def _start_zygote(self) -> None:
        self._restart_at = None
        zygote = Zygote(self.cfg.service, child_env(None), self)
        try:
            zygote.start()
        except OSError as exc:
            log.error("pool %s: cannot start a zygote: %s", self.pool_name, exc)
            self._restart_at = time.monotonic() + self._backoff.next_delay()
            self._first = False
            return
        self._zygote = zygote
        log.info("pool %s: zygote started (pid %d)", self.pool_name, zygote.pid)

    def spawn(self, spec: WorkerSpec) -> None:
        """Start one worker; the answer comes through ``spawned``/``spawn_failed``, at once
        (exec) or when the zygote answers."""
        zygote = self._zygote if self._zygote_takes_requests() else None
        if zygote is not None and zygote.submit(
            spec.worker_id, spec.args.argv(), spec.token, spec.pass_fds
        ):
            self._asked[spec.worker_id] = spec
            return
        self._exec(spec)

    def _zygote_takes_requests(self) -> bool:
        """A ready zygote does; so does the pool's first one while it starts (exec would import
        just what it imports); a restarted one only once it is ready."""
        state = self._zygote.state if self._zygote is not None else None
        return state is ZygoteState.READY or (state is ZygoteState.STARTING and self._first)

    def _exec(self, spec: WorkerSpec) -> None:
        try:
            spawned = spawn_exec(spec)
        except OSError as exc:
            self._events.spawn_failed(spec, f"cannot start a worker process: {exc}")
            return
        self._spawns[SpawnMode.EXEC].inc()
        self._events.spawned(spawned)

    def tick(self, now: float) -> None:
        """On the pool's tick: the zygote's deadlines, and its restart once the backoff ran."""
        if self._zygote is not None:
            self._zygote.check(now, self.cfg.boot_timeout_s)
        elif self._restart_at is not None and now >= self._restart_at and not self._closing:
            self._restart()

    def _restart(self) -> None:
        self.zygote_restarts += 1
        metrics.ZYGOTE_RESTARTS.labels(self.pool_name).inc()
        self._start_zygote()

    # --- what the zygote reports (ZygoteEvents) -------------------------------------------------

    def forked(self, worker_id: int, pid: int, pidfd: int) -> None:
        spec = self._asked.pop(worker_id)
        self._backoff.succeeded()
        self._spawns[SpawnMode.ZYGOTE].inc()
        self._events.spawned(Spawned(spec, pid, pidfd, SpawnMode.ZYGOTE))

    def fork_failed(self, worker_id: int, why: str) -> None:
        spec = self._asked.pop(worker_id)
        log.warning(
            "pool %s: the zygote could not fork worker %d (%s); spawning it with exec",
            self.pool_name, worker_id, why,
        )  # fmt: skip
        self._exec(spec)

    def zygote_exited(self, zygote: Zygote, returncode: int, unanswered: list[int]) -> None:
        self._zygote = None
        self._first = False
        specs = [self._asked.pop(worker_id) for worker_id in unanswered]
        if self._closing:
            log.info("pool %s: zygote (pid %d) stopped", self.pool_name, zygote.pid)
            for spec in specs:
                self._events.spawn_failed(spec, "the pool is shutting down")
            if self._gone is not None and not self._gone.done():
                self._gone.set_result(None)
            return
        if zygote.refusal:
            log.error(
                "pool %s: the zygote will not fork %s (%s); its workers are spawned with exec "
                "from now on", self.pool_name, self.cfg.service, zygote.describe_exit(returncode),
            )  # fmt: skip
            self.mode = SpawnMode.EXEC
        else:
            delay = self._backoff.next_delay()
            log.warning(
                "pool %s: zygote (pid %d) died of %s; spawning with exec until a new one is "
                "ready (restart in %gs)",
                self.pool_name, zygote.pid, zygote.describe_exit(returncode), delay,
            )  # fmt: skip
            self._restart_at = time.monotonic() + delay
        for spec in specs:
            self._exec(spec)
        if self._restart_at is not None and self._restart_at <= time.monotonic():
            self._restart()  # the first restart after a healthy spell is immediate

    # --- stopping ------------------------------------------------------------------------------

    async def close(self, timeout_s: float) -> None:
        """Stop the zygote (pool shutdown): EOF on its socket, SIGKILL after ``timeout_s``."""
        try:
            await self._close_zygote(timeout_s)
        finally:
            if self._holds_reaper:
                self._holds_reaper = False
                await reaper.unhold()

    async def _close_zygote(self, timeout_s: float) -> None:
        self._closing = True
        self._restart_at = None
        zygote = self._zygote
        if zygote is None:
            return
        self._gone = asyncio.get_running_loop().create_future()
        zygote.close()
        try:
            await asyncio.wait_for(asyncio.shield(self._gone), timeout_s)
        except TimeoutError:
            zygote.kill(f"it did not exit within {timeout_s:g}s of the pool's shutdown")
            await self._gone
