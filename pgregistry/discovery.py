"""`Discovery`: find the nodes of a cluster and connect to them (layer 7).

A node joins a cluster by connecting to one member (`Node.connect`); discovery finds
members without anyone naming them. `Discovery.start(node, strategies)` runs each
*strategy* in its own loop: a *poll* finds addresses (``"host:port"``) or node ids, then
every one of them that is not a connected peer is dialled, and the poll ends when those
dials have ended (connected or failed); the next poll follows ``interval`` seconds later.

* `Static` (``["host:port", ...]``): seed addresses, dialled until they answer.
* `Dns`: ``A``/``AAAA`` records of a name (with a fixed port) or ``SRV`` records (host and
  port each), polled with dnspython: Kubernetes headless services, Consul DNS, Compose.
* `Multicast`: announcements on a LAN's UDP multicast group, authenticated with a key
  derived from the cookie (HKDF-SHA256, never the cookie itself), timestamped and with a
  random nonce, so that a forged, stale or replayed announcement is dropped.

What discovery never does: dial this node itself (an address found to be this node is
remembered and skipped), lift a ``disconnect`` (its dials are *not explicit*:
``Node.connect(..., explicit=False)``, which a block on either side refuses), exceed the
mesh's caps (each dial takes one of the node's ``max_gossip_dials`` slots; at most
`MAX_FOUND` addresses are taken from one poll), or disconnect anything: a node that a
DNS answer stops listing stays connected (the mesh decides when a peer is down). A
failed dial or lookup is counted and logged within a `LogBudget`, never raised out of
the poll loop.

`Discovery.settled` is set once every strategy has completed one poll: a readiness probe
waits for it. `Discovery.stat` counts polls, addresses found, dials and their outcomes
per strategy. The discovery is attached to its node as a service (under ``"discovery"``
by default), so `Node.stop` closes it, and `Node.service` finds it.

Everything here runs on the node's loop thread.
"""

from __future__ import annotations

import abc
import asyncio
import collections
import contextlib
import hashlib
import hmac
import ipaddress
import logging
import secrets
import socket
import struct
import sys
import time
from collections.abc import Iterable, Sequence
from typing import Any, ClassVar, Final

import dns.asyncresolver
import dns.exception
import dns.nameserver
import dns.rdatatype
import dns.resolver

from .checks import check_seconds, parse_address
from .handshake import HandshakeError, hkdf_sha256
from .logbudget import LogBudget
from .mesh import Disconnected
from .node import Node
from .terms import short_repr
from .transport import MAX_NODE_ID_LEN

__all__ = [
    "ANNOUNCE_LABEL",
    "MAX_FOUND",
    "Discovery",
    "Dns",
    "Multicast",
    "Static",
    "Strategy",
    "decode_announcement",
    "encode_announcement",
    "hkdf_sha256",
    "parse_strategy",
]

logger = logging.getLogger("pgregistry.discovery")

#: Most addresses taken from one poll of one strategy (more are ignored and logged).
MAX_FOUND: Final = 1024

#: The HKDF ``info`` of the multicast announcement key: nodes sharing a cookie share it.
ANNOUNCE_LABEL: Final = b"pgregistry discovery v1"

_MAGIC: Final = b"PGRD"
_VERSION: Final = 1
_HEAD: Final = struct.Struct("!4sBQ16sH")  # magic, version, time (ms since the epoch), nonce, id length
_MAC_LEN: Final = 32
_MAX_NONCES: Final = 100_000  # nonces remembered at most (the oldest are forgotten first)


def _format_address(host: str, port: int) -> str:
    """``host:port``, with an IPv6 address in brackets (as `parse_address` reads it)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _check_address(what: str, address: Any) -> str:
    if type(address) is not str:
        raise TypeError(f"{what} must be a 'host:port' str, got {short_repr(address)}")
    parse_address(address)
    return address


class Strategy(abc.ABC):
    """One way to find nodes; the base of `Static`, `Dns` and `Multicast`.

    A strategy is used by one `Discovery` at a time: it calls `open` once with its node
    (which may raise `ValueError` for a setting that cannot work with this node), then
    `poll` every ``interval`` seconds, then `close`.
    """

    kind: ClassVar[str] = "strategy"
    interval: float

    async def open(self, node: Node) -> None:  # noqa: B027 - optional: most strategies take nothing
        """Get ready to poll for `node` (bind sockets, build resolvers)."""

    @abc.abstractmethod
    async def poll(self) -> list[str]:
        """One lookup: the addresses (``"host:port"``) or node ids found.

        An exception is a failed lookup: the discovery counts and logs it and polls
        again after ``interval``. Cancellation ends the lookup and changes nothing.
        """

    def stat(self) -> dict[str, int]:
        """The strategy's own counters (added to the discovery's `Discovery.stat`)."""
        return {}

    def close(self) -> None:  # noqa: B027 - optional, as `open` is
        """Release what `open` took; the strategy is not polled again."""

    def __repr__(self) -> str:
        return f"<{type(self).__name__} every {self.interval:g} s>"


class Static(Strategy):
    """Seed addresses (``"host:port"`` or node ids), dialled every `interval` seconds
    while they are not connected: a seed that is not up yet is found once it starts."""

    kind = "static"

    def __init__(self, seeds: Iterable[str], *, interval: float = 2.0) -> None:
        if isinstance(seeds, str):
            raise TypeError("seeds must be a list of 'host:port' strs, not one str")
        self.seeds = [_check_address("a seed", seed) for seed in seeds]
        self.interval = check_seconds("interval", interval)

    async def poll(self) -> list[str]:
        return list(self.seeds)

    def __repr__(self) -> str:
        return f"<Static {self.seeds} every {self.interval:g} s>"


class Dns(Strategy):
    """The nodes a DNS name lists, polled every `interval` seconds (dnspython).

    ``record="A"`` or ``"AAAA"``: each address of `name` at `port` (required): a
    Kubernetes headless service, Docker Compose's service names. ``record="SRV"``: each
    SRV record's target and port (`port` must be None), the target's addresses taken
    from the answer's additional section or else looked up (``A``, then ``AAAA``): Consul
    (``web.service.consul``) or Kubernetes (``_port._tcp.svc.ns.svc.cluster.local``).

    `nameservers`: ``["host:port" or "host", ...]`` to ask; None reads the system's
    configuration (``/etc/resolv.conf``). Each lookup is bounded by `timeout` seconds.
    A name that does not exist or has no such records finds nothing (not a failure);
    a timeout or an unusable answer is a failed lookup.
    """

    kind = "dns"

    def __init__(self, name: str, *, port: int | None = None, record: str = "A",
                 nameservers: Sequence[str] | None = None, interval: float = 5.0, timeout: float = 2.0) -> None:
        if type(name) is not str or not name or not name.isprintable():
            raise TypeError(f"name must be a non-empty printable str, got {short_repr(name)}")
        if record not in ("A", "AAAA", "SRV"):
            raise ValueError(f"record must be 'A', 'AAAA' or 'SRV', got {short_repr(record)}")
        if record == "SRV":
            if port is not None:
                raise ValueError("port must be None with record='SRV': the SRV records give each node's port")
        else:
            if port is None:
                raise ValueError(f"record={record!r} needs a port: the records give only addresses")
            if type(port) is not int or not 0 < port <= 65535:
                raise ValueError(f"port must be an int in 1..65535, got {short_repr(port)}")
        self.name = name
        self.port = port
        self.record = record
        self.nameservers: list[tuple[str, int]] | None = None
        if nameservers is not None:
            if isinstance(nameservers, str):
                raise TypeError("nameservers must be a list of 'host:port' strs, not one str")
            self.nameservers = [self._nameserver(ns) for ns in nameservers]
            if not self.nameservers:
                raise ValueError("nameservers must not be empty (None reads the system's configuration)")
        self.interval = check_seconds("interval", interval)
        self.timeout = check_seconds("timeout", timeout)
        self._resolver: dns.asyncresolver.Resolver | None = None

    @staticmethod
    def _nameserver(text: Any) -> tuple[str, int]:
        if type(text) is not str or not text:
            raise TypeError(f"a nameserver must be a 'host:port' or 'host' str, got {short_repr(text)}")
        bare = text.strip("[]")
        with contextlib.suppress(ValueError):  # a bare address: the DNS port
            ipaddress.ip_address(bare)
            return bare, 53
        host, port = parse_address(text)
        ipaddress.ip_address(host)  # dnspython wants an address: ValueError for a name
        return host, port

    async def open(self, node: Node) -> None:
        resolver = dns.asyncresolver.Resolver(configure=self.nameservers is None)
        if self.nameservers is not None:
            resolver.nameservers = [dns.nameserver.Do53Nameserver(host, port) for host, port in self.nameservers]
        resolver.cache = None  # every poll asks: a record's TTL must not hide a new node
        self._resolver = resolver

    async def _resolve(self, name: str, record: str) -> dns.resolver.Answer | None:
        assert self._resolver is not None
        try:
            return await self._resolver.resolve(name, record, lifetime=self.timeout, raise_on_no_answer=False)
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return None

    async def poll(self) -> list[str]:
        answer = await self._resolve(self.name, self.record)
        if answer is None or answer.rrset is None:
            return []
        if self.record != "SRV":
            assert self.port is not None
            return [_format_address(rr.address, self.port) for rr in answer.rrset][:MAX_FOUND]
        additional: dict[str, list[str]] = {}
        for rrset in answer.response.additional:
            if rrset.rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA):
                additional.setdefault(rrset.name.to_text(), []).extend(rr.address for rr in rrset)
        found: list[str] = []
        for rr in sorted(answer.rrset, key=lambda rr: (rr.priority, -rr.weight)):
            if len(found) >= MAX_FOUND:
                break
            target = rr.target.to_text()
            if target == ".":
                continue  # "no such service here" (RFC 2782)
            hosts = additional.get(target)
            if hosts is None:
                hosts = []
                for family in ("A", "AAAA"):
                    targets = await self._resolve(target, family)
                    if targets is not None and targets.rrset is not None:
                        hosts = [r.address for r in targets.rrset]
                        break
            found.extend(_format_address(host, rr.port) for host in hosts)
        return found[:MAX_FOUND]

    def close(self) -> None:
        self._resolver = None

    def __repr__(self) -> str:
        what = f"{self.record} {self.name}" + (f" port {self.port}" if self.port is not None else "")
        return f"<Dns {what} every {self.interval:g} s>"


def encode_announcement(key: bytes, node_id: str, *, timestamp: float | None = None,
                        nonce: bytes | None = None) -> bytes:
    """The multicast announcement of `node_id`, authenticated with `key`.

    ``magic "PGRD", version 1, time (ms since the epoch, u64), nonce (16 bytes), id
    length (u16), id (UTF-8), HMAC-SHA256(key, everything before)``. `timestamp` and
    `nonce` default to now and 16 random bytes (tests give them to forge replays).
    """
    ident = node_id.encode("utf-8")
    stamp = int((time.time() if timestamp is None else timestamp) * 1000)
    head = _HEAD.pack(_MAGIC, _VERSION, stamp, secrets.token_bytes(16) if nonce is None else nonce, len(ident))
    body = head + ident
    return body + hmac.new(key, body, hashlib.sha256).digest()


def decode_announcement(key: bytes, data: bytes) -> tuple[str, float, bytes]:
    """``(node_id, timestamp, nonce)`` of an announcement whose MAC `key` verifies.

    `ValueError` for anything else: malformed, another version, a MAC that does not
    verify (another cookie, a forgery), an id that is not a node id. Checks neither the
    time nor the nonce (`Multicast` does).
    """
    if len(data) < _HEAD.size + _MAC_LEN:
        raise ValueError("too short")
    magic, version, stamp, nonce, length = _HEAD.unpack_from(data)
    if magic != _MAGIC:
        raise ValueError("not a pgregistry announcement")
    if version != _VERSION:
        raise ValueError(f"version {version}")
    if len(data) != _HEAD.size + length + _MAC_LEN:
        raise ValueError("wrong length")
    body, mac = data[:-_MAC_LEN], data[-_MAC_LEN:]
    if not hmac.compare_digest(mac, hmac.new(key, body, hashlib.sha256).digest()):
        raise ValueError("the MAC does not verify (another cookie?)")
    try:
        node_id = body[_HEAD.size:].decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError("the node id is not UTF-8") from None
    if "@" not in node_id or len(node_id) > MAX_NODE_ID_LEN or not node_id.isprintable():
        raise ValueError("not a node id")
    parse_address(node_id)
    return node_id, stamp / 1000, nonce


class _Receiver(asyncio.DatagramProtocol):
    def __init__(self, owner: Multicast) -> None:
        self.owner = owner

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.owner._received(data, addr)

    def error_received(self, exc: Exception) -> None:
        self.owner._log.warning("discovery: multicast socket error: %r", exc)


class Multicast(Strategy):
    """Announcements on a UDP multicast group of the LAN (IPv4).

    Every `interval` seconds the node sends its id to ``group:port`` and dials the
    nodes whose announcements it received since (the first poll listens for one whole
    interval before it ends). The socket joins the group on `interface` (an IPv4
    address of this host; None lets the kernel choose) and sends through it, with TTL 1
    (the announcements never leave the LAN) and loopback on (nodes of one host hear each
    other, and tests can run on ``127.0.0.1``).

    Announcements are authenticated with a key derived from the cookie by HKDF-SHA256
    (`ANNOUNCE_LABEL`): the cookie itself is neither sent nor used as a key, and a node
    without a shared cookie (TLS alone) is refused with `ValueError` at the start. An
    announcement is dropped, and nothing dialled, when its MAC does not verify (another
    cookie, a forgery), when its time is more than `max_age` seconds from this host's
    clock (a replay of an old one; hosts' clocks must agree within it), or when its
    nonce was seen within `max_age` (a replay of a recent one). Anyone on the LAN can
    still see which node ids announce themselves.
    """

    kind = "multicast"

    def __init__(self, group: str = "239.255.42.99", port: int = 45892, *, interface: str | None = None,
                 interval: float = 1.0, max_age: float = 30.0) -> None:
        try:
            address = ipaddress.IPv4Address(group)
        except ValueError:
            raise ValueError(f"group must be an IPv4 multicast address, got {short_repr(group)}") from None
        if not address.is_multicast:
            raise ValueError(f"group must be an IPv4 multicast address (224.0.0.0/4), got {group}")
        if type(port) is not int or not 0 < port <= 65535:
            raise ValueError(f"port must be an int in 1..65535, got {short_repr(port)}")
        if interface is not None:
            try:
                ipaddress.IPv4Address(interface)
            except ValueError:
                raise ValueError(f"interface must be an IPv4 address of this host, got {short_repr(interface)}") \
                    from None
        self.group = group
        self.port = port
        self.interface = interface
        self.interval = check_seconds("interval", interval)
        self.max_age = check_seconds("max_age", max_age)
        self._key = b""
        self._node_id = ""
        self._transport: asyncio.DatagramTransport | None = None
        self._heard: dict[str, None] = {}  # ids announced since the last poll, in order
        self._nonces: collections.OrderedDict[bytes, float] = collections.OrderedDict()  # nonce -> its time
        self._polls = 0
        self._log = LogBudget(logger, "discovery multicast")
        self.counters = dict.fromkeys(("received", "accepted", "rejected", "stale", "replayed"), 0)

    async def open(self, node: Node) -> None:
        self._key = node.derive_key(ANNOUNCE_LABEL)  # ValueError without a shared cookie
        self._node_id = node.id
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_UDP)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if sys.platform != "linux" and hasattr(socket, "SO_REUSEPORT"):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)  # BSDs share a group's port so
            # Bound to the group (where the OS allows), the socket gets nothing else sent to the port.
            sock.bind((self.group if sys.platform == "linux" else "", self.port))
            interface = socket.inet_aton(self.interface or "0.0.0.0")
            sock.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, socket.inet_aton(self.group) + interface)
            if self.interface is not None:
                sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, interface)
            sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 1)
            sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_LOOP, 1)
            sock.setblocking(False)
            transport, _ = await asyncio.get_running_loop().create_datagram_endpoint(
                lambda: _Receiver(self), sock=sock)
        except BaseException:
            sock.close()
            raise
        self._transport = transport

    def announcement(self) -> bytes:
        """A fresh announcement of this node (new time and nonce)."""
        return encode_announcement(self._key, self._node_id)

    async def poll(self) -> list[str]:
        transport = self._transport
        if transport is None:
            raise RuntimeError("multicast discovery is closed")
        transport.sendto(self.announcement(), (self.group, self.port))
        if self._polls == 0:
            await asyncio.sleep(self.interval)  # hear every node's next announcement once
        self._polls += 1
        heard = list(self._heard)
        self._heard.clear()
        return heard

    def _received(self, data: bytes, addr: Any) -> None:
        self.counters["received"] += 1
        try:
            node_id, stamp, nonce = decode_announcement(self._key, data)
        except (ValueError, struct.error) as exc:
            self.counters["rejected"] += 1
            self._log.warning("discovery: dropped an announcement from %s: %s", short_repr(addr, 80), exc)
            return
        if node_id == self._node_id:
            return  # our own, looped back
        now = time.time()
        if abs(now - stamp) > self.max_age:
            self.counters["stale"] += 1
            self._log.warning("discovery: dropped a stale announcement of %s from %s (%.0f s off this clock)",
                              node_id, short_repr(addr, 80), now - stamp)
            return
        nonces = self._nonces
        while nonces:
            oldest, at = next(iter(nonces.items()))
            if now - at <= self.max_age and len(nonces) < _MAX_NONCES:
                break
            del nonces[oldest]
        if nonce in nonces:
            self.counters["replayed"] += 1
            self._log.warning("discovery: dropped a replayed announcement of %s from %s", node_id,
                              short_repr(addr, 80))
            return
        nonces[nonce] = max(stamp, now)  # forgotten once no copy of it could pass the time check
        self.counters["accepted"] += 1
        if len(self._heard) < MAX_FOUND:
            self._heard[node_id] = None

    def stat(self) -> dict[str, int]:
        return dict(self.counters)

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()
            self._transport = None

    def __repr__(self) -> str:
        return f"<Multicast {self.group}:{self.port} on {self.interface or 'any'} every {self.interval:g} s>"


class _Run:
    """One strategy's loop in a discovery and its counters."""

    __slots__ = ("label", "strategy", "task", "counters", "settled")

    def __init__(self, label: str, strategy: Strategy) -> None:
        self.label = label
        self.strategy = strategy
        self.task: asyncio.Task[None] | None = None
        self.settled = False
        # polls: completed; found: addresses of the last poll; dialled: dials begun; connected/failures/
        # blocked: how they ended (blocked: a `disconnect` holds); lookup_errors: polls that failed.
        self.counters = dict.fromkeys(
            ("polls", "found", "dialled", "connected", "failures", "blocked", "lookup_errors"), 0)


class Discovery:
    """Finds nodes with `strategies` and connects `node` to them; see the module docstring.

    Make one with `start`. Attached to the node as a service, so `Node.stop` closes it.
    """

    def __init__(self, node: Node, strategies: Sequence[Strategy], service: str) -> None:
        self.node = node
        self.service = service
        labels: dict[str, int] = {}
        self._runs: list[_Run] = []
        for strategy in strategies:
            n = labels[strategy.kind] = labels.get(strategy.kind, 0) + 1
            self._runs.append(_Run(strategy.kind if n == 1 else f"{strategy.kind}{n}", strategy))
        self.settled = asyncio.Event()
        """Set once every strategy has completed a poll (its lookup and the dials it began)."""
        self.closed = False
        self._dialling: set[str] = set()  # addresses being dialled now, by any strategy
        self._ids: dict[str, str] = {}  # address -> the node id that answered there
        self._self_addresses: set[str] = set()  # addresses where this node itself answered
        self._log = LogBudget(logger, f"discovery {node.id}")

    @classmethod
    async def start(cls, node: Node, strategies: Iterable[Strategy], *, service: str = "discovery") -> Discovery:
        """Start discovering for the running `node` with `strategies` (at least one).

        Opens every strategy first: `ValueError` from one that cannot work here (e.g.
        `Multicast` on a node without a shared cookie) or `OSError` (a multicast socket
        refused) closes those already opened and propagates, and nothing runs. Then each
        strategy polls in its own task; this returns at once (await `settled` for the
        first round). `AlreadyStarted` if `service` is taken on the node; `RuntimeError`
        off the node's loop thread or when it is not running; `TypeError` for anything
        that is not a `Strategy`, `ValueError` for a strategy given twice.
        """
        if not isinstance(node, Node):
            raise TypeError(f"node must be a pgregistry Node, got {short_repr(node, 60)}")
        chosen = list(strategies)
        for strategy in chosen:
            if not isinstance(strategy, Strategy):
                raise TypeError(f"a strategy must be a discovery Strategy, got {short_repr(strategy, 60)}")
        if not chosen:
            raise ValueError("Discovery needs at least one strategy")
        if len({id(s) for s in chosen}) != len(chosen):
            raise ValueError("a strategy was given twice")
        node.require_loop_thread("Discovery.start")
        self = cls(node, chosen, service)
        node.attach_service(service, self)  # first: AlreadyStarted before any socket opens
        opened: list[Strategy] = []
        try:
            for strategy in chosen:
                await strategy.open(node)
                opened.append(strategy)
        except BaseException:
            for strategy in opened:
                strategy.close()
            self.closed = True
            node.detach_service(service)
            raise
        loop = asyncio.get_running_loop()
        for run in self._runs:
            run.task = loop.create_task(self._loop(run), name=f"pgregistry {node.id} discovery {run.label}")
        return self

    # -- the loops -----------------------------------------------------------------------

    async def _loop(self, run: _Run) -> None:
        strategy = run.strategy
        while not self.closed:
            try:
                found = await strategy.poll()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                run.counters["lookup_errors"] += 1
                self._log.warning("discovery %s: %s: lookup failed: %r", self.node.id, run.label, exc)
                found = []
            if not self.closed:
                await self._dial_found(run, found)
            run.counters["polls"] += 1
            if not run.settled:
                run.settled = True
                if all(r.settled for r in self._runs):
                    self.settled.set()
            await asyncio.sleep(strategy.interval)

    def _wanted(self, found: list[str]) -> list[str]:
        """The addresses of `found` to dial now: not this node, not connected, not being dialled."""
        node = self.node
        peers = set(node.peers())
        connected = {parse_address(peer) for peer in peers}
        me = (node.host, node.port)
        wanted: dict[str, None] = {}
        for address in found:
            try:
                host_port = parse_address(address)
            except (TypeError, ValueError):
                self._log.warning("discovery %s: ignored a malformed address %s", node.id, short_repr(address, 80))
                continue
            if (
                address == node.id
                or host_port == me
                or address in self._self_addresses
                or address in peers
                or host_port in connected
                or self._ids.get(address) in peers
                or address in self._dialling
            ):
                continue
            wanted[address] = None
        return list(wanted)

    async def _dial_found(self, run: _Run, found: list[str]) -> None:
        if len(found) > MAX_FOUND:
            self._log.warning("discovery %s: %s found %d addresses; only the first %d are taken", self.node.id,
                              run.label, len(found), MAX_FOUND)
            found = found[:MAX_FOUND]
        run.counters["found"] = len(found)
        wanted = self._wanted(found)
        if wanted:
            await asyncio.gather(*(self._dial(run, address) for address in wanted))

    async def _dial(self, run: _Run, address: str) -> None:
        """One non-explicit connect to `address`; whatever happens is counted, never raised.

        Bounded by the node's ``handshake_timeout`` and ``confirm_timeout`` once it holds
        a ``max_gossip_dials`` slot. Cancellation abandons it (see `Node.connect`).
        """
        counters = run.counters
        self._dialling.add(address)
        counters["dialled"] += 1
        try:
            peer = await self.node.connect(address, explicit=False)
        except asyncio.CancelledError:
            raise
        except Disconnected as exc:
            counters["blocked"] += 1
            self._ids[address] = exc.peer
            logger.debug("discovery %s: %s: not dialling %s: %s", self.node.id, run.label, address, exc)
        except HandshakeError as exc:
            if exc.kind == "self":
                self._self_addresses.add(address)  # this node answered there: never again
            else:
                counters["failures"] += 1
                self._log.warning("discovery %s: %s: dialling %s failed: %s", self.node.id, run.label, address, exc)
        except Exception as exc:
            counters["failures"] += 1
            self._log.warning("discovery %s: %s: dialling %s failed: %r", self.node.id, run.label, address, exc)
        else:
            counters["connected"] += 1
            self._ids[address] = peer
        finally:
            self._dialling.discard(address)

    # -- the service ---------------------------------------------------------------------

    def stat(self) -> dict[str, Any]:
        """Flat counters: ``settled``, ``strategies``, totals of ``polls``, ``dialled``,
        ``connected``, ``failures``, ``blocked``, and ``"<label>.<counter>"`` for each
        strategy (labels are the kinds, numbered from the second of a kind: ``dns``,
        ``dns2``): ``polls``, ``found`` (addresses of its last poll), ``dialled``,
        ``connected``, ``failures``, ``blocked`` (refused by a ``disconnect``),
        ``lookup_errors``, and the strategy's own (`Multicast`: ``received``,
        ``accepted``, ``rejected``, ``stale``, ``replayed``)."""
        out: dict[str, Any] = {"settled": self.settled.is_set(), "strategies": len(self._runs)}
        for total in ("polls", "dialled", "connected", "failures", "blocked"):
            out[total] = sum(run.counters[total] for run in self._runs)
        for run in self._runs:
            for key, value in (*run.counters.items(), *run.strategy.stat().items()):
                out[f"{run.label}.{key}"] = value
        return out

    def strategies(self) -> list[tuple[str, Strategy]]:
        """``(label, strategy)`` of each strategy, in the order given."""
        return [(run.label, run.strategy) for run in self._runs]

    async def drain(self, timeout: float) -> None:
        """Nothing is ever queued toward peers: returns at once."""

    def peer_up(self, peer: str) -> None:
        """Nothing to do: discovery skips connected peers at its next poll."""

    def peer_down(self, peer: str, reason: str) -> None:
        """Nothing to do: the mesh redials lost members; discovery never drops one."""

    def peer_message(self, peer: str, payload: Any) -> None:
        """Discovery has no protocol between nodes: whatever a peer sends is dropped."""
        self._log.warning("discovery %s: dropped a message from %s: %s", self.node.id, peer, short_repr(payload, 80))

    def peer_absent(self, peer: str) -> None:
        """Never asked: discovery sends nothing to peers."""

    def close(self) -> None:
        """Stop at once (the node calls it when it stops): the loops are cancelled (dials
        under way are abandoned, see `Node.connect`) and the strategies closed."""
        if self.closed:
            return
        self.closed = True
        for run in self._runs:
            if run.task is not None:
                run.task.cancel()
            run.strategy.close()

    async def stop(self) -> None:
        """`close`, wait for the loops to end, and detach from the node. Idempotent."""
        self.close()
        tasks = [run.task for run in self._runs if run.task is not None]
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        if self.node.service(self.service) is self:
            self.node.detach_service(self.service)


def parse_strategy(spec: str) -> Strategy:
    """A strategy from a command-line spec (for ``pgregistry node --discover SPEC``).

    * ``static:HOST:PORT[,HOST:PORT...]``
    * ``dns:NAME:PORT`` (A records), ``dns6:NAME:PORT`` (AAAA), ``srv:NAME``
    * ``multicast`` or ``multicast:GROUP:PORT``, optionally ``@INTERFACE`` at the end

    A DNS spec may end with ``@NAMESERVER[:PORT]`` (else the system's resolver).
    `ValueError` for anything else.
    """
    if type(spec) is not str:
        raise TypeError(f"a discovery spec must be a str, got {short_repr(spec)}")
    kind, _, rest = spec.partition(":")
    at = ""
    if kind.startswith("multicast@"):
        kind, at = "multicast", kind[len("multicast@"):]
    elif kind in ("dns", "dns6", "srv", "multicast") and "@" in rest:
        rest, _, at = rest.rpartition("@")
    try:
        if kind == "static" and rest:
            return Static(rest.split(","))
        if kind in ("dns", "dns6") and rest:
            name, _, port = rest.rpartition(":")
            if not name or not port.isdigit():
                raise ValueError("needs NAME:PORT")
            return Dns(name, port=int(port), record="A" if kind == "dns" else "AAAA",
                       nameservers=[at] if at else None)
        if kind == "srv" and rest:
            return Dns(rest, record="SRV", nameservers=[at] if at else None)
        if kind == "multicast":
            if not rest:
                return Multicast(interface=at or None)
            group, _, port = rest.rpartition(":")
            if not group or not port.isdigit():
                raise ValueError("needs GROUP:PORT")
            return Multicast(group, int(port), interface=at or None)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"discovery spec {spec!r}: {exc}") from None
    raise ValueError(f"discovery spec {spec!r}: expected static:HOST:PORT,..., dns:NAME:PORT, dns6:NAME:PORT, "
                     "srv:NAME or multicast[:GROUP:PORT][@INTERFACE]")
