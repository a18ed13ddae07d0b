"""The ``minions`` command as users and systemd run it: real subprocesses, real signals, a real
AF_UNIX datagram socket standing in for systemd's notify socket, a real SQLite database.

Tests synchronise on what the process says (notify datagrams, its exit), never on sleeps.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

from conftest import run
from minions.runtime.state import SQLiteStateStore, WorkflowRecord

MINIONS = [sys.executable, "-m", "minions"]

LAUNCH = """
import asyncio
from dataclasses import dataclass

from minions import Gru, Minion, Pipeline, minion_step
from minions.workers import WorkerPool


class Pool(WorkerPool):
    service = "native_demo.service:NativeDemo"
    workers = 1


@dataclass
class Tick:
    n: int = 0


class Ticks(Pipeline[Tick]):
    async def produce_event(self) -> Tick:
        await asyncio.sleep(0.02)
        return Tick()


@dataclass
class Ctx:
    crc: int = 0


class Crc(Minion[Tick, Ctx]):
    native: Pool

    @minion_step
    async def crc(self) -> None:
        self.context.crc = await self.native.call("crc32", b"abc")


async def main() -> None:
    gru = await Gru.create(metrics=False)
    result = await gru.start_orchestration(Ticks, Crc)
    assert result.success, result.reason


async def crash() -> None:
    await Gru.create(state_store=None, metrics=False)
    raise RuntimeError("boom in launch")
"""


def minions(*args: str, cwd: Path, env: dict[str, str] | None = None, timeout: float = 30):
    return subprocess.run(
        [*MINIONS, *args], cwd=cwd, env={**os.environ, **(env or {})},
        capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip


def test_help_lists_every_command(tmp_path):
    result = minions("--help", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    for command in ("demo", "run", "workflows", "worker"):
        assert f"\n    {command}" in result.stdout
    demo_help = minions("demo", "--help", cwd=tmp_path).stdout
    for option in ("--events", "--forever", "--fault-rate", "--workers", "--metrics-port"):
        assert option in demo_help


def test_worker_subcommand_is_the_pool_worker_entry_point(tmp_path):
    result = minions("worker", "--help", cwd=tmp_path)
    assert result.returncode == 0
    assert "--service" in result.stdout and "--parent-pid" in result.stdout


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (["run", "no_such_module_xyz:main"], {}, "no module named 'no_such_module_xyz'"),
        (["run", "missing.py"], {}, "no such file: missing.py"),
        (["run", "launch.py:nope"], {}, "has no 'nope'"),
        (["run", "sync.py"], {}, "is not an async function"),
        (["run", "broken.py"], {}, "ZeroDivisionError: division by zero"),
        (["run", "launch.py"], {"MINIONS_LOG_LEVEL": "LOUD"}, "MINIONS_LOG_LEVEL='LOUD'"),
        (["run", "launch.py"], {"MINIONS_METRICS_PORT": "http"}, "is not a port"),
        (["workflows", "--db", "nothing.db"], {}, "no state database at nothing.db"),
        (["demo", "--fault-rate", "1.5"], {}, "1.5 is not between 0 and 1"),
        (["demo", "--events", "0"], {}, "0 is not between 1 and"),
        (["demo", "--events", "5", "--forever"], {}, "not allowed with argument"),
        (["demo", "--workers", "many"], {}, "'many' is not an integer"),
        (["frobnicate"], {}, "invalid choice: 'frobnicate'"),
        ([], {}, "required: COMMAND"),
    ],
)
def test_user_errors_exit_2_with_one_line_and_no_traceback(tmp_path, args, env, message):
    (tmp_path / "launch.py").write_text(LAUNCH)
    (tmp_path / "sync.py").write_text("def main() -> None:\n    pass\n")
    (tmp_path / "broken.py").write_text("x = 1\nvalue = 1 / 0\n")
    result = minions(*args, cwd=tmp_path, env=env)
    assert result.returncode == 2, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert message in lines[0]
    assert "Traceback" not in result.stderr + result.stdout
    if args[:2] == ["run", "broken.py"]:
        assert "broken.py:2" in lines[0]  # where to look, without a traceback


def _records() -> list[WorkflowRecord]:
    now = time.time()
    return [
        WorkflowRecord("orch-a", "wf-1", b"\x80", b"\x80", 0, now - 3700, now - 5),
        WorkflowRecord("orch-b", "wf-2", b"\x80", b"\x80", 2, now - 30, now - 2),
    ]


def test_workflows_lists_saved_records_while_the_store_is_open(tmp_path):
    db = tmp_path / "state.db"

    async def scenario():
        async with SQLiteStateStore(db) as store:
            for record in _records():
                await store.save(record)
            # The store is open (as under a running Gru): the CLI reads beside it.
            return minions("workflows", "--db", str(db), cwd=tmp_path)

    result = run(scenario())
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split() == [
        "ORCHESTRATION",
        "WORKFLOW",
        "NEXT",
        "STEP",
        "AGE",
        "LAST",
        "CHECKPOINT",
    ]
    assert lines[1].split()[:4] == ["orch-a", "wf-1", "0", "1h01m"]  # oldest first
    assert lines[2].split()[:4] == ["orch-b", "wf-2", "2", "30s"]
    assert lines[3] == f"2 unfinished workflows in {db}"

    as_json = minions("workflows", "--db", str(db), "--json", cwd=tmp_path)
    rows = [json.loads(line) for line in as_json.stdout.splitlines()]
    assert [(r["workflow"], r["next_step"]) for r in rows] == [("wf-1", 0), ("wf-2", 2)]


class NotifySocket:
    """A stand-in for systemd's notify socket: a bound AF_UNIX datagram socket."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.received: list[str] = []

    def wait_for(self, *needles: str, timeout: float = 30) -> str:
        """The first datagram containing every needle; fails after ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                message = self.sock.recv(4096).decode()
            except TimeoutError:
                pytest.fail(f"no notification with {needles} in {timeout}s: {self.received}")
            self.received.append(message)
            if all(n in message.splitlines() for n in needles):
                return message

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def notify_socket(tmp_path):
    sock = NotifySocket(tmp_path / "notify.sock")
    yield sock
    sock.close()


def _start_run(tmp_path: Path, target: str, notify: NotifySocket) -> subprocess.Popen[str]:
    (tmp_path / "launch.py").write_text(textwrap.dedent(LAUNCH))
    env = {**os.environ, "NOTIFY_SOCKET": str(notify.path), "MINIONS_LOG_LEVEL": "INFO"}
    return subprocess.Popen(
        [*MINIONS, "run", target], cwd=tmp_path, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


@pytest.mark.parametrize("target", ["launch.py", "launch:main"])
def test_run_serves_until_sigterm_then_exits_0_leaving_no_child(tmp_path, notify_socket, target):
    proc = _start_run(tmp_path, target, notify_socket)
    try:
        assert proc.stderr is not None
        seen = []
        for line in proc.stderr:  # until the launch function has returned
            seen.append(line)
            if "serving until SIGTERM" in line:
                break
        assert "1 orchestration(s) running" in seen[-1], "".join(seen)
        notify_socket.wait_for("READY=1")  # systemd hears from Gru under minions run
        workers = psutil.Process(proc.pid).children(recursive=True)
        assert workers, "the orchestration's pool should have a worker process"
        proc.send_signal(signal.SIGTERM)
        _, rest = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    stderr = "".join(seen) + rest
    assert proc.returncode == 0, stderr
    notify_socket.wait_for("STOPPING=1", timeout=5)
    assert "Traceback" not in stderr
    assert "SIGTERM received: shutting down" in stderr  # Gru's own log reached stderr too
    _, alive = psutil.wait_procs(workers, timeout=5)
    assert not [p for p in alive if p.status() != psutil.STATUS_ZOMBIE]
    assert (tmp_path / "minions.db").exists()  # the launch's default durable store, in its cwd


def test_run_exits_1_when_the_launch_function_raises(tmp_path, notify_socket):
    proc = _start_run(tmp_path, "launch.py:crash", notify_socket)
    _, stderr = proc.communicate(timeout=20)
    assert proc.returncode == 1
    assert "RuntimeError: boom in launch" in stderr
    notify_socket.wait_for("STOPPING=1", timeout=5)  # Gru was shut down, not abandoned
    assert "serving until SIGTERM" not in stderr


def test_run_logs_with_syslog_priorities_when_stderr_is_the_journal(tmp_path):
    (tmp_path / "launch.py").write_text(LAUNCH)
    journal = tmp_path / "journal.txt"
    with journal.open("w") as stream:
        stat = os.fstat(stream.fileno())
        env = {**os.environ, "JOURNAL_STREAM": f"{stat.st_dev}:{stat.st_ino}"}
        result = subprocess.run(
            [*MINIONS, "run", "launch.py:crash"], cwd=tmp_path, env=env,
            stdout=subprocess.PIPE, stderr=stream, text=True, timeout=20,
        )  # fmt: skip
    assert result.returncode == 1
    lines = journal.read_text().splitlines()
    assert any(line.startswith("<6>level=INFO") for line in lines)  # journald stamps time
    assert any(line.startswith("<3>level=ERROR") and "boom in launch" in line for line in lines)
    assert not any(line.startswith("ts=") for line in lines)
