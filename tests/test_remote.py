"""Worker hosts over loopback tcp with CURVE: real ``minions worker-host`` processes stand in
for other machines (``minions.pool.hosts`` on the pool's side, ``minions.remote.host`` on the
host's)."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest
import zmq
import zmq.auth

from conftest import eventually, run
from minions.control import messages as cm
from minions.control.commands import status_lines
from minions.control.server import pool_row
from minions.errors import CallTimeout, PoisonCall, WorkerCrashed
from minions.ipc import messages as m
from minions.ops import metrics
from minions.pool.config import PoolConfig
from minions.remote import wire
from minions.remote.keys import generate
from minions.workers import WorkerPool
from remote_services import Remote

TESTS = Path(__file__).parent


class RemotePool(WorkerPool[Remote]):
    workers = 1
    listen = "tcp://127.0.0.1:0"
    host_timeout_s = 1.0
    call_timeout_s = 20.0
    restart_intensity = 50


@dataclass
class Site:
    """Keys in a temporary directory, and the worker-host processes started from them."""

    root: Path
    hosts: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def pool(self, **overrides: object) -> RemotePool:
        config = PoolConfig.from_class(
            RemotePool,
            server_key=str(self.root / "pool" / "pool.key_secret"),
            host_keys_dir=str(self.root / "allowed"),
            **overrides,
        )
        return RemotePool(config)

    def host(
        self, address: str, name: str, workers: int = 2, **env_extra: str
    ) -> subprocess.Popen[bytes]:
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS), *sys.path]), **env_extra)
        argv = [
            sys.executable, "-m", "minions", "worker-host", "--connect", address,
            "--service", "remote_services:Remote", "--workers", str(workers),
            "--key", str(self.root / "secrets" / f"{name}.key_secret"),
            "--server-key", str(self.root / "pool" / "pool.key"),
        ]  # fmt: skip
        log = open(self.root / f"{name}-{len(self.hosts)}.log", "wb")  # noqa: SIM115
        proc = subprocess.Popen(argv, env=env, stdout=log, stderr=log, start_new_session=True)
        self.hosts.append(proc)
        return proc

    def keypair(self, name: str) -> tuple[bytes, bytes]:
        return zmq.auth.load_certificate(str(self.root / "secrets" / f"{name}.key_secret"))

    def server_public(self) -> bytes:
        return zmq.auth.load_certificate(str(self.root / "pool" / "pool.key"))[0]


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Site]:
    generate(tmp_path / "pool", "pool")
    for name in ("alpha", "beta", "outsider"):
        generate(tmp_path / "secrets", name)
    (tmp_path / "allowed").mkdir()
    for name in ("alpha", "beta"):  # the outsider's key is not allowed
        (tmp_path / "allowed" / f"{name}.key").write_bytes(
            (tmp_path / "secrets" / f"{name}.key").read_bytes()
        )
    s = Site(tmp_path)
    yield s
    for proc in s.hosts:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


def host_rows(pool: RemotePool, host: str) -> list[object]:
    return [w for w in pool.snapshot().workers if w.host == host and w.phase == "ready"]


async def wait_hosts(pool: RemotePool, **workers: int) -> None:
    def joined() -> bool:
        return all(len(host_rows(pool, name)) >= n for name, n in workers.items())

    await eventually(joined, timeout=20)


def status_of(pool: RemotePool) -> cm.Status:
    head = (os.getpid(), "running", time.time(), "NORMAL", False, False, None, 0)
    return cm.Status(*head, orchestrations=(), pools=(pool_row(pool),))


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def errors(pool: str) -> dict[str, float]:
    return {
        s.labels["kind"]: s.value
        for family in metrics.PROTOCOL_ERRORS.collect()
        for s in family.samples
        if s.name.endswith("_total") and s.labels["pool"] == pool
    }


def test_one_local_worker_and_two_hosts_serve_mixed_calls(site: Site) -> None:
    async def scenario() -> None:
        async with site.pool(name="mixed") as pool:
            address = pool.snapshot().listen
            site.host(address, "alpha")
            site.host(address, "beta")
            await wait_hosts(pool, alpha=2, beta=2)
            assert {h.name for h in pool.snapshot().hosts} == {"alpha", "beta"}
            blobs = [os.urandom(i * 37 % 3000) for i in range(1000)]
            calls = []
            for i, blob in enumerate(blobs):
                match i % 3:
                    case 0:
                        calls.append(pool.call(Remote.ping, i))
                    case 1:
                        calls.append(pool.call(Remote.crc32, blob))
                    case _:
                        calls.append(pool.call(Remote.echo, blob))
            results = await asyncio.gather(*calls)
            for i, (blob, result) in enumerate(zip(blobs, results, strict=True)):
                assert result == (i, zlib.crc32(blob), blob)[i % 3 if i % 3 < 2 else 2]
            served = {w.host: 0 for w in pool.snapshot().workers}
            for w in pool.snapshot().workers:
                served[w.host] += w.calls_served
            assert all(served[h] > 0 for h in ("", "alpha", "beta")), served
            big = os.urandom(3 * 2**20)  # tcp payloads travel as frames, never the arena
            assert await pool.call(Remote.echo, big) == big
            alive = metrics.HOST_WORKERS.labels("mixed", "alpha")._value.get()
            assert alive == 2 and metrics.HOST_UP.labels("mixed", "beta")._value.get() == 1
            lines = "\n".join(status_lines(status_of(pool), time.time()))
            assert "worker hosts connect to tcp://127.0.0.1:" in lines and "2 connected" in lines
            assert sum(" alpha " in line for line in lines.splitlines()) == 3  # 2 workers + host

    run(scenario())


def test_sigkill_of_a_host_mid_load_ends_its_calls_and_the_rest_carry_on(
    site: Site, caplog: pytest.LogCaptureFixture
) -> None:
    """A killed host's connection closes, and the pool notices that at once: with a 30 s
    host_timeout_s the test (bounded at 25 s) passes only if the closed connection, not the
    silence, ended the host's calls."""

    async def scenario() -> None:
        async with site.pool(name="killed", workers=1, host_timeout_s=30.0) as pool:
            address = pool.snapshot().listen
            alpha = site.host(address, "alpha")
            site.host(address, "beta")
            await wait_hosts(pool, alpha=2, beta=2)
            calls = [asyncio.create_task(pool.call(Remote.pid_after, 0.05)) for _ in range(200)]
            await eventually(lambda: any(w.in_flight for w in host_rows(pool, "alpha")))
            alpha_pids = {w.pid for w in host_rows(pool, "alpha")}
            os.killpg(alpha.pid, signal.SIGKILL)
            with caplog.at_level(logging.WARNING, logger="minions.pool"):
                outcomes = await asyncio.gather(*calls, return_exceptions=True)
            why = [r.getMessage() for r in caplog.records if "lost worker host" in r.getMessage()]
            assert len(why) == 1 and "its connection closed" in why[0], why
            lost = [o for o in outcomes if isinstance(o, WorkerCrashed)]
            assert lost, "no call was running on the killed host"
            assert all(e.cause == "host_lost" and e.host == "alpha" for e in lost), lost
            assert "host_lost" in str(lost[0])
            assert all(isinstance(o, int | WorkerCrashed) for o in outcomes), outcomes
            assert len(lost) <= len(alpha_pids)  # only the call each worker was on
            assert pool.snapshot().hosts_lost == 1
            assert [h.name for h in pool.snapshot().hosts] == ["beta"]
            assert isinstance(await pool.call(Remote.pid_after, 0.0), int)

    run(scenario(), timeout=25)


def test_a_lost_host_call_is_retried_elsewhere_under_retries_on_crash(site: Site) -> None:
    async def scenario() -> None:
        async with site.pool(name="retried", workers=0, retries_on_crash=1) as pool:
            address = pool.snapshot().listen
            alpha = site.host(address, "alpha", workers=1)
            await wait_hosts(pool, alpha=1)
            call = asyncio.create_task(pool.call(Remote.pid_after, 2.0))
            await eventually(lambda: any(w.in_flight for w in host_rows(pool, "alpha")))
            os.killpg(alpha.pid, signal.SIGKILL)  # mid-call: the retry waits for a worker
            await eventually(lambda: pool.snapshot().hosts_lost == 1)
            assert not call.done()
            site.host(address, "beta", workers=1)
            await wait_hosts(pool, beta=1)
            beta_pid = host_rows(pool, "beta")[0].pid
            assert await call == beta_pid

    run(scenario())


def test_a_partitioned_host_is_lost_its_late_answers_dropped_and_it_rejoins(site: Site) -> None:
    """SIGSTOP stands in for a partition: the host's workers finish their calls while nobody
    relays the answers; the pool retries them elsewhere after host_timeout_s. After SIGCONT
    the late answers arrive, are dropped (counted as stale), and the host starts a new session
    with fresh workers."""

    async def scenario() -> None:
        async with site.pool(name="partition", workers=0, retries_on_crash=1) as pool:
            address = pool.snapshot().listen
            alpha = site.host(address, "alpha", workers=2)
            await wait_hosts(pool, alpha=2)
            old_pids = {w.pid for w in host_rows(pool, "alpha")}
            calls = [asyncio.create_task(pool.call(Remote.pid_after, 1.0)) for _ in range(2)]
            await eventually(lambda: sum(w.in_flight for w in host_rows(pool, "alpha")) == 2)
            os.killpg(alpha.pid, signal.SIGSTOP)  # the host and its workers: a cut cable
            try:
                site.host(address, "beta", workers=2)
                await wait_hosts(pool, beta=2)
                beta_pids = {w.pid for w in host_rows(pool, "beta")}
                results = await asyncio.gather(*calls)
                assert set(results) <= beta_pids  # answered once each, by the retry
                assert pool.snapshot().hosts_lost == 1
                stale_before = errors("partition").get("stale", 0)
            finally:
                os.killpg(alpha.pid, signal.SIGCONT)
            await eventually(lambda: errors("partition").get("stale", 0) > stale_before)
            await wait_hosts(pool, alpha=2)  # a new session, re-authenticated
            new_pids = {w.pid for w in host_rows(pool, "alpha")}
            assert not new_pids & old_pids
            await eventually(lambda: not any(alive(pid) for pid in old_pids))  # ended with it
            assert all(not c.exception() for c in calls)
            assert await pool.call(Remote.ping, 7) == 7

    run(scenario(), timeout=60)


def test_a_remote_segfault_is_the_same_worker_crashed_as_a_local_one(site: Site) -> None:
    async def scenario() -> None:
        async with site.pool(name="segv", workers=1) as pool:
            with pytest.raises(WorkerCrashed) as local:
                await pool.call(Remote.segfault)
        async with site.pool(name="segv-remote", workers=0) as pool:
            site.host(pool.snapshot().listen, "alpha", workers=1)
            await wait_hosts(pool, alpha=1)
            with pytest.raises(WorkerCrashed) as remote:
                await pool.call(Remote.segfault)
            await wait_hosts(pool, alpha=1)  # the host replaced it
            assert await pool.call(Remote.ping, 3) == 3
        for crash in (local.value, remote.value):
            assert crash.signal == signal.SIGSEGV and crash.cause == "signal"
            assert "segmentation fault" in crash.reason
            assert "segfault" in crash.stack  # faulthandler's Python stack, from the host
        assert remote.value.host == "alpha" and local.value.host == ""

    run(scenario())


def test_unknown_key_plaintext_and_wrong_server_key_are_refused_and_counted(site: Site) -> None:
    async def scenario() -> None:
        async with site.pool(name="guarded") as pool:
            address = pool.snapshot().listen
            ctx = zmq.Context()
            server = site.server_public()

            def client(pub: bytes = b"", secret: bytes = b"", server: bytes = b"") -> None:
                sock = ctx.socket(zmq.DEALER)
                sock.linger = 0
                if server:
                    sock.curve_serverkey, sock.curve_publickey = server, pub
                    sock.curve_secretkey = secret
                sock.connect(address)
                sock.send_multipart([wire.CONTROL, b"\x91\x00"])
                sockets.append(sock)

            sockets: list[zmq.Socket[bytes]] = []
            try:
                client(*site.keypair("outsider"), server)  # a key not in host_keys_dir
                await eventually(lambda: errors("guarded").get("auth", 0) >= 1)
                client()  # plaintext: no key at all
                await eventually(lambda: errors("guarded").get("handshake", 0) >= 1)
                before = errors("guarded")["handshake"]
                client(*site.keypair("alpha"), site.keypair("beta")[0])  # wrong server key
                await eventually(lambda: errors("guarded")["handshake"] > before)
                raw = socket.create_connection(("127.0.0.1", int(address.rsplit(":", 1)[1])))
                raw.sendall(b"GET / HTTP/1.0\r\n\r\n")  # not even ZeroMQ: closed by libzmq
                raw.close()
            finally:
                for sock in sockets:
                    sock.close()
                ctx.term()
            assert not pool.snapshot().hosts  # nobody joined
            assert await pool.call(Remote.ping, 1) == 1  # and the pool serves on
            site.host(address, "alpha", workers=1)  # a real host still joins
            await wait_hosts(pool, alpha=1)

    run(scenario())


def test_a_replayed_hello_is_refused_and_counted(site: Site) -> None:
    """An allowed host re-sending a session's hello (same routing id) after the session ended
    is refused; a fresh session of the same key is welcome."""

    async def scenario() -> None:
        async with site.pool(name="replay") as pool:
            ctx = zmq.Context()
            pub, secret = site.keypair("alpha")
            methods = tuple(sorted(("ping", "crc32", "echo", "pid_after", "segfault")))
            service = "remote_services:Remote"
            protocols = (wire.HOST_PROTOCOL, m.PROTOCOL_VERSION)
            hello_msg = wire.HostHello(*protocols, service, methods, 1, 1)
            hello = wire.encoder.encode(hello_msg)

            def session(rid: bytes) -> zmq.Socket[bytes]:
                sock = ctx.socket(zmq.DEALER)
                sock.linger = 0
                sock.routing_id = rid
                sock.curve_serverkey = site.server_public()
                sock.curve_publickey, sock.curve_secretkey = pub, secret
                sock.connect(pool.snapshot().listen)
                sock.send_multipart([wire.CONTROL, hello])
                return sock

            async def answer(sock: zmq.Socket[bytes]) -> wire.PoolMessage:
                while True:  # skip the pool's beats
                    await eventually(lambda: sock.poll(0), timeout=10)
                    msg = wire.pool_decoder.decode(sock.recv_multipart()[1])
                    if not isinstance(msg, wire.Beat):
                        return msg

            try:
                first = session(b"h-replayed-session")
                assert isinstance(await answer(first), wire.Welcome)
                first.send_multipart([wire.CONTROL, hello])  # the same hello again
                refused = await answer(first)
                assert isinstance(refused, wire.Refused) and "replayed" in refused.reason
                assert errors("replay")["replayed"] == 1
                first.close()
                await eventually(lambda: not pool.snapshot().hosts)  # silent: lost
                again = session(b"h-replayed-session")  # reconnects with the old session id
                refused = await answer(again)
                assert isinstance(refused, wire.Refused) and "replayed" in refused.reason
                assert errors("replay")["replayed"] == 2
                again.close()
                fresh = session(b"h-a-fresh-session")
                assert isinstance(await answer(fresh), wire.Welcome)
                fresh.close()
            finally:
                ctx.term()

    run(scenario())


def test_listen_refuses_to_start_without_curve(site: Site) -> None:
    with pytest.raises(ValueError, match="needs CURVE"):
        PoolConfig(service="remote_services:Remote", listen="tcp://127.0.0.1:0")
    with pytest.raises(ValueError, match="tcp://"):
        PoolConfig(
            service="remote_services:Remote", listen="ipc:///tmp/x", server_key="k",
            host_keys_dir="d",
        )  # fmt: skip


def test_remote_workers_time_out_recycle_and_quarantine_like_local_ones(site: Site) -> None:
    """Deadlines, max_calls recycling and the poison quarantine are the pool's, whatever the
    worker's machine: the host only carries out the kill or the retirement."""

    async def scenario() -> None:
        pool = site.pool(
            name="policies", workers=0, call_timeout_s=1.0, max_calls_per_worker=5,
            retries_on_crash=1,
        )  # fmt: skip
        async with pool:
            site.host(pool.snapshot().listen, "alpha", workers=2)
            await wait_hosts(pool, alpha=2)
            with pytest.raises(CallTimeout) as overran:
                await pool.call(Remote.pid_after, 30.0)
            assert "pid_after" in overran.value.stack  # dumped on the host before the kill
            await wait_hosts(pool, alpha=2)
            first = {w.pid for w in host_rows(pool, "alpha")}
            pids = [await pool.call(Remote.pid_after, 0.0) for _ in range(20)]
            assert len(set(pids)) > 2 and not set(pids) <= first  # retired after 5 calls each
            retired = set(pids) - {w.pid for w in host_rows(pool, "alpha")}
            assert retired  # each stops once it owes nothing (the pool says Drained)
            await eventually(lambda: not any(alive(pid) for pid in retired))
            with pytest.raises(PoisonCall) as poison:
                await pool.call(Remote.segfault)
            assert poison.value.attempts == 2
            with pytest.raises(PoisonCall):  # quarantined: fails fast, crashes nothing more
                await pool.call(Remote.segfault)
            await wait_hosts(pool, alpha=2)
            assert await pool.call(Remote.ping, 9) == 9

    run(scenario())


def test_sigterm_stops_a_host_cleanly_and_fails_no_call(site: Site) -> None:
    """A host stopping (systemctl stop) stops its workers politely (each finishes what it was
    sent), exits 0 and leaves no worker behind; a call cut short would be retried."""

    async def scenario() -> None:
        async with site.pool(name="sigterm", workers=1, retries_on_crash=1) as pool:
            alpha = site.host(pool.snapshot().listen, "alpha", workers=1)
            await wait_hosts(pool, alpha=1)
            pids = {w.pid for w in host_rows(pool, "alpha")}
            calls = [asyncio.create_task(pool.call(Remote.pid_after, 0.2)) for _ in range(6)]
            await eventually(lambda: any(w.in_flight for w in host_rows(pool, "alpha")))
            alpha.send_signal(signal.SIGTERM)
            assert all(isinstance(pid, int) for pid in await asyncio.gather(*calls))
            assert await asyncio.to_thread(alpha.wait, 20) == 0
            assert not any(alive(pid) for pid in pids)
            await eventually(lambda: not pool.snapshot().hosts)
            assert pool.snapshot().hosts_lost == 0  # it said goodbye: a clean end, not a loss

    run(scenario())


def test_worker_host_refuses_bad_keys_and_arguments_with_exit_2(site: Site) -> None:
    base = [sys.executable, "-m", "minions", "worker-host", "--service", "remote_services:Remote"]
    cases = [
        (["--connect", "tcp://127.0.0.1:1", "--key", str(site.root / "pool" / "pool.key"),
          "--server-key", str(site.root / "pool" / "pool.key")], "holds no secret key"),
        (["--connect", "tcp://127.0.0.1:1", "--key", str(site.root / "nope.key_secret"),
          "--server-key", str(site.root / "pool" / "pool.key")], "cannot read the secret key"),
        (["--connect", "ipc:///tmp/x", "--key", str(site.root / "secrets" / "alpha.key_secret"),
          "--server-key", str(site.root / "pool" / "pool.key")], "tcp:// addresses"),
    ]  # fmt: skip
    for args, why in cases:
        done = subprocess.run([*base, *args], capture_output=True, text=True, timeout=30)
        assert done.returncode == 2 and why in done.stderr, (args, done.stderr)


def test_keys_generate_writes_zeromq_certificates_and_never_overwrites(tmp_path: Path) -> None:
    argv = [sys.executable, "-m", "minions", "keys", "generate", "edge-1", "--dir", str(tmp_path)]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    public, secret = zmq.auth.load_certificate(str(tmp_path / "edge-1.key_secret"))
    assert zmq.auth.load_certificate(str(tmp_path / "edge-1.key")) == (public, None)
    assert len(public) == len(secret) == 40  # z85 of 32-byte CURVE keys
    assert (tmp_path / "edge-1.key_secret").stat().st_mode & 0o077 == 0
    again = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    assert again.returncode == 2 and "exists" in again.stderr
    assert zmq.auth.load_certificate(str(tmp_path / "edge-1.key_secret")) == (public, secret)


def test_a_host_rejoins_a_pool_that_restarted_on_the_same_address(site: Site) -> None:
    """Gru restarts (a deploy, a crash): the host's session with the old pool ends, and it
    joins the new one on the same address with fresh workers, without being restarted."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    address = f"tcp://127.0.0.1:{port}"

    async def scenario() -> None:
        async with site.pool(name="before", listen=address) as pool:
            site.host(address, "alpha", workers=1)
            await wait_hosts(pool, alpha=1)
            first = host_rows(pool, "alpha")[0].pid
        async with site.pool(name="after", listen=address) as pool:
            await wait_hosts(pool, alpha=1)
            assert host_rows(pool, "alpha")[0].pid != first
            assert await pool.call(Remote.ping, 5) == 5
        assert site.hosts[0].poll() is None  # the same host process all along

    run(scenario())


def test_keys_added_while_the_pool_runs_are_allowed_and_a_broken_one_harms_nobody(
    site: Site,
) -> None:
    """The allow-list is re-read when its directory changes; a file that is not a key (one
    being copied in) is left out and logged, and never stops the ZAP handler."""
    allowed = site.root / "allowed"
    (allowed / "beta.key").unlink()

    async def scenario() -> None:
        async with site.pool(name="rekeyed", workers=0) as pool:
            address = pool.snapshot().listen
            (allowed / "broken.key").write_text("not a certificate\n")
            site.host(address, "alpha", workers=1)
            await wait_hosts(pool, alpha=1)  # allowed from the start, still joins
            staged = allowed / ".beta.key.partial"
            staged.write_bytes((site.root / "secrets" / "beta.key").read_bytes())
            staged.rename(allowed / "beta.key")  # whole, all at once
            site.host(address, "beta", workers=1)
            await wait_hosts(pool, beta=1)
            assert await pool.call(Remote.ping, 2) == 2

    run(scenario())


def test_a_lost_host_never_runs_a_non_idempotent_call_twice(site: Site) -> None:
    """Calls pipelined on a host that is lost may each have run (their answers died with the
    host): not idempotent, every one of them fails with host_lost instead of running again on
    the host that is left."""

    async def scenario() -> None:
        pool = site.pool(name="at-most-once", workers=0, pipeline_window_s=30.0)
        async with pool:
            address = pool.snapshot().listen
            alpha = site.host(address, "alpha", workers=1)
            await wait_hosts(pool, alpha=1)
            await pool.call(Remote.pid_after, 0.01)  # the method's cost is known: it pipelines
            once = pool.options(idempotent=False)
            calls = [asyncio.create_task(once.call(Remote.pid_after, 10.0)) for _ in range(3)]
            await eventually(lambda: sum(w.in_flight for w in host_rows(pool, "alpha")) == 3)
            site.host(address, "beta", workers=1)
            await wait_hosts(pool, beta=1)
            assert not any(c.done() for c in calls)  # all three still owed by alpha
            os.killpg(alpha.pid, signal.SIGKILL)
            outcomes = await asyncio.gather(*calls, return_exceptions=True)
            assert all(isinstance(o, WorkerCrashed) and o.cause == "host_lost" for o in outcomes)
            assert sum(w.calls_served for w in host_rows(pool, "beta")) == 0  # nothing re-ran

    run(scenario())


def test_map_over_a_pool_served_only_by_hosts(site: Site) -> None:
    async def scenario() -> None:
        async with site.pool(name="mapped", workers=0) as pool:
            site.host(pool.snapshot().listen, "alpha", workers=2)
            await wait_hosts(pool, alpha=2)
            results = [r async for r in pool.map(Remote.ping, range(300))]
            assert results == list(range(300))

    run(scenario())


def test_a_host_tells_systemd_ready_then_which_pool_it_serves(site: Site) -> None:
    """A fake NOTIFY_SOCKET listener speaking the real datagram protocol: READY=1 at start
    (a host is up even while its pool is not), then STATUS= once it serves the pool."""
    path = site.root / "notify.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(str(path))
    listener.setblocking(False)
    said: list[str] = []

    def heard(text: str) -> bool:
        while True:
            try:
                said.append(listener.recv(4096).decode())
            except BlockingIOError:
                return any(text in datagram for datagram in said)

    async def scenario() -> None:
        async with site.pool(name="notified", workers=0) as pool:
            site.host(pool.snapshot().listen, "alpha", workers=2, NOTIFY_SOCKET=str(path))
            await eventually(lambda: heard("READY=1"))
            await wait_hosts(pool, alpha=2)
            await eventually(lambda: heard("STATUS=pool notified at tcp://127.0.0.1:"))
            await eventually(lambda: heard(": 2 workers"))

    try:
        run(scenario())
    finally:
        listener.close()
