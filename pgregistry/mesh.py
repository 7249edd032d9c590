"""The mesh: a node's connections to its peers, confirmed, gossiped and redialled (layer 3).

In the manner of Erlang's distribution: every pair of connected nodes keeps exactly one
confirmed connection (over the transport's authenticated `Connection`), and the mesh is
full: connecting to one member joins the whole cluster.

* Confirm step, after the transport handshake: the dialler proposes the connection
  (``propose``); of the two nodes the one with the smaller id, the *decider*, confirms
  or refuses every connection of the pair (``confirm`` / ``refuse``), asking the other
  whether an older connection is still alive (``alive?`` / ``alive``) when it holds one.
  A new creation of a connected peer takes the old incarnation down (``"restarted"``).
  A connection not confirmed within ``confirm_timeout`` is closed.
* Membership: each side of a new connection lists its other peers (``members``) and
  the receiver dials those it does not know, within its gossip caps; a node known only
  through gossip is dialled at most `GOSSIP_ATTEMPTS` times, then forgotten.
* A lost member is redialled by both sides with capped exponential backoff and jitter,
  at its route (`Mesh.add_route`) or its id's host:port. ``disconnect`` blocks the pair
  until either side connects explicitly; ``leave`` (a node stopping) is not redialled.

Messages of confirmed connections other than ``members``, ``disconnect`` and ``leave``
go to the handlers the owner installs with `Mesh.route` (`pgregistry.remote`). The mesh
knows nothing of processes or services: it reports peers up and down to its owner.

* Tools: a connection whose dialler sends ``["tool", TOOL_VERSION]`` instead of
  ``propose`` (an operator's command, authenticated by the cookie like any peer) never
  becomes a peer: it is not confirmed, gossiped in ``members`` or reported up or down;
  its messages go to the owner's `Mesh.on_tool`. A node without one refuses it.

The full protocol is in docs/protocol.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
import random
import secrets
from collections.abc import Callable, Mapping
from typing import Any, Final

from .logbudget import LogBudget
from .terms import Pid, Ref, short_repr
from .transport import MAX_NODE_ID_LEN, Connection, Endpoint, parse_address
from .wire import encode

__all__ = [
    "Disconnected",
    "GOSSIP_ATTEMPTS",
    "MEMBERS_PER_MESSAGE",
    "REPLACED",
    "PROPOSED",
    "TOOL_VERSION",
    "MalformedMessage",
    "Mesh",
    "PeerHandler",
    "PeerRecord",
    "need",
]

# The node layer logs under one name, whichever of its modules speaks.
logger = logging.getLogger("pgregistry.node")

REPLACED: Final = "connection replaced"
"""The ``peer_down``/``NodeDown`` reason when a peer reconnected before its old connection
was seen to fail: the peer itself never went away."""

#: Dials to a node known only from ``members`` gossip before giving up on it (a node
#: that was ever connected is redialled until it leaves or is disconnected).
GOSSIP_ATTEMPTS: Final = 5

#: Most ids a node lists in one ``members`` message it sends (more go in several
#: messages), and so the smallest ``max_members_per_message`` a node may be given.
MEMBERS_PER_MESSAGE: Final = 256

# States of one connection as the mesh sees it.
DIALED: Final = "dialed"  # we dialled; the transport handshake is done, not proposed yet
AWAIT_PROPOSAL: Final = "await proposal"  # we accepted; waiting for the dialler's propose
PROPOSED: Final = "proposed"  # we dialled and proposed; waiting for the verdict
AWAIT_CONFIRM: Final = "await confirm"  # we accepted, said ready; the peer decides
ASKED: Final = "asked"  # we decide and asked "alive?" about the old connection
UP: Final = "up"
CLOSED: Final = "closed"
TOOL: Final = "tool"  # an operator's tool, never a peer

TOOL_VERSION: Final = 1
"""The version of the tool exchange (``["tool", version]`` opens it)."""


class Disconnected(ConnectionError):
    """A dial refused because a ``disconnect`` blocks the pair (on either side); ``peer`` is its id."""

    def __init__(self, peer: str, message: str) -> None:
        super().__init__(message)
        self.peer = peer


class MalformedMessage(Exception):
    """A message from a peer that does not follow the node protocol."""


def need(ok: bool, what: str) -> None:
    """Raise `MalformedMessage` saying `what` unless `ok`."""
    if not ok:
        raise MalformedMessage(what)


class _PeerLink:
    """One transport connection to a peer as the mesh sees it: being confirmed, then up."""

    __slots__ = ("conn", "peer", "token", "state", "address", "refusal", "timer", "seq")

    def __init__(self, conn: Connection, state: str, seq: int) -> None:
        self.conn = conn
        self.seq = seq  # order in which this node's connections were established
        self.peer: PeerRecord | None = None
        self.token = 0
        self.state = state
        self.address: str | None = None  # what we dialled, for a connection we initiated
        self.refusal: str | None = None  # the reason a "refuse" gave, either way
        self.timer: asyncio.TimerHandle | None = None

    def __repr__(self) -> str:
        peer = self.peer.id if self.peer is not None else self.conn.peer_id or "?"
        return f"<link {'to' if self.conn.initiated else 'from'} {peer} {self.state}>"


class PeerRecord:
    """Everything the node knows about one other node, connected or not.

    The mesh keeps the connection state; the monitor tables belong to
    `pgregistry.remote`, kept here so that a lost peer's monitors are found with it.
    """

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
        "hurried_at",
        "out_monitors",
        "in_monitors",
        "waiters",
    )

    def __init__(self, node_id: str) -> None:
        self.id = node_id
        self.link: _PeerLink | None = None  # the confirmed connection
        self.conn: Connection | None = None  # its transport connection (hot path)
        self.creation = 0  # of the connected incarnation
        self.links: set[_PeerLink] = set()  # connections still being confirmed
        self.route: str | None = None  # the address to dial, if not the id's host:port
        self.member = False  # remembered: redialled after a loss
        self.blocked = False  # disconnected: never dialled until an explicit connect
        self.disconnected_at = 0  # the mesh's disconnect count when it last disconnected this peer
        self.gossip_tries = 0  # dials left for a node only heard of through ``members``
        self.reconnect: asyncio.Task[None] | None = None
        self.kick: asyncio.Event | None = None  # wakes the reconnect loop early
        self.hurried_at = -math.inf  # loop time of the last redial that gossip hurried
        self.out_monitors: dict[Ref, Pid] = {}  # monitors local watchers hold there: ref -> watcher
        self.in_monitors: dict[Ref, Pid] = {}  # monitors its processes hold here: ref -> local target
        self.waiters: list[asyncio.Future[None]] = []  # woken on every state change


#: A handler of one kind of message on a confirmed connection: ``handler(peer, message)``;
#: it raises `MalformedMessage` for a message of the wrong shape.
PeerHandler = Callable[[PeerRecord, list], None]


class Mesh:
    """The connections of one node: confirm step, membership gossip, redials.

    Made by the node with its id, ``make_endpoint(on_connection=, on_message=,
    on_close=)`` (the node's `Endpoint` with every setting but the mesh's callbacks:
    the mesh owns it), its gossip caps and three callbacks: ``running()`` (may the mesh connect and redial?),
    ``on_peer_up(record)`` once a connection is confirmed and ``on_peer_down(record,
    reason)`` once it is lost (the record's monitor tables still full). The node gives
    its timeouts to `start` and sets the id once the endpoint is bound (`set_id`).
    Every method runs on the node's loop thread.
    """

    def __init__(
        self,
        node_id: str,
        make_endpoint: Callable[..., Endpoint],
        *,
        max_members_per_message: int,
        max_gossip_peers: int,
        max_gossip_dials: int,
        running: Callable[[], bool],
        on_peer_up: Callable[[PeerRecord], None],
        on_peer_down: Callable[[PeerRecord, str], None],
    ) -> None:
        self.id = node_id
        self.max_members_per_message = max_members_per_message
        self.max_gossip_peers = max_gossip_peers
        # The node's settings of the same names, given to `start`.
        self.confirm_timeout = 0.0
        self.reconnect_initial = 0.0
        self.reconnect_max = 0.0
        self._running = running
        self._on_peer_up = on_peer_up
        self._on_peer_down = on_peer_down
        self.endpoint = make_endpoint(
            on_connection=self._on_connection, on_message=self._on_message, on_close=self._on_close
        )
        self._loop: asyncio.AbstractEventLoop | None = None
        self.peers: dict[str, PeerRecord] = {}
        self.up: dict[Connection, PeerRecord] = {}  # confirmed connections, in the order they came up
        # Nodes known only through gossip and still being dialled: at most max_gossip_peers.
        self._gossiped: set[PeerRecord] = set()
        # Held by a gossip dial from its first byte to its verdict.
        self._gossip_dials = asyncio.Semaphore(max_gossip_dials)
        self._disconnects = 0  # `disconnect` calls so far: a connect begun before one yields to it
        self._links: dict[Connection, _PeerLink] = {}
        self._next_link_seq: Callable[[], int] = itertools.count(1).__next__
        self._input_log = LogBudget(logger, f"node {self.endpoint.name}")
        self._handlers: dict[str, PeerHandler] = {
            "members": self._on_members,
            "disconnect": self._on_disconnect,
            "leave": self._on_leave,
        }
        self.on_tool: Callable[[Connection, Any], None] | None = None  # a tool connection's messages
        self.leaving = False  # stopping: refuse new connections with "leaving"
        self._confirm_step_handlers: dict[str, Callable[[_PeerLink, list], None]] = {
            "tool": self._on_tool_hello,
            "propose": self._on_propose,
            "ready": self._on_ready,
            "confirm": self._on_confirm,
            "alive?": self._on_alive_query,
            "alive": self._on_alive,
            "refuse": self._on_refuse,
        }

    def route(self, handlers: Mapping[str, PeerHandler]) -> None:
        """Hand the messages of these kinds, on confirmed connections, to these handlers."""
        clash = set(handlers) & {"members", "disconnect", "leave"}
        if clash:
            raise ValueError(f"the mesh handles {sorted(clash)} itself")
        self._handlers.update(handlers)

    # -- lifecycle ----------------------------------------------------------------------

    async def start(self, creation: int, *, handshake_timeout: float, confirm_timeout: float,
                    reconnect_initial: float, reconnect_max: float) -> int:
        """Listen as incarnation `creation`; return the bound port (call `set_id` next).

        The timeouts are the node's, checked. An `OSError` (a port in use) propagates;
        the mesh is then unusable.
        """
        self._loop = asyncio.get_running_loop()
        self.confirm_timeout = confirm_timeout
        self.reconnect_initial = reconnect_initial
        self.reconnect_max = reconnect_max
        endpoint = self.endpoint
        endpoint.creation = creation
        endpoint.handshake_timeout = handshake_timeout
        _host, port = await endpoint.start()
        return port

    def set_id(self, node_id: str) -> None:
        """The node's id, once its port is known: announced in every handshake."""
        self.id = node_id
        self.endpoint.node_id = node_id

    async def close(self) -> None:
        """Say ``leave`` to every peer, stop redialling, close the endpoint.

        Queued output is written before the sockets close. Cancellation leaves the
        endpoint closing in the background.
        """
        for peer in list(self.up.values()):
            conn = peer.conn
            if conn is not None and conn.established:
                conn.send(["leave"])
        reconnects = [peer.reconnect for peer in self.peers.values() if peer.reconnect is not None]
        for task in reconnects:
            task.cancel()
        if reconnects:
            await asyncio.gather(*reconnects, return_exceptions=True)
        await self.endpoint.close()
        for peer in self.peers.values():
            self._wake(peer)

    # -- what the node's public face asks -----------------------------------------------

    async def connect(self, address: str, *, explicit: bool = True) -> str:
        """See `Node.connect`: dial `address`, wait for the confirm step, return the peer's id.

        The dial is bounded by the transport's ``handshake_timeout``, the wait for the
        verdict by ``confirm_timeout`` (`TimeoutError`). Cancellation ends the wait only:
        a connection already proposed may still be confirmed.

        ``explicit=False`` (a dial on behalf of discovery, not of a user): a
        ``disconnect`` block holds against it (`Disconnected`, on either side), and it
        takes a slot of ``max_gossip_dials`` like a gossip dial, holding it until the
        verdict; the wait for a slot is not bounded by the timeouts above.
        """
        parse_address(address)
        if explicit:
            return await self._connect(address, explicit=True)
        async with self._gossip_dials:
            return await self._connect(address, explicit=False)

    async def _connect(self, address: str, *, explicit: bool) -> str:
        host, port = parse_address(address)
        expect: str | None = None
        dial = address
        if "@" in address:
            expect = address
            if address == self.id:
                raise ValueError(f"connect: {address} is this node")
            known = self.peers.get(address)
            if known is not None:
                if explicit:
                    known.blocked = False
                elif known.blocked and known.link is None:
                    raise Disconnected(address, f"connect to {address}: disconnected from {address}")
                if known.link is not None:
                    return address
                dial = known.route or address
        else:
            for peer in self.up.values():
                if peer.route == address or parse_address(peer.id) == (host, port):
                    if explicit:
                        peer.blocked = False
                    return peer.id
        link = await self._dial(dial, explicit=explicit, expect=expect)
        record = link.peer
        assert record is not None
        if dial is address and expect is None:
            record.route = address
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.confirm_timeout
        while record.link is None:
            if not self._running():
                raise ConnectionError(f"connect to {address}: node {self.id} stopped")
            if link.state == CLOSED and not record.links:
                why = link.refusal or link.conn.close_reason or "closed"
                if link.refusal == "disconnected":
                    raise Disconnected(record.id, f"connect to {address} ({record.id}) failed: {why}")
                raise ConnectionError(f"connect to {address} ({record.id}) failed: {why}")
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise TimeoutError(
                    f"connect to {address}: {record.id} did not confirm within {self.confirm_timeout} s"
                )
            await self._wait_change(record, remaining)
        return record.id

    async def disconnect(self, peer: str) -> None:
        """See `Node.disconnect`: block `peer` both ways; return once its connections closed.

        The wait is bounded by ``confirm_timeout``; cancelling it leaves the block in
        place and the connections closing.
        """
        record = self.peer(peer)
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
            self.peer_down(record, "disconnect")
        for pending in list(record.links):
            closing.append(pending.conn)
            self._refuse(pending, "disconnected")
        if closing:
            await asyncio.wait(
                [asyncio.ensure_future(conn.wait_closed()) for conn in closing], timeout=self.confirm_timeout
            )

    def peer(self, node_id: str) -> PeerRecord:
        """The record of `node_id`, made if there is none."""
        peer = self.peers.get(node_id)
        if peer is None:
            peer = self.peers[node_id] = PeerRecord(node_id)
        return peer

    # -- incoming messages ----------------------------------------------------------------

    def _on_message(self, conn: Connection, term: Any) -> None:
        peer = self.up.get(conn)
        if peer is None:
            self._confirm_step_message(conn, term)
            return
        try:
            handler = self._handlers[term[0]]
        except (KeyError, TypeError, IndexError):
            self._log_malformed(peer.id, "unknown message", term)
            return
        try:
            handler(peer, term)
        except MalformedMessage as exc:
            self._log_malformed(peer.id, str(exc), term)
        except Exception:
            logger.exception("node %s: handling %.200r from %s failed", self.id, term, peer.id)

    def _log_malformed(self, peer_id: str, what: str, term: Any) -> None:
        self._log_limited("node %s: dropped a malformed message from %s (%s): %s", self.id, peer_id, what,
                          short_repr(term, 200))

    def _log_limited(self, msg: str, *args: Any) -> None:
        """A warning about what a peer sent, within the node's budget (peers may flood)."""
        self._input_log.warning(msg, *args)

    # -- the confirm step -------------------------------------------------------------------

    def _on_connection(self, conn: Connection) -> None:
        if self.leaving or not self._running():
            reason = "leaving" if self.leaving else "node not running"
            if not conn.initiated and conn.established:
                conn.send(["refuse", reason])  # the dialler's connect names the reason
            conn.close(reason)
            return
        link = _PeerLink(conn, DIALED if conn.initiated else AWAIT_PROPOSAL, self._next_link_seq())
        self._links[conn] = link
        assert self._loop is not None
        link.timer = self._loop.call_later(self.confirm_timeout, self._confirm_timed_out, link)

    def _confirm_timed_out(self, link: _PeerLink) -> None:
        link.timer = None
        if link.state not in (UP, CLOSED):
            logger.warning("node %s: %r not confirmed within %g s; closing it", self.id, link, self.confirm_timeout)
            link.conn.close("connection not confirmed in time")

    async def _dial(self, address: str, *, explicit: bool, expect: str | None) -> _PeerLink:
        """Open a connection to `address` and propose it; the verdict comes later."""
        disconnects_before = self._disconnects
        conn = await self.endpoint.connect(address)
        link = self._links.get(conn)
        if link is None or conn.closed:
            raise ConnectionError(f"connection to {address} closed during set-up: {conn.close_reason}")
        peer_id = conn.peer_id
        problem = None
        blocked = False
        if not self._running():
            problem = f"node {self.id} is not running"
        elif peer_id == self.id:
            problem = f"{address} is this node's own id"
        elif expect is not None and peer_id != expect:
            problem = f"{address} is node {peer_id}, not {expect}"
        elif not explicit and self.peer(peer_id).blocked:
            problem, blocked = f"disconnected from {peer_id}", True
        elif self.peer(peer_id).disconnected_at > disconnects_before:
            problem, blocked = f"disconnected from {peer_id} while connecting", True  # the later call wins
        if problem is not None:
            conn.close(problem)
            if blocked:
                raise Disconnected(peer_id, problem)
            raise ConnectionError(problem)
        peer = self.peer(peer_id)
        if explicit:
            peer.blocked = False
        link.peer = peer
        link.address = address
        link.token = secrets.randbits(62)
        peer.links.add(link)
        if not self._check_incarnation(peer, link):
            raise ConnectionError(f"{address} answered as an older incarnation of {peer_id}")
        link.state = PROPOSED
        conn.send(["propose", link.token, explicit])
        return link

    def _confirm_step_message(self, conn: Connection, term: Any) -> None:
        link = self._links.get(conn)
        if link is None or link.state == CLOSED:
            return
        if link.state == TOOL:
            if self.on_tool is not None:
                self.on_tool(conn, term)
            return
        try:
            need(type(term) is list and len(term) > 0 and type(term[0]) is str, "not a tagged list")
            handler = self._confirm_step_handlers.get(term[0])
            need(handler is not None, f"unexpected {term[0]!r:.40} before the connection was confirmed")
            handler(link, term)  # type: ignore[misc]
        except MalformedMessage as exc:
            logger.warning("node %s: %r: protocol error during the confirm step: %s", self.id, link, exc)
            self._refuse(link, "protocol")

    def _on_tool_hello(self, link: _PeerLink, m: list) -> None:
        need(link.state == AWAIT_PROPOSAL and len(m) == 2, "unexpected tool hello")
        if m[1] != TOOL_VERSION:
            self._refuse(link, f"tool version {TOOL_VERSION} only")
            return
        if self.on_tool is None:
            self._refuse(link, "this node serves no tools")
            return
        link.state = TOOL
        if link.timer is not None:
            link.timer.cancel()
            link.timer = None
        link.conn.send(["tool", TOOL_VERSION])

    def _decides(self, peer: PeerRecord) -> bool:
        """True if this node confirms the connections of the pair (the smaller id does)."""
        return self.id < peer.id

    def _on_propose(self, link: _PeerLink, m: list) -> None:
        need(link.state == AWAIT_PROPOSAL and len(m) == 3, "unexpected propose")
        if self.leaving:
            self._refuse(link, "leaving")
            return
        token, explicit = m[1], m[2]
        need(type(token) is int and 0 <= token < 2**63 and type(explicit) is bool, "malformed propose")
        conn = link.conn
        need(conn.peer_id != self.id, "a node with this node's own id")
        peer = self.peer(conn.peer_id)
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
            link.state = AWAIT_CONFIRM
            conn.send(["ready"])

    def _pending_peer(self, link: _PeerLink, states: tuple[str, ...], decider: bool | None, what: str) -> PeerRecord:
        """The peer of a connection being confirmed, if `what` may arrive on it now."""
        peer = link.peer
        if peer is None or link.state not in states or (decider is not None and self._decides(peer) != decider):
            raise MalformedMessage(f"unexpected {what} in state {link.state!r}")
        return peer

    def _on_ready(self, link: _PeerLink, m: list) -> None:
        self._pending_peer(link, (PROPOSED,), True, "ready")
        self._decide(link)

    def _on_confirm(self, link: _PeerLink, m: list) -> None:
        self._pending_peer(link, (PROPOSED, AWAIT_CONFIRM), False, "confirm")
        self._confirm(link)

    def _on_alive_query(self, link: _PeerLink, m: list) -> None:
        peer = self._pending_peer(link, (PROPOSED, AWAIT_CONFIRM), False, "alive?")
        need(len(m) == 2 and type(m[1]) is int, "malformed alive?")
        token = m[1]
        candidates = [peer.link] if peer.link is not None else []
        alive = any(
            other is not link and other.token == token and not other.conn.closed
            for other in (*candidates, *peer.links)
        )
        link.conn.send(["alive", token, alive])

    def _on_alive(self, link: _PeerLink, m: list) -> None:
        peer = self._pending_peer(link, (ASKED,), True, "alive")
        need(len(m) == 3 and type(m[1]) is int and type(m[2]) is bool, "malformed alive")
        current = self._live_link(peer)
        if current is None:
            self._confirm_as_decider(link)
        elif current.token != m[1]:
            self._decide(link)  # the connection asked about is gone already; ask about the new one
        elif m[2]:
            self._refuse(link, "duplicate")
        else:
            # The peer lost the old connection before we noticed: it is down for us too.
            self.peer_down(peer, REPLACED)
            self._confirm_as_decider(link)

    def _on_refuse(self, link: _PeerLink, m: list) -> None:
        need(len(m) == 2 and type(m[1]) is str, "malformed refuse")
        reason = m[1][:100]
        peer = link.peer
        if reason == "disconnected" and peer is not None:
            peer.blocked = True
            peer.member = False
            self._stop_reconnect(peer)
        self._close_link(link, reason, f"refused by the peer: {reason}")

    def _refuse(self, link: _PeerLink, reason: str) -> None:
        """Tell the peer `reason` (if the connection still takes output) and close `link`."""
        logger.info("node %s: refused a connection from %s: %s", self.id, link.conn.peer_id, reason,
                    extra={"node": self.id, "event": "refused", "peer": link.conn.peer_id})
        if link.conn.established:
            link.conn.send(["refuse", reason])
        self._close_link(link, reason, f"refused: {reason}")

    def _close_link(self, link: _PeerLink, refusal: str, close_reason: str) -> None:
        """A refused connection: closed, no longer a candidate of its peer."""
        link.refusal = refusal
        link.state = CLOSED
        link.conn.close(close_reason)
        peer = link.peer
        if peer is not None:
            peer.links.discard(link)
            self._wake(peer)

    def _live_link(self, peer: PeerRecord) -> _PeerLink | None:
        """The peer's confirmed connection, after taking down one that closed meanwhile."""
        current = peer.link
        if current is not None and current.conn.closed:
            self.peer_down(peer, current.conn.close_reason or "closed")
            current = None
        return current

    def _decide(self, link: _PeerLink) -> None:
        peer = link.peer
        assert peer is not None
        current = self._live_link(peer)
        if current is None:
            self._confirm_as_decider(link)
        else:
            link.state = ASKED
            link.conn.send(["alive?", current.token])

    def _confirm_as_decider(self, link: _PeerLink) -> None:
        link.conn.send(["confirm"])
        self._confirm(link)

    def _check_incarnation(self, peer: PeerRecord, link: _PeerLink) -> bool:
        """`link` comes from one incarnation of `peer`: keep only the newest incarnation's links.

        Incarnations of a node follow one another, so between connections of two
        incarnations the one established later here is the newer one's (a proposal can
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
            self.peer_down(peer, "restarted")
        for other in list(peer.links):
            if other.conn.peer_creation != creation:
                other.conn.close("a newer incarnation of the peer connected")
        return True

    def _confirm(self, link: _PeerLink) -> None:
        """`link` is now the pair's connection: the peer is up."""
        peer = link.peer
        assert peer is not None
        if peer.link is not None and peer.link is not link:
            self.peer_down(peer, REPLACED)
        if link.timer is not None:
            link.timer.cancel()
            link.timer = None
        link.state = UP
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
        self.up[conn] = peer
        logger.info("node %s: %s is up (creation %d)", self.id, peer.id, peer.creation,
                    extra={"node": self.id, "event": "peer_up", "peer": peer.id})
        self.send_members(conn, [other.id for other in self.up.values() if other is not peer])
        self._on_peer_up(peer)
        self._wake(peer)

    # -- peers going down -----------------------------------------------------------------

    def peer_down(self, peer: PeerRecord, reason: str) -> None:
        """The peer's confirmed connection is gone (or going): everything that follows.

        The peer leaves `up`, its connection is closed, the owner's ``on_peer_down``
        runs, and a member that is not blocked is redialled.
        """
        link = peer.link
        if link is None:
            return
        conn = link.conn
        peer.link = None
        peer.conn = None
        link.state = CLOSED
        self.up.pop(conn, None)
        logger.info("node %s: %s is down (%s)", self.id, peer.id, reason,
                    extra={"node": self.id, "event": "peer_down", "peer": peer.id})
        if not conn.closed:
            conn.close(reason)
        self._on_peer_down(peer, reason)
        if self._running() and peer.member and not peer.blocked:
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
            link.state = CLOSED
            return
        peer.links.discard(link)
        if peer.link is link:
            self.peer_down(peer, reason)
        else:
            link.state = CLOSED
            self._wake(peer)
        self._maybe_forget(peer)

    def _on_disconnect(self, peer: PeerRecord, m: list) -> None:
        peer.blocked = True
        peer.member = False
        self._stop_reconnect(peer)
        self.peer_down(peer, "disconnect")

    def _on_leave(self, peer: PeerRecord, m: list) -> None:
        peer.member = False
        self._stop_reconnect(peer)
        self.peer_down(peer, "leave")

    def _maybe_forget(self, peer: PeerRecord) -> None:
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
            self.peers.pop(peer.id, None)

    def _wake(self, peer: PeerRecord) -> None:
        waiters = peer.waiters
        if waiters:
            peer.waiters = []
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(None)

    async def _wait_change(self, peer: PeerRecord, timeout: float) -> None:
        """Wait until the peer's state changes, or `timeout` seconds (no error)."""
        assert self._loop is not None
        waiter = self._loop.create_future()
        peer.waiters.append(waiter)
        try:
            await asyncio.wait((waiter,), timeout=timeout)
        finally:
            if not waiter.done():
                waiter.cancel()

    # -- membership gossip --------------------------------------------------------------------

    def send_members(self, conn: Connection, members: list[str]) -> None:
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

    def _on_members(self, peer: PeerRecord, m: list) -> None:
        need(len(m) == 2 and type(m[1]) is list, "members: malformed")
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
            other = self.peers.get(node_id)
            if other is not None:
                if other.blocked or other.link is not None or other in self._gossiped:
                    continue  # gossiped again while being dialled: no more dials than the first time
                if other.member:
                    # A lost member: hurry its redial, but at most once per shortest
                    # backoff step, or a peer repeating this message would drive a storm.
                    now = self._loop.time() if self._loop is not None else 0.0
                    if now - other.hurried_at >= self.reconnect_initial:
                        other.hurried_at = now
                        self._schedule_reconnect(other, now=True)
                    continue
            if len(self._gossiped) >= self.max_gossip_peers:
                over_cap += 1
                continue
            if other is None:
                other = self.peer(node_id)
            other.gossip_tries = GOSSIP_ATTEMPTS
            self._gossiped.add(other)
            self._schedule_reconnect(other, now=True)
        if over_cap:
            self._log_limited("node %s: %d members gossiped by %s ignored: %d nodes known only through "
                              "gossip are being dialled already (max_gossip_peers)", self.id, over_cap, peer.id,
                              len(self._gossiped))

    def _end_gossip(self, peer: PeerRecord) -> None:
        """`peer` is no longer dialled because of gossip (reached, given up, blocked or gone)."""
        peer.gossip_tries = 0
        self._gossiped.discard(peer)

    # -- redials ---------------------------------------------------------------------------

    def _should_dial(self, peer: PeerRecord) -> bool:
        return (
            self._running()
            and (peer.member or peer.gossip_tries > 0)
            and not peer.blocked
            and peer.link is None
        )

    def _schedule_reconnect(self, peer: PeerRecord, now: bool = False) -> None:
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

    def _stop_reconnect(self, peer: PeerRecord) -> None:
        self._end_gossip(peer)  # a task cancelled before it ran would not end its gossip itself
        task = peer.reconnect
        if task is not None and not task.done() and task is not asyncio.current_task():
            task.cancel()

    async def _reconnect_loop(self, peer: PeerRecord, now: bool) -> None:
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
                    # A connection with this peer is being confirmed already (it dialled us,
                    # or a connect() of ours): let it finish rather than race it.
                    await self._wait_change(peer, self.confirm_timeout)
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

    async def _redial(self, peer: PeerRecord, attempt: int) -> None:
        """One dial of `peer`, then wait for the verdict (bounded by ``confirm_timeout``)."""
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
        deadline = self._loop.time() + self.confirm_timeout
        while link.state not in (UP, CLOSED) and self._loop.time() < deadline:
            await self._wait_change(peer, deadline - self._loop.time())
