"""The loggers, state stores and metrics backends Minions ships, as implementations of
:mod:`minions.interfaces` (the defaults Gru uses are ``FileLogger``, ``SQLiteStateStore`` and
``PrometheusMetrics``)."""

from minions.runtime.log import FileLogger, LoggingLogger, NoOpLogger
from minions.runtime.state import MemoryStateStore, NoOpStateStore, SQLiteStateStore
from minions.runtime.telemetry import NoOpMetrics, PrometheusMetrics

__all__ = [
    "FileLogger",
    "LoggingLogger",
    "MemoryStateStore",
    "NoOpLogger",
    "NoOpMetrics",
    "NoOpStateStore",
    "PrometheusMetrics",
    "SQLiteStateStore",
]
