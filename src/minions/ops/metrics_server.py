"""The Prometheus ``/metrics`` endpoint: prometheus-client's own WSGI app on a background thread.

Design note. The exposition is always prometheus-client's (``make_wsgi_app`` over
:data:`~minions.ops.metrics.REGISTRY`); this module only owns the socket's lifecycle and one hook:
before each scrape it refreshes Gru's process and host gauges, so they are current even when no
memory monitor runs (a standalone pool, a CLI tool). The server runs on daemon threads because a
scrape must never wait for, or block, Gru's event loop.

We build the server instead of calling ``prometheus_client.start_http_server`` for two reasons:
the refresh hook needs to wrap the app, and a failure to bind must surface as one typed error
(:class:`MetricsServerError`) that Gru logs and survives, rather than a bare ``OSError``.

The default host is ``127.0.0.1``: metrics reveal workload shape, so exposing them beyond the
machine is an explicit choice (``host="0.0.0.0"`` or ``"::"`` for a remote Prometheus).
"""

from __future__ import annotations

import contextlib
import logging
import socket
import socketserver
import threading
from collections.abc import Callable, Iterable
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app

from minions.errors import MinionsError
from minions.ops.metrics import REGISTRY, WithoutCreated
from minions.ops.sampling import refresh_process_metrics

log = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8081
# serve_forever() notices close() only between polls: 0.1 s keeps Gru's shutdown quick for ten
# cheap wake-ups a second of an otherwise idle thread (the stdlib default is 0.5 s).
_POLL_S = 0.1

WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


class MetricsServerError(MinionsError):
    """The metrics endpoint could not be started (port in use, address not available).

    Gru logs it and keeps running without ``/metrics``: losing observability is better than
    losing the workflows. Pick another port, or ``metrics_port=0`` for an ephemeral one.
    """

    def __init__(self, host: str, port: int, cause: OSError) -> None:
        self.host = host
        self.port = port
        self.cause = cause
        super().__init__(
            f"cannot serve metrics on {host}:{port}: {cause.strerror or cause}; another process "
            "may hold the port (try `ss -ltnp`), or set a different metrics port (0 = any free "
            "port)"
        )


class _QuietHandler(WSGIRequestHandler):
    """wsgiref logs every request to stderr; a scrape every 15 s is not news."""

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("metrics %s - " + format, self.address_string(), *args)


class _ThreadingWSGIServer(ThreadingMixIn, WSGIServer):
    """One thread per scrape, so a slow scraper cannot stall the others."""

    daemon_threads = True

    def server_bind(self) -> None:
        # HTTPServer.server_bind resolves socket.getfqdn(host): a reverse DNS lookup that can
        # stall Gru's start-up for seconds on a host with broken DNS. The name is not needed.
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name, self.server_port = str(host), int(port)
        self.setup_environ()


class MetricsServer:
    """A running ``/metrics`` endpoint. ``port`` is the bound port (useful with port 0)."""

    def __init__(self, server: WSGIServer, thread: threading.Thread, host: str) -> None:
        self._server = server
        self._thread = thread
        self.host = host
        self.port: int = server.server_address[1]
        self._closed = False

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"

    def close(self, timeout: float = 5.0) -> None:
        """Stop serving, release the port and join the serving thread. Idempotent; blocks for
        at most one poll interval of ``serve_forever`` (0.1 s) plus ``timeout``."""
        if self._closed:
            return
        self._closed = True
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout)

    def __enter__(self) -> MetricsServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def start_metrics_server(
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    *,
    registry: CollectorRegistry = REGISTRY,
    refresh: Callable[[], None] | None = refresh_process_metrics,
) -> MetricsServer:
    """Serve ``registry`` at ``http://host:port/metrics`` (any path works, as in prometheus-client).

    ``refresh`` runs before each scrape, in the scrape's thread; one that raises is logged and
    the scrape still answers. Raises :class:`MetricsServerError` if the address cannot be bound.
    """
    if not 0 <= port <= 65535:
        raise ValueError(f"metrics port must be in 0..65535, got {port!r}")
    app = _with_refresh(make_wsgi_app(WithoutCreated(registry)), refresh)

    class _Server(_ThreadingWSGIServer):
        address_family = _address_family(host, port)

    try:
        server = make_server(host, port, app, _Server, handler_class=_QuietHandler)
    except OSError as exc:
        raise MetricsServerError(host, port, exc) from exc
    thread = threading.Thread(
        target=server.serve_forever,
        args=(_POLL_S,),
        name=f"minions-metrics-{server.server_address[1]}",
        daemon=True,
    )
    thread.start()
    # No INFO line here: the caller says where it serves, on its own logger (Gru does), so the
    # journal shows the address once.
    result = MetricsServer(server, thread, host)
    log.debug("metrics endpoint bound at %s", result.url)
    return result


def _with_refresh(app: WSGIApp, refresh: Callable[[], None] | None) -> WSGIApp:
    if refresh is None:
        return app

    def refreshing_app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        try:
            refresh()
        except Exception:
            log.exception("refreshing process metrics before a scrape failed")
        return app(environ, start_response)

    return refreshing_app


def _address_family(host: str, port: int) -> socket.AddressFamily:
    """IPv4 or IPv6, whichever ``host`` resolves to first (``"::"`` serves IPv6)."""
    with contextlib.suppress(OSError):
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        if infos:
            return infos[0][0]
    return socket.AF_INET
