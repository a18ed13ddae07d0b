"""Gru as PID 1 (a container without an init) and as a child subreaper, with real processes.

``unshare --pid --fork --mount-proc`` runs ``minions run deploy_app.py`` as PID 1 of a fresh PID
namespace, as a container runtime does without ``--init`` (root only; skipped otherwise). The
same app as a child subreaper (``APP_SUBREAPER=1``) inherits orphans the same way without root.
Its pool's service leaves helper processes behind, which the kernel re-parents to Gru; the
tests kill them and check that Gru reaps every one, that a worker's crash verdict still comes
from its real exit status, and that a signal still ends Gru cleanly. Also checked here: the
container recipe says what these tests prove.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
from pathlib import Path

import psutil
import pytest

from apps.deploy_control import (
    APP,
    MINIONS,
    Control,
    assert_all_gone,
    named_children,
    poll_until,
    workers_of,
    zombies_of,
)
from apps.orphan_service import HELPER

UNSHARE = shutil.which("unshare")
DOCKERFILE = Path(__file__).resolve().parent.parent / "deploy" / "container" / "Dockerfile"
ORPHANS = 4


def _pid1_unavailable() -> str | None:
    if os.geteuid() != 0:
        return "needs root: unshare --pid creates a PID namespace"
    if UNSHARE is None:
        return "unshare (util-linux) is not installed"
    probe = subprocess.run(
        [UNSHARE, "--pid", "--fork", "--mount-proc", "true"], capture_output=True, text=True,
        timeout=30,
    )  # fmt: skip
    if probe.returncode != 0:
        return f"unshare --pid cannot run here: {probe.stderr.strip()}"
    return None


_PID1_SKIP = _pid1_unavailable()
needs_pid1 = pytest.mark.skipif(_PID1_SKIP is not None, reason=_PID1_SKIP or "")


class Launched:
    """``minions run deploy_app.py`` as PID 1 of a new namespace, or as a child subreaper."""

    def __init__(self, tmp_path: Path, mode: str, **env: str) -> None:
        self.mode = mode
        self.control = Control(tmp_path / "control")
        state = tmp_path / "state"
        state.mkdir()
        argv = [MINIONS, "run", str(APP)]
        if mode == "pid1":
            assert UNSHARE is not None
            argv = [UNSHARE, "--pid", "--fork", "--mount-proc", "--kill-child", *argv]
        else:
            env["APP_SUBREAPER"] = "1"
        self.output = tmp_path / "output.log"
        with self.output.open("w") as out:
            self.proc = subprocess.Popen(
                argv, cwd=state, env=self.control.env(**env), stdout=out,
                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            )  # fmt: skip

    def running(self) -> bool:
        return self.proc.poll() is None

    def gru(self) -> psutil.Process:
        """Gru's process as this (the parent) namespace sees it."""
        if self.mode != "pid1":
            return psutil.Process(self.proc.pid)
        children = psutil.Process(self.proc.pid).children()
        assert len(children) == 1, f"unshare should have one child, PID 1: {children}"
        return children[0]

    def log(self) -> str:
        return self.output.read_text()

    def close(self) -> None:
        if self.running():
            self.proc.kill()  # with --kill-child, PID 1 and so the whole namespace go too
        self.proc.wait(timeout=30)


@pytest.fixture
def launch(tmp_path: Path):
    started: list[Launched] = []

    def start(mode: str, **env: str) -> Launched:
        started.append(Launched(tmp_path, mode, **env))
        return started[-1]

    yield start
    for app in started:
        app.close()


@pytest.mark.parametrize(
    ("mode", "signum"),
    [
        pytest.param("pid1", signal.SIGTERM, marks=needs_pid1, id="pid1-SIGTERM"),
        pytest.param("pid1", signal.SIGINT, marks=needs_pid1, id="pid1-SIGINT"),
        pytest.param("subreaper", signal.SIGTERM, id="subreaper-SIGTERM"),
    ],
)
def test_orphans_are_reaped_and_a_signal_still_ends_gru_cleanly(launch, mode, signum):
    app = launch(mode)
    pid, _ = app.control.wait_started(app.running)
    if mode == "pid1":
        assert pid == 1, "Gru should be PID 1 of its namespace"
    gru = app.gru()
    assert len(workers_of(gru)) == 2

    for _ in range(ORPHANS):
        assert app.control.submit("orphan", app.running).startswith("pid ")
    # The helpers' parents (the worker's shells) are gone: the kernel gave them to Gru.
    orphans = poll_until(
        lambda: len(found := named_children(gru, HELPER)) == ORPHANS and found,
        f"{ORPHANS} orphaned helpers re-parented to Gru",
    )
    assert len(orphans) == ORPHANS
    for orphan in orphans:
        orphan.kill()
    poll_until(
        lambda: not any(o.is_running() for o in orphans) and not zombies_of(gru),
        "Gru to reap its orphans (a zombie is still 'running' until reaped)",
        timeout=30,
    )

    # The pool still reads its own workers' exit statuses: nothing stole them.
    assert app.control.submit("segfault", app.running) == "crashed SIGSEGV"
    assert app.control.submit("crc", app.running).startswith("crc ")
    processes = [gru, *gru.children(recursive=True)]

    gru.send_signal(signum)
    assert app.proc.wait(timeout=60) == 0, app.log()
    log = app.log()
    assert f"{signal.Signals(signum).name} received: shutting down" in log
    assert "gru stopped (0 workflows cancelled, 0 errors)" in log, log
    role = "PID 1 of its PID namespace" if mode == "pid1" else "a child subreaper"
    assert f"this process is {role}: reaping orphaned processes" in log
    assert "Traceback" not in log
    assert_all_gone(processes, "Gru's processes")


@needs_pid1
def test_kill_9_of_pid_1_ends_the_whole_namespace(launch):
    app = launch("pid1")
    app.control.wait_started(app.running)
    for _ in range(2):
        app.control.submit("orphan", app.running)
    gru = app.gru()
    poll_until(lambda: len(named_children(gru, HELPER)) == 2, "two live orphans under PID 1")
    everything = [gru, *gru.children(recursive=True)]
    names = sorted(p.name() for p in everything)
    # Gru, its pool's two workers (and the zygote they were forked from), two orphans
    assert [n for n in names if n != "minions-zygote"] == sorted(
        ["minions", "minions-w1", "minions-w2", HELPER, HELPER]
    ), names

    gru.kill()  # SIGKILL from the parent namespace reaches PID 1 even without a handler
    app.proc.wait(timeout=30)
    assert_all_gone(everything, "the PID namespace of a killed PID 1")


@needs_pid1
def test_sigterm_ends_pid_1_before_gru_has_its_handlers(launch):
    """PID 1 gets no default action for SIGTERM: during a slow import, before Gru exists, a
    SIGTERM would be dropped and the container runtime would wait for its SIGKILL."""
    app = launch("pid1", APP_HOLD="1")
    pid = app.control.wait_for(
        lambda lines: next((int(line[1]) for line in lines if line[0] == "launching"), None),
        "the launch function to start",
        running=app.running,
    )
    assert pid == 1
    app.gru().send_signal(signal.SIGTERM)
    assert app.proc.wait(timeout=30) == 128 + signal.SIGTERM, app.log()


# --- the container recipe ---------------------------------------------------------------------


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for raw in text.splitlines():
        line = raw.strip()
        if line and not line.startswith("#"):
            instruction, _, args = line.partition(" ")
            out.append((instruction.upper(), args.strip()))
    return out


def instructions(name: str) -> list[str]:
    return [args for instruction, args in dockerfile() if instruction == name]


def test_dockerfile_runs_gru_as_pid_1_the_way_the_tests_do():
    entry = instructions("ENTRYPOINT")
    assert len(entry) == 1, "one ENTRYPOINT"
    # Exec form (a JSON array): in shell form /bin/sh would be PID 1, and it neither passes
    # SIGTERM on to Gru nor reaps orphans.
    argv = json.loads(entry[0]) + [arg for cmd in instructions("CMD") for arg in json.loads(cmd)]
    assert argv[:2] == ["/opt/minions/.venv/bin/minions", "run"], argv
    assert instructions("STOPSIGNAL") == ["SIGTERM"]
    bases = instructions("FROM")
    assert bases and all(re.match(r"python:3\.1[1-9]-slim", b) for b in bases), bases
    user = instructions("USER")
    assert user and user[-1] not in ("root", "0"), "Gru runs as a non-root user"
    assert instructions("VOLUME") == ['["/var/lib/minions"]'], "the state directory is a volume"
    assert instructions("WORKDIR")[-1] == "/var/lib/minions", "minions.db lands in the volume"
    health = instructions("HEALTHCHECK")
    assert len(health) == 1 and "/metrics" in health[0], health
    assert "PYTHONFAULTHANDLER=1" in " ".join(instructions("ENV"))
