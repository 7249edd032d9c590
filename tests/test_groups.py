"""Group operations of `Registry` (pick, via_group, join, leave, leave_all, count_pid,
lookup_remote) and `Leave.reason`, on both table implementations."""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pgregistry.errors import AlreadyRegistered, AlreadyStarted, NoProcess, NotLocal, RemoteError
from pgregistry.events import Join, Leave
from pgregistry.node import Node
from pgregistry.process import receive
from pgregistry.process import self as self_pid
from pgregistry.registry import PICK_MODES
from pgregistry.server import Server, call
from pgregistry.terms import Pid

from .helpers import drain, eventually, registry_cluster, run_as, spawn_agent, started_registry, stop_agent

pytestmark = pytest.mark.usefixtures("registry_table")


async def _idle() -> None:
    await receive()


def leaves(messages: list[Any]) -> list[Leave]:
    return [m for m in messages if type(m) is Leave]


async def watch(node: Node, reg: Any) -> list[Any]:
    """The inbox of a new process of `node` subscribed to all of `reg` (its messages land there)."""
    inbox: list[Any] = []
    await run_as(spawn_agent(node, inbox), reg.monitor_scope)
    return inbox


async def leaves_in(inbox: list[Any], count: int) -> list[Leave]:
    """The `Leave` events in `inbox`, once there are `count` of them."""
    await eventually(lambda: len(leaves(inbox)) >= count, what=f"{count} Leave events")
    return leaves(inbox)


async def next_leave(timeout: float = 5.0) -> Leave:
    """The next `Leave` in the caller's mailbox, skipping other messages."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        msg = await receive(max(0.0, deadline - loop.time()))
        if type(msg) is Leave:
            return msg


# -- pick: single node ---------------------------------------------------------------------

async def test_pick_of_an_empty_group_is_none_and_bad_how_raises() -> None:
    async with started_registry() as (node, reg):
        for how in PICK_MODES:
            assert reg.pick("nobody", how) is None
            assert reg.pick("nobody", how, [self_pid()]) is None
        reg.register("g")
        for bad in ("fastest", "", None, 3, ["random"]):
            with pytest.raises(ValueError, match="round_robin"):
                reg.pick("g", bad)  # type: ignore[arg-type]
            with pytest.raises(ValueError, match="round_robin"):
                reg.pick("nobody", bad)  # type: ignore[arg-type]
            with pytest.raises(ValueError, match="round_robin"):
                reg.via_group("g", bad)  # type: ignore[arg-type]
        with pytest.raises(TypeError):
            reg.pick(["unhashable"])
        with pytest.raises(ValueError):
            reg.pick(("nan", float("nan")))
        with pytest.raises(TypeError, match="exclude"):
            reg.pick("g", "random", self_pid())
        with pytest.raises(TypeError, match="exclude"):
            reg.pick("g", "random", ["not a pid"])
        for empty_but_wrong in (None, 0, "", {}):
            with pytest.raises(TypeError, match="exclude"):
                reg.pick("g", "random", empty_but_wrong)


async def test_pick_modes_on_one_node() -> None:
    async with started_registry() as (node, reg):
        a, b, c = (node.spawn(_idle) for _ in range(3))
        reg.join("g", [a, b, c], "v")
        assert reg.pick("g", "oldest") == a and reg.pick("g", "newest") == c
        assert reg.update_value("g", "w", a)  # a moves to the end of the key's order
        assert reg.pick("g", "oldest") == b and reg.pick("g", "newest") == a
        assert reg.pick("g", "oldest", [b]) == c and reg.pick("g", "newest", (a,)) == c
        for how in ("random", "local", "closest", "furthest", "round_robin"):
            assert reg.pick("g", how) in (a, b, c)
            assert reg.pick("g", how, {a, b}) == c
            assert reg.pick("g", how, frozenset((a, b, c))) is None
        assert reg.pick("g", "remote") is None  # no other node
        assert {reg.pick("g", "random") for _ in range(300)} == {a, b, c}
        cycle = [reg.pick("g", "round_robin") for _ in range(6)]
        assert sorted(cycle[:3]) == sorted([a, b, c]) and cycle[:3] == cycle[3:]
        assert all(reg.pick("g", "round_robin", [cycle[0]]) != cycle[0] for _ in range(5))


async def test_round_robin_is_per_key_and_forgets_emptied_keys() -> None:
    async with started_registry() as (node, reg):
        pids = [node.spawn(_idle) for _ in range(3)]
        reg.join("x", pids)
        reg.join("y", pids)
        first = [reg.pick("x", "round_robin") for _ in range(3)]
        assert sorted(first) == sorted(pids)
        assert [reg.pick("y", "round_robin") for _ in range(3)] == first  # y starts at its own start
        for i in range(3000):  # many keys, each picked once and emptied: the cursors are pruned
            reg.join(("k", i), pids[0])
            assert reg.pick(("k", i), "round_robin") == pids[0]
            reg.leave(("k", i), pids[0])
        assert len(reg._cursors) < 2100
        assert [reg.pick("x", "round_robin") for _ in range(3)] == first  # x's place survived the pruning


# -- pick and via_group against a model, two nodes --------------------------------------------

KEYS = ("k1", "k2")

joins = st.tuples(st.just("join"), st.integers(0, 1), st.integers(0, 2), st.sampled_from(KEYS), st.integers(0, 3),
                  st.integers(1, 2))
ops_strategy = st.lists(
    st.one_of(
        joins,
        joins,  # twice as likely as the others, so that groups grow
        st.tuples(st.just("leave"), st.integers(0, 1), st.integers(0, 2), st.sampled_from(KEYS)),
        st.tuples(st.just("update"), st.integers(0, 1), st.integers(0, 2), st.sampled_from(KEYS), st.integers(0, 3)),
        st.tuples(st.just("pick"), st.sampled_from(PICK_MODES), st.sampled_from(KEYS),
                  st.lists(st.tuples(st.integers(0, 1), st.integers(0, 2)), max_size=3)),
        st.tuples(st.just("via"), st.sampled_from(PICK_MODES), st.sampled_from(KEYS)),
        st.tuples(st.just("cycle"), st.sampled_from(KEYS)),
    ),
    min_size=12,
    max_size=40,
)


class GroupModel:
    """Each key's entries in this node's order: ``[pid, value, join number]``."""

    def __init__(self) -> None:
        self.keys: dict[str, list[list[Any]]] = {k: [] for k in KEYS}
        self.joins = 0

    def join(self, key: str, pid: Pid, value: int, times: int) -> None:
        for _ in range(times):
            self.joins += 1
            self.keys[key].append([pid, value, self.joins])

    def leave(self, key: str, pid: Pid) -> int:
        mine = [e for e in self.keys[key] if e[0] == pid]
        if not mine:
            return 0
        latest = max(mine, key=lambda e: e[2])
        self.keys[key].remove(latest)
        return 1

    def update(self, key: str, pid: Pid, value: int) -> bool:
        mine = [e for e in self.keys[key] if e[0] == pid]
        for e in mine:
            e[1] = value
        self.keys[key] = [e for e in self.keys[key] if e[0] != pid] + mine
        return bool(mine)

    def allowed(self, key: str, how: str, exclude: set[Pid], is_local: Any) -> list[Pid] | None:
        """The pids `pick` may return (None: exactly none), or for oldest/newest the one it must."""
        pids = [e[0] for e in self.keys[key] if e[0] not in exclude]
        local = [p for p in pids if is_local(p)]
        remote = [p for p in pids if not is_local(p)]
        choices = {
            "random": pids, "round_robin": pids, "local": local, "remote": remote,
            "closest": local or remote, "furthest": remote or local,
            "oldest": pids[:1], "newest": pids[-1:],
        }[how]
        return choices or None


async def check_history(ops: list[tuple[Any, ...]]) -> None:
    async with registry_cluster(2, "groups-model") as members:
        (na, ra), (nb, rb) = members
        procs = [[na.spawn(_idle) for _ in range(3)], [nb.spawn(_idle) for _ in range(3)]]
        regs = [ra, rb]
        model = GroupModel()
        is_local = na.runtime.is_local
        for op in ops:
            kind = op[0]
            if kind in ("join", "leave", "update"):
                side, i, key = op[1], op[2], op[3]
                pid = procs[side][i]
                if kind == "join":
                    regs[side].join(key, [pid] * op[5], op[4])
                    model.join(key, pid, op[4], op[5])
                elif kind == "leave":
                    assert regs[side].leave(key, [pid]) == model.leave(key, pid)
                else:
                    assert regs[side].update_value(key, op[4], pid) == model.update(key, pid, op[4])
                if side == 1:
                    await rb.sync()
                assert ra.lookup(op[3]) == [(e[0], e[1]) for e in model.keys[op[3]]]
            elif kind == "pick":
                how, key = op[1], op[2]
                exclude = {procs[s][i] for s, i in op[3]}
                allowed = model.allowed(key, how, exclude, is_local)
                got = ra.pick(key, how, list(exclude))
                if allowed is None:
                    assert got is None, (how, key, exclude, got)
                else:
                    assert got in allowed, (how, key, exclude, got, allowed)
            elif kind == "via":
                how, key = op[1], op[2]
                allowed = model.allowed(key, how, set(), is_local)
                via = ra.via_group(key, how)
                if allowed is None:
                    with pytest.raises(NoProcess):
                        na.runtime.resolve(via)
                else:
                    assert na.runtime.resolve(via) in allowed
            else:  # a whole round-robin cycle, twice, over an unchanged group
                key = op[1]
                n = len(model.keys[key])
                picks = [ra.pick(key, "round_robin") for _ in range(2 * n)]
                assert Counter(picks[:n]) == Counter(e[0] for e in model.keys[key])
                assert picks[:n] == picks[n:]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                   HealthCheck.too_slow])
@given(ops=ops_strategy)
def test_pick_and_via_group_follow_the_model(ops: list[tuple[Any, ...]]) -> None:
    asyncio.run(asyncio.wait_for(check_history(ops), 20))


# -- via_group --------------------------------------------------------------------------------

class Echo(Server):
    async def handle_call(self, request: Any, from_: Any) -> Any:
        return ("echo", self_pid(), request)


async def test_via_group_with_call_across_nodes() -> None:
    async with registry_cluster(2, "groups-via") as [(na, ra), (nb, rb)]:
        remote_server = await Echo.start(nb)
        local_server = await Echo.start(na)
        rb.join("echo", [remote_server])
        await rb.sync()
        via = ra.via_group("echo")
        assert via != ra.via("echo") and via == ra.via_group("echo") and via != ra.via_group("echo", "oldest")
        assert hash(via) == hash(ra.via_group("echo"))
        assert await call(via, 1) == ("echo", remote_server, 1)  # the only member, on the other node
        assert await call(ra.via_group("echo", "remote"), 2) == ("echo", remote_server, 2)
        with pytest.raises(NoProcess):
            await call(ra.via_group("echo", "local"), 3)
        ra.join("echo", [local_server])
        assert await call(ra.via_group("echo", "closest"), 4) == ("echo", local_server, 4)
        assert await call(ra.via_group("echo", "furthest"), 5) == ("echo", remote_server, 5)
        seen = {(await call(ra.via_group("echo", "round_robin"), 6))[1] for _ in range(4)}
        assert seen == {local_server, remote_server}
        with pytest.raises(NoProcess):
            await call(ra.via_group("nobody"), 7)


async def test_via_group_as_a_server_name_joins_an_empty_group() -> None:
    async with started_registry() as (node, reg):
        via = reg.via_group("pool")
        pid = await Echo.start(node, name=via)
        assert reg.lookup("pool") == [(pid, None)]
        with pytest.raises(AlreadyStarted):
            await Echo.start(node, name=via)
        assert await call(via, "hi") == ("echo", pid, "hi")


# -- join / leave / leave_all / count_pid / lookup_remote ----------------------------------------

async def test_join_validates_every_pid_before_any_change() -> None:
    async with started_registry() as (node, reg):
        a, b = node.spawn(_idle), node.spawn(_idle)
        dead = node.spawn(_idle)
        await stop_agent_pid(node, dead)
        foreign = Pid("other@127.0.0.1:1", 1)
        ref, _snapshot = reg.monitor_scope()
        with pytest.raises(NoProcess):
            reg.join("g", [a, dead])
        with pytest.raises(NotLocal):
            reg.join("g", [a, foreign])
        with pytest.raises(TypeError):
            reg.join("g", [a, "pid"])
        with pytest.raises(TypeError):
            reg.join("g", {a})
        with pytest.raises(TypeError):
            reg.join(["g"], [a])
        with pytest.raises(TypeError):
            reg.join("g", [a], value=object())
        assert reg.lookup("g") == [] and await drain() == []
        assert reg.join("g", [a, b, a], "v") is None
        assert reg.lookup("g") == [(a, "v"), (b, "v"), (a, "v")]
        assert reg.join("g", b) is None  # one pid alone
        assert reg.join("g", []) is None
        assert reg.count_pid("g", a) == 2 and reg.count_pid("g", b) == 2 and reg.count_pid("h", a) == 0
        assert [m for m in await drain() if type(m) is Join] == [Join(ref, "g", [(p, "v")]) for p in (a, b, a)] + [
            Join(ref, "g", [(b, None)])]
        with pytest.raises(TypeError):
            reg.count_pid("g", "pid")
        with pytest.raises(TypeError):
            reg.count_pid(["g"], a)


async def stop_agent_pid(node: Node, pid: Pid) -> None:
    node.runtime.exit(pid, "kill")
    await eventually(lambda: node.runtime.process(pid) is None, what="the process exited")


async def test_join_in_a_unique_registry() -> None:
    async with started_registry(keys="unique") as (node, reg):
        a, b = node.spawn(_idle), node.spawn(_idle)
        with pytest.raises(ValueError, match="unique"):
            reg.join("u", [a, b])
        with pytest.raises(ValueError, match="unique"):
            reg.join("u", [a, a])
        assert reg.lookup("u") == []
        reg.join("u", [a], 1)
        assert reg.whereis_name("u") == a
        with pytest.raises(AlreadyRegistered) as info:
            reg.join("u", b)
        assert info.value.holder == a
        assert reg.lookup("u") == [(a, 1)]
        assert reg.leave("u", [a]) == 1 and reg.whereis_name("u") is None


async def test_leave_removes_each_pids_most_recent_entry() -> None:
    async with started_registry() as (node, reg):
        a, b = node.spawn(_idle), node.spawn(_idle)
        reg.join("g", [a], 1)
        reg.join("g", [b], 2)
        reg.join("g", [a], 3)
        reg.update_value("g", 9, b)
        ref, _snapshot = reg.monitor("g")
        with pytest.raises(NotLocal):
            reg.leave("g", [a, Pid("other@127.0.0.1:1", 1)])
        with pytest.raises(TypeError):
            reg.leave("g", [a, None])
        with pytest.raises(TypeError):
            reg.leave(["g"], [a])
        assert reg.count_pid("g", a) == 2
        assert reg.leave("g", [a, b]) == 2
        assert reg.lookup("g") == [(a, 1)]
        assert reg.leave("g", [b]) == 0 and reg.leave("missing", a) == 0
        assert reg.leave("g", [a, a]) == 1 and reg.lookup("g") == []
        got = leaves(await drain())
        assert got == [Leave(ref, "g", [(a, 3)]), Leave(ref, "g", [(b, 9)]), Leave(ref, "g", [(a, 1)])]
        assert {m.reason for m in got} == {"unregistered"}


async def test_leave_all_removes_every_entry_of_the_caller() -> None:
    async with started_registry() as (node, reg):
        me = self_pid()
        other = spawn_agent(node)
        reg.register("x", 1)
        reg.register("y", 2)
        reg.register("x", 3)
        await run_as(other, lambda: reg.register("x", 4))
        ref, _snapshot = reg.monitor_scope()
        assert reg.leave_all() == 3
        assert reg.lookup("x") == [(other, 4)] and reg.lookup("y") == []
        assert leaves(await drain()) == [Leave(ref, "x", [(me, 1), (me, 3)]), Leave(ref, "y", [(me, 2)])]
        assert reg.leave_all() == 0
        assert await run_as(other, reg.leave_all) == 1 and reg.count() == 0


async def test_writes_need_the_loop_thread_and_a_running_registry() -> None:
    async with started_registry() as (node, reg):
        a = node.spawn(_idle)
        await reg.stop()
        for write in (lambda: reg.join("g", [a]), lambda: reg.leave("g", [a]), reg.leave_all):
            with pytest.raises(RuntimeError, match="stopped"):
                write()


async def test_lookup_remote_and_lookup_local_split_lookup() -> None:
    async with registry_cluster(2, "groups-lookup") as [(na, ra), (nb, rb)]:
        pa, pb = na.spawn(_idle), nb.spawn(_idle)
        ra.join("g", [pa], "a")
        rb.join("g", [pb, pb], "b")
        await rb.sync()
        await ra.sync()
        assert ra.lookup("g") == [(pa, "a"), (pb, "b"), (pb, "b")]
        assert ra.lookup_remote("g") == [(pb, "b"), (pb, "b")] and ra.lookup_local("g") == [(pa, "a")]
        assert rb.lookup_remote("g") == [(pa, "a")]
        assert ra.lookup_remote("none") == [] and ra.count_pid("g", pb) == 2
        assert ra.pick("g", "remote") == pb and ra.pick("g", "local") == pa
        assert ra.pick("g", "closest") == pa and ra.pick("g", "furthest") == pb
        with pytest.raises(TypeError):
            ra.lookup_remote(["g"])


# -- Leave.reason -----------------------------------------------------------------------------

async def test_leave_reason_is_outside_the_tuple() -> None:
    event = Leave("ref", "k", [])
    assert event.reason == "unregistered" and len(event) == 3
    event.reason = "nodedown"
    assert event == Leave("ref", "k", []) and tuple(event) == ("ref", "k", [])
    ref, key, entries = event
    assert (ref, key, entries) == ("ref", "k", [])


async def test_leave_reason_of_local_causes() -> None:
    async with started_registry() as (node, reg):
        ref, _snapshot = reg.monitor_scope()
        reg.register("mine")
        reg.unregister("mine")
        agents = {how: spawn_agent(node) for how in ("stop", "crash", "kill")}
        for how, agent in agents.items():
            await run_as(agent, lambda: reg.register(how))
        await drain()
        for how, agent in agents.items():
            reason = await stop_agent(agent, how)
            event = await next_leave()
            assert event.key == how and event.reason == reason
        assert reason == "killed"


async def test_leave_reason_of_remote_causes_and_nodedown() -> None:
    async with registry_cluster(2, "groups-reasons") as [(na, ra), (nb, rb)]:
        inbox = await watch(na, ra)
        agents = {how: spawn_agent(nb) for how in ("unregister", "stop", "crash", "kill")}
        for how, agent in agents.items():
            await run_as(agent, lambda: rb.register(how))
        keeper = spawn_agent(nb)
        await run_as(keeper, lambda: rb.register("kept"))
        await rb.sync()
        await run_as(agents["unregister"], lambda: rb.unregister("unregister"))
        expected = {"unregister": "unregistered", "stop": "normal",
                    "crash": RemoteError("RuntimeError", "agent crashed on purpose"), "kill": "killed"}
        for how in ("stop", "crash", "kill"):
            await stop_agent(agents[how], how)
        got = await leaves_in(inbox, 4)
        assert {event.key: event.reason for event in got} == expected
        await na.disconnect(nb.id)
        event = (await leaves_in(inbox, 5))[-1]
        assert (event.key, event.reason) == ("kept", "nodedown")


async def test_leave_reason_when_the_peer_scope_stops() -> None:
    async with registry_cluster(2, "groups-stop") as [(_na, ra), (nb, rb)]:
        inbox = await watch(ra.node, ra)
        rb.register_name("held", nb.spawn(_idle))
        await rb.sync()
        await rb.stop()
        (event,) = await leaves_in(inbox, 1)
        assert (event.key, event.reason) == ("held", "scope_stopped")


async def test_leave_reason_of_a_sync_round() -> None:
    """Rows a peer's sync round no longer lists leave with reason "sync"."""
    async with registry_cluster(2, "groups-sync") as [(_na, ra), (nb, rb)]:
        pb, qb = nb.spawn(_idle), nb.spawn(_idle)
        rb.join("g", [pb, pb, qb])
        await rb.sync()
        tags = [tag for _pid, _value, tag in rb._scope.table.entries("g")]
        inbox = await watch(ra.node, ra)
        # a round from b listing pb with one row only, and not qb at all
        ra._scope.peer_message(nb.id, ["sync", 0, [[pb, ["g", None, tags[0]]]], True])
        got = await leaves_in(inbox, 1)
        assert [(m.key, m.entries, m.reason) for m in got] == [("g", [(pb, None), (qb, None)], "sync")]
        assert ra.lookup("g") == [(pb, None)]


async def test_malformed_leave_reasons_are_refused() -> None:
    async with registry_cluster(2, "groups-bad") as [(_na, ra), (nb, rb)]:
        pb = nb.spawn(_idle)
        rb.join("g", [pb, pb, pb])
        await rb.sync()
        tags = [tag for _pid, _value, tag in rb._scope.table.entries("g")]
        inbox = await watch(ra.node, ra)
        for bad in ("normal", [], [1, 2], ["a", "b", "c"], ["RuntimeError", 3]):
            ra._scope.peer_message(nb.id, ["ops", [["l", [["g", pb, tags[0]]], bad]]])
        ra._scope.peer_message(nb.id, ["ops", [["l", [["g", pb, tags[0]]], ["because"], "extra"]]])
        assert len(ra.lookup("g")) == 3 and leaves(inbox) == []
        ra._scope.peer_message(nb.id, ["ops", [["l", [["g", pb, tags[0]]], [("some", "term")]]]])
        ra._scope.peer_message(nb.id, ["ops", [["l", [["g", pb, tags[1]]], ["ValueError", "bad"]]]])
        ra._scope.peer_message(nb.id, ["ops", [["l", [["g", pb, tags[2]]]]]])  # a peer without reasons
        got = await leaves_in(inbox, 3)
        assert [m.reason for m in got] == [("some", "term"), RemoteError("ValueError", "bad"), "unregistered"]
        assert ra.lookup("g") == []


async def test_an_exit_reason_too_large_for_a_peer_leaves_without_it() -> None:
    """The leave op of an exit whose reason does not fit a peer's frames goes without it."""
    async with registry_cluster(3, "groups-big", last_node_options={"max_frame": 64 * 1024}) as members:
        (na, ra), (nb, rb), (nc, rc) = members
        inbox_a, inbox_c = await watch(na, ra), await watch(nc, rc)
        pb = nb.spawn(_idle)
        rb.join("g", [pb, pb])
        await rb.sync()
        big = "z" * 100_000
        nb.runtime.exit(pb, big)
        (on_a,) = await leaves_in(inbox_a, 1)
        (on_c,) = await leaves_in(inbox_c, 1)
        assert on_a.entries == on_c.entries == [(pb, None), (pb, None)]
        assert on_a.reason == big and on_c.reason == "unregistered"
        assert ra.lookup("g") == rc.lookup("g") == []
        assert nc.id in nb.peers()
