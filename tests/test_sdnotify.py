"""sd_notify against a real AF_UNIX datagram listener that plays systemd's side of the protocol."""

from __future__ import annotations

import asyncio
import itertools
import os
import socket
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import run
from minions.ops import sdnotify


class NotifyListener:
    """systemd's end: a bound SOCK_DGRAM socket; a thread stamps each datagram on arrival."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address)
        self.received: list[tuple[float, bytes]] = []
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                data = self.sock.recv(4096)
            except OSError:
                return
            if data == b"__stop__":
                return
            with self._cond:
                self.received.append((time.monotonic(), data))
                self._cond.notify_all()

    def wait_count(self, n: int, timeout: float = 10.0) -> list[tuple[float, bytes]]:
        with self._cond:
            ok = self._cond.wait_for(lambda: len(self.received) >= n, timeout)
            assert ok, f"expected {n} datagrams, got {self.received}"
            return list(self.received)

    def close(self) -> None:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.sendto(b"__stop__", self.address)
        self._thread.join(5)
        self.sock.close()


@pytest.fixture
def listener(monkeypatch: pytest.MonkeyPatch) -> Iterator[NotifyListener]:
    with tempfile.TemporaryDirectory(prefix="sdn") as d:  # short path: sun_path is 108 bytes
        path = str(Path(d) / "notify")
        lst = NotifyListener(path)
        monkeypatch.setenv("NOTIFY_SOCKET", path)
        monkeypatch.delenv("WATCHDOG_USEC", raising=False)
        monkeypatch.delenv("WATCHDOG_PID", raising=False)
        yield lst
        lst.close()


def test_unset_notify_socket_is_a_noop(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert sdnotify.ready() is False
    assert sdnotify.status("x") is False
    assert sdnotify.stopping() is False
    assert sdnotify.watchdog() is False


@pytest.mark.parametrize(
    ("send", "expected"),
    [
        (lambda: sdnotify.ready(), b"READY=1"),
        (
            lambda: sdnotify.ready("2 orchestrations\nrunning"),
            b"READY=1\nSTATUS=2 orchestrations running",
        ),
        (lambda: sdnotify.status("  42 workflows in flight \n"), b"STATUS=42 workflows in flight"),
        (lambda: sdnotify.stopping("draining"), b"STOPPING=1\nSTATUS=draining"),
        (lambda: sdnotify.watchdog(), b"WATCHDOG=1"),
        (lambda: sdnotify.extend_timeout(2.5), b"EXTEND_TIMEOUT_USEC=2500000"),
    ],
)
def test_messages_on_the_wire(listener: NotifyListener, send, expected: bytes) -> None:
    assert send() is True
    [(_, data)] = listener.wait_count(1)
    assert data == expected


def test_abstract_namespace_address(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"minions-test-{uuid.uuid4().hex}"
    lst = NotifyListener("\0" + name)
    try:
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert sdnotify.status("abstract") is True
        [(_, data)] = lst.wait_count(1)
        assert data == b"STATUS=abstract"
    finally:
        lst.close()


def test_send_failure_is_reported_not_raised(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "nobody-listens"))
    assert sdnotify.ready() is False
    monkeypatch.setenv("NOTIFY_SOCKET", "relative/path")
    assert sdnotify.ready() is False


@pytest.mark.parametrize(
    ("usec", "pid", "expected"),
    [
        (None, None, None),
        ("30000000", None, 15.0),
        ("30000000", "self", 15.0),
        ("30000000", "other", None),  # inherited by a child: not ours to ping
        ("0", None, None),
        ("garbage", None, None),
    ],
)
def test_watchdog_interval(usec: str | None, pid: str | None, expected: float | None) -> None:
    env: dict[str, str] = {}
    if usec is not None:
        env["WATCHDOG_USEC"] = usec
    if pid is not None:
        env["WATCHDOG_PID"] = str(os.getpid() if pid == "self" else os.getpid() + 1)
    assert sdnotify.watchdog_interval(env) == expected


def test_watchdog_disabled_without_watchdog_usec(listener: NotifyListener) -> None:
    async def main() -> None:
        wd = sdnotify.Watchdog()
        assert not wd.enabled
        wd.start()  # no task, nothing to stop
        assert wd._task is None
        await wd.stop()

    run(main())


def test_watchdog_pings_at_half_of_watchdog_usec(
    listener: NotifyListener, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "100000")  # 100 ms -> ping every 50 ms
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))

    async def main() -> list[tuple[float, bytes]]:
        wd = sdnotify.Watchdog()
        assert wd.interval == pytest.approx(0.05)
        wd.start()
        got = await asyncio.to_thread(listener.wait_count, 5)
        await wd.stop()
        assert wd._task is None
        return got

    got = run(main())
    assert {data for _, data in got} == {b"WATCHDOG=1"}
    gaps = [b[0] - a[0] for a, b in itertools.pairwise(got)][:4]
    # Driven by asyncio.sleep(0.05): never faster, and not wildly slower on a quiet loop.
    assert all(0.04 < g < 0.5 for g in gaps), gaps


def test_blocked_loop_stops_the_pings(listener: NotifyListener) -> None:
    block_s = 0.5

    async def main() -> tuple[float, float]:
        wd = sdnotify.Watchdog(0.02)
        wd.start()
        await asyncio.to_thread(listener.wait_count, 3)  # the loop is healthy: pings flow
        t0 = time.monotonic()
        time.sleep(block_s)  # the fault under test: a coroutine that blocks the loop
        t1 = time.monotonic()
        seen = len(listener.received)
        await asyncio.to_thread(listener.wait_count, seen + 3)  # unblocked: pings resume
        await wd.stop()
        return t0, t1

    t0, t1 = run(main())
    stamps = [t for t, _ in listener.received]
    # A ping sent just before the block may land a moment after t0; none may arrive inside it.
    during = [t for t in stamps if t0 + 0.05 < t < t1]
    assert during == [], f"{len(during)} pings arrived while the loop was blocked"
    before = max(t for t in stamps if t <= t1)
    after = min(t for t in stamps if t > t1)
    assert after - before >= block_s - 0.06
    # Healthy, the same 0.5 s would have carried ~25 pings: the silence is the block's doing.
    assert len([t for t in stamps if t > t1]) >= 3


def test_unhealthy_check_withholds_pings(listener: NotifyListener) -> None:
    checks: list[float] = []

    def healthy() -> bool:
        checks.append(time.monotonic())
        return len(checks) > 3  # wedged for three rounds, then recovered

    async def main() -> int:
        wd = sdnotify.Watchdog(0.01, healthy=healthy)
        wd.start()
        await asyncio.to_thread(listener.wait_count, 1)
        await wd.stop()
        return wd.pings

    pings = run(main())
    first_ping = listener.received[0][0]
    assert first_ping >= checks[3], "a ping was sent while the health check said no"
    assert pings >= 1


def test_health_check_that_raises_skips_the_ping(listener: NotifyListener) -> None:
    calls = 0

    def healthy() -> bool:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("probe broke")
        return True

    async def main() -> int:
        wd = sdnotify.Watchdog(0.01, healthy=healthy)
        wd.start()
        await asyncio.to_thread(listener.wait_count, 1)
        await wd.stop()
        return wd.pings

    pings = run(main())
    # The first check raised and sent nothing; every later check sent one ping.
    assert calls >= 2
    assert pings == calls - 1


def test_watchdog_rejects_nonpositive_interval() -> None:
    with pytest.raises(ValueError, match="interval"):
        sdnotify.Watchdog(0)
