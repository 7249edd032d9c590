"""Registries across nodes: several nodes in one event loop, talking over loopback TCP.

Covers the scope peer protocol end to end: replication of joins, leaves and updates,
remote events for subscribers and listeners, process exits, a scope or node going away,
a link cut and restored (through a real proxy), per-node unique keys, the `sync`
barrier, and malformed peer messages.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import pytest

from pgregistry.errors import NoProcess, NotReplicated
from pgregistry.events import Join, Leave, Registered, Unregistered, Update
from pgregistry.node import Node
from pgregistry.registry import Registry
from pgregistry.server import Server, call
from pgregistry.testing import LinkProxy

from .helpers import eventually, registry_cluster, run_as, spawn_agent, stop_agent

COOKIE = "cluster-registry-tests"
FAST = {"tick_interval": 0.05, "down_after": 0.3}


def cluster(count: int, keys: str = "duplicate", listeners: tuple[str, ...] = (),
            **node_options: Any) -> contextlib.AbstractAsyncContextManager[list[tuple[Node, Registry]]]:
    """`count` connected nodes, each running registry "r"."""
    return registry_cluster(count, COOKIE, keys, listeners, **node_options)


def view(reg: Registry) -> dict[Any, list]:
    return {key: sorted(map(repr, reg.lookup(key))) for key in reg.which_groups()}


async def test_joins_leaves_and_updates_replicate_in_order() -> None:
    async with cluster(3) as [(a, ra), (b, rb), (_c, rc)]:
        worker = spawn_agent(a)
        await run_as(worker, lambda: [ra.register("k", i) for i in range(3)])
        await ra.sync()
        assert rb.lookup("k") == rc.lookup("k") == [(worker, 0), (worker, 1), (worker, 2)]
        await run_as(worker, lambda: ra.unregister("k"))
        await run_as(worker, lambda: ra.register("other", "x"))
        await ra.sync()
        assert rb.lookup("k") == [(worker, 0), (worker, 1)]
        assert rc.lookup("other") == [(worker, "x")]
        other = spawn_agent(b)
        await run_as(other, lambda: rb.register("k", "b"))
        await rb.sync()
        await run_as(worker, lambda: ra.update_value("k", "new"))
        await ra.sync()
        # updated entries move to the end of the key's order, on peers too
        assert rb.lookup("k") == [(other, "b"), (worker, "new"), (worker, "new")]
        assert rc.lookup("k") == [(other, "b"), (worker, "new"), (worker, "new")]
        assert ra.count() == rb.count() == rc.count() == 4
        assert rb.lookup_local("k") == [(other, "b")]


async def test_interleaved_joins_of_several_processes_keep_their_order_on_peers() -> None:
    async with cluster(2) as [(a, ra), (_b, rb)]:
        p, q = spawn_agent(a), spawn_agent(a)

        async def register_in_bursts(bursts: list[list[int]]) -> None:
            for burst in bursts:
                for value in burst:
                    ra.register("k", value)
                await asyncio.sleep(0)  # the other process's burst goes in between

        await asyncio.gather(run_as(p, lambda: register_in_bursts([[1, 2], [3], [4, 5, 6]])),
                             run_as(q, lambda: register_in_bursts([[10], [11, 12], [13]])))
        await ra.sync()
        local = ra.lookup("k")
        owners = [pid for pid, _value in local]
        assert len(local) == 10 and owners != sorted(owners, key=owners.index)  # interleaved
        assert rb.lookup("k") == local


async def test_remote_changes_reach_subscribers_and_listeners() -> None:
    async with cluster(2, listeners=("audit",)) as [(a, ra), (b, rb)]:
        inbox: list[Any] = []
        watcher = spawn_agent(b, inbox)
        b.register_name("audit", watcher)
        ref, snapshot = await run_as(watcher, rb.monitor_scope)
        assert snapshot == {}
        worker = spawn_agent(a)
        await run_as(worker, lambda: (ra.register("k", 1), ra.register("j", 2)))
        await run_as(worker, lambda: ra.update_value("k", 5))
        await run_as(worker, lambda: ra.unregister("j"))
        await ra.sync()
        await eventually(lambda: len(inbox) == 7, what="seven messages on b")
        assert inbox == [
            Join(ref, "k", [(worker, 1)]), Registered("r", "k", worker, 1),
            Join(ref, "j", [(worker, 2)]), Registered("r", "j", worker, 2),
            Update(ref, "k", [(worker, 1, 5)]),
            Leave(ref, "j", [(worker, 2)]), Unregistered("r", "j", worker),
        ]


async def test_a_value_holding_nan_is_not_an_update_when_a_peer_sends_its_rows_again() -> None:
    async with cluster(2) as [(a, ra), (b, rb)]:
        nan = float("nan")
        worker = spawn_agent(a)
        await run_as(worker, lambda: (ra.register("k", {"load": nan, "history": [1.0, nan, (nan,)]}),
                                      ra.register("j", nan), ra.register("changes", 1)))
        await ra.sync()
        inbox: list[Any] = []
        watcher = spawn_agent(b, inbox)
        ref, snapshot = await run_as(watcher, rb.monitor_scope)
        assert sorted(snapshot) == ["changes", "j", "k"]
        await run_as(worker, lambda: ra.update_value("changes", 2))
        # b asks again: a sends b every row it holds, and b diffs them against its copies
        # (decoded from the wire: new NaN objects, equal to nothing by ==).
        assert b.send_service(a.id, "r", ["discover"])
        await rb.sync()  # a has read the discover (sent before b's ping) and started its round
        await ra.sync()  # ... whose rows b has applied (a's ping follows the round)
        await run_as(watcher, lambda: None)  # the watcher has filed what it received
        assert inbox == [Update(ref, "changes", [(worker, 1, 2)])]


async def test_process_exit_removes_its_entries_everywhere() -> None:
    async with cluster(3) as [(a, ra), (_b, rb), (c, rc)]:
        inbox: list[Any] = []
        watcher = spawn_agent(c, inbox)
        ref, _snapshot = await run_as(watcher, rc.monitor_scope)
        worker = spawn_agent(a)
        await run_as(worker, lambda: [ra.register(k, v) for k, v in (("x", 1), ("y", 2), ("x", 3))])
        await ra.sync()
        assert rb.count() == rc.count() == 3
        await stop_agent(worker, "crash")
        await ra.sync()
        assert rb.count() == rc.count() == 0
        leaves = [e for e in inbox if isinstance(e, Leave)]
        assert leaves == [Leave(ref, "x", [(worker, 1), (worker, 3)]), Leave(ref, "y", [(worker, 2)])]


async def test_stopped_scope_and_stopped_node_take_their_entries_away() -> None:
    async with cluster(3) as [(a, ra), (b, rb), (c, rc)]:
        inbox: list[Any] = []
        watcher = spawn_agent(a, inbox)
        ref, _snapshot = await run_as(watcher, ra.monitor_scope)
        wb, wc = spawn_agent(b), spawn_agent(c)
        await run_as(wb, lambda: rb.register("k", "b"))
        await run_as(wc, lambda: rc.register("k", "c"))
        await rb.sync()
        await rc.sync()
        assert sorted(map(repr, ra.lookup("k"))) == sorted(map(repr, [(wb, "b"), (wc, "c")]))
        await rb.stop()  # the scope stops: peers drop its entries ("bye")
        await eventually(lambda: ra.lookup("k") == [(wc, "c")], what="b's entries gone from a")
        await c.stop()  # the whole node stops
        await eventually(lambda: ra.lookup("k") == [], what="c's entries gone from a")
        leaves = [e for e in inbox if isinstance(e, Leave)]
        assert leaves == [Leave(ref, "k", [(wb, "b")]), Leave(ref, "k", [(wc, "c")])]
        assert rc.count() == 0  # a stopped node's scope is closed and empty


async def test_scope_started_after_connecting_catches_up() -> None:
    async with Node("a", cookie=COOKIE) as a, Node("b", cookie=COOKIE) as b:
        ra = await Registry.start(a, "r")
        worker = spawn_agent(a)
        await run_as(worker, lambda: [ra.register(i, i) for i in range(100)])
        await b.connect(a.id)
        await ra.sync()  # b runs no scope "r" yet: a learns that and does not wait
        rb = await Registry.start(b, "r")
        await rb.sync()
        assert rb.count() == 100 and rb.lookup(42) == [(worker, 42)]
        mine = spawn_agent(b)
        await run_as(mine, lambda: rb.register("from-b", 1))
        await rb.sync()
        assert ra.lookup("from-b") == [(mine, 1)]


async def test_cut_link_purges_and_restore_rejoins_with_events() -> None:
    async with Node("a", cookie=COOKIE, **FAST) as a, Node("b", cookie=COOKIE, **FAST) as b:
        ra = await Registry.start(a, "r")
        rb = await Registry.start(b, "r")
        async with LinkProxy(b.id.split("@", 1)[1]) as to_b, LinkProxy(a.id.split("@", 1)[1]) as to_a:
            a.add_route(b.id, to_b.address)
            b.add_route(a.id, to_a.address)
            inbox: list[Any] = []
            watcher = spawn_agent(a, inbox)
            ref, _snapshot = await run_as(watcher, ra.monitor_scope)
            worker = spawn_agent(b)
            await run_as(worker, lambda: rb.register("k", "v1"))
            await a.connect(b.id)
            await eventually(lambda: ra.lookup("k") == [(worker, "v1")], what="replicated")
            to_b.cut()
            to_a.cut()
            await eventually(lambda: ra.lookup("k") == [], what="purged after the cut")
            await run_as(worker, lambda: rb.update_value("k", "v2"))  # changed during the split
            to_b.restore()
            to_a.restore()
            await eventually(lambda: ra.lookup("k") == [(worker, "v2")], timeout=10, what="rejoined")
            events = [e for e in inbox if isinstance(e, (Join, Leave, Update))]
            assert events == [Join(ref, "k", [(worker, "v1")]), Leave(ref, "k", [(worker, "v1")]),
                              Join(ref, "k", [(worker, "v2")])]


async def test_unique_keys_are_unique_per_node_and_via_resolves_locally() -> None:
    async with cluster(2, keys="unique") as [(a, ra), (b, rb)]:
        wa, wb = spawn_agent(a), spawn_agent(b)
        await run_as(wa, lambda: ra.register("leader", "a"))
        await run_as(wb, lambda: rb.register("leader", "b"))  # another node: allowed
        await ra.sync()
        await rb.sync()
        assert sorted(map(repr, ra.lookup("leader"))) == sorted(map(repr, [(wa, "a"), (wb, "b")]))
        assert ra.whereis_name("leader") == wa and rb.whereis_name("leader") == wb
        await run_as(wa, lambda: ra.unregister("leader"))
        await ra.sync()
        assert ra.whereis_name("leader") is None  # b's holder does not count on a
        assert rb.lookup("leader") == [(wb, "b")]
        with pytest.raises(NoProcess):  # b holds "leader", but via names resolve on a only
            await call(ra.via("leader"), "ping")


async def test_sync_is_a_barrier_for_every_connected_scope() -> None:
    async with cluster(3) as members:
        (a, ra) = members[0]
        worker = spawn_agent(a)
        await run_as(worker, lambda: [ra.register(("k", i), i) for i in range(2000)])
        await ra.sync()
        for _node, reg in members[1:]:
            assert reg.count() == 2000
        assert view(members[1][1]) == view(ra)


async def test_malformed_peer_messages_are_dropped_and_the_scope_keeps_serving() -> None:
    async with cluster(3) as [(a, ra), (b, rb), (c, rc)]:
        wc = spawn_agent(c)
        await run_as(wc, lambda: rc.register("k", "c"))
        await rc.sync()
        foreign_pid = wc  # a pid of c, forged by b below
        b_pid = spawn_agent(b)  # b's own, in malformed rows
        b_row_pid = spawn_agent(b)
        await run_as(b_row_pid, lambda: rb.register("b-row", 1))  # tag 1 of b's scope
        await rb.sync()
        before = view(ra)
        assert ra.lookup("b-row") == [(b_row_pid, 1)]
        for payload in (
            "not a list", [], [1, 2], ["nonsense"], ["sync"], ["sync", 0, "x", True], ["sync", 0, [["pid", []]], True],
            ["sync", 0, [], "yes"], ["sync", "0", [], True], ["sync", [], True],  # the part number is missing
            ["sync", 1, [], True],  # out of sequence: no round is running
            ["sync", 0, [[foreign_pid, ["k", "v"]]], True],  # not triples; c's pid anyway
            ["sync", 0, [[b_pid, ["k", "v", 1, "k", "v", 1]]], True],  # a tag twice
            ["sync", 0, [[b_pid, ["k", "v", 1]], [b_pid, ["k2", "v", 2]]], True],  # a pid twice
            ["sync", 0, [[b_pid, ["k", "v", "tag"]]], True], ["sync", 0, [[b_pid, ["k", "v", 2**63]]], True],
            ["sync", 0, [[b_pid, [["unhashable"], "v", 1]]], False],
            ["ops", "x"], ["ops", [["j", "k"]]], ["ops", [["l", [["k"]]]]], ["ops", [["u", [1], foreign_pid, 1]]],
            ["ops", [["j", foreign_pid, ["k", "forged", 1]]]],  # b may not speak for c's processes
            ["ops", [["j", b_pid, ["k", "v"]]]], ["ops", [["j", b_pid, [["unhashable"], "v", 1]]]],
            ["ops", [["j", b_pid, ["k", "v", 1.5]]]], ["ops", [["j", "k", b_pid, "v", 1]]],  # the old shape
            ["ops", [["l", [["b-row", b_row_pid, 1], "bad"]]]],  # nothing leaves unless all is well formed
            ["ops", [["l", [["b-row", b_row_pid, 1], ["b-row", b_row_pid, 2**64 - 1]]]]],  # not an int64 tag
            ["sync", 0, [[foreign_pid, ["k", "forged", 9]]], True],
            ["ping"], ["pong", "x"],
        ):
            assert b.send_service(a.id, "r", payload)
        await rb.sync()
        assert view(ra) == before
        wb = spawn_agent(b)
        await run_as(wb, lambda: rb.register("still", "works"))
        await rb.sync()
        assert ra.lookup("still") == [(wb, "works")]


async def test_what_outgrows_a_peers_frame_limit_is_split_and_only_the_oversized_is_left_out(
        caplog: pytest.LogCaptureFixture) -> None:
    async with cluster(2) as [(a, ra), (b, rb)]:
        small = [spawn_agent(b) for _ in range(5)]
        big = spawn_agent(b)
        for i, agent in enumerate(small):
            await run_as(agent, lambda i=i: rb.register(("k", i), "x" * 20_000))
        await run_as(big, lambda: [rb.register("big", "y" * 20_000) for _ in range(4)])
        await rb.sync()
        assert ra.count() == 9
        # Staging: a's connection now takes frames of 64 KiB at most (as if a had said
        # so at the handshake: the smallest limit a node may announce). Each small
        # process's rows fit alone, not all together; the big one's 80 kB fit in no frame.
        connection = b._peers[a.id].conn
        assert connection is not None
        connection.peer_max_frame = 64 * 1024
        with caplog.at_level(logging.ERROR, logger="pgregistry.scope"):
            assert a.send_service(b.id, "r", ["discover"])  # b sends a new round
            with pytest.raises(NotReplicated) as left_out:
                await rb.sync()  # b's barrier waits for the round, then names what was left out
            assert [(key, pid) for key, pid, _why in left_out.value.entries] == [("big", big)] * 4
            assert [ra.lookup(("k", i)) for i in range(5)] == [[(pid, "x" * 20_000)] for pid in small]
            assert ra.lookup("big") == []  # left out of the round: no frame holds them
            other = spawn_agent(b)
            await run_as(other, lambda: (rb.register("ok", 1), rb.register("huge", "z" * 140_000),
                                         rb.register("ok", 2)))  # one batch of ops, too big
            with pytest.raises(NotReplicated) as left_out:
                await rb.sync()
            assert [(key, pid) for key, pid, _why in left_out.value.entries] == [("huge", other)]
        assert ra.lookup("ok") == [(other, 1), (other, 2)] and ra.lookup("huge") == []
        errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
        assert any(repr(big) in message for message in errors), errors
        assert any("too large" in message and "huge" in message for message in errors), errors


async def test_a_round_that_fails_on_a_bug_leaves_its_barriers_waiting_not_reporting_a_sync(
        caplog: pytest.LogCaptureFixture) -> None:
    async with cluster(2) as [(a, ra), (b, rb)]:
        worker = spawn_agent(b)
        await run_as(worker, lambda: rb.register("k", 1))
        await rb.sync()
        scope = rb._scope
        working = scope._send_part

        def broken(round_: Any) -> bool:  # stands for a bug in building a part
            raise RuntimeError("bug")

        scope._send_part = broken
        with caplog.at_level(logging.ERROR, logger="pgregistry.scope"):
            assert a.send_service(b.id, "r", ["discover"])  # b starts a round to a: it fails
            await eventually(lambda: any("sync round" in r.getMessage() and r.exc_info for r in caplog.records),
                             what="the failure logged")
            with pytest.raises(TimeoutError):
                await rb.sync(0.3)  # the ping waits behind the unfinished round
        scope._send_part = working
        assert a.send_service(b.id, "r", ["discover"])  # the next discover: a new round
        await rb.sync(5.0)
        assert ra.lookup("k") == [(worker, 1)]


class Echo(Server):
    async def handle_call(self, request: Any, caller: Any) -> Any:
        return ("echo", request)


async def test_a_server_on_a_via_name_is_reachable_from_another_node() -> None:
    async with cluster(2, keys="unique") as [(a, ra), (b, rb)]:
        pid = await Echo.start(b, name=rb.via("echo", {"version": 1}))
        await rb.sync()
        [(found, value)] = ra.lookup("echo")  # the holder on b, replicated to a
        assert found == pid and value == {"version": 1}
        caller = spawn_agent(a)
        # a process of node a calls the server on node b through the pid the registry gave
        assert await run_as(caller, lambda: call(found, "hi")) == ("echo", "hi")


async def test_hostile_connections_leave_the_registry_intact() -> None:
    import asyncio
    import struct

    from pgregistry.errors import AuthenticationError

    async with cluster(2) as [(a, ra), (b, rb)]:
        worker = spawn_agent(a)
        await run_as(worker, lambda: [ra.register(i, {"n": i}) for i in range(50)])
        await ra.sync()
        before = view(ra)
        host, port = a.id.split("@", 1)[1].rsplit(":", 1)
        attacks = [
            b"\x00\x01garbage that is not a frame" * 10,
            struct.pack(">I", 100) + b"only part of the body",  # truncated, then EOF
            struct.pack(">I", 2**31) + b"x" * 64,                # declares an oversized frame
        ]
        for data in attacks:
            reader, writer = await asyncio.open_connection(host, int(port))
            writer.write(data)
            await writer.drain()
            writer.close()
        flood = [await asyncio.open_connection(host, int(port)) for _ in range(100)]
        async with Node("intruder", cookie="wrong cookie") as intruder:
            with pytest.raises(AuthenticationError):
                await intruder.connect(a.id)
        for _reader, writer in flood:
            writer.close()
        assert view(ra) == before and view(rb) == before
        await run_as(worker, lambda: ra.register("after", "attacks"))
        await ra.sync()
        assert rb.lookup("after") == [(worker, "attacks")]
        assert a.peers() == [b.id]
