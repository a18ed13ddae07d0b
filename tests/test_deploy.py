"""The systemd units in deploy/: valid for systemd itself, and saying what the docs promise."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from minions.remote.host import _STOP_S as HOST_STOP_S
from minions.runtime.config import GruConfig

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
SERVICE = DEPLOY / "minions.service"
TEMPLATE = DEPLOY / "minions@.service"
ENV_EXAMPLE = DEPLOY / "minions.env.example"
WORKER_HOST = DEPLOY / "minions-worker-host.service"
HOST_ENV_EXAMPLE = DEPLOY / "minions-worker-host.env.example"

# Shutdown budget: Gru's grace for in-flight steps, then each pool's polite stop of its workers
# (shutdown grace, then SIGTERM, then SIGKILL). The unit must allow more before its SIGKILL.
GRU_STOP_TIMEOUT_S = GruConfig().stop_timeout_s  # Gru's whole shutdown, pools included

# Directives that differ between the single unit and the template, on purpose.
PER_INSTANCE = {
    "Description", "EnvironmentFile", "Environment", "StateDirectory", "WorkingDirectory",
    "RuntimeDirectory", "SyslogIdentifier",
}  # fmt: skip

Unit = dict[str, list[tuple[str, str]]]


def parse_unit(path: Path) -> Unit:
    """Sections -> ordered (key, value) pairs; keys may repeat, as systemd allows."""
    unit: Unit = {}
    section = None
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            unit.setdefault(section, [])
            continue
        key, sep, value = line.partition("=")
        assert sep and section, f"{path.name}: not a directive: {raw!r}"
        unit[section].append((key.strip(), value.strip()))
    return unit


def values(unit: Unit, section: str, key: str) -> list[str]:
    return [v for k, v in unit.get(section, []) if k == key]


def one(unit: Unit, key: str, section: str = "Service") -> str:
    found = values(unit, section, key)
    assert len(found) == 1, f"{key} set {len(found)} times in [{section}]"
    return found[0]


def seconds(text: str) -> float:
    units = {"ms": 0.001, "s": 1, "sec": 1, "min": 60, "m": 60, "h": 3600, "": 1}
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([a-z]*)", text)
    assert m and m.group(2) in units, f"unsupported time span {text!r}"
    return float(m.group(1)) * units[m.group(2)]


def size(text: str) -> int:
    m = re.fullmatch(r"(\d+)([KMGT]?)", text)
    assert m, f"unsupported size {text!r}"
    return int(m.group(1)) * 1024 ** " KMGT".index(m.group(2) or " ")


def environment(unit: Unit) -> dict[str, str]:
    env: dict[str, str] = {}
    for line in values(unit, "Service", "Environment"):
        key, _, value = line.partition("=")
        env[key] = value
    return env


@pytest.fixture(params=[SERVICE, TEMPLATE], ids=["minions.service", "minions@.service"])
def unit_path(request: pytest.FixtureRequest) -> Path:
    return request.param


@pytest.fixture(params=[SERVICE, TEMPLATE, WORKER_HOST], ids=lambda p: p.name)
def any_unit(request: pytest.FixtureRequest) -> Path:
    """Every shipped unit, the worker host's included (``unit_path``: Gru's units only)."""
    return request.param


# --- systemd's own verdict --------------------------------------------------------------------


def _systemd_analyze() -> str:
    exe = shutil.which("systemd-analyze")
    if exe is None:
        pytest.skip("systemd-analyze is not installed (apt-get install systemd)")
    return exe


def verify(exe: str, directory: Path, name: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [exe, "verify", str(directory / name)], capture_output=True, text=True, timeout=30
    )


def test_systemd_analyze_verify(any_unit: Path, tmp_path: Path) -> None:
    exe = _systemd_analyze()
    (tmp_path / "control.service").write_text("[Service]\nExecStart=/bin/true\n")
    control = verify(exe, tmp_path, "control.service")
    if control.returncode != 0:
        pytest.skip(f"systemd-analyze verify cannot run here: {control.stderr.strip()}")
    # verify insists that ExecStart's binary exists; the venv of a real install does not here.
    text = any_unit.read_text()
    assert "ExecStart=/opt/minions/.venv/bin/minions " in text
    text = text.replace("ExecStart=/opt/minions/.venv/bin/minions", "ExecStart=/bin/true")
    (tmp_path / any_unit.name).write_text(text)
    name = "minions@8082.service" if any_unit == TEMPLATE else any_unit.name
    result = verify(exe, tmp_path, name)
    # Unknown keys and bad values are only warnings (exit 0) to systemd, and silently ignored
    # at run time: any mention of our file on stderr is a failure.
    assert result.returncode == 0, result.stderr
    ours = [line for line in result.stderr.splitlines() if str(tmp_path) in line]
    assert ours == [], "\n".join(ours)


def test_verify_would_catch_an_inline_comment(tmp_path: Path) -> None:
    """The failure mode of the old recipe: systemd ignores `MemoryHigh=1G  # soft`, loudly only
    in verify. Guards the test above against passing vacuously."""
    exe = _systemd_analyze()
    (tmp_path / "bad.service").write_text(
        "[Service]\nExecStart=/bin/true\nMemoryHigh=1G      # soft pressure point\n"
        "OOMPolicy=restart\n"
    )
    result = verify(exe, tmp_path, "bad.service")
    if "Invalid memory limit" not in result.stderr:
        pytest.skip(f"this systemd-analyze does not report bad values: {result.stderr!r}")
    assert "OOM policy" in result.stderr


# --- what the units must say ------------------------------------------------------------------


def test_required_directives_and_relations(unit_path: Path) -> None:
    u = parse_unit(unit_path)
    assert one(u, "Type") == "notify"
    assert one(u, "NotifyAccess") == "main"
    assert re.fullmatch(
        r"/opt/minions/\.venv/bin/minions run [\w.]+:\w+", one(u, "ExecStart")
    )  # fmt: skip
    assert one(u, "Restart") == "on-failure"
    assert 0 < seconds(one(u, "RestartSec")) <= 10
    watchdog = seconds(one(u, "WatchdogSec"))
    assert 10 <= watchdog <= 120, "pings every WatchdogSec/2; too short risks false restarts"
    stop = seconds(one(u, "TimeoutStopSec"))
    assert stop > GRU_STOP_TIMEOUT_S, "systemd must not SIGKILL a Gru keeping to its deadline"
    assert one(u, "KillMode") == "mixed"
    assert one(u, "MemoryAccounting") == "yes"
    assert size(one(u, "MemoryHigh")) < size(one(u, "MemoryMax"))
    # continue: a worker's OOM kill is the pool's business; Gru's own is a restart.
    assert one(u, "OOMPolicy") == "continue"
    assert one(u, "DynamicUser") == "yes" and one(u, "User") == "minions"
    state = one(u, "StateDirectory")
    assert one(u, "WorkingDirectory") == f"%S/{state}", "minions.db must land in the state dir"
    runtime = one(u, "RuntimeDirectory")
    assert environment(u)["XDG_RUNTIME_DIR"] == f"%t/{runtime}", "pool sockets in the runtime dir"
    assert one(u, "StandardOutput") == one(u, "StandardError") == "journal"
    for key, expected in {
        "NoNewPrivileges": "yes", "ProtectSystem": "strict", "PrivateTmp": "yes",
        "ProtectHome": "yes",
    }.items():  # fmt: skip
        assert one(u, key) == expected, key
    assert set(one(u, "RestrictAddressFamilies").split()) == {"AF_UNIX", "AF_INET", "AF_INET6"}
    # Settings that would break workers or the memory monitor must stay off.
    assert values(u, "Service", "MemoryDenyWriteExecute") == []
    assert values(u, "Service", "ProcSubset") == []
    assert values(u, "Service", "PrivateNetwork") == []
    assert values(u, "Install", "WantedBy") == ["multi-user.target"]


def test_no_value_carries_a_comment(any_unit: Path) -> None:
    for section, pairs in parse_unit(any_unit).items():
        for key, value in pairs:
            assert "#" not in value, f"[{section}] {key}={value}: systemd reads the comment too"


def test_template_shards_by_instance_name() -> None:
    t = parse_unit(TEMPLATE)
    # Flat names: the single unit's directories must not contain the replicas' (see the unit).
    assert one(t, "StateDirectory") == "minions-%i"
    assert one(t, "RuntimeDirectory") == "minions-%i"
    env = environment(t)
    assert env["MINIONS_METRICS_PORT"] == "%i" and env["MINIONS_SHARD"] == "%i"
    assert "%i" in one(t, "SyslogIdentifier") and "%i" in one(t, "Description", "Unit")
    assert "-/etc/minions/shard-%i.env" in values(t, "Service", "EnvironmentFile")


def test_template_matches_the_single_unit_elsewhere() -> None:
    """Hardening, limits and lifecycle must not drift between the two files."""

    def shared(u: Unit) -> dict[str, list[tuple[str, str]]]:
        return {s: [(k, v) for k, v in p if k not in PER_INSTANCE] for s, p in u.items()}

    assert shared(parse_unit(TEMPLATE)) == shared(parse_unit(SERVICE))
    single_env = environment(parse_unit(SERVICE))
    template_env = environment(parse_unit(TEMPLATE))
    for key in single_env.keys() - {"XDG_RUNTIME_DIR"}:
        assert template_env[key] == single_env[key], key


def test_env_example_is_a_valid_environment_file() -> None:
    active = {}
    for raw in ENV_EXAMPLE.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        assert re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", line), f"not KEY=VALUE: {raw!r}"
        assert "#" not in line, f"comments must sit on their own line: {raw!r}"
        key, _, value = line.partition("=")
        active[key] = value
    # Would override every replica's instance-derived values in minions@.service.
    assert "MINIONS_METRICS_PORT" not in active and "MINIONS_SHARD" not in active
    assert active["MINIONS_METRICS_HOST"] == "127.0.0.1"


# --- the worker host's unit -------------------------------------------------------------------

HARDENING = (
    "NoNewPrivileges", "ProtectSystem", "ProtectHome", "PrivateTmp", "PrivateDevices",
    "ProtectKernelTunables", "ProtectKernelModules", "ProtectKernelLogs", "ProtectControlGroups",
    "ProtectClock", "ProtectHostname", "ProtectProc", "RestrictAddressFamilies",
    "RestrictNamespaces", "RestrictRealtime", "RestrictSUIDSGID", "LockPersonality", "RemoveIPC",
    "CapabilityBoundingSet", "SystemCallArchitectures", "SystemCallFilter",
    "SystemCallErrorNumber", "LimitCORE", "DynamicUser", "User", "Group", "UMask",
    "NotifyAccess", "KillMode", "KillSignal", "MemoryAccounting", "MemorySwapMax", "OOMPolicy",
    "RestartPreventExitStatus", "StandardOutput", "StandardError",
)  # fmt: skip


def test_worker_host_unit_keeps_gru_s_hardening_and_fits_the_host() -> None:
    u, gru = parse_unit(WORKER_HOST), parse_unit(SERVICE)
    for key in HARDENING:
        assert values(u, "Service", key) == values(gru, "Service", key), key
    assert one(u, "Type") == "notify"
    command = one(u, "ExecStart")
    assert command.startswith("/opt/minions/.venv/bin/minions worker-host ")
    # The keys are credentials (%d is their directory): each one the command names is loaded.
    loaded = {v.partition(":")[0] for v in values(u, "Service", "LoadCredential")}
    named = set(re.findall(r"--(?:key|server-key) %d/(\S+)", command))
    assert named == loaded == {"host.key_secret", "pool.key"}
    # It never ends by itself; exit code 2 (configuration) must not loop.
    assert one(u, "Restart") == "always" and one(u, "RestartPreventExitStatus") == "2"
    assert values(u, "Service", "WatchdogSec") == [], "the host sends no WATCHDOG=1"
    # Each session's workers get HOST_STOP_S, whose escalation waits can take about twice that.
    assert seconds(one(u, "TimeoutStopSec")) > 2 * HOST_STOP_S
    assert size(one(u, "MemoryHigh")) < size(one(u, "MemoryMax"))
    runtime = one(u, "RuntimeDirectory")
    assert runtime != one(gru, "RuntimeDirectory"), "minions.service removes its own at stop"
    assert environment(u)["XDG_RUNTIME_DIR"] == f"%t/{runtime}"
    assert values(u, "Service", "StateDirectory") == []
    assert values(u, "Install", "WantedBy") == ["multi-user.target"]


def test_worker_host_env_example_sets_what_the_command_reads() -> None:
    active = {}
    for raw in HOST_ENV_EXAMPLE.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        assert re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", line), f"not KEY=VALUE: {raw!r}"
        key, _, value = line.partition("=")
        active[key] = value
    read = set(re.findall(r"\$\{?(MINIONS_\w+)", one(parse_unit(WORKER_HOST), "ExecStart")))
    assert read == {"MINIONS_HOST_CONNECT", "MINIONS_HOST_SERVICE", "MINIONS_HOST_OPTIONS"}
    assert read <= active.keys()
    assert active["MINIONS_HOST_CONNECT"].startswith("tcp://")
    assert active["MINIONS_HOST_SERVICE"].count(":") == 1
