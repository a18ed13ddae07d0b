"""The docs build warning-free, document every metric, and show only units systemd accepts."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from prometheus_client.metrics_core import Metric

from minions.ops import metrics_server
from minions.ops.metrics import REGISTRY
from minions.runtime.config import GruConfig

DOCS = Path(__file__).resolve().parent.parent / "docs"
METRICS_PAGE = DOCS / "operations" / "metrics.md"

_SUFFIX = {"counter": "_total"}
_TYPE_WORD = {"counter": "counter", "gauge": "gauge", "histogram": "histogram"}


def families() -> list[Metric]:
    return list(REGISTRY.collect())


def test_every_metric_is_documented_with_its_type_and_labels() -> None:
    rows = {}
    for line in METRICS_PAGE.read_text().splitlines():
        m = re.match(r"\| `((?:minions|process)_\w+)` \| (\w+) \| ([^|]*) \|", line)
        if m:
            rows[m.group(1)] = (m.group(2), m.group(3))
    declared = set()
    for fam in families():
        name = fam.name + _SUFFIX.get(fam.type, "")
        declared.add(name)
        assert name in rows, f"{name} is exported but not documented in {METRICS_PAGE.name}"
        kind, labels = rows[name]
        assert kind == _TYPE_WORD[fam.type], f"{name}: documented as {kind}, is {fam.type}"
        documented = set(re.findall(r"`(\w+)`", labels))
        actual = _labels_of(fam.name)
        assert documented == actual, f"{name}: labels {documented} documented, {actual} exported"
    assert set(rows) == declared, f"documented but not exported: {set(rows) - declared}"


def _labels_of(family_name: str) -> set[str]:
    for collector, names in REGISTRY._collector_to_names.items():
        if family_name in names:
            return set(getattr(collector, "_labelnames", ()))
    raise AssertionError(family_name)


def test_documented_defaults_match_the_code() -> None:
    text = METRICS_PAGE.read_text()
    assert metrics_server.DEFAULT_PORT == GruConfig().metrics_port == 8081
    assert f"http://{metrics_server.DEFAULT_HOST}:8081/metrics" in text


def ini_blocks(page: Path) -> list[str]:
    return [b for b in re.findall(r"```ini\n(.*?)```", page.read_text(), re.S) if "[Service]" in b]


def test_unit_files_shown_in_the_docs_are_accepted_by_systemd(tmp_path: Path) -> None:
    exe = shutil.which("systemd-analyze")
    if exe is None:
        pytest.skip("systemd-analyze is not installed")
    blocks = [b for page in sorted((DOCS / "deployment").glob("*.md")) for b in ini_blocks(page)]
    assert blocks, "the deployment pages show no unit file"
    for i, block in enumerate(blocks):
        unit = tmp_path / f"doc{i}.service"
        # verify needs ExecStart's binary to exist on this machine.
        unit.write_text(re.sub(r"^ExecStart=\S+", "ExecStart=/bin/true", block, flags=re.M))
        result = subprocess.run(
            [exe, "verify", str(unit)], capture_output=True, text=True, timeout=30
        )
        ours = [line for line in result.stderr.splitlines() if str(unit) in line]
        assert result.returncode == 0 and not ours, f"docs unit #{i}:\n{result.stderr}"


@pytest.mark.timeout(120)
def test_docs_build_without_warnings(tmp_path: Path) -> None:
    """Reads, parses, autodocs and cross-references every page (the dummy builder skips only
    writing HTML); `make -C docs html` is the full build."""
    result = subprocess.run(
        [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "dummy",
         str(DOCS), str(tmp_path / "out")],
        capture_output=True, text=True, timeout=110,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
