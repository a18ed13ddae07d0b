"""``minions demo``: real worker processes really crashing, and the accounting that decides the
exit code. The subprocess runs are the README's promise; the in-process tests pin what "lost"
means, reading counters from a real prometheus-client registry.
"""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import psutil
import pytest
from prometheus_client import CollectorRegistry, Counter
from prometheus_client.parser import text_string_to_metric_families

from minions.demo.accounting import Ledger, read_counts
from minions.demo.app import FAULTS, expected_failure, fault_for
from minions.demo.progress import summary_lines
from minions.errors import CallTimeout, PoisonCall, WorkerCrashed

MINIONS = [sys.executable, "-m", "minions"]


def demo(*args: str, cwd: Path, timeout: float = 50) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*MINIONS, "demo", *args], cwd=cwd, capture_output=True, text=True, timeout=timeout
    )


def summary(stdout: str) -> dict[str, str]:
    """The summary block as ``{"crashes": "...", "workflows": "...", ...}``."""
    found = re.findall(
        r"^  (events|workflows|crashes|calls|throughput|result) +(.*)$", stdout, re.M
    )
    return dict(found)


def worker_processes_of(pid: int) -> list[psutil.Process]:
    """Workers name their parent on their command line (``--parent-pid``): found even if they
    were orphaned and re-parented."""
    marker = ["--parent-pid", str(pid)]
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmd = proc.info["cmdline"] or []
        if any(cmd[i : i + 2] == marker for i in range(len(cmd) - 1)):
            found.append(proc)
    return [p for p in found if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


def test_demo_survives_every_injected_fault_and_loses_nothing(tmp_path):
    proc = subprocess.Popen(
        [*MINIONS, "demo", "--events", "60", "--fault-rate", "0.1", "--metrics-port", "0"],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        head = [next(proc.stdout) for _ in range(3)]  # title, log, metrics
        url = re.search(r"metrics +(http://127\.0\.0\.1:\d+/metrics)", head[2])
        assert url, head
        with urllib.request.urlopen(url.group(1), timeout=10) as response:  # served while it runs
            families = {f.name for f in text_string_to_metric_families(response.read().decode())}
        assert {"minions_worker_crashes", "minions_workflows_in_flight"} <= families
        rest, stderr = proc.communicate(timeout=50)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    stdout = "".join(head) + rest
    assert proc.returncode == 0, stdout + stderr
    lines = summary(stdout)
    # 60 events at 10%: exactly two segfaults, two aborts, two hangs, evenly spread.
    assert lines["events"] == "60 emitted, 6 with an injected fault (2 segfault, 2 abort, 2 hang)"
    assert lines["workflows"] == "54 completed, 6 survived their fault, 0 failed, 0 unfinished"
    # retries_on_crash = 1: each segfault/abort kills two workers, then is a PoisonCall.
    crashes = dict(
        (k, int(n)) for n, k in re.findall(r"(\d+) (SIGSEGV|SIGABRT|timeout)", lines["crashes"])
    )
    assert crashes == {"SIGSEGV": 4, "SIGABRT": 4, "timeout": 2}
    assert "4 poison, 2 timeout; 4 retried on a fresh worker" in lines["calls"]
    assert lines["result"].startswith("OK, nothing lost")
    assert "Traceback" not in stdout + stderr
    assert worker_processes_of(proc.pid) == []
    assert list(tmp_path.iterdir()) == []  # nothing written into the user's directory
    log_dir = Path(re.search(r"log +(\S+)", stdout).group(1)).parent
    assert not log_dir.exists()  # a clean run cleans up after itself


def test_demo_forever_ends_cleanly_on_sigterm_with_a_summary(tmp_path):
    proc = subprocess.Popen(
        [*MINIONS, "demo", "--forever", "--fault-rate", "0", "--metrics-port", "0"],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        for line in proc.stdout:  # progress lines are flushed as they are printed
            if re.search(r"events: [1-9]\d* ok", line):
                break
        proc.send_signal(signal.SIGTERM)
        rest, stderr = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, rest + stderr
    assert "minions demo: interrupted after" in rest
    lines = summary(rest)
    assert lines["workflows"].endswith("0 failed, 0 unfinished")
    assert lines["result"].startswith("OK, nothing lost")
    assert worker_processes_of(proc.pid) == []


def test_demo_runs_without_metrics_when_the_port_is_taken(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = demo(
            "--events", "8", "--fault-rate", "0", "--metrics-port", str(port), cwd=tmp_path
        )
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"metrics     not served: 127.0.0.1:{port} could not be bound" in result.stdout
    assert (
        summary(result.stdout)["workflows"]
        == "8 completed, 0 survived their fault, 0 failed, 0 unfinished"
    )


# --- in process: what "lost" means ----------------------------------------------------------


def demo_registry() -> tuple[CollectorRegistry, Counter, Counter]:
    """A registry with the real metric names and labels the demo reads."""
    registry = CollectorRegistry()
    workflows = Counter("minions_workflows", "", ["orchestration", "event"], registry=registry)
    crashes = Counter("minions_worker_crashes", "", ["pool", "reason"], registry=registry)
    return registry, workflows, crashes


def test_a_workflow_that_never_ended_is_lost_and_fails_the_demo():
    registry, workflows, crashes = demo_registry()
    for event, n in (("started", 10), ("succeeded", 8), ("aborted", 1)):
        workflows.labels("orch", event).inc(n)
    workflows.labels("other-orch", "succeeded").inc(5)  # another orchestration: not ours
    crashes.labels("DemoPool", "SIGSEGV").inc(2)
    crashes.labels("OtherPool", "SIGABRT").inc(7)

    counts = read_counts("orch", "DemoPool", registry)
    assert counts.crashes == {"SIGSEGV": 2}
    ledger = counts.ledger(emitted=10)
    assert (ledger.completed, ledger.survived, ledger.failed, ledger.unfinished) == (8, 1, 0, 1)
    assert ledger.lost == 1 and ledger.exit_code == 1

    workflows.labels("orch", "succeeded").inc()  # the straggler ends: nothing lost any more
    assert read_counts("orch", "DemoPool", registry).ledger(emitted=10).exit_code == 0


@pytest.mark.parametrize(
    ("ledger", "lost", "verdict"),
    [
        (Ledger(emitted=10, completed=9, survived=1, failed=0), 0, "OK, nothing lost"),
        (Ledger(emitted=10, completed=8, survived=1, failed=1), 1, "LOST 1: 1 failed unexpectedly"),
        (Ledger(emitted=10, completed=7, survived=1, failed=0), 2, "LOST 2: 2 never finished"),
        (
            Ledger(emitted=10, completed=10, survived=1, failed=0),
            0,
            "INCONSISTENT: 1 more workflows",
        ),
    ],
)
def test_the_verdict_and_exit_code_follow_the_ledger(ledger, lost, verdict):
    assert ledger.lost == lost
    assert ledger.exit_code == (0 if verdict.startswith("OK") else 1)
    counts = read_counts("orch", "DemoPool", CollectorRegistry())
    text = summary_lines(
        elapsed_s=1.0, ledger=ledger, counts=counts, faults={}, workers=2, spares=1,
        interrupted=False, log_path="/tmp/x.log",
    )  # fmt: skip
    assert text[-1].strip().removeprefix("result").strip().startswith(verdict)


def test_faults_are_evenly_spread_and_rotate_kinds():
    kinds = [fault_for(i, 0.1) for i in range(60)]
    assert [k for k in kinds if k] == list(FAULTS) * 2
    assert [i for i, k in enumerate(kinds) if k] == [9, 19, 29, 39, 49, 59]
    assert not any(fault_for(i, 0.0) for i in range(100))
    assert all(fault_for(i, 1.0) for i in range(100))
    assert sum(bool(fault_for(i, 0.03)) for i in range(300)) == 9


def crash(signum: int, cls: type[WorkerCrashed] = PoisonCall) -> WorkerCrashed:
    return cls(pool="p", worker_id=1, pid=1, method="m", signal=signum, exit_code=None, reason="r")


@pytest.mark.parametrize(
    ("fault", "error", "expected"),
    [
        ("segfault", crash(signal.SIGSEGV), True),
        ("segfault", crash(signal.SIGSEGV, WorkerCrashed), True),
        ("segfault", crash(signal.SIGABRT), False),
        ("abort", crash(signal.SIGABRT), True),
        ("abort", CallTimeout(pool="p", worker_id=1, pid=1, method="m", timeout_s=1), False),
        ("spin", CallTimeout(pool="p", worker_id=1, pid=1, method="m", timeout_s=1), True),
        ("spin", crash(signal.SIGKILL), False),
        ("segfault", ValueError("not a crash"), False),
    ],
)
def test_only_the_promised_typed_error_counts_as_surviving_a_fault(fault, error, expected):
    assert expected_failure(fault, error) is expected


def test_the_demo_package_imports_no_native_code():
    # The risky extension must only ever load in workers, never in Gru's process.
    code = "import sys, minions.demo.runner; print('native_demo._native' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
