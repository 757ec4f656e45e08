"""Prometheus metrics for pigeon (extra ``metrics``: ``prometheus_client``).

:class:`PrometheusMetrics` is a middleware that counts what a connection
sends, handles, requests and publishes; the queue gauges are read from a
hosting node's ``stats()`` when Prometheus scrapes. :func:`serve_metrics`
serves them over HTTP::

    metrics = pigeon.metrics.PrometheusMetrics()
    async with pigeon.connect(url, middleware=[metrics]) as conn:
        server = pigeon.metrics.serve_metrics(9464)

Several processes, one endpoint (``pigeon run --workers N``): the supervisor
calls :func:`prepare_multiprocess` before it starts the workers (it sets
``PROMETHEUS_MULTIPROC_DIR``, which the workers inherit), serves
``serve_metrics(port, multiprocess_dir=...)``, and calls
:func:`process_exited` with a worker's pid when it ends. Each worker
registers a ``PrometheusMetrics`` as usual.

Labels are bounded: at most ``max_names`` distinct queue, service or topic
names per metric family; later names are counted under ``_other`` (and in
``overflowed``).
"""

from __future__ import annotations

import asyncio
import os
import threading
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ._extras import install_hint
from .message import Message
from .middleware import Middleware, Outcome, RequestOutcome
from .transports import Delivery

try:
    import prometheus_client
    from prometheus_client import multiprocess
    from prometheus_client.core import GaugeMetricFamily
    from prometheus_client.registry import Collector, CollectorRegistry
except ImportError as exc:  # pragma: no cover - depends on the install
    raise ImportError(f"pigeon.metrics needs prometheus_client: {install_hint('metrics')}") from exc

if TYPE_CHECKING:
    from .connection import Connection

__all__ = [
    "MetricsServer",
    "PrometheusMetrics",
    "prepare_multiprocess",
    "process_exited",
    "serve_metrics",
]

OTHER = "_other"
DEFAULT_MAX_NAMES = 100
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
# Handler and request durations: 0.5 ms to 60 s.
BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


def _transport_name(url: str) -> str:
    """The label of a transport: its URL scheme (``tcp``, ``nats``, ...)."""
    # A node that only binds is named "bind:tcp://…" by its transport.
    url = url.removeprefix("bind:")
    scheme = url.partition("://")[0] if "://" in url else ""
    return scheme or "zmq"


class _Names:
    """At most ``limit`` distinct names; the rest become ``_other``."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.known: set[str] = set()
        self.overflowed = 0

    def __call__(self, name: str) -> str:
        if name in self.known:
            return name
        if len(self.known) < self.limit:
            self.known.add(name)
            return name
        self.overflowed += 1
        return OTHER


class _Families:
    """The metric families of one registry, made once (a registry refuses a
    name twice, and several middleware may share one)."""

    def __init__(self, registry: CollectorRegistry | None) -> None:
        r = registry if registry is not None else prometheus_client.REGISTRY
        c, h, g = prometheus_client.Counter, prometheus_client.Histogram, prometheus_client.Gauge
        self.sent = c("pigeon_messages_sent", "Messages sent", ["transport", "queue"], registry=r)
        self.handled = c(
            "pigeon_messages_handled",
            "Deliveries handled, by outcome",
            ["transport", "queue", "outcome"],
            registry=r,
        )
        self.handler_seconds = h(
            "pigeon_handler_seconds",
            "Seconds a handler ran",
            ["transport", "queue"],
            buckets=BUCKETS,
            registry=r,
        )
        self.requests = c(
            "pigeon_requests",
            "Requests made, by outcome",
            ["transport", "service", "outcome"],
            registry=r,
        )
        self.request_seconds = h(
            "pigeon_request_seconds",
            "Seconds from request to reply (or failure)",
            ["transport", "service"],
            buckets=BUCKETS,
            registry=r,
        )
        self.served = c(
            "pigeon_requests_served",
            "Requests served, by outcome",
            ["transport", "service", "outcome"],
            registry=r,
        )
        self.retries = c(
            "pigeon_retries", "Deliveries handed back for retry", ["transport", "queue"], registry=r
        )
        self.dead_letters = c(
            "pigeon_dead_letters",
            "Deliveries dead-lettered by a worker",
            ["transport", "queue"],
            registry=r,
        )
        self.published = c(
            "pigeon_published", "Messages published", ["transport", "topic"], registry=r
        )
        # Set by each process in multiprocess mode (summed over live ones);
        # otherwise read at scrape time by _QueueCollector.
        self.queue_gauges: dict[str, Any] = {}
        if os.environ.get(MULTIPROC_ENV):
            for key, help_text in _QUEUE_GAUGES.items():
                self.queue_gauges[key] = g(
                    f"pigeon_queue_{key}",
                    help_text,
                    ["transport", "queue"],
                    registry=r,
                    multiprocess_mode="livesum",
                )
        self.collector = _QueueCollector()
        if not self.queue_gauges:
            r.register(self.collector)


_QUEUE_GAUGES = {
    "ready": "Messages ready in a queue this node hosts",
    "in_flight": "Messages leased to consumers of a queue this node hosts",
    "consumers": "Consumers of a queue this node hosts",
}

_families: dict[int, _Families] = {}
_families_lock = threading.Lock()


def _families_of(registry: CollectorRegistry | None) -> _Families:
    key = id(registry if registry is not None else prometheus_client.REGISTRY)
    with _families_lock:
        found = _families.get(key)
        if found is None:
            found = _families[key] = _Families(registry)
        return found


def _queue_rows(connection: Connection) -> Iterator[tuple[str, dict[str, Any]]]:
    """(queue, its stats) for each queue ``connection`` hosts."""
    queues = connection.transport.stats().get("queues")
    if isinstance(queues, dict):
        for name, row in list(queues.items()):
            if isinstance(name, str) and isinstance(row, dict):
                yield name, row


class _QueueCollector(Collector):
    """The queue gauges, read from the hosting connections at scrape time."""

    def __init__(self) -> None:
        self.sources: weakref.WeakKeyDictionary[Connection, tuple[str, _Names]] = (
            weakref.WeakKeyDictionary()
        )
        self.errors = 0

    def collect(self) -> Iterator[GaugeMetricFamily]:
        families = {
            key: GaugeMetricFamily(f"pigeon_queue_{key}", text, labels=["transport", "queue"])
            for key, text in _QUEUE_GAUGES.items()
        }
        for connection, (transport, names) in list(self.sources.items()):
            try:
                rows = list(_queue_rows(connection))
            except RuntimeError:
                # Read from the scrape thread while the loop changes the
                # table: this scrape goes without it, counted.
                self.errors += 1
                continue
            for queue, row in rows:
                label = names(queue)
                for key, family in families.items():
                    value = row.get(key)
                    if isinstance(value, (int, float)):
                        family.add_metric([transport, label], float(value))
        yield from families.values()


class PrometheusMetrics(Middleware):
    """Counts a connection's traffic into Prometheus metrics (see the
    module docstring and docs/observability.md for names and labels).

    Args:
        registry: where the metrics live (default: prometheus_client's).
        max_names: distinct queue, service and topic label values kept per
            family; later ones are counted under ``_other``.
        refresh: seconds between updates of the queue gauges in
            multiprocess mode (otherwise they are read at scrape time).

    Raises:
        ValueError: ``max_names`` below 1 or ``refresh`` not positive.
    """

    def __init__(
        self,
        *,
        registry: CollectorRegistry | None = None,
        max_names: int = DEFAULT_MAX_NAMES,
        refresh: float = 1.0,
    ) -> None:
        if isinstance(max_names, bool) or not isinstance(max_names, int) or max_names < 1:
            raise ValueError(f"max_names must be an int >= 1, not {max_names!r}")
        if not isinstance(refresh, (int, float)) or not refresh > 0:
            raise ValueError(f"refresh must be a positive number of seconds, not {refresh!r}")
        self.families = _families_of(registry)
        self.names = _Names(max_names)
        self.refresh = float(refresh)
        self.transport = "memory"

    @property
    def overflowed(self) -> int:
        """Label values counted under ``_other`` so far."""
        return self.names.overflowed

    def on_connect(self, connection: Connection) -> None:
        self.transport = _transport_name(connection.transport.url)
        if "queues" not in connection.transport.stats():
            return  # hosts no queue: no gauges
        if self.families.queue_gauges:
            self._refresh_gauges(weakref.ref(connection))
        else:
            self.families.collector.sources[connection] = (self.transport, self.names)

    def _refresh_gauges(self, ref: weakref.ref[Connection]) -> None:
        """Multiprocess mode: set the gauges now and again every ``refresh``
        seconds while the connection is open (files are what is scraped)."""
        connection = ref()
        if connection is None or getattr(connection, "_closed", True):
            return
        gauges = self.families.queue_gauges
        for queue, row in _queue_rows(connection):
            label = self.names(queue)
            for key, gauge in gauges.items():
                value = row.get(key)
                if isinstance(value, (int, float)):
                    gauge.labels(self.transport, label).set(value)
        asyncio.get_running_loop().call_later(self.refresh, self._refresh_gauges, ref)

    def _queue(self, delivery: Delivery) -> str:
        # A subscriber's deliveries come from a queue of its own (named
        # anew per subscription on some transports): its topic says more.
        return self.names(getattr(delivery, "topic", "") or delivery.queue)

    def after_handle(self, delivery: Delivery, outcome: Outcome, seconds: float) -> None:
        queue = self._queue(delivery)
        self.families.handled.labels(self.transport, queue, outcome.value).inc()
        self.families.handler_seconds.labels(self.transport, queue).observe(seconds)

    def on_retry(self, delivery: Delivery, delay: float, error: str) -> None:
        self.families.retries.labels(self.transport, self._queue(delivery)).inc()

    def on_dead_letter(self, delivery: Delivery, reason: str) -> None:
        self.families.dead_letters.labels(self.transport, self._queue(delivery)).inc()

    def on_send(self, queue: str, message: Message) -> None:
        self.families.sent.labels(self.transport, self.names(queue)).inc()

    def on_publish(self, topic: str, message: Message) -> None:
        self.families.published.labels(self.transport, self.names(topic)).inc()

    def after_request(
        self, service: str, message: Message, outcome: RequestOutcome, seconds: float
    ) -> None:
        label = self.names(service)
        self.families.requests.labels(self.transport, label, outcome.value).inc()
        self.families.request_seconds.labels(self.transport, label).observe(seconds)

    def after_serve(
        self, service: str, message: Message, outcome: RequestOutcome, seconds: float
    ) -> None:
        self.families.served.labels(self.transport, self.names(service), outcome.value).inc()


class MetricsServer:
    """A running metrics endpoint; ``close()`` stops it."""

    def __init__(self, server: Any, thread: threading.Thread) -> None:
        self._server = server
        self._thread = thread
        self.host: str = server.server_address[0]
        self.port: int = server.server_port

    @property
    def url(self) -> str:
        """Where Prometheus scrapes: ``http://HOST:PORT/metrics``."""
        return f"http://{self.host}:{self.port}/metrics"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5.0)

    def __enter__(self) -> MetricsServer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def serve_metrics(
    port: int,
    host: str = "127.0.0.1",
    *,
    registry: CollectorRegistry | None = None,
    multiprocess_dir: str | os.PathLike[str] | None = None,
) -> MetricsServer:
    """Serve the metrics on ``http://host:port/metrics`` from a daemon
    thread (port 0: any free port, see ``MetricsServer.port``).

    Args:
        registry: what to serve (default: prometheus_client's registry).
        multiprocess_dir: serve what every process writes there instead
            (see :func:`prepare_multiprocess`).

    Raises:
        OSError: the port cannot be bound.
        ValueError: ``port`` is not in 0..65535.
    """
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise ValueError(f"port must be an int in 0..65535, not {port!r}")
    if multiprocess_dir is not None:
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(  # type: ignore[no-untyped-call]
            registry, path=os.fspath(multiprocess_dir)
        )
    chosen = registry if registry is not None else prometheus_client.REGISTRY
    server, thread = prometheus_client.start_http_server(port, addr=host, registry=chosen)
    return MetricsServer(server, thread)


def prepare_multiprocess(directory: str | os.PathLike[str]) -> Path:
    """Make ``directory`` ready for a new run of worker processes: create
    it, remove what an earlier run left, and set ``PROMETHEUS_MULTIPROC_DIR``
    so the processes started from here write their metrics there. Call it
    before starting them."""
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    for stale in path.glob("*.db"):
        stale.unlink()
    os.environ[MULTIPROC_ENV] = str(path)
    return path


def process_exited(pid: int, directory: str | os.PathLike[str] | None = None) -> None:
    """A worker process ended: its live gauges no longer count (its
    counters still do)."""
    path = directory if directory is not None else os.environ.get(MULTIPROC_ENV)
    if path:
        multiprocess.mark_process_dead(pid, os.fspath(path))  # type: ignore[no-untyped-call]
