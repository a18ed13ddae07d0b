"""The established metric names, computed from ``minions_*`` by the shipped recording rules.

``promtool check rules`` validates the file; ``promtool test rules`` then evaluates it over the
series of a real Gru, scraped over HTTP from its real endpoint, and the test states what the
established names must read for that run. Skipped (with the reason) where promtool is missing:
it comes with Debian's ``prometheus`` package, which ``.ci/run`` installs.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from apps.harness import Ev, h, running_gru, use_harness
from conftest import run
from minions import AbortWorkflow, Minion, Pipeline, Resource, minion_id, minion_step

ROOT = Path(__file__).resolve().parents[1]
RULES = ROOT / "deploy" / "prometheus" / "upstream-names.yml"
MIGRATION = ROOT / "docs" / "concepts" / "migrating-from-upstream.md"
MINION = "88888888-8888-4888-8888-888888888888"
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool is not installed (Debian package: prometheus)"
)


@dataclass
class Tick:
    n: int = 0


@dataclass
class TickCtx:
    price: float = 0.0


class MeteredPrices(Resource):
    async def get_price(self, n: int) -> float:
        if n == 2:
            raise LookupError("no price")
        return 1.0


class MetricsFeed(Pipeline[Tick]):
    async def produce_event(self) -> Tick:
        return Tick((await h().events.get()).n)


@minion_id(MINION)
class MeteredMinion(Minion[Tick, TickCtx]):
    prices: MeteredPrices

    @minion_step
    async def first(self) -> None:
        if self.event.n <= 0:
            h().finished.put_nowait(self.event.n)  # it ends in this step, without a suspension
            raise ValueError("negative") if self.event.n < 0 else AbortWorkflow("zero")
        try:
            self.context.price = await self.prices.get_price(self.event.n)
        except LookupError:
            pass

    @minion_step
    async def second(self) -> None:
        h().finished.put_nowait(self.event.n)


@needs_promtool
def test_the_rules_file_passes_promtool_check() -> None:
    out = subprocess.run([PROMTOOL, "check", "rules", str(RULES)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    assert re.search(r"SUCCESS: \d+ rules found", out.stdout), out.stdout


def _scrape_a_run() -> tuple[str, str]:
    """Run 4 workflows (2 succeed, 1 fails, 1 aborts) and scrape /metrics over HTTP."""

    async def main() -> tuple[str, str]:
        harness = use_harness()
        async with running_gru(metrics=True, metrics_port=0) as gru:
            result = await gru.start_orchestration(MetricsFeed, MeteredMinion)
            assert result.success and result.orchestration_id, result.reason
            for n in (1, 2, -1, 0):
                harness.events.put_nowait(Ev(n))
            assert sorted(await harness.take(harness.finished, 4)) == [-1, 0, 1, 2]
            (status,) = gru.status().orchestrations
            assert (status.succeeded, status.failed, status.aborted) == (2, 1, 1)
            url = gru.status().metrics_url
            assert url is not None
            text = await asyncio.to_thread(
                lambda: urllib.request.urlopen(url, timeout=10).read().decode()
            )
            return result.orchestration_id, text

    return run(main())


def _series(text: str) -> list[dict[str, Any]]:
    out = []
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.endswith("_created"):
                continue
            labels = dict(sample.labels, job="minions", instance="app-1")
            body = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
            out.append(
                {"series": f"{sample.name}{{{body}}}", "values": f"{sample.value} {sample.value}"}
            )
    return out


def _expect(name: str, value: float, **labels: str) -> dict[str, Any]:
    labels = dict(labels, job="minions", instance="app-1")
    body = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    return {"expr": f"{name}{{{body}}}", "eval_time": "1m",
            "exp_samples": [{"labels": f"{name}{{{body}}}", "value": value}]}  # fmt: skip


@needs_promtool
@pytest.mark.timeout(60)
def test_the_established_names_read_right_for_a_real_run(tmp_path: Path) -> None:
    oid, text = _scrape_a_run()
    mine = {"minion": MINION, "orchestration_id": oid}
    series = _series(text)
    # Persistence failures do not happen in this run: add their source series by hand.
    for stage, value in (("serialize", 1), ("save", 2)):
        series.append({
            "series": f'minions_checkpoint_failures_total{{instance="app-1",job="minions",'
                      f'operation="save",orchestration="{oid}",stage="{stage}"}}',
            "values": f"{value} {value}",
        })  # fmt: skip
    tests = [
        _expect("minion_workflow_started_total", 4, **mine),
        _expect("minion_workflow_succeeded_total", 2, **mine),
        _expect("minion_workflow_failed_total", 1, **mine),
        _expect("minion_workflow_aborted_total", 1, **mine),
        _expect("minion_workflow_inflight_gauge", 0, **mine),
        _expect("minion_workflow_step_started_total", 4, minion_workflow_step="first", **mine),
        _expect("minion_workflow_step_started_total", 2, minion_workflow_step="second", **mine),
        _expect("minion_workflow_step_succeeded_total", 2, minion_workflow_step="first", **mine),
        _expect("minion_workflow_step_failed_total", 1, minion_workflow_step="first", **mine),
        _expect("minion_workflow_step_aborted_total", 1, minion_workflow_step="first", **mine),
        _expect("minion_workflow_step_duration_seconds_count", 2, minion_workflow_step="second",
                status="succeeded", **mine),
        _expect("minion_workflow_step_duration_seconds_bucket", 2, minion_workflow_step="second",
                status="succeeded", le="+Inf", **mine),
        _expect("pipeline_event_produced_total", 4, pipeline="MetricsFeed"),
        _expect("pipeline_event_fanout_total", 4, pipeline="MetricsFeed", orchestration_id=oid),
        _expect("resource_serves_total", 1, resource="MeteredPrices", resource_method="get_price"),
        _expect("resource_error_total", 1, resource="MeteredPrices", resource_method="get_price"),
        _expect("resource_latency_seconds_count", 1, resource="MeteredPrices",
                resource_method="get_price"),
        _expect("minion_workflow_persistence_failures_total", 1, **mine,
                minion_workflow_persistence_operation="save",
                minion_workflow_persistence_failure_stage="serialize",
                minion_workflow_persistence_retryable="false"),
        _expect("minion_workflow_persistence_failures_total", 2, **mine,
                minion_workflow_persistence_operation="save",
                minion_workflow_persistence_failure_stage="save",
                minion_workflow_persistence_retryable="true"),
    ]  # fmt: skip
    wanted = ("minions_host_memory", "process_resident_memory")
    values = {s["series"].split("{")[0]: float(s["values"].split()[0]) for s in series
              if s["series"].startswith(wanted)}  # fmt: skip
    tests.append(_expect("process_memory_used_percent",
                         100 * values["process_resident_memory_bytes"]
                         / values["minions_host_memory_total_bytes"]))  # fmt: skip
    spec = {
        "rule_files": [str(RULES)],
        "evaluation_interval": "1m",
        "tests": [{"interval": "1m", "input_series": series, "promql_expr_test": tests}],
    }
    path = tmp_path / "upstream-names.test.yml"
    path.write_text(json.dumps(spec))  # YAML is a superset of JSON
    out = subprocess.run([PROMTOOL, "test", "rules", str(path)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_every_recorded_name_is_in_the_migration_map() -> None:
    recorded = set(re.findall(r"^\s+- record: (\w+)$", RULES.read_text(), re.M))
    assert len(recorded) >= 20
    documented = MIGRATION.read_text()
    bases = {re.sub(r"_(bucket|sum|count)$", "", name) for name in recorded}
    missing = sorted(name for name in bases if f"`{name}`" not in documented)
    assert not missing, f"recorded but not in {MIGRATION.name}: {missing}"
