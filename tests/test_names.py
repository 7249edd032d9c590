"""`Names` on real nodes in one event loop: every API call on 1, 2 and 3 members,
membership changes, handoff, get-or-start races, faults (partitions through proxies,
a node stopped, a node restarted) and hostile messages from a peer."""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import AsyncIterator
from typing import Any

import pytest

import pgregistry as pgr
from pgregistry.errors import JoinRefused, NoProcess, NoQuorum, NotLocal
from pgregistry.events import Down, NameLost
from pgregistry.names import Names, lease_clock
from pgregistry.node import Node
from pgregistry.process import receive
from pgregistry.server import Server, call
from pgregistry.terms import Pid
from pgregistry.testing import Partition

from .helpers import eventually, proxied_links, run_as, spawn_agent

COOKIE = "names-tests"
LEASE = 0.6
FAST = {"tick_interval": 0.1, "down_after": 0.5}


async def idle() -> None:
    while True:
        await receive()


@contextlib.asynccontextmanager
async def names_cluster(count: int, lease: float = LEASE, routes: Partition | None = None,
                        **options: Any) -> AsyncIterator[list[tuple[Node, Names]]]:
    """`count` nodes ``n0``, ``n1``... in one names cluster (joined one by one through n0)."""
    async with contextlib.AsyncExitStack() as stack:
        members = []
        for i in range(count):
            node = await stack.enter_async_context(Node(f"n{i}", cookie=COOKIE, **FAST))
            members.append((node, await Names.start(node, lease=lease, **options)))
        for _node, names in members[1:]:
            await names.join(members[0][0].id)
        ids = sorted(node.id for node, _ in members)
        for _node, names in members:
            await eventually(lambda names=names: sorted(names.live_nodes()) == ids, what="every member live")
        yield members


# -- one member ------------------------------------------------------------------------


async def test_one_member_registers_reads_and_releases() -> None:
    async with Node("solo", cookie=COOKIE) as node:
        names = await Names.start(node)
        assert names.nodes() == [node.id] and names.live_nodes() == [node.id]
        me = pgr.self()
        assert await names.register_name("merlin") is True  # the caller by default
        assert names.whereis_name("merlin") == me
        token = names.token("merlin")
        assert token == 1
        assert await names.lookup("merlin") == (me, 1)
        assert await names.register_name("merlin") is True  # already its holder
        other = node.spawn(idle)
        assert await names.register_name("merlin", other) is False  # held by a process of this node
        assert await names.unregister_name("merlin") is True
        assert names.whereis_name("merlin") is None and names.token("merlin") is None
        assert await names.lookup("merlin") is None
        assert await names.unregister_name("merlin") is False
        assert await names.register_name("merlin", other) is True
        assert names.token("merlin") == 2  # a release keeps the token; the next holder gets one more
        assert names.send("merlin", "hello") == other
        stat = names.stat()
        assert stat["members"] == [node.id] and stat["held_here"] == 1 and stat["lease_valid"]
        assert stat["registers"] >= 3 and stat["register_p50"] is not None


async def test_a_holder_that_exits_releases_its_names() -> None:
    async with Node("solo", cookie=COOKIE) as node:
        names = await Names.start(node)
        pid = node.spawn(idle)
        for name in ("a", "b", ("c", 1)):
            assert await names.register_name(name, pid)
        node.runtime.exit(pid, "kill")
        for name in ("a", "b", ("c", 1)):
            await eventually(lambda name=name: names.whereis_name(name) is None, what=f"{name} released")
            assert await names.lookup(name) is None


async def test_bad_arguments_raise_clear_errors() -> None:
    async with Node("solo", cookie=COOKIE) as node:
        with pytest.raises(ValueError, match="on_lost"):
            await Names.start(node, on_lost="ignore")
        with pytest.raises(ValueError, match="lease"):
            await Names.start(node, lease=0)
        with pytest.raises(ValueError, match="shard_count"):
            await Names.start(node, shard_count=0)
        names = await Names.start(node)
        with pytest.raises(pgr.AlreadyStarted):
            await Names.start(node)
        with pytest.raises(TypeError, match="name"):
            await names.register_name(["not", "a", "key"])
        with pytest.raises(ValueError, match="NaN"):
            await names.register_name(("x", math.nan))
        with pytest.raises(TypeError):
            names.whereis_name({"a": 1})
        with pytest.raises(TypeError, match="Pid"):
            await names.register_name("x", "not a pid")
        with pytest.raises(NotLocal):
            await names.register_name("x", Pid("elsewhere@h:1", 1, 1))
        dead = node.spawn(idle)
        node.runtime.exit(dead, "kill")
        await asyncio.sleep(0)
        with pytest.raises(NoProcess):
            await names.register_name("x", dead)
        with pytest.raises(ValueError, match="timeout"):
            await names.register_name("x", timeout=-1)
        with pytest.raises(ValueError, match="force=True"):
            await names.reset()
        with pytest.raises(ValueError, match="not a member"):
            await names.leave("nobody@h:1")
        with pytest.raises(NoProcess):
            names.send("nobody holds this", "msg")
        with pytest.raises(TypeError, match="new_pid"):
            await names.update("x", "not a pid", 1)


# -- three members ---------------------------------------------------------------------


async def test_three_members_agree_on_one_holder_and_its_token() -> None:
    async with names_cluster(3) as members:
        (a, na), (b, nb), (c, nc) = members
        pa, pb = a.spawn(idle), b.spawn(idle)
        assert await na.register_name("merlin", pa) is True
        assert await nb.register_name("merlin", pb) is False  # held, and its node renews
        for names in (na, nb, nc):
            await eventually(lambda names=names: names.whereis_name("merlin") == pa, what="the holder everywhere")
        assert await nc.lookup("merlin") == (pa, na.token("merlin"))
        assert nb.token("merlin") == nc.token("merlin") == na.token("merlin")
        assert nb.send("merlin", "hi") == pa
        stat = nb.stat()
        assert sorted(stat["members"]) == sorted(n.id for n, _ in members) and stat["is_member"]


class Wizard(Server):
    async def init(self, greeting: str) -> None:
        self.greeting = greeting

    async def handle_call(self, request: Any, caller: Any) -> Any:
        return f"{self.greeting}, {request}"


async def test_a_server_under_a_consensus_name_is_called_from_any_node() -> None:
    async with names_cluster(3) as members:
        (a, na), (b, nb), (c, nc) = members
        srv = await Wizard.start(a, "abracadabra", name=na.via("merlin"))
        with pytest.raises(pgr.AlreadyStarted):
            await Wizard.start(b, "hocus pocus", name=nb.via("merlin"))
        await eventually(lambda: nc.whereis_name("merlin") == srv, what="c learns the holder")
        caller = spawn_agent(c)
        assert await run_as(caller, lambda: call(nc.via("merlin"), "Arthur")) == "abracadabra, Arthur"
        a.runtime.exit(srv, "kill")
        await eventually(lambda: nc.whereis_name("merlin") is None, what="the name freed when the server died")
        srv2 = await Wizard.start(b, "hocus pocus", name=nb.via("merlin"))
        assert (await nc.lookup("merlin") or (None, 0))[0] == srv2


async def test_get_or_start_from_three_nodes_at_once_starts_exactly_one() -> None:
    ran: list[str] = []

    async def singleton(where: str) -> None:
        ran.append(where)
        await idle()

    async with names_cluster(3) as members:
        for round_ in range(5):
            name = ("singleton", round_)
            pids = await asyncio.gather(*(names.get_or_start(name, singleton, node.id) for node, names in members))
            assert len(set(pids)) == 1, pids
            await eventually(lambda: len(ran) == round_ + 1, what="the winner runs")
            assert len(ran) == round_ + 1, ran  # no losing process ran user code
            for _node, names in members:
                await eventually(lambda names=names, name=name: names.whereis_name(name) == pids[0],
                                 what="every node sees the winner")


async def test_update_hands_a_name_over_by_compare_and_set() -> None:
    async with names_cluster(3) as members:
        (a, na), (b, nb), (c, nc) = members
        p1, p2 = a.spawn(idle), a.spawn(idle)
        assert await na.register_name("job", p1)
        t1 = na.token("job")
        assert t1 is not None
        assert await na.update("job", p2, t1 + 7) is False  # a stale or wrong token changes nothing
        assert na.whereis_name("job") == p1
        assert await na.update("job", p2, t1) is True  # on the holder's node, to a local pid
        t2 = na.token("job")
        assert na.whereis_name("job") == p2 and t2 is not None and t2 > t1
        # To a pid of another node: that node vouches for its lease and grants the name.
        q = b.spawn(idle)
        assert await na.update("job", q, t2) is True
        await eventually(lambda: nb.whereis_name("job") == q, what="b grants the handed-over name")
        t3 = nb.token("job")
        assert t3 is not None and t3 > t2
        assert na.whereis_name("job") in (q, None)
        # From a third node: forwarded to the holder's node (b), to a pid of c.
        r = c.spawn(idle)
        await eventually(lambda: nc.token("job") == t3, what="c learns the token")
        assert await nc.update("job", r) is True
        await eventually(lambda: nc.whereis_name("job") == r, what="c holds it")
        assert (await na.lookup("job") or (None, 0))[1] > t3
        # The old holders are alive: a handoff does not kill.
        assert all(node.runtime.process(p) is not None for node, p in ((a, p1), (a, p2), (b, q)))
        dead = c.spawn(idle)
        c.runtime.exit(dead, "kill")
        await asyncio.sleep(0)
        with pytest.raises(NoProcess):
            await nc.update("job", dead)


async def test_join_is_refused_with_a_reason() -> None:
    async with names_cluster(2) as members:
        (a, na), (b, nb) = members
        async with Node("holder", cookie=COOKIE, **FAST) as h, Node("odd", cookie=COOKIE, **FAST) as o:
            nh = await Names.start(h, lease=LEASE)
            assert await nh.register_name("mine", h.spawn(idle))
            with pytest.raises(JoinRefused, match="holds names"):
                await nh.join(a.id)
            no = await Names.start(o, lease=LEASE, shard_count=4)
            with pytest.raises(JoinRefused, match="shard_count"):
                await no.join(a.id)
            await no.stop()
            no = await Names.start(o, lease=2 * LEASE)
            with pytest.raises(JoinRefused, match="lease"):
                await no.join(a.id)
        # A member of a two-member cluster cannot join another one.
        async with Node("x", cookie=COOKIE, **FAST) as x:
            nx = await Names.start(x, lease=LEASE)
            with pytest.raises(JoinRefused, match="another names cluster"):
                await nb.join(x.id)
            await nx.join(a.id)  # the other way round is fine: x is alone and holds nothing
            assert sorted(na.nodes()) == sorted([a.id, b.id, x.id])
            # Joining again is a no-op.
            await nx.join(b.id)
            await nx.leave(x.id)
            await eventually(lambda: x.id not in na.nodes(), what="x removed")


async def test_a_dead_member_is_removed_and_the_rest_keep_a_majority() -> None:
    async with names_cluster(3) as members:
        (a, na), (b, nb), (c, nc) = members
        await c.stop()
        await eventually(lambda: c.id not in na.live_nodes(), what="c seen down")
        assert await na.register_name("still", a.spawn(idle))  # 2 of 3 are a majority
        await na.leave(c.id)
        assert sorted(na.nodes()) == sorted([a.id, b.id])
        await eventually(lambda: sorted(nb.nodes()) == sorted([a.id, b.id]), what="b learns the change")
        assert await nb.register_name("after", b.spawn(idle))
        assert await nb.lookup("still") == (na.whereis_name("still"), na.token("still"))


async def test_no_majority_raises_no_quorum_in_time() -> None:
    async with names_cluster(3) as members:
        (a, na), (b, _nb), (c, _nc) = members
        await b.stop()
        await c.stop()
        loop = asyncio.get_running_loop()
        start = loop.time()
        with pytest.raises(NoQuorum):
            await na.register_name("n", a.spawn(idle), timeout=0.5)
        with pytest.raises(TimeoutError):  # NoQuorum is a TimeoutError
            await na.lookup("n", timeout=0.3)
        assert loop.time() - start < 2.0
        # The cluster is gone for good: start again alone.
        old = na.cluster_id
        await na.reset(force=True)
        assert na.cluster_id != old and na.nodes() == [a.id]
        assert await na.register_name("n", a.spawn(idle), timeout=2.0)


# -- faults through proxies ------------------------------------------------------------


async def contend(names: Names, name: Any, pid: Pid, within: float) -> None:
    """Register `name` for `pid` again and again, as a contender does, until it holds it:
    `register_name` says False at once while the holder's node still renews here."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while not await names.register_name(name, pid, timeout=max(0.0, deadline - loop.time())):
        assert loop.time() < deadline, f"{name!r} not taken over within {within} s"
        await asyncio.sleep(0.02)


@contextlib.asynccontextmanager
async def proxied_names(on_lost: str = "kill") -> AsyncIterator[tuple[list[tuple[Node, Names]], Partition]]:
    """Three nodes whose every link goes through a proxy, in one names cluster."""
    async with contextlib.AsyncExitStack() as stack:
        nodes = [await stack.enter_async_context(Node(f"p{i}", cookie=COOKIE, **FAST)) for i in range(3)]
        part = await proxied_links(stack, nodes)
        members = [(n, await Names.start(n, lease=LEASE, on_lost=on_lost)) for n in nodes]
        for _node, names in members[1:]:
            await names.join(nodes[0].id)
        ids = sorted(n.id for n in nodes)
        for _node, names in members:
            await eventually(lambda names=names: sorted(names.live_nodes()) == ids, what="every member live")
        yield members, part


async def test_a_partitioned_holder_steps_down_and_the_majority_takes_over() -> None:
    async with proxied_names() as (members, part):
        (a, na), (b, nb), (c, nc) = members
        holder = a.spawn(idle)
        assert await na.register_name("leader", holder)
        token = na.token("leader")
        assert token is not None
        seen: list[Any] = []
        watcher = spawn_agent(a, seen)
        ref = await run_as(watcher, lambda: pgr.monitor(holder))
        part.split({"p0"}, {"p1", "p2"})
        # The minority's lease lapses: its holder is killed and it can register nothing.
        await eventually(lambda: a.runtime.process(holder) is None, timeout=LEASE * 4, what="holder killed")
        await eventually(lambda: any(isinstance(m, Down) and m.ref == ref for m in seen), what="Down delivered")
        assert [m.reason for m in seen if isinstance(m, Down) and m.ref == ref] == ["lost_quorum"]
        assert na.whereis_name("leader") is None and not na.stat()["lease_valid"]
        with pytest.raises(NoQuorum):
            await na.register_name("minority", a.spawn(idle), timeout=0.3)
        # The majority takes the name over once a's lease is over.
        winner = b.spawn(idle)
        await contend(nb, "leader", winner, within=LEASE * 4)
        new_token = nb.token("leader")
        assert new_token is not None and new_token > token
        part.heal()
        await eventually(lambda: na.whereis_name("leader") == winner, timeout=10.0, what="a learns the new holder")
        assert await na.lookup("leader") == (winner, new_token)
        assert na.stat()["step_downs"] >= 1


async def test_on_lost_notify_sends_name_lost_instead_of_killing() -> None:
    async with proxied_names(on_lost="notify") as (members, part):
        (a, na), _b, _c = members
        inbox: list[Any] = []
        holder = spawn_agent(a, inbox)
        assert await na.register_name("leader", holder)
        token = na.token("leader")
        part.split({"p0"}, {"p1", "p2"})
        await eventually(lambda: any(isinstance(m, NameLost) for m in inbox), timeout=LEASE * 4,
                         what="NameLost delivered")
        assert [m for m in inbox if isinstance(m, NameLost)] == [NameLost("leader", holder, token)]
        assert a.runtime.process(holder) is not None  # notified, not killed
        assert na.whereis_name("leader") is None


async def test_a_stopped_holder_node_is_taken_over_within_about_a_lease() -> None:
    async with proxied_names() as (members, part):
        (a, na), (b, nb), _c = members
        assert await na.register_name("leader", a.spawn(idle))
        token = na.token("leader")
        assert token is not None
        part.split({"p0"}, {"p1", "p2"})  # silent: as if a's machine froze
        loop = asyncio.get_running_loop()
        start = loop.time()
        winner = b.spawn(idle)
        await contend(nb, "leader", winner, within=LEASE * 5)
        took = loop.time() - start
        assert took < LEASE * 3, took  # a lease, the margin, and a few rounds (generous: shared CI)
        assert (nb.token("leader") or 0) > token


async def test_a_restarted_member_is_invited_back_as_a_new_incarnation() -> None:
    async with names_cluster(3) as members:
        (a, na), (b, nb), (c, nc) = members
        port = c.port
        old_incarnation = nc.me
        await c.stop()
        await eventually(lambda: c.id not in na.live_nodes(), what="c seen down")
        async with Node("n2", cookie=COOKIE, port=port, **FAST) as c2:
            nc2 = await Names.start(c2, lease=LEASE)
            assert nc2.me != old_incarnation and nc2.nodes() == [c2.id]
            await c2.connect(a.id)
            await eventually(lambda: len(nc2.nodes()) == 3 and nc2.me in nc2.core.members, timeout=10.0,
                             what="c2 replaced its old incarnation")
            assert old_incarnation not in na.core.members
            assert await nc2.register_name("back", c2.spawn(idle))
            await eventually(lambda: na.whereis_name("back") is not None, what="a sees c2's holder")


# -- hostile peers ---------------------------------------------------------------------


async def test_hostile_names_messages_are_refused_and_change_nothing() -> None:
    async with names_cluster(2) as members:
        (a, na), (b, nb) = members
        holder = a.spawn(idle)
        assert await na.register_name("safe", holder)
        token = na.token("safe")
        cid, epoch = na.cluster_id, na.core.epoch
        evil_pid = ("not", "a", "pid")
        hostile: list[Any] = [
            "not a list", [], [42], ["m"], ["m", "not a list"], ["hello", "x", True], ["rep", 1], ["invite", 3],
            ["req", 1, "config", "args"], ["unknown", 1],
            ["m", [["commit"]]],
            ["m", [("commit", cid, epoch, "safe", (epoch, 99, ("x", 1, 1)), (evil_pid, 5, 1, ("x", 1, 1)))]],
            ["m", [("commit", cid, epoch, ("x", math.nan), (epoch, 99, ("x", 1, 1)), (None, 0, 0, None))]],
            ["m", [("accept", cid, epoch, "safe", [epoch, 99, ["x", 1, 1]], (None, 0, 0, None),
                    (-1, -1, ()), (None, 0, 0, None))]],
            ["m", [("prepare", "another-cluster", epoch, "safe", (epoch, 99, ("x", 1, 1)))]],
            ["m", [("renew_ack", cid, epoch, "lgen", 1)]],
            ["m", [("nack", cid, epoch, "safe", (epoch, 1, ("x", 1, 1)), (epoch, 2, ("x", 1, 1)), -5)]],
            ["req", 7, "lease", [evil_pid]],
            ["req", 8, "update", ["safe", evil_pid, "token", 1]],
        ]
        for payload in hostile:
            b.send_service(a.id, na.service, payload)
        await eventually(lambda: na.stat()["refused_messages"] == 7, what="the bad core messages refused")
        assert await na.lookup("safe") == (holder, token)
        assert na.whereis_name("safe") == holder and na.token("safe") == token
        assert a.id in nb.live_nodes() and b.id in na.live_nodes()
        assert await nb.register_name("fine", b.spawn(idle))


async def test_the_trace_sees_leases_and_grants_with_the_lease_clock() -> None:
    seen: list[tuple[float, tuple[Any, ...]]] = []
    async with Node("solo", cookie=COOKIE) as node:
        before = lease_clock()
        names = await Names.start(node, trace=lambda t, ev: seen.append((t, ev)))
        pid = node.spawn(idle)
        assert await names.register_name("x", pid)
        assert await names.unregister_name("x")
        kinds = [ev[0] for _t, ev in seen]
        assert kinds[0] == "lease" and "grant" in kinds and "revoke" in kinds
        assert all(before <= t <= lease_clock() for t, _ev in seen)
        revoke = next(ev for _t, ev in seen if ev[0] == "revoke")
        assert revoke == ("revoke", "x", pid, 1, "released")


async def test_register_name_waits_out_the_lease_of_a_holder_whose_node_is_gone() -> None:
    async with names_cluster(3) as members:
        (a, na), (b, nb), _c = members
        assert await na.register_name("leader", a.spawn(idle))
        token = na.token("leader")
        await eventually(lambda: nb.whereis_name("leader") is not None, what="b learns the holder")
        await a.stop()
        loop = asyncio.get_running_loop()
        start = loop.time()
        winner = b.spawn(idle)
        assert await nb.register_name("leader", winner, timeout=LEASE * 5) is True  # one call: it waits
        assert loop.time() - start < LEASE * 4
        assert nb.whereis_name("leader") == winner and (nb.token("leader") or 0) > (token or 0)


async def test_a_via_with_a_token_reaches_only_that_holder() -> None:
    async with names_cluster(2) as members:
        (a, na), (b, nb) = members
        srv = await Wizard.start(a, "hello", name=na.via("desk"))
        await eventually(lambda: nb.token("desk") is not None, what="b learns the token")
        token = nb.token("desk")
        assert token is not None
        caller = spawn_agent(b)
        assert await run_as(caller, lambda: call(nb.via("desk", token=token), "me")) == "hello, me"
        successor = a.spawn(idle)
        assert await na.update("desk", successor, token)
        await eventually(lambda: nb.token("desk") == token + 1, what="b learns the new token")
        with pytest.raises(NoProcess):
            await run_as(caller, lambda: call(nb.via("desk", token=token), "me"))
        assert a.runtime.process(srv) is not None  # handed over, not killed
        with pytest.raises(TypeError, match="token"):
            nb.via("desk", token="1")  # type: ignore[arg-type]


async def test_stop_releases_the_names_held_so_others_take_them_at_once() -> None:
    async with names_cluster(3) as members:
        (a, na), (b, nb), _c = members
        for i in range(3):
            assert await na.register_name(("held", i), a.spawn(idle))
        await na.stop()
        for i in range(3):
            assert await nb.lookup(("held", i)) is None
            assert await nb.register_name(("held", i), b.spawn(idle), timeout=LEASE / 2)  # no lease to wait


async def test_a_node_that_left_fails_fast_until_it_joins_again() -> None:
    async with names_cluster(3) as members:
        (a, na), (b, nb), (c, nc) = members
        await nc.leave(c.id)
        await eventually(lambda: sorted(na.nodes()) == sorted([a.id, b.id]), what="a sees c gone")
        with pytest.raises(NoQuorum, match="not a member"):
            await nc.register_name("x", c.spawn(idle))
        await nc.join(b.id)
        assert await nc.register_name("x", c.spawn(idle))


async def test_membership_changes_under_load_keep_one_holder_per_name() -> None:
    async with names_cluster(3) as members:
        (a, na), (b, nb), (c, nc) = members
        stop = asyncio.Event()
        outcomes: dict[str, int] = {"ok": 0, "held": 0, "no_quorum": 0}

        async def load(names: Names, node: Node, tag: str) -> None:
            i = 0
            while not stop.is_set():
                name = ("load", i % 40)
                i += 1
                try:
                    won = await names.register_name(name, node.spawn(idle), timeout=1.0)
                    outcomes["ok" if won else "held"] += 1
                    if won and i % 3 == 0:
                        await names.unregister_name(name, timeout=1.0)
                except NoQuorum:
                    outcomes["no_quorum"] += 1  # writes pause from seal to serve

        tasks = [asyncio.ensure_future(load(n, node, node.name)) for node, n in ((a, na), (b, nb))]
        async with Node("n3", cookie=COOKIE, **FAST) as d:
            nd = await Names.start(d, lease=LEASE)
            await nd.join(a.id)
            await na.leave(c.id)
            await nd.leave(d.id)
            await nc.join(a.id)
        stop.set()
        await asyncio.gather(*tasks)
        assert outcomes["ok"] > 20, outcomes
        assert sorted(na.nodes()) == sorted([a.id, b.id, c.id])
        # One holder per name, the same on every member, and what a majority decided.
        for i in range(40):
            name = ("load", i)
            decided = await na.lookup(name)
            local = {n.node.id: n.holder(name) for n in (na, nb, nc)}
            valid = {h for h in local.values() if h is not None and h[0].node in (a.id, b.id)}
            assert len({h[0] for h in valid}) <= 1, (name, local)
            if decided is not None:
                await eventually(lambda name=name, decided=decided: na.holder(name) in (decided, None)
                                 and nb.holder(name) in (decided, None), what="members agree")


async def test_a_reset_node_rejoins_its_old_cluster_as_a_new_incarnation() -> None:
    async with names_cluster(3) as members:
        (a, na), (b, nb), (c, nc) = members
        holder = a.spawn(idle)
        assert await na.register_name("kept", holder)
        token = na.token("kept")
        old = nc.me
        await nc.reset(force=True)
        assert nc.me != old and nc.nodes() == [c.id]
        await nc.join(a.id)  # a replace step: c's old incarnation leaves, the new one copies
        assert old not in na.core.members and nc.me in na.core.members
        assert await nc.lookup("kept") == (holder, token)
        # The new incarnation copied the registers before it voted (its old self's are gone).
        assert nc.core._slot("kept").value[:2] == (holder, token)


async def test_a_joined_node_renews_once_per_third_of_a_lease() -> None:
    """The core a join replaces leaves no timer behind (it would renew a second time)."""
    async with Node("a", cookie=COOKIE) as a, Node("b", cookie=COOKIE) as b:
        names_a = await Names.start(a, lease=0.6)
        names_b = await Names.start(b, lease=0.6)
        await names_b.join(a.id)
        seq_a, seq_b = names_a.core._seq, names_b.core._seq
        await eventually(lambda: names_a.core._seq - seq_a >= 6, what="six renewals of a")  # about 1.2 s
        renewed_a, renewed_b = names_a.core._seq - seq_a, names_b.core._seq - seq_b
        assert renewed_b <= renewed_a + 2, (renewed_a, renewed_b)


async def test_a_graceful_stop_releases_the_names_held_there_at_once() -> None:
    lease = 2.0
    async with names_cluster(3, lease=lease) as members:
        (a, na), (b, nb), _c = members
        holder = a.spawn(idle)
        assert await na.register_name("leader", holder)
        await eventually(lambda: nb.whereis_name("leader") == holder, what="b knows the holder")
        await a.stop(drain_timeout=lease)
        # Released by the drain: b takes it well within a lease (a lease-long wait would time out).
        assert await nb.register_name("leader", b.spawn(idle), timeout=lease / 2)
