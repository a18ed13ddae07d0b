"""Runs inside the throwaway systemd of ``tests/test_systemd.py`` (stdlib only, system Python).

It installs the shipped units (``ExecStart`` and the paths changed, nothing else), drives them
the way an operator and the kernel would, and writes what it observed to ``facts.json`` in the
bound directory; the test asserts on those facts. Every wait polls an observable fact (a unit
property, a pid, the journal) against a deadline on the monotonic clock.

    python3 systemd_driver.py WORKDIR VENV PORT_A PORT_B HOST_PORT
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

WORK, VENV = Path(sys.argv[1]), Path(sys.argv[2])
PORTS = sys.argv[3:5]
HOST_PORT = int(sys.argv[5])  # where the worker host's pool would listen: nothing does
HOST_UNIT = "minions-worker-host.service"
APP = f"{WORK}/systemd_app.py:main"
MINIONS = f"{VENV}/bin/minions"
FACTS: dict[str, Any] = {}


def sh(*cmd: str, check: bool = False) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=check)


def prop(unit: str, name: str) -> str:
    return sh("systemctl", "show", "-P", name, unit).stdout.strip()


def wait_for(what: str, fact: Callable[[], Any], within: float) -> Any:
    deadline = time.monotonic() + within
    while True:
        value = fact()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"gave up waiting for {what} after {within:g}s")
        time.sleep(0.1)


def cgroup_pids(unit: str) -> list[int]:
    group = prop(unit, "ControlGroup")
    for hierarchy in ("unified", "systemd", ""):
        procs = Path("/sys/fs/cgroup", hierarchy, group.lstrip("/"), "cgroup.procs")
        if procs.is_file():
            return [int(p) for p in procs.read_text().split()]
    return []


def alive(pids: list[int]) -> list[int]:
    out = []
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            out.append(pid)
    return out


def status(runtime: str) -> dict[str, Any] | None:
    done = sh(MINIONS, "status", "--json", "--runtime-dir", runtime)
    return json.loads(done.stdout) if done.returncode == 0 else None


def install() -> None:
    for name in ("minions.service", "minions@.service"):
        text = (WORK / name).read_text()
        text = re.sub(r"^ExecStart=.*$", f"ExecStart={MINIONS} run {APP}", text, flags=re.M)
        Path("/etc/systemd/system", name).write_text(text)
    # Exactly as shipped: its ExecStart is already the venv bound at /opt/minions/.venv.
    Path("/etc/systemd/system", HOST_UNIT).write_text((WORK / HOST_UNIT).read_text())
    sh("systemctl", "daemon-reload", check=True)


def journal(*args: str) -> str:
    return sh("journalctl", "--no-pager", "-o", "cat", *args).stdout


def serving(unit: str) -> dict[str, Any]:
    return wait_for(f"{unit} running one orchestration with 2 workers", lambda: _serving(unit), 30)


def _serving(unit: str) -> dict[str, Any] | None:
    runtime = "/run/" + ("minions" if unit == "minions.service" else f"minions-{unit[8:-8]}")
    s = status(runtime)
    if not (s and s["orchestrations"] and s["pools"]):
        return None
    workers = s["pools"][0]["workers"]
    return s if len(workers) == 2 and all(w["phase"] == "ready" for w in workers) else None


def start_and_serve() -> dict[str, Any]:
    began = time.monotonic()
    done = sh("systemctl", "start", "minions.service")
    FACTS.setdefault("start_rc", []).append(done.returncode)
    FACTS.setdefault("start_s", []).append(time.monotonic() - began)
    FACTS.setdefault("status_at_ready", []).append(prop("minions.service", "StatusText"))
    if done.returncode != 0:
        FACTS["start_failure"] = journal("-u", "minions.service", "-n", "60")
        raise RuntimeError("minions.service did not start")
    return serving("minions.service")


def _status_text() -> str:
    text = prop("minions.service", "StatusText")
    return text if "1 orchestration" in text and "2 workers alive" in text else ""


def ready_and_crash() -> None:
    s = start_and_serve()
    FACTS["invocation"] = prop("minions.service", "InvocationID")
    FACTS["status_text"] = wait_for("STATUS= with the orchestration", _status_text, 15)
    FACTS["status_json"] = s
    main = int(prop("minions.service", "MainPID"))
    victim = s["pools"][0]["workers"][0]["pid"]
    os.kill(victim, signal.SIGSEGV)
    after = wait_for(
        "the pool to replace the crashed worker",
        lambda: (x := _serving("minions.service")) and x["pools"][0]["restarts"] >= 1 and x,
        30,
    )
    FACTS["after_segv"] = {
        "active": prop("minions.service", "ActiveState"),
        "main_pid_same": int(prop("minions.service", "MainPID")) == main,
        "victim_alive": bool(alive([victim])),
        "workers": [w["pid"] for w in after["pools"][0]["workers"]],
        "victim": victim,
        "restarts": after["pools"][0]["restarts"],
    }
    first = f"_SYSTEMD_INVOCATION_ID={FACTS['invocation']}"
    FACTS["journal_first_run"] = journal("-u", "minions.service", first)
    FACTS["journal_warning"] = journal("-u", "minions.service", "-p", "warning", first)


def watchdog_begin() -> dict[str, Any]:
    main = int(prop("minions.service", "MainPID"))
    before = {"main": main, "pids": cgroup_pids("minions.service"),
              "restarts": int(prop("minions.service", "NRestarts"))}  # fmt: skip
    FACTS["watchdog_usec"] = prop("minions.service", "WatchdogUSec")
    os.kill(main, signal.SIGSTOP)
    before["stopped_at"] = time.monotonic()
    return before


def watchdog_end(before: dict[str, Any]) -> None:
    wait_for(
        "the watchdog to restart the stopped Gru",
        lambda: int(prop("minions.service", "NRestarts")) > before["restarts"],
        90,
    )
    restarted = time.monotonic() - before["stopped_at"]
    serving("minions.service")
    FACTS["watchdog"] = {
        "restarted_after_s": restarted,
        "new_main": int(prop("minions.service", "MainPID")) != before["main"],
        "old_alive": alive(before["pids"]),
        "journal": journal("-u", "minions.service", "-n", "400"),
    }


def instances() -> None:
    units = [f"minions@{port}.service" for port in PORTS]
    done = sh("systemctl", "start", *units)
    FACTS["instances_rc"] = done.returncode
    if done.returncode != 0:
        FACTS["instances_failure"] = journal("-u", "minions@*", "-n", "80")
        return
    seen = {}
    for port, unit in zip(PORTS, units, strict=True):
        s = serving(unit)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
            scrape = resp.read().decode()
        db = Path(f"/var/lib/minions-{port}/minions.db")
        seen[port] = {
            "pid": s["pid"],
            "main": int(prop(unit, "MainPID")),
            "metrics_url": s["metrics_url"],
            "db": db.is_file(),
            "scrape_has_pool": 'minions_workers_alive{pool="NativePool"} 2.0' in scrape,
            "cgroup_bytes": _gauge(scrape, "minions_cgroup_memory_current_bytes"),
        }
    FACTS["instances"] = seen
    sh("systemctl", "stop", *units)
    FACTS["instances_after_stop"] = [prop(u, "ActiveState") for u in units]


def worker_host() -> None:
    """The worker-host unit with its pool not there: READY=1 all the same, active through
    sessions that time out, dialling out under the unit's hardening, then a clean stop."""
    keys = Path("/etc/minions/keys")
    for name in ("host", "pool"):  # host.key_secret and pool.key are what the unit loads
        sh(MINIONS, "keys", "generate", name, "--dir", str(keys), check=True)
    keys.chmod(0o700)
    Path("/etc/minions/worker-host.env").write_text(
        f"MINIONS_HOST_CONNECT=tcp://127.0.0.1:{HOST_PORT}\n"
        "MINIONS_HOST_SERVICE=native_demo.service:NativeDemo\n"
        "MINIONS_HOST_OPTIONS=--workers 1\n"
    )
    seen: dict[str, Any] = {}
    FACTS["worker_host"] = seen
    began = time.monotonic()
    done = sh("systemctl", "start", HOST_UNIT)
    seen.update(start_rc=done.returncode, start_s=time.monotonic() - began)
    if done.returncode != 0:
        seen["journal"] = journal("-u", HOST_UNIT, "-n", "60")
        return
    ended = wait_for(
        "the worker host to give up on its first session with the absent pool",
        lambda: "session with pool" in (text := journal("-u", HOST_UNIT)) and text,
        20,
    )
    seen["journal"] = ended
    for key, name in (("active", "ActiveState"), ("restarts", "NRestarts")):
        seen[key] = prop(HOST_UNIT, name)
    seen["status"] = prop(HOST_UNIT, "StatusText")
    with socket.create_server(("127.0.0.1", HOST_PORT)) as server:  # a stand-in for the pool
        server.settimeout(15)
        conn, _ = server.accept()
        conn.close()
    seen["dialled"] = True
    pids = cgroup_pids(HOST_UNIT)
    began = time.monotonic()
    done = sh("systemctl", "stop", HOST_UNIT)
    seen["stop"] = {
        "rc": done.returncode,
        "seconds": time.monotonic() - began,
        "result": prop(HOST_UNIT, "Result"),
        "exit_status": prop(HOST_UNIT, "ExecMainStatus"),
        "active": prop(HOST_UNIT, "ActiveState"),
        "pids_before": pids,
        "alive_after": alive(pids),
        "cgroup_after": cgroup_pids(HOST_UNIT),
    }


def _gauge(scrape: str, name: str) -> float:
    m = re.search(rf"^{name} (\S+)$", scrape, re.M)
    return float(m.group(1)) if m else -1.0


def kill_9() -> None:
    before = {"main": int(prop("minions.service", "MainPID")),
              "pids": cgroup_pids("minions.service")}  # fmt: skip
    os.kill(before["main"], signal.SIGKILL)
    killed = time.monotonic()
    wait_for(
        "a new Gru after kill -9",
        lambda: prop("minions.service", "MainPID") not in ("0", str(before["main"])),
        30,
    )
    FACTS["kill9"] = {
        "restarted_after_s": time.monotonic() - killed,
        "old_alive": alive(before["pids"]),
        "pids_before": before["pids"],
    }
    serving("minions.service")


def stop() -> None:
    pids = cgroup_pids("minions.service")
    began = time.monotonic()
    done = sh("systemctl", "stop", "minions.service")
    FACTS["stop"] = {
        "rc": done.returncode,
        "seconds": time.monotonic() - began,
        "result": prop("minions.service", "Result"),
        "exit_status": prop("minions.service", "ExecMainStatus"),
        "active": prop("minions.service", "ActiveState"),
        "pids_before": pids,
        "alive_after": alive(pids),
        "cgroup_after": cgroup_pids("minions.service"),
    }


def main() -> int:
    began = time.monotonic()
    try:
        install()
        ready_and_crash()
        before = watchdog_begin()
        instances()  # while the watchdog's 30 s run out
        worker_host()
        watchdog_end(before)
        kill_9()
        stop()
    except Exception as exc:
        FACTS["error"] = f"{type(exc).__name__}: {exc}"
        FACTS["journal_tail"] = journal("-n", "80")
    FACTS["seconds"] = time.monotonic() - began
    (WORK / "facts.json").write_text(json.dumps(FACTS, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
