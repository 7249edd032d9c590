"""Prometheus metrics and health probes of one node, over HTTP on the node's loop (layer 7).

Nothing here runs on a hot path: every value is read at scrape time from the node
(`Node.peers`, `Node.connection_stats`, `Node.counters`) and from the ``stat()`` of the
services attached to it (registry scopes, `Names`, `Workers`). The one thing that runs
between scrapes is the event-loop lag probe: a callback scheduled every
`LAG_INTERVAL` seconds that records how late it ran.

`MetricsServer.start(node, host, port)` serves, on one port, with asyncio streams on the
node's own loop (so that ``/livez`` answering proves the loop answers):

* ``GET /metrics``: the Prometheus text format (needs the extra ``metrics``:
  ``pip install 'pgregistry[metrics]'``, which brings ``prometheus-client``);
* ``GET /livez``: 200 ``ok`` (the handler runs on the node's loop);
* ``GET /readyz``: 200 when the node runs, every registry scope has received a whole
  sync round from each connected peer that runs it, and every check given to
  `MetricsServer.add_ready_check` returns True; else 503. The body is JSON:
  ``{"ready": bool, "not_ready": [reasons]}``.

Each server has its own ``CollectorRegistry`` holding one collector for its node, so
several nodes in one process never mix series; the collector yields only current
peers, so a forgotten peer's series disappear. `render_metrics(node)` returns the same
text without HTTP. Metric names and labels: docs/operations.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import inspect
import json
import logging
import re
import threading
from collections.abc import Awaitable, Callable, Iterator
from typing import TYPE_CHECKING, Any, Final, cast

from ._table import IMPLEMENTATION as TABLE_IMPLEMENTATION
from .names import Names
from .node import Node
from .scope import ScopeServer
from .workers import Workers

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric
    from prometheus_client.registry import Collector, CollectorRegistry

__all__ = ["MetricsServer", "NodeCollector", "LagProbe", "render_metrics", "LAG_INTERVAL", "LAG_BUCKETS"]

log = logging.getLogger("pgregistry.metrics")

LAG_INTERVAL: Final = 0.5
"""Seconds between two runs of the event-loop lag probe."""

LAG_BUCKETS: Final = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
"""Upper bounds (seconds) of the buckets of ``pgregistry_event_loop_lag_seconds``."""

MAX_REQUEST_HEAD: Final = 8192
"""Most bytes of request line and headers read from a client (431 beyond)."""

REQUEST_TIMEOUT: Final = 5.0
"""Seconds a client has to send its request head, and to take the response."""

READY_CHECK_TIMEOUT: Final = 2.0
"""Seconds an awaitable readiness check may take before it counts as not ready."""

_EXTRA_HINT: Final = "pip install 'pgregistry[metrics]'"

_NOT_METRIC_CHARS = re.compile(r"[^a-zA-Z0-9_]")


def _require_prometheus() -> Any:
    """The ``prometheus_client`` module, or ImportError naming the extra to install."""
    try:
        import prometheus_client
        import prometheus_client.core
    except ImportError as exc:
        raise ImportError(f"pgregistry metrics need prometheus-client: {_EXTRA_HINT}") from exc
    return prometheus_client


def _version() -> str:
    try:
        return importlib.metadata.version("pgregistry")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _check_loop_thread(node: Node, what: str) -> None:
    loop_thread = node.loop_thread
    if loop_thread is not None and threading.get_ident() != loop_thread:
        raise RuntimeError(f"{what} must run on the node's event loop thread")


class LagProbe:
    """How late a callback scheduled every `interval` seconds runs: a cumulative histogram.

    Costs one timer callback per interval. `start` on the loop to measure, `stop` to end.
    """

    def __init__(self, interval: float = LAG_INTERVAL, buckets: tuple[float, ...] = LAG_BUCKETS) -> None:
        self.interval = interval
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)  # per bucket (not cumulative), the last is +Inf
        self.sum = 0.0
        self.count = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._handle: asyncio.TimerHandle | None = None

    def start(self) -> None:
        """Start probing the running loop."""
        if self._handle is None:
            self._loop = asyncio.get_running_loop()
            self._schedule()

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _schedule(self) -> None:
        assert self._loop is not None
        due = self._loop.time() + self.interval
        self._handle = self._loop.call_at(due, self._tick, due)

    def _tick(self, due: float) -> None:
        assert self._loop is not None
        self.observe(max(0.0, self._loop.time() - due))
        self._schedule()

    def observe(self, lag: float) -> None:
        i = 0
        for bound in self.buckets:
            if lag <= bound:
                break
            i += 1
        self.counts[i] += 1
        self.sum += lag
        self.count += 1

    def cumulative(self) -> list[tuple[str, float]]:
        """``[(le, count), ...]`` as Prometheus wants them, ending with ``"+Inf"``."""
        out: list[tuple[str, float]] = []
        total = 0
        for bound, n in zip(self.buckets, self.counts):
            total += n
            out.append((repr(float(bound)), total))
        out.append(("+Inf", total + self.counts[-1]))
        return out


_SCOPE_EVENTS: Final = {
    "rounds_sent": "round_sent", "rounds_received": "round_received", "peers_added": "peer_added",
    "peers_lost": "peer_lost", "malformed_dropped": "malformed_dropped", "left_out": "left_out",
}
_SCOPE_GAUGES: Final = ("peers", "subscribers", "rounds_sending", "rounds_receiving", "discovering",
                        "barriers", "queued_ops", "unsent", "held_back", "meta")


class NodeCollector:
    """A prometheus-client collector of one node's metrics (the ``collect`` protocol).

    `collect` must run on the node's loop thread (the HTTP handler of `MetricsServer`
    does); it reads the node and its services then, and never between scrapes.
    """

    def __init__(self, node: Node, lag: LagProbe | None = None) -> None:
        _require_prometheus()
        self.node = node
        self.lag = lag

    def collect(self) -> Iterator[Metric]:
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
            SummaryMetricFamily,
        )

        node = self.node
        _check_loop_thread(node, "collecting metrics")
        loop = node.runtime.loop
        loop_class = type(loop) if loop is not None else type(asyncio.get_running_loop())
        info = GaugeMetricFamily("pgregistry_build_info", "pgregistry version, table core and event loop class",
                                 labels=["version", "core", "loop"])
        info.add_metric([_version(), TABLE_IMPLEMENTATION, f"{loop_class.__module__}.{loop_class.__qualname__}"], 1)
        yield info
        yield GaugeMetricFamily("pgregistry_node_running", "1 while the node runs", value=int(node.running))

        peers = node.peers()
        yield GaugeMetricFamily("pgregistry_peers", "Connected peer nodes", value=len(peers))
        per_peer = {
            key: CounterMetricFamily(f"pgregistry_peer_{key}", doc, labels=["peer"])
            for key, doc in (
                ("bytes_sent", "Bytes written to the peer's connection (ticks and handshake included)"),
                ("bytes_received", "Bytes read from the peer's connection (ticks and handshake included)"),
                ("messages_sent", "Messages queued to the peer"),
                ("messages_received", "Messages received from the peer"),
            )
        }
        for peer in peers:
            stats = node.connection_stats(peer)
            if stats is None:
                continue
            for key, family in per_peer.items():
                family.add_metric([peer], stats[key])
        yield from per_peer.values()

        counters = node.counters
        for key, name, doc in (
            ("node_down", "pgregistry_node_down", "Peers lost, by NodeDown reason (without its detail)"),
            ("handshake_failures", "pgregistry_handshake_failures", "Failed transport handshakes, by reason"),
            ("frames_rejected", "pgregistry_frames_rejected", "Frames from peers rejected, by reason"),
        ):
            family = CounterMetricFamily(name, doc, labels=["reason"])
            for reason, n in sorted(counters[key].items()):
                family.add_metric([reason], n)
            yield family

        if self.lag is not None:
            lag = HistogramMetricFamily("pgregistry_event_loop_lag_seconds",
                                        "How late a callback scheduled every 0.5 s ran")
            lag.add_metric([], self.lag.cumulative(), self.lag.sum)
            yield lag

        services = [(name, node.service(name)) for name in node.service_names()]
        yield from self._scopes([(name, s) for name, s in services if isinstance(s, ScopeServer)],
                                GaugeMetricFamily, CounterMetricFamily, SummaryMetricFamily)
        for prefix, kind in (("names", Names), ("workers", Workers)):
            yield from self._service_stats(prefix, [(name, s) for name, s in services if isinstance(s, kind)],
                                           GaugeMetricFamily, CounterMetricFamily)

    def _scopes(self, scopes: list[tuple[str, Any]], gauge: Any, counter: Any, summary: Any) -> Iterator[Metric]:
        entries = gauge("pgregistry_scope_entries", "Registry entries held on this node, by origin",
                        labels=["scope", "origin"])
        events = counter("pgregistry_scope_events", "Rare scope events, by kind", labels=["scope", "kind"])
        rounds = summary("pgregistry_sync_round_duration_seconds",
                         "Complete sync rounds (first part to last) and their seconds", labels=["scope", "direction"])
        gauges = {key: gauge(f"pgregistry_scope_{key}", f"ScopeServer.stat()[{key!r}]", labels=["scope"])
                  for key in _SCOPE_GAUGES}
        is_local = self.node.runtime.is_local
        for name, scope in scopes:
            table = scope.table
            local = sum(table.count_pid(pid) for pid in table.owners() if is_local(pid))
            entries.add_metric([name, "local"], local)
            entries.add_metric([name, "remote"], len(table) - local)
            stat = scope.stat()
            for key, kind in _SCOPE_EVENTS.items():
                events.add_metric([name, kind], stat[key])
            rounds.add_metric([name, "send"], stat["rounds_sent"], stat["rounds_sent_seconds"])
            rounds.add_metric([name, "receive"], stat["rounds_received"], stat["rounds_received_seconds"])
            for key, family in gauges.items():
                family.add_metric([name], stat[key])
        yield entries
        yield events
        yield rounds
        yield from gauges.values()

    def _service_stats(self, prefix: str, services: list[tuple[str, Any]], gauge: Any,
                       counter: Any) -> Iterator[Metric]:
        """Each numeric ``stat()`` value as ``pgregistry_{prefix}_{key}{service}``: a counter
        (``_total``) for the service's ``counters``, a gauge otherwise (a list: its length)."""
        families: dict[str, Any] = {}
        for name, service in services:
            counter_keys = set(getattr(service, "counters", ()))
            for key, value in service.stat().items():
                if isinstance(value, (list, tuple, set, frozenset)):
                    value = len(value)
                elif isinstance(value, bool):
                    value = int(value)
                elif not isinstance(value, (int, float)):
                    continue
                metric = f"pgregistry_{prefix}_{_NOT_METRIC_CHARS.sub('_', key)}"
                family = families.get(metric)
                if family is None:
                    make = counter if key in counter_keys else gauge
                    family = families[metric] = make(metric, f"{type(service).__name__}.stat()[{key!r}]",
                                                     labels=["service"])
                family.add_metric([name], value)
        yield from families.values()


def render_metrics(node: Node, lag: LagProbe | None = None) -> str:
    """The Prometheus text format of `node`'s metrics now (on the node's loop thread).

    Without a `lag` probe, ``pgregistry_event_loop_lag_seconds`` is left out.
    ImportError naming the extra without prometheus-client.
    """
    prometheus = _require_prometheus()
    registry = prometheus.CollectorRegistry(auto_describe=False)
    registry.register(NodeCollector(node, lag))
    return cast(bytes, prometheus.generate_latest(registry)).decode()


ReadyCheck = Callable[[], "bool | Awaitable[bool]"]

_REASONS: Final = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
                   408: "Request Timeout", 431: "Request Header Fields Too Large",
                   500: "Internal Server Error", 503: "Service Unavailable"}


class MetricsServer:
    """``/metrics``, ``/livez`` and ``/readyz`` of one node, served on the node's loop.

    ``server = await MetricsServer.start(node, host="127.0.0.1", port=0)`` on the
    node's loop thread, once the node runs; ``server.port`` is the bound port;
    ``await server.stop()`` before or after the node stops. Requests: HTTP/1.1 or 1.0
    ``GET`` (or ``HEAD``), one per connection, a head of at most `MAX_REQUEST_HEAD`
    bytes received within `REQUEST_TIMEOUT` seconds; the connection closes after the
    response. 404 for other paths, 405 for other methods, 400 for what is not HTTP.
    """

    def __init__(self, node: Node, registry: CollectorRegistry, lag: LagProbe) -> None:
        self.node = node
        self.registry = registry
        self.lag = lag
        self._server: asyncio.Server | None = None
        self._clients: set[asyncio.Task[Any]] = set()
        self._ready_checks: list[tuple[str, ReadyCheck]] = []
        self.port = 0

    @classmethod
    async def start(cls, node: Node, host: str = "127.0.0.1", port: int = 0, *,
                    lag_interval: float = LAG_INTERVAL) -> MetricsServer:
        """Listen on `host`:`port` (0: an ephemeral port) and start the lag probe.

        ImportError naming the extra ``metrics`` without prometheus-client;
        RuntimeError off the node's loop thread or when the node is not running;
        OSError when the port cannot be bound.
        """
        prometheus = _require_prometheus()
        node.require_loop_thread("MetricsServer.start")
        lag = LagProbe(lag_interval)
        registry = prometheus.CollectorRegistry(auto_describe=False)
        registry.register(cast("Collector", NodeCollector(node, lag)))
        self = cls(node, registry, lag)
        self._server = await asyncio.start_server(self._serve, host, port, limit=MAX_REQUEST_HEAD)
        self.port = self._server.sockets[0].getsockname()[1]
        lag.start()
        return self

    def add_ready_check(self, check: ReadyCheck, name: str | None = None) -> None:
        """Make ``/readyz`` also require ``check()`` (called on the loop at each probe) to
        return True (or an awaitable of True, within `READY_CHECK_TIMEOUT`); an exception
        counts as not ready. `name` (default: the callable's name) appears in the 503 body."""
        if not callable(check):
            raise TypeError(f"add_ready_check: {check!r} is not callable")
        label = name if name is not None else str(getattr(check, "__qualname__", None) or repr(check))
        self._ready_checks.append((label, check))

    async def readiness(self) -> list[str]:
        """What is not ready (empty: ready). See the module docstring."""
        node = self.node
        if not node.running:
            return ["node: not running"]
        problems = []
        peers = node.peers()
        for name in node.service_names():
            scope = node.service(name)
            if isinstance(scope, ScopeServer):
                unsynced = scope.unsynced(peers)
                if unsynced:
                    problems.append(f"scope {name}: first sync pending with {', '.join(sorted(unsynced))}")
        for name, check in list(self._ready_checks):
            try:
                result = check()
                if inspect.isawaitable(result):
                    result = await asyncio.wait_for(result, READY_CHECK_TIMEOUT)
            except Exception as exc:
                problems.append(f"check {name}: raised {type(exc).__name__}: {exc}")
                continue
            if result is not True:
                problems.append(f"check {name}: not ready")
        return problems

    def render(self) -> bytes:
        """This server's ``/metrics`` body (with the lag histogram)."""
        prometheus = _require_prometheus()
        return cast(bytes, prometheus.generate_latest(self.registry))

    async def stop(self) -> None:
        """Stop listening, drop the connections being served and the lag probe. Idempotent."""
        self.lag.stop()
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        for task in list(self._clients):
            task.cancel()
        if self._clients:
            await asyncio.wait(list(self._clients), timeout=REQUEST_TIMEOUT)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(server.wait_closed(), REQUEST_TIMEOUT)

    # -- HTTP ---------------------------------------------------------------------------

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._clients.add(task)
        try:
            response = await self._respond(reader)
            if response is not None:
                writer.write(response)
                await asyncio.wait_for(writer.drain(), REQUEST_TIMEOUT)
        except (ConnectionError, TimeoutError):
            pass  # the client went away or does not read: nothing to tell it
        except Exception:
            log.exception("metrics server of %s: serving a request failed", self.node.id)
        finally:
            if task is not None:
                self._clients.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.wait_closed(), 1.0)

    async def _respond(self, reader: asyncio.StreamReader) -> bytes | None:
        """The response to the request `reader` brings (None: the client left without one)."""
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), REQUEST_TIMEOUT)
        except asyncio.IncompleteReadError as exc:
            if not exc.partial.strip():
                return None
            return _response(400, "text/plain", b"incomplete request\n")
        except asyncio.LimitOverrunError:
            return _response(431, "text/plain", b"request head too large\n")
        except TimeoutError:
            return _response(408, "text/plain", b"request not received in time\n")
        line = head.split(b"\r\n", 1)[0]
        parts = line.split(b" ")
        if len(parts) != 3 or not parts[2].startswith(b"HTTP/1.") or not parts[1].startswith(b"/"):
            return _response(400, "text/plain", b"bad request line\n")
        method, target = parts[0], parts[1].split(b"?", 1)[0]
        routes: dict[bytes, Callable[[], Awaitable[tuple[int, str, bytes]]]] = {
            b"/metrics": self._metrics, b"/livez": self._livez, b"/readyz": self._readyz,
        }
        route = routes.get(target)
        if route is None:
            return _response(404, "text/plain", b"not found: try /metrics, /livez or /readyz\n")
        if method not in (b"GET", b"HEAD"):
            return _response(405, "text/plain", b"method not allowed\n", [("Allow", "GET, HEAD")])
        status, content_type, body = await route()
        return _response(status, content_type, body, head_only=method == b"HEAD")

    async def _metrics(self) -> tuple[int, str, bytes]:
        prometheus = _require_prometheus()
        return 200, prometheus.CONTENT_TYPE_PLAIN_0_0_4, self.render()

    async def _livez(self) -> tuple[int, str, bytes]:
        return 200, "text/plain; charset=utf-8", b"ok\n"

    async def _readyz(self) -> tuple[int, str, bytes]:
        problems = await self.readiness()
        body = json.dumps({"ready": not problems, "not_ready": problems}).encode() + b"\n"
        return (503 if problems else 200), "application/json", body


def _response(status: int, content_type: str, body: bytes, headers: list[tuple[str, str]] | None = None,
              head_only: bool = False) -> bytes:
    lines = [f"HTTP/1.1 {status} {_REASONS[status]}", f"Content-Type: {content_type}",
             f"Content-Length: {len(body)}", "Connection: close", "Cache-Control: no-store"]
    lines += [f"{name}: {value}" for name, value in headers or ()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (b"" if head_only else body)
