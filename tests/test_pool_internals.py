"""Pure pieces of the pool: restart intensity, backoff, the circuit breaker, death verdicts,
fingerprints, throttling."""

from __future__ import annotations

import signal

import pytest

from minions.ops.levels import MemoryLevel
from minions.pool.calls import fingerprint
from minions.pool.circuit import CircuitBreaker
from minions.pool.config import PoolConfig
from minions.pool.dispatcher import Throttle
from minions.pool.intensity import Backoff, RestartDecision, RestartIntensity
from minions.pool.pressure import throttle
from minions.pool.states import Circuit
from minions.pool.verdict import DeathCause, classify


def test_intensity_gives_up_past_n_restarts_in_the_period() -> None:
    rule = RestartIntensity(max_restarts=3, period_s=10.0)
    assert [rule.record(t).value for t in (0, 1, 2)] == ["restart"] * 3
    assert rule.record(3) is RestartDecision.GIVE_UP
    fresh = RestartIntensity(max_restarts=3, period_s=10.0)
    assert all(fresh.record(t * 4.0) is RestartDecision.RESTART for t in range(20))


def test_intensity_window_slides() -> None:
    rule = RestartIntensity(max_restarts=2, period_s=5.0)
    rule.record(0)
    rule.record(1)
    assert rule.record(5.5) is RestartDecision.RESTART  # the restart at 0 left the window
    assert rule.record(5.6) is RestartDecision.GIVE_UP


def test_backoff_doubles_up_to_the_cap_and_resets() -> None:
    b = Backoff(initial_s=0.1, max_s=0.5)
    assert [b.next_delay() for _ in range(6)] == [0.0, 0.1, 0.2, 0.4, 0.5, 0.5]
    b.succeeded()
    assert b.next_delay() == 0.0


@pytest.mark.parametrize(
    ("returncode", "killed_for", "hello", "cause", "label"),
    [
        (-signal.SIGSEGV, None, True, DeathCause.SIGNAL, "SIGSEGV"),
        (-signal.SIGABRT, None, True, DeathCause.SIGNAL, "SIGABRT"),
        (-signal.SIGKILL, None, True, DeathCause.SIGNAL, "SIGKILL"),
        (-signal.SIGKILL, DeathCause.TIMEOUT, True, DeathCause.TIMEOUT, "timeout"),
        (7, None, True, DeathCause.EXIT, "exit"),
        (0, None, True, DeathCause.EXIT, "exit"),
        (3, None, False, DeathCause.BOOT_FAILED, "boot_failed"),
        (0, DeathCause.RECYCLED, True, DeathCause.RECYCLED, "recycled"),
        (-signal.SIGTERM, DeathCause.STOPPED, True, DeathCause.STOPPED, "stopped"),
    ],
)
def test_one_verdict_per_death(
    returncode: int, killed_for: DeathCause | None, hello: bool, cause: DeathCause, label: str
) -> None:
    verdict = classify(returncode, killed_for=killed_for, said_hello=hello, stack="")
    assert verdict.cause is cause and verdict.label == label
    assert verdict.cause.planned == (cause in (DeathCause.RECYCLED, DeathCause.STOPPED))
    assert verdict.describe()


def test_sigkill_from_outside_mentions_the_oom_killer() -> None:
    verdict = classify(-signal.SIGKILL, killed_for=None, said_hello=True, stack="")
    assert "OOM" in verdict.describe()


def test_fingerprint_is_method_and_exact_arguments() -> None:
    assert fingerprint("f", b"\x91\x01", b"\x80") == fingerprint("f", b"\x91\x01", b"\x80")
    assert fingerprint("f", b"\x91\x01", b"\x80") != fingerprint("g", b"\x91\x01", b"\x80")
    assert fingerprint("f", b"\x91\x01", b"\x80") != fingerprint("f", b"\x91\x02", b"\x80")


def test_circuit_breaker_opens_retries_doubles_its_delay_and_closes() -> None:
    breaker = CircuitBreaker(reset_s=1.0, reset_max_s=3.0)
    assert breaker.state is Circuit.CLOSED and not breaker.poll(100.0)
    breaker.trip(10.0)
    assert breaker.state is Circuit.OPEN and breaker.retry_after(10.5) == 0.5
    assert not breaker.poll(10.9) and breaker.poll(11.0)
    assert breaker.state is Circuit.HALF_OPEN
    breaker.trip(11.5)  # the half-open try failed: twice the delay
    assert breaker.retry_after(11.5) == 2.0
    assert breaker.poll(13.5)
    breaker.trip(13.6)
    assert breaker.reset_s == 3.0  # capped by reset_max_s
    breaker.trip(20.0)
    assert breaker.reset_s == 3.0 and breaker.opened == 4
    assert breaker.poll(23.0) and breaker.succeeded()
    assert breaker.state is Circuit.CLOSED and breaker.reset_s == 1.0
    assert not breaker.succeeded()  # closing a closed circuit is not news


def test_memory_levels_map_to_a_throttle() -> None:
    cfg = PoolConfig(service="svc:S", workers=4, pipeline_depth=8)
    assert throttle(MemoryLevel.NORMAL, cfg) == Throttle(8)
    assert throttle(MemoryLevel.HIGH, cfg) == Throttle(1, 2)
    assert throttle(MemoryLevel.CRITICAL, cfg) == Throttle(1, 1, shed=True)
