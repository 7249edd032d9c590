"""`Discovery` on real nodes: a real DNS server on loopback (dnslib) answering A and SRV
records, real UDP multicast on the loopback interface, static seeds; what discovery must
never do (dial itself, undo a `disconnect`, drop a node an answer stops listing, trust a
forged, stale or replayed announcement); HKDF against RFC 5869."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from dnslib import QTYPE, RCODE, RR, SRV, A  # type: ignore[import-untyped]
from dnslib.server import BaseResolver, DNSLogger, DNSServer  # type: ignore[import-untyped]

from pgregistry.discovery import (
    ANNOUNCE_LABEL,
    Discovery,
    Dns,
    Multicast,
    Static,
    decode_announcement,
    encode_announcement,
    hkdf_sha256,
    parse_strategy,
)
from pgregistry.node import Node

from .helpers import eventually

FAST: dict[str, Any] = {"tick_interval": 0.1, "down_after": 0.5}
TIMEOUT = 10.0


def cookie() -> str:
    """A cookie of this test alone: nodes of a concurrent test run cannot connect to ours."""
    return "discovery-" + secrets.token_hex(8)


def free_port(kind: int = socket.SOCK_STREAM, host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


async def polls_pass(discovery: Discovery, n: int = 3, label: str | None = None) -> None:
    """Wait until `discovery` (or one of its strategies) completed `n` more polls."""
    key = "polls" if label is None else f"{label}.polls"
    start = discovery.stat()[key]
    await eventually(lambda: discovery.stat()[key] >= start + n, TIMEOUT, f"{n} more polls of {key}")


# -- a DNS server -------------------------------------------------------------------------


class Zone(BaseResolver):
    """A, SRV and additional records, replaced whole by the test (read by the server's thread)."""

    def __init__(self) -> None:
        self.a: dict[str, list[str]] = {}
        self.srv: dict[str, list[tuple[str, int]]] = {}
        self.additional: dict[str, list[str]] = {}  # SRV name -> targets whose A goes in the additional section
        self.queries: list[tuple[str, str]] = []

    def resolve(self, request: Any, handler: Any) -> Any:
        reply = request.reply()
        qname = request.q.qname
        name, qtype = str(qname), QTYPE[request.q.qtype]
        self.queries.append((name, qtype))
        if name not in self.a and name not in self.srv:
            reply.header.rcode = RCODE.NXDOMAIN
        elif qtype == "A":
            for ip in self.a.get(name, []):
                reply.add_answer(RR(qname, QTYPE.A, rdata=A(ip), ttl=0))
        elif qtype == "SRV":
            for target, port in self.srv.get(name, []):
                reply.add_answer(RR(qname, QTYPE.SRV, rdata=SRV(priority=0, weight=0, port=port, target=target),
                                    ttl=0))
            for target in self.additional.get(name, []):
                for ip in self.a.get(target, []):
                    reply.add_ar(RR(target, QTYPE.A, rdata=A(ip), ttl=0))
        return reply


@pytest.fixture
def dns_server() -> Iterator[tuple[Zone, str]]:
    """A DNS server on 127.0.0.1 and a free UDP port: its zone and its "host:port"."""
    zone = Zone()
    server = DNSServer(zone, address="127.0.0.1", port=0, logger=DNSLogger(log="-request,-reply,-truncated,-error,"
                                                                            "-recv,-send,-data", prefix=False))
    server.start_thread()
    try:
        yield zone, f"127.0.0.1:{server.server.server_address[1]}"
    finally:
        server.stop()
        server.server.server_close()


@contextlib.asynccontextmanager
async def nodes_on_one_port(hosts: list[str], secret: str) -> AsyncIterator[list[Node]]:
    """Started nodes, one per loopback address in `hosts`, all on one port (A records carry no port)."""
    for _attempt in range(20):
        async with contextlib.AsyncExitStack() as stack:
            first = await stack.enter_async_context(Node("n0", host=hosts[0], cookie=secret, **FAST))
            nodes = [first]
            try:
                for i, host in enumerate(hosts[1:], 1):
                    nodes.append(await stack.enter_async_context(
                        Node(f"n{i}", host=host, port=first.port, cookie=secret, **FAST)))
            except OSError:
                continue  # the port is taken on another loopback address: try another
            yield nodes
            return
    raise AssertionError("no port free on every loopback address")


# -- HKDF and the cookie's key -------------------------------------------------------------


def test_hkdf_rfc5869_test_case_1() -> None:
    okm = hkdf_sha256(bytes([0x0B] * 22), salt=bytes(range(0x0D)), info=bytes(range(0xF0, 0xFA)), length=42)
    assert okm.hex() == ("3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf"
                         "34007208d5b887185865")


def test_hkdf_rfc5869_test_case_3_empty_salt_and_info() -> None:
    okm = hkdf_sha256(bytes([0x0B] * 22), info=b"", length=42)
    assert okm.hex() == ("8da4e775a563c18f715f802a063c5a31b8a11f5c5ee1879ec3454e5f3c738d2d"
                         "9d201395faa4b61a96c8")


def test_node_derives_keys_from_a_shared_cookie_only(monkeypatch: pytest.MonkeyPatch) -> None:
    a, b, c = Node("a", cookie="one"), Node("b", cookie="one"), Node("c", cookie="two")
    key = a.derive_key(ANNOUNCE_LABEL)
    assert key == b.derive_key(ANNOUNCE_LABEL) != c.derive_key(ANNOUNCE_LABEL)
    assert len(key) == 32 and b"one" not in key and key != a.derive_key(b"another purpose")
    assert key == hkdf_sha256(b"one", info=ANNOUNCE_LABEL)
    monkeypatch.delenv("PGREGISTRY_COOKIE", raising=False)
    with pytest.raises(ValueError, match="no shared cookie"):
        Node("d").derive_key(ANNOUNCE_LABEL)
    monkeypatch.setenv("PGREGISTRY_COOKIE", "one")
    assert Node("e").derive_key(ANNOUNCE_LABEL) == key


async def test_multicast_is_refused_on_a_node_without_a_shared_cookie(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PGREGISTRY_COOKIE", raising=False)
    async with Node("tls-only") as node:  # a random cookie: TLS alone would authenticate its peers
        with pytest.raises(ValueError, match="no shared cookie"):
            await Discovery.start(node, [Static(["127.0.0.1:1"]), Multicast(port=free_port(socket.SOCK_DGRAM))])
        assert node.service("discovery") is None


def test_announcements_round_trip_and_refuse_tampering() -> None:
    key = hkdf_sha256(b"cookie", info=ANNOUNCE_LABEL)
    data = encode_announcement(key, "a@127.0.0.1:4000", timestamp=1000.0, nonce=b"n" * 16)
    assert decode_announcement(key, data) == ("a@127.0.0.1:4000", 1000.0, b"n" * 16)
    assert b"cookie" not in data
    with pytest.raises(ValueError, match="MAC"):
        decode_announcement(hkdf_sha256(b"other", info=ANNOUNCE_LABEL), data)
    tampered = bytearray(data)
    tampered[20] ^= 1
    with pytest.raises(ValueError, match="MAC"):
        decode_announcement(key, bytes(tampered))
    for junk in (b"", data[:-1], data + b"x", b"XXXX" + data[4:]):
        with pytest.raises(ValueError):
            decode_announcement(key, junk)
    with pytest.raises(ValueError, match="not a node id"):
        decode_announcement(key, encode_announcement(key, "no-at-sign"))


def test_strategies_check_their_settings() -> None:
    with pytest.raises(ValueError, match="needs a port"):
        Dns("nodes.test")
    with pytest.raises(ValueError, match="port must be None"):
        Dns("nodes.test", port=1, record="SRV")
    with pytest.raises(ValueError, match="record"):
        Dns("nodes.test", port=1, record="MX")
    with pytest.raises(ValueError):
        Dns("nodes.test", port=1, nameservers=["not-an-address:53"])
    with pytest.raises(ValueError, match="multicast"):
        Multicast("10.0.0.1")
    with pytest.raises(ValueError, match="interface"):
        Multicast(interface="eth0")
    with pytest.raises(TypeError):
        Static("127.0.0.1:1")
    with pytest.raises(ValueError):
        Static(["nohost"])


def test_parse_strategy() -> None:
    s = parse_strategy("static:127.0.0.1:1,a@127.0.0.1:2")
    assert isinstance(s, Static) and s.seeds == ["127.0.0.1:1", "a@127.0.0.1:2"]
    d = parse_strategy("dns:web.default.svc.cluster.local:4369@10.0.0.10:53")
    assert isinstance(d, Dns) and (d.name, d.port, d.record, d.nameservers) == (
        "web.default.svc.cluster.local", 4369, "A", [("10.0.0.10", 53)])
    d6 = parse_strategy("dns6:web:4369")
    assert isinstance(d6, Dns) and d6.record == "AAAA" and d6.nameservers is None
    srv = parse_strategy("srv:_pgr._tcp.web.service.consul@127.0.0.1:8600")
    assert isinstance(srv, Dns) and srv.record == "SRV" and srv.nameservers == [("127.0.0.1", 8600)]
    m = parse_strategy("multicast")
    assert isinstance(m, Multicast) and (m.group, m.interface) == ("239.255.42.99", None)
    m2 = parse_strategy("multicast:239.1.2.3:5000@127.0.0.1")
    assert isinstance(m2, Multicast) and (m2.group, m2.port, m2.interface) == ("239.1.2.3", 5000, "127.0.0.1")
    m3 = parse_strategy("multicast@127.0.0.1")
    assert isinstance(m3, Multicast) and m3.interface == "127.0.0.1"
    for bad in ("", "static:", "dns:web", "srv:", "multicast:239.1.2.3", "carrier-pigeon:x"):
        with pytest.raises(ValueError):
            parse_strategy(bad)


# -- static seeds ----------------------------------------------------------------------------


async def test_static_seed_not_up_yet_is_found_once_it_starts() -> None:
    secret = cookie()
    late_port = free_port()
    async with Node("a", cookie=secret, **FAST) as a, Node("b", cookie=secret, **FAST) as b:
        # b is up, the other seed is not (yet), and a's own address is a seed too.
        d = await Discovery.start(a, [Static([f"127.0.0.1:{b.port}", f"127.0.0.1:{late_port}", a.id],
                                             interval=0.05)])
        await eventually(lambda: d.settled.is_set() and d.stat()["static.failures"] >= 1, TIMEOUT,
                         "a first poll with the late seed failing")
        assert a.peers() == [b.id]
        async with Node("late", port=late_port, cookie=secret, **FAST) as late:
            await eventually(lambda: late.id in a.peers(), TIMEOUT, "the late seed found")
            stat = d.stat()
            assert stat["static.connected"] == 2 and stat["static.found"] == 3
            dialled = stat["static.dialled"]
            await polls_pass(d)
            assert d.stat()["static.dialled"] == dialled  # connected seeds are not dialled again
        assert a.service("discovery") is d
    assert d.closed


async def test_a_seed_that_is_this_node_under_another_name_is_skipped_after_one_dial() -> None:
    async with Node("a", cookie=cookie(), **FAST) as a:
        d = await Discovery.start(a, [Static([f"localhost:{a.port}"], interval=0.02)])
        await polls_pass(d, 5)
        stat = d.stat()
        assert stat["static.dialled"] == 1 and stat["static.failures"] == 0 and a.peers() == []


async def test_a_disconnect_holds_against_discovery() -> None:
    secret = cookie()
    async with Node("a", cookie=secret, **FAST) as a, Node("b", cookie=secret, **FAST) as b:
        da = await Discovery.start(a, [Static([f"127.0.0.1:{b.port}"], interval=0.02)])
        db = await Discovery.start(b, [Static([f"127.0.0.1:{a.port}"], interval=0.02)])
        await eventually(lambda: a.peers() == [b.id] and b.peers() == [a.id], TIMEOUT, "a and b connected")
        await a.disconnect(b.id)
        assert a.peers() == []
        await eventually(lambda: da.stat()["blocked"] >= 2 and db.stat()["blocked"] >= 2, TIMEOUT,
                         "both discoveries refused by the block")
        await polls_pass(da, 5)
        await polls_pass(db, 5)
        assert a.peers() == [] and b.peers() == []
        # An explicit connect still lifts the block, as always.
        await b.connect(a.id)
        await eventually(lambda: a.peers() == [b.id], TIMEOUT, "reconnected explicitly")


@pytest.mark.parametrize("cap", [1, 3])
async def test_discovery_dials_respect_the_gossip_dial_cap(cap: int) -> None:
    """Seeds that accept and never answer the handshake: at most `max_gossip_dials` are held at once."""
    holes = 4
    now = {"open": 0, "most": 0, "total": 0}

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        now["open"] += 1
        now["total"] += 1
        now["most"] = max(now["most"], now["open"])
        try:
            await reader.read()  # until the dialler gives up (handshake_timeout) and closes
        finally:
            now["open"] -= 1
            writer.close()

    servers = [await asyncio.start_server(hold, "127.0.0.1", 0) for _ in range(holes)]
    try:
        node = Node("a", cookie=cookie(), max_gossip_dials=cap, **FAST)
        node.handshake_timeout = 0.2
        async with node:
            seeds = [f"127.0.0.1:{server.sockets[0].getsockname()[1]}" for server in servers]
            d = await Discovery.start(node, [Static(seeds, interval=0.01)])
            await eventually(lambda: now["most"] == cap and now["total"] >= 2 * holes, TIMEOUT,
                             f"{2 * holes} dials, {cap} at once", report=lambda: repr(now))
            assert now["most"] == cap
            assert d.stat()["static.failures"] >= holes
    finally:
        for server in servers:
            server.close()


async def test_start_checks_its_arguments() -> None:
    async with Node("a", cookie=cookie()) as a:
        with pytest.raises(ValueError, match="at least one"):
            await Discovery.start(a, [])
        with pytest.raises(TypeError):
            await Discovery.start(a, ["static:127.0.0.1:1"])  # type: ignore[list-item]
        s = Static(["127.0.0.1:1"])
        with pytest.raises(ValueError, match="twice"):
            await Discovery.start(a, [s, s])
        d = await Discovery.start(a, [s])
        with pytest.raises(Exception, match="discovery"):
            await Discovery.start(a, [Static(["127.0.0.1:2"])])
        await d.stop()
        assert a.service("discovery") is None and d.closed


# -- DNS -----------------------------------------------------------------------------------


async def test_dns_a_records_find_every_node_and_a_missing_record_drops_nothing(
        dns_server: tuple[Zone, str]) -> None:
    zone, ns = dns_server
    hosts = ["127.0.0.2", "127.0.0.3", "127.0.0.4"]
    async with nodes_on_one_port(hosts, cookie()) as nodes:
        zone.a = {"nodes.test.": list(hosts)}
        port = nodes[0].port
        ds = [await Discovery.start(n, [Dns("nodes.test", port=port, nameservers=[ns], interval=0.05)])
              for n in nodes]
        for d in ds:
            await eventually(lambda: d.settled.is_set(), TIMEOUT, "settled")
        for n in nodes:
            await eventually(lambda: len(n.peers()) == 2, TIMEOUT, f"{n.id} connected to the two others")
        assert all(d.stat()["dns.found"] == 3 and d.stat()["dns.lookup_errors"] == 0 for d in ds)
        # The answer stops listing the third node: it stays connected.
        zone.a = {"nodes.test.": hosts[:2]}
        for d in ds:
            await eventually(lambda: d.stat()["dns.found"] == 2, TIMEOUT, "the shorter answer seen")
            await polls_pass(d)
        assert all(len(n.peers()) == 2 for n in nodes)
        # An empty answer (NXDOMAIN) is no failure and drops nothing either.
        zone.a = {}
        for d in ds:
            await eventually(lambda: d.stat()["dns.found"] == 0, TIMEOUT, "the empty answer seen")
            await polls_pass(d)
            assert d.stat()["dns.lookup_errors"] == 0
        assert all(len(n.peers()) == 2 for n in nodes)


async def test_dns_srv_records_give_hosts_and_ports(dns_server: tuple[Zone, str]) -> None:
    zone, ns = dns_server
    secret = cookie()
    async with Node("x", cookie=secret, **FAST) as x, Node("y", cookie=secret, **FAST) as y, \
            Node("z", cookie=secret, **FAST) as z:
        name = "_pgr._tcp.nodes.test."
        zone.a = {"y.nodes.test.": ["127.0.0.1"], "z.nodes.test.": ["127.0.0.1"]}
        zone.srv = {name: [("y.nodes.test.", y.port), ("z.nodes.test.", z.port)]}
        zone.additional = {name: ["y.nodes.test."]}  # z's address must be looked up
        d = await Discovery.start(x, [Dns(name, record="SRV", nameservers=[ns], interval=0.05)])
        await eventually(lambda: set(x.peers()) == {y.id, z.id}, TIMEOUT, "x connected to y and z")
        assert d.stat()["dns.found"] == 2
        assert ("z.nodes.test.", "A") in zone.queries and ("y.nodes.test.", "A") not in zone.queries
        zone.srv = {name: [("z.nodes.test.", z.port)]}
        await eventually(lambda: d.stat()["dns.found"] == 1, TIMEOUT, "y no longer listed")
        await polls_pass(d)
        assert set(x.peers()) == {y.id, z.id}


async def test_dns_server_that_does_not_answer_is_a_counted_lookup_error() -> None:
    silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # bound, never answers
    silent.bind(("127.0.0.1", 0))
    try:
        async with Node("a", cookie=cookie()) as a:
            d = await Discovery.start(a, [Dns("nodes.test", port=1, nameservers=[
                f"127.0.0.1:{silent.getsockname()[1]}"], interval=0.01, timeout=0.1)])
            await eventually(lambda: d.settled.is_set() and d.stat()["dns.lookup_errors"] >= 2, TIMEOUT,
                             "lookups time out, counted, and the loop goes on")
            assert d.stat()["dialled"] == 0
    finally:
        silent.close()


# -- multicast --------------------------------------------------------------------------------


def multicast_group() -> tuple[str, int]:
    """A random administratively scoped group and a free port: concurrent runs do not meet."""
    return f"239.255.{secrets.randbelow(256)}.{secrets.randbelow(254) + 1}", free_port(socket.SOCK_DGRAM)


def sender() -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton("127.0.0.1"))
    s.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 1)
    s.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_LOOP, 1)
    return s


_loopback_multicast: list[str | None] = []
_probe_lock = threading.Lock()


def loopback_multicast_refused() -> str | None:
    """Why the kernel refuses multicast on 127.0.0.1, or None if one datagram makes it."""
    with _probe_lock:
        if not _loopback_multicast:
            group, port = multicast_group()
            reason: str | None = None
            try:
                with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as r, sender() as s:
                    r.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                    r.bind((group, port))
                    r.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP,
                                 socket.inet_aton(group) + socket.inet_aton("127.0.0.1"))
                    r.settimeout(2.0)
                    s.sendto(b"probe", (group, port))
                    if r.recv(16) != b"probe":
                        reason = "a datagram sent to the group came back changed"
            except OSError as exc:
                reason = f"the kernel refuses UDP multicast on the loopback interface: {exc!r}"
            _loopback_multicast.append(reason)
        return _loopback_multicast[0]


@pytest.fixture
def multicast() -> tuple[str, int]:
    reason = loopback_multicast_refused()
    if reason is not None:
        pytest.skip(reason)
    return multicast_group()


async def test_multicast_finds_nodes_on_loopback(multicast: tuple[str, int]) -> None:
    group, port = multicast
    secret = cookie()
    async with Node("a", cookie=secret, **FAST) as a, Node("b", cookie=secret, **FAST) as b, \
            Node("c", cookie=secret, **FAST) as c, Node("stranger", cookie=cookie(), **FAST) as stranger:
        ds = [await Discovery.start(n, [Multicast(group, port, interface="127.0.0.1", interval=0.05)])
              for n in (a, b, c, stranger)]
        for n in (a, b, c):
            await eventually(lambda: len(n.peers()) == 2, TIMEOUT, f"{n.id} found the two others")
        # The stranger (another cookie) hears them, but can verify none of it, and the others refuse it.
        await eventually(lambda: ds[3].stat()["multicast.rejected"] >= 3, TIMEOUT, "the stranger rejected")
        await polls_pass(ds[3])
        assert stranger.peers() == [] and ds[3].stat()["dialled"] == 0
        assert all(d.settled.is_set() and d.stat()["multicast.rejected"] >= 1 for d in ds[:3])
        assert stranger.id not in a.peers()


async def test_forged_stale_and_replayed_announcements_dial_nothing(multicast: tuple[str, int]) -> None:
    group, port = multicast
    secret = cookie()
    key = hkdf_sha256(secret.encode(), info=ANNOUNCE_LABEL)
    ghost = f"ghost@127.0.0.1:{free_port()}"  # nothing listens there
    with sender() as s:
        await announcements_dial_nothing(group, port, secret, key, ghost, s)


async def announcements_dial_nothing(group: str, port: int, secret: str, key: bytes, ghost: str,
                                     s: socket.socket) -> None:
    async with Node("b", cookie=secret, **FAST) as b, Node("c", cookie=secret, **FAST) as c:
        d = await Discovery.start(b, [Multicast(group, port, interface="127.0.0.1", interval=0.02)])
        await eventually(lambda: d.settled.is_set(), TIMEOUT, "settled")

        def send(data: bytes) -> None:
            s.sendto(data, (group, port))

        wrong_key = hkdf_sha256(b"not the cookie", info=ANNOUNCE_LABEL)
        send(encode_announcement(wrong_key, c.id))  # another cookie, or a forger without one
        send(encode_announcement(secret.encode(), c.id))  # the raw cookie as the key is wrong too
        send(encode_announcement(key, c.id)[:-1] + b"\0")  # a bad MAC
        send(b"PGRD garbage")
        send(encode_announcement(key, c.id, timestamp=time.time() - 3600))  # stale
        send(encode_announcement(key, c.id, timestamp=time.time() + 3600))  # from the future
        await eventually(lambda: d.stat()["multicast.rejected"] >= 4 and d.stat()["multicast.stale"] >= 2,
                         TIMEOUT, "the bad announcements dropped")
        await polls_pass(d, 5)
        assert b.peers() == [] and d.stat()["dialled"] == 0 and d.stat()["multicast.accepted"] == 0

        # A good announcement is followed, once; the same bytes again are a replay.
        good = encode_announcement(key, ghost)
        send(good)
        await eventually(lambda: d.stat()["multicast.failures"] == 1, TIMEOUT, "the ghost dialled and failed")
        send(good)
        await eventually(lambda: d.stat()["multicast.replayed"] == 1, TIMEOUT, "the replay dropped")
        await polls_pass(d, 5)
        stat = d.stat()
        assert stat["multicast.dialled"] == 1 and stat["multicast.accepted"] == 1

        # And the path the test injects through works: a good announcement of c connects it.
        send(encode_announcement(key, c.id))
        await eventually(lambda: b.peers() == [c.id], TIMEOUT, "c connected")
