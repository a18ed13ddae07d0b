"""``minions stamp component-ids`` and ``minions doctor ids`` on a temporary project, as real
processes: idempotent, additions only, behaviour unchanged, problems exit 1."""

from __future__ import annotations

import difflib
import re
import signal
import uuid
from pathlib import Path

from apps.upstream_project import launch, minions_cli, read_until, write_project

UUID = r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}"


def _sources(root: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in sorted(root.rglob("*.py"))}


def test_doctor_stamp_doctor_on_a_fresh_project(tmp_path: Path) -> None:
    write_project(tmp_path)
    before = _sources(tmp_path)

    doctor = minions_cli("doctor", "ids", ".", cwd=tmp_path)
    assert doctor.returncode == 1, doctor.stdout + doctor.stderr
    assert "OrderFeed (pipeline) has no @pipeline_id" in doctor.stdout
    assert "OrderMinion (minion) has no @minion_id" in doctor.stdout
    assert doctor.stdout.splitlines()[-1] == "2 component(s) checked, 2 problem(s)"

    dry = minions_cli("stamp", "component-ids", "--dry-run", "shop", cwd=tmp_path)
    assert dry.returncode == 0 and "would stamp OrderMinion" in dry.stdout
    assert _sources(tmp_path) == before  # a dry run writes nothing

    stamped = minions_cli("stamp", "component-ids", "shop", cwd=tmp_path)
    assert stamped.returncode == 0 and stamped.stdout.splitlines()[-1] == "2 component(s) stamped"
    after = _sources(tmp_path)
    changed = {p for p in after if after[p] != before[p]}
    assert {p.name for p in changed} == {"orders.py", "order_minion.py"}
    for path in changed:  # additions only: one import line and one decorator per class
        diff = list(
            difflib.ndiff(before[path].decode().splitlines(), after[path].decode().splitlines())
        )
        assert not [d for d in diff if d.startswith("- ")], diff
        added = [d[2:] for d in diff if d.startswith("+ ")]
        assert len(added) == 2 and added[0].startswith("from minions import ")
        assert re.fullmatch(rf'@(minion|pipeline)_id\("{UUID}"\)', added[1]), added

    again = minions_cli("stamp", "component-ids", "shop", cwd=tmp_path)
    assert again.returncode == 0 and again.stdout.splitlines()[-1] == "0 component(s) stamped"
    assert _sources(tmp_path) == after  # idempotent, byte for byte
    ok = minions_cli("doctor", "ids", ".", cwd=tmp_path)
    assert ok.returncode == 0 and ok.stdout.strip() == "2 component(s) checked, 0 problem(s)"


def test_stamped_code_runs_exactly_as_before(tmp_path: Path) -> None:
    write_project(tmp_path)
    assert minions_cli("stamp", "component-ids", ".", cwd=tmp_path).returncode == 0
    proc = launch(
        tmp_path, "shop.minions.order_minion", APP_EVENTS="2", APP_CONFIG="configs/eu.toml"
    )
    try:
        lines = read_until(proc, "STEP second 0")
        assert lines[0] == "START True 0 None"
        firsts = [line.split() for line in lines if line.startswith("STEP first")]
        assert [(f[2], f[4]) for f in firsts] == [("1", "eu"), ("0", "eu")]
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err


def test_stamping_keeps_crlf_line_endings_and_existing_decorators(tmp_path: Path) -> None:
    source = (
        '"""Doc."""\r\nfrom dataclasses import dataclass\r\n\r\nimport minions\r\n\r\n\r\n'
        "@dataclass\r\nclass Ev:\r\n    n: int = 0\r\n\r\n\r\n"
        "@some.decorator\r\nclass Feed(minions.Pipeline[Ev]):\r\n    pass\r\n"
    )
    path = tmp_path / "feed.py"
    path.write_bytes(source.encode())
    assert minions_cli("stamp", "component-ids", str(path), cwd=tmp_path).returncode == 0
    lines = path.read_bytes().decode().split("\r\n")
    assert "\n" not in "".join(lines)  # no bare LF was introduced
    assert lines[4] == "from minions import pipeline_id"  # after the leading imports
    at = lines.index("@some.decorator")
    assert re.fullmatch(rf'@pipeline_id\("{UUID}"\)', lines[at - 1])  # outermost, above it


def test_doctor_reports_duplicate_and_invalid_ids(tmp_path: Path) -> None:
    dup = str(uuid.uuid4())
    (tmp_path / "a.py").write_text(
        "from minions import Minion, minion_id\n\n"
        f'@minion_id("{dup}")\nclass A(Minion[E, C]):\n    pass\n\n'
        '@minion_id("not-a-uuid")\nclass B(Minion[E, C]):\n    pass\n'
    )
    (tmp_path / "b.py").write_text(
        "from minions import Pipeline, Minion, minion_id, pipeline_id\n\n"
        f'@minion_id("{dup}")\nclass Copy(Minion[E, C]):\n    pass\n\n'
        f'@pipeline_id("{dup}")\nclass SameIdOtherKind(Pipeline[E]):\n    pass\n'
    )
    doctor = minions_cli("doctor", "ids", ".", cwd=tmp_path)
    assert doctor.returncode == 1
    problems = doctor.stdout.splitlines()[:-1]
    assert len(problems) == 2, problems
    assert "B (minion): component id 'not-a-uuid' is not a UUID" in problems[0]
    assert f"Copy (minion): duplicate minion id {dup} (also A at a.py:4)" in problems[1]


def test_bad_paths_are_one_line_usage_errors(tmp_path: Path) -> None:
    (tmp_path / "broken.py").write_text("class X(Minion:\n")
    (tmp_path / "notes.txt").write_text("hi")
    for args, message in [
        (("stamp", "component-ids", "missing"), "no such file or directory: missing"),
        (("doctor", "ids", "notes.txt"), "notes.txt is not a Python source file"),
        (("stamp", "component-ids", "broken.py"), "broken.py:1: cannot parse"),
    ]:
        out = minions_cli(*args, cwd=tmp_path)
        assert out.returncode == 2 and message in out.stderr, (args, out.stderr)
        assert len(out.stderr.splitlines()) == 1 and "Traceback" not in out.stderr


def test_a_bad_config_file_fails_the_start_naming_file_and_field(tmp_path: Path) -> None:
    write_project(tmp_path)
    (tmp_path / "configs" / "bad.toml").write_text('region = "eu"\nretries = "two"\n')
    proc = launch(tmp_path, "shop.minions.order_minion", APP_CONFIG="configs/bad.toml")
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 3, err
    assert out.startswith(
        "START False 0 configs/bad.toml: Expected `int`, got `str` - at `$.retries`"
    )
    assert "start_orchestration refused: configs/bad.toml" in err  # the console says so too
