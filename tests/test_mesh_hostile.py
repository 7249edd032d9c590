"""An authenticated but hostile peer against the mesh: floods of ``members`` gossip, stolen ids.

Real nodes on 127.0.0.1. The hostile peer is a real node whose confirmed connection
carries forged ``members`` messages (any cookie holder can send them). The fake ids
point only at loopback addresses, of four kinds:

* a port bound but not listening (the dial is refused at once),
* ``127.0.0.2:1`` (refused at once: nothing listens there),
* a listener that accepts and closes at once (counts every dial that reaches it),
* a listener that accepts and says nothing (a dial holds its socket until the
  handshake times out; counts how many are open at the same time).

With TLS, the hostile peer holds the cookie and a certificate of the cluster's CA, but
for its own name, and claims another node's id.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from pgregistry.events import NodeDown
from pgregistry.node import GOSSIP_ATTEMPTS, MEMBERS_PER_MESSAGE, Node
from pgregistry.testing import LinkProxy
from pgregistry.transport import Endpoint, HandshakeError
from tests.helpers import eventually
from tests.test_distribution import COOKIE, address, connected, make_node, node_watcher, run_on, started
from tests.tls_certs import TestCA

# The caps a node has when none is given (documented on `Node`).
DEFAULT_MAX_GOSSIP_PEERS = 1024
DEFAULT_MAX_GOSSIP_DIALS = 32


class Listener:
    """A loopback listener that either closes every connection at once or holds it silently."""

    def __init__(self, hold: bool) -> None:
        self.hold = hold
        self.accepted = 0
        self.open = 0
        self.max_open = 0
        self.on_accept: Any = None  # called with no argument on each accept
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        self.open += 1
        self.max_open = max(self.max_open, self.open)
        if self.on_accept is not None:
            self.on_accept()
        try:
            if self.hold:
                with contextlib.suppress(ConnectionError):
                    # Whatever the dialler says goes unanswered, until it gives up.
                    while True:
                        if not await reader.read(4096):
                            break
        finally:
            self.open -= 1
            writer.transport.abort()

    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.ensure_future(self._serve(reader, writer))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    async def __aenter__(self) -> Listener:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0, backlog=1024)
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()


@contextlib.contextmanager
def refusing_port() -> Any:
    """A loopback port bound but not listening: connecting to it is refused, and nobody can take it meanwhile."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]
    finally:
        sock.close()


@contextlib.asynccontextmanager
async def targets() -> AsyncIterator[tuple[Listener, Listener, int]]:
    """The closing listener, the silent listener and the refusing port."""
    async with Listener(hold=False) as closer, Listener(hold=True) as silent:
        with refusing_port() as refused:
            yield closer, silent, refused


def fake_ids(count: int, closer: Listener, silent: Listener, refused: int, silent_every: int | None,
             prefix: str = "fake") -> list[str]:
    """`count` ids of nodes that do not exist; one in `silent_every` points at the silent listener."""
    ids = []
    for i in range(count):
        if silent_every is not None and i % silent_every == 0:
            where = f"127.0.0.1:{silent.port}"
        else:
            where = (f"127.0.0.1:{closer.port}", f"127.0.0.1:{refused}", "127.0.0.2:1")[i % 3]
        ids.append(f"{prefix}{i}@{where}")
    return ids


def gossip(sender: Node, to: Node, ids: list[str]) -> None:
    """`sender` sends `to` a real ``members`` message over their confirmed connection."""
    record = sender._peers[to.id]
    assert record.conn is not None, f"{sender.id} is not connected to {to.id}"
    record.conn.send(["members", ids])


def fake_records(node: Node, real: set[str]) -> int:
    return sum(1 for peer_id in list(node._peers) if peer_id not in real)


def reconnect_tasks(node: Node) -> list[asyncio.Task[Any]]:
    return [task for task in asyncio.all_tasks() if task.get_name().startswith(f"pgregistry {node.id} reconnect fake")]


class Peak:
    """Largest values seen of what the flood is allowed to grow, sampled while polling."""

    def __init__(self, node: Node, real: set[str], silent: Listener) -> None:
        self.node, self.real, self.silent = node, real, silent
        self.records = 0

    def sample(self) -> int:
        self.records = max(self.records, fake_records(self.node, self.real))
        return self.records

    def forgotten(self) -> bool:
        self.sample()
        return fake_records(self.node, self.real) == 0 and not reconnect_tasks(self.node)

    def report(self) -> str:
        return (f"fake records now {fake_records(self.node, self.real)}, peak {self.records}; "
                f"silent dials open {self.silent.open}, peak {self.silent.max_open}")


async def test_a_flood_of_fake_member_ids_leaves_the_node_up_with_its_peers_and_is_forgotten() -> None:
    # Default caps. The victim gives up on a silent dial after 0.5 s, so the test stays short.
    victim = make_node("victim")
    victim.handshake_timeout = victim.confirm_timeout = 0.5
    async with targets() as (closer, silent, refused), \
            started(victim, make_node("real"), make_node("mallory")) as (a, b, m):
        await b.connect(a.id)
        await m.connect(a.id)
        await connected(a, b, m)
        events = await node_watcher(a)
        real = {a.id, b.id, m.id}
        flood = fake_ids(20_000, closer, silent, refused, silent_every=25)
        gossip(m, a, flood)
        peak = Peak(a, real, silent)
        await eventually(lambda: peak.sample() > 0, 5.0, "the victim to read the flood")
        await eventually(peak.forgotten, 9.0, "every fake id to be given up and forgotten", report=peak.report)
        assert peak.records <= DEFAULT_MAX_GOSSIP_PEERS, peak.report()
        assert silent.max_open <= DEFAULT_MAX_GOSSIP_DIALS, peak.report()
        # Only ids within the caps were dialled, each at most GOSSIP_ATTEMPTS times.
        assert 0 < closer.accepted <= DEFAULT_MAX_GOSSIP_PEERS * GOSSIP_ATTEMPTS
        # The victim stayed up with its real peers: nobody went down, both still talk to it.
        assert a.running and set(a.peers()) == {b.id, m.id}
        assert set(b.peers()) == {a.id, m.id} and set(m.peers()) == {a.id, b.id}
        assert not any(isinstance(event, NodeDown) for event in drain_queue(events)), "a peer went down"
        # And it still takes gossip about real nodes once the flood is over.
        late = make_node("late")
        await run_on(a, late.start)
        try:
            await m.connect(late.id)
            gossip(m, a, [late.id])
            await connected(a, late)
        finally:
            await late.stop()


async def test_gossip_dials_and_gossiped_ids_stay_within_the_configured_caps() -> None:
    victim = make_node("victim", max_gossip_peers=40, max_gossip_dials=3)
    victim.handshake_timeout = victim.confirm_timeout = 0.4
    async with targets() as (closer, silent, refused), \
            started(victim, make_node("mallory")) as (a, m):
        await m.connect(a.id)
        await connected(a, m)
        real = {a.id, m.id}
        peak = Peak(a, real, silent)
        # Many small messages, none over the per-message cap: the total cap still holds.
        flood = fake_ids(2_000, closer, silent, refused, silent_every=10)
        for start in range(0, len(flood), 200):
            gossip(m, a, flood[start:start + 200])
        await eventually(lambda: silent.accepted >= 3, 5.0, "the victim to dial the silent listener")
        await eventually(peak.forgotten, 9.0, "every fake id to be given up and forgotten", report=peak.report)
        assert 0 < peak.records <= 40, peak.report()
        assert silent.max_open == 3, peak.report()  # the cap was reached, never passed
        assert set(a.peers()) == {m.id}


async def test_ids_beyond_max_members_per_message_are_ignored() -> None:
    victim = make_node("victim", max_members_per_message=300, max_gossip_peers=5_000)
    async with targets() as (closer, silent, refused), \
            started(victim, make_node("mallory")) as (a, m):
        await m.connect(a.id)
        await connected(a, m)
        peak = Peak(a, {a.id, m.id}, silent)
        ids = fake_ids(3_000, closer, silent, refused, silent_every=None)
        gossip(m, a, ids)
        await eventually(lambda: peak.sample() > 0, 5.0, "the victim to read the ids")
        await eventually(peak.forgotten, 9.0, "every fake id to be given up and forgotten", report=peak.report)
        assert peak.records == 300, peak.report()


async def test_a_member_list_goes_out_in_messages_every_peer_takes_whole() -> None:
    # What a node puts on the wire when it tells a new peer of many members: no message
    # lists more ids than the smallest per-message cap a node may have.
    received: list[Any] = []
    async with started(make_node("a")) as (a,):
        listener = Endpoint("listener", COOKIE, on_message=lambda conn, term: received.append(term))
        await listener.start()
        try:
            await listener.connect(address(a))
            [conn] = [c for c in a._endpoint.connections if c.peer_id == listener.node_id]
            ids = [f"member{i}@127.0.0.1:{1000 + i}" for i in range(600)]
            a._mesh.send_members(conn, ids)
            a._mesh.send_members(conn, [])
            await eventually(lambda: sum(len(term[1]) for term in received) == 600 and received[-1] == ["members", []],
                             5.0, "every member list to arrive")
        finally:
            await listener.close()
    assert all(term[0] == "members" and len(term[1]) <= MEMBERS_PER_MESSAGE for term in received), \
        [len(term[1]) for term in received]
    assert [node_id for term in received for node_id in term[1]] == ids


async def test_re_gossip_does_not_give_an_unreached_id_more_dials() -> None:
    # Every time the victim dials the ghost, mallory gossips the ghost again (twice).
    async with Listener(hold=False) as closer, \
            started(make_node("victim"), make_node("mallory")) as (a, m):
        await m.connect(a.id)
        await connected(a, m)
        ghost = f"ghost@127.0.0.1:{closer.port}"
        closer.on_accept = lambda: (gossip(m, a, [ghost]), gossip(m, a, [ghost, ghost]))
        gossip(m, a, [ghost])
        await eventually(lambda: closer.accepted > 0, 5.0, "the victim to dial the ghost")
        await eventually(lambda: ghost not in a._peers or closer.accepted > GOSSIP_ATTEMPTS, 5.0,
                         "the victim to give up on the ghost")
        assert closer.accepted == GOSSIP_ATTEMPTS
        assert a.peers() == [m.id]


def drain_queue(queue: asyncio.Queue[Any]) -> list[Any]:
    out = []
    while not queue.empty():
        out.append(queue.get_nowait())
    return out


async def test_with_tls_a_peer_cannot_connect_under_another_nodes_id(tmp_path: Path) -> None:
    ca = TestCA(tmp_path)
    async with started(make_node("a", **ca.node("a")), make_node("b", **ca.node("b"))) as (a, b):
        await b.connect(a.id)
        await connected(a, b)
        events = await node_watcher(a)
        # Mallory holds the cookie and a certificate of the cluster's CA, for its own name,
        # and claims to be a new incarnation of b.
        mallory = Endpoint("mallory", COOKIE, **ca.node("mallory"))
        await mallory.start()
        try:
            mallory.node_id, mallory.creation = b.id, b.creation + 1
            with pytest.raises(HandshakeError, match="does not prove node id"):
                await mallory.connect(address(a))
        finally:
            await mallory.close()
        # A whole node given a's certificate under another name gets nowhere either.
        impostor = make_node("c", **ca.node("a"))
        await run_on(a, impostor.start)
        try:
            with pytest.raises(HandshakeError, match="does not prove node id"):
                await impostor.connect(a.id)
        finally:
            await impostor.stop()
        # b was never taken down, and a node whose certificate names it joins.
        assert a.peers() == [b.id] and events.empty(), drain_queue(events)
        c = make_node("c", **ca.node("c"))
        await run_on(a, c.start)
        try:
            assert await c.connect(a.id) == a.id
            await connected(a, b, c)
        finally:
            await c.stop()


async def test_gossip_about_a_lost_member_hurries_its_redial_at_most_once_per_backoff_step() -> None:
    # A member lost without a goodbye is redialled with backoff; a members message naming
    # it may hurry the next dial, but a peer repeating that message cannot make a storm.
    victim = make_node("victim")
    victim.reconnect_initial, victim.reconnect_max = 0.2, 5.0  # settings taken at start
    async with Listener(hold=False) as closer, LinkProxy("127.0.0.1:1") as proxy, \
            started(victim, make_node("lost"), make_node("mallory")) as (a, lost, m):
        with refusing_port() as refused:
            proxy.target = address(lost)
            a.add_route(lost.id, proxy.address)  # the victim's link to `lost` runs through the proxy
            await a.connect(lost.id)
            await m.connect(a.id)
            await connected(a, lost, m)
            lost.add_route(a.id, f"127.0.0.1:{refused}")  # `lost` cannot come back by itself
            a.add_route(lost.id, f"127.0.0.1:{closer.port}")  # the victim's redials: counted, closed
            proxy.cut()
            await eventually(lambda: lost.id not in a.peers(), 5.0, "the victim to lose the member")
            dials_before = closer.accepted
            loop = asyncio.get_running_loop()
            until = loop.time() + 1.0
            while loop.time() < until:  # 1 s of gossip naming the lost member, 100 messages a second
                gossip(m, a, [lost.id])
                await asyncio.sleep(0.01)
            # At most one hurried dial per 0.2 s backoff step, plus the backoff's own.
            assert closer.accepted - dials_before <= 7, closer.accepted - dials_before
