"""`pgregistry.metrics`: /metrics, /livez and /readyz of real nodes, scraped over real HTTP."""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import sys
from collections.abc import AsyncIterator
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

import pgregistry
from pgregistry.errors import AuthenticationError
from pgregistry.metrics import MetricsServer, render_metrics
from pgregistry.names import Names
from pgregistry.node import Node
from pgregistry.registry import Registry
from pgregistry.testing import LinkProxy
from pgregistry.workers import Workers

from .helpers import eventually, registry_cluster, run_as, spawn_agent
from .workers_fns import counter

COOKIE = "metrics-tests"
FAST = {"tick_interval": 0.1, "down_after": 0.5}

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


async def http(port: int, request: bytes, *, read: bool = True) -> tuple[int, dict[str, str], bytes]:
    """Send raw `request` bytes; return (status, headers, body) of the response."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        await writer.drain()
        raw = await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    assert int(headers["content-length"]) == len(body) or request.startswith(b"HEAD")
    return status, headers, body


async def get(port: int, path: str) -> tuple[int, bytes]:
    status, _headers, body = await http(port, f"GET {path} HTTP/1.1\r\nHost: test\r\n\r\n".encode())
    return status, body


def parse(text: str) -> Samples:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


async def scrape(server: MetricsServer) -> Samples:
    status, body = await get(server.port, "/metrics")
    assert status == 200
    return parse(body.decode())


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))


def peers_in(samples: Samples) -> set[str]:
    return {dict(labels)["peer"] for name, labels in samples if name.startswith("pgregistry_peer_")}


@contextlib.asynccontextmanager
async def served_cluster(count: int) -> AsyncIterator[tuple[list[tuple[Node, Registry]], list[MetricsServer]]]:
    """`registry_cluster` with a metrics server on each node."""
    async with registry_cluster(count, COOKIE, **FAST) as members:
        servers = [await MetricsServer.start(node, lag_interval=0.02) for node, _reg in members]
        try:
            yield members, servers
        finally:
            for server in servers:
                await server.stop()


async def test_metrics_follow_the_cluster() -> None:
    async with served_cluster(3) as (members, servers):
        (n0, r0), (n1, r1), (n2, r2) = members
        server = servers[0]
        for node in (n0, n1, n2):
            await Names.start(node, "names")
            await Workers.start(node, "w", functions=(counter,))
        a0, a1, a2 = spawn_agent(n0), spawn_agent(n1), spawn_agent(n2)
        await run_as(a0, lambda: (r0.register("x", 1), r0.register("y", 2)))
        await run_as(a1, lambda: r1.register("x", 3))
        await run_as(a2, lambda: (r2.register("x", 4), r2.register("z", 5)))
        for reg in (r0, r1, r2):
            await run_as(spawn_agent(reg.node), lambda reg=reg: reg.sync())

        samples = await scrape(server)
        assert value(samples, "pgregistry_build_info", version=pgregistry.__version__,
                     core=pgregistry.TABLE_IMPLEMENTATION, loop=_loop_class()) == 1
        assert value(samples, "pgregistry_peers") == 2
        assert value(samples, "pgregistry_scope_entries", scope="r", origin="local") == 2
        assert value(samples, "pgregistry_scope_entries", scope="r", origin="remote") == 3
        assert peers_in(samples) == {n1.id, n2.id}
        sent = value(samples, "pgregistry_peer_bytes_sent_total", peer=n1.id)
        received = value(samples, "pgregistry_peer_bytes_received_total", peer=n1.id)
        assert sent and received and value(samples, "pgregistry_peer_messages_sent_total", peer=n1.id)
        assert value(samples, "pgregistry_scope_events_total", scope="r", kind="round_received") >= 2
        assert value(samples, "pgregistry_sync_round_duration_seconds_count", scope="r", direction="receive") >= 2
        assert value(samples, "pgregistry_scope_peers", scope="r") == 2
        assert value(samples, "pgregistry_names_registers_total", service="names") == 0
        assert value(samples, "pgregistry_names_members", service="names") == 1
        assert value(samples, "pgregistry_workers_started_total", service="w") == 0
        assert value(samples, "pgregistry_node_down_total", reason="disconnect") is None

        # more traffic: the counters grow
        await run_as(a1, lambda: [r1.register(("k", i), "v" * 100) for i in range(50)])
        await run_as(a1, lambda: r1.sync())
        samples = await scrape(server)
        assert value(samples, "pgregistry_scope_entries", scope="r", origin="remote") == 53
        assert value(samples, "pgregistry_peer_bytes_received_total", peer=n1.id) > received + 5000
        assert value(samples, "pgregistry_peer_bytes_sent_total", peer=n1.id) >= sent

        # the event-loop lag probe runs every 0.02 s here
        async def lag_observed() -> bool:
            return (value(await scrape(server), "pgregistry_event_loop_lag_seconds_count") or 0) >= 3
        await eventually(lag_observed, what="lag observations")

        # a disconnected peer's series disappear; its down reason is counted
        await n0.disconnect(n2.id)
        samples = await scrape(server)
        assert peers_in(samples) == {n1.id}
        assert value(samples, "pgregistry_peers") == 1
        assert value(samples, "pgregistry_node_down_total", reason="disconnect") == 1
        assert value(samples, "pgregistry_scope_entries", scope="r", origin="remote") == 51
        assert value(samples, "pgregistry_scope_events_total", scope="r", kind="peer_lost") == 1
        # n1 still sees n2: another node's server, other series
        other = await scrape(servers[1])
        assert peers_in(other) == {n0.id, n2.id}


async def test_several_nodes_do_not_mix_series() -> None:
    async with served_cluster(2) as (members, servers):
        (n0, r0), (n1, r1) = members
        agent = spawn_agent(n1)
        await run_as(agent, lambda: (r1.register("a", 1), r1.register("b", 1)))
        await run_as(agent, lambda: r1.sync())
        s0, s1 = await scrape(servers[0]), await scrape(servers[1])
        assert peers_in(s0) == {n1.id} and peers_in(s1) == {n0.id}
        assert value(s0, "pgregistry_scope_entries", scope="r", origin="local") == 0
        assert value(s1, "pgregistry_scope_entries", scope="r", origin="local") == 2
        assert value(s0, "pgregistry_scope_entries", scope="r", origin="remote") == 2
        # the HTTP-less rendering of a node says the same, without the lag probe
        text = parse(render_metrics(n1))
        assert value(text, "pgregistry_scope_entries", scope="r", origin="local") == 2
        assert ("pgregistry_event_loop_lag_seconds_count", ()) not in text


async def test_handshake_failures_are_counted() -> None:
    async with Node("a", cookie=COOKIE, **FAST) as a:
        server = await MetricsServer.start(a)
        try:
            async with Node("intruder", cookie="wrong", **FAST) as intruder:
                with pytest.raises(AuthenticationError):
                    await intruder.connect(a.id)

            async def counted() -> bool:
                return value(await scrape(server), "pgregistry_handshake_failures_total", reason="cookie") == 1
            await eventually(counted, what="the failed handshake counted")
        finally:
            await server.stop()


async def test_livez_and_readyz() -> None:
    async with contextlib.AsyncExitStack() as stack:
        a = await stack.enter_async_context(Node("a", cookie=COOKIE))
        b = await stack.enter_async_context(Node("b", cookie=COOKIE))
        server = await MetricsServer.start(a)
        stack.push_async_callback(server.stop)
        assert await get(server.port, "/livez") == (200, b"ok\n")
        assert (await get(server.port, "/readyz"))[0] == 200

        # every message between a and b takes 1 s: the scopes' first sync is slow
        proxy = await stack.enter_async_context(LinkProxy(f"{b.host}:{b.port}"))
        a.add_route(b.id, proxy.address)
        await a.connect(proxy.address)
        proxy.delay(1.0)
        await Registry.start(a, "r")
        await Registry.start(b, "r")
        status, body = await get(server.port, "/readyz")
        assert status == 503, body
        report = json.loads(body)
        assert report["ready"] is False
        assert any("scope r" in reason and b.id in reason for reason in report["not_ready"]), report
        proxy.restore()

        async def ready() -> bool:
            return (await get(server.port, "/readyz"))[0] == 200
        await eventually(ready, timeout=15, what="ready once the scopes synced")

        # readiness hooks: sync or async, an exception is "not ready"
        settled = False
        server.add_ready_check(lambda: settled, name="discovery-settled")

        async def async_check() -> bool:
            return True
        server.add_ready_check(async_check)
        status, body = await get(server.port, "/readyz")
        assert status == 503 and "discovery-settled" in json.loads(body)["not_ready"][0]
        settled = True
        assert (await get(server.port, "/readyz"))[0] == 200

        def broken() -> bool:
            raise ValueError("no idea")
        server.add_ready_check(broken, name="broken")
        status, body = await get(server.port, "/readyz")
        assert status == 503 and "ValueError: no idea" in json.loads(body)["not_ready"][0]
        assert await get(server.port, "/livez") == (200, b"ok\n")


async def test_malformed_requests_do_not_break_the_server() -> None:
    async with Node("a", cookie=COOKIE) as a:
        server = await MetricsServer.start(a)
        try:
            port = server.port
            assert (await http(port, b"POST /metrics HTTP/1.1\r\n\r\n"))[0] == 405
            assert (await http(port, b"GET /nope HTTP/1.1\r\n\r\n"))[0] == 404
            assert (await http(port, b"GET /metricsX HTTP/1.1\r\n\r\n"))[0] == 404
            assert (await http(port, b"hello there\r\n\r\n"))[0] == 400
            assert (await http(port, b"GET /livez SPDY/3\r\n\r\n"))[0] == 400
            assert (await http(port, b"\x00\xff\xfe garbage \r\n\r\n"))[0] == 400
            assert (await http(port, b"GET /livez HTTP/1.1\r\nX: " + b"a" * 20000 + b"\r\n\r\n"))[0] == 431
            status, headers, body = await http(port, b"HEAD /livez HTTP/1.1\r\n\r\n")
            assert status == 200 and body == b"" and headers["content-length"] == "3"
            assert (await http(port, b"GET /metrics?x=1 HTTP/1.1\r\n\r\n"))[0] == 200
            # clients that connect and leave, or send half a request and leave
            for junk in (b"", b"GET /liv"):
                _reader, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.write(junk)
                writer.close()
            # a client that sends nothing does not hold up the others
            _idle_reader, idle_writer = await asyncio.open_connection("127.0.0.1", port)
            try:
                results = await asyncio.gather(*(get(port, "/livez") for _ in range(20)))
                assert set(results) == {(200, b"ok\n")}
            finally:
                idle_writer.close()
        finally:
            await server.stop()
        await server.stop()  # idempotent
        with pytest.raises(OSError):
            await asyncio.open_connection("127.0.0.1", port)


async def http_eof(port: int, request: bytes) -> int:
    """Status of the answer to `request` followed by a half-close."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request)
    writer.write_eof()
    raw = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    return int(raw.split(b" ")[1])


async def test_incomplete_request_then_eof_is_a_400() -> None:
    async with Node("a", cookie=COOKIE) as a:
        server = await MetricsServer.start(a)
        try:
            assert await http_eof(server.port, b"GET /livez HTTP/1.1\r\n") == 400
            assert await get(server.port, "/livez") == (200, b"ok\n")
        finally:
            await server.stop()


async def test_request_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    import pgregistry.metrics as metrics
    monkeypatch.setattr(metrics, "REQUEST_TIMEOUT", 0.2)
    async with Node("a", cookie=COOKIE) as a:
        server = await MetricsServer.start(a)
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            writer.write(b"GET /livez HTTP/1.1\r\n")  # and never the end of the head
            raw = await asyncio.wait_for(reader.read(), 5)
            assert raw.startswith(b"HTTP/1.1 408 ")
            writer.close()
        finally:
            await server.stop()


async def test_without_prometheus_client(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "prometheus_client", None)
    async with Node("a", cookie=COOKIE) as a:
        with pytest.raises(ImportError, match=r"pip install 'pgregistry\[metrics\]'"):
            await MetricsServer.start(a)
        with pytest.raises(ImportError, match=r"pgregistry\[metrics\]"):
            render_metrics(a)


def test_pgregistry_imports_without_prometheus_client() -> None:
    code = ("import sys; sys.modules['prometheus_client'] = None\n"
            "import pgregistry, pgregistry.metrics\n"
            "print(pgregistry.Node.__name__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "Node"


def _loop_class() -> str:
    cls: Any = type(asyncio.get_running_loop())
    return f"{cls.__module__}.{cls.__qualname__}"


def test_under_uvloop() -> None:
    uvloop = pytest.importorskip("uvloop")

    async def run() -> None:
        async with Node("a", cookie=COOKIE) as a:
            server = await MetricsServer.start(a, lag_interval=0.01)
            try:
                assert await get(server.port, "/livez") == (200, b"ok\n")
                samples = await scrape(server)
                assert value(samples, "pgregistry_build_info", version=pgregistry.__version__,
                             core=pgregistry.TABLE_IMPLEMENTATION, loop="uvloop.Loop") == 1

                async def lag_observed() -> bool:
                    return (value(await scrape(server), "pgregistry_event_loop_lag_seconds_count") or 0) >= 2
                await eventually(lag_observed, what="lag observations on uvloop")
            finally:
                await server.stop()

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(run())
