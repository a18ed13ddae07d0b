"""The monitoring that ships in deploy/: Prometheus rules and a Grafana dashboard that promtool
accepts and that only name series a live Gru really exports, with bounded label values."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import run
from minions import Gru
from minions.errors import RemoteError, WorkerCrashed
from pools import DemoPool

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
DASHBOARD = DEPLOY / "grafana" / "minions-dashboard.json"
BOGUS_METHOD = "no_such_method_4f1c"

# Series names in PromQL: our families and the process collector's, with their suffixes.
_SERIES = re.compile(r"\b((?:minions|process)_[a-z_]+)\b")
_SUFFIXES = ("_total", "_bucket", "_sum", "_count")


def _promtool() -> str:
    exe = shutil.which("promtool")
    if exe is None:
        pytest.skip("promtool is not installed (apt-get install prometheus; CI installs it)")
    return exe


def live_scrape(tmp_path: Path) -> str:
    """The exposition of a real Gru, after a real call, a real segfault and a call to a method
    the service does not have (whose name must not become a label value)."""

    async def main() -> str:
        gru = await Gru.create(state_store=None, metrics_port=0, log_file=str(tmp_path / "g.log"))
        try:
            async with DemoPool() as pool:
                assert await pool.call("crc32", b"abc") == 891568578
                with pytest.raises(WorkerCrashed):
                    await pool.call("segfault")
                with pytest.raises(RemoteError):
                    await pool.call(BOGUS_METHOD)
                url = f"http://127.0.0.1:{gru.metrics_port}/metrics"
                with urllib.request.urlopen(url, timeout=10) as response:
                    return response.read().decode()
        finally:
            await gru.shutdown()

    return run(main())


@pytest.fixture(scope="module")
def exposition(tmp_path_factory: pytest.TempPathFactory) -> str:
    return live_scrape(tmp_path_factory.mktemp("scrape"))


def test_promtool_accepts_the_alert_rules() -> None:
    result = subprocess.run(
        [_promtool(), "check", "rules", str(ALERTS)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.search(r"SUCCESS: (\d+) rules found", result.stdout)


def test_promtool_lints_a_live_scrape_clean(exposition: str) -> None:
    exe = _promtool()
    result = subprocess.run(
        [exe, "check", "metrics"], input=exposition, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
    # The lint is not vacuous: the same tool rejects a counter without _total.
    bad = subprocess.run([exe, "check", "metrics"], input="# TYPE x counter\nx 1\n",
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    assert bad.returncode != 0


def test_the_scrape_has_no_created_series_and_bounded_labels(exposition: str) -> None:
    samples = [s for f in text_string_to_metric_families(exposition) for s in f.samples]
    names = {s.name for s in samples}
    assert "minions_worker_crashes_total" in names and "process_start_time_seconds" in names
    assert not [n for n in names if n.endswith("_created")]
    values = {v for s in samples for v in s.labels.values()}
    assert "crc32" in values and "SIGSEGV" in values  # the labels we expect are there
    assert BOGUS_METHOD not in values, "a caller's method name became a label value"


def _series_in(expr: str) -> set[str]:
    return set(_SERIES.findall(expr))


def _exported(exposition: str) -> set[str]:
    out = set()
    for family in text_string_to_metric_families(exposition):
        out.add(family.name)
        out.update(s.name for s in family.samples)
    return out


def _family(series: str) -> str:
    for suffix in _SUFFIXES:
        series = series.removesuffix(suffix)
    return series


def test_every_series_the_alerts_and_dashboard_use_is_exported(exposition: str) -> None:
    exported = _exported(exposition)
    rules = ALERTS.read_text()
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    assert exprs and all(p["targets"] for p in dashboard["panels"])
    used = _series_in(rules) | {name for e in exprs for name in _series_in(e)}
    assert {"process_start_time_seconds", "minions_pool_circuit_open"} <= used
    missing = {n for n in used if n not in exported and _family(n) not in exported}
    assert not missing, f"alerts/dashboard use series no Gru exports: {sorted(missing)}"


def test_alerts_cover_what_an_operator_is_paged_for() -> None:
    rules = ALERTS.read_text()
    for needle in ("minions_worker_crashes_total", "minions_pool_circuit_open",
                   "minions_memory_pressure_level", 'event="failed"',
                   "changes(process_start_time_seconds", "minions_watchdog_last_ping"):  # fmt: skip
        assert needle in rules, needle


def test_dashboard_is_importable_json_with_unique_ids() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids)) and dashboard["uid"] and dashboard["title"]
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    assert {"datasource", "instance"} <= variables
    for panel in dashboard["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24, panel["title"]
