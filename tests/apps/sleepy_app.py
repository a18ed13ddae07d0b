"""An app whose ``main`` does not await ``gru.wait_closed()``: it starts Gru, then sleeps.

Run as ``python sleepy_app.py MODE`` (``asyncio.run``) or ``minions run sleepy_app.py:main``.
MODE ``sleep`` only sleeps; ``broken-store`` also uses a store whose ``close()`` raises, so the
shutdown reports an error; ``waits`` awaits Gru's closing in a side task like the demo does, then
does its own work after Gru has closed and exits 3 by itself. Prints ``ready`` once Gru's signal
handlers are installed, and ``cleanup`` from ``main``'s ``finally``.
"""

from __future__ import annotations

import asyncio
import os
import sys

from minions import Gru
from minions.interfaces import StateStore, StoredWorkflowContext


class BrokenCloseStore(StateStore):
    """A stateless store whose shutdown fails: the shutdown then reports an error."""

    async def save_context(self, workflow_id: str, orchestration_id: str, context: bytes) -> None:
        return None

    async def delete_context(self, workflow_id: str) -> None:
        return None

    async def get_contexts_for_orchestration(
        self, orchestration_id: str
    ) -> list[StoredWorkflowContext]:
        return []

    async def get_all_contexts(self) -> list[StoredWorkflowContext]:
        return []

    async def shutdown(self) -> None:
        raise OSError("the disk went away")


async def main(mode: str | None = None) -> int:
    mode = mode or os.environ.get("SLEEPY_MODE", "sleep")
    store = BrokenCloseStore() if mode == "broken-store" else None
    gru = await Gru.create(state_store=store, metrics=False, log_file=os.devnull)
    closed = asyncio.ensure_future(gru.wait_closed()) if mode == "waits" else None
    print("ready", flush=True)
    try:
        if closed is not None:
            await closed
            await asyncio.sleep(0.05)  # work after Gru closed that nothing must cut short
            print("summary written", flush=True)
            return 3
        await asyncio.sleep(3600)
        return 0
    finally:
        print("cleanup", flush=True)


if __name__ == "__main__":
    sys.exit(asyncio.run(main(sys.argv[1])))
