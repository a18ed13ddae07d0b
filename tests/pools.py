"""Pool classes the tests share: all serve the real ``NativeDemo`` extension."""

from __future__ import annotations

from minions.workers import WorkerPool

SERVICE = "native_demo.service:NativeDemo"


class DemoPool(WorkerPool):
    service = SERVICE
    workers = 2
    call_timeout_s = 2.0
    restart_intensity = 50


class RetryPool(DemoPool):
    retries_on_crash = 1
    poison_ttl_s = 30.0


class SparePool(DemoPool):
    workers = 1
    spare_workers = 1


class BadServicePool(WorkerPool):
    service = "native_demo.service:NoSuchService"
    workers = 1


def running_pid(pool: WorkerPool, method: str) -> int | None:
    """Pid of a worker whose call marker says it is running ``method`` right now."""
    return next((w.pid for w in pool.snapshot().workers if w.running == method), None)
