"""The /metrics endpoint over real HTTP, parsed with prometheus-client's own parser."""

from __future__ import annotations

import socket
import urllib.request

import psutil
import pytest
from prometheus_client import CollectorRegistry, Counter
from prometheus_client.parser import text_string_to_metric_families

from minions.errors import MinionsError
from minions.ops import metrics
from minions.ops.metrics_server import MetricsServerError, start_metrics_server


def scrape(url: str) -> dict[str, dict[tuple, float]]:
    with urllib.request.urlopen(url, timeout=10) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain")
        text = resp.read().decode()
    out: dict[str, dict[tuple, float]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return out


def test_scrape_shows_a_counter_incremented_before_it() -> None:
    labels = {"pool": "scrape-test", "reason": "SIGSEGV"}
    before = metrics.REGISTRY.get_sample_value("minions_worker_crashes_total", labels) or 0.0
    metrics.WORKER_CRASHES.labels(**labels).inc()
    metrics.WORKER_CRASHES.labels(**labels).inc()
    with start_metrics_server(port=0) as server:
        assert server.port > 0 and server.host == "127.0.0.1"
        got = scrape(server.url)
    key = tuple(sorted(labels.items()))
    assert got["minions_worker_crashes_total"][key] == before + 2
    # Every declared family is exposed, with the minions_ prefix.
    declared = {m.name for m in metrics.REGISTRY.collect()}
    assert declared and all(name.startswith("minions_") for name in declared)
    assert "minions_memory_pressure_level" in got


def test_process_gauges_are_refreshed_on_scrape() -> None:
    metrics.GRU_RSS_BYTES.set(0)
    metrics.HOST_MEMORY_USED_BYTES.set(0)
    with start_metrics_server(port=0) as server:
        got = scrape(server.url)
    rss = got["minions_gru_rss_bytes"][()]
    assert abs(rss - psutil.Process().memory_info().rss) < 0.2 * rss
    assert got["minions_host_memory_used_bytes"][()] > 0
    assert got["minions_gru_cpu_seconds"][()] > 0


def test_a_failing_refresh_still_answers() -> None:
    def broken() -> None:
        raise RuntimeError("probe broke")

    registry = CollectorRegistry()
    c = Counter("minions_test_things", "things", registry=registry)
    c.inc(3)
    with start_metrics_server(port=0, registry=registry, refresh=broken) as server:
        got = scrape(server.url)
    assert got["minions_test_things_total"][()] == 3


def test_port_in_use_gives_a_typed_error() -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        with pytest.raises(MetricsServerError) as info:
            start_metrics_server(port=port)
    err = info.value
    assert isinstance(err, MinionsError)
    assert err.port == port and err.host == "127.0.0.1"
    assert f"127.0.0.1:{port}" in str(err) and "in use" in str(err)


def test_unknown_host_gives_a_typed_error() -> None:
    with pytest.raises(MetricsServerError):
        start_metrics_server(host="no-such-host.invalid", port=0)


def test_bad_port_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="port"):
        start_metrics_server(port=70000)


def test_close_releases_the_port_and_joins_the_thread() -> None:
    server = start_metrics_server(port=0)
    port, thread = server.port, server._thread
    assert thread.is_alive()
    scrape(server.url)
    server.close()
    server.close()  # idempotent
    assert not thread.is_alive()
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5)
    again = start_metrics_server(port=port)  # the same port binds again
    try:
        assert again.port == port
        assert "minions_gru_rss_bytes" in scrape(again.url)
    finally:
        again.close()


def test_ipv6_loopback_when_available() -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6 in this Python build")
    try:
        server = start_metrics_server(host="::1", port=0)
    except MetricsServerError as exc:
        pytest.skip(f"IPv6 loopback not available here: {exc}")
    with server:
        assert server.url == f"http://[::1]:{server.port}/metrics"
        assert "minions_gru_rss_bytes" in scrape(server.url)
