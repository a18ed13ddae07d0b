"""Worker services used only by tests, for failures the demo extension does not model."""

from __future__ import annotations

from minions.workers import WorkerService, expose


class BrokenSetup(WorkerService):
    """A service whose native library cannot be opened."""

    def setup(self) -> None:
        raise RuntimeError("cannot open the device")

    @expose
    def ping(self, x: int) -> int:
        return x
