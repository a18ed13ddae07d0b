"""mypy sees what a typed call gets wrong, before anything runs: one real mypy run over a small
file with exactly two mistakes (a wrong argument type, a method of another service), plus the
README's example, which must type-check clean."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

USES = textwrap.dedent(
    """\
    from typing import Any

    from native_demo.service import NativeDemo

    from minions.workers import WorkerPool, WorkerService, expose


    class Other(WorkerService):
        @expose
        def shout(self, text: str) -> str:
            return text.upper()


    class NativePool(WorkerPool[NativeDemo]):
        workers = 1


    async def use(pool: NativePool) -> None:
        reveal_type(await pool.call(NativeDemo.crc32, b"ok"))
        await pool.call(NativeDemo.crc32, "not bytes")  # MISTAKE: wrong argument type
        await pool.call(Other.shout, "hi")  # MISTAKE: a method of another service
        dynamic: Any = await pool.call("crc32", b"by name")
        reveal_type(await pool.options(timeout_s=1, cancel="kill").call(NativeDemo.ping, 1))
        async for crc in pool.map(NativeDemo.crc32, [b"a", b"b"]):
            reveal_type(crc)
        async for outcome in pool.map(NativeDemo.crc32, [b"a"], return_exceptions=True):
            reveal_type(outcome)
    """
)


def readme_example() -> str:
    text = (ROOT / "README.md").read_text()
    section = text.split("## What it looks like", 1)[1]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match, "the README's example is gone"
    return match.group(1)


@pytest.mark.timeout(120)
def test_mypy_reports_exactly_the_two_mistakes(tmp_path: Path) -> None:
    (tmp_path / "uses.py").write_text(USES)
    (tmp_path / "readme_example.py").write_text(readme_example())
    (tmp_path / "mypy.ini").write_text("[mypy]\npython_version = 3.11\nfollow_imports = silent\n")
    env = dict(os.environ, MYPYPATH=f"{ROOT / 'src'}{os.pathsep}{ROOT / 'workers'}")
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--config-file", "mypy.ini", "--no-error-summary",
         "--cache-dir", str(tmp_path / "cache"), "uses.py", "readme_example.py"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=110,
    )  # fmt: skip
    out = result.stdout.splitlines()
    errors = [line for line in out if ": error:" in line]
    mistakes = [n for n, line in enumerate(USES.splitlines(), 1) if "# MISTAKE" in line]
    assert [int(e.split(":")[1]) for e in errors] == mistakes, result.stdout + result.stderr
    assert all(e.startswith("uses.py:") and e.endswith("[call-overload]") for e in errors)
    assert 'Callable[[NativeDemo, bytes], int]", "str"' in errors[0]
    assert "Callable[[Other, str], str]" in errors[1]
    revealed = [line.split("Revealed type is ")[1] for line in out if "Revealed type" in line]
    assert revealed == ['"int"', '"int"', '"int"', '"int | Exception"'], result.stdout
    assert result.returncode == 1
