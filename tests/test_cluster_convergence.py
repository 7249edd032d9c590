"""Convergence of a registry across partitions and heals, with every event accounted for.

Three nodes A, B, C run in one event loop with registry "r" (duplicate keys). Every
node-to-node link goes through a `pgregistry.testing.LinkProxy` (each node dials each
peer through its own proxy, `Node.add_route`, set before the mesh forms), so a split is a
real TCP fault: ``blackhole`` (silent: detected by missing ticks after ``down_after``) or
``cut`` (connections closed, redials refused). A watcher process on every node holds a
``monitor_scope`` subscription; after every heal each node's full view must equal the
union of all nodes' local entries, and each watcher's snapshot + events must give exactly
its node's view (docs/contract.md, "Distribution").

* `test_split_register_heal_converges_with_every_event_accounted_for`: {A} | {B, C},
  changes on both sides, heal; checks Leaves at the split and Joins at the heal exactly.
* `test_a_blip_shorter_than_down_after_gives_update_not_leave_and_join`: a link slowed
  (not severed) for less than ``down_after`` while a value changes: one `Update`.
* `test_a_peer_that_reconnects_before_it_was_declared_down_gives_update`: the reconnect
  case of docs/contract.md's replaced connections: the connection is replaced, the rows stay, and the new
  connection's sync round reports the changed value as one `Update`.
* `ClusterMachine`: hypothesis stateful test, random register / unregister / update /
  exit / split / heal over 3 nodes, convergence checked after each heal and at the end.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, Phase, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

import pgregistry.scope as scope_module
from pgregistry.events import Join, Leave, NodeDown, Update
from pgregistry.scope import SYNC_PART_ROWS

from .cluster_helpers import ProxiedCluster, View, clean, local_view, merge, multiset
from .helpers import eventually, run_as, spawn_agent, stop_agent

TICK = 0.05
DOWN = 0.3
# Faster reconnects after a heal than the defaults (handshake 1 s, backoff up to 0.6 s).
FAST_RECONNECT = {"handshake_timeout": 0.5, "confirm_timeout": 0.5, "reconnect_max": 0.25}


def entries_of(events: list[Any], kind: type) -> View:
    """The entries carried by events of `kind`, as a view."""
    out: dict[Any, Counter] = {}
    for message in events:
        if isinstance(message, kind):
            out[message.key] = out.get(message.key, Counter()) + multiset(message.entries)
    return clean(out)


def kinds(events: list[Any]) -> set[str]:
    return {type(event).__name__ for event in events}


@pytest.mark.parametrize("mode", ["blackhole", "cut"])
async def test_split_register_heal_converges_with_every_event_accounted_for(mode: str) -> None:
    async with ProxiedCluster(mode=mode, tick_interval=TICK, down_after=DOWN,
                              attributes=FAST_RECONNECT) as cluster:
        A, B, C = cluster["A"], cluster["B"], cluster["C"]
        a0, a1 = A.agents
        b0, b1 = B.agents
        c0, c1 = C.agents
        regA, regB, regC = A.reg, B.reg, C.reg

        # 1. Entries on all three nodes; everyone sees the union.
        await run_as(a0, lambda: (regA.register("k", "a0"), regA.register("x", 1)))
        await run_as(a1, lambda: regA.register("k", "a1"))
        await run_as(b0, lambda: (regB.register("k", "b0"), regB.register(("t", 1), {"n": 1})))
        await run_as(b1, lambda: regB.register("y", None))
        await run_as(c0, lambda: (regC.register("k", [1, 2]), regC.register("k", [1, 2])))
        await run_as(c1, lambda: regC.register("z", (1, 2)))
        await cluster.sync_all()
        cluster.check_views([["A", "B", "C"]])
        await cluster.flush_watchers()
        cluster.check_replays()
        everything = cluster.locals_of("ABC")
        assert sum(sum(c.values()) for c in everything.values()) == 9

        # 2. Split {A} | {B, C}: A loses B's and C's entries, B and C lose A's, with Leaves.
        before = {name: len(cluster[name].inbox) for name in "ABC"}
        at_split = {name: local_view(cluster[name].reg) for name in "ABC"}
        assert cluster.partition is not None
        cluster.partition.split({"A"}, {"B", "C"})
        await cluster.wait_split([{"A"}, {"B", "C"}])
        await cluster.flush_watchers()
        for name, lost in (("A", merge(at_split["B"], at_split["C"])), ("B", at_split["A"]),
                           ("C", at_split["A"])):
            events = cluster[name].events(before[name])
            assert kinds(events) <= {"Leave"}, f"{name} at the split: {events}"
            assert entries_of(events, Leave) == lost, f"{name} at the split: {events}"
        cluster.check_replays()

        # 3. Changes on both sides of the split.
        a2 = spawn_agent(A.node)
        await run_as(a0, lambda: regA.register("k", "a0-during"))
        await run_as(a1, lambda: regA.unregister("k"))
        await run_as(a0, lambda: regA.update_value("x", 2))
        await run_as(a2, lambda: regA.register("only-a", "a2"))
        await run_as(b0, lambda: regB.update_value("k", "b0-changed"))  # changed during the split
        await stop_agent(b1, "crash")
        await run_as(c0, lambda: (regC.register("k", "c0-during"), regC.unregister("k")))
        await run_as(c1, lambda: (regC.unregister("z"), regC.register("only-bc", "c1")))
        await regB.sync()
        await regC.sync()
        await cluster.wait_split([{"A"}, {"B", "C"}])
        cluster.check_views([["A"], ["B", "C"]])
        await cluster.flush_watchers()
        cluster.check_replays()
        assert regA.lookup("only-bc") == [] and regB.lookup("only-a") == regC.lookup("only-a") == []

        # 4. Heal: everyone converges to the union; the other side's entries come back as Joins.
        before = {name: len(cluster[name].inbox) for name in "ABC"}
        cluster.partition.heal()
        await cluster.wait_converged()
        now = {name: local_view(cluster[name].reg) for name in "ABC"}
        for name, gained in (("A", merge(now["B"], now["C"])), ("B", now["A"]), ("C", now["A"])):
            events = cluster[name].events(before[name])
            assert kinds(events) <= {"Join"}, f"{name} at the heal: {events}"
            assert entries_of(events, Join) == gained, f"{name} at the heal: {events}"
        union = cluster.locals_of("ABC")
        assert union["k"] == multiset([(a0, "a0"), (a0, "a0-during"), (b0, "b0-changed"),
                                       (c0, [1, 2]), (c0, [1, 2])])
        assert union["x"] == multiset([(a0, 2)])
        assert "y" not in union and "z" not in union
        assert union["only-a"] == multiset([(a2, "a2")]) and union["only-bc"] == multiset([(c1, "c1")])


# Long enough for a blip or a reconnect to stay well inside it.
BLIP_DOWN_AFTER = 1.5


def pair_for_blips(**options: Any) -> ProxiedCluster:
    """A and B, every link through a proxy, with a `down_after` no blip reaches."""
    return ProxiedCluster(("A", "B"), tick_interval=TICK, down_after=BLIP_DOWN_AFTER, **options)


async def replace_bs_connection(cluster: ProxiedCluster, meanwhile: Callable[[], Awaitable[Any]]) -> float:
    """B drops its connection to A unseen by A, runs `meanwhile`, and dials A again.

    B's "disconnect" and FIN are held by a blackhole on A->B, so to A the old connection
    is still up when B's new one arrives: A's node reports it *replaced*. Returns the
    seconds this took (a test checks it stayed within a blip).
    """
    A, B = cluster["A"], cluster["B"]
    assert cluster.partition is not None
    loop = asyncio.get_running_loop()
    started = loop.time()
    cluster.partition.proxy("A", "B").blackhole()
    await B.node.disconnect(A.node.id)
    await meanwhile()
    await B.node.connect(A.node.id)
    return loop.time() - started


async def test_a_blip_shorter_than_down_after_gives_update_not_leave_and_join() -> None:
    # The blip is a delay, not a blackhole: over TCP a short silent partition delays the
    # bytes (retransmission), it never drops them from a connection that survives;
    # LinkProxy.blackhole drops them, so a blackhole shorter than down_after would lose
    # the update for good, which no real network does.
    async with pair_for_blips() as cluster:
        A, B = cluster["A"], cluster["B"]
        b0 = B.agents[0]
        await run_as(b0, lambda: B.reg.register("k", "v1"))
        await B.reg.sync()
        assert A.reg.lookup("k") == [(b0, "v1")]
        node_events: list[Any] = []
        monitor = spawn_agent(A.node, node_events)
        await run_as(monitor, A.node.monitor_nodes)
        await cluster.flush_watchers()
        mark = len(A.inbox)
        part = cluster.partition
        assert part is not None
        links = [part.proxy("A", "B"), part.proxy("B", "A")]
        loop = asyncio.get_running_loop()
        started = loop.time()
        for proxy in links:
            proxy.delay(0.4)  # every byte in flight arrives 0.4 s late (ticks included)
        await run_as(b0, lambda: B.reg.update_value("k", "v2"))
        assert A.reg.lookup("k") == [(b0, "v1")]  # the update is held up by the blip
        await asyncio.sleep(0.2)  # the blip itself: the link is bad for this long
        for proxy in links:
            proxy.restore()
        assert loop.time() - started < BLIP_DOWN_AFTER / 2, "the blip lasted too long to be a blip"
        await cluster.wait_converged(timeout=10)
        await run_as(monitor, lambda: None)
        assert not [e for e in node_events if isinstance(e, NodeDown)], node_events
        assert A.events(mark) == [Update(A.ref, "k", [(b0, "v1", "v2")])]
        assert A.reg.lookup("k") == [(b0, "v2")]


async def test_a_peer_that_reconnects_before_it_was_declared_down_gives_update() -> None:
    # A dialled B (through proxy A->B). That connection goes silent, and B loses it (its
    # "disconnect" and FIN are held by the blackhole): to A it is still up, as when B's
    # side was reset and A never saw it. B changes its entries, then dials A again
    # through B->A, well within down_after. The contract: the changed value comes as an
    # Update; only what really went or came gives a Leave or a Join.
    async with pair_for_blips() as cluster:
        A, B = cluster["A"], cluster["B"]
        b0 = B.agents[0]
        await run_as(b0, lambda: (B.reg.register("k", "v1"), B.reg.register("flag", 1),
                                  B.reg.register("gone", 1), B.reg.register("same", 2)))
        await B.reg.sync()
        await cluster.flush_watchers()
        mark = len(A.inbox)
        took = await replace_bs_connection(cluster, lambda: run_as(b0, lambda: (
            B.reg.update_value("k", "v2"), B.reg.unregister("gone"), B.reg.register("new", 3),
            B.reg.update_value("flag", True))))  # == 1, yet a change
        assert took < BLIP_DOWN_AFTER / 2
        await cluster.wait_converged(timeout=10)
        assert A.events(mark) == [Leave(A.ref, "gone", [(b0, 1)]), Update(A.ref, "k", [(b0, "v1", "v2")]),
                                  Update(A.ref, "flag", [(b0, 1, True)]), Join(A.ref, "new", [(b0, 3)])]
        assert type(A.reg.lookup("flag")[0][1]) is bool


async def test_a_process_that_leaves_during_a_blip_and_joins_during_the_next_round_loses_its_old_row(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # B's process x unregisters "old" while A cannot hear (A keeps x's rows across the
    # replaced connection), then registers "new" while B's round to A is still
    # streaming (parts of two rows). The join tells A about "new" only: the round must
    # still say that "old" is gone.
    monkeypatch.setattr(scope_module, "SYNC_PART_ROWS", 2)
    async with pair_for_blips(agents_per_node=40) as cluster:
        A, B = cluster["A"], cluster["B"]
        x = B.agents[0]
        await run_as(x, lambda: B.reg.register("old", 1))
        for agent in B.agents[1:]:
            await run_as(agent, lambda: (B.reg.register("filler", 1), B.reg.register("filler", 2)))
        await B.reg.sync()
        assert A.reg.lookup("old") == [(x, 1)]
        await replace_bs_connection(cluster, lambda: run_as(x, lambda: B.reg.unregister("old")))
        await run_as(x, lambda: B.reg.register("new", 2))  # about 40 parts: mid-round
        await cluster.wait_converged(timeout=10)
        assert A.reg.lookup("old") == [] and A.reg.lookup("new") == [(x, 2)]


async def test_a_round_started_again_keeps_the_barriers_it_held(monkeypatch: pytest.MonkeyPatch) -> None:
    # A's `sync` ping to B waits behind A's round to B; B (misbehaving, or racing a
    # scope restart) discovers again, which restarts the round: the ping must follow.
    monkeypatch.setattr(scope_module, "SYNC_PART_ROWS", 2)
    async with pair_for_blips(agents_per_node=60) as cluster:
        A, B = cluster["A"], cluster["B"]
        for agent in A.agents:
            await run_as(agent, lambda: (A.reg.register("x", 1), A.reg.register("y", 2)))
        await A.reg.sync()
        assert B.node.send_service(A.node.id, "r", ["discover"])  # A sends B its rows again
        scope = A.reg._scope  # staging the race needs to see the round running
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 5
        while B.node.id not in scope._sending:  # every iteration: the round lasts a few dozen
            assert loop.time() < deadline, "A's round to B did not start"
            await asyncio.sleep(0)
        barrier = asyncio.ensure_future(A.reg.sync(5.0))
        await asyncio.sleep(0)
        assert B.node.id in scope._sending, "the round ended before the barrier was held"
        assert B.node.send_service(A.node.id, "r", ["discover"])  # ... and again
        await barrier
        await cluster.wait_converged(timeout=10)


async def test_rows_kept_across_a_replaced_connection_leave_if_the_scope_is_gone() -> None:
    # As above, but B's registry stopped during the blip (its "bye" went nowhere): on
    # the new connection B answers A's discover with "no such service", and A drops
    # the rows it kept, with Leaves.
    async with pair_for_blips() as cluster:
        A, B = cluster["A"], cluster["B"]
        b0 = B.agents[0]
        await run_as(b0, lambda: B.reg.register("k", "v1"))
        await B.reg.sync()
        await cluster.flush_watchers()
        mark = len(A.inbox)
        await replace_bs_connection(cluster, B.reg.stop)
        await eventually(lambda: A.reg.lookup("k") == [], 10, "B's rows to leave A", cluster.report)
        assert B.node.id in A.node.peers()
        await cluster.flush_watchers()
        assert A.events(mark) == [Leave(A.ref, "k", [(b0, "v1")])]


def two_nodes_apart(agents: int) -> ProxiedCluster:
    """A and B, `agents` agents each, their link cut (``split``) or restored (``heal``) at will."""
    return ProxiedCluster(("A", "B"), mode="cut", agents_per_node=agents, tick_interval=TICK,
                          down_after=DOWN, attributes=FAST_RECONNECT)


async def fill_apart_then_heal(cluster: ProxiedCluster, per_agent: int) -> int:
    """Split A from B, give each of A's agents `per_agent` rows, heal, and return once B
    holds the first part of A's sync round (the round has begun). Returns A's row count."""
    A, B = cluster["A"], cluster["B"]
    assert cluster.partition is not None
    cluster.partition.split({"A"}, {"B"})
    await cluster.wait_split([{"A"}, {"B"}])
    for i, agent in enumerate(A.agents):
        await run_as(agent, lambda i=i: [A.reg.register(("key", i), j) for j in range(per_agent)])
    assert A.reg.count() == per_agent * len(A.agents) and B.reg.count() == 0
    cluster.partition.heal()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 10
    while B.reg.count() == 0:
        assert loop.time() < deadline, "no sync part reached B"
        await asyncio.sleep(0)
    return A.reg.count()


async def test_a_catch_up_streamed_in_parts_converges_with_changes_made_after_it() -> None:
    # B joins A, which holds several sync parts' worth of rows. B's first `sync` (a
    # barrier) must not return before the whole round is in; A's changes after it
    # (update, exit, new rows, unregister) replicate, and B's watcher's snapshot +
    # events replay to exactly B's view.
    per_agent, agents = SYNC_PART_ROWS // 4, 24  # six parts
    async with two_nodes_apart(agents) as cluster:
        A, B = cluster["A"], cluster["B"]
        total = await fill_apart_then_heal(cluster, per_agent)
        await B.reg.sync()
        assert B.reg.count() == total  # the first barrier waited for the whole round
        a = A.agents
        await asyncio.gather(
            run_as(a[-1], lambda: A.reg.update_value(("key", agents - 1), "changed")),
            stop_agent(a[-2], "crash"),
            run_as(a[-3], lambda: [A.reg.register("new", n) for n in range(100)]),
            run_as(a[-4], lambda: A.reg.unregister(("key", agents - 4))),
            stop_agent(a[0], "kill"),
        )
        await cluster.wait_converged()
        assert A.reg.count() == total - 2 * per_agent + 100 - 1


async def test_a_change_racing_the_parts_of_a_round_is_not_lost() -> None:
    # The changes fire while the round is still streaming: to agents whose part went
    # out already and to those whose part is still to come.
    per_agent, agents = SYNC_PART_ROWS // 2, 16  # eight parts
    async with two_nodes_apart(agents) as cluster:
        A = cluster["A"]
        total = await fill_apart_then_heal(cluster, per_agent)
        a = A.agents
        changes = [stop_agent(a[i], "kill") for i in range(0, agents, 4)]
        changes += [run_as(a[i], lambda i=i: A.reg.update_value(("key", i), "v2")) for i in range(1, agents, 4)]
        changes += [run_as(a[i], lambda i=i: A.reg.register(("extra", i), i)) for i in range(2, agents, 4)]
        changes += [run_as(a[i], lambda i=i: A.reg.unregister(("key", i))) for i in range(3, agents, 4)]
        await asyncio.gather(*changes)
        await cluster.wait_converged()
        # kills take every row of their agents; each unregister one row; each extra adds one
        assert A.reg.count() == total - (agents // 4) * per_agent


async def test_a_round_cut_off_midway_is_dropped_and_the_next_one_converges(
        caplog: pytest.LogCaptureFixture) -> None:
    per_agent, agents = SYNC_PART_ROWS, 8  # eight parts or more
    async with two_nodes_apart(agents) as cluster:
        B = cluster["B"]
        assert cluster.partition is not None
        with caplog.at_level(logging.ERROR, logger="pgregistry"):
            total = await fill_apart_then_heal(cluster, per_agent)
            cluster.partition.split({"A"}, {"B"})  # mid-round, most likely: either way B loses A's rows
            await cluster.wait_split([{"A"}, {"B"}])
            assert B.reg.count() == 0
            cluster.partition.heal()
            await cluster.wait_converged()
        assert B.reg.count() == total
        assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text


# --------------------------------------------------------------------------- stateful

NAMES = ("A", "B", "C")
KEYS = st.sampled_from(["a", "b", ("t", 1), 7])
# Values that are equal only when their reprs are (no 1 == 1.0 == True): the checks
# compare entries by repr.
VALUES = st.sampled_from([None, 0, "x", (1, 2), [1, 2], {"n": 1}])
NODE = st.sampled_from(NAMES)
AGENT = st.integers(min_value=0, max_value=1)
WRITE = st.tuples(st.sampled_from(["register", "register", "unregister", "update_value"]),
                  NODE, AGENT, KEYS, VALUES, st.integers(min_value=0, max_value=3))
# Every split of three nodes into two groups: the lone node.
LONE = st.sampled_from(NAMES)
# A blackhole is detected after down_after (0.3 s), a cut at once: mostly cuts, and a
# bounded number of splits per example, to keep the whole run far from the timeout.
SEVERING = st.sampled_from(["cut", "cut", "blackhole"])
MAX_SPLITS = 5
# Liveness for the machine: fast detection and fast redials after a heal.
MACHINE_NODE = {"tick_interval": 0.05, "down_after": 0.3}
MACHINE_ATTRS = {"handshake_timeout": 0.4, "confirm_timeout": 0.4, "reconnect_max": 0.1}
# Bound on each wait of the machine (a split observed, convergence): healthy runs take
# well under a second even on a loaded machine; a failing example must fail, and be
# replayed once, well within the 60 s pytest-timeout.
MACHINE_WAIT = 6.0
# Rows per sync part in the machine: its nodes hold a few rows each, in several parts.
MACHINE_PART_ROWS = 2


class ClusterMachine(RuleBasedStateMachine):
    """Random writes, exits, splits and heals over three proxied nodes.

    One event loop lives as long as the machine; each rule runs on it to completion. A
    split waits until it is observed (links down between the groups, each group's views
    equal to its own local entries) before the machine goes on: a split healed before
    anyone noticed it is a delay, which `test_a_blip_...` covers. After each heal, and at
    teardown, the cluster must converge: every view equals the union of the local
    entries. After every step each watcher's snapshot + events equals its node's view.
    Sync rounds go in parts of `MACHINE_PART_ROWS` rows, so that every catch-up streams
    in several parts, interleaved with the writes.
    """

    def __init__(self) -> None:
        super().__init__()
        self.part_rows = scope_module.SYNC_PART_ROWS
        scope_module.SYNC_PART_ROWS = MACHINE_PART_ROWS
        self.loop = asyncio.new_event_loop()
        self.cluster = ProxiedCluster(NAMES, mode="cut", attributes=MACHINE_ATTRS, **MACHINE_NODE)
        self.groups: list[set[str]] | None = None
        self.splits = 0
        try:
            self.run(self.cluster.start(), timeout=MACHINE_WAIT)
        except BaseException:
            try:
                self.run(self.cluster.close(), timeout=MACHINE_WAIT)
            finally:
                self.loop.close()
                scope_module.SYNC_PART_ROWS = self.part_rows
            raise

    def run(self, coro: Any, timeout: float = MACHINE_WAIT + 2) -> Any:
        return self.loop.run_until_complete(asyncio.wait_for(coro, timeout))

    def agent(self, name: str, index: int) -> Any:
        return self.cluster[name].agents[index]

    # -- writes -------------------------------------------------------------------

    @initialize(ops=st.lists(st.tuples(NODE, AGENT, KEYS, VALUES), min_size=3, max_size=8))
    def seed(self, ops: list[tuple]) -> None:
        """Some entries on the nodes before anything else happens."""
        for name, index, key, value in ops:
            reg = self.cluster[name].reg
            self.run(run_as(self.agent(name, index), lambda: reg.register(key, value)))

    @initialize(lone=LONE, mode=SEVERING)
    def first_split(self, lone: str, mode: str) -> None:
        """Every example has a split among its first steps (short ones would often have none)."""
        self.partition(lone, mode)

    @rule(ops=st.lists(WRITE, min_size=1, max_size=4))
    def write(self, ops: list[tuple]) -> None:
        """A few register / unregister / update_value calls, each by one agent.

        unregister and update_value mostly pick a key the agent holds (`pick` chooses
        among them), so that they change something rather than miss.
        """
        for kind, name, index, key, value, pick in ops:
            reg = self.cluster[name].reg
            agent = self.agent(name, index)
            held = reg.keys(agent)
            if kind != "register" and held and pick < 3:
                key = held[pick % len(held)]
            action = {
                "register": lambda: reg.register(key, value),
                "unregister": lambda: reg.unregister(key),
                "update_value": lambda: reg.update_value(key, value),
            }[kind]
            self.run(run_as(agent, action))

    @rule(name=NODE, index=AGENT, how=st.sampled_from(["stop", "crash", "kill"]))
    def exit(self, name: str, index: int, how: str) -> None:
        member = self.cluster[name]
        self.run(stop_agent(member.agents[index], how))
        member.agents[index] = spawn_agent(member.node)

    # -- faults -------------------------------------------------------------------

    @rule(lone=LONE, mode=SEVERING)
    def partition(self, lone: str, mode: str) -> None:
        """Split {lone} | {the others} (also from an earlier split: links are re-made).

        After MAX_SPLITS splits in one example this does nothing (not a precondition:
        rules that are often disabled make hypothesis give up on examples).
        """
        if self.splits >= MAX_SPLITS:
            return
        groups = [{lone}, set(NAMES) - {lone}]
        assert self.cluster.partition is not None
        self.cluster.partition.split(*groups, mode=mode)
        self.groups = groups
        self.splits += 1
        self.run(self.cluster.wait_split(groups, MACHINE_WAIT))
        event(f"split ({mode})")

    @rule()
    def heal(self) -> None:
        """Heal the split if there is one; either way the cluster must converge."""
        assert self.cluster.partition is not None
        if self.groups is not None:
            self.cluster.partition.heal()
            self.groups = None
            event("heal")
        self.run(self.cluster.wait_converged(MACHINE_WAIT))

    # -- checks -------------------------------------------------------------------

    @invariant()
    def subscribers_replay_to_their_views(self) -> None:
        self.run(self.cluster.flush_watchers())
        self.cluster.check_replays()

    def teardown(self) -> None:
        try:
            if self.groups is not None:
                assert self.cluster.partition is not None
                self.cluster.partition.heal()
                self.groups = None
                event("heal (at teardown)")
            self.run(self.cluster.wait_converged(MACHINE_WAIT))
        finally:
            try:
                self.run(self.cluster.close(), timeout=MACHINE_WAIT)
            finally:
                self.loop.close()
                scope_module.SYNC_PART_ROWS = self.part_rows


# No shrink phase: a failing example costs up to MACHINE_WAIT per wait, so shrinking
# would outlast the pytest-timeout (whose Failed hypothesis would catch as just another
# failure and shrink on); the unshrunk steps (at most 20) are printed instead.
ClusterMachine.TestCase.settings = settings(
    max_examples=15, stateful_step_count=20, deadline=None,
    phases=[Phase.explicit, Phase.reuse, Phase.generate],
    suppress_health_check=[HealthCheck.too_slow])
TestClusterMachine = ClusterMachine.TestCase
