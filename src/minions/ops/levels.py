"""Memory pressure levels shared by the monitor (which decides) and pools/Gru (which act)."""

from __future__ import annotations

import enum


class MemoryLevel(enum.IntEnum):
    """Ordered: compare with ``>=``. NORMAL runs freely, HIGH throttles, CRITICAL sheds."""

    NORMAL = 0
    HIGH = 1
    CRITICAL = 2
