"""Tests of pgregistry.transport: handshake, framing, batching, liveness, hostile input, TLS.

Endpoints run in the test's event loop on 127.0.0.1 with ephemeral ports. Hostile peers
are raw asyncio streams that speak the protocol by hand, following the module docstring
(the MACs are computed here independently of the implementation). Every wait is bounded
and waits for an event set from a callback, never for a fixed time; the only deliberate
time spans are "this must NOT happen within t" checks.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import secrets
import ssl
import struct
import time
import warnings
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from pgregistry.errors import AuthenticationError
from pgregistry.logbudget import DEFAULT_BUDGET
from pgregistry.terms import MAX_DEPTH, Pid, Ref
from pgregistry.transport import (
    HANDSHAKE_MAX_FRAME,
    PROTOCOL_VERSION,
    REASON_ENDPOINT_CLOSED,
    REASON_OVERLOADED,
    REASON_PEER_CLOSED,
    REASON_TIMEOUT,
    Connection,
    Endpoint,
    HandshakeError,
    parse_address,
)
from pgregistry.wire import decode, encode
from tests.tls_certs import TestCA

COOKIE = "test-cookie"
TICK = 0.05
DOWN = 0.3
WAIT = 5.0  # upper bound of any single wait in these tests
LOGGER = "pgregistry.transport"


# --------------------------------------------------------------------------- helpers

_NOTHING = object()


class Recorder:
    """Callbacks for an endpoint that record everything and wake waiters.

    Messages that are ``("ping", n)`` are answered with ``("pong", n)``.
    """

    def __init__(self) -> None:
        self.connections: list[Connection] = []
        self.messages: list[tuple[Connection, Any]] = []
        self.closes: list[tuple[Connection, str]] = []
        self._changed = asyncio.Event()
        self.raise_on: Any = _NOTHING  # on_message raises for a term equal to this

    def on_connection(self, conn: Connection) -> None:
        self.connections.append(conn)
        self._changed.set()

    def on_message(self, conn: Connection, term: Any) -> None:
        if term == self.raise_on:
            raise RuntimeError("on_message failure requested by the test")
        self.messages.append((conn, term))
        if type(term) is tuple and len(term) == 2 and term[0] == "ping":
            conn.send(("pong", term[1]))
        self._changed.set()

    def on_close(self, conn: Connection, reason: str) -> None:
        self.closes.append((conn, reason))
        self._changed.set()

    def kwargs(self) -> dict[str, Callable[..., None]]:
        return {"on_connection": self.on_connection, "on_message": self.on_message, "on_close": self.on_close}

    async def wait_for(self, predicate: Callable[[], bool], timeout: float = WAIT) -> None:
        async with asyncio.timeout(timeout):
            while not predicate():
                self._changed.clear()
                await self._changed.wait()

    def received(self, conn: Connection | None = None) -> list[Any]:
        return [term for c, term in self.messages if conn is None or c is conn]

    def reasons(self, conn: Connection) -> list[str]:
        return [reason for c, reason in self.closes if c is conn]


class Cluster:
    """Makes started endpoints with recorders; closes them all at the end."""

    def __init__(self) -> None:
        self.endpoints: list[Endpoint] = []

    async def endpoint(self, name: str, cookie: str = COOKIE, **options: Any) -> tuple[Endpoint, Recorder]:
        rec = Recorder()
        options.setdefault("tick_interval", TICK)
        options.setdefault("down_after", DOWN)
        options.setdefault("handshake_timeout", 2.0)
        ep = Endpoint(name, cookie, **rec.kwargs(), **options)
        await ep.start()
        self.endpoints.append(ep)
        return ep, rec

    async def close(self) -> None:
        for ep in self.endpoints:
            await ep.close()


@pytest.fixture
async def cluster() -> AsyncIterator[Cluster]:
    c = Cluster()
    try:
        yield c
    finally:
        await c.close()


def addr(ep: Endpoint) -> str:
    return f"127.0.0.1:{ep.port}"


async def ping(conn: Connection, rec: Recorder, n: int) -> None:
    """Send ``("ping", n)`` on `conn` and wait for the peer's ``("pong", n)`` (rec: conn's side)."""
    conn.send(("ping", n))
    await rec.wait_for(lambda: ("pong", n) in rec.received(conn))


async def good_pair(cluster: Cluster,
                    **server_options: Any) -> tuple[Endpoint, Recorder, Endpoint, Recorder, Connection]:
    """A server endpoint S and a good client G connected to it, proven to exchange messages."""
    server, srec = await cluster.endpoint("server", **server_options)
    good, grec = await cluster.endpoint("good")
    conn = await good.connect(addr(server))
    await ping(conn, grec, 0)
    return server, srec, good, grec, conn


async def still_serving(server: Endpoint, good: Endpoint, grec: Recorder, conn: Connection, n: int) -> None:
    """The good connection is untouched and both directions still work; new peers still connect."""
    assert not conn.closed and grec.reasons(conn) == []
    await ping(conn, grec, n)
    lrec = Recorder()
    late = Endpoint("late", COOKIE, **lrec.kwargs())
    await late.start()
    try:
        c2 = await late.connect(addr(server))
        await ping(c2, lrec, n)
    finally:
        await late.close()


def mac(cookie: str, label: bytes, hello_frame: bytes, challenge_frame: bytes) -> bytes:
    return hmac.new(cookie.encode(), label + hello_frame + challenge_frame, hashlib.sha256).digest()


def framed(payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + payload


def hs(kind: str, *fields: Any, version: int = PROTOCOL_VERSION) -> bytes:
    return framed(encode(("pgregistry", version, kind, *fields)))


class RawPeer:
    """A hand-driven socket speaking (or not) the transport protocol."""

    opened: list[RawPeer] = []  # closed after each test by the `close_raw_peers` fixture

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        RawPeer.opened.append(self)

    @classmethod
    async def connect(cls, ep: Endpoint) -> RawPeer:
        reader, writer = await asyncio.open_connection("127.0.0.1", ep.port)
        return cls(reader, writer)

    def write(self, data: bytes) -> None:
        self.writer.write(data)

    async def read_frame(self) -> bytes | None:
        """The next frame's payload, or None at EOF (or a reset)."""
        try:
            async with asyncio.timeout(WAIT):
                header = await self.reader.readexactly(4)
                return await self.reader.readexactly(struct.unpack(">I", header)[0])
        except (asyncio.IncompleteReadError, ConnectionError):
            return None

    async def read_term(self) -> Any:
        payload = await self.read_frame()
        assert payload is not None, "connection closed"
        return decode(payload)

    async def wait_eof(self) -> bytes:
        """Read until the other side closes; return everything read."""
        chunks = []
        async with asyncio.timeout(WAIT):
            while True:
                try:
                    chunk = await self.reader.read(65536)
                except ConnectionError:
                    break
                if not chunk:
                    break
                chunks.append(chunk)
        return b"".join(chunks)

    async def handshake(self, cookie: str = COOKIE, node_id: str = "raw@127.0.0.1:1", creation: int = 7,
                        max_frame: int = 1 << 20) -> tuple:
        """Complete the client side of the handshake by hand; return the server's challenge."""
        hello = hs("hello", node_id, creation, max_frame, secrets.token_bytes(32))
        self.write(hello)
        challenge_payload = await self.read_frame()
        assert challenge_payload is not None
        challenge = decode(challenge_payload)
        assert challenge[:3] == ("pgregistry", PROTOCOL_VERSION, "challenge")
        self.write(hs("response", mac(cookie, b"pgregistry/1 client proof\0", hello, framed(challenge_payload))))
        accept = await self.read_term()
        assert accept[:3] == ("pgregistry", PROTOCOL_VERSION, "accept")
        expected = mac(cookie, b"pgregistry/1 server proof\0", hello, framed(challenge_payload))
        assert accept[3] == expected, "the server's proof does not match the documented MAC"
        return challenge

    def close(self) -> None:
        self.writer.transport.abort()


@pytest.fixture(autouse=True)
async def close_raw_peers() -> AsyncIterator[None]:
    yield
    peers, RawPeer.opened = RawPeer.opened, []
    for peer in peers:
        peer.close()
    await asyncio.sleep(0)  # the aborted transports release their sockets


@contextlib.asynccontextmanager
async def raw_server(handler: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Any]) -> AsyncIterator[str]:
    """A listening socket whose connections `handler` drives by hand; yields its address."""
    tasks: set[asyncio.Task] = set()

    def on_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.ensure_future(handler(reader, writer))
        tasks.add(task)

    server = await asyncio.start_server(on_client, "127.0.0.1", 0)
    try:
        yield f"127.0.0.1:{server.sockets[0].getsockname()[1]}"
    finally:
        server.close()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def warnings_about(caplog: pytest.LogCaptureFixture, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER and r.levelno >= logging.WARNING
            and text in r.getMessage()]


# --------------------------------------------------------------------------- basics

def test_parse_address() -> None:
    assert parse_address("127.0.0.1:4000") == ("127.0.0.1", 4000)
    assert parse_address("a@host.example:1") == ("host.example", 1)
    assert parse_address("[::1]:9") == ("::1", 9)
    for bad in ("nohost", ":80", "h:", "h:0", "h:65536", "h:12a", "h:+1"):
        with pytest.raises(ValueError):
            parse_address(bad)
    with pytest.raises(TypeError):
        parse_address(42)  # type: ignore[arg-type]


def test_endpoint_arguments_are_checked() -> None:
    with pytest.raises(ValueError, match="twice"):
        Endpoint("a", COOKIE, tick_interval=1.0, down_after=1.5)
    with pytest.raises(ValueError):
        Endpoint("a", "")
    with pytest.raises(TypeError):
        Endpoint("a", COOKIE, max_frame=1.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        Endpoint("a", COOKIE, max_frame=10)
    with pytest.raises(ValueError, match="max_frame"):
        Endpoint("a", COOKIE, max_frame=64 * 1024 - 1)  # below the 64 KiB floor
    assert Endpoint("a", COOKIE, max_frame=64 * 1024).max_frame == 64 * 1024
    with pytest.raises(TypeError):
        Endpoint("a", COOKIE, on_message=3)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        Endpoint("a", COOKIE, ssl="yes")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        Endpoint("a", COOKIE, creation=-1)
    with pytest.raises(ValueError, match="client_ssl"):
        Endpoint("a", COOKIE, ssl=ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER))
    with pytest.raises(ValueError, match="client-only"):
        Endpoint("a", COOKIE, ssl=ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT))


async def test_two_endpoints_exchange_terms(cluster: Cluster) -> None:
    a, arec = await cluster.endpoint("a")
    b, brec = await cluster.endpoint("b")
    assert a.node_id == f"a@127.0.0.1:{a.port}" and a.port > 0
    a.creation, b.creation = 11, 22
    conn = await a.connect(addr(b))
    assert conn.initiated and conn.established and not conn.closed
    assert (conn.peer_id, conn.peer_creation) == (b.node_id, 22)
    assert arec.connections == [conn]
    await brec.wait_for(lambda: len(brec.connections) == 1)
    back = brec.connections[0]
    assert not back.initiated and (back.peer_id, back.peer_creation) == (a.node_id, 11)
    assert a.connections == [conn] and b.connections == [back]

    terms = [None, True, 1, -2**70, 1.5, "ü", b"\x00", (1, (2, "x")), [1, {"k": [2]}], Pid("n@h:1", 3, 4),
             Ref("n@h:1", 5, 6), ()]
    for term in terms:
        conn.send(term)
    await brec.wait_for(lambda: len(brec.messages) == len(terms))
    assert brec.received() == terms
    assert all(type(x) is type(y) for x, y in zip(brec.received(), terms))
    back.send(("reply", [1, 2]))
    await arec.wait_for(lambda: arec.received() == [("reply", [1, 2])])
    assert conn.messages_sent == len(terms) and back.messages_received == len(terms)
    assert conn.messages_received == 1 and back.messages_sent == 1
    assert conn.bytes_sent > 0 and back.bytes_received > 0


async def test_messages_right_behind_the_accept(cluster: Cluster) -> None:
    """A server that sends at once on_connection: the client reports the connection first."""
    events: list[Any] = []
    welcomed = asyncio.Event()

    def on_message(conn: Connection, term: Any) -> None:
        events.append(term)
        welcomed.set()

    server = Endpoint("server", COOKIE, on_connection=lambda conn: conn.send("welcome"))
    await server.start()
    client = Endpoint("client", COOKIE, on_connection=lambda conn: events.append("connected"), on_message=on_message)
    await client.start()
    cluster.endpoints += [server, client]
    await client.connect(addr(server))
    await asyncio.wait_for(welcomed.wait(), WAIT)
    assert events == ["connected", "welcome"]


async def test_three_endpoints_all_pairs(cluster: Cluster) -> None:
    eps = [await cluster.endpoint(name) for name in ("a", "b", "c")]
    conns: dict[tuple[int, int], Connection] = {}
    for i, j in ((0, 1), (0, 2), (1, 2)):
        conns[(i, j)] = await eps[i][0].connect(addr(eps[j][0]))
    for (i, j) in list(conns):
        rec_j = eps[j][1]
        await rec_j.wait_for(lambda: any(c.peer_id == eps[i][0].node_id for c in rec_j.connections))
        conns[(j, i)] = next(c for c in rec_j.connections if c.peer_id == eps[i][0].node_id)
    for (i, j), conn in conns.items():
        for n in range(50):
            conn.send((i, j, n))
    for j, (_ep, rec) in enumerate(eps):
        await rec.wait_for(lambda: len(rec.messages) == 100)
        for i in range(3):
            if i != j:
                assert [t for t in rec.received(conns[(j, i)])] == [(i, j, n) for n in range(50)]


async def test_order_and_batching_in_one_iteration(cluster: Cluster) -> None:
    a, arec = await cluster.endpoint("a")
    b, brec = await cluster.endpoint("b")
    conn = await a.connect(addr(b))
    transport = conn._transport
    assert transport is not None
    writes: list[int] = []
    real_write = transport.write

    def counting_write(data: Any) -> None:
        writes.append(len(data))
        real_write(data)

    transport.write = counting_write  # type: ignore[method-assign]
    n = 5000
    before = conn.bytes_sent
    for i in range(n):
        conn.send(("m", i))
    # The first message goes at once; the rest wait for one write at the next iteration.
    assert len(writes) == 1 and writes[0] == conn.bytes_sent - before < 1000
    await brec.wait_for(lambda: len(brec.messages) == n)
    assert brec.received() == [("m", i) for i in range(n)]
    assert len(writes) == 2, f"{n} sends in one iteration took {len(writes)} writes"
    # Across iterations, order holds too.
    for i in range(n, n + 200):
        conn.send(("m", i))
        if i % 7 == 0:
            await asyncio.sleep(0)
    await brec.wait_for(lambda: len(brec.messages) == n + 200)
    assert brec.received() == [("m", i) for i in range(n + 200)]


async def test_answers_made_while_reading_go_in_one_write_at_the_end_of_the_read(cluster: Cluster) -> None:
    a, arec = await cluster.endpoint("a")
    b, brec = await cluster.endpoint("b")
    await a.connect(addr(b))
    await brec.wait_for(lambda: len(brec.connections) == 1)
    conn = brec.connections[0]
    transport = conn._transport
    assert transport is not None
    writes: list[bytes] = []
    real_write = transport.write

    def counting_write(data: Any) -> None:
        writes.append(data)
        real_write(data)

    transport.write = counting_write  # type: ignore[method-assign]
    n = 50
    # One read carrying n pings: the pongs leave in one write before the read callback
    # returns, whether or not a flush is already scheduled for this iteration.
    for scheduled in (False, True):
        writes.clear()
        conn._flush_scheduled = scheduled
        conn.data_received(b"".join(framed(encode(("ping", i))) for i in range(n)))
        assert len(writes) == 1 and writes[0] == b"".join(framed(encode(("pong", i))) for i in range(n))
        assert conn._flush_scheduled is scheduled
    conn._flush_scheduled = False
    await arec.wait_for(lambda: len(arec.messages) == 2 * n)
    assert arec.received() == [("pong", i) for i in range(n)] * 2


async def test_send_checks_and_closed_connection(cluster: Cluster) -> None:
    a, arec = await cluster.endpoint("a")
    b, brec = await cluster.endpoint("b", max_frame=64 * 1024)  # the smallest limit allowed
    conn = await a.connect(addr(b))
    assert conn.peer_max_frame == 64 * 1024
    with pytest.raises(TypeError):
        conn.send({1, 2})
    with pytest.raises(ValueError, match="frame limit"):
        conn.send(b"x" * 70_000)
    payload = encode(("pre", "encoded"))
    conn.send_encoded(payload)
    await brec.wait_for(lambda: brec.received() == [("pre", "encoded")])
    conn.close("done here")
    assert conn.closed and conn.close_reason == "done here"
    conn.send("dropped")  # silently dropped
    conn.send_encoded(payload)
    with pytest.raises(ConnectionError):
        await conn.drain()
    await arec.wait_for(lambda: arec.reasons(conn) == ["done here"])


async def test_close_is_graceful_and_reported_once(cluster: Cluster) -> None:
    a, arec = await cluster.endpoint("a")
    b, brec = await cluster.endpoint("b")
    conn = await a.connect(addr(b))
    for i in range(1000):
        conn.send(i)
    conn.close("bye")  # queued messages still go out
    conn.close("again")
    await brec.wait_for(lambda: len(brec.closes) == 1)
    assert brec.received() == list(range(1000))
    assert brec.closes[0][1] == REASON_PEER_CLOSED
    assert arec.closes == [(conn, "bye")]
    await conn.wait_closed()
    # endpoint.close reports every established connection once, and is idempotent.
    c2 = await a.connect(addr(b))
    await a.close()
    await a.close()
    assert arec.reasons(c2) == [REASON_ENDPOINT_CLOSED]
    await brec.wait_for(lambda: len(brec.closes) == 2)
    with pytest.raises(RuntimeError):
        await a.connect(addr(b))


async def test_on_close_is_not_reentrant_from_send(cluster: Cluster) -> None:
    """An overload detected inside send() reports on_close later, from a fresh callback."""
    a, arec = await cluster.endpoint("a", send_buffer_limit=10_000)
    b, brec = await cluster.endpoint("b")
    conn = await a.connect(addr(b))
    for _ in range(20):
        conn.send(b"x" * 1000)
    assert conn.closed and conn.close_reason == REASON_OVERLOADED
    assert arec.closes == []  # not yet: never from inside send
    await arec.wait_for(lambda: arec.reasons(conn) == [REASON_OVERLOADED])


async def test_drain_for_bulk_senders(cluster: Cluster) -> None:
    a, arec = await cluster.endpoint("a")
    b, brec = await cluster.endpoint("b")
    conn = await a.connect(addr(b))
    blob = b"y" * 10_000
    total = 2000  # 20 MB
    for i in range(total):
        conn.send((i, blob))
        if i % 100 == 99:
            await conn.drain()
    await brec.wait_for(lambda: len(brec.messages) == total, timeout=30)
    assert [t[0] for t in brec.received()] == list(range(total))


async def test_connect_to_self_and_unreachable(cluster: Cluster) -> None:
    a, _ = await cluster.endpoint("a")
    with pytest.raises(HandshakeError) as info:
        await a.connect(addr(a))
    assert info.value.kind == "self"
    closed = await cluster.endpoint("gone")
    port = closed[0].port
    await closed[0].close()
    with pytest.raises(OSError):
        await a.connect(f"127.0.0.1:{port}")


# --------------------------------------------------------------------------- authentication

async def test_wrong_cookie_refused(cluster: Cluster, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, LOGGER)
    server, srec, good, grec, conn = await good_pair(cluster)
    bad, brec = await cluster.endpoint("bad", cookie="another-cookie")
    with pytest.raises(AuthenticationError):
        await bad.connect(addr(server))
    # Nothing was established on either side, so nothing is reported as closed.
    assert brec.connections == [] and brec.closes == []
    assert [c.peer_id for c in srec.connections] == [good.node_id]
    assert srec.closes == []
    assert warnings_about(caplog, "did not prove the cookie")
    await still_serving(server, good, grec, conn, 1)


async def test_client_checks_the_server_proof(caplog: pytest.LogCaptureFixture) -> None:
    """A server that does not know the cookie cannot pass: a made-up or reflected proof fails."""
    refusals: asyncio.Queue[Any] = asyncio.Queue()

    async def impostor(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, reflect: bool) -> None:
        peer = RawPeer(reader, writer)
        hello_payload = await peer.read_frame()
        assert hello_payload is not None
        hello = decode(hello_payload)
        assert hello[:3] == ("pgregistry", PROTOCOL_VERSION, "hello")
        peer.write(hs("challenge", "impostor@127.0.0.1:9", 1, 1 << 20, secrets.token_bytes(32)))
        response = await peer.read_term()
        assert response[:3] == ("pgregistry", PROTOCOL_VERSION, "response")
        # Reflect the client's own proof back, or invent one.
        peer.write(hs("accept", response[3] if reflect else secrets.token_bytes(32)))
        refusals.put_nowait(await peer.read_term())
        await peer.wait_eof()

    ep = Endpoint("client", COOKIE, handshake_timeout=2.0)
    await ep.start()
    try:
        for reflect in (False, True):
            async with raw_server(lambda r, w: impostor(r, w, reflect)) as address:
                with pytest.raises(AuthenticationError):
                    await ep.connect(address)
                refusal = await asyncio.wait_for(refusals.get(), WAIT)
                assert refusal[2:4] == ("refuse", "auth")
        assert ep.connections == []
    finally:
        await ep.close()


async def test_protocol_version_mismatch(cluster: Cluster, caplog: pytest.LogCaptureFixture) -> None:
    server, srec, good, grec, conn = await good_pair(cluster)
    # A client speaking a later version: refused with a reason, then closed.
    peer = await RawPeer.connect(server)
    peer.write(hs("hello", "future@127.0.0.1:1", 1, 1 << 20, secrets.token_bytes(32), version=PROTOCOL_VERSION + 1))
    refusal = await peer.read_term()
    assert refusal[:4] == ("pgregistry", PROTOCOL_VERSION, "refuse", "version")
    await peer.wait_eof()
    assert warnings_about(caplog, "protocol")
    # A server speaking a later version: connect raises HandshakeError("version").
    seen: list[Any] = []

    async def future_server(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        p = RawPeer(reader, writer)
        await p.read_frame()
        p.write(hs("challenge", "future@127.0.0.1:9", 1, 1 << 20, secrets.token_bytes(32),
                   version=PROTOCOL_VERSION + 1))
        seen.append(await p.read_term())

    async with raw_server(future_server) as address:
        with pytest.raises(HandshakeError) as info:
            await good.connect(address)
        assert info.value.kind == "version"
    await still_serving(server, good, grec, conn, 1)


async def test_a_frame_limit_below_the_floor_is_refused_with_a_reason(cluster: Cluster,
                                                                    caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, LOGGER)
    server, srec, good, grec, conn = await good_pair(cluster)
    # A client announcing one byte less than 64 KiB: refused, saying why, and logged.
    peer = await RawPeer.connect(server)
    peer.write(hs("hello", "tiny@127.0.0.1:1", 1, 65535, secrets.token_bytes(32)))
    refusal = await peer.read_term()
    assert refusal[2:4] == ("refuse", "protocol")
    assert "frame limit of 65535" in refusal[4] and "65536" in refusal[4], refusal
    await peer.wait_eof()
    assert warnings_about(caplog, "frame limit of 65535")
    # Exactly the floor is accepted.
    peer = await RawPeer.connect(server)
    await peer.handshake(node_id="floor@127.0.0.1:1", max_frame=65536)
    await srec.wait_for(lambda: any(c.peer_id == "floor@127.0.0.1:1" for c in srec.connections))

    # A server announcing 4 KiB: the connecting side refuses it and connect says why.
    answers: asyncio.Queue[Any] = asyncio.Queue()

    async def tiny_server(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        p = RawPeer(reader, writer)
        await p.read_frame()
        p.write(hs("challenge", "tiny@127.0.0.1:9", 1, 4096, secrets.token_bytes(32)))
        answers.put_nowait(await p.read_term())

    async with raw_server(tiny_server) as address:
        with pytest.raises(HandshakeError, match="frame limit of 4096") as info:
            await good.connect(address)
        assert info.value.kind == "protocol"
        answer = await asyncio.wait_for(answers.get(), WAIT)
    assert answer[2:4] == ("refuse", "protocol")
    await still_serving(server, good, grec, conn, 1)


# --------------------------------------------------------------------------- hostile input

async def test_garbage_bytes_close_only_that_connection(cluster: Cluster, caplog: pytest.LogCaptureFixture) -> None:
    server, srec, good, grec, conn = await good_pair(cluster)
    for garbage in (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", b"\x00\x00\x00\x05\xc1\xc1\xc1\xc1\xc1",
                    hs("hello", "x"), framed(encode({"not": "a tuple"}))):
        peer = await RawPeer.connect(server)
        peer.write(garbage)
        await peer.wait_eof()
    assert warnings_about(caplog, "handshake")
    assert server.pending_handshakes == 0
    await still_serving(server, good, grec, conn, 1)


async def test_oversized_and_truncated_handshake_frames(cluster: Cluster) -> None:
    server, srec, good, grec, conn = await good_pair(cluster)
    peer = await RawPeer.connect(server)
    peer.write(struct.pack(">I", HANDSHAKE_MAX_FRAME + 1))  # refused on the length alone
    refusal = decode((await peer.wait_eof())[4:])
    assert refusal[2:4] == ("refuse", "protocol")
    peer = await RawPeer.connect(server)
    peer.write(hs("hello", "t@h:1", 1, 1 << 20, secrets.token_bytes(32))[:20])
    peer.writer.write_eof()
    await peer.wait_eof()
    await still_serving(server, good, grec, conn, 1)


async def test_input_that_breaks_the_stream_closes_that_connection(cluster: Cluster,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    server, srec, good, grec, conn = await good_pair(cluster, max_frame=64 * 1024)
    cases = {
        "oversized": struct.pack(">I", 64 * 1024 + 1) + b"z" * 100,
        "truncated": struct.pack(">I", 100) + b"0123456789",  # then EOF
    }
    for i, (name, data) in enumerate(cases.items()):
        peer = await RawPeer.connect(server)
        await peer.handshake(node_id=f"raw{i}@127.0.0.1:1")
        await srec.wait_for(lambda: len(srec.connections) == i + 2)
        victim = srec.connections[-1]
        peer.write(framed(encode(("fine", i))))  # a valid message first: delivered
        await srec.wait_for(lambda: ("fine", i) in srec.received(victim))
        peer.write(data)
        if name == "truncated":
            peer.writer.write_eof()
        await srec.wait_for(lambda: srec.reasons(victim) != [])
        reason = srec.reasons(victim)[0]
        assert ("truncated" in reason) if name == "truncated" else reason.startswith("malformed"), (name, reason)
        assert warnings_about(caplog, reason)
        await peer.wait_eof()
    assert server.frames_rejected == {"malformed": 1, "truncated": 1}  # counted for metrics
    await still_serving(server, good, grec, conn, 1)


async def test_a_well_framed_message_that_does_not_decode_is_dropped_alone(
        cluster: Cluster, caplog: pytest.LogCaptureFixture) -> None:
    # One message a receiver cannot read must not close the connection: the sender
    # would lose every entry it holds there, and resend the same payload on reconnect.
    server, srec, good, grec, conn = await good_pair(cluster, max_frame=64 * 1024)
    cases = {
        "undecodable": framed(b"\xc1"),
        "trailing bytes": framed(encode(1) + b"\x00"),
        "unknown ext": framed(b"\xd4\x09\x00"),
        "too deep": framed(b"\x91" * (MAX_DEPTH + 1) + b"\xc0"),
    }
    peer = await RawPeer.connect(server)
    await peer.handshake(node_id="raw@127.0.0.1:1")
    await srec.wait_for(lambda: len(srec.connections) == 2)
    victim = srec.connections[-1]
    for i, (name, data) in enumerate(cases.items()):
        peer.write(data + framed(encode(("after", name))))
        await srec.wait_for(lambda name=name: ("after", name) in srec.received(victim))
        assert victim.messages_dropped == i + 1, name
    assert srec.reasons(victim) == [] and not victim.closed
    assert len(warnings_about(caplog, "dropped a malformed message")) == len(cases)
    assert server.frames_rejected == {"undecodable": len(cases)}  # counted for metrics
    await still_serving(server, good, grec, conn, 1)


async def test_warnings_about_dropped_messages_are_rate_limited(cluster: Cluster,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    server, srec, good, grec, conn = await good_pair(cluster)
    peer = await RawPeer.connect(server)
    await peer.handshake(node_id="raw@127.0.0.1:1")
    await srec.wait_for(lambda: len(srec.connections) == 2)
    victim = srec.connections[-1]
    peer.write(framed(b"\xc1") * 2000 + framed(encode("last")))
    await srec.wait_for(lambda: "last" in srec.received(victim))
    assert victim.messages_dropped == 2000 and not victim.closed
    assert len(warnings_about(caplog, "dropped a malformed message")) <= DEFAULT_BUDGET


async def test_on_message_exception_closes_only_that_connection(cluster: Cluster,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    server, srec, good, grec, conn = await good_pair(cluster)
    other, orec = await cluster.endpoint("other")
    c2 = await other.connect(addr(server))
    srec.raise_on = "boom"
    c2.send("before")
    c2.send("boom")
    c2.send("after")  # never delivered: the connection closed at "boom"
    await orec.wait_for(lambda: orec.reasons(c2) == [REASON_PEER_CLOSED])
    victim = next(c for c in srec.connections if c.peer_id == other.node_id)
    assert srec.reasons(victim) == ["on_message raised"]
    assert srec.received(victim) == ["before"]
    assert any(r.exc_info and "on_message raised" in r.getMessage() for r in caplog.records)
    await still_serving(server, good, grec, conn, 1)


async def test_handshake_timeout_closes_silent_connection(cluster: Cluster) -> None:
    server, _ = await cluster.endpoint("server", handshake_timeout=0.2)
    peer = await RawPeer.connect(server)
    start = time.monotonic()
    assert await peer.wait_eof() == b""
    assert 0.15 <= time.monotonic() - start < 2.0
    assert server.pending_handshakes == 0


async def test_connection_flood_does_not_lock_out_a_good_peer(cluster: Cluster) -> None:
    server, srec = await cluster.endpoint("server", max_pending_handshakes=16, handshake_timeout=3.0)
    flood = [await RawPeer.connect(server) for _ in range(200)]
    try:
        # Each accepted socket is registered once the server's loop has seen it.
        good, grec = await cluster.endpoint("good")
        conn = await good.connect(addr(server))
        await ping(conn, grec, 1)
        assert server.pending_handshakes <= 16
        assert [c.peer_id for c in srec.connections] == [good.node_id]
        # The evicted flood sockets were closed by the server.
        closed = 0
        for peer in flood[:150]:
            data = await peer.wait_eof()
            assert data == b""
            closed += 1
        assert closed == 150
    finally:
        for peer in flood:
            peer.close()


# --------------------------------------------------------------------------- liveness and backpressure

async def test_ticks_keep_an_idle_connection_alive(cluster: Cluster) -> None:
    a, arec = await cluster.endpoint("a")
    b, brec = await cluster.endpoint("b")
    conn = await a.connect(addr(b))
    await brec.wait_for(lambda: len(brec.connections) == 1)
    before = (conn.bytes_received, brec.connections[0].bytes_received)
    with pytest.raises(TimeoutError):  # nothing closes within 3 x down_after of silence
        await arec.wait_for(lambda: bool(arec.closes or brec.closes), timeout=3 * DOWN)
    assert conn.established and brec.connections[0].established
    # Only ticks crossed: bytes but no messages.
    assert conn.bytes_received > before[0] and brec.connections[0].bytes_received > before[1]
    assert conn.messages_received == 0 and brec.connections[0].messages_received == 0
    await ping(conn, arec, 1)


async def test_a_blocked_loop_does_not_declare_peers_down(cluster: Cluster) -> None:
    """Our own stall (longer than down_after) is not the peers' silence."""
    a, arec = await cluster.endpoint("a")
    b, brec = await cluster.endpoint("b")
    conn = await a.connect(addr(b))
    await ping(conn, arec, 1)
    await brec.wait_for(lambda: len(brec.connections) == 1)
    # As if nothing had arrived since the last timer run (otherwise a message or tick
    # that happens to be fresh would make this test pass without the stall handling).
    conn._heard = brec.connections[0]._heard = False
    time.sleep(2 * DOWN)  # deliberately block the loop both endpoints run on
    with pytest.raises(TimeoutError):
        await arec.wait_for(lambda: bool(arec.closes or brec.closes), timeout=2 * DOWN)
    await ping(conn, arec, 2)


async def test_silent_peer_is_closed_with_timeout(cluster: Cluster) -> None:
    server, srec = await cluster.endpoint("server")
    peer = await RawPeer.connect(server)
    await peer.handshake()
    await srec.wait_for(lambda: len(srec.connections) == 1)
    victim = srec.connections[0]
    start = time.monotonic()
    peer.writer.transport.pause_reading()  # stops reading and never sends a tick
    await srec.wait_for(lambda: srec.reasons(victim) != [], timeout=WAIT)
    elapsed = time.monotonic() - start
    assert srec.reasons(victim) == [REASON_TIMEOUT]
    assert DOWN - TICK <= elapsed < DOWN + 1.0, elapsed
    peer.close()


async def test_peer_that_does_not_read_is_closed_overloaded(cluster: Cluster) -> None:
    limit = 256 * 1024
    server, srec = await cluster.endpoint("server", send_buffer_limit=limit, tick_interval=1.0, down_after=30.0)
    peer = await RawPeer.connect(server)
    await peer.handshake()
    peer.writer.transport.pause_reading()
    await srec.wait_for(lambda: len(srec.connections) == 1)
    victim = srec.connections[0]
    blob = b"o" * 4096
    sent = 0
    async with asyncio.timeout(WAIT * 2):
        while not victim.closed:
            for _ in range(64):
                victim.send(blob)
            sent += 64 * 4096
            await asyncio.sleep(0)  # let the output be flushed
            assert sent < 1 << 30, "the connection was never closed"
    assert victim.close_reason == REASON_OVERLOADED
    await srec.wait_for(lambda: srec.reasons(victim) == [REASON_OVERLOADED])
    peer.close()


# --------------------------------------------------------------------------- TLS

async def test_tls(cluster: Cluster, tmp_path: Path) -> None:
    ca = TestCA(tmp_path)
    a, arec = await cluster.endpoint("a", **ca.node("a"))
    b, brec = await cluster.endpoint("b", **ca.node("b"))
    conn = await a.connect(addr(b))
    assert conn._transport is not None and conn._transport.get_extra_info("ssl_object") is not None
    for i in range(100):
        conn.send(("tls", i))
    await brec.wait_for(lambda: len(brec.messages) == 100)
    assert brec.received() == [("tls", i) for i in range(100)]
    await ping(conn, arec, 1)
    # One context for both roles (ssl.PROTOCOL_TLS) works too.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        both = ssl.SSLContext(ssl.PROTOCOL_TLS)
    both.load_cert_chain(*ca.issue("c", ("c",)))
    both.load_verify_locations(ca.cert)
    both.verify_mode = ssl.CERT_REQUIRED
    both.check_hostname = True
    c, crec = await cluster.endpoint("c", ssl=both)
    conn2 = await c.connect(addr(b))
    await ping(conn2, crec, 2)
    # A plaintext peer, and a TLS peer that does not trust the certificate, get nowhere.
    plain, _ = await cluster.endpoint("plain")
    with pytest.raises((ConnectionError, OSError, TimeoutError)):
        await plain.connect(addr(b))
    untrusting, _ = await cluster.endpoint("untrusting", client_ssl=ssl.create_default_context())
    with pytest.raises(ssl.SSLError):
        await untrusting.connect(addr(b))
    await ping(conn, arec, 3)


async def test_with_tls_a_node_id_must_be_proven_by_the_certificate(cluster: Cluster, tmp_path: Path,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, LOGGER)
    ca = TestCA(tmp_path)
    a, arec = await cluster.endpoint("a", **ca.node("a"))
    b, brec = await cluster.endpoint("b", **ca.node("b"))
    conn = await b.connect(addr(a))  # each certificate names its node: fine
    await ping(conn, brec, 1)
    # A dialler whose certificate names b, claiming to be x: refused, saying why, by a.
    x, xrec = await cluster.endpoint("x", **ca.node("b"))
    with pytest.raises(HandshakeError, match="does not prove node id") as info:
        await x.connect(addr(a))
    assert info.value.kind == "identity" and x.node_id in str(info.value)
    assert warnings_about(caplog, f"does not prove node id {x.node_id!r}")
    # An acceptor whose certificate names a, claiming to be y: refused by the dialler.
    y, yrec = await cluster.endpoint("y", **ca.node("a"))
    with pytest.raises(HandshakeError, match="does not prove node id") as info:
        await b.connect(addr(y))
    assert info.value.kind == "identity" and y.node_id in str(info.value)
    assert xrec.connections == [] and yrec.connections == []
    assert [c.peer_id for c in arec.connections] == [b.node_id]
    # The whole id as the certificate's commonName (no DNS name at all) proves it too.
    cert, key = ca.issue("zed@10.0.0.1:4370")
    z, zrec = await cluster.endpoint("z", **dict(zip(("ssl", "client_ssl"), ca.contexts(cert, key))))
    z.node_id = "zed@10.0.0.1:4370"
    await ping(await z.connect(addr(a)), zrec, 2)
    # A server that verifies client certificates only if offered still needs one to prove an id.
    server_ctx, _ = ca.contexts(*ca.issue("opt", ("opt",)))
    server_ctx.verify_mode = ssl.CERT_OPTIONAL
    optional, _ = await cluster.endpoint("opt", ssl=server_ctx, client_ssl=ssl.create_default_context())
    anonymous_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    anonymous_ctx.load_verify_locations(ca.cert)
    anonymous, _ = await cluster.endpoint("anonymous", client_ssl=anonymous_ctx)
    with pytest.raises(HandshakeError, match="no certificate") as info:
        await anonymous.connect(addr(optional))
    assert info.value.kind == "identity"
    await ping(conn, brec, 3)


# --------------------------------------------------------------------------- uvloop

_UVLOOP_CASES = [
    test_two_endpoints_exchange_terms,
    test_three_endpoints_all_pairs,
    test_close_is_graceful_and_reported_once,
    test_on_close_is_not_reentrant_from_send,
    test_drain_for_bulk_senders,
    test_connect_to_self_and_unreachable,
    test_wrong_cookie_refused,
    test_protocol_version_mismatch,
    test_garbage_bytes_close_only_that_connection,
    test_oversized_and_truncated_handshake_frames,
    test_input_that_breaks_the_stream_closes_that_connection,
    test_a_well_framed_message_that_does_not_decode_is_dropped_alone,
    test_on_message_exception_closes_only_that_connection,
    test_connection_flood_does_not_lock_out_a_good_peer,
    test_ticks_keep_an_idle_connection_alive,
    test_a_blocked_loop_does_not_declare_peers_down,
    test_silent_peer_is_closed_with_timeout,
    test_peer_that_does_not_read_is_closed_overloaded,
    test_tls,
    test_with_tls_a_node_id_must_be_proven_by_the_certificate,
]


@pytest.mark.parametrize("case", _UVLOOP_CASES, ids=[case.__name__[5:] for case in _UVLOOP_CASES])
def test_under_uvloop(case: Callable[..., Any], caplog: pytest.LogCaptureFixture, tmp_path: Path) -> None:
    """The same scenarios on uvloop, whose transports are different code (the node uses it when installed)."""
    uvloop = pytest.importorskip("uvloop")

    async def run() -> None:
        c = Cluster()
        try:
            fixtures = {"cluster": c, "caplog": caplog, "tmp_path": tmp_path}
            await case(*[fixtures[name] for name in case.__code__.co_varnames[: case.__code__.co_argcount]])
        finally:
            await c.close()
            peers, RawPeer.opened = RawPeer.opened, []
            for peer in peers:
                peer.close()
            await asyncio.sleep(0)

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(run())
