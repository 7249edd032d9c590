"""Several nodes in one event loop, talking only over TCP: membership and remote processes.

Every node listens on 127.0.0.1 with an ephemeral port and small liveness settings
(tick 0.05 s, down after 0.3 s). Faults are real TCP events made by
`pgregistry.testing` proxies: each node of a proxied pair dials the other through its
own proxy (`Node.add_route`), so a cut link stays cut until it is restored.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from pgregistry.errors import AuthenticationError, CallTimeout, NoProcess, NotLocal, RemoteError
from pgregistry.events import Down, Join, NodeDown, NodeUp
from pgregistry.mesh import PROPOSED
from pgregistry.node import Node
from pgregistry.process import demonitor, exit, monitor, receive, send
from pgregistry.process import self as self_pid
from pgregistry.server import Server, call, cast
from pgregistry.terms import Pid, Ref
from pgregistry.testing import LinkProxy, Partition
from pgregistry.transport import Endpoint
from pgregistry.wire import encode
from tests.tls_certs import TestCA

COOKIE = "distribution-test-cookie"
TICK = 0.05
DOWN = 0.3
T = 5.0  # the bound on any single wait


def make_node(name: str, **kwargs: Any) -> Node:
    options: dict[str, Any] = {"cookie": COOKIE, "tick_interval": TICK, "down_after": DOWN}
    options.update(kwargs)
    return Node(name, **options)


def address(node: Node) -> str:
    return f"{node.host}:{node.port}"


@contextlib.asynccontextmanager
async def started(*nodes: Node) -> AsyncIterator[tuple[Node, ...]]:
    """Start the nodes (last first, so the calling task ends up a process of the first)."""
    running: list[Node] = []
    try:
        for node in reversed(nodes):
            await node.start()
            running.append(node)
        yield nodes
    finally:
        for node in nodes:
            await node.stop()


async def eventually(predicate: Callable[[], bool], what: str, timeout: float = T) -> None:
    """Poll `predicate` until it holds; fail after `timeout` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.005)


async def receive_matching(predicate: Callable[[Any], bool], timeout: float = T) -> tuple[Any, list[Any]]:
    """The first message matching `predicate`, and the ones received before it."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    skipped: list[Any] = []
    while True:
        msg = await receive(max(0.0, deadline - loop.time()))
        if predicate(msg):
            return msg, skipped
        skipped.append(msg)


async def mailbox() -> list[Any]:
    """Everything already in the caller's mailbox."""
    out = []
    while True:
        try:
            out.append(await receive(0))
        except TimeoutError:
            return out


async def run_on(node: Node, fn: Callable[..., Awaitable[Any]], *args: Any) -> Any:
    """Run ``fn(*args)`` in a new process of `node`; return its result or raise its error."""
    result: asyncio.Future[Any] = asyncio.get_running_loop().create_future()

    async def body() -> None:
        try:
            value = await fn(*args)
        except Exception as exc:
            result.set_exception(exc)
        else:
            result.set_result(value)

    node.spawn(body)
    return await asyncio.wait_for(result, T)


async def idle() -> None:
    while True:
        await receive()


async def collector(into: asyncio.Queue[Any]) -> None:
    """Forward every message to a queue the test reads."""
    while True:
        into.put_nowait(await receive())


async def node_watcher(node: Node) -> asyncio.Queue[Any]:
    """Start a process of `node` that monitors the nodes; its events arrive in the queue."""
    queue: asyncio.Queue[Any] = asyncio.Queue()
    subscribed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    async def watch() -> None:
        node.monitor_nodes()
        subscribed.set_result(None)
        await collector(queue)

    node.spawn(watch)
    await asyncio.wait_for(subscribed, T)
    return queue


async def exits_with(reason: Any) -> None:
    """Wait for "go", then end with `reason` (an exception is raised)."""
    assert await receive() == "go"
    if isinstance(reason, BaseException):
        raise reason
    if reason != "normal":
        exit(self_pid(), reason)
        await receive()


async def connected(*nodes: Node) -> None:
    """Wait until the nodes form a full mesh."""
    ids = {node.id for node in nodes}
    await eventually(
        lambda: all(set(node.peers()) >= ids - {node.id} for node in nodes), f"a full mesh of {sorted(ids)}"
    )


@contextlib.asynccontextmanager
async def proxied(a: Node, b: Node, mode: str = "cut") -> AsyncIterator[Partition]:
    """Connect `a` and `b` through a proxy in each direction (each node dials through its own)."""
    async with Partition.for_targets({"A": address(a), "B": address(b)}, mode=mode) as part:
        a.add_route(b.id, part.address("A", "B"))
        b.add_route(a.id, part.address("B", "A"))
        assert await a.connect(part.address("A", "B")) == b.id
        await connected(a, b)
        yield part


class Echo(Server):
    """A server for cross-node calls."""

    log: list[Any]

    async def init(self, log: list[Any] | None = None) -> None:
        self.log = log if log is not None else []

    async def handle_call(self, request: Any, caller: Pid) -> Any:
        match request:
            case ("wait", seconds):
                await asyncio.sleep(seconds)
                return "late"
            case ("crash", text):
                raise ValueError(text)
            case "whoami":
                return (self_pid(), caller)
        return request

    async def handle_cast(self, msg: Any) -> None:
        self.log.append(msg)

    async def handle_info(self, msg: Any) -> None:
        self.log.append(("info", msg))


# -- construction and start ------------------------------------------------------------


def test_down_after_must_be_twice_tick_interval() -> None:
    with pytest.raises(ValueError, match="down_after") as info:
        Node("a", tick_interval=1.0, down_after=1.5)
    assert "tick_interval" in str(info.value)
    Node("a", tick_interval=1.0, down_after=2.0)


def test_tls_contexts_are_checked_at_construction() -> None:
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    with pytest.raises(ValueError, match="client-only"):
        Node("a", ssl=client)
    with pytest.raises(ValueError, match="client_ssl"):
        Node("a", ssl=server)
    with pytest.raises(ValueError, match="client_ssl"):
        Node("a", ssl=server, client_ssl=server)
    with pytest.raises(ValueError, match="client_ssl without ssl"):
        Node("a", client_ssl=client)
    with pytest.raises(TypeError, match="client_ssl"):
        Node("a", ssl=server, client_ssl="tls")  # type: ignore[arg-type]
    Node("a", ssl=server, client_ssl=client)
    with pytest.warns(DeprecationWarning):
        both_ways = ssl.SSLContext(ssl.PROTOCOL_TLS)
    Node("a", ssl=both_ways)


async def test_start_binds_before_the_first_pid() -> None:
    node = make_node("a")
    assert node.id == "a@127.0.0.1:0"
    async with node:
        assert node.port != 0
        assert node.id == f"a@127.0.0.1:{node.port}"
        assert self_pid().node == node.id
        assert self_pid().creation == node.creation != 0
        assert node.peers() == []
    assert node.peers() == []


async def test_a_node_on_a_taken_port_fails_to_start() -> None:
    async with started(make_node("a")) as (a,):
        other = make_node("b", port=a.port)
        with pytest.raises(OSError):
            await other.start()
        assert not other.running
        await other.stop()


# -- membership -------------------------------------------------------------------------


async def test_connect_returns_the_peer_id_and_again_at_once() -> None:
    async with started(make_node("a"), make_node("b")) as (a, b):
        assert await a.connect(address(b)) == b.id
        assert a.peers() == [b.id]
        await eventually(lambda: b.peers() == [a.id], "b to see a")
        # Already connected: by id, by address, from either side.
        assert await a.connect(b.id) == b.id
        assert await a.connect(address(b)) == b.id
        assert await b.connect(a.id) == a.id
        assert len(a._endpoint.connections) == 1 and len(b._endpoint.connections) == 1
        with pytest.raises(ValueError):
            await a.connect(a.id)
        with pytest.raises(ValueError):
            await a.connect("no port")
        with pytest.raises(TypeError):
            await a.connect(42)  # type: ignore[arg-type]


async def test_three_nodes_form_a_full_mesh() -> None:
    async with started(make_node("a"), make_node("b"), make_node("c")) as (a, b, c):
        await a.connect(b.id)
        await b.connect(c.id)  # c learns a from b, and connects to it
        await connected(a, b, c)
        for node in (a, b, c):
            assert len(node._endpoint.connections) == 2


async def test_joining_through_one_member_connects_to_all() -> None:
    async with started(*(make_node(f"n{i}") for i in range(5))) as nodes:
        first = nodes[0]
        # Everyone joins through the first node at once: the newcomers learn each other
        # and dial each other simultaneously, so duplicates must be resolved.
        await asyncio.gather(*(node.connect(first.id) for node in nodes[1:]))
        await connected(*nodes)
        await eventually(
            lambda: all(len(node._endpoint.connections) == len(nodes) - 1 for node in nodes),
            "exactly one connection per pair",
        )


async def test_a_node_only_heard_of_through_gossip_is_dialled_a_bounded_number_of_times() -> None:
    from pgregistry.node import GOSSIP_ATTEMPTS

    async with started(make_node("a"), make_node("b"), make_node("gone")) as (a, b, gone):
        ghost = gone.id
        await gone.stop()  # nobody listens at the ghost's address any more
        await a.connect(b.id)
        await connected(a, b)
        conn = b._peers[a.id].conn
        assert conn is not None
        conn.send(["members", [ghost]])  # b gossips about a node that is gone
        await eventually(lambda: ghost in a._peers, "a to hear of the ghost")
        record = a._peers[ghost]
        await eventually(lambda: record.reconnect is not None and record.reconnect.done(), "a to give up on it")
        assert record.gossip_tries == 0 and not record.member
        assert a.peers() == [b.id]
        assert GOSSIP_ATTEMPTS >= 1
        assert ghost not in a._peers  # given up: nothing of it is kept


async def test_add_route_checks_its_arguments() -> None:
    async with started(make_node("a")) as (a,):
        with pytest.raises(TypeError):
            a.add_route("no-at-sign", "127.0.0.1:1")
        with pytest.raises(ValueError):
            a.add_route("x@127.0.0.1:1", "not an address")
        a.add_route("x@127.0.0.1:1", "127.0.0.1:2")
        assert a._peers["x@127.0.0.1:1"].route == "127.0.0.1:2"


async def test_wrong_cookie_is_refused() -> None:
    async with started(make_node("a"), make_node("b", cookie="another cookie")) as (a, b):
        with pytest.raises(AuthenticationError):
            await a.connect(address(b))
        with pytest.raises(AuthenticationError):
            await b.connect(a.id)
        assert a.peers() == [] and b.peers() == []


async def test_connect_to_nobody_raises() -> None:
    async with started(make_node("a"), make_node("b")) as (a, b):
        port = b.port
    async with started(make_node("a")) as (a,):
        with pytest.raises(OSError):
            await a.connect(f"127.0.0.1:{port}")
        assert a.peers() == []


async def test_simultaneous_connects_keep_one_connection_without_spurious_events() -> None:
    for _round in range(8):
        async with started(make_node("a"), make_node("b")) as (a, b):
            queues = {a.id: await node_watcher(a), b.id: await node_watcher(b)}
            assert await asyncio.gather(a.connect(b.id), b.connect(a.id)) == [b.id, a.id]
            await eventually(
                lambda: len(a._endpoint.connections) == 1 and len(b._endpoint.connections) == 1,
                "the duplicate connection to close",
            )
            assert a.peers() == [b.id] and b.peers() == [a.id]
            # A round trip on the surviving connection: no late event is in flight.
            assert await call(await run_on(b, lambda: Echo.start(b)), "x") == "x"
            assert queues[a.id].get_nowait() == NodeUp(b.id)
            assert queues[b.id].get_nowait() == NodeUp(a.id)
            assert queues[a.id].empty() and queues[b.id].empty()


async def test_monitor_nodes_delivers_up_and_down() -> None:
    async with started(make_node("a"), make_node("b"), make_node("c")) as (a, b, c):
        a.monitor_nodes()
        a.monitor_nodes()  # idempotent: one event each
        await a.connect(b.id)
        assert await receive(T) == NodeUp(b.id)
        await a.disconnect(b.id)
        assert await receive(T) == NodeDown(b.id, "disconnect")
        a.demonitor_nodes()
        await a.connect(c.id)
        assert await mailbox() == []
        a.demonitor_nodes()  # not monitoring: nothing happens

        async def from_c() -> None:
            a.monitor_nodes()

        with pytest.raises(NotLocal):
            await run_on(c, from_c)

        # The subscription ends with the process.
        events: asyncio.Queue[Any] = asyncio.Queue()
        subscribed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        async def watch_then_die() -> None:
            a.monitor_nodes()
            subscribed.set_result(None)
            events.put_nowait(await receive())

        a.spawn(watch_then_die)
        await asyncio.wait_for(subscribed, T)
        await a.connect(b.id)
        assert await asyncio.wait_for(events.get(), T) == NodeUp(b.id)
        await eventually(lambda: not a._node_monitors, "the dead watcher to be forgotten")


async def test_disconnect_is_honoured_by_both_sides_even_through_gossip() -> None:
    async with started(make_node("a"), make_node("b"), make_node("c"), make_node("d")) as (a, b, c, d):
        await a.connect(b.id)
        await a.connect(c.id)
        await connected(a, b, c)
        b_events = await node_watcher(b)
        a.monitor_nodes()
        await a.disconnect(b.id)
        assert await receive(T) == NodeDown(b.id, "disconnect")
        assert await asyncio.wait_for(b_events.get(), T) == NodeDown(a.id, "disconnect")
        assert b.id not in a.peers()
        await eventually(lambda: a.id not in b.peers(), "b to drop a")

        # A fourth node joins: both a and b get member lists naming the other.
        await d.connect(c.id)
        await connected(a, c, d)
        await connected(b, c, d)
        await d.disconnect(a.id)
        await d.connect(a.id)  # a new connection: d's members (b among them) go to a
        await d.disconnect(b.id)
        await d.connect(b.id)  # and d's members (a among them) go to b
        await connected(a, c, d)
        await connected(b, c, d)
        await asyncio.sleep(3 * a.reconnect_max)  # observation window: longer than any backoff
        assert b.id not in a.peers() and a.id not in b.peers()
        assert all(conn.peer_id != b.id for conn in a._endpoint.connections)

        # An explicit connect from either side lifts the block on both.
        assert await b.connect(a.id) == a.id
        await connected(a, b, c, d)
        received = [msg for msg in await mailbox() if type(msg) is NodeUp]
        assert NodeUp(b.id) in received


async def test_a_disconnect_while_apart_is_learnt_on_the_next_redial() -> None:
    async with started(make_node("a"), make_node("b")) as (a, b):
        async with proxied(a, b) as part:
            part.split({"A"}, {"B"})
            await eventually(lambda: not a.peers() and not b.peers(), "the cut to be seen")
            await a.disconnect(b.id)  # not connected: a blocks b, b does not know yet
            part.heal()
            # b redials a, is refused "disconnected", and stops redialling.
            await eventually(lambda: b._peers[a.id].blocked, "b to learn of the disconnect")
            await asyncio.sleep(3 * b.reconnect_max)  # observation window: longer than any backoff
            assert not a.peers() and not b.peers()
            assert await b.connect(a.id) == a.id
            await connected(a, b)


async def test_a_disconnect_made_while_a_connect_is_under_way_wins() -> None:
    async with started(make_node("a"), make_node("b")) as (a, b):
        await a.connect(b.id)
        await connected(a, b)
        await a.disconnect(b.id)
        connecting = asyncio.ensure_future(a.connect(b.id))
        await asyncio.sleep(0)  # the connect waits for the transport handshake
        events = await node_watcher(a)
        await a.disconnect(b.id)  # called later: it is the one that holds
        with pytest.raises(ConnectionError, match="disconnected"):
            await connecting
        with pytest.raises(TimeoutError):  # no NodeUp within any backoff: they stay apart
            await asyncio.wait_for(events.get(), 3 * a.reconnect_max)
        assert not a.peers() and not b.peers()
        assert await a.connect(b.id) == b.id
        await connected(a, b)


async def test_a_peer_that_takes_only_small_frames_still_learns_every_member() -> None:
    # z takes frames of 64 KiB at most (the smallest limit a node may announce), and a's
    # other members have ids of almost 4 kB (950 four-byte characters): the member list
    # a sends z does not fit in one message.
    others = [make_node("\U0001d535" * 950 + str(i)) for i in range(18)]
    async with started(make_node("a"), *others, make_node("z", max_frame=64 * 1024)) as (a, *rest, z):
        assert len(encode(["members", [other.id for other in rest]])) > z.max_frame
        for other in rest:
            await a.connect(other.id)
        await connected(a, *rest)
        events = await node_watcher(a)
        assert await z.connect(a.id) == a.id
        await connected(a, z, *rest)
        assert await asyncio.wait_for(events.get(), T) == NodeUp(z.id)
        with pytest.raises(TimeoutError):  # no NodeDown: the connection stayed up
            await asyncio.wait_for(events.get(), 0.2)


async def test_a_late_proposal_from_a_dead_incarnation_does_not_take_the_new_one_down() -> None:
    # x dials y through a slow link and stops right after proposing the connection; x restarts
    # on the same port and connects directly, well before the old proposal arrives at y.
    slow = {"tick_interval": 0.5, "down_after": 5.0}
    async with started(make_node("y", **slow)) as (y,):
        events = await node_watcher(y)
        x_old = make_node("x", **slow)
        await run_on(y, x_old.start)
        async with LinkProxy(address(y)) as proxy:
            proxy.delay(0.4)
            dialling = asyncio.ensure_future(run_on(x_old, x_old.connect, proxy.address))
            # staging: wait until x_old's proposal is on its way
            await eventually(lambda: any(link.state == PROPOSED for peer in x_old._peers.values()
                                         for link in peer.links), "x_old's proposal to be sent")
            await run_on(y, x_old.stop)
            x_new = make_node("x", port=x_old.port, **slow)
            await run_on(y, x_new.start)
            try:
                assert await run_on(x_new, x_new.connect, address(y)) == y.id
                assert await asyncio.wait_for(events.get(), T) == NodeUp(x_new.id)
                await eventually(lambda: proxy.connections == 0, "the old connection to end")
                with contextlib.suppress(Exception):
                    await dialling
                assert events.empty(), [events.get_nowait() for _ in range(events.qsize())]
                assert y.peers() == [x_new.id]
            finally:
                await run_on(y, x_new.stop)


async def test_cut_link_gives_noconnection_then_reconnects_with_backoff() -> None:
    async with started(make_node("a"), make_node("b")) as (a, b):
        async with proxied(a, b) as part:
            a.monitor_nodes()
            target = b.spawn(idle)
            ref = monitor(target)
            blocked = asyncio.Event()

            class Slow(Server):
                async def handle_call(self, request: Any, caller: Pid) -> Any:
                    blocked.set()
                    await asyncio.sleep(60)

            slow = await run_on(b, lambda: Slow.start(b))
            pending = asyncio.ensure_future(run_on(a, call, slow, "never answered", 30))
            await asyncio.wait_for(blocked.wait(), T)

            part.split({"A"}, {"B"})
            down, _ = await receive_matching(lambda m: type(m) is Down)
            assert down == Down(ref, target, "noconnection")
            node_down, _ = await receive_matching(lambda m: type(m) is NodeDown)
            assert node_down.node == b.id
            with pytest.raises(NoProcess, match="noconnection"):
                await pending
            # Still cut: both sides keep redialling through their proxies, backing off.
            refused_before = sum(proxy.connections_refused for proxy in part.proxies.values())
            await asyncio.sleep(1.5)  # observation window for counting redials
            attempts = sum(proxy.connections_refused for proxy in part.proxies.values()) - refused_before
            assert 2 <= attempts <= 40, attempts  # constant redials every tick would be ~60
            assert a.peers() == [] and b.peers() == []
            # A monitor of a pid of a node that is not connected: "noconnection" at once.
            ref2 = monitor(target)
            assert await receive(T) == Down(ref2, target, "noconnection")

            part.heal()
            assert await receive(T) == NodeUp(b.id)
            await connected(a, b)
            # Messages flow again, in order.
            queue: asyncio.Queue[Any] = asyncio.Queue()
            sink = b.spawn(collector, queue)
            for i in range(100):
                send(sink, i)
            assert [await asyncio.wait_for(queue.get(), T) for _ in range(100)] == list(range(100))


async def test_silent_partition_is_detected_after_down_after() -> None:
    async with started(make_node("a"), make_node("b")) as (a, b):
        async with proxied(a, b, mode="blackhole") as part:
            a.monitor_nodes()
            target = b.spawn(idle)
            ref = monitor(target)
            loop = asyncio.get_running_loop()
            start = loop.time()
            part.split({"A"}, {"B"})
            down, _ = await receive_matching(lambda m: type(m) is Down)
            elapsed = loop.time() - start
            assert down == Down(ref, target, "noconnection")
            assert DOWN - 2 * TICK <= elapsed <= DOWN + 1.0, elapsed
            node_down, _ = await receive_matching(lambda m: type(m) is NodeDown)
            assert node_down == NodeDown(b.id, "timeout")
            part.heal()
            assert (await receive_matching(lambda m: type(m) is NodeUp, timeout=T))[0] == NodeUp(b.id)
            await connected(a, b)


# -- remote messages ---------------------------------------------------------------------


async def test_remote_send_keeps_order_and_reaches_names() -> None:
    async with started(make_node("a"), make_node("b")) as (a, b):
        await a.connect(b.id)
        queue: asyncio.Queue[Any] = asyncio.Queue()
        sink = b.spawn(collector, queue)
        b.register_name("sink", sink)
        messages = [i if i % 3 else ("tuple", i, [i], {"k": i}, b"x", None, 1.5) for i in range(1000)]
        for i, msg in enumerate(messages):
            send(sink if i % 2 else ("sink", b.id), msg)
        received = [await asyncio.wait_for(queue.get(), T) for _ in messages]
        assert received == messages
        assert type(received[0]) is tuple and type(received[0][2]) is list
        # Pids and refs cross as themselves.
        send(sink, (self_pid(), a.runtime.new_ref()))
        pid, ref = await asyncio.wait_for(queue.get(), T)
        assert pid == self_pid() and type(ref) is Ref
        # A name nobody holds there: dropped silently, like Erlang's {Name, Node} ! Msg.
        send(("nobody", b.id), "lost")
        send(sink, "after")
        assert await asyncio.wait_for(queue.get(), T) == "after"


async def test_a_message_that_is_not_a_term_raises_at_the_send() -> None:
    async with started(make_node("a"), make_node("b"), make_node("c")) as (a, b, c):
        await a.connect(b.id)
        sink = b.spawn(idle)
        unconnected = c.spawn(idle)
        for dest in (sink, ("sink", b.id), unconnected, ("x", c.id)):
            with pytest.raises(TypeError):
                send(dest, object())
            with pytest.raises(TypeError):
                send(dest, ("ok", {1, 2}))
            with pytest.raises(TypeError):
                cast(dest, lambda: None)
        with pytest.raises(TypeError):
            await call(sink, object())
        assert a.peers() == [b.id]


async def test_pgregistry_message_types_are_rebuilt_on_arrival() -> None:
    async with started(make_node("a"), make_node("b")) as (a, b):
        await a.connect(b.id)
        queue: asyncio.Queue[Any] = asyncio.Queue()
        sink = b.spawn(collector, queue)
        ref = a.runtime.new_ref()
        events = [NodeUp("x@h:1"), NodeDown("x@h:1", "timeout"), Down(ref, self_pid(), "normal"),
                  Join(ref, "k", [(self_pid(), 1)])]
        for event in events:
            send(sink, event)
        received = [await asyncio.wait_for(queue.get(), T) for _ in events]
        assert received == events
        assert [type(msg) for msg in received] == [type(event) for event in events]
        with pytest.raises(TypeError):
            send(sink, Down(ref, self_pid(), ValueError("not a term")))


async def test_remote_monitor_reports_the_real_reason() -> None:
    async with started(make_node("a"), make_node("b")) as (a, b):
        await a.connect(b.id)
        reasons: list[Any] = [
            "normal",
            "shutdown",
            ("custom", 1, [2], {"three": 3}),
            ValueError("boom"),
            KeyError("k"),
        ]
        for reason in reasons:
            pid = b.spawn(exits_with, reason)
            ref = monitor(pid)
            send(pid, "go")
            msg = await receive(T)
            expected = reason
            if isinstance(reason, BaseException):
                expected = RemoteError(type(reason).__name__, str(reason))
            assert msg == Down(ref, pid, expected), (reason, msg)
        err = msg.reason
        assert isinstance(err, RemoteError) and err.type_name == "KeyError" and str(err) == "KeyError: 'k'"

        # Killed, and an exception class defined outside builtins.
        class JobFailed(Exception):
            pass

        victim = b.spawn(idle)
        ref = monitor(victim)
        exit(victim, "kill")
        assert await receive(T) == Down(ref, victim, "killed")
        crasher = b.spawn(exits_with, JobFailed("no luck"))
        ref = monitor(crasher)
        send(crasher, "go")
        down = await receive(T)
        assert down.reason.type_name == f"{__name__}.{JobFailed.__qualname__}"
        assert down.reason.message == "no luck"

        # Already dead: noproc.
        assert b.runtime.process(victim) is None
        ref = monitor(victim)
        assert await receive(T) == Down(ref, victim, "noproc")

        # Demonitor: no Down afterwards, and both halves of the monitor are gone.
        alive = b.spawn(idle)
        ref = monitor(alive)
        await eventually(lambda: bool(b._peers[a.id].in_monitors), "b to record the monitor")
        assert demonitor(ref) is True
        await eventually(lambda: not b._peers[a.id].in_monitors, "b to drop the monitor")
        exit(alive, "kill")
        witness = b.spawn(idle)
        ref2 = monitor(witness)
        exit(witness, "kill")
        assert await receive(T) == Down(ref2, witness, "killed")  # not a Down for `ref`
        assert not a._peers[b.id].out_monitors


async def test_monitors_held_by_a_remote_process_are_released() -> None:
    async with started(make_node("a"), make_node("b")) as (a, b):
        await a.connect(b.id)
        target = b.spawn(idle)

        async def watch_and_quit() -> None:
            monitor(target)

        await run_on(a, watch_and_quit)  # the watcher exits right after monitoring
        await eventually(lambda: not b._peers[a.id].in_monitors, "the monitor of the dead watcher to go")
        proc = b.runtime.process(target)
        assert proc is not None and not proc._monitored_by

        ref = monitor(target)
        await eventually(lambda: bool(b._peers[a.id].in_monitors), "b to record the monitor")
        await a.disconnect(b.id)
        assert await receive(T) == Down(ref, target, "noconnection")
        await eventually(lambda: not proc._monitored_by, "b to drop monitors of a lost peer")


async def test_exit_signals_reach_remote_processes() -> None:
    async with started(make_node("a"), make_node("b")) as (a, b):
        await a.connect(b.id)
        log: list[Any] = []

        class Terminating(Server):
            async def terminate(self, reason: Any) -> None:
                log.append(reason)

        for reason, expected in (
            ("kill", "killed"),
            ("shutdown", "shutdown"),
            (("custom", 1), ("custom", 1)),
            (RuntimeError("stop now"), RemoteError("RuntimeError", "stop now")),
        ):
            pid = await run_on(b, lambda: Terminating.start(b))
            ref = monitor(pid)
            exit(pid, reason)
            assert await receive(T) == Down(ref, pid, expected)
        assert log == ["shutdown", ("custom", 1), RemoteError("RuntimeError", "stop now")]
        pid = b.spawn(idle)
        exit(pid, "normal")  # from another process: ignored
        ref = monitor(pid)
        send(pid, "ping")
        exit(pid, "kill")
        assert await receive(T) == Down(ref, pid, "killed")


async def test_call_and_cast_across_nodes() -> None:
    async with started(make_node("a"), make_node("b"), make_node("c")) as (a, b, c):
        await a.connect(b.id)
        log: list[Any] = []
        server = await run_on(b, lambda: Echo.start(b, log, name="echo"))
        assert await call(server, ("hello", [1, 2], {"k": (3,)})) == ("hello", [1, 2], {"k": (3,)})
        assert await call(("echo", b.id), "by name") == "by name"
        assert await call(server, "whoami") == (server, self_pid())
        cast(server, ("cast", 1))
        cast(("echo", b.id), ("cast", 2))
        send(server, "info")
        assert await call(server, "sync") == "sync"  # FIFO: the casts were handled before
        assert log == [("cast", 1), ("cast", 2), ("info", "info")]
        # The calls left no monitor behind on either node.
        assert not b._peers[a.id].in_monitors and not a._peers[b.id].out_monitors
        proc = b.runtime.process(server)
        assert proc is not None and not proc._monitored_by

        with pytest.raises(NoProcess, match="noproc"):
            await call(("nobody", b.id), "x")
        with pytest.raises(NoProcess, match="noconnection"):
            await call(("echo", c.id), "x")  # c is not connected
        with pytest.raises(NoProcess) as info:
            await call(server, ("crash", "handler failed"))
        assert info.value.__cause__ == RemoteError("ValueError", "handler failed")
        with pytest.raises(NoProcess, match="noproc"):
            await call(server, "x")
        cast(server, "to a dead server: dropped")
        assert await mailbox() == []


async def test_call_timeout_across_nodes_drops_the_late_reply() -> None:
    async with started(make_node("a"), make_node("b")) as (a, b):
        await a.connect(b.id)
        server = await run_on(b, lambda: Echo.start(b))
        with pytest.raises(CallTimeout):
            await call(server, ("wait", 0.2), timeout=0.05)
        assert await call(server, "after") == "after"  # the late "late" reply came first
        assert await mailbox() == []
        await eventually(lambda: not b._peers[a.id].in_monitors, "the timed-out call's monitor to go")


async def test_calls_from_many_processes_to_a_remote_server() -> None:
    async with started(make_node("a"), make_node("b")) as (a, b):
        await a.connect(b.id)
        await run_on(b, lambda: Echo.start(b, name="echo"))

        async def caller(i: int) -> list[int]:
            return [await call(("echo", b.id), i * 100 + j) for j in range(20)]

        results = await asyncio.gather(*(run_on(a, caller, i) for i in range(20)))
        assert results == [[i * 100 + j for j in range(20)] for i in range(20)]


# -- incarnations -------------------------------------------------------------------------


async def test_a_stopped_peer_is_forgotten_and_its_old_pids_never_match() -> None:
    async with started(make_node("a")) as (a,):
        a.monitor_nodes()
        b = make_node("b")
        queue: asyncio.Queue[Any] = asyncio.Queue()
        await run_on(a, b.start)
        old_sink = b.spawn(collector, queue)
        await a.connect(b.id)
        assert await receive(T) == NodeUp(b.id)
        old_creation = b.creation
        await b.stop()
        assert await receive(T) == NodeDown(b.id, "leave")
        assert b.id not in a._peers or not a._peers[b.id].member  # a stopped node is not redialled

        # A new incarnation on the same port: the same id, a new creation.
        b2 = make_node("b", port=b.port)
        await run_on(a, b2.start)
        try:
            assert b2.id == b.id and b2.creation != old_creation
            new_queue: asyncio.Queue[Any] = asyncio.Queue()
            new_sink = b2.spawn(collector, new_queue)
            assert new_sink.serial == old_sink.serial  # only the creation differs
            await a.connect(b2.id)
            assert await receive(T) == NodeUp(b.id)
            send(old_sink, "to the old incarnation")
            ref = monitor(old_sink)
            assert await receive(T) == Down(ref, old_sink, "noproc")
            send(new_sink, "to the new one")
            assert await asyncio.wait_for(new_queue.get(), T) == "to the new one"
            assert new_queue.empty() and queue.empty()
            # Even if a peer sends to a stale pid, the receiving node drops it.
            conn = a._peers[b.id].conn
            assert conn is not None
            conn.send(["send", old_sink, "forged"])
            send(new_sink, "marker")
            assert await asyncio.wait_for(new_queue.get(), T) == "marker"
        finally:
            await b2.stop()


async def test_a_restarted_peer_takes_its_old_incarnation_down_first() -> None:
    # Long liveness settings: the old connection must still look alive when the new
    # incarnation connects, so only the creation reveals the restart.
    slow = {"tick_interval": 0.5, "down_after": 10.0}
    async with started(make_node("a", **slow)) as (a,):
        b = make_node("b", **slow)
        await run_on(a, b.start)
        async with proxied(a, b, mode="blackhole") as part:
            a.monitor_nodes()
            old_pid = b.spawn(idle)
            ref = monitor(old_pid)
            await eventually(lambda: bool(b._peers[a.id].in_monitors), "b to record the monitor")
            part.split({"A"}, {"B"})  # b's goodbye will not reach a
            await b.stop()
            b2 = make_node("b", port=b.port, **slow)
            await run_on(a, b2.start)
            try:
                await b2.connect(address(a))  # directly, not through the blackholed proxy
                first = await receive(T)
                second = await receive(T)
                third = await receive(T)
                assert first == Down(ref, old_pid, "noconnection")
                assert second == NodeDown(b.id, "restarted")
                assert third == NodeUp(b.id)
                assert a.connection_stats(b.id)["creation"] == b2.creation  # type: ignore[index]
                new_pid = b2.spawn(idle)
                assert new_pid.serial == old_pid.serial
                ref = monitor(old_pid)
                assert await receive(T) == Down(ref, old_pid, "noproc")
                ref = monitor(new_pid)
                exit(new_pid, "kill")
                assert await receive(T) == Down(ref, new_pid, "killed")
            finally:
                await b2.stop()


# -- services --------------------------------------------------------------------------------


class Recorder:
    """A service recording every callback."""

    def __init__(self, fail: bool = False) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self.fail = fail

    def peer_up(self, peer: str) -> None:
        self.calls.append(("up", peer))

    def peer_down(self, peer: str, reason: str) -> None:
        self.calls.append(("down", peer, reason))

    def peer_message(self, peer: str, payload: Any) -> None:
        self.calls.append(("msg", peer, payload))
        if self.fail:
            raise RuntimeError("service failed")

    def close(self) -> None:
        self.calls.append(("close",))


async def test_services_hear_of_peers_and_messages_in_order(caplog: pytest.LogCaptureFixture) -> None:
    async with started(make_node("a"), make_node("b"), make_node("c")) as (a, b, c):
        on_a, on_b, failing = Recorder(), Recorder(), Recorder(fail=True)
        a.attach_service("scope", on_a)
        b.attach_service("scope", on_b)
        b.attach_service("failing", failing)
        assert a.send_service(b.id, "scope", "not connected") is False
        with pytest.raises(TypeError):
            a.send_service(b.id, "scope", object())
        a.monitor_nodes()
        await a.connect(b.id)
        assert on_a.calls == [("up", b.id)]  # called after NodeUp was delivered
        assert await receive(0) == NodeUp(b.id)
        await eventually(lambda: on_b.calls == [("up", a.id)], "b's peer_up")
        for i in range(50):
            assert a.send_service(b.id, "scope", ["batch", i, (i, "x")])
        a.send_service(b.id, "nobody", "dropped")
        with caplog.at_level(logging.ERROR, logger="pgregistry.node"):
            a.send_service(b.id, "failing", "raises")
            assert a.send_service(b.id, "scope", "after the failure")
            await eventually(lambda: len(on_b.calls) == 52, "b's messages")
        assert on_b.calls[1:] == [("msg", a.id, ["batch", i, (i, "x")]) for i in range(50)] + [
            ("msg", a.id, "after the failure")
        ]
        assert failing.calls == [("up", a.id), ("msg", a.id, "raises")]
        assert any("peer_message" in record.getMessage() for record in caplog.records)
        assert a.peers() == [b.id]

        await a.connect(c.id)
        c.attach_service("scope", on_c := Recorder())
        assert a.broadcast_service("scope", {"all": True}) == 2
        assert a.broadcast_service("scope", "only c", peers=[c.id, "nobody@h:1"]) == 1
        c_messages = lambda: [entry for entry in on_c.calls if entry[0] == "msg"]  # noqa: E731
        await eventually(lambda: len(c_messages()) == 2, "c's messages")
        assert c_messages() == [("msg", a.id, {"all": True}), ("msg", a.id, "only c")]

        # trusted: the payload is not walked first (the receiver still checks it)
        assert a.send_service(c.id, "scope", ["trusted", (1, "x")], trusted=True)
        assert a.broadcast_service("scope", "trusted to all", trusted=True) == 2
        await eventually(lambda: len(c_messages()) == 4, "c's trusted messages")
        assert c_messages()[2:] == [("msg", a.id, ["trusted", (1, "x")]), ("msg", a.id, "trusted to all")]
        # a bulk sender paces itself with drain_peer
        for i in range(200):
            a.send_service(c.id, "scope", ["bulk", i, "x" * 10_000], trusted=True)
        assert await a.drain_peer(c.id) is True
        await eventually(lambda: len(c_messages()) == 204, "c's bulk messages")
        assert [m[2][1] for m in c_messages()[4:]] == list(range(200))
        assert await a.drain_peer("nobody@h:1") is False

        stats = a.connection_stats(b.id)
        assert stats is not None and stats["messages_sent"] >= 52 and stats["bytes_sent"] > 0
        assert a.connection_stats("nobody@h:1") is None

        await a.disconnect(b.id)
        assert await a.drain_peer(b.id) is False
        assert on_a.calls[-1] == ("down", b.id, "disconnect")
        await eventually(lambda: on_b.calls[-1] == ("down", a.id, "disconnect"), "b's peer_down")


# -- hostile or broken peers ------------------------------------------------------------------


async def test_malformed_messages_from_a_peer_are_dropped(caplog: pytest.LogCaptureFixture) -> None:
    async with started(make_node("a"), make_node("b")) as (a, b):
        await b.connect(a.id)
        queue: asyncio.Queue[Any] = asyncio.Queue()
        sink = a.spawn(collector, queue)
        server = await run_on(a, lambda: Echo.start(a))
        conn = b._peers[a.id].conn
        assert conn is not None
        victim = a.spawn(idle)
        bad = [
            ["no such kind", 1],
            [],
            42,
            "send",
            {"send": 1},
            ["send"],
            ["send", 3.5, "x"],
            ["send", sink],
            ["call", server, "not a ref", sink, "x"],
            ["call", server, a.runtime.new_ref(), sink, "caller not of the sender"],
            ["send_t", sink, "__import__", ["os"]],
            ["send_t", sink, "NodeUp", ["too", "many"]],
            ["monitor", sink, b.runtime.new_ref(), victim],  # watcher not of the sender
            ["exit", "not a pid", "kill"],
            ["down", 1, 2, 3],
            ["members", "not a list"],
            ["members", [1, "no-at-sign", "x@bad", a.id]],
            ["svc", 1, 2],
            ["confirm"],
        ]
        with caplog.at_level(logging.WARNING, logger="pgregistry.node"):
            for term in bad:
                conn.send(term)
            send(sink, "still here")
            assert await asyncio.wait_for(queue.get(), T) == "still here"
        assert queue.empty()
        assert a.peers() == [b.id] and b.peers() == [a.id]
        assert a.runtime.process(victim) is not None and a.runtime.process(server) is not None
        assert sum("malformed" in record.getMessage() for record in caplog.records) >= len(bad) - 2


async def test_a_peer_that_breaks_the_set_up_protocol_is_closed(caplog: pytest.LogCaptureFixture) -> None:
    async with started(make_node("a"), make_node("b")) as (a, b):
        closes: list[str] = []
        evil = Endpoint("evil", COOKIE, tick_interval=TICK, down_after=DOWN,
                        on_close=lambda conn, reason: closes.append(reason))
        await evil.start()
        try:
            with caplog.at_level(logging.WARNING, logger="pgregistry.node"):
                conn = await evil.connect(address(a))
                conn.send(["send", self_pid(), "before propose"])  # not allowed before the confirm step
                await eventually(lambda: bool(closes), "a to close the connection")
                conn = await evil.connect(address(a))
                conn.send(["propose", "not an int", True])
                await eventually(lambda: len(closes) == 2, "a to close the second connection")
                conn = await evil.connect(address(a))  # says nothing at all
                await eventually(lambda: len(closes) == 3, "the set-up timeout", timeout=a.handshake_timeout + T)
            assert a.peers() == []
            assert any("protocol error" in record.getMessage() for record in caplog.records)
            # Meanwhile a serves its legitimate peers.
            assert await b.connect(a.id) == a.id
        finally:
            await evil.close()


async def test_tls_between_nodes(tmp_path: Path) -> None:
    ca = TestCA(tmp_path)
    async with started(make_node("a", **ca.node("a")), make_node("b", **ca.node("b"))) as (a, b):
        assert await a.connect(address(b)) == b.id
        conn = a._peers[b.id].conn
        assert conn is not None and conn._transport is not None
        assert conn._transport.get_extra_info("ssl_object") is not None
        server = await run_on(b, lambda: Echo.start(b))
        assert await call(server, ("over", "tls")) == ("over", "tls")
        plain = make_node("c")
        await run_on(a, plain.start)
        try:
            with pytest.raises((ConnectionError, OSError, TimeoutError)):
                await plain.connect(a.id)
        finally:
            await plain.stop()
