"""`Node`: one member of a cluster (layer 3): processes, names, peers, remote messaging.

A node runs on one asyncio event loop. `Node.start` (or ``async with node``) binds the
node's `~pgregistry.transport.Endpoint` first (so the id carries the real port:
``name@host:port``), picks a new random *creation* (so pids of an earlier incarnation
never match), installs the node as its process runtime's router, and makes the calling
task a process of the node. Writes (`spawn`, names, `connect`, services) must run on the
loop's thread. `stop` kills every process, closes the attached services, says ``leave``
to every peer and closes the endpoint.

Everything between nodes travels over the endpoint's authenticated connections (cookie
HMAC, optional TLS, ticks: see `pgregistry.transport`); nodes in one event loop still
talk only through TCP. This module defines what the *node protocol* puts in the
transport's message frames.

The node protocol
=================
Every node-protocol message is one term, a list whose first item is a str tag. Ids are
node ids (str), ``pid`` a `Pid`, ``ref`` a `Ref`, ``to`` a pid of the receiving node or
a str name registered there. Nothing received is ever executed; the only effects a peer
can have are the ones listed below.

Connection set-up (after the transport handshake), per connection. Of the two nodes,
the one with the smaller id (str order) is the *decider*: it alone confirms or refuses
every connection of the pair, whoever dialled it, so both sides always agree on which
connection is the live one::

    ["hello", token, explicit]   dialler -> acceptor, first message. token: a random int
                                 naming this connection; explicit: dialled by connect()
                                 (clears a "disconnected" block), not by gossip/reconnect
    ["ready"]                    acceptor -> dialler when the dialler decides
    ["alive?", token]            decider -> other, when the decider already has a live
                                 connection of that token to the same incarnation
    ["alive", token, bool]       answer: is that connection still open on your side?
    ["welcome"]                  decider -> other: this connection is now THE connection
    ["reject", reason]           either side, then it closes the connection. reasons:
                                 "duplicate" (the pair keeps another connection),
                                 "disconnected" (see disconnect below), "protocol"

The two flows (``D`` dials, ``A`` accepts; either may be the decider)::

    D decides:  D -> A hello;  A -> D ready;  D -> A welcome | reject | alive? ...
    A decides:  D -> A hello;  A -> D welcome | reject | alive? ...
    alive? ...: decider -> other alive?;  other -> decider alive;  decider -> welcome | reject

The acceptor of a hello first refuses it (``"disconnected"``) if it is blocked from the
dialler and the hello is not explicit. Nothing but these messages may be sent on a
connection before its ``welcome``; anything else closes it (``"protocol"``).
The decider welcomes a connection at once when it has no live connection to that peer.
If it has one, it asks ``alive?`` about it on the new connection: "yes" (the old one is
open, e.g. both sides dialled at the same time) refuses the new one as a duplicate
without any NodeDown/NodeUp; "no" (the peer lost the old one, and we had not noticed
yet) takes the old one down (NodeDown, monitors fire) and welcomes the new one. A
connection from a *different creation* of a connected peer means that the peer
restarted: the old incarnation is taken down (NodeDown, its monitors fire
``"noconnection"``) before the new one can come up. A connection that is not confirmed
within ``handshake_timeout`` is closed.

On a confirmed connection (FIFO; every kind shares the one connection of the pair)::

    ["members", [id, ...]]            first message(s) from each side: its other connected
                                      peers, at most `MEMBERS_PER_MESSAGE` ids a message;
                                      the receiver connects to those it does not know
                                      (full mesh, within its gossip caps) and hurries its
                                      reconnects to the known ones, except the ones it is
                                      disconnected from
    ["send", to, msg]                 deliver msg (a term); to an unknown pid or name:
                                      dropped, as are pids of another creation
    ["send_t", to, type, [field...]]  deliver a pgregistry message named tuple (`Down`,
                                      `NodeUp`, `Join`, ...), rebuilt from its type name
    ["call", to, ref, caller, req]    monitor to for caller under ref (as ``monitor``
                                      does: "noproc" at once if to is not alive) and
                                      deliver ``Call(ref, caller, req)``; caller must be
                                      a pid of the sending node
    ["cast", to, msg]                 deliver ``Cast(msg)``
    ["reply", caller, ref, value]     deliver ``Reply(ref, value)`` (resolves the call)
    ["monitor", watcher, ref, to]     watcher (of the sender) monitors to; answered by a
                                      ``down`` at once ("noproc") if to is not alive
    ["demonitor", ref]                drop that monitor
    ["down", watcher, ref, reason]    the monitored process exited with reason (a term)
    ["down_exc", watcher, ref, type_name, message]
                                      ... with an exception: delivered as `RemoteError`
    ["exit", pid, reason]             exit signal (``"kill"``, any term)
    ["exit_exc", pid, type_name, message]   exit signal with an exception reason
    ["svc", name, payload]            ``peer_message(peer_id, payload)`` of the service
                                      attached under name; if there is none, the payload
                                      is dropped and ``nosvc`` answers
    ["nosvc", name]                   no service `name` runs on the sender: calls
                                      ``peer_absent(peer_id)`` of the local service name
    ["disconnect"]                    the sender called `Node.disconnect`: both block
    ["leave"]                         the sender is stopping: forget it (no reconnects)

A remote `call` is thus one ``call`` message and one ``reply``: the `Reply` passing
through also ends the monitor of its call on both nodes (the caller demonitors right
after anyway), which saves a ``demonitor`` message per call. Unknown or malformed
messages from an authenticated peer are logged (rate-limited) and dropped; the
connection stays up.

Membership
==========
* `connect` to any member joins the whole cluster: each side of a new connection sends
  its connected peers (``members``) and the receiver connects to the unknown ones.
* A node remembers every member it was connected to (a node it only heard of through
  ``members`` is dialled at most `GOSSIP_ATTEMPTS` times, so a node that stopped just as
  it was gossiped about is not redialled forever, then forgotten). Gossip is bounded by
  the node's ``max_members_per_message``, ``max_gossip_peers`` and ``max_gossip_dials``
  (see `Node`): a peer that lists thousands of made-up ids costs a bounded number of
  records and dials, all released once they are given up. When a connection is lost, *both*
  sides redial with exponential backoff (first delay ``reconnect_initial``, doubling up
  to ``reconnect_max``, each drawn uniformly from ``[d/2, d]``), at the address they
  have for the peer: the one given to `connect` or `add_route`, else the host:port of its
  id. Tests put a `pgregistry.testing.LinkProxy` in both directions and `add_route`
  through them, so that a cut stays cut.
* ``disconnect(peer)``: both sides block each other (the peer is told with
  ``["disconnect"]``; a peer that was not connected learns it from the ``"disconnected"``
  refusal of its next redial) and neither dials the other again, directly or because of
  ``members``, until one of them calls `connect` (an explicit hello lifts the block on
  both sides).
* ``leave``: a stopped node is forgotten, not redialled; a node restarted later joins
  again by connecting (or by being connected to).

Order of events when a peer is lost: the peer leaves `peers`, every monitor a local
process holds on one of its processes gets ``Down(ref, pid, "noconnection")`` (a pending
`call` raises `NoProcess`), monitors it held on local processes are dropped, then each
service's ``peer_down(peer_id, reason)`` runs, then node monitors get
``NodeDown(peer_id, reason)``. When a peer comes up: it enters `peers`, node monitors get
``NodeUp(peer_id)``, then each service's ``peer_up(peer_id)`` runs. NodeDown reasons are
str: ``"disconnect"``, ``"leave"``, ``"restarted"`` (a new incarnation connected),
``"connection replaced"``, or the transport's reason (``"timeout"``, ``"closed by
peer"``, ``"connection lost: ..."``).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import itertools
import logging
import os
import random
import secrets
import ssl as _ssl
import threading
import time
from typing import Any, Awaitable, Callable, Final, Iterable

from .errors import AlreadyStarted, NotLocal, RemoteError
from .events import Down, Join, Leave, NodeDown, NodeUp, Registered, Unregistered, Update
from .process import Process, Reply, Runtime, current_process, receive, send, task_process
from .server import Call, Cast, Server, call
from .logbudget import LogBudget
from .terms import Pid, Ref, check_value, is_value, short_repr
from .transport import (
    MAX_NODE_ID_LEN,
    Connection,
    Endpoint,
    check_int,
    check_max_frame,
    check_seconds,
    parse_address,
)
from .wire import MAX_FRAME, encode, encode_trusted

__all__ = ["Node", "REPLACED"]

REPLACED: Final = "connection replaced"
"""The ``peer_down``/``NodeDown`` reason when a peer reconnected before its old connection
was seen to fail: the peer itself never went away."""

logger = logging.getLogger("pgregistry.node")

#: How long `Node.stop` waits for the cancelled tasks of killed processes to unwind.
STOP_GRACE = 5.0

#: Longest exception message carried in a `RemoteError`.
MAX_ERROR_TEXT: Final = 2000

#: Dials to a node known only from ``members`` gossip before giving up on it (a node
#: that was ever connected is redialled until it leaves or is disconnected).
GOSSIP_ATTEMPTS: Final = 5

#: Most ids a node lists in one ``members`` message it sends (more go in several
#: messages), and so the smallest ``max_members_per_message`` a node may be given.
MEMBERS_PER_MESSAGE: Final = 256

_NEW, _STARTING, _RUNNING, _STOPPING, _STOPPED = "new", "starting", "running", "stopping", "stopped"

_FORBIDDEN_IN_NAME = frozenset("@:/ \t\r\n")

# States of one connection as the node sees it.
_L_DIALED: Final = "dialed"  # we dialled; the transport handshake is done, hello not sent yet
_L_AWAIT_HELLO: Final = "await hello"  # we accepted; waiting for the dialler's hello
_L_HELLO_SENT: Final = "hello sent"  # we dialled and said hello; waiting for the verdict
_L_AWAIT_WELCOME: Final = "await welcome"  # we accepted, said ready; the peer decides
_L_ASKED: Final = "asked"  # we decide and asked "alive?" about the old connection
_L_UP: Final = "up"
_L_CLOSED: Final = "closed"

# Named tuples that may cross the network as messages, by type name.
_MESSAGE_TYPES: Final[dict[str, Any]] = {
    cls.__name__: cls for cls in (Down, NodeUp, NodeDown, Join, Leave, Update, Registered, Unregistered)
}
_MESSAGE_TYPE_NAMES: Final[dict[type, str]] = {cls: name for name, cls in _MESSAGE_TYPES.items()}



def _check_text(what: str, value: Any, forbidden: frozenset[str]) -> str:
    if type(value) is not str:
        raise TypeError(f"{what} must be a str, got {short_repr(value)}")
    if not value or not value.isprintable() or any(ch in forbidden for ch in value):
        shown = "".join(sorted(forbidden - {"\t", "\r", "\n"}))
        raise ValueError(f"{what} must be non-empty, printable and free of {shown!r}, got {short_repr(value)}")
    return value


def _new_creation() -> int:
    """A random non-zero 32-bit creation for a new incarnation of a node."""
    while True:
        creation = secrets.randbits(32)
        if creation:
            return creation


def _error_parts(reason: Any) -> tuple[str, str]:
    """``(type_name, message)`` of a reason that is not a term (usually an exception)."""
    if isinstance(reason, RemoteError):
        return reason.type_name, reason.message[:MAX_ERROR_TEXT]
    cls = type(reason)
    name = cls.__qualname__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__qualname__}"
    try:
        text = str(reason) if isinstance(reason, BaseException) else repr(reason)
    except Exception:  # a broken __str__ must not break an exit
        text = f"<{name} whose str() raised>"
    return name, text[:MAX_ERROR_TEXT]


class _Malformed(Exception):
    """A message from a peer that does not follow the node protocol."""


def _need(ok: bool, what: str) -> None:
    if not ok:
        raise _Malformed(what)


class _Link:
    """One transport connection as the node sees it (pending until confirmed)."""

    __slots__ = ("conn", "peer", "token", "state", "address", "refusal", "timer", "seq")

    def __init__(self, conn: Connection, state: str, seq: int) -> None:
        self.conn = conn
        self.seq = seq  # order in which this node's connections were established
        self.peer: _Peer | None = None
        self.token = 0
        self.state = state
        self.address: str | None = None  # what we dialled, for a connection we initiated
        self.refusal: str | None = None  # the reason a "reject" gave, either way
        self.timer: asyncio.TimerHandle | None = None

    def __repr__(self) -> str:
        peer = self.peer.id if self.peer is not None else self.conn.peer_id or "?"
        return f"<link {'to' if self.conn.initiated else 'from'} {peer} {self.state}>"


class _Peer:
    """Everything the node knows about one other node, connected or not."""

    __slots__ = (
        "id",
        "link",
        "conn",
        "creation",
        "links",
        "route",
        "member",
        "blocked",
        "disconnected_at",
        "gossip_tries",
        "reconnect",
        "kick",
        "out_monitors",
        "in_monitors",
        "waiters",
    )

    def __init__(self, node_id: str) -> None:
        self.id = node_id
        self.link: _Link | None = None  # the confirmed connection
        self.conn: Connection | None = None  # its transport connection (hot path)
        self.creation = 0  # of the connected incarnation
        self.links: set[_Link] = set()  # connections still being set up
        self.route: str | None = None  # the address to dial, if not the id's host:port
        self.member = False  # remembered: redialled after a loss
        self.blocked = False  # disconnected: never dialled until an explicit connect
        self.disconnected_at = 0  # the node's disconnect count when it last disconnected this peer
        self.gossip_tries = 0  # dials left for a node only heard of through ``members``
        self.reconnect: asyncio.Task[None] | None = None
        self.kick: asyncio.Event | None = None  # wakes the reconnect loop early
        self.out_monitors: dict[Ref, Pid] = {}  # monitors local watchers hold there: ref -> watcher
        self.in_monitors: dict[Ref, Pid] = {}  # monitors its processes hold here: ref -> local target
        self.waiters: list[asyncio.Future[None]] = []  # woken on every state change


class Node:
    """A node: an id, its processes and local names, its peers, and attached services.

    ``Node(name, host=, port=, cookie=, ssl=, client_ssl=, tick_interval=, down_after=,
    max_frame=)``:
    every argument is checked here (`TypeError` for a wrong type, `ValueError` for a bad
    value, each naming the argument). ``cookie=None`` takes ``PGREGISTRY_COOKIE`` from
    the environment, else a random cookie (then nobody can connect). ``port=0`` binds an
    ephemeral port, which the id then carries.

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
    in `pgregistry.transport`.

    ``tick_interval`` / ``down_after``: a peer from which nothing (not even a tick) was
    heard for ``down_after`` seconds is down; ``down_after`` must be at least twice
    ``tick_interval``. ``handshake_timeout`` (``max(1, down_after)``), ``reconnect_initial``
    (``tick_interval``) and ``reconnect_max`` (``max(2 * down_after, tick_interval)``) are
    attributes that may be changed before `start`.

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
        if type(port) is not int:
            raise TypeError(f"port must be an int, got {short_repr(port)}")
        if not 0 <= port <= 65535:
            raise ValueError(f"port must be in 0..65535, got {short_repr(port)}")
        self.port = port
        if cookie is None:
            cookie = os.environ.get("PGREGISTRY_COOKIE") or secrets.token_urlsafe(32)
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
        self.tick_interval = check_seconds("tick_interval", tick_interval)
        self.down_after = check_seconds("down_after", down_after)
        if self.down_after < 2 * self.tick_interval:
            raise ValueError(
                f"down_after ({down_after}) must be at least twice tick_interval ({tick_interval}), "
                "or idle but healthy peers would be declared down"
            )
        self.max_frame = check_max_frame(max_frame)
        self.max_members_per_message = check_int(
            "max_members_per_message", max_members_per_message, MEMBERS_PER_MESSAGE, 1_000_000
        )
        self.max_gossip_peers = check_int("max_gossip_peers", max_gossip_peers, 1, 1_000_000)
        self.max_gossip_dials = check_int("max_gossip_dials", max_gossip_dials, 1, 65_536)
        self.handshake_timeout = max(1.0, self.down_after)
        self.reconnect_initial = self.tick_interval
        self.reconnect_max = max(2 * self.down_after, self.tick_interval)
        self.runtime = Runtime(self.id)
        self._endpoint = Endpoint(
            self.name,
            cookie,
            host=self.host,
            port=port,
            ssl=ssl,
            client_ssl=client_ssl,
            tick_interval=self.tick_interval,
            down_after=self.down_after,
            max_frame=self.max_frame,
            handshake_timeout=self.handshake_timeout,
            on_connection=self._on_connection,
            on_message=self._on_message,
            on_close=self._on_close,
        )
        self._state = _NEW
        self._started = asyncio.Event()
        self._stopped = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._services: dict[str, Any] = {}
        self._peers: dict[str, _Peer] = {}
        # Nodes known only through gossip and still being dialled: at most max_gossip_peers.
        self._gossiped: set[_Peer] = set()
        # Held by a gossip dial from its first byte to its verdict.
        self._gossip_dials = asyncio.Semaphore(self.max_gossip_dials)
        self._disconnects = 0  # `disconnect` calls so far: a connect begun before one yields to it
        self._links: dict[Connection, _Link] = {}
        self._next_link_seq: Callable[[], int] = itertools.count(1).__next__
        self._up: dict[Connection, _Peer] = {}  # confirmed connections, in the order they came up
        self._node_monitors: dict[Pid, None] = {}
        self._monitor_hook_key = object()  # exit-hook key of monitor_nodes, unique per node
        self._input_log = LogBudget(logger, f"node {name}")
        self._handlers: dict[str, Callable[[_Peer, list], None]] = {
            "send": self._h_send,
            "call": self._h_call,
            "reply": self._h_reply,
            "cast": self._h_cast,
            "svc": self._h_svc,
            "nosvc": self._h_nosvc,
            "send_t": self._h_send_t,
            "monitor": self._h_monitor,
            "demonitor": self._h_demonitor,
            "down": self._h_down,
            "down_exc": self._h_down_exc,
            "exit": self._h_exit,
            "exit_exc": self._h_exit_exc,
            "members": self._h_members,
            "disconnect": self._h_disconnect,
            "leave": self._h_leave,
        }
        self._handshake_handlers: dict[str, Callable[[_Link, list], None]] = {
            "hello": self._hs_hello,
            "ready": self._hs_ready,
            "welcome": self._hs_welcome,
            "alive?": self._hs_alive_query,
            "alive": self._hs_alive,
            "reject": self._hs_reject,
        }

    def __repr__(self) -> str:
        return f"<Node {self.id} {self._state} {len(self._up)} peers>"

    @property
    def id(self) -> str:
        """``"name@host:port"`` (the real port once started)."""
        return f"{self.name}@{self.host}:{self.port}"

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
        """True between `start` and `stop`."""
        return self._state == _RUNNING

    # -- lifecycle ------------------------------------------------------------------

    async def __aenter__(self) -> "Node":
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
        endpoint = self._endpoint
        endpoint.creation = creation
        try:
            endpoint.handshake_timeout = check_seconds("handshake_timeout", self.handshake_timeout)
            for what in ("reconnect_initial", "reconnect_max"):
                check_seconds(what, getattr(self, what))
        except (TypeError, ValueError):
            self._state = _NEW
            raise
        try:
            _host, port = await endpoint.start()
        except BaseException:
            self._state = _STOPPED
            self._started.set()
            self._stopped.set()
            raise
        self.port = port
        endpoint.node_id = self.id
        runtime.node_id = self.id
        runtime.creation = creation
        runtime.loop = loop
        runtime.loop_thread = threading.get_ident()
        runtime.router = self
        self._loop = loop
        self._state = _RUNNING
        self._started.set()
        task = asyncio.current_task()
        if task is not None:
            current = task_process(task)
            if current is None or current.adopted:
                runtime.adopt(task)

    async def stop(self) -> None:
        """Kill every process, close every service, leave the cluster, close the endpoint.

        Exit hooks run for each process (reason ``"killed"``; `Server.terminate` does not
        run); remote watchers get their ``Down``. The node then waits up to `STOP_GRACE`
        seconds for the killed tasks to unwind, calls ``close()`` on each service
        (awaiting it if it returns an awaitable; errors are logged), tells every peer it
        leaves (so they do not redial it) and closes the endpoint (queued output is
        written first). Idempotent: stopping a stopped or never-started node does
        nothing, and a concurrent `stop` waits for the first one. If `stop` is cancelled
        while waiting, the processes are already dead and the services are closed before
        the cancellation propagates.
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
        if self._state == _STOPPING:
            await self._stopped.wait()
            return
        if threading.get_ident() != self.runtime.loop_thread:
            raise RuntimeError(f"stop of node {self.id} must run on the node's event loop thread")
        self._state = _STOPPING
        try:
            tasks = self.runtime.close(exclude=asyncio.current_task())
            if tasks:
                _, still_running = await asyncio.wait(tasks, timeout=STOP_GRACE)
                for task in still_running:
                    logger.warning("node %s: %r ignored its cancellation and is still running", self.id, task)
        finally:
            try:
                services = list(self._services.items())
                self._services.clear()
                for name, service in services:
                    await self._close_service(name, service)
                await self._close_network()
            finally:
                self._state = _STOPPED
                self._stopped.set()

    async def _close_service(self, name: str, service: Any) -> None:
        try:
            closed = service.close()
            if inspect.isawaitable(closed):
                await closed
        except Exception:
            logger.exception("node %s: closing service %r failed", self.id, name)

    async def _close_network(self) -> None:
        """Say ``leave`` to every peer, stop redialling, close the endpoint."""
        for peer in list(self._up.values()):
            conn = peer.conn
            if conn is not None and conn.established:
                conn.send(["leave"])
        reconnects = [peer.reconnect for peer in self._peers.values() if peer.reconnect is not None]
        for task in reconnects:
            task.cancel()
        if reconnects:
            await asyncio.gather(*reconnects, return_exceptions=True)
        await self._endpoint.close()
        for peer in self._peers.values():
            self._wake(peer)

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
        return [peer.id for peer in list(self._up.values())]

    async def connect(self, address: str) -> str:
        """Connect to the node at `address` (``"host:port"`` or a node id); return its id.

        Connecting to one member joins the whole cluster: the nodes then connect to every
        member they did not know (this returns before that). A peer already connected
        returns its id at once. An explicit connect lifts a `disconnect` block on both
        sides, and the address given is remembered as the way to reach that node
        (reconnects use it). Raises `AuthenticationError` when the cookies differ,
        `OSError`/`ConnectionError` when the node cannot be reached or refuses,
        `TimeoutError` after ``handshake_timeout``, `ValueError` for a malformed address
        or this node's own id, `RuntimeError` off the loop thread or when not running.
        """
        self.require_loop_thread("connect")
        if type(address) is not str:
            raise TypeError(f"connect: address must be a str, got {short_repr(address)}")
        host, port = parse_address(address)
        expect: str | None = None
        dial = address
        if "@" in address:
            expect = address
            if address == self.id:
                raise ValueError(f"connect: {address} is this node")
            known = self._peers.get(address)
            if known is not None:
                known.blocked = False
                if known.link is not None:
                    return address
                dial = known.route or address
        else:
            for peer in self._up.values():
                if peer.route == address or parse_address(peer.id) == (host, port):
                    peer.blocked = False
                    return peer.id
        link = await self._dial(dial, explicit=True, expect=expect)
        record = link.peer
        assert record is not None
        if dial is address and expect is None:
            record.route = address
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.handshake_timeout
        while record.link is None:
            if self._state != _RUNNING:
                raise ConnectionError(f"connect to {address}: node {self.id} stopped")
            if link.state == _L_CLOSED and not record.links:
                why = link.refusal or link.conn.close_reason or "closed"
                raise ConnectionError(f"connect to {address} ({record.id}) failed: {why}")
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise TimeoutError(
                    f"connect to {address}: {record.id} did not confirm within {self.handshake_timeout} s"
                )
            await self._wait_change(record, remaining)
        return record.id

    async def disconnect(self, peer: str) -> None:
        """Disconnect from `peer` (a node id), telling it; neither side redials the other.

        The block holds on both sides, against reconnects and against ``members``
        gossip from third nodes, until either node calls `connect` on the other. A peer
        that is not connected is blocked too (it learns it when it next dials). Returns
        once the connection is closed (bounded by ``handshake_timeout``).
        """
        self.require_loop_thread("disconnect")
        if type(peer) is not str:
            raise TypeError(f"disconnect: peer must be a node id str, got {short_repr(peer)}")
        if peer == self.id:
            raise ValueError(f"disconnect: {peer} is this node")
        record = self._peer(peer)
        record.blocked = True
        record.member = False
        self._disconnects += 1
        record.disconnected_at = self._disconnects
        self._stop_reconnect(record)
        closing: list[Connection] = []
        link = record.link
        if link is not None:
            link.conn.send(["disconnect"])
            closing.append(link.conn)
            self._peer_down(record, "disconnect")
        for pending in list(record.links):
            closing.append(pending.conn)
            self._refuse(pending, "disconnected")
        if closing:
            await asyncio.wait(
                [asyncio.ensure_future(conn.wait_closed()) for conn in closing], timeout=self.handshake_timeout
            )

    def add_route(self, peer: str, address: str) -> None:
        """Reach the node `peer` (an id) at `address` (``"host:port"``) from now on.

        Used for every later dial to that node: reconnects and ``members`` gossip (not
        an already open connection). For NAT, proxies, and tests that put a
        `~pgregistry.testing.LinkProxy` in each direction of a link.
        """
        self.require_loop_thread("add_route")
        if type(peer) is not str or "@" not in peer:
            raise TypeError(f"add_route: peer must be a node id 'name@host:port', got {short_repr(peer)}")
        parse_address(peer)
        parse_address(address)
        self._peer(peer).route = address

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
        conn = record.conn if record is not None else None
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

    # -- services -------------------------------------------------------------------

    def attach_service(self, name: str, service: Any) -> None:
        """Attach `service` (e.g. a registry scope) under `name`; closed when the node stops.

        The service may define ``peer_up(peer_id)``, ``peer_down(peer_id, reason)``,
        ``peer_message(peer_id, payload)`` and ``peer_absent(peer_id)``, called on the
        loop thread (exceptions are logged) when a peer connection is confirmed or lost
        after the attach (a service attached while peers are connected reads `peers` for
        those), for each `send_service` message a peer addressed to `name`, and when a
        peer answers such a message with "no service of that name runs here". `AlreadyStarted` (``.pid``
        the attached service) if `name` is taken; `RuntimeError` off the loop thread or
        when the node is not running.
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

    def service(self, name: str) -> Any | None:
        """The service attached under `name`, or None."""
        return self._services.get(name)

    def send_service(self, peer: str, name: str, payload: Any, *, trusted: bool = False) -> bool:
        """Send `payload` (a term) to the service `name` on the connected node `peer`.

        Queued on the peer's connection, FIFO with every other message to it; the peer
        calls ``peer_message(this node's id, payload)`` of its service `name` (or drops
        it if there is none). Returns False, sending nothing, if `peer` is not
        connected. `TypeError` if `payload` is not a term, `ValueError` if it exceeds
        the peer's frame limit. ``trusted=True`` skips the check that `payload` is a
        term (`wire.encode_trusted`): for payloads built from already checked terms.
        """
        record = self._peers.get(peer)
        conn = record.conn if record is not None else None
        if conn is None:
            if not trusted:
                check_value(payload, "send_service payload")
            return False
        if trusted:
            conn.send_encoded(encode_trusted(["svc", name, payload]))
        else:
            conn.send(["svc", name, payload])
        return True

    def broadcast_service(self, name: str, payload: Any, peers: Iterable[str] | None = None, *,
                          trusted: bool = False, too_big: list[str] | None = None) -> int:
        """`send_service` to every connected peer (or those of `peers`); encoded once.

        Returns how many peers it was queued to. A peer whose frame limit the message
        exceeds does not stop the others: with a `too_big` list its id is appended there
        (for the caller to split the message for it alone) and the rest get the message;
        without one, `ValueError` and nothing is sent to anyone.
        """
        data = (encode_trusted if trusted else encode)(["svc", name, payload])
        if peers is None:
            records: Iterable[_Peer] = self._up.values()
        else:
            records = [record for record in map(self._peers.get, peers) if record is not None]
        size = len(data)
        targets = []
        for record in records:
            conn = record.conn
            if conn is None:
                continue
            if size <= conn.peer_max_frame:
                targets.append(conn)
            elif too_big is not None:
                too_big.append(record.id)
            else:
                raise ValueError(f"message of {size} bytes exceeds the frame limit of {conn.peer_max_frame} "
                                 f"of {record.id}; sent to nobody")
        for conn in targets:
            conn.send_encoded(data)
        return len(targets)

    async def drain_peer(self, peer: str) -> bool:
        """Wait while the connection to `peer` has more output queued than it takes.

        For bulk senders: send a batch, ``await drain_peer(peer)``, repeat. Returns True
        when the connection's buffer is below its low-water mark, False if `peer` is not
        connected or its connection closes meanwhile (nothing raised). Cancellation
        leaves the connection as it is.
        """
        record = self._peers.get(peer)
        conn = record.conn if record is not None else None
        if conn is None:
            return False
        try:
            await conn.drain()
        except ConnectionError:
            return False
        return True

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
        if self._state != _RUNNING:
            raise RuntimeError(f"{what}: node {self.id} is not running")
        if threading.get_ident() != self.runtime.loop_thread:
            raise RuntimeError(f"{what} must be called on the node's event loop thread")

    # -- router (see pgregistry.process.Router) --------------------------------------

    def send_remote(self, dest: Any, msg: Any) -> None:
        """Send `msg` to `dest` (a pid of another node, or ``(name, node_id)``).

        Dropped when the node is not connected or the pid belongs to another incarnation
        of it; `TypeError` for a message that is not a term in every case.
        """
        if type(dest) is Pid:
            to: Any = dest
            record = self._peers.get(dest.node)
            conn = record.conn if record is not None else None
            if conn is not None and dest.creation != record.creation:  # type: ignore[union-attr]
                conn = None
        else:
            to, node_id = dest
            record = self._peers.get(node_id)
            conn = record.conn if record is not None else None
        kind = type(msg)
        if kind is Call:
            term: list = ["call", to, msg.ref, msg.caller, msg.request]
        elif kind is Reply:
            term = ["reply", to, msg.ref, msg.value]
        elif kind is Cast:
            term = ["cast", to, msg.msg]
        elif kind in _MESSAGE_TYPE_NAMES:
            term = ["send_t", to, _MESSAGE_TYPE_NAMES[kind], list(msg)]
        else:
            term = ["send", to, msg]
        if conn is None:
            check_value(term, "message")
            return
        conn.send(term)
        if kind is Reply and record.in_monitors:  # type: ignore[union-attr]
            # The caller drops its monitor once the reply arrives: drop ours now.
            target = record.in_monitors.pop(msg.ref, None)  # type: ignore[union-attr]
            if target is not None:
                proc = self.runtime.process(target)
                if proc is not None:
                    proc.remove_watcher(msg.ref)

    def monitor_remote(self, watcher: Pid, ref: Ref, pid: Any) -> None:
        """Start the remote half of `watcher`'s monitor `ref` on `pid` (or ``(name, node)``)."""
        if type(pid) is Pid:
            to: Any = pid
            node_id = pid.node
        else:
            to, node_id = pid
        record = self._peers.get(node_id)
        conn = record.conn if record is not None else None
        proc = self.runtime.process(watcher)
        if proc is None:
            return
        if conn is None or record is None:
            proc.deliver_down(ref, pid, "noconnection")
        elif type(pid) is Pid and pid.creation != record.creation:
            proc.deliver_down(ref, pid, "noproc")  # an earlier incarnation: long dead
        else:
            record.out_monitors[ref] = watcher
            conn.send(["monitor", watcher, ref, to])

    def call_remote(self, caller: Process, ref: Ref, dest: Any, request: Any) -> None:
        """Monitor `dest` (another node's pid or ``(name, node_id)``) and call it, in one message."""
        caller.add_monitor(ref, dest)
        if type(dest) is Pid:
            to: Any = dest
            node_id = dest.node
        else:
            to, node_id = dest
        record = self._peers.get(node_id)
        conn = record.conn if record is not None else None
        if conn is None or record is None:
            check_value(request, "call request")
            caller.deliver_down(ref, dest, "noconnection")
        elif type(dest) is Pid and dest.creation != record.creation:
            check_value(request, "call request")
            caller.deliver_down(ref, dest, "noproc")  # an earlier incarnation: long dead
        else:
            conn.send(["call", to, ref, caller.pid, request])
            record.out_monitors[ref] = caller.pid

    def demonitor_remote(self, ref: Ref, pid: Any) -> None:
        """Cancel the remote half of the monitor `ref` on `pid`."""
        node_id = pid.node if type(pid) is Pid else pid[1]
        record = self._peers.get(node_id)
        if record is None or record.out_monitors.pop(ref, None) is None:
            return
        conn = record.conn
        if conn is not None:
            conn.send(["demonitor", ref])

    def exit_remote(self, pid: Pid, reason: Any) -> None:
        """Send the exit signal `reason` to the process `pid` of another node."""
        record = self._peers.get(pid.node)
        conn = record.conn if record is not None else None
        if conn is None or record is None or pid.creation != record.creation:
            return
        if not self._send_reason(conn, ["exit", pid, reason]):
            conn.send(["exit_exc", pid, *_error_parts(reason)])

    @staticmethod
    def _send_reason(conn: Connection, term: list) -> bool:
        """Send `term`, whose last item is an exit reason, if that reason can cross as a term.

        False (nothing sent) for a reason that is not a term (an exception) or too large
        for the peer's frame limit: the caller sends it as a `RemoteError` instead.
        """
        reason = term[-1]
        if type(reason) is not str and not is_value(reason):
            return False
        try:
            conn.send(term)
        except ValueError:
            return False
        return True

    def down_remote(self, watcher: Pid, ref: Ref, pid: Pid, reason: Any) -> None:
        """Tell `watcher` (a process of another node) that `pid` exited with `reason`."""
        try:
            record = self._peers.get(watcher.node)
            if record is None:
                return
            record.in_monitors.pop(ref, None)
            conn = record.conn
            if conn is None or watcher.creation != record.creation:
                return
            if not self._send_reason(conn, ["down", watcher, ref, reason]):
                conn.send(["down_exc", watcher, ref, *_error_parts(reason)])
        except Exception:  # called from inside an exit: never let it fail
            logger.exception("node %s: reporting the exit of %r to %r failed", self.id, pid, watcher)

    # -- incoming messages on confirmed connections -----------------------------------

    def _on_message(self, conn: Connection, term: Any) -> None:
        peer = self._up.get(conn)
        if peer is None:
            self._handshake_message(conn, term)
            return
        try:
            handler = self._handlers[term[0]]
        except (KeyError, TypeError, IndexError):
            self._log_malformed(peer.id, "unknown message", term)
            return
        try:
            handler(peer, term)
        except _Malformed as exc:
            self._log_malformed(peer.id, str(exc), term)
        except Exception:
            logger.exception("node %s: handling %.200r from %s failed", self.id, term, peer.id)

    def _local_process(self, to: Any) -> Process | None:
        """The live local process a message from a peer is addressed to, or None."""
        if type(to) is Pid:
            return self.runtime.process(to)
        _need(type(to) is str, "the destination is not a pid or a name")
        pid = self.runtime.whereis(to)
        return None if pid is None else self.runtime.process(pid)

    def _h_send(self, peer: _Peer, m: list) -> None:
        _need(len(m) == 3, "send: wrong length")
        proc = self._local_process(m[1])
        if proc is not None:
            proc.deliver(m[2])

    def _h_call(self, peer: _Peer, m: list) -> None:
        _need(len(m) == 5, "call: wrong length")
        _, to, ref, caller, request = m
        _need(type(ref) is Ref and type(caller) is Pid and caller.node == peer.id, "call: bad ref or caller")
        proc = self._local_process(to)
        if proc is None:
            peer.conn.send(["down", caller, ref, "noproc"])  # type: ignore[union-attr]
            return
        # A call carries its monitor: the caller learns if the server dies first.
        proc.add_watcher(ref, caller)
        peer.in_monitors[ref] = proc.pid
        proc.deliver(Call(ref, caller, request))

    def _h_reply(self, peer: _Peer, m: list) -> None:
        _need(len(m) == 4 and type(m[1]) is Pid and type(m[2]) is Ref, "reply: malformed")
        ref = m[2]
        if peer.out_monitors:
            peer.out_monitors.pop(ref, None)  # the callee's node dropped its half already
        proc = self.runtime.process(m[1])
        if proc is not None:
            proc.deliver(Reply(ref, m[3]))

    def _h_cast(self, peer: _Peer, m: list) -> None:
        _need(len(m) == 3, "cast: wrong length")
        proc = self._local_process(m[1])
        if proc is not None:
            proc.deliver(Cast(m[2]))

    def _h_send_t(self, peer: _Peer, m: list) -> None:
        _need(len(m) == 4 and type(m[2]) is str and type(m[3]) is list, "send_t: malformed")
        cls = _MESSAGE_TYPES.get(m[2])
        if cls is None or len(m[3]) != len(cls._fields):
            raise _Malformed("send_t: unknown type or wrong arity")
        proc = self._local_process(m[1])
        if proc is not None:
            proc.deliver(cls(*m[3]))

    def _h_svc(self, peer: _Peer, m: list) -> None:
        _need(len(m) == 3 and type(m[1]) is str, "svc: malformed")
        service = self._services.get(m[1])
        handler = getattr(service, "peer_message", None) if service is not None else None
        if handler is None:
            # Tell the sender, so a service waiting to learn who runs it (a scope's
            # discovery) need not wait for an answer that will never come.
            peer.conn.send(["nosvc", m[1]])
            return
        try:
            handler(peer.id, m[2])
        except Exception:
            logger.exception("node %s: service %r: peer_message from %s raised", self.id, m[1], peer.id)

    def _h_nosvc(self, peer: _Peer, m: list) -> None:
        _need(len(m) == 2 and type(m[1]) is str, "nosvc: malformed")
        service = self._services.get(m[1])
        handler = getattr(service, "peer_absent", None) if service is not None else None
        if handler is None:
            return
        try:
            handler(peer.id)
        except Exception:
            logger.exception("node %s: service %r: peer_absent from %s raised", self.id, m[1], peer.id)

    def _h_monitor(self, peer: _Peer, m: list) -> None:
        _need(len(m) == 4, "monitor: wrong length")
        _, watcher, ref, to = m
        _need(type(watcher) is Pid and watcher.node == peer.id and type(ref) is Ref, "monitor: bad watcher or ref")
        proc = self._local_process(to)
        if proc is None:
            peer.conn.send(["down", watcher, ref, "noproc"])  # type: ignore[union-attr]
            return
        proc.add_watcher(ref, watcher)
        peer.in_monitors[ref] = proc.pid

    def _h_demonitor(self, peer: _Peer, m: list) -> None:
        _need(len(m) == 2 and type(m[1]) is Ref, "demonitor: malformed")
        target = peer.in_monitors.pop(m[1], None)
        if target is not None:
            proc = self.runtime.process(target)
            if proc is not None:
                proc.remove_watcher(m[1])

    def _deliver_down(self, peer: _Peer, watcher: Any, ref: Any, reason: Any) -> None:
        _need(type(watcher) is Pid and type(ref) is Ref, "down: bad watcher or ref")
        if peer.out_monitors.pop(ref, None) is None:
            return  # demonitored meanwhile (or never asked for): nothing to deliver
        proc = self.runtime.process(watcher)
        if proc is not None:
            proc.deliver_down(ref, proc.monitor_target(ref), reason)

    def _h_down(self, peer: _Peer, m: list) -> None:
        _need(len(m) == 4, "down: wrong length")
        self._deliver_down(peer, m[1], m[2], m[3])

    def _h_down_exc(self, peer: _Peer, m: list) -> None:
        _need(len(m) == 5 and type(m[3]) is str and type(m[4]) is str, "down_exc: malformed")
        self._deliver_down(peer, m[1], m[2], RemoteError(m[3], m[4]))

    def _exit_local(self, pid: Any, reason: Any) -> None:
        _need(type(pid) is Pid, "exit: not a pid")
        if type(reason) is str and reason == "normal":
            return  # "normal" from another process is ignored, as in Erlang
        proc = self.runtime.process(pid)
        if proc is not None:
            proc.signal_exit(reason)

    def _h_exit(self, peer: _Peer, m: list) -> None:
        _need(len(m) == 3, "exit: wrong length")
        self._exit_local(m[1], m[2])

    def _h_exit_exc(self, peer: _Peer, m: list) -> None:
        _need(len(m) == 4 and type(m[2]) is str and type(m[3]) is str, "exit_exc: malformed")
        self._exit_local(m[1], RemoteError(m[2], m[3]))

    def _h_members(self, peer: _Peer, m: list) -> None:
        _need(len(m) == 2 and type(m[1]) is list, "members: malformed")
        ids: list = m[1]
        if len(ids) > self.max_members_per_message:
            self._log_limited("node %s: %s listed %d members in one message; only the first %d "
                              "(max_members_per_message) are taken", self.id, peer.id, len(ids),
                              self.max_members_per_message)
            ids = ids[: self.max_members_per_message]
        over_cap = 0
        for node_id in ids:
            if (
                type(node_id) is not str
                or node_id == self.id
                or "@" not in node_id
                or len(node_id) > MAX_NODE_ID_LEN  # no such node could complete a handshake
                or not node_id.isprintable()
            ):
                continue
            try:
                parse_address(node_id)
            except ValueError:
                continue
            other = self._peers.get(node_id)
            if other is not None:
                if other.blocked or other.link is not None or other in self._gossiped:
                    continue  # gossiped again while being dialled: no more dials than the first time
                if other.member:
                    self._schedule_reconnect(other, now=True)  # a lost member: hurry its redial
                    continue
            if len(self._gossiped) >= self.max_gossip_peers:
                over_cap += 1
                continue
            if other is None:
                other = self._peer(node_id)
            other.gossip_tries = GOSSIP_ATTEMPTS
            self._gossiped.add(other)
            self._schedule_reconnect(other, now=True)
        if over_cap:
            self._log_limited("node %s: %d members gossiped by %s ignored: %d nodes known only through "
                              "gossip are being dialled already (max_gossip_peers)", self.id, over_cap, peer.id,
                              len(self._gossiped))

    def _end_gossip(self, peer: _Peer) -> None:
        """`peer` is no longer dialled because of gossip (reached, given up, blocked or gone)."""
        peer.gossip_tries = 0
        self._gossiped.discard(peer)

    def _h_disconnect(self, peer: _Peer, m: list) -> None:
        peer.blocked = True
        peer.member = False
        self._stop_reconnect(peer)
        self._peer_down(peer, "disconnect")

    def _h_leave(self, peer: _Peer, m: list) -> None:
        peer.member = False
        self._stop_reconnect(peer)
        self._peer_down(peer, "leave")

    def _log_malformed(self, peer_id: str, what: str, term: Any) -> None:
        self._log_limited("node %s: dropped a malformed message from %s (%s): %s", self.id, peer_id, what,
                          short_repr(term, 200))

    def _log_limited(self, msg: str, *args: Any) -> None:
        """A warning about what a peer sent, within the node's budget (peers may flood)."""
        self._input_log.warning(msg, *args)

    # -- connection set-up --------------------------------------------------------------

    def _on_connection(self, conn: Connection) -> None:
        if self._state != _RUNNING:
            conn.close("node not running")
            return
        link = _Link(conn, _L_DIALED if conn.initiated else _L_AWAIT_HELLO, self._next_link_seq())
        self._links[conn] = link
        assert self._loop is not None
        link.timer = self._loop.call_later(self.handshake_timeout, self._setup_timed_out, link)

    def _setup_timed_out(self, link: _Link) -> None:
        link.timer = None
        if link.state not in (_L_UP, _L_CLOSED):
            logger.warning("node %s: %r not confirmed within %g s; closing it", self.id, link, self.handshake_timeout)
            link.conn.close("node handshake timed out")

    async def _dial(self, address: str, *, explicit: bool, expect: str | None) -> _Link:
        """Open a connection to `address` and say hello; the verdict comes later."""
        disconnects_before = self._disconnects
        conn = await self._endpoint.connect(address)
        link = self._links.get(conn)
        if link is None or conn.closed:
            raise ConnectionError(f"connection to {address} closed during set-up: {conn.close_reason}")
        peer_id = conn.peer_id
        problem = None
        if self._state != _RUNNING:
            problem = f"node {self.id} is not running"
        elif peer_id == self.id:
            problem = f"{address} is this node's own id"
        elif expect is not None and peer_id != expect:
            problem = f"{address} is node {peer_id}, not {expect}"
        elif not explicit and self._peer(peer_id).blocked:
            problem = f"disconnected from {peer_id}"
        elif self._peer(peer_id).disconnected_at > disconnects_before:
            problem = f"disconnected from {peer_id} while connecting"  # the later call wins
        if problem is not None:
            conn.close(problem)
            raise ConnectionError(problem)
        peer = self._peer(peer_id)
        if explicit:
            peer.blocked = False
        link.peer = peer
        link.address = address
        link.token = secrets.randbits(62)
        peer.links.add(link)
        if not self._check_incarnation(peer, link):
            raise ConnectionError(f"{address} answered as an older incarnation of {peer_id}")
        link.state = _L_HELLO_SENT
        conn.send(["hello", link.token, explicit])
        return link

    def _handshake_message(self, conn: Connection, term: Any) -> None:
        link = self._links.get(conn)
        if link is None or link.state == _L_CLOSED:
            return
        try:
            _need(type(term) is list and len(term) > 0 and type(term[0]) is str, "not a tagged list")
            handler = self._handshake_handlers.get(term[0])
            _need(handler is not None, f"unexpected {term[0]!r:.40} before the connection was confirmed")
            handler(link, term)  # type: ignore[misc]
        except _Malformed as exc:
            logger.warning("node %s: %r: protocol error during set-up: %s", self.id, link, exc)
            self._refuse(link, "protocol")

    def _decides(self, peer: _Peer) -> bool:
        """True if this node confirms the connections of the pair (the smaller id does)."""
        return self.id < peer.id

    def _hs_hello(self, link: _Link, m: list) -> None:
        _need(link.state == _L_AWAIT_HELLO and len(m) == 3, "unexpected hello")
        token, explicit = m[1], m[2]
        _need(type(token) is int and 0 <= token < 2**63 and type(explicit) is bool, "malformed hello")
        conn = link.conn
        _need(conn.peer_id != self.id, "a node with this node's own id")
        peer = self._peer(conn.peer_id)
        link.peer = peer
        link.token = token
        peer.links.add(link)
        if not self._check_incarnation(peer, link):
            return
        if peer.blocked:
            if not explicit:
                self._refuse(link, "disconnected")
                return
            peer.blocked = False  # the peer called connect: that lifts our block too
        if self._decides(peer):
            self._decide(link)
        else:
            link.state = _L_AWAIT_WELCOME
            conn.send(["ready"])

    def _pending_peer(self, link: _Link, states: tuple[str, ...], decider: bool | None, what: str) -> _Peer:
        """The peer of a connection being set up, if `what` may arrive on it now."""
        peer = link.peer
        if peer is None or link.state not in states or (decider is not None and self._decides(peer) != decider):
            raise _Malformed(f"unexpected {what} in state {link.state!r}")
        return peer

    def _hs_ready(self, link: _Link, m: list) -> None:
        self._pending_peer(link, (_L_HELLO_SENT,), True, "ready")
        self._decide(link)

    def _hs_welcome(self, link: _Link, m: list) -> None:
        self._pending_peer(link, (_L_HELLO_SENT, _L_AWAIT_WELCOME), False, "welcome")
        self._confirm(link)

    def _hs_alive_query(self, link: _Link, m: list) -> None:
        peer = self._pending_peer(link, (_L_HELLO_SENT, _L_AWAIT_WELCOME), False, "alive?")
        _need(len(m) == 2 and type(m[1]) is int, "malformed alive?")
        token = m[1]
        candidates = [peer.link] if peer.link is not None else []
        alive = any(
            other is not link and other.token == token and not other.conn.closed
            for other in (*candidates, *peer.links)
        )
        link.conn.send(["alive", token, alive])

    def _hs_alive(self, link: _Link, m: list) -> None:
        peer = self._pending_peer(link, (_L_ASKED,), True, "alive")
        _need(len(m) == 3 and type(m[1]) is int and type(m[2]) is bool, "malformed alive")
        current = self._live_link(peer)
        if current is None:
            self._welcome(link)
        elif current.token != m[1]:
            self._decide(link)  # the connection asked about is gone already; ask about the new one
        elif m[2]:
            self._refuse(link, "duplicate")
        else:
            # The peer lost the old connection before we noticed: it is down for us too.
            self._peer_down(peer, REPLACED)
            self._welcome(link)

    def _hs_reject(self, link: _Link, m: list) -> None:
        _need(len(m) == 2 and type(m[1]) is str, "malformed reject")
        reason = m[1][:100]
        link.refusal = reason
        peer = link.peer
        if reason == "disconnected" and peer is not None:
            peer.blocked = True
            peer.member = False
            self._stop_reconnect(peer)
        link.state = _L_CLOSED
        link.conn.close(f"refused by the peer: {reason}")
        if peer is not None:
            peer.links.discard(link)
            self._wake(peer)

    def _live_link(self, peer: _Peer) -> _Link | None:
        """The peer's confirmed connection, after taking down one that closed meanwhile."""
        current = peer.link
        if current is not None and current.conn.closed:
            self._peer_down(peer, current.conn.close_reason or "closed")
            current = None
        return current

    def _decide(self, link: _Link) -> None:
        peer = link.peer
        assert peer is not None
        current = self._live_link(peer)
        if current is None:
            self._welcome(link)
        else:
            link.state = _L_ASKED
            link.conn.send(["alive?", current.token])

    def _welcome(self, link: _Link) -> None:
        link.conn.send(["welcome"])
        self._confirm(link)

    def _refuse(self, link: _Link, reason: str) -> None:
        link.refusal = reason
        link.state = _L_CLOSED
        conn = link.conn
        if conn.established:
            conn.send(["reject", reason])
        conn.close(f"refused: {reason}")
        peer = link.peer
        if peer is not None:
            peer.links.discard(link)
            self._wake(peer)

    def _check_incarnation(self, peer: _Peer, link: _Link) -> bool:
        """`link` comes from one incarnation of `peer`: keep only the newest incarnation's links.

        Incarnations of a node follow one another, so between connections of two
        incarnations the one established later here is the newer one's (a hello can
        arrive late: a dead incarnation's must not take the live one down). Returns
        False, having refused `link`, when it is the older one.
        """
        creation = link.conn.peer_creation
        others = [other for other in peer.links if other is not link]
        if peer.link is not None:
            others.append(peer.link)
        if any(other.conn.peer_creation != creation and other.seq > link.seq for other in others):
            self._refuse(link, "an older incarnation")
            return False
        if peer.link is not None and peer.creation != creation:
            self._peer_down(peer, "restarted")
        for other in list(peer.links):
            if other.conn.peer_creation != creation:
                other.conn.close("a newer incarnation of the peer connected")
        return True

    def _confirm(self, link: _Link) -> None:
        """`link` is now the pair's connection: the peer is up."""
        peer = link.peer
        assert peer is not None
        if peer.link is not None and peer.link is not link:
            self._peer_down(peer, REPLACED)
        if link.timer is not None:
            link.timer.cancel()
            link.timer = None
        link.state = _L_UP
        peer.links.discard(link)
        conn = link.conn
        peer.link = link
        peer.conn = conn
        peer.creation = conn.peer_creation
        peer.member = True
        self._end_gossip(peer)
        peer.blocked = False
        if peer.kick is not None:
            peer.kick.set()  # a reconnect loop still sleeping ends now
        self._up[conn] = peer
        logger.info("node %s: %s is up (creation %d)", self.id, peer.id, peer.creation)
        self._send_members(conn, [other.id for other in self._up.values() if other is not peer])
        self._notify_node_monitors(NodeUp(peer.id))
        self._notify_services("peer_up", peer.id)
        self._wake(peer)

    def _send_members(self, conn: Connection, members: list[str]) -> None:
        """Tell a new peer the other members: `MEMBERS_PER_MESSAGE` ids at most per message.

        An empty list is sent too: every confirmed connection starts with ``members``.
        """
        step = MEMBERS_PER_MESSAGE
        for start in range(0, max(1, len(members)), step):
            self._send_member_list(conn, members[start:start + step])

    def _send_member_list(self, conn: Connection, members: list[str]) -> None:
        """One ``members`` message, halved until it fits the peer's frame limit.

        One id always fits: an id is at most `MAX_NODE_ID_LEN` characters and every
        peer takes frames of `pgregistry.transport.MIN_MAX_FRAME` bytes.
        """
        data = encode(["members", members])
        if len(data) <= conn.peer_max_frame or len(members) <= 1:
            conn.send_encoded(data)
            return
        half = len(members) // 2
        self._send_member_list(conn, members[:half])
        self._send_member_list(conn, members[half:])

    def _peer_down(self, peer: _Peer, reason: str) -> None:
        """The peer's confirmed connection is gone (or going): everything that follows."""
        link = peer.link
        if link is None:
            return
        conn = link.conn
        peer.link = None
        peer.conn = None
        link.state = _L_CLOSED
        self._up.pop(conn, None)
        logger.info("node %s: %s is down (%s)", self.id, peer.id, reason)
        out_monitors = peer.out_monitors
        if out_monitors:
            peer.out_monitors = {}
            for ref, watcher in out_monitors.items():
                proc = self.runtime.process(watcher)
                if proc is not None:
                    proc.deliver_down(ref, proc.monitor_target(ref), "noconnection")
        in_monitors = peer.in_monitors
        if in_monitors:
            peer.in_monitors = {}
            for ref, target in in_monitors.items():
                proc = self.runtime.process(target)
                if proc is not None:
                    proc.remove_watcher(ref)
        if not conn.closed:
            conn.close(reason)
        self._notify_services("peer_down", peer.id, reason)
        self._notify_node_monitors(NodeDown(peer.id, reason))
        if self._state == _RUNNING and peer.member and not peer.blocked:
            self._schedule_reconnect(peer)
        self._wake(peer)

    def _on_close(self, conn: Connection, reason: str) -> None:
        link = self._links.pop(conn, None)
        if link is None:
            return
        if link.timer is not None:
            link.timer.cancel()
            link.timer = None
        peer = link.peer
        if peer is None:
            link.state = _L_CLOSED
            return
        peer.links.discard(link)
        if peer.link is link:
            self._peer_down(peer, reason)
        else:
            link.state = _L_CLOSED
            self._wake(peer)
        self._maybe_forget(peer)

    def _notify_node_monitors(self, event: NodeUp | NodeDown) -> None:
        for pid in list(self._node_monitors):
            proc = self.runtime.process(pid)
            if proc is not None:
                proc.deliver(event)

    # -- peers, reconnects ------------------------------------------------------------

    def _peer(self, node_id: str) -> _Peer:
        peer = self._peers.get(node_id)
        if peer is None:
            peer = self._peers[node_id] = _Peer(node_id)
        return peer

    def _maybe_forget(self, peer: _Peer) -> None:
        """Drop the record of a peer that nothing refers to (no unbounded growth)."""
        if (
            peer.link is None
            and not peer.links
            and not peer.member
            and not peer.blocked
            and peer.route is None
            and not peer.waiters
            and (peer.reconnect is None or peer.reconnect.done() or peer.reconnect is asyncio.current_task())
        ):
            self._end_gossip(peer)
            self._peers.pop(peer.id, None)

    def _wake(self, peer: _Peer) -> None:
        waiters = peer.waiters
        if waiters:
            peer.waiters = []
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(None)

    async def _wait_change(self, peer: _Peer, timeout: float) -> None:
        """Wait until the peer's state changes, or `timeout` seconds (no error)."""
        assert self._loop is not None
        waiter = self._loop.create_future()
        peer.waiters.append(waiter)
        try:
            await asyncio.wait((waiter,), timeout=timeout)
        finally:
            if not waiter.done():
                waiter.cancel()

    def _should_dial(self, peer: _Peer) -> bool:
        return (
            self._state == _RUNNING
            and (peer.member or peer.gossip_tries > 0)
            and not peer.blocked
            and peer.link is None
        )

    def _schedule_reconnect(self, peer: _Peer, now: bool = False) -> None:
        task = peer.reconnect
        if task is not None and not task.done():
            if now and peer.kick is not None:
                peer.kick.set()
            return
        peer.kick = asyncio.Event()
        assert self._loop is not None
        peer.reconnect = self._loop.create_task(
            self._reconnect_loop(peer, now), name=f"pgregistry {self.id} reconnect {peer.id}"
        )

    def _stop_reconnect(self, peer: _Peer) -> None:
        self._end_gossip(peer)  # a task cancelled before it ran would not end its gossip itself
        task = peer.reconnect
        if task is not None and not task.done() and task is not asyncio.current_task():
            task.cancel()

    async def _reconnect_loop(self, peer: _Peer, now: bool) -> None:
        """Dial `peer` until it is up, with capped exponential backoff and jitter."""
        delay = self.reconnect_initial
        kick = peer.kick
        assert kick is not None
        attempts = 0
        try:
            while self._should_dial(peer):
                if not now:
                    with contextlib.suppress(TimeoutError):  # the usual way out: the delay is over
                        await asyncio.wait_for(kick.wait(), delay * (0.5 + 0.5 * random.random()))
                    kick.clear()
                    delay = min(delay * 2, self.reconnect_max)
                now = False
                if not self._should_dial(peer):
                    break
                if peer.links:
                    # A connection with this peer is being set up already (it dialled us, or a
                    # connect() of ours): let it finish rather than race it.
                    await self._wait_change(peer, self.handshake_timeout)
                    continue
                if peer.member:
                    attempts += 1
                    await self._redial(peer, attempts)
                    continue
                async with self._gossip_dials:
                    # The wait for a slot may have been long: the peer may have dialled us meanwhile.
                    if self._should_dial(peer) and not peer.member and not peer.links:
                        attempts += 1
                        peer.gossip_tries -= 1
                        await self._redial(peer, attempts)
        finally:
            if not peer.member:
                self._end_gossip(peer)
        # Given up (a node only heard of through gossip that never answered): forget it.
        self._maybe_forget(peer)

    async def _redial(self, peer: _Peer, attempt: int) -> None:
        """One dial of `peer`, then wait for the set-up's verdict (bounded by ``handshake_timeout``)."""
        address = peer.route or peer.id
        try:
            link = await self._dial(address, explicit=False, expect=peer.id)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log = logger.info if attempt == 1 else logger.debug
            log("node %s: redialling %s at %s failed (attempt %d): %r", self.id, peer.id, address, attempt, exc)
            return
        assert self._loop is not None
        deadline = self._loop.time() + self.handshake_timeout
        while link.state not in (_L_UP, _L_CLOSED) and self._loop.time() < deadline:
            await self._wait_change(peer, deadline - self._loop.time())


# --------------------------------------------------------------------------- benchmark

async def _bench_pong() -> None:
    """Answer ``(reply_to, t_sent)`` with ``(t_sent, t_received)`` (perf_counter_ns)."""
    while True:
        reply_to, t_sent = await receive()
        send(reply_to, (t_sent, time.perf_counter_ns()))


async def _bench_sink() -> None:
    """Count messages; answer ``("count", reply_to, n)`` once n have arrived."""
    seen = 0
    while True:
        msg = await receive()
        if type(msg) is tuple and msg[0] == "count":
            _, reply_to, expected = msg
            while seen < expected:
                await receive()
                seen += 1
            send(reply_to, seen)
            seen = 0
        else:
            seen += 1


class _BenchEcho(Server):
    async def handle_call(self, request: Any, caller: Pid) -> Any:
        return current_process().pid if request == "whoami" else request


async def _bench_serve(cookie: str) -> None:
    """The remote node of the benchmark (run in a child process): echo, pong and sink."""
    done = asyncio.Event()

    class StdinClosed(asyncio.Protocol):
        def connection_lost(self, exc: Exception | None) -> None:
            done.set()

    await asyncio.get_running_loop().connect_read_pipe(StdinClosed, os.fdopen(0, "rb", buffering=0))
    async with Node("bench-b", cookie=cookie) as node:
        await _BenchEcho.start(node, name="echo")
        node.register_name("pong", node.spawn(_bench_pong))
        node.register_name("sink", node.spawn(_bench_sink))
        print(f"READY {node.id}", flush=True)
        await done.wait()


def _percentiles(samples_ns: list[int]) -> str:
    samples_ns.sort()
    n = len(samples_ns)
    p50, p99, mean = samples_ns[n // 2] / 1e3, samples_ns[n * 99 // 100] / 1e3, sum(samples_ns) / n / 1e3
    return f"p50 {p50:6.1f} us  p99 {p99:6.1f} us  mean {mean:6.1f} us"


async def _bench_run(peer: str, cookie: str, rounds: int, stream: int) -> None:
    """Call, send and stream figures against the node `peer` (another OS process)."""
    clock = time.perf_counter_ns
    async with Node("bench-a", cookie=cookie) as node:
        await node.connect(peer)
        me = current_process().pid
        echo = await call(("echo", peer), "whoami")
        for i in range(2000):
            await call(echo, i)
        samples: list[int] = []
        for i in range(rounds):
            start = clock()
            await call(echo, i)
            samples.append(clock() - start)
        print(f"  call to a Server there, by pid ({rounds}):     {_percentiles(samples)}")
        samples = []
        for i in range(rounds // 4):
            start = clock()
            await call(("echo", peer), i)
            samples.append(clock() - start)
        print(f"  call by (name, node) ({rounds // 4}):            {_percentiles(samples)}")
        pong = ("pong", peer)
        for _ in range(1000):
            send(pong, (me, clock()))
            await receive()
        one_way: list[int] = []
        samples = []
        for _ in range(rounds):
            t_sent = clock()
            send(pong, (me, t_sent))
            _, t_received = await receive()
            one_way.append(t_received - t_sent)
            samples.append(clock() - t_sent)
        print(f"  send, one way (same-host monotonic clock):  {_percentiles(one_way)}")
        print(f"  send, then a send back (round trip):        {_percentiles(samples)}")
        sink = ("sink", peer)
        conn = node._peers[peer].conn
        assert conn is not None
        start_bytes = conn.bytes_sent
        start_time = time.perf_counter()
        batch = 1000
        for i in range(0, stream, batch):
            for j in range(i, i + batch):
                send(sink, ("job", j))
            await conn.drain()
        send(sink, ("count", me, stream))
        assert await receive(60) == stream
        elapsed = time.perf_counter() - start_time
        print(
            f"  {stream} sends, received and counted there:  {stream / elapsed:,.0f} messages/s, "
            f"{(conn.bytes_sent - start_bytes) / stream:.0f} bytes each on the wire"
        )


def _bench() -> None:
    import subprocess
    import sys

    if "--serve" in sys.argv:
        cookie = sys.argv[sys.argv.index("--serve") + 1]
        serve_factory: Callable[[], asyncio.AbstractEventLoop] = asyncio.new_event_loop
        if "--uvloop" in sys.argv:
            import uvloop

            serve_factory = uvloop.new_event_loop
        with asyncio.Runner(loop_factory=serve_factory) as runner:
            runner.run(_bench_serve(cookie))
        return
    factories: list[tuple[str, Callable[[], asyncio.AbstractEventLoop]]] = [("asyncio", asyncio.new_event_loop)]
    try:
        import uvloop
    except ImportError:
        print("(uvloop not installed: standard loop only)")
    else:
        factories.append(("uvloop", uvloop.new_event_loop))
    if "--uvloop" in sys.argv[1:]:
        factories = factories[1:]
    elif "--asyncio" in sys.argv[1:]:
        factories = factories[:1]
    rounds, stream = 20_000, 200_000
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    for name, factory in factories:
        cookie = secrets.token_urlsafe(16)
        # Not "-m pgregistry.node": the package imports this module first, and runpy would
        # then run a second copy of it.
        args = [sys.executable, "-c", "from pgregistry.node import _bench; _bench()", "--serve", cookie]
        if name == "uvloop":
            args.append("--uvloop")
        child = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, cwd=root)
        try:
            assert child.stdout is not None
            line = child.stdout.readline().decode().split()
            if len(line) != 2 or line[0] != "READY":
                raise RuntimeError(f"the benchmark's remote node did not start: {line!r}")
            print(f"{name} loop (both nodes), two nodes in two OS processes on loopback:")
            with asyncio.Runner(loop_factory=factory) as runner:
                runner.run(_bench_run(line[1], cookie, rounds, stream))
        finally:
            child.kill()
            child.wait()


if __name__ == "__main__":
    _bench()
