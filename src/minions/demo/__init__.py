"""``minions demo``: a few hundred workflows calling a real C extension that segfaults, aborts
and hangs on purpose, ending with an account of where every event went.

:func:`run_demo` is the entry point (the CLI parses options into :class:`DemoSettings`);
``app`` holds the orchestration, ``accounting`` defines "lost", ``progress`` prints.
"""

from minions.demo.app import DemoSettings
from minions.demo.runner import run_demo

__all__ = ["DemoSettings", "run_demo"]
