"""The remote-host contender of ``bench_pool.py``: a Minions pool whose only workers are on one
``minions worker-host`` process, over loopback tcp with CURVE.

The pool has ``workers = 0`` and listens on ``tcp://127.0.0.1:0``; the host process serves it
as many workers as the local ``minions`` row has, so the two rows differ only in the path a call
takes: pool -> tcp/CURVE -> the host's relay -> its ipc ROUTER -> worker, and back the same way.
Keys live in a temporary directory; ``close()`` stops the host's process group and removes them,
and ``start()`` does the same if it fails part-way.
"""

from __future__ import annotations

import asyncio
import inspect
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import contenders as cs

HOST = "bench"  # the host's key name, which is its name in the pool's snapshot
LOCAL_WORKERS: int = inspect.signature(cs.MinionsPool).parameters["workers"].default
JOIN_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 5.0


class RemoteHostPool:
    """``WorkerPool(workers=0, listen=tcp)`` served by one ``minions worker-host`` process."""

    name = "minions tcp host"

    def __init__(self, workers: int = LOCAL_WORKERS) -> None:
        self._workers = workers
        self._dir: tempfile.TemporaryDirectory[str] | None = None
        self._host: subprocess.Popen[bytes] | None = None
        self._cm: Any = None
        self._pool: Any = None

    async def start(self) -> None:
        try:
            root = self._make_keys()
            await self._open_pool(root)
            self._start_host(root, self._pool.snapshot().listen)
            await self._wait_joined(root)
            await cs._warm(self, 4 * self._workers)
        except BaseException:
            await self.close()
            raise

    def _make_keys(self) -> Path:
        from minions.remote.keys import generate

        self._dir = tempfile.TemporaryDirectory(prefix="bench-remote-")
        root = Path(self._dir.name)
        generate(root / "pool", "pool")
        generate(root / "secrets", HOST)
        (root / "allowed").mkdir()
        (root / "allowed" / f"{HOST}.key").write_bytes(
            (root / "secrets" / f"{HOST}.key").read_bytes()
        )
        return root

    async def _open_pool(self, root: Path) -> None:
        from minions.workers import WorkerPool

        attrs = {
            "service": cs.SERVICE,
            "workers": 0,
            "listen": "tcp://127.0.0.1:0",
            "server_key": str(root / "pool" / "pool.key_secret"),
            "host_keys_dir": str(root / "allowed"),
        }
        self._cm = type("BenchRemoteNativeDemo", (WorkerPool,), attrs)()
        self._pool = await self._cm.__aenter__()

    def _start_host(self, root: Path, address: str) -> None:
        argv = [
            sys.executable, "-m", "minions", "worker-host", "--connect", address,
            "--service", cs.SERVICE, "--workers", str(self._workers),
            "--key", str(root / "secrets" / f"{HOST}.key_secret"),
            "--server-key", str(root / "pool" / "pool.key"),
        ]  # fmt: skip
        with open(root / "host.log", "wb") as log:
            self._host = subprocess.Popen(argv, stdout=log, stderr=log, start_new_session=True)

    async def _wait_joined(self, root: Path) -> None:
        """Until the host's workers are all ready in the pool's snapshot."""
        assert self._host is not None
        deadline = time.monotonic() + JOIN_TIMEOUT_S
        while self._ready() < self._workers:
            code = self._host.poll()
            if code is not None or time.monotonic() > deadline:
                tail = (root / "host.log").read_text(errors="replace")[-600:]
                state = f"exited with {code}" if code is not None else "did not join in time"
                state += f", {self._ready()}/{self._workers} workers ready"
                raise RuntimeError(f"worker host {state}; its log ends:\n{tail}")
            await asyncio.sleep(0.05)

    def _ready(self) -> int:
        return sum(
            1 for w in self._pool.snapshot().workers if w.host == HOST and w.phase == "ready"
        )

    async def ping(self, x: int) -> int:
        return await self._pool.call("ping", x)

    async def close(self) -> None:
        """Stop the host, then the pool, then remove the keys: each even if the last failed."""
        host, self._host = self._host, None
        try:
            if host is not None:
                await asyncio.to_thread(_stop_group, host)
        finally:
            try:
                if self._cm is not None:
                    cm, self._cm = self._cm, None
                    await cm.__aexit__(None, None, None)
            finally:
                if self._dir is not None:
                    self._dir.cleanup()
                    self._dir = None


def _stop_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM the host alone, so it stops its workers itself and tells the pool; then SIGKILL
    whatever is left of its session (the host and its workers share one process group)."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()
