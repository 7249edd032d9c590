"""Tests of the fault injector: `pgregistry.testing.LinkProxy` and `Partition`.

The target behind each proxy is `EchoServer`, a plain asyncio protocol server that
echoes what it receives, counts it, records EOFs and closes, and can push bytes of its
own. Neither it nor the clients (asyncio streams) create tasks, so a test can check that
nothing of the proxy is left running after `close`.

Synchronisation is by events and bounded waits. A plain sleep appears only where a test
must observe that nothing arrives, and then as a short explicit deadline (`QUIET`).
"""

from __future__ import annotations

import asyncio
import gc
import hashlib
import logging
import random
import socket
import time
from collections.abc import AsyncIterator
from typing import cast

import pytest

from pgregistry.testing import LinkMode, LinkProxy, Partition, parse_address

#: Bound on every wait for something that must happen.
DEADLINE = 5.0
#: How long a test watches for something that must *not* happen.
QUIET = 0.2


class EchoConnection(asyncio.Protocol):
    """One connection of `EchoServer`: echoes, and records what happened to it."""

    def __init__(self, server: EchoServer) -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.received = bytearray()
        self.data_event = asyncio.Event()
        self.eof = asyncio.Event()
        self.lost = asyncio.Event()
        self.lost_exc: Exception | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is no subclass
        self.server.connections.append(self)
        self.server.connected.set()

    def data_received(self, data: bytes) -> None:
        self.received += data
        self.data_event.set()
        if self.server.echo:
            assert self.transport is not None
            self.transport.write(data)

    def eof_received(self) -> bool:
        self.eof.set()
        return False  # close our side too once the echoes are flushed

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost_exc = exc
        self.lost.set()

    async def wait_received(self, n: int) -> bytes:
        """Wait until at least `n` bytes arrived; return all of them."""
        async with asyncio.timeout(DEADLINE):
            while len(self.received) < n:
                self.data_event.clear()
                await self.data_event.wait()
        return bytes(self.received)


class EchoServer:
    """A plain asyncio echo server on loopback: the target of the proxies under test."""

    def __init__(self, echo: bool = True) -> None:
        self.echo = echo
        self.connections: list[EchoConnection] = []
        self.connected = asyncio.Event()
        self.server: asyncio.Server | None = None
        self.address = ""

    async def start(self) -> str:
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(lambda: EchoConnection(self), "127.0.0.1", 0)
        host, port = self.server.sockets[0].getsockname()[:2]
        self.address = f"{host}:{port}"
        return self.address

    async def wait_connections(self, n: int) -> list[EchoConnection]:
        async with asyncio.timeout(DEADLINE):
            while len(self.connections) < n:
                self.connected.clear()
                await self.connected.wait()
        return self.connections

    async def close(self) -> None:
        assert self.server is not None
        self.server.close()
        for conn in self.connections:
            if conn.transport is not None:
                conn.transport.abort()
        async with asyncio.timeout(DEADLINE):
            for conn in self.connections:
                await conn.lost.wait()
            await self.server.wait_closed()


@pytest.fixture(autouse=True)
async def no_loop_errors(caplog: pytest.LogCaptureFixture) -> AsyncIterator[None]:
    """Fail a test whose loop reported an error or asyncio logged a warning.

    Catches exceptions in callbacks, "Task exception was never retrieved" (hence the
    `gc.collect`) and asyncio's socket warnings.
    """
    loop = asyncio.get_running_loop()
    errors: list[dict] = []
    loop.set_exception_handler(lambda _loop, context: errors.append(context))
    caplog.set_level(logging.WARNING, logger="asyncio")
    yield
    gc.collect()
    await asyncio.sleep(0)
    loop.set_exception_handler(None)
    assert errors == []
    assert [r for r in caplog.records if r.name.startswith("asyncio")] == []


@pytest.fixture
async def echo() -> AsyncIterator[EchoServer]:
    server = EchoServer()
    await server.start()
    yield server
    await server.close()


@pytest.fixture
async def proxy(echo: EchoServer) -> AsyncIterator[LinkProxy]:
    async with LinkProxy(echo.address, name="test") as p:
        yield p


async def connect(p: LinkProxy) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    host, port = parse_address(p.address)
    return await asyncio.wait_for(asyncio.open_connection(host, port), DEADLINE)


async def read_exactly(reader: asyncio.StreamReader, n: int) -> bytes:
    return await asyncio.wait_for(reader.readexactly(n), DEADLINE)


async def assert_silent(reader: asyncio.StreamReader) -> None:
    """Nothing (not even EOF) arrives on `reader` within `QUIET` seconds."""
    with pytest.raises(TimeoutError):
        data = await asyncio.wait_for(reader.read(1), QUIET)
        pytest.fail(f"expected silence, got {data!r}")


async def assert_closed(reader: asyncio.StreamReader) -> None:
    """`reader` sees the end of the connection (EOF) within the deadline."""
    data = await asyncio.wait_for(reader.read(), DEADLINE)
    assert data == b""


async def assert_ended(reader: asyncio.StreamReader) -> None:
    """`reader` sees the end of the connection, as EOF or as a reset, within the deadline.

    A socket closed while it still holds unread bytes sends a reset instead of a FIN;
    where a test cannot know whether the proxy had read everything, either will do.
    """
    try:
        data = await asyncio.wait_for(reader.read(), DEADLINE)
    except ConnectionResetError:
        return
    assert data == b""


async def roundtrip(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    payload: bytes) -> None:
    writer.write(payload)
    await writer.drain()
    assert await read_exactly(reader, len(payload)) == payload


async def close_writer(writer: asyncio.StreamWriter) -> None:
    writer.close()
    try:
        await asyncio.wait_for(writer.wait_closed(), DEADLINE)
    except ConnectionError:
        pass  # the proxy already reset it; closed all the same


# -- pass ------------------------------------------------------------------------------


async def test_start_reports_a_loopback_address(echo: EchoServer) -> None:
    p = LinkProxy(echo.address)
    with pytest.raises(RuntimeError):
        _ = p.address
    address = await p.start()
    try:
        assert address == p.address
        host, port = parse_address(address)
        assert host == "127.0.0.1" and port > 0
        assert p.mode is LinkMode.PASS and p.target == echo.address
        with pytest.raises(RuntimeError):
            await p.start()
    finally:
        await p.close()


async def test_pass_forwards_both_ways_in_order(proxy: LinkProxy, echo: EchoServer) -> None:
    reader, writer = await connect(proxy)
    assert await proxy.wait_connections(1, DEADLINE) == 1
    for i in range(20):
        await roundtrip(reader, writer, f"message {i};".encode())
    # The target speaks first, unprompted: the other direction carries it too.
    (conn,) = await echo.wait_connections(1)
    assert conn.transport is not None
    conn.transport.write(b"pushed by the target")
    assert await read_exactly(reader, 20) == b"pushed by the target"
    assert proxy.connections_accepted == 1
    await close_writer(writer)


async def test_pass_forwards_megabytes_in_random_chunks(proxy: LinkProxy) -> None:
    rng = random.Random(20240611)
    total = 4 * 1024 * 1024
    payload = rng.randbytes(total)
    reader, writer = await connect(proxy)

    async def send() -> None:
        offset = 0
        while offset < total:
            size = rng.randint(1, 200_000)
            writer.write(payload[offset:offset + size])
            offset += size
            await writer.drain()
        writer.write_eof()

    async def receive() -> bytes:
        return await reader.read()  # until the echoed EOF

    async with asyncio.timeout(30):
        _, echoed = await asyncio.gather(send(), receive())
    assert len(echoed) == total
    assert hashlib.sha256(echoed).digest() == hashlib.sha256(payload).digest()
    assert proxy.bytes_forwarded == 2 * total
    assert proxy.bytes_dropped == 0
    await close_writer(writer)
    await proxy.wait_idle(DEADLINE)


async def test_bytes_sent_before_the_target_answers_are_kept(proxy: LinkProxy) -> None:
    # Connect and send without yielding to the loop: the kernel completes the handshake
    # and buffers the bytes, so the proxy reads them (and the EOF) as soon as it accepts,
    # before its own connect to the target can have finished. They must wait, not vanish.
    host, port = parse_address(proxy.address)
    socks = []
    for i in range(5):
        sock = socket.create_connection((host, port), timeout=DEADLINE)
        sock.sendall(f"first words of {i}".encode())
        sock.shutdown(socket.SHUT_WR)
        sock.setblocking(False)
        socks.append(sock)
    for i, sock in enumerate(socks):
        reader, writer = await asyncio.wait_for(asyncio.open_connection(sock=sock), DEADLINE)
        assert await asyncio.wait_for(reader.read(), DEADLINE) == f"first words of {i}".encode()
        await close_writer(writer)
    await proxy.wait_idle(DEADLINE)


async def test_half_close_is_forwarded_in_order(proxy: LinkProxy, echo: EchoServer) -> None:
    reader, writer = await connect(proxy)
    writer.write(b"last words")
    writer.write_eof()
    (conn,) = await echo.wait_connections(1)
    await asyncio.wait_for(conn.eof.wait(), DEADLINE)
    assert bytes(conn.received) == b"last words"
    # The echo server flushes the echo, then closes: the client reads both, in order.
    assert await asyncio.wait_for(reader.read(), DEADLINE) == b"last words"
    await close_writer(writer)
    await proxy.wait_idle(DEADLINE)


async def test_target_closing_abruptly_reaches_the_client(proxy: LinkProxy,
                                                          echo: EchoServer) -> None:
    reader, writer = await connect(proxy)
    await roundtrip(reader, writer, b"hello")
    (conn,) = echo.connections
    assert conn.transport is not None
    conn.transport.abort()
    await assert_closed(reader)
    await close_writer(writer)
    await proxy.wait_idle(DEADLINE)


async def test_client_closing_reaches_the_target(proxy: LinkProxy, echo: EchoServer) -> None:
    reader, writer = await connect(proxy)
    await roundtrip(reader, writer, b"hello")
    writer.transport.abort()
    (conn,) = echo.connections
    await asyncio.wait_for(conn.lost.wait(), DEADLINE)
    await proxy.wait_idle(DEADLINE)


async def test_unreachable_target_closes_the_client_fast() -> None:
    # Find a port nobody listens on: bind one, then release it.
    placeholder = EchoServer()
    address = await placeholder.start()
    await placeholder.close()
    async with LinkProxy(address) as p:
        reader, writer = await connect(p)
        await assert_closed(reader)
        await close_writer(writer)
        assert p.connections_failed == 1
        assert p.connections == 0


# -- delay -----------------------------------------------------------------------------


async def test_delay_adds_at_least_the_delay_and_keeps_order(proxy: LinkProxy) -> None:
    delay = 0.1
    proxy.delay(delay)
    assert proxy.mode is LinkMode.DELAY and proxy.delay_seconds == delay
    reader, writer = await connect(proxy)
    chunks = [f"<{i:03d}>".encode() * (i + 1) for i in range(30)]
    expected = b"".join(chunks)
    started = time.monotonic()
    for chunk in chunks:
        writer.write(chunk)
        await writer.drain()
    first = await read_exactly(reader, 1)
    first_after = time.monotonic() - started
    rest = await read_exactly(reader, len(expected) - 1)
    assert first + rest == expected
    # One delay on the way to the echo server, one on the way back.
    assert first_after >= 2 * delay
    # Chunks are delayed concurrently, not one after the other.
    assert time.monotonic() - started < 2 * delay + 30 * delay
    await close_writer(writer)


async def test_restore_during_a_delay_never_reorders(proxy: LinkProxy) -> None:
    reader, writer = await connect(proxy)
    await proxy.wait_connections(1, DEADLINE)
    proxy.delay(0.15)
    writer.write(b"early;")
    await writer.drain()
    proxy.restore()
    writer.write(b"late")
    await writer.drain()
    assert await read_exactly(reader, 10) == b"early;late"
    await close_writer(writer)


# -- blackhole -------------------------------------------------------------------------


async def test_blackhole_drops_bytes_but_keeps_the_socket_open(proxy: LinkProxy,
                                                               echo: EchoServer) -> None:
    reader, writer = await connect(proxy)
    await roundtrip(reader, writer, b"before")
    (conn,) = echo.connections
    assert conn.transport is not None

    proxy.blackhole()
    assert proxy.mode is LinkMode.BLACKHOLE
    writer.write(b"lost client bytes")
    await writer.drain()
    conn.transport.write(b"lost target bytes")
    await assert_silent(reader)  # neither the echo (never sent) nor the push arrive
    assert bytes(conn.received) == b"before"
    assert not writer.is_closing() and not conn.lost.is_set()
    assert proxy.connections == 1
    assert proxy.bytes_dropped == len(b"lost client bytes") + len(b"lost target bytes")

    proxy.restore()
    await roundtrip(reader, writer, b"after")  # exactly the new bytes: nothing replayed
    assert bytes(conn.received) == b"beforeafter"
    await close_writer(writer)


async def test_blackhole_accepts_new_connections(proxy: LinkProxy, echo: EchoServer) -> None:
    proxy.blackhole()
    reader, writer = await connect(proxy)
    await proxy.wait_connections(1, DEADLINE)
    await echo.wait_connections(1)
    writer.write(b"ping")
    await assert_silent(reader)
    proxy.restore()
    await roundtrip(reader, writer, b"pong")
    await close_writer(writer)


async def test_blackhole_holds_a_close_until_restored(proxy: LinkProxy,
                                                      echo: EchoServer) -> None:
    reader, writer = await connect(proxy)
    await roundtrip(reader, writer, b"x")
    (conn,) = echo.connections
    proxy.blackhole()
    writer.write_eof()
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(conn.eof.wait(), QUIET)
    proxy.restore()
    await asyncio.wait_for(conn.eof.wait(), DEADLINE)
    await assert_closed(reader)  # the echo server closed in turn
    await close_writer(writer)
    await proxy.wait_idle(DEADLINE)


async def test_blackhole_drops_bytes_queued_under_a_delay(proxy: LinkProxy) -> None:
    reader, writer = await connect(proxy)
    await proxy.wait_connections(1, DEADLINE)
    proxy.delay(0.1)
    writer.write(b"in flight")
    await writer.drain()
    proxy.blackhole()
    await assert_silent(reader)
    proxy.restore()
    await roundtrip(reader, writer, b"fresh")
    await close_writer(writer)


# -- cut and restore -------------------------------------------------------------------


async def test_cut_closes_connections_and_refuses_new_ones(proxy: LinkProxy,
                                                           echo: EchoServer) -> None:
    reader, writer = await connect(proxy)
    await roundtrip(reader, writer, b"hello")
    (conn,) = echo.connections

    proxy.cut()
    assert proxy.mode is LinkMode.CUT
    assert proxy.connections == 0
    await assert_closed(reader)  # client side sees EOF
    await asyncio.wait_for(conn.lost.wait(), DEADLINE)  # target side is closed too
    await close_writer(writer)

    started = time.monotonic()
    reader2, writer2 = await connect(proxy)
    await assert_closed(reader2)
    assert time.monotonic() - started < 1.0  # fails fast, no timeout involved
    await close_writer(writer2)
    assert proxy.connections_refused == 1
    assert len(echo.connections) == 1  # the refused connection never reached the target


async def test_restore_after_cut_accepts_again(proxy: LinkProxy, echo: EchoServer) -> None:
    reader, writer = await connect(proxy)
    await roundtrip(reader, writer, b"one")
    proxy.cut()
    await assert_closed(reader)
    await close_writer(writer)

    proxy.restore()
    assert proxy.mode is LinkMode.PASS
    reader2, writer2 = await connect(proxy)
    await roundtrip(reader2, writer2, b"two")
    assert proxy.connections == 1  # the cut connection stayed closed
    assert len(echo.connections) == 2
    await close_writer(writer2)


async def test_wait_connections_counts_open_connections(proxy: LinkProxy) -> None:
    with pytest.raises(TimeoutError):
        await proxy.wait_connections(1, timeout=QUIET)
    pairs = [await connect(proxy) for _ in range(3)]
    assert await proxy.wait_connections(3, DEADLINE) >= 3
    assert proxy.connections == 3
    for _reader, writer in pairs:
        await close_writer(writer)
    await proxy.wait_idle(DEADLINE)
    assert proxy.connections_accepted == 3


async def test_set_mode_validates(proxy: LinkProxy) -> None:
    with pytest.raises(ValueError):
        proxy.delay(-1)
    with pytest.raises(ValueError):
        proxy.delay(float("nan"))
    with pytest.raises(ValueError):
        proxy.set_mode("blackhole", 0.5)
    with pytest.raises(ValueError):
        proxy.set_mode("sideways")
    proxy.delay(0)
    assert proxy.mode is LinkMode.PASS
    proxy.set_mode("delay", 0.25)
    assert proxy.mode is LinkMode.DELAY and proxy.delay_seconds == 0.25
    proxy.pass_()
    assert proxy.mode is LinkMode.PASS and proxy.delay_seconds == 0.0


# -- close -----------------------------------------------------------------------------


async def test_close_closes_everything_and_leaves_no_tasks(echo: EchoServer) -> None:
    before = asyncio.all_tasks()
    p = LinkProxy(echo.address)
    await p.start()
    reader1, writer1 = await connect(p)
    await roundtrip(reader1, writer1, b"a")
    reader2, writer2 = await connect(p)
    await p.wait_connections(2, DEADLINE)
    p.delay(1.0)
    writer2.write(b"queued")  # still queued in the proxy when it closes
    await writer2.drain()

    await p.close()
    await p.close()  # idempotent
    assert p.closed
    assert asyncio.all_tasks() == before
    assert p.connections == 0
    await assert_closed(reader1)  # idle: a clean EOF
    await assert_ended(reader2)  # its last bytes may still have been unread: EOF or reset
    await echo.wait_connections(2)
    async with asyncio.timeout(DEADLINE):
        for conn in echo.connections:
            await conn.lost.wait()
    for writer in (writer1, writer2):
        await close_writer(writer)
    with pytest.raises(OSError):
        await connect(p)  # no longer listening
    with pytest.raises(RuntimeError):
        await p.start()


async def test_close_right_after_a_connect(echo: EchoServer) -> None:
    # Close races the proxy's own accept and its connect to the target: whichever
    # stage the connection reached, it ends and nothing of the proxy is left running.
    before = asyncio.all_tasks()
    p = LinkProxy(echo.address)
    await p.start()
    reader, writer = await connect(p)
    await p.close()
    assert asyncio.all_tasks() == before
    await assert_ended(reader)  # a reset if it was still in the listen backlog
    await close_writer(writer)


async def test_close_fails_pending_waiters(echo: EchoServer) -> None:
    p = LinkProxy(echo.address)
    await p.start()
    loop = asyncio.get_running_loop()
    waiter = loop.create_task(p.wait_connections(5, DEADLINE))
    await asyncio.sleep(0)  # let the waiter register (not a synchronisation on the proxy)
    await p.close()
    with pytest.raises(ConnectionError):
        await asyncio.wait_for(waiter, DEADLINE)


async def test_unstarted_proxy_closes_quietly(echo: EchoServer) -> None:
    p = LinkProxy(echo.address)
    await p.close()
    await p.close()
    with pytest.raises(RuntimeError):
        await p.start()


def test_parse_address() -> None:
    assert parse_address("127.0.0.1:4369") == ("127.0.0.1", 4369)
    assert parse_address("[::1]:80") == ("::1", 80)
    for bad in ("localhost", ":80", "host:", "host:0", "host:70000", "host:x"):
        with pytest.raises(ValueError):
            parse_address(bad)


# -- partition -------------------------------------------------------------------------


@pytest.fixture
async def three_nodes() -> AsyncIterator[dict[str, EchoServer]]:
    servers = {name: EchoServer() for name in "ABC"}
    for server in servers.values():
        await server.start()
    yield servers
    for server in servers.values():
        await server.close()


async def open_mesh(part: Partition) -> dict[tuple[str, str], tuple[asyncio.StreamReader,
                                                                     asyncio.StreamWriter]]:
    """One client connection over every directed link, each checked with a round trip."""
    mesh = {}
    for (src, dst), p in part.proxies.items():
        reader, writer = await connect(p)
        await roundtrip(reader, writer, f"{src}{dst}".encode())
        mesh[(src, dst)] = (reader, writer)
    return mesh


async def test_partition_split_and_heal_on_three_nodes(
        three_nodes: dict[str, EchoServer]) -> None:
    targets = {name: server.address for name, server in three_nodes.items()}
    async with Partition.for_targets(targets) as part:
        assert part.nodes == {"A", "B", "C"} and len(part.proxies) == 6
        assert part.proxy("A", "B").target == targets["B"]
        mesh = await open_mesh(part)

        part.split({"A"}, {"B", "C"})
        cross = {("A", "B"), ("B", "A"), ("A", "C"), ("C", "A")}
        assert part.severed == cross
        assert part.groups == (frozenset("A"), frozenset("BC"))
        for link, p in part.proxies.items():
            assert p.mode is (LinkMode.BLACKHOLE if link in cross else LinkMode.PASS)

        for _reader, writer in mesh.values():
            writer.write(b"?")
        # Inside a group the bytes flow; across groups nothing arrives, on any link at once.
        await asyncio.gather(*(read_exactly(mesh[link][0], 1)
                               for link in mesh if link not in cross))
        await asyncio.gather(*(assert_silent(mesh[link][0]) for link in cross))
        assert all(p.connections == 1 for p in part.proxies.values())  # sockets still open

        part.heal()
        assert part.severed == frozenset() and part.groups is None
        assert all(p.mode is LinkMode.PASS for p in part.proxies.values())
        for reader, writer in mesh.values():
            await roundtrip(reader, writer, b"healed")  # only new bytes: the "?" was dropped
        for _reader, writer in mesh.values():
            await close_writer(writer)


async def test_partition_cut_mode_and_resplit(three_nodes: dict[str, EchoServer]) -> None:
    targets = {name: server.address for name, server in three_nodes.items()}
    async with Partition.for_targets(targets, mode="cut") as part:
        part.proxy("B", "C").delay(0.05)  # a link state the partition must give back
        mesh = await open_mesh(part)

        part.split("C", {"A", "B"})
        for link in (("A", "C"), ("C", "A"), ("B", "C"), ("C", "B")):
            await assert_closed(mesh[link][0])
            assert part.proxy(*link).mode is LinkMode.CUT
        await roundtrip(*mesh[("A", "B")], b"still here")

        # A new split reunites B and C and severs A-B instead (blackhole, by choice).
        part.split({"A"}, {"B", "C"}, mode="blackhole")
        assert part.proxy("B", "C").mode is LinkMode.DELAY
        assert part.proxy("B", "C").delay_seconds == 0.05
        assert part.proxy("A", "B").mode is LinkMode.BLACKHOLE
        assert part.proxy("A", "C").mode is LinkMode.BLACKHOLE  # re-severed, new mode
        reader, writer = await connect(part.proxy("B", "C"))
        await roundtrip(reader, writer, b"reunited")
        await close_writer(writer)

        part.heal()
        assert part.proxy("B", "C").mode is LinkMode.DELAY
        assert part.proxy("A", "C").mode is LinkMode.PASS
        for _reader, writer in mesh.values():
            await close_writer(writer)


async def test_partition_isolate_and_validation(three_nodes: dict[str, EchoServer]) -> None:
    targets = {name: server.address for name, server in three_nodes.items()}
    async with Partition.for_targets(targets) as part:
        part.isolate("B")
        assert part.severed == {("A", "B"), ("B", "A"), ("B", "C"), ("C", "B")}
        with pytest.raises(ValueError, match="no group"):
            part.split({"A"}, {"B"})
        with pytest.raises(ValueError, match="more than one group"):
            part.split({"A", "B"}, {"B", "C"})
        with pytest.raises(ValueError, match="unknown"):
            part.split({"A", "B", "C"}, {"D"})
        with pytest.raises(ValueError):
            part.split({"A"}, {"B", "C"}, mode="delay")
        part.heal()
    assert all(p.closed for p in part.proxies.values())
    with pytest.raises(ValueError):
        Partition({("A", "A"): LinkProxy(targets["A"])})
    with pytest.raises(TypeError):
        Partition({("A", "B"): "not a proxy"})  # type: ignore[dict-item]
