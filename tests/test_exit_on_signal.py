"""A signal-driven shutdown ends the process, even when ``main`` does not await
``gru.wait_closed()``: real processes, real SIGTERM, exit status as systemd sees it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

TESTS_DIR = Path(__file__).resolve().parent
APP = TESTS_DIR / "apps" / "sleepy_app.py"
MINIONS = Path(sys.executable).with_name("minions")


def start(cmd: list[str], cwd: Path, mode: str) -> subprocess.Popen[str]:
    env = {**os.environ, "SLEEPY_MODE": mode, "PYTHONPATH": str(TESTS_DIR)}
    env.pop("NOTIFY_SOCKET", None)
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    assert proc.stdout is not None
    assert proc.stdout.readline() == "ready\n", proc.stderr.read() if proc.stderr else ""
    return proc


def term_and_wait(proc: subprocess.Popen[str]) -> tuple[int, str, str]:
    proc.send_signal(signal.SIGTERM)
    try:
        out, err = proc.communicate(timeout=40)  # under systemd's 45 s TimeoutStopSec
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"the process outlived Gru's shutdown; stderr:\n{err}")
    return proc.returncode, out, err


LAUNCHERS = {
    "asyncio.run": lambda mode: [sys.executable, str(APP), mode],
    "minions run": lambda mode: [str(MINIONS), "run", f"{APP}:main"],
}


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_sigterm_ends_a_main_that_sleeps_with_exit_0(tmp_path: Path, launcher: str) -> None:
    proc = start(LAUNCHERS[launcher]("sleep"), tmp_path, "sleep")
    code, out, err = term_and_wait(proc)
    assert code == 0, err
    assert "cleanup" in out.splitlines(), "main's finally ran, as asyncio.run does for Ctrl-C"
    assert "Traceback" not in err and "never retrieved" not in err, err


def test_a_shutdown_with_errors_ends_it_with_exit_1(tmp_path: Path) -> None:
    proc = start(LAUNCHERS["asyncio.run"]("broken-store"), tmp_path, "broken-store")
    code, out, err = term_and_wait(proc)
    assert code == 1, err
    assert "cleanup" in out.splitlines()


def test_an_app_that_awaits_closing_finishes_its_own_work(tmp_path: Path) -> None:
    """Waiting for Gru in any task (the demo does) keeps the exit the application's."""
    proc = start(LAUNCHERS["asyncio.run"]("waits"), tmp_path, "waits")
    code, out, err = term_and_wait(proc)
    assert code == 3, err
    assert out.splitlines() == ["summary written", "cleanup"]
