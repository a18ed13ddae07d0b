"""A service module that starts a thread when imported: a zygote must refuse to fork it."""

from __future__ import annotations

import threading

from minions.workers import WorkerService, expose

_ticker = threading.Event()
threading.Thread(target=_ticker.wait, name="started-at-import", daemon=True).start()


class StartsThreadAtImport(WorkerService):
    @expose
    def ping(self, x: int) -> int:
        return x
