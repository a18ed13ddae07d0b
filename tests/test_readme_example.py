"""The established Minions README example runs unchanged, as a real process with the defaults:
SQLite state in ./minions.db, the log in ./minions.log, metrics on :8081 (or one logged error
if that port is taken), and a real SIGTERM for a clean exit."""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

EXAMPLE = textwrap.dedent(
    """
    import asyncio
    from dataclasses import dataclass

    from minions import Gru, Minion, Pipeline, minion_step


    @dataclass
    class MyEvent:
        greeting: str = "hello world"


    class MyPipeline(Pipeline[MyEvent]):
        async def produce_event(self) -> MyEvent:
            await asyncio.sleep(0.01)
            return MyEvent()


    @dataclass
    class MyContext:
        last: str | None = None


    class MyMinion(Minion[MyEvent, MyContext]):
        @minion_step
        async def step_1(self):
            self.context.last = self.event.greeting

        @minion_step
        async def step_2(self):
            print(self.context.last, flush=True)


    async def main():
        gru = await Gru.create()
        await gru.start_orchestration(MyPipeline, MyMinion)
        await gru.wait_closed()


    if __name__ == "__main__":
        asyncio.run(main())
    """
)


@pytest.mark.timeout(60)
def test_readme_example_runs_unchanged_and_stops_cleanly(tmp_path: Path) -> None:
    (tmp_path / "example.py").write_text(EXAMPLE)
    proc = subprocess.Popen(
        [sys.executable, "example.py"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        greetings = [proc.stdout.readline() for _ in range(20)]
        assert greetings == ["hello world\n"] * 20
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert "Traceback" not in err
    log = (tmp_path / "minions.log").read_text()
    assert "level=INFO" in log
    with sqlite3.connect(tmp_path / "minions.db") as db:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
