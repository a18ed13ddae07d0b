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


class SlowBoot(WorkerService):
    """A service whose device never answers during setup()."""

    def setup(self) -> None:
        import time

        time.sleep(3600)


class Liar(WorkerService):
    """A handler that returns something other than what it declares."""

    @expose
    def answer(self) -> int:
        return "forty-two"  # type: ignore[return-value]
