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
    # Every declared family is exposed, with the minions_ prefix, next to prometheus-client's
    # own process collector; no `_created` series.
    declared = {m.name for m in metrics.REGISTRY.collect()}
    ours = {name for name in declared if not name.startswith("process_")}
    assert ours and all(name.startswith("minions_") for name in ours)
    assert "minions_memory_pressure_level" in got
    assert not [name for name in got if name.endswith("_created")]
    assert any(
        name.endswith("_created")
        for m in metrics.REGISTRY.collect()
        for name in (s.name for s in m.samples)
    ), "the filter must have had something to drop"


def test_process_figures_are_fresh_on_scrape() -> None:
    """Gru's RSS, CPU and start time from prometheus-client's process collector; host memory
    refreshed by the scrape itself, with no monitor running."""
    metrics.HOST_MEMORY_USED_BYTES.set(0)
    with start_metrics_server(port=0) as server:
        got = scrape(server.url)
    me = psutil.Process()
    rss = got["process_resident_memory_bytes"][()]
    assert abs(rss - me.memory_info().rss) < 0.2 * rss
    assert got["process_cpu_seconds_total"][()] > 0
    assert abs(got["process_start_time_seconds"][()] - me.create_time()) < 2
    assert got["minions_host_memory_used_bytes"][()] > 0


def test_name_filter_still_answers_without_created() -> None:
    metrics.WORKER_RESTARTS.labels("filter-test").inc()
    with start_metrics_server(port=0) as server:
        url = server.url + "?name[]=minions_worker_restarts_total&name[]=process_open_fds"
        got = scrape(url)
    assert set(got) == {"minions_worker_restarts_total", "process_open_fds"}


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
        assert "process_resident_memory_bytes" in scrape(again.url)
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
        assert "process_resident_memory_bytes" in scrape(server.url)
