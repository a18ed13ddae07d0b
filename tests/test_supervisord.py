"""``deploy/supervisord/minions.conf`` under a real supervisord (Debian's ``supervisor``).

supervisord runs in the foreground with a configuration in a temporary directory that includes
the shipped program section, changed only in its paths, its user and the metrics port; the
program is ``minions run deploy_app.py``, whose pool is real. The test checks what an operator
relies on: RUNNING, a worker segfault that leaves it RUNNING, a kill -9 of Gru followed by a
restart with no old worker alive, a ``supervisorctl stop`` that needs no SIGKILL, and nothing
left afterwards. The settings themselves are checked against Gru's shutdown budget and the
systemd unit they mirror.
"""

from __future__ import annotations

import configparser
import getpass
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from apps.deploy_control import (
    APP,
    MINIONS,
    Control,
    assert_all_gone,
    poll_until,
    scrape,
    workers_of,
)
from minions.pool.config import PoolConfig
from minions.runtime.config import GruConfig

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
PROGRAM = DEPLOY / "supervisord" / "minions.conf"
UNIT = DEPLOY / "minions.service"
SUPERVISORD = shutil.which("supervisord")
SUPERVISORCTL = shutil.which("supervisorctl")
POOL = frozenset({("pool", "OrphanPool")})

needs_supervisord = pytest.mark.skipif(
    SUPERVISORD is None or SUPERVISORCTL is None,
    reason="supervisord is not installed (apt-get install supervisor)",
)


def program() -> dict[str, str]:
    """The shipped [program:minions] section, parsed the way supervisord parses it."""
    parser = configparser.RawConfigParser(inline_comment_prefixes=(";", "#"), strict=False)
    parser.read(PROGRAM)
    assert parser.sections() == ["program:minions"]
    return dict(parser["program:minions"])


# --- the settings -----------------------------------------------------------------------------


def test_program_settings_fit_gru_semantics() -> None:
    p = program()
    assert re.fullmatch(r"/opt/minions/\.venv/bin/minions run [\w.]+:\w+", p["command"])
    assert p["stopsignal"] == "TERM"
    # Gru's grace for in-flight steps, then each pool's polite stop of its workers.
    budget = GruConfig().grace_period_s + PoolConfig(service="x:Y").shutdown_grace_s + 5.0
    assert int(p["stopwaitsecs"]) >= budget
    unit_stop = re.search(r"^TimeoutStopSec=(\d+)$", UNIT.read_text(), re.M)
    assert unit_stop and int(p["stopwaitsecs"]) == int(unit_stop.group(1)), "in step with systemd"
    assert p["stopasgroup"] == "false", "SIGTERM to the group would kill working workers"
    assert p["killasgroup"] == "true"
    assert p["autorestart"] == "unexpected"
    assert set(p["exitcodes"].split(",")) == {"0", "2"}, "like Restart=on-failure, exit 2 final"
    assert 0 < int(p["startsecs"]) <= 10 and int(p["startretries"]) >= 1
    assert p["redirect_stderr"] == "true"
    assert p["stdout_logfile"].startswith("/var/log/")
    assert p["stdout_logfile_maxbytes"].endswith("MB") and int(p["stdout_logfile_backups"]) > 0
    assert p["user"] == "minions" and p["umask"] == "077"
    env = dict(pair.split("=", 1) for pair in p["environment"].split(","))
    assert env["PYTHONFAULTHANDLER"] == '"1"' and env["MINIONS_METRICS_HOST"] == '"127.0.0.1"'


def test_every_comment_sits_on_its_own_line() -> None:
    for number, line in enumerate(PROGRAM.read_text().splitlines(), 1):
        if line and not line.startswith((";", "[")):
            assert not re.search(r"\s[;#]", line), f"line {number}: inline comment: {line!r}"


# --- a real supervisord -----------------------------------------------------------------------


class Supervisord:
    """supervisord in the foreground, configured in ``tmp_path``; the shipped program section
    with only its paths, user and metrics port changed."""

    def __init__(self, tmp_path: Path, control: Control) -> None:
        self.dir = tmp_path
        state = tmp_path / "state"
        state.mkdir()
        (tmp_path / "log").mkdir()
        self.program_log = tmp_path / "log" / "minions.out.log"
        changes = {
            "command": f"{MINIONS} run {APP}",
            "directory": str(state),
            "user": getpass.getuser(),  # supervisord may "switch" to the user it runs as
            "stdout_logfile": str(self.program_log),
            "environment": program()["environment"].replace(
                'MINIONS_METRICS_PORT="8081"', 'MINIONS_METRICS_PORT="0"'
            ),
        }
        text = PROGRAM.read_text()
        for key, value in changes.items():
            text, count = re.subn(rf"^{key}=.*$", f"{key}={value}", text, flags=re.M)
            assert count == 1, key
        (tmp_path / "minions.conf").write_text(text)
        self.conf = tmp_path / "supervisord.conf"
        self.conf.write_text(
            "[unix_http_server]\nfile=%(here)s/supervisor.sock\nchmod=0700\n"
            "[supervisord]\nlogfile=%(here)s/supervisord.log\npidfile=%(here)s/supervisord.pid\n"
            "childlogdir=%(here)s/log\nnodaemon=true\n"
            "[rpcinterface:supervisor]\n"
            "supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface\n"
            "[supervisorctl]\nserverurl=unix://%(here)s/supervisor.sock\n"
            "[include]\nfiles = minions.conf\n"
        )
        assert SUPERVISORD is not None
        self.proc = subprocess.Popen(
            [SUPERVISORD, "-n", "-c", str(self.conf)], env=control.env(),
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
        )  # fmt: skip

    def alive(self) -> bool:
        return self.proc.poll() is None

    def ctl(self, *args: str) -> str:
        assert SUPERVISORCTL is not None
        result = subprocess.run(
            [SUPERVISORCTL, "-c", str(self.conf), *args], capture_output=True, text=True,
            timeout=60,
        )  # fmt: skip
        return result.stdout + result.stderr

    def status(self) -> tuple[str, int | None]:
        """(state, pid) of the program as ``supervisorctl status`` shows it."""
        out = self.ctl("status", "minions")
        m = re.search(r"^minions\s+([A-Z]+)(?:\s+pid (\d+))?", out, re.M)
        return (m.group(1), int(m.group(2)) if m.group(2) else None) if m else (out.strip(), None)

    def wait_running(self, other_than: int | None = None) -> int:
        def running() -> int | None:
            assert self.alive(), f"supervisord exited: {self.log()}"
            state, pid = self.status()
            assert state not in ("FATAL", "BACKOFF"), f"{state}: {self.program_log_text()}"
            return pid if state == "RUNNING" and pid != other_than else None

        return poll_until(running, "RUNNING in supervisorctl status", timeout=30, interval=0.2)

    def log(self) -> str:
        return (self.dir / "supervisord.log").read_text()

    def program_log_text(self) -> str:
        return self.program_log.read_text() if self.program_log.exists() else ""

    def shutdown(self) -> None:
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)  # supervisord stops its programs, then exits
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def supervisord(tmp_path: Path) -> Iterator[tuple[Supervisord, Control]]:
    control = Control(tmp_path / "control")
    sv = Supervisord(tmp_path, control)
    try:
        yield sv, control
    finally:
        sv.shutdown()


@needs_supervisord
def test_supervisord_keeps_gru_running_restarts_it_and_stops_it_cleanly(supervisord) -> None:
    sv, control = supervisord
    pid = sv.wait_running()
    gru_pid, port = control.wait_started(sv.alive)
    assert gru_pid == pid, "supervisord's pid is Gru's own (minions run does not fork)"
    # Readiness the way an operator probes it (supervisord has no notify protocol): /metrics.
    assert scrape(port)[("minions_workers_alive", POOL)] == 2

    assert control.submit("segfault", sv.alive) == "crashed SIGSEGV"
    assert sv.status() == ("RUNNING", pid), "a worker's crash is the pool's business"
    assert control.submit("crc", sv.alive).startswith("crc ")
    assert scrape(port)[("minions_worker_crashes_total", POOL | {("reason", "SIGSEGV")})] == 1

    gru = psutil.Process(pid)
    workers = workers_of(gru)
    assert len(workers) == 2
    gru.kill()
    new_pid = sv.wait_running(other_than=pid)
    assert_all_gone(workers, "the killed Gru's workers")
    assert "exited: minions (terminated by SIGKILL; not expected)" in sv.log()
    assert control.wait_started(sv.alive, after=1)[0] == new_pid
    assert control.submit("crc", sv.alive).startswith("crc "), "the new Gru serves"

    # Stop with a call in flight: Gru lets it finish (its grace), then exits 0.
    gru = psutil.Process(new_pid)
    held = control.send("hold")
    holder = int(control.wait_line(held, "holding", sv.alive))
    assert holder in [w.pid for w in workers_of(gru)], "a worker is busy with the call"
    processes = [gru, *gru.children(recursive=True)]
    began = time.monotonic()
    assert SUPERVISORCTL is not None
    stop = subprocess.Popen(
        [SUPERVISORCTL, "-c", str(sv.conf), "stop", "minions"], stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    poll_until(lambda: "SIGTERM received" in sv.program_log_text(), "Gru to begin its shutdown")
    control.release(held)
    out, _ = stop.communicate(timeout=int(program()["stopwaitsecs"]) + 15)
    took = time.monotonic() - began
    assert "minions: stopped" in out, out
    assert control.wait_line(held, "hold", sv.alive) == f"served {holder}", "not killed mid-call"
    # exit status 0 is Gru's own graceful exit: a SIGKILL would read "terminated by SIGKILL".
    assert "stopped: minions (exit status 0)" in sv.log(), sv.log()
    assert took < int(program()["stopwaitsecs"])
    assert_all_gone(processes, "the stopped program")
    log = sv.program_log_text()
    assert "gru stopped (0 workflows cancelled, 0 errors)" in log, log
    assert psutil.Process(sv.proc.pid).children() == [], "supervisord has nothing left to run"
