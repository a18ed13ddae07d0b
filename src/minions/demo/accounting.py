"""What the demo counts, read from the real Prometheus metrics, and what "lost" means.

Definitions (the demo's exit code depends on them):

* **emitted** - events the demo pipeline handed to Gru (its own count, not Gru's: a witness that
  does not depend on the runtime under test);
* **completed** - workflows that ran every step (``minions_workflows_total{event="succeeded"}``);
* **survived** - workflows whose injected fault ended as exactly the typed error the failure
  contract promises, which the minion then ended on purpose (``event="aborted"``);
* **failed** - every other failure (``event="failed"``): a wrong result, a healthy call that
  failed, a fault that did not end as promised;
* **unfinished** - emitted events whose workflow never ended (cancelled at shutdown, or dropped).

**lost = failed + unfinished.** The demo exits non-zero when anything is lost, or when more
workflows ended than events were emitted (double counting is as wrong as losing).
"""

from __future__ import annotations

import collections
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

from prometheus_client import CollectorRegistry

from minions.ops.metrics import REGISTRY


@dataclass(frozen=True, slots=True)
class Ledger:
    """Where every emitted event ended; see the module docstring for each term."""

    emitted: int
    completed: int
    survived: int
    failed: int

    @property
    def ended(self) -> int:
        return self.completed + self.survived + self.failed

    @property
    def unfinished(self) -> int:
        return max(0, self.emitted - self.ended)

    @property
    def lost(self) -> int:
        return self.failed + self.unfinished

    @property
    def overcounted(self) -> int:
        """Workflows that ended beyond the events emitted: a bookkeeping bug if ever non-zero."""
        return max(0, self.ended - self.emitted)

    @property
    def exit_code(self) -> int:
        return 0 if self.lost == 0 and self.overcounted == 0 else 1


@dataclass(frozen=True, slots=True)
class Counts:
    """Counter values of one orchestration and one pool at a moment (deltas via ``-``)."""

    workflows: Mapping[str, float]  # by lifecycle event: started, succeeded, aborted, failed
    crashes: Mapping[str, float]  # by reason: SIGSEGV, SIGABRT, timeout, exit, ...
    calls: Mapping[str, float]  # by outcome: ok, poison, crashed, timeout, unavailable, ...
    retries: float
    restarts: float

    def __sub__(self, base: Counts) -> Counts:
        return Counts(
            workflows=_minus(self.workflows, base.workflows),
            crashes=_minus(self.crashes, base.crashes),
            calls=_minus(self.calls, base.calls),
            retries=self.retries - base.retries,
            restarts=self.restarts - base.restarts,
        )

    def ledger(self, emitted: int) -> Ledger:
        w = self.workflows
        return Ledger(
            emitted=emitted,
            completed=int(w.get("succeeded", 0)),
            survived=int(w.get("aborted", 0)),
            failed=int(w.get("failed", 0)),
        )


def read_counts(orchestration: str, pool: str, registry: CollectorRegistry = REGISTRY) -> Counts:
    """Collect the demo's counters from ``registry`` (the one ``/metrics`` serves)."""
    workflows: collections.Counter[str] = collections.Counter()  # counts stay whole numbers
    crashes: collections.Counter[str] = collections.Counter()
    calls: collections.Counter[str] = collections.Counter()
    retries = restarts = 0.0
    for name, labels, value in _samples(registry):
        if labels.get("orchestration") == orchestration and name == "minions_workflows_total":
            workflows[labels["event"]] += int(value)
        elif labels.get("pool") != pool:
            continue
        elif name == "minions_worker_crashes_total":
            crashes[labels["reason"]] += int(value)
        elif name == "minions_worker_calls_total":
            calls[labels["outcome"]] += int(value)
        elif name == "minions_worker_call_retries_total":
            retries += value
        elif name == "minions_worker_restarts_total":
            restarts += value
    return Counts(dict(workflows), dict(crashes), dict(calls), retries, restarts)


def _samples(registry: CollectorRegistry) -> Iterator[tuple[str, dict[str, str], float]]:
    for family in registry.collect():
        for sample in family.samples:
            yield sample.name, sample.labels, sample.value


def _minus(now: Mapping[str, float], base: Mapping[str, float]) -> dict[str, float]:
    return {k: v - base.get(k, 0.0) for k, v in now.items() if v - base.get(k, 0.0)}
