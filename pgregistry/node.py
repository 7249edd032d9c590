"""`Node`: one member of a cluster (layer 3): processes, names, peers, remote messaging.

A node runs on one asyncio event loop. `Node.start` (or ``async with node``) binds the
node's `pgregistry.transport.Endpoint` first (so the id carries the real port:
``name@host:port``), picks a new random *creation* (so pids of an earlier incarnation
never match), installs its remote messaging as its process runtime's router, and makes
the calling task a process of the node. Writes (`spawn`, names, `connect`, services)
must run on the loop's thread. `stop` kills every process, closes the attached
services, says ``leave`` to every peer and closes the endpoint.

Like an Erlang node, it is made of two halves it composes: the mesh
(`pgregistry.mesh`: the confirm step of each connection after the transport
handshake, membership gossip, redials) and remote messaging (`pgregistry.remote`: sends,
calls, monitors, exits and service messages to and from other nodes). Everything between
nodes travels over the endpoint's authenticated connections, one per pair of nodes, FIFO;
nodes in one event loop still talk only through TCP. Nothing a peer sends is executed.

When a peer is lost: it leaves `peers`, the monitors of its processes fire
``"noconnection"`` (a pending `call` raises `NoProcess`), each service's ``peer_down``
runs, then node monitors get ``NodeDown(peer_id, reason)``. When a peer comes up: it
enters `peers`, node monitors get ``NodeUp(peer_id)``, then each service's ``peer_up``
runs. NodeDown reasons: ``"disconnect"``, ``"leave"``, ``"restarted"``, `REPLACED`, or
the transport's (``"timeout"``, ``"closed by peer"``, ``"connection lost: ..."``).

The full protocol is in docs/protocol.md.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import ipaddress
import logging
import os
import secrets
import ssl as _ssl
import threading
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from .checks import check_int, check_liveness, check_max_frame, check_seconds, parse_address
from .errors import AlreadyStarted, NotLocal
from .events import NodeDown, NodeUp
from .handshake import hkdf_sha256
from .mesh import GOSSIP_ATTEMPTS, MEMBERS_PER_MESSAGE, REPLACED, Mesh, PeerRecord
from .process import Process, current_process, task_process
from .remote import Remote
from .runtime import Runtime
from .service import Service
from .terms import Pid, short_repr
from .transport import Connection, Endpoint
from .wire import MAX_FRAME

__all__ = ["Node", "REPLACED", "GOSSIP_ATTEMPTS", "MEMBERS_PER_MESSAGE"]

logger = logging.getLogger("pgregistry.node")

#: How long `Node.stop` waits for the cancelled tasks of killed processes to unwind.
STOP_GRACE = 5.0

_NEW, _STARTING, _RUNNING, _STOPPING, _STOPPED = "new", "starting", "running", "stopping", "stopped"
_DRAINING = "draining"  # a graceful stop's first step: services still write (names release) but no new peer

_FORBIDDEN_IN_NAME = frozenset("@:/ \t\r\n")


def _check_text(what: str, value: Any, forbidden: frozenset[str]) -> str:
    if type(value) is not str:
        raise TypeError(f"{what} must be a str, got {short_repr(value)}")
    if not value or not value.isprintable() or any(ch in forbidden for ch in value):
        shown = "".join(sorted(forbidden - {"\t", "\r", "\n"}))
        raise ValueError(f"{what} must be non-empty, printable and free of {shown!r}, got {short_repr(value)}")
    return value


def down_reason_label(reason: str) -> str:
    """A NodeDown reason without its variable detail, for counting: the text before the
    first ``":"`` or ``" ("`` (``"connection lost: [Errno 104] ..."`` counts as
    ``"connection lost"``), at most 40 characters."""
    return reason.split(":", 1)[0].split(" (", 1)[0].strip()[:40] or "unknown"


def _unspecified(host: str) -> bool:
    """Whether `host` is an unspecified address (``0.0.0.0``, ``::``): every address, none to dial."""
    try:
        return ipaddress.ip_address(host.strip("[]")).is_unspecified
    except ValueError:
        return False


def _new_creation() -> int:
    """A random non-zero 32-bit creation for a new incarnation of a node."""
    while True:
        creation = secrets.randbits(32)
        if creation:
            return creation


class Node:
    """A node: an id, its processes and local names, its peers, and attached services.

    ``Node(name, host=, port=, advertise_host=, cookie=, ssl=, client_ssl=, tick_interval=,
    down_after=, max_frame=, max_members_per_message=, max_gossip_peers=, max_gossip_dials=)``:
    every argument is checked here (`TypeError` for a wrong type, `ValueError` for a bad
    value, each naming the argument). ``cookie=None`` takes ``PGREGISTRY_COOKIE`` from
    the environment, else a random cookie (then nobody can connect). ``port=0`` binds an
    ephemeral port, which the id then carries.

    ``advertise_host``: the host in the node's id, ``name@advertise_host:port``, which
    peers dial; by default ``host``, the address the node listens on. Give it when they
    differ, as when listening on every address: ``host="0.0.0.0"`` or ``"::"`` without
    ``advertise_host`` raises `ValueError` (peers could not dial such an id back).

    TLS: ``ssl`` is the context the node listens with; connections it dials use
    ``client_ssl``, or ``ssl`` when ``client_ssl`` is None, in which case ``ssl`` must be
    usable in both directions (``ssl.SSLContext(ssl.PROTOCOL_TLS)`` with a certificate
    and CA loaded). A client-only ``ssl`` or a server-only context left to dial with
    raises `ValueError` here.

    Trust model. With the cookie alone, node ids are asserted, not proven (as in
    Erlang): any holder of the cookie may connect under any node id, even a live node's
    with a new creation (which then looks like a restart of that node). With TLS that
    verifies certificates, a peer's id must be proven by its certificate, or the
    connection is refused: one of the certificate's subjectAltName DNS names or subject
    commonNames must equal the node's name (the part of its id before ``"@"``) or its
    whole id, exactly. Give each node a certificate naming it, and each node of a
    cluster its own name; use mutual TLS (a server context with ``verify_mode =
    ssl.CERT_REQUIRED``) so that the ids of diallers are proven too. See "Trust model"
    in docs/protocol.md.

    ``tick_interval`` / ``down_after``: a peer from which nothing (not even a tick) was
    heard for ``down_after`` seconds is down; ``down_after`` must be at least twice
    ``tick_interval``. These attributes may be changed before `start`:
    ``handshake_timeout`` (``max(1, down_after)``): the transport handshake of a
    connection must end within it; ``confirm_timeout`` (``max(1, down_after)``): the
    node-level confirm step that follows (which of the pair's connections is the live
    one) must end within it, or the connection is closed; ``reconnect_initial``
    (``tick_interval``) and ``reconnect_max`` (``max(2 * down_after, tick_interval)``):
    the first and the longest delay between redials of a lost peer.

    ``max_frame``: the largest message (encoded, in bytes) this node accepts from a peer,
    announced to each peer at the handshake (`pgregistry.wire.MAX_FRAME` by default); at
    least `pgregistry.transport.MIN_MAX_FRAME` (64 KiB), which is also the smallest limit
    a peer may announce.

    Membership gossip is bounded. ``max_members_per_message`` (1024; at least
    `MEMBERS_PER_MESSAGE`, the most a node lists in one message): ids beyond it in one
    ``members`` message are ignored. ``max_gossip_peers`` (1024): most nodes known only
    through gossip and not reached yet, held at once; ids gossiped while that many are
    held are ignored (the nodes behind them dial this one when they join anyway).
    ``max_gossip_dials`` (32): most dials to such nodes under way at once, each holding
    its slot until its connection is confirmed or has failed. Each such node is dialled
    at most `GOSSIP_ATTEMPTS` times, however often it is gossiped again meanwhile, and
    then forgotten. Nodes this node was ever connected to are not subject to these caps.

    Peers are trusted: any holder of the cookie can tell this node to dial whatever
    host and port a node id in its ``members`` names (as in Erlang). The caps above
    bound how many such dials there are and how many records they leave; with TLS and
    certificate verification, a dialled address must also prove the node id it was
    dialled for, so gossip cannot make this node talk to anything but a cluster member.
    """

    runtime: Runtime

    def __init__(
        self,
        name: str,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        advertise_host: str | None = None,
        cookie: str | None = None,
        ssl: _ssl.SSLContext | None = None,
        client_ssl: _ssl.SSLContext | None = None,
        tick_interval: float = 1.0,
        down_after: float = 5.0,
        max_frame: int = MAX_FRAME,
        max_members_per_message: int = 1024,
        max_gossip_peers: int = 1024,
        max_gossip_dials: int = 32,
    ) -> None:
        self.name = _check_text("name", name, _FORBIDDEN_IN_NAME)
        self.host = _check_text("host", host, frozenset("@/ \t\r\n"))
        if advertise_host is None:
            if _unspecified(host):
                raise ValueError(
                    f"host {host!r} means every address of this machine: peers could not dial the id "
                    f"{name}@{host}:port back; give advertise_host, the host peers reach this node at"
                )
            advertise_host = host
        self.advertise_host = _check_text("advertise_host", advertise_host, frozenset("@/ \t\r\n"))
        if type(port) is not int:
            raise TypeError(f"port must be an int, got {short_repr(port)}")
        if not 0 <= port <= 65535:
            raise ValueError(f"port must be in 0..65535, got {short_repr(port)}")
        self.port = port
        shared_cookie = True  # False for the random cookie nobody else knows
        if cookie is None:
            cookie = os.environ.get("PGREGISTRY_COOKIE")
            if not cookie:
                cookie, shared_cookie = secrets.token_urlsafe(32), False
        elif type(cookie) is not str:
            raise TypeError(f"cookie must be a str or None, got {type(cookie).__name__}")
        elif not cookie:
            raise ValueError("cookie must not be empty")
        for what, context in (("ssl", ssl), ("client_ssl", client_ssl)):
            if context is not None and not isinstance(context, _ssl.SSLContext):
                raise TypeError(f"{what} must be an ssl.SSLContext or None, got {short_repr(context)}")
        if ssl is None and client_ssl is not None:
            raise ValueError("client_ssl without ssl: give ssl (the context to listen with) too, or neither")
        if ssl is not None and ssl.protocol == _ssl.PROTOCOL_TLS_CLIENT:
            raise ValueError(
                "ssl is a client-only context (PROTOCOL_TLS_CLIENT) but the node listens with it: give a "
                "server context as ssl and this one as client_ssl, or one ssl.SSLContext(ssl.PROTOCOL_TLS)"
            )
        if ssl is not None and client_ssl is None and ssl.protocol == _ssl.PROTOCOL_TLS_SERVER:
            raise ValueError(
                "ssl is a server-only context (PROTOCOL_TLS_SERVER) and no client_ssl was given to dial "
                "peers with: give client_ssl, or one ssl.SSLContext(ssl.PROTOCOL_TLS) usable both ways"
            )
        if client_ssl is not None and client_ssl.protocol == _ssl.PROTOCOL_TLS_SERVER:
            raise ValueError("client_ssl is a server-only context (PROTOCOL_TLS_SERVER); it is used to dial peers")
        self.ssl = ssl
        self.client_ssl = client_ssl
        # Kept only to derive other keys from (`derive_key`); never sent or logged.
        self._cookie_key: bytes | None = cookie.encode("utf-8", "surrogatepass") if shared_cookie else None
        self.tick_interval, self.down_after = check_liveness(tick_interval, down_after)
        self.max_frame = check_max_frame(max_frame)
        self.max_members_per_message = check_int(
            "max_members_per_message", max_members_per_message, MEMBERS_PER_MESSAGE, 1_000_000
        )
        self.max_gossip_peers = check_int("max_gossip_peers", max_gossip_peers, 1, 1_000_000)
        self.max_gossip_dials = check_int("max_gossip_dials", max_gossip_dials, 1, 65_536)
        self.handshake_timeout = max(1.0, self.down_after)
        self.confirm_timeout = max(1.0, self.down_after)
        self.reconnect_initial = self.tick_interval
        self.reconnect_max = max(2 * self.down_after, self.tick_interval)
        self.runtime = Runtime(self.id)
        self._state = _NEW
        self._started = asyncio.Event()
        self._stopped = asyncio.Event()
        self._services: dict[str, Service] = {}
        self._node_monitors: dict[Pid, None] = {}
        self._down_reasons: dict[str, int] = {}  # peers lost since start, by `down_reason_label`
        self._monitor_hook_key = object()  # exit-hook key of monitor_nodes, unique per node
        make_endpoint = functools.partial(
            Endpoint, self.name, cookie, host=self.host, advertise_host=self.advertise_host, port=port,
            ssl=ssl, client_ssl=client_ssl,
            tick_interval=self.tick_interval, down_after=self.down_after, max_frame=self.max_frame,
            handshake_timeout=self.handshake_timeout,
        )
        self._mesh = Mesh(
            self.id,
            make_endpoint,
            max_members_per_message=self.max_members_per_message,
            max_gossip_peers=self.max_gossip_peers,
            max_gossip_dials=self.max_gossip_dials,
            running=lambda: self._state == _RUNNING or self._state == _DRAINING,
            on_peer_up=self._peer_up,
            on_peer_down=self._peer_down,
        )
        self._remote = Remote(self._mesh, self.runtime, self._services)
        self._mesh.route(self._remote.handlers)
        # The mesh's own objects, under the names tests and tools have always read.
        self._endpoint: Endpoint = self._mesh.endpoint
        self._peers: dict[str, PeerRecord] = self._mesh.peers

    def __repr__(self) -> str:
        return f"<Node {self.id} {self._state} {len(self._mesh.up)} peers>"

    @property
    def id(self) -> str:
        """``"name@advertise_host:port"`` (the real port once started)."""
        return f"{self.name}@{self.advertise_host}:{self.port}"

    @property
    def creation(self) -> int:
        """This incarnation's creation (0 before `start`)."""
        return self.runtime.creation

    @property
    def loop_thread(self) -> int | None:
        """The ident of the thread running the node's loop (None before `start`)."""
        return self.runtime.loop_thread

    @property
    def running(self) -> bool:
        """True between `start` and `stop` (and while a graceful stop drains the services)."""
        return self._state == _RUNNING or self._state == _DRAINING

    # -- lifecycle ------------------------------------------------------------------

    async def __aenter__(self) -> Node:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        await self.stop()

    async def start(self) -> None:
        """Listen, bind the node to the running loop and make the calling task its process.

        The endpoint is bound first, so `id` carries the real port before the first pid
        is made. A calling task that is a spawned process (of any node) stays that
        process; any other task becomes a process of this node until the node stops or
        the task ends. A node starts once: `RuntimeError` if it was started before
        (also after a failed start, e.g. `OSError` for a port in use).
        """
        if self._state != _NEW:
            raise RuntimeError(f"node {self.id} was already started; make a new Node to start again")
        self._state = _STARTING
        loop = asyncio.get_running_loop()
        runtime = self.runtime
        creation = _new_creation()
        try:
            timeouts = {what: check_seconds(what, getattr(self, what))
                        for what in ("handshake_timeout", "confirm_timeout", "reconnect_initial", "reconnect_max")}
        except (TypeError, ValueError):
            self._state = _NEW
            raise
        try:
            port = await self._mesh.start(creation, **timeouts)
        except BaseException:
            self._state = _STOPPED
            self._started.set()
            self._stopped.set()
            raise
        self.port = port
        self._mesh.set_id(self.id)
        runtime.node_id = self.id
        runtime.creation = creation
        runtime.loop = loop
        runtime.loop_thread = threading.get_ident()
        runtime.router = self._remote
        self._state = _RUNNING
        self._started.set()
        task = asyncio.current_task()
        if task is not None:
            current = task_process(task)
            if current is None or current.adopted:
                runtime.adopt(task)

    async def stop(self, drain_timeout: float | None = None) -> None:
        """Kill every process, close every service, leave the cluster, close the endpoint.

        Exit hooks run for each process (reason ``"killed"``; `Server.terminate` does not
        run); remote watchers get their ``Down``. The node then waits up to `STOP_GRACE`
        seconds for the killed tasks to unwind, calls ``close()`` on each service
        (awaiting it if it returns an awaitable; errors are logged), tells every peer it
        leaves (so they do not redial it) and closes the endpoint (queued output is
        written first). From the start of a stop, new connections are refused with
        ``"leaving"``.

        With `drain_timeout` (seconds), the stop is graceful, and the order changes so
        that peers lose nothing they could have had and purge this node in one step:
        first every service's ``drain`` runs (what is under way toward peers is sent:
        queued registry changes, sync rounds, releases of names), within `drain_timeout`
        in all (a service that takes longer is logged and left); then the services close
        while the peers are still connected (each registry says ``bye``, so its peers
        drop this node's entries at once instead of one leave per entry); then the node
        leaves the mesh; only then are the processes killed, with nothing left to tell.

        Idempotent: stopping a stopped or never-started node does nothing, and a
        concurrent `stop` waits for the first one. If `stop` is cancelled while waiting,
        the processes are already dead and the services are closed before the
        cancellation propagates.
        """
        if self._state == _NEW:
            self._state = _STOPPED
            self._started.set()
            self._stopped.set()
            return
        if self._state == _STARTING:
            await self._started.wait()
        if self._state == _STOPPED:
            return
        if self._state in (_STOPPING, _DRAINING):
            await self._stopped.wait()
            return
        if threading.get_ident() != self.runtime.loop_thread:
            raise RuntimeError(f"stop of node {self.id} must run on the node's event loop thread")
        self._mesh.leaving = True
        try:
            if drain_timeout is not None:
                timeout = check_seconds("drain_timeout", drain_timeout)
                self._state = _DRAINING  # the services may still write: a names release, a last flush
                try:
                    await self._drain_services(timeout)
                finally:
                    self._state = _STOPPING
                await self._close_services()
                await self._mesh.close()
            self._state = _STOPPING
            tasks = self.runtime.close(exclude=asyncio.current_task())
            if tasks:
                _, still_running = await asyncio.wait(tasks, timeout=STOP_GRACE)
                for task in still_running:
                    logger.warning("node %s: %r ignored its cancellation and is still running", self.id, task)
        finally:
            try:
                await self._close_services()
                await self._mesh.close()
            finally:
                self._state = _STOPPED
                self._stopped.set()

    async def _drain_services(self, timeout: float) -> None:
        """Run every service's ``drain`` at once, within `timeout` seconds in all."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        drains = {name: service.drain for name, service in self._services.items() if hasattr(service, "drain")}

        async def drain(name: str, fn: Callable[[float], Awaitable[None]]) -> None:
            try:
                await fn(max(0.0, deadline - loop.time()))
            except Exception as exc:  # TimeoutError included: the stop goes on without it
                logger.warning("node %s: draining service %r: %s", self.id, name, exc or type(exc).__name__)

        if drains:
            await asyncio.gather(*(drain(name, fn) for name, fn in drains.items()))

    async def _close_services(self) -> None:
        services = list(self._services.items())
        self._services.clear()
        for name, service in services:
            await self._close_service(name, service)

    async def _close_service(self, name: str, service: Service) -> None:
        try:
            closed = service.close()
            if inspect.isawaitable(closed):
                await closed
        except Exception:
            logger.exception("node %s: closing service %r failed", self.id, name)

    # -- processes ------------------------------------------------------------------

    def spawn(self, fn: Callable[..., Awaitable[Any]], /, *args: Any, **kwargs: Any) -> Pid:
        """Run ``fn(*args, **kwargs)`` as a new process of this node; return its pid at once.

        Messages sent before the process first runs are kept. `fn` must be an async
        callable (`TypeError`). `RuntimeError` off the node's loop thread, before
        `start` or after `stop`.
        """
        return self.runtime.spawn(fn, *args, **kwargs)

    def register_name(self, name: str, pid: Pid) -> None:
        """Register the live local `pid` under the local `name` (like ``erlang:register``).

        `AlreadyStarted` (``.pid`` the holder) if the name is taken; `ValueError` if
        `pid` already has a name or `name` is empty or too long; `TypeError` for a
        non-str name or a non-pid; `NotLocal` for another node's pid; `NoProcess` for a
        dead pid. The name is released when the process exits. Other nodes reach it as
        ``(name, node.id)``.
        """
        self.runtime.register_name(name, pid)

    def unregister_name(self, name: str) -> None:
        """Release the local `name`; nothing happens if nobody holds it."""
        self.runtime.unregister_name(name)

    def whereis(self, name: str) -> Pid | None:
        """The pid registered under the local `name`, or None. Callable from any thread."""
        return self.runtime.whereis(name)

    # -- membership -----------------------------------------------------------------

    def peers(self) -> list[str]:
        """The ids of the connected peer nodes, in the order they connected. Any thread."""
        # list() copies the values in one C call, so another thread's loop cannot change
        # the dict under the iteration.
        return [peer.id for peer in list(self._mesh.up.values())]

    async def connect(self, address: str, *, explicit: bool = True) -> str:
        """Connect to the node at `address` (``"host:port"`` or a node id); return its id.

        Connecting to one member joins the whole cluster: the nodes then connect to every
        member they did not know (this returns before that). A peer already connected
        returns its id at once. An explicit connect lifts a `disconnect` block on both
        sides, and the address given is remembered as the way to reach that node
        (reconnects use it). Raises `AuthenticationError` when the cookies differ,
        `OSError`/`ConnectionError` when the node cannot be reached or refuses,
        `TimeoutError` after ``handshake_timeout`` (the transport handshake) or
        ``confirm_timeout`` (the confirm step that follows), `ValueError` for a
        malformed address or this node's own id, `RuntimeError` off the loop thread or
        when not running. Cancellation abandons the wait; a connection already made
        may still be confirmed.

        ``explicit=False`` is a connect on behalf of discovery (`pgregistry.discovery`)
        rather than of a user: it lifts no block, so a `disconnect` holds against it
        (`pgregistry.mesh.Disconnected`, a `ConnectionError`, when either side blocks
        the pair), and it takes one of the ``max_gossip_dials`` slots for as long as the
        dial and its confirm step last (waiting for a free slot first, without bound).
        """
        self.require_loop_thread("connect")
        if type(address) is not str:
            raise TypeError(f"connect: address must be a str, got {short_repr(address)}")
        if type(explicit) is not bool:
            raise TypeError(f"connect: explicit must be a bool, got {short_repr(explicit)}")
        return await self._mesh.connect(address, explicit=explicit)

    def derive_key(self, info: bytes, length: int = 32) -> bytes:
        """A key for the purpose `info`, derived from the cookie by HKDF-SHA256 (RFC 5869).

        Nodes that share the cookie derive the same key; the key reveals nothing of the
        cookie, and keys for different `info` are unrelated. `ValueError` when this
        node has no shared cookie (none given and no ``PGREGISTRY_COOKIE``, e.g. a node
        that relies on TLS alone: its cookie is random and known to nobody else).
        """
        if type(info) is not bytes:
            raise TypeError(f"derive_key: info must be bytes, got {short_repr(info)}")
        if self._cookie_key is None:
            raise ValueError(
                f"node {self.id} has no shared cookie (none given and no PGREGISTRY_COOKIE): "
                "there is no secret to derive a key from"
            )
        return hkdf_sha256(self._cookie_key, info=info, length=length)

    async def disconnect(self, peer: str) -> None:
        """Disconnect from `peer` (a node id), telling it; neither side redials the other.

        The block holds on both sides, against reconnects and against ``members``
        gossip from third nodes, until either node calls `connect` on the other. A peer
        that is not connected is blocked too (it learns it when it next dials). Returns
        once the connection is closed (bounded by ``confirm_timeout``).
        """
        self.require_loop_thread("disconnect")
        if type(peer) is not str:
            raise TypeError(f"disconnect: peer must be a node id str, got {short_repr(peer)}")
        if peer == self.id:
            raise ValueError(f"disconnect: {peer} is this node")
        await self._mesh.disconnect(peer)

    def add_route(self, peer: str, address: str) -> None:
        """Reach the node `peer` (an id) at `address` (``"host:port"``) from now on.

        Used for every later dial to that node: reconnects and ``members`` gossip (not
        an already open connection). For NAT, proxies, and tests that put a
        `pgregistry.testing.LinkProxy` in each direction of a link.
        """
        self.require_loop_thread("add_route")
        if type(peer) is not str or "@" not in peer:
            raise TypeError(f"add_route: peer must be a node id 'name@host:port', got {short_repr(peer)}")
        parse_address(peer)
        parse_address(address)
        self._mesh.peer(peer).route = address

    def monitor_nodes(self) -> None:
        """Make the calling process receive ``NodeUp(node)`` and ``NodeDown(node, reason)``.

        For every peer that comes up or goes down from now on; calling it again changes
        nothing. Ends when the process exits or calls `demonitor_nodes`. The caller must
        be a process of this node (`NotLocal` otherwise).
        """
        proc = self._calling_process("monitor_nodes")
        if proc.pid in self._node_monitors:
            return
        proc.add_exit_hook(self._monitor_hook_key, self._node_monitor_exited)
        self._node_monitors[proc.pid] = None

    def demonitor_nodes(self) -> None:
        """Stop `monitor_nodes` for the calling process (nothing if it did not monitor)."""
        proc = self._calling_process("demonitor_nodes")
        if self._node_monitors.pop(proc.pid, 0) is None:
            proc.remove_exit_hook(self._monitor_hook_key)

    def _node_monitor_exited(self, pid: Pid, reason: Any) -> None:
        self._node_monitors.pop(pid, None)

    def _calling_process(self, what: str) -> Process:
        self.require_loop_thread(what)
        proc = current_process()
        if proc.runtime is not self.runtime:
            raise NotLocal(proc.pid, self.id)
        return proc

    def connection_stats(self, peer: str) -> dict[str, Any] | None:
        """Counters of the connection to `peer`, or None if it is not connected.

        ``{"bytes_sent", "bytes_received", "messages_sent", "messages_received",
        "initiated", "creation"}``; bytes include ticks and the handshake.
        """
        record = self._peers.get(peer)
        conn = None if record is None else record.conn
        if conn is None or record is None:
            return None
        return {
            "bytes_sent": conn.bytes_sent,
            "bytes_received": conn.bytes_received,
            "messages_sent": conn.messages_sent,
            "messages_received": conn.messages_received,
            "initiated": conn.initiated,
            "creation": record.creation,
        }

    @property
    def counters(self) -> dict[str, dict[str, int]]:
        """Counts of rare events since `start`, by reason, for metrics (copies).

        ``"node_down"``: peers lost, by `down_reason_label` of the NodeDown reason;
        ``"handshake_failures"`` and ``"frames_rejected"``: the endpoint's
        (`Endpoint.handshake_failures`, `Endpoint.frames_rejected`).
        """
        return {
            "node_down": dict(self._down_reasons),
            "handshake_failures": self._endpoint.handshake_failures,
            "frames_rejected": self._endpoint.frames_rejected,
        }

    # -- services -------------------------------------------------------------------

    def attach_service(self, name: str, service: Service) -> None:
        """Attach `service` (e.g. a registry scope) under `name`; closed when the node stops.

        The node calls the methods of `pgregistry.service.Service` that `service`
        defines (any may be missing), on the loop thread, exceptions logged:
        ``peer_up(peer_id)`` / ``peer_down(peer_id, reason)`` when a peer connection is
        confirmed or lost after the attach (a service attached while peers are
        connected reads `peers` for those), ``peer_message(peer_id, payload)`` for each
        `send_service` message a peer addressed to `name`, ``peer_absent(peer_id)``
        when a peer answers such a message with "no service of that name runs here",
        and ``close()`` when the node stops. `AlreadyStarted` (``.pid`` the attached
        service) if `name` is taken; `RuntimeError` off the loop thread or when the
        node is not running.
        """
        self.require_loop_thread("attach_service")
        if type(name) is not str:
            raise TypeError(f"attach_service: name must be a str, got {short_repr(name)}")
        if not name:
            raise ValueError("attach_service: name must not be empty")
        existing = self._services.get(name)
        if existing is not None:
            raise AlreadyStarted(existing, name)
        self._services[name] = service

    def detach_service(self, name: str) -> None:
        """Forget the service under `name` without closing it; nothing if there is none.

        Allowed while the node stops (a service may detach itself from ``close``);
        `RuntimeError` off the loop thread.
        """
        loop_thread = self.runtime.loop_thread
        if loop_thread is not None and threading.get_ident() != loop_thread:
            raise RuntimeError("detach_service must be called on the node's event loop thread")
        self._services.pop(name, None)

    def serve_tools(self, handler: Callable[[Connection, Any], None] | None) -> None:
        """Accept operator tools' connections and give each message of theirs to `handler`.

        A tool proves the cookie like a peer, then opens with ``["tool", TOOL_VERSION]``
        instead of proposing itself: it never becomes a peer (no ``NodeUp``, no
        ``peer_up``, never listed in ``members``). ``handler(conn, term)`` runs on the loop
        thread and answers with ``conn.send``; None refuses tools again (the default).
        """
        self.require_loop_thread("serve_tools")
        if handler is not None and not callable(handler):
            raise TypeError(f"serve_tools: handler must be callable or None, got {short_repr(handler)}")
        self._mesh.on_tool = handler

    def services(self) -> dict[str, Service]:
        """The attached services by name (a copy)."""
        return dict(self._services)

    def service(self, name: str) -> Service | None:
        """The service attached under `name`, or None."""
        return self._services.get(name)

    def service_names(self) -> list[str]:
        """The names of the attached services, in attach order. Any thread."""
        return list(self._services)

    def send_service(self, peer: str, name: str, payload: Any, *, trusted: bool = False) -> bool:
        """Send `payload` (a term) to the service `name` on the connected node `peer`.

        Queued on the peer's connection, FIFO with every other message to it; the peer
        calls ``peer_message(this node's id, payload)`` of its service `name` (or drops
        it if there is none). Returns False, sending nothing, if `peer` is not
        connected. `TypeError` if `payload` is not a term, `ValueError` if it exceeds
        the peer's frame limit. ``trusted=True`` skips the check that `payload` is a
        term (`wire.encode_trusted`): for payloads built from already checked terms.
        """
        return self._remote.send_service(peer, name, payload, trusted=trusted)

    def broadcast_service(self, name: str, payload: Any, peers: Iterable[str] | None = None, *,
                          trusted: bool = False, too_big: list[str] | None = None) -> int:
        """`send_service` to every connected peer (or those of `peers`); encoded once.

        Returns how many peers it was queued to. A peer whose frame limit the message
        exceeds does not stop the others: with a `too_big` list its id is appended there
        (for the caller to split the message for it alone) and the rest get the message;
        without one, `ValueError` and nothing is sent to anyone.
        """
        return self._remote.broadcast_service(name, payload, peers, trusted=trusted, too_big=too_big)

    async def drain_peer(self, peer: str) -> bool:
        """Wait while the connection to `peer` has more output queued than it takes.

        For bulk senders: send a batch, ``await drain_peer(peer)``, repeat. Returns True
        when the connection's buffer is below its low-water mark, False if `peer` is not
        connected or its connection closes meanwhile (nothing raised). Cancellation
        leaves the connection as it is.
        """
        return await self._remote.drain_peer(peer)

    def _notify_services(self, method: str, *args: Any) -> None:
        for name, service in list(self._services.items()):
            fn = getattr(service, method, None)
            if fn is None:
                continue
            try:
                result = fn(*args)
                if inspect.isawaitable(result):
                    asyncio.ensure_future(result).add_done_callback(self._log_service_task)
            except Exception:
                logger.exception("node %s: service %r: %s%r raised", self.id, name, method, args)

    def _log_service_task(self, task: asyncio.Future) -> None:
        if not task.cancelled() and task.exception() is not None:
            logger.error("node %s: a service callback failed", self.id, exc_info=task.exception())

    def require_loop_thread(self, what: str) -> None:
        """Raise `RuntimeError` naming `what` unless the node runs and this is its loop thread.

        The guard of every write, for the layers above too.
        """
        if self._state != _RUNNING and self._state != _DRAINING:
            raise RuntimeError(f"{what}: node {self.id} is not running")
        if threading.get_ident() != self.runtime.loop_thread:
            raise RuntimeError(f"{what} must be called on the node's event loop thread")

    # -- peers coming up and going down (called by the mesh) ---------------------------

    def _peer_up(self, peer: PeerRecord) -> None:
        self._notify_node_monitors(NodeUp(peer.id))
        self._notify_services("peer_up", peer.id)

    def _peer_down(self, peer: PeerRecord, reason: str) -> None:
        label = down_reason_label(reason)
        self._down_reasons[label] = self._down_reasons.get(label, 0) + 1
        self._remote.peer_lost(peer)
        self._notify_services("peer_down", peer.id, reason)
        self._notify_node_monitors(NodeDown(peer.id, reason))

    def _notify_node_monitors(self, event: NodeUp | NodeDown) -> None:
        for pid in list(self._node_monitors):
            proc = self.runtime.process(pid)
            if proc is not None:
                proc.deliver(event)
