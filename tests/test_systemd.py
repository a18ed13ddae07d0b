"""The shipped units under a real systemd (PID 1 of a throwaway container).

``systemd-sandbox`` boots systemd in an overlay of this machine, so nothing written inside
reaches it; the test builds a venv of the project from ``/usr/bin/python3`` (``ProtectHome=``
hides a pyenv interpreter under ``/root``), binds it at the unit's ``/opt/minions/.venv``,
installs ``deploy/minions.service`` and ``deploy/minions@.service`` with only ``ExecStart``'s
target changed (``deploy/minions-worker-host.service`` as it is), and lets
``apps/systemd_driver.py`` act inside as an operator and the kernel would. The driver writes
what it saw to ``facts.json``; the assertions are all here.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from test_deploy import SERVICE, WORKER_HOST, one, parse_unit, seconds

# Building the unit's venv from scratch (CI, or after a source change) plus booting systemd
# takes about a minute on this machine: above the suite's 60 s default for the first test.
pytestmark = pytest.mark.timeout(300)

REPO = Path(__file__).resolve().parent.parent
APPS = REPO / "tests" / "apps"
SYSTEM_PYTHON = Path("/usr/bin/python3")
INSIDE_WORK, INSIDE_VENV = "/srv/minions-test", "/opt/minions/.venv"
SKIPPED = 77


def sandbox_tool() -> Path:
    for base in (REPO.parent, REPO.parent.parent):
        tool = base / "shared" / "tools" / "systemd-sandbox"
        if tool.is_file():
            return tool
    pytest.skip("systemd-sandbox is not beside this checkout (../shared/tools)")


def _sources_hash() -> str:
    digest = hashlib.sha256(subprocess.run([str(SYSTEM_PYTHON), "-VV"], capture_output=True,
                                           check=True).stdout)  # fmt: skip
    for path in sorted(
        [
            REPO / "pyproject.toml",
            REPO / "setup.py",
            *(REPO / "src").rglob("*.py"),
            *(REPO / "workers").rglob("*.[pc]*"),
        ]
    ):
        if path.is_file() and "__pycache__" not in path.parts:
            digest.update(str(path.relative_to(REPO)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def unit_venv(cache: Path) -> Path:
    """A venv of the project for the unit, kept while the sources are unchanged. Its scripts
    are rewritten to run from ``/opt/minions/.venv``, where it is bound inside the sandbox."""
    venv = cache / f"systemd-test-venv-{_sources_hash()}"
    if (venv / ".complete").is_file():
        return venv
    for stale in cache.glob("systemd-test-venv-*"):
        shutil.rmtree(stale, ignore_errors=True)
    building = venv.with_name(venv.name + ".building")
    shutil.rmtree(building, ignore_errors=True)
    subprocess.run([str(SYSTEM_PYTHON), "-m", "venv", str(building)], check=True, timeout=120)
    pip = [str(building / "bin" / "python"), "-m", "pip", "install", "-q",
           "--disable-pip-version-check", str(REPO)]  # fmt: skip
    done = subprocess.run(pip, capture_output=True, text=True, timeout=300)
    if done.returncode != 0:
        pytest.fail(f"could not install the project into a system-Python venv:\n{done.stderr}")
    for script in (building / "bin").iterdir():
        if script.is_file() and not script.is_symlink():
            data = script.read_bytes()
            if data.startswith(b"#!" + str(building).encode()):
                script.write_bytes(data.replace(str(building).encode(), INSIDE_VENV.encode(), 1))
    building.rename(venv)
    (venv / ".complete").touch()
    return venv


def free_ports(count: int) -> list[int]:
    socks = [socket.socket() for _ in range(count)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@pytest.fixture(scope="module")
def facts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    tool = sandbox_tool()
    if not SYSTEM_PYTHON.is_file():
        pytest.skip("no /usr/bin/python3 to build the unit's venv from")
    if os.geteuid() != 0:
        pytest.skip("systemd-sandbox needs root")
    if shutil.which("systemd-nspawn") is None:
        pytest.skip("systemd-nspawn is not installed (apt-get install systemd-container)")
    cache = REPO / ".venv" if (REPO / ".venv").is_dir() else tmp_path_factory.mktemp("cache")
    venv = unit_venv(cache)
    work = tmp_path_factory.mktemp("systemd")
    for unit in ("minions.service", "minions@.service", "minions-worker-host.service"):
        shutil.copy(REPO / "deploy" / unit, work / unit)
    for app in ("systemd_app.py", "systemd_driver.py"):
        shutil.copy(APPS / app, work / app)
    for d in (work, venv):
        d.chmod(0o755)  # the unit's dynamic user reads the app and the venv
    ports = [str(p) for p in free_ports(3)]  # two replicas', and the worker host's absent pool
    cmd = [str(tool), f"--bind={work}:{INSIDE_WORK}", f"--bind={venv}:{INSIDE_VENV}",
           "--timeout", "200", "--", str(SYSTEM_PYTHON), f"{INSIDE_WORK}/systemd_driver.py",
           INSIDE_WORK, INSIDE_VENV, *ports]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    if done.returncode == SKIPPED:
        pytest.skip(f"systemd-sandbox cannot run here: {done.stderr.strip()}")
    assert done.returncode == 0, f"sandbox failed ({done.returncode}):\n{done.stderr[-3000:]}"
    found = json.loads((work / "facts.json").read_text())
    assert "error" not in found, f"{found['error']}\n{found.get('journal_tail', '')[-4000:]}"
    found["ports"] = ports[:2]
    print(f"systemd: {found['seconds']:.1f}s inside the sandbox; start {found['start_s'][0]:.2f}s,"
          f" stop {found['stop']['seconds']:.2f}s, kill -9 to new Gru "
          f"{found['kill9']['restarted_after_s']:.2f}s, SIGSTOP to watchdog restart "
          f"{found['watchdog']['restarted_after_s']:.1f}s", file=sys.stderr)  # fmt: skip
    return found


def test_ready_and_status_reach_systemd(facts: dict[str, Any]) -> None:
    assert facts["start_rc"][0] == 0
    # Type=notify: `systemctl start` returned on READY=1, which carries the first STATUS=.
    assert facts["status_at_ready"][0].startswith("running: ")
    assert "memory NORMAL" in facts["status_at_ready"][0]
    text = facts["status_text"]
    assert "1 orchestration" in text and "2 workers alive" in text, text


def test_minions_status_works_under_the_unit(facts: dict[str, Any]) -> None:
    s = facts["status_json"]
    assert s["durable"] is True and s["state"] == "running"
    (pool,) = s["pools"]
    assert pool["name"] == "NativePool" and len(pool["workers"]) == 2


def test_a_worker_segfault_leaves_the_unit_active(facts: dict[str, Any]) -> None:
    after = facts["after_segv"]
    assert after["active"] == "active" and after["main_pid_same"]
    assert not after["victim_alive"] and after["victim"] not in after["workers"]
    assert after["restarts"] >= 1 and len(after["workers"]) == 2


def test_journal_priorities_and_one_metrics_line(facts: dict[str, Any]) -> None:
    first = facts["journal_first_run"]
    assert first.count("serving Prometheus metrics") == 1, first
    warning = facts["journal_warning"]
    assert "died of SIGSEGV" in warning, warning
    assert "gru started" in first and "gru started" not in warning  # INFO stays out


def test_stop_is_clean_within_budget_and_empties_the_cgroup(facts: dict[str, Any]) -> None:
    stop = facts["stop"]
    budget = seconds(one(parse_unit(SERVICE), "TimeoutStopSec"))
    assert stop["rc"] == 0 and stop["seconds"] < budget, stop
    assert (stop["result"], stop["exit_status"], stop["active"]) == ("success", "0", "inactive")
    assert len(stop["pids_before"]) >= 3, "Gru and two workers were in the cgroup"
    assert stop["alive_after"] == [] and stop["cgroup_after"] == []


def test_kill_9_of_gru_restarts_with_no_old_process_left(facts: dict[str, Any]) -> None:
    kill9 = facts["kill9"]
    assert len(kill9["pids_before"]) >= 3
    assert kill9["old_alive"] == [], kill9


def test_a_blocked_loop_is_killed_by_the_watchdog_with_its_stack(facts: dict[str, Any]) -> None:
    watchdog = facts["watchdog"]
    assert facts["watchdog_usec"] == "30s"
    assert watchdog["new_main"] and watchdog["old_alive"] == []
    journal = watchdog["journal"]
    assert "Watchdog timeout" in journal, journal[-3000:]
    assert "Fatal Python error: Aborted" in journal and "File " in journal, journal[-3000:]


def test_two_template_instances_keep_their_own_state_and_ports(facts: dict[str, Any]) -> None:
    assert facts["instances_rc"] == 0, facts.get("instances_failure", "")
    seen = facts["instances"]
    assert set(seen) == set(facts["ports"])
    pids = {s["pid"] for s in seen.values()}
    assert len(pids) == 2 and all(s["pid"] == s["main"] for s in seen.values())
    for port, s in seen.items():
        assert s["db"], f"/var/lib/minions-{port}/minions.db"
        assert s["metrics_url"] == f"http://127.0.0.1:{port}/metrics"
        assert s["scrape_has_pool"]
        assert s["cgroup_bytes"] > 0, "the cgroup's memory is read under systemd (v1 or v2)"
    assert facts["instances_after_stop"] == ["inactive", "inactive"]


def test_a_worker_host_is_active_while_its_pool_is_down_and_stops_cleanly(
    facts: dict[str, Any],
) -> None:
    host = facts["worker_host"]
    assert host["start_rc"] == 0, host.get("journal", "")
    # READY=1 came with nothing listening, and a session that timed out changed nothing.
    assert host["active"] == "active" and host["restarts"] == "0", host["journal"][-3000:]
    assert "the pool has not answered the hello" in host["journal"], host["journal"][-3000:]
    assert host["status"].endswith(": connecting"), host["status"]
    assert host["dialled"], "the unit's hardening let it connect out over tcp"
    stop = host["stop"]
    budget = seconds(one(parse_unit(WORKER_HOST), "TimeoutStopSec"))
    assert stop["rc"] == 0 and stop["seconds"] < budget, stop
    assert (stop["result"], stop["exit_status"], stop["active"]) == ("success", "0", "inactive")
    assert stop["pids_before"] and stop["alive_after"] == [] and stop["cgroup_after"] == []
