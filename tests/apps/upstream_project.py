"""A throw-away project laid out as the established docs recommend, run as real processes.

``write_project(root)`` creates ``shop/`` (a pipeline module, a minion module, a config) and
``launch.py``, which starts one orchestration from module paths given in the environment and
prints ``START <success> <resumed> <reason>``; each step prints ``STEP <name> <n> <pid>`` once
it ran (and ``second`` blocks when ``APP_BLOCK=1``), so tests follow a run line by line.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

_TESTS = Path(__file__).resolve().parents[1]

PIPELINE = """
import asyncio
import os
from dataclasses import dataclass

from minions import Pipeline


@dataclass
class Order:
    n: int = 0


class OrderFeed(Pipeline[Order]):
    async def startup(self) -> None:
        self.left = int(os.environ.get("APP_EVENTS", "1"))

    async def produce_event(self) -> Order:
        if self.left <= 0:
            await asyncio.Event().wait()
        self.left -= 1
        return Order(self.left)
"""

MINION = """
import asyncio
import os
from dataclasses import dataclass, field

from minions import Minion, minion_step
from shop.pipelines.orders import Order


@dataclass
class ShopConfig:
    region: str
    retries: int = 1


@dataclass
class OrderCtx:
    trail: list[str] = field(default_factory=list)


class OrderMinion(Minion[Order, OrderCtx]):
    config: ShopConfig

    @minion_step
    async def first(self) -> None:
        region = self.config.region if self.config is not None else "-"
        print(f"STEP first {self.event.n} {os.getpid()} {region}", flush=True)

    @minion_step
    async def second(self) -> None:
        print(f"STEP second-start {self.event.n} {os.getpid()}", flush=True)
        if os.environ.get("APP_BLOCK") == "1":
            await asyncio.Event().wait()
        print(f"STEP second {self.event.n} {os.getpid()}", flush=True)
"""

LAUNCH = """
import asyncio
import os
import sys

from minions import Gru


async def main() -> None:
    gru = await Gru.create(db_path=os.environ["APP_DB"], metrics=None, grace_period_s=1.0)
    result = await gru.start_orchestration(
        os.environ["APP_PIPELINE"], os.environ["APP_MINION"],
        minion_config_path=os.environ.get("APP_CONFIG") or None,
    )
    print(f"START {result.success} {result.resumed} {result.reason}", flush=True)
    if not result.success:
        await gru.shutdown()
        sys.exit(3)
    await gru.wait_closed()


asyncio.run(main())
"""


def write_project(root: Path, *, minion_module: str = "shop/minions/order_minion.py") -> None:
    """The project tree; the minion's module path is a parameter so tests can move it."""
    files = {
        "shop/__init__.py": "",
        "shop/pipelines/__init__.py": "",
        "shop/pipelines/orders.py": PIPELINE,
        "shop/minions/__init__.py": "",
        minion_module: MINION,
        "configs/eu.toml": 'region = "eu"\nretries = 2\n',
        "launch.py": LAUNCH,
    }
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.exists() or name == minion_module:
            path.write_text(textwrap.dedent(text).lstrip())
    (root / minion_module).parent.joinpath("__init__.py").touch()


def launch(root: Path, minion: str, **env: str) -> subprocess.Popen[str]:
    """``python launch.py`` in ``root`` with the pipeline module path and ``minion``."""
    full = dict(os.environ, APP_DB=str(root / "minions.db"), APP_PIPELINE="shop.pipelines.orders",
                APP_MINION=minion, PYTHONPATH=str(root), **env)  # fmt: skip
    return subprocess.Popen(
        [sys.executable, "launch.py"], cwd=root, env=full, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip


def read_until(proc: subprocess.Popen[str], prefix: str) -> list[str]:
    """stdout lines up to and including the first that starts with ``prefix``."""
    assert proc.stdout is not None
    lines: list[str] = []
    while True:
        line = proc.stdout.readline()
        if not line:
            _, err = proc.communicate(timeout=10)
            raise AssertionError(f"process ended before {prefix!r}: {lines}\n{err}")
        lines.append(line.rstrip("\n"))
        if line.startswith(prefix):
            return lines


def minions_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """``python -m minions ARGS`` as a real process."""
    env = dict(os.environ, PYTHONPATH=str(_TESTS))
    return subprocess.run(
        [sys.executable, "-m", "minions", *args], cwd=cwd, env=env, text=True,
        capture_output=True, timeout=60,
    )  # fmt: skip
