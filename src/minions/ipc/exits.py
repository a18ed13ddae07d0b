"""Exit codes a worker or a zygote uses to tell the pool why it ended by itself.

They live in a module of their own so that the worker and the zygote can name them without
importing the parent's death classification (``minions.pool.verdict``).
"""

from __future__ import annotations

#: A worker's service could not be imported or its ``setup()`` raised.
BOOT_FAILED_EXIT = 3
#: A worker (or zygote) noticed that the process it serves is gone.
ORPHANED_EXIT = 4
#: A zygote will not fork this service (it could not import it, or importing it started
#: threads): the pool spawns its workers with exec from then on.
ZYGOTE_REFUSED_EXIT = 5
