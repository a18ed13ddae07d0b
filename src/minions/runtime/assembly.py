"""What ``Gru.create``'s ``state_store``, ``logger`` and ``metrics`` arguments become.

Each takes the established three forms: omitted (the shipped default), ``None`` (off) or an
instance of the matching :mod:`minions.interfaces` class. Two conveniences are kept from earlier
versions of this runtime: a :class:`logging.Logger` as ``logger``, and ``metrics=True/False``.
Nothing here starts anything; ``Gru.create`` opens the store and starts the rest.
"""

from __future__ import annotations

import logging

from minions.runtime.config import DEFAULT, GruConfig
from minions.runtime.log import FileLogger, Logger, LoggingLogger, NoOpLogger
from minions.runtime.state import SQLiteStateStore
from minions.runtime.store_contract import StateStore
from minions.runtime.telemetry import Metrics, PrometheusMetrics


def make_store(config: GruConfig) -> StateStore | None:
    """Omitted: SQLite at ``db_path``; ``None``: stateless."""
    if config.state_store is DEFAULT:
        return SQLiteStateStore(config.db_path)
    store: StateStore | None = config.state_store
    return store


def make_logger(config: GruConfig) -> Logger:
    """Omitted: the rotating ``log_file``; ``None``: discard; a stdlib logger is adapted."""
    logger = config.logger
    if logger is DEFAULT:
        return FileLogger(config.log_file)
    if logger is None:
        return NoOpLogger()
    if isinstance(logger, logging.Logger):
        return LoggingLogger(logger)
    assert isinstance(logger, Logger)  # GruConfig checked it
    return logger


def make_metrics(config: GruConfig) -> Metrics:
    """Omitted or ``True``: Prometheus served at ``metrics_host:metrics_port``; ``None`` or
    ``False``: Prometheus without an endpoint (series still kept, nothing served)."""
    metrics = config.metrics
    if isinstance(metrics, Metrics):
        return metrics
    serve = metrics is DEFAULT or metrics is True
    return PrometheusMetrics(port=config.metrics_port, addr=config.metrics_host, serve=serve)
