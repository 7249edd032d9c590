"""Replication that no value and no peer can break.

Each test here reproduces one way an attack campaign lost or ghosted entries, or knocked
a node out of its cluster, on real nodes talking over loopback TCP:

* a value at exactly the depth limit travels in every message (gossip and sync round)
  and one past it is refused at the call site;
* a value mutated into a non-term after it was registered is left out alone: every
  other entry of the same batch, and of every later sync round, still replicates, and
  `sync` names what was left out instead of reporting it applied;
* a peer with a small frame limit costs only itself the rows it cannot take: the
  others get every op at once, and it gets the rest split to fit;
* a fan-out to many subscribers that holds the loop is logged;
* malformed peer input with huge ints is logged briefly and without tracebacks.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

import pytest

from pgregistry import subscriptions as subscriptions_module
from pgregistry.errors import NotReplicated
from pgregistry.events import Join, NodeDown
from pgregistry.node import Node
from pgregistry.registry import Registry
from pgregistry.spec import V1, V2, V3
from pgregistry.terms import MAX_TERM_DEPTH

from .helpers import eventually, registry_cluster, run_as, spawn_agent, stop_agent

COOKIE = "replication-faults"
# No test here waits for a failure to be detected, and some make tens of thousands of
# rows in one loop iteration: detection slow enough that a busy loop is never taken for
# a dead peer.
DETECTION = {"tick_interval": 0.2, "down_after": 5.0}


def nodes(count: int, **last_options: Any) -> contextlib.AbstractAsyncContextManager[list[tuple[Node, Registry]]]:
    """`count` connected nodes running registry "r"; `last_options` go to the last one."""
    return registry_cluster(count, COOKIE, last_node_options=last_options, **DETECTION)


def nested(levels: int, leaf: Any = 0, kind: type = list) -> Any:
    value = leaf
    for _ in range(levels):
        value = kind((value,)) if kind is tuple else [value] if kind is list else {"k": value}
    return value


class NodeDownWatch:
    """Collects the `NodeDown`s a node reports, in a process that monitors nodes."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self.inbox: list[Any] = []
        self.pid = spawn_agent(node, self.inbox)

    async def start(self) -> None:
        await run_as(self.pid, self.node.monitor_nodes)

    def down(self) -> list[NodeDown]:
        return [msg for msg in self.inbox if type(msg) is NodeDown]


# --------------------------------------------------------------------------- depth

@pytest.mark.parametrize("kind", [list, tuple, dict])
async def test_a_value_at_the_depth_limit_travels_in_gossip_and_in_sync_rounds(kind: type) -> None:
    deepest = nested(MAX_TERM_DEPTH, "leaf", kind)
    async with nodes(2) as [(a, ra), (b, rb)]:
        watch = NodeDownWatch(a)
        await watch.start()
        worker = spawn_agent(b)
        await run_as(worker, lambda: rb.register("deep", deepest))
        await rb.sync()  # gossip: an ops batch
        assert ra.lookup("deep") == [(worker, deepest)]
        await run_as(worker, lambda: rb.update_value("deep", nested(MAX_TERM_DEPTH, "updated", kind)))
        # A third node catches up by a sync round: the same value inside a sync part.
        async with Node("late", cookie=COOKIE, **DETECTION) as late:
            rl = await Registry.start(late, "r")
            await late.connect(b.id)
            await eventually(lambda: len(late.peers()) == 2, what="late joins the mesh")
            await rl.sync()
            assert rl.lookup("deep") == rb.lookup("deep") == ra.lookup("deep")
        assert [down for down in watch.down() if down.node == b.id] == [] and b.id in a.peers()
        # One level more is refused where it is made, never later during gossip.
        with pytest.raises(TypeError, match=f"deeper than {MAX_TERM_DEPTH} levels"):
            await run_as(worker, lambda: rb.register("deeper", nested(MAX_TERM_DEPTH + 1, "leaf", kind)))
        if kind is tuple:
            with pytest.raises(TypeError, match=f"deeper than {MAX_TERM_DEPTH} levels"):
                await run_as(worker, lambda: rb.register(nested(MAX_TERM_DEPTH + 1, "leaf", tuple)))
            key = nested(MAX_TERM_DEPTH, "leaf", tuple)
            await run_as(worker, lambda: rb.register(key, 1))
            await rb.sync()
            assert ra.lookup(key) == [(worker, 1)]


# --------------------------------------------------------------------------- mutation

async def test_a_value_mutated_into_a_non_term_is_left_out_alone() -> None:
    async with nodes(2) as [(a, ra), (b, rb)]:
        owner, first, second = spawn_agent(b), spawn_agent(b), spawn_agent(b)
        value: list[Any] = [1]

        def same_iteration() -> None:
            rb.register_name("before", first, "x")
            rb.register("mutated", value)
            value.append(object())  # after register: the table holds it by reference
            rb.register_name("after", second, "y")
            rb.update_value("mutated", value)  # refused here: it is not a term any more

        with pytest.raises(TypeError):
            await run_as(owner, same_iteration)
        with pytest.raises(NotReplicated) as left_out:
            await rb.sync()
        assert [(key, pid) for key, pid, _why in left_out.value.entries] == [("mutated", owner)]
        assert "mutated" in str(left_out.value) and "mutated after it was registered" in str(left_out.value)
        assert ra.lookup("before") == [(first, "x")] and ra.lookup("after") == [(second, "y")]
        assert ra.lookup("mutated") == []
        await rb.sync()  # reported once
        # Every later sync round leaves out that one entry only: a node that joins
        # afterwards still catches up on everything else.
        async with Node("late", cookie=COOKIE, **DETECTION) as late:
            rl = await Registry.start(late, "r")
            await late.connect(b.id)
            await eventually(lambda: len(late.peers()) == 2, what="late joins the mesh")
            await rl.sync()
            assert rl.lookup("before") == [(first, "x")] and rl.lookup("after") == [(second, "y")]
            assert rl.lookup("mutated") == []
            with pytest.raises(NotReplicated, match="mutated"):
                await rb.sync()
            # Once the entry has a value that is a term again, every peer gets it.
            await run_as(owner, lambda: rb.update_value("mutated", ["fixed"]))
            await rb.sync()
            assert ra.lookup("mutated") == rl.lookup("mutated") == [(owner, ["fixed"])]
        assert b.id in a.peers()


async def test_a_value_mutated_past_the_depth_limit_is_left_out_alone() -> None:
    async with nodes(2) as [(a, ra), (b, rb)]:
        owner, other = spawn_agent(b), spawn_agent(b)
        value: list[Any] = []

        def same_iteration() -> None:
            rb.register("grows", value)
            value.append(nested(100))  # deeper than any peer would decode
            rb.register_name("fine", other, 1)

        await run_as(owner, same_iteration)
        with pytest.raises(NotReplicated, match="grows"):
            await rb.sync()
        assert ra.lookup("fine") == [(other, 1)] and ra.lookup("grows") == []
        assert b.id in a.peers() and a.id in b.peers()


# --------------------------------------------------------------------------- per-peer limits

async def test_a_peer_with_a_small_frame_limit_costs_only_itself_what_it_cannot_take() -> None:
    async with nodes(3, max_frame=64 * 1024) as [(_a, ra), (b, rb), (c, rc)]:  # c takes 64 KiB frames
        worker, burst = spawn_agent(b), spawn_agent(b)
        await run_as(worker, lambda: rb.register("huge", "z" * 100_000))
        # 8 rows of 20 kB in one batch: too big for c as one frame, fine for a.
        await run_as(burst, lambda: [rb.register(("row", i), "r" * 20_000) for i in range(8)])
        with pytest.raises(NotReplicated) as left_out:
            await rb.sync()
        assert [(key, pid) for key, pid, _why in left_out.value.entries] == [("huge", worker)]
        assert c.id in str(left_out.value)
        assert ra.lookup("huge") == [(worker, "z" * 100_000)]  # the others were not held up
        assert rc.lookup("huge") == []
        for i in range(8):
            assert ra.lookup(("row", i)) == rc.lookup(("row", i)) == [(burst, "r" * 20_000)]
        # Later ops go to both at once, and c's connection never went down.
        await run_as(worker, lambda: rb.register("small", 1))
        await rb.sync()
        assert ra.lookup("small") == rc.lookup("small") == [(worker, 1)]
        # A process leaving with more rows than one of c's frames holds leaves there too.
        many = spawn_agent(b)
        await run_as(many, lambda: [rb.register(("many", i), i) for i in range(20_000)])
        await rb.sync()
        assert rc.count_select([((("many", V1), V2, V3), [], [True])]) == 20_000
        await stop_agent(many)
        await rb.sync()
        assert rc.count_select([((("many", V1), V2, V3), [], [True])]) == 0
        assert ra.count_select([((("many", V1), V2, V3), [], [True])]) == 0
        assert c.id in b.peers()


# --------------------------------------------------------------------------- fan-out

async def test_a_fan_out_that_holds_the_loop_is_logged_with_the_scope_and_the_count(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(subscriptions_module, "FAN_OUT_STALL", 0.0)  # every timed fan-out "stalls"
    count = subscriptions_module.FAN_OUT_TIMED
    async with Node("solo", cookie=COOKIE) as node:
        reg = await Registry.start(node, "fan")
        inboxes: list[list[Any]] = [[] for _ in range(count)]
        subscribers = [spawn_agent(node, inbox) for inbox in inboxes]
        for pid in subscribers:
            await run_as(pid, reg.monitor_scope)
        with caplog.at_level(logging.WARNING, logger="pgregistry.scope"):
            reg.register("k", 1)
        await eventually(lambda: all(inbox for inbox in inboxes), what="every subscriber got the Join")
        assert all(type(inbox[0]) is Join and inbox[0].key == "k" for inbox in inboxes)
        assert inboxes[0][0].entries is inboxes[-1][0].entries  # shared, not copied per subscriber
        stalls = [r.getMessage() for r in caplog.records if "held the loop" in r.getMessage()]
        assert stalls and "'fan'" in stalls[0] and f"{count} subscribers" in stalls[0]


# --------------------------------------------------------------------------- bounded logs

async def test_malformed_scope_messages_with_huge_ints_are_logged_briefly(caplog: pytest.LogCaptureFixture) -> None:
    huge = 10**5000  # past Python's int-to-str limit
    async with nodes(2) as [(a, ra), (b, rb)]:
        worker = spawn_agent(b)
        await run_as(worker, lambda: rb.register("k", 1))
        await rb.sync()
        with caplog.at_level(logging.WARNING, logger="pgregistry.scope"):
            for _ in range(200):
                assert b.send_service(a.id, "r", ["ops", [["x", huge]], huge])
                assert b.send_service(a.id, "r", ["ops", [["l", [[huge, huge, huge]]]]])
            await rb.sync()
        messages = [r.getMessage() for r in caplog.records if r.name == "pgregistry.scope"]
        assert 0 < len(messages) <= 25, len(messages)  # rate-limited
        assert all(len(message) < 500 for message in messages)
        assert any("bits>" in message for message in messages)
        assert ra.lookup("k") == [(worker, 1)] and b.id in a.peers()


# --------------------------------------------------------------------------- NaN keys

async def test_nan_keys_are_refused_locally_and_from_peers(caplog: pytest.LogCaptureFixture) -> None:
    nan = float("nan")
    async with nodes(2) as [(a, ra), (b, rb)]:
        worker = spawn_agent(b)
        for key in (nan, (1, nan), ("x", (nan,))):
            with pytest.raises(ValueError, match="not equal to itself"):
                await run_as(worker, lambda key=key: rb.register(key, 1))
        await run_as(worker, lambda: rb.register("real", 1))
        await rb.sync()
        # A peer that sends NaN keys anyway (another version, a hand-made client): its
        # rows are refused as malformed, and nothing it held before is lost.
        with caplog.at_level(logging.WARNING, logger="pgregistry.scope"):
            for key in (nan, (1, nan)):
                assert b.send_service(a.id, "r", ["ops", [["j", worker, [key, "ghost", 99]]]])
                assert b.send_service(a.id, "r", ["ops", [["u", key, worker, "ghost"]]])
                assert b.send_service(a.id, "r", ["sync", 0, [[worker, [key, "ghost", 98]]], True])
            await rb.sync()
        assert ra.count() == 1 and ra.lookup("real") == [(worker, 1)]
        refusals = [r.getMessage() for r in caplog.records if "NaN" in r.getMessage()]
        assert len(refusals) == 6, refusals
        assert b.id in a.peers()


async def test_a_malformed_op_costs_only_itself_not_its_batch(caplog: pytest.LogCaptureFixture) -> None:
    async with nodes(2) as [(a, ra), (b, rb)]:
        first, second = spawn_agent(b), spawn_agent(b)
        with caplog.at_level(logging.WARNING, logger="pgregistry.scope"):
            assert b.send_service(a.id, "r", ["ops", [["j", first, ["before", 1, 1]],
                                                      ["j", first, [[1], 2, 2]],  # a list is no key
                                                      ["j", second, ["after", 3, 3]]]])
            await rb.sync()
        assert ra.lookup("before") == [(first, 1)] and ra.lookup("after") == [(second, 3)]
        assert any("1 of 3 ops dropped" in r.getMessage() for r in caplog.records)
