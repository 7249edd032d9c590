"""`Workers` on real nodes in one event loop: placement, routed calls, races, nodes joining
and dying, a healed partition with duplicates, a non-transitive cut, hand-off, refused
functions and hostile payloads."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import math
import sys
from collections.abc import AsyncIterator
from typing import Any

import pytest

import pgregistry as pgr
from pgregistry.errors import CallTimeout, NoProcess, NotLocal, RingUnsettled
from pgregistry.events import Down
from pgregistry.node import Node
from pgregistry.placement import Ring
from pgregistry.process import receive
from pgregistry.terms import Pid
from pgregistry.testing import Partition
from pgregistry.workers import ADOPT_PART, DIENOW_GRACE, Workers

from .helpers import eventually, proxied_links, run_as, spawn_agent
from .workers_fns import counter, not_listed, other

COOKIE = "workers-tests"
FAST = {"tick_interval": 0.1, "down_after": 0.5}
FNS = (counter, other)


async def idle() -> None:
    while True:
        await receive()


async def start_workers(nodes: list[Node], functions: Any = FNS, **options: Any) -> list[Workers]:
    services = [await Workers.start(node, "w", functions=functions, **options) for node in nodes]
    ids = sorted(node.id for node in nodes)
    for w in services:
        await eventually(lambda w=w: list(w.nodes()) == ids, what="every ring complete")
    return services


@contextlib.asynccontextmanager
async def cluster(count: int, **options: Any) -> AsyncIterator[list[tuple[Node, Workers]]]:
    """`count` connected nodes in this loop, each running the workers service "w"."""
    async with contextlib.AsyncExitStack() as stack:
        nodes = [await stack.enter_async_context(Node(f"n{i}", cookie=COOKIE, **FAST)) for i in range(count)]
        for node in nodes[1:]:
            await node.connect(nodes[0].id)
        for node in nodes:
            await eventually(lambda node=node: len(node.peers()) == count - 1, what="full mesh")
        yield list(zip(nodes, await start_workers(nodes, **options), strict=True))


@contextlib.asynccontextmanager
async def proxied(count: int = 3) -> AsyncIterator[tuple[list[tuple[Node, Workers]], Partition]]:
    """`count` nodes whose every link goes through a proxy, each running "w"."""
    async with contextlib.AsyncExitStack() as stack:
        nodes = [await stack.enter_async_context(Node(f"p{i}", cookie=COOKIE, **FAST)) for i in range(count)]
        part = await proxied_links(stack, nodes)
        for node in nodes[1:]:
            await node.connect(nodes[0].id)
        for node in nodes:
            await eventually(lambda node=node: len(node.peers()) == count - 1, what="full mesh")
        yield list(zip(nodes, await start_workers(nodes), strict=True)), part


def where(services: list[Workers], name: Any) -> list[Pid]:
    """Every pid some node answers for under `name`."""
    return sorted({w.processes()[name] for w in services if name in w.processes()})


# -- bad input ----------------------------------------------------------------------------


class _Holder:
    async def method(self) -> None:
        await receive()


def _closure() -> Any:
    async def inner() -> None:
        await receive()
    return inner


async def test_only_module_level_async_functions_can_be_listed() -> None:
    async with Node("solo", cookie=COOKIE) as node:
        cases = [
            (lambda: None, "lambda"),
            (_closure(), "inside another function"),
            (_Holder().method, "bound method"),
            (functools.partial(counter, 1), "functools.partial"),
            (print, "not an async function"),
        ]
        for fn, why in cases:
            with pytest.raises(TypeError, match=why):
                await Workers.start(node, "w", functions=(fn,))
        main_fn = _closure()
        main_fn.__module__, main_fn.__qualname__ = "__main__", "inner"
        with pytest.raises(TypeError, match="__main__"):
            await Workers.start(node, "w", functions=(main_fn,))
        with pytest.raises(TypeError, match="iterable"):
            await Workers.start(node, "w", functions=counter)
        with pytest.raises(ValueError, match="points"):
            await Workers.start(node, "w", functions=FNS, points=0)
        workers = await Workers.start(node, "w", functions=FNS)
        with pytest.raises(TypeError, match="not one of the functions"):
            await workers.spawn("a", not_listed)
        with pytest.raises(TypeError, match="lambda"):
            await workers.spawn("a", lambda: None)
        with pytest.raises(TypeError, match="name"):
            await workers.spawn(["not", "a", "key"], counter)
        with pytest.raises(ValueError, match="NaN"):
            await workers.spawn(("x", math.nan), counter)
        with pytest.raises(TypeError, match="args"):
            await workers.spawn("a", counter, object())
        with pytest.raises(TypeError):
            workers.send("a", object())
        with pytest.raises(ValueError, match="timeout"):
            await workers.whereis("a", timeout=-1)
        assert workers.processes() == {}


# -- one node and three -------------------------------------------------------------------


async def test_one_node_spawns_finds_calls_and_forgets_its_workers() -> None:
    async with Node("solo", cookie=COOKIE) as node:
        workers = await Workers.start(node, "w", functions=FNS)
        pid = await workers.spawn("cart", counter, 5)
        assert await workers.spawn("cart", counter, 7) == pid  # the running one
        assert await workers.get_or_start("cart", counter) == pid
        assert await workers.whereis("cart") == pid and await workers.whereis("nobody") is None
        assert await workers.call("cart", ("add", 2)) == 7
        workers.cast("cart", 3)
        workers.send("cart", ("add", 1))
        assert await workers.call("cart", "get") == 11
        assert workers.processes() == {"cart": pid}
        with pytest.raises(NoProcess) as err:
            await workers.call("nobody", "get")
        assert err.value.reason == "noproc"
        assert await workers.unregister("cart") is True and await workers.unregister("cart") is False
        assert node.runtime.process(pid) is not None  # unregistered, not stopped
        other_pid = await workers.spawn("cart", counter)
        assert other_pid != pid
        pgr.exit(other_pid, "kill")
        await eventually(lambda: workers.processes() == {}, what="an exited worker forgotten")
        stat = workers.stat()
        assert stat["nodes"] == 1 and stat["started"] == 2 and stat["workers"] == 0


async def test_workers_run_on_their_owner_and_every_node_finds_them() -> None:
    async with cluster(3) as members:
        nodes = [n for n, _ in members]
        services = [w for _, w in members]
        names = [("user", i) for i in range(60)]
        for i, name in enumerate(names):
            await services[i % 3].spawn(name, counter, i)
        for i, name in enumerate(names):
            owner = services[0].node_for(name)
            assert {w.node_for(name) for w in services} == {owner}
            assert owner == Ring([n.id for n in nodes]).node_for(name)
            pids = {await w.whereis(name) for w in services}
            assert len(pids) == 1
            pid = pids.pop()
            assert pid is not None and pid.node == owner
            assert await services[(i + 1) % 3].get_or_start(name, counter) == pid
            assert await services[(i + 2) % 3].call(name, "where") == owner
        assert {n.id for n in nodes} == {pid.node for w in services for pid in w.processes().values()}
        # Sends and casts by name reach workers on other nodes.
        for w in services:
            w.cast(names[0], 10)
            w.send(names[0], ("add", 1))

        async def all_arrived() -> bool:
            return await services[1].call(names[0], "get") == 33

        await eventually(all_arrived, what="casts and sends by name arrived")


async def test_get_or_start_raced_from_every_node_gives_one_pid() -> None:
    async with cluster(3) as members:
        services = [w for _, w in members]
        for round_ in range(20):
            names = [("race", round_, i) for i in range(10)]
            results = await asyncio.gather(*(w.get_or_start(name, counter) for name in names for w in services))
            for i, name in enumerate(names):
                assert len(set(results[i * 3:i * 3 + 3])) == 1, name
                assert where(services, name) == [results[i * 3]]


# -- membership changes -------------------------------------------------------------------


async def test_a_joining_node_adopts_the_workers_it_now_owns_and_they_are_told_to_restart() -> None:
    async with contextlib.AsyncExitStack() as stack:
        a, b, c = [await stack.enter_async_context(Node(f"j{i}", cookie=COOKIE, **FAST)) for i in range(3)]
        await b.connect(a.id)
        wa, wb = await start_workers([a, b])
        names = [f"session-{i}" for i in range(200)]
        pids = {name: await wa.spawn(name, counter) for name in names}
        await c.connect(a.id)
        await c.connect(b.id)
        wc = await Workers.start(c, "w", functions=FNS)
        ids = sorted([a.id, b.id, c.id])
        for w in (wa, wb, wc):
            await eventually(lambda w=w: list(w.nodes()) == ids, what="three-node rings")
        moved = {name for name in names if wc.node_for(name) == c.id}
        assert 30 < len(moved) < 110
        await eventually(lambda: set(wc.processes()) == moved, what="c adopted its names")
        assert all(wc.processes()[name] == pids[name] for name in moved)
        for name in names:  # every node finds the same (old) pid
            assert await wc.whereis(name) == pids[name]
            told = await wa.call(name, "seen")
            assert told == ([["ShouldRestart", name]] if name in moved else []), name
        assert wc.stat()["adopted"] == len(moved)
        # A moved worker that exits is forgotten at its new owner too; the next start is there.
        name = sorted(moved)[0]
        pgr.exit(pids[name], "shutdown")
        await eventually(lambda: name not in wc.processes(), what="gone reached the owner")
        new = await wa.get_or_start(name, counter)
        assert new.node == c.id and await wb.whereis(name) == new


async def test_a_dead_nodes_workers_start_again_on_the_new_owners() -> None:
    async with contextlib.AsyncExitStack() as stack:
        nodes = [await stack.enter_async_context(Node(f"d{i}", cookie=COOKIE, **FAST)) for i in range(3)]
        for node in nodes[1:]:
            await node.connect(nodes[0].id)
        for node in nodes:
            await eventually(lambda node=node: len(node.peers()) == 2, what="full mesh")
        services = await start_workers(nodes)
        names = [("job", i) for i in range(90)]
        pids = {name: await services[0].spawn(name, counter) for name in names}
        victim = nodes[2]
        lost = {name for name, pid in pids.items() if pid.node == victim.id}
        assert lost
        await victim.stop()
        survivors = services[:2]
        for w in survivors:
            await eventually(lambda w=w: len(w.nodes()) == 2, what="ring without the dead node")
        for name in names:
            pid = await services[1].get_or_start(name, counter)
            if name in lost:
                assert pid.node != victim.id and pid.node == services[0].node_for(name)
            else:
                assert pid == pids[name]  # untouched
            assert await services[0].whereis(name) == pid


async def test_a_healed_partition_keeps_one_instance_and_tells_the_others_to_die() -> None:
    async with proxied() as (members, part):
        nodes = [n for n, _ in members]
        services = [w for _, w in members]
        watcher_inbox: list[Any] = []
        watcher = spawn_agent(nodes[0], watcher_inbox)
        part.split({"p0"}, {"p1", "p2"})
        await eventually(lambda: len(services[0].nodes()) == 1 and len(services[1].nodes()) == 2,
                         timeout=5, what="split rings")
        names = [("dup", i) for i in range(12)]
        minority = {name: await services[0].get_or_start(name, counter) for name in names}
        majority = {name: await services[1].get_or_start(name, counter) for name in names}
        assert all(minority[n] != majority[n] for n in names)  # no majority needed: both sides start
        refs = {await run_as(watcher, lambda p=p: pgr.monitor(p)): p for p in minority.values()}
        part.heal()
        for w in services:
            await eventually(lambda w=w: len(w.nodes()) == 3, timeout=10, what="healed rings")
        # Exactly one instance per name stays; every loser got DieNow and exits "dienow".
        await eventually(lambda: all(len(where(services, n)) == 1 for n in names), what="duplicates settled",
                         report=lambda: "\n".join(f"{w.me}: {w.stat()} {sorted(w.processes().items())}"
                                                  for w in services))
        losers = set()
        for name in names:
            [winner] = where(services, name)
            assert winner in (minority[name], majority[name])
            losers.add(majority[name] if winner == minority[name] else minority[name])
            for w in services:
                assert await w.whereis(name) == winner
        assert losers
        await eventually(lambda: all(n.runtime.process(p) is None for n in nodes for p in losers),
                         timeout=DIENOW_GRACE + 3, what="losers exited")
        reasons = {refs[m.ref]: m.reason for m in watcher_inbox if isinstance(m, Down)}
        assert all(reason == "dienow" for pid, reason in reasons.items() if pid in losers)
        assert sum(w.stat()["dienow"] for w in services) == len(losers)


async def test_a_non_transitive_cut_ends_in_ring_unsettled_not_a_bounce_loop() -> None:
    async with proxied() as (members, part):
        (a, wa), (b, wb), (c, wc) = members
        for src, dst in ((b, c), (c, b)):
            part.proxy(src.name, dst.name).cut()
        await eventually(lambda: c.id not in b.peers() and b.id not in c.peers(), what="b and c apart")
        await eventually(lambda: wb.nodes() == tuple(sorted([a.id, b.id])), what="b's ring")
        await eventually(lambda: len(wa.nodes()) == 3, what="a's ring")
        # A name b thinks a owns, which a thinks c owns: b is sent to c, which it cannot reach.
        name = next(f"k{i}" for i in range(10_000) if wb.node_for(f"k{i}") == a.id and wa.node_for(f"k{i}") == c.id)
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(RingUnsettled):
            await wb.whereis(name, timeout=0.5)
        assert loop.time() - started < 2
        assert wb.stat()["redirects"] <= 3  # one redirect per ring, no ping-pong


# -- hand-off, functions, routing errors --------------------------------------------------


async def test_handoff_starts_the_worker_on_its_owner_with_the_state_and_exits_the_old_one() -> None:
    async with contextlib.AsyncExitStack() as stack:
        a, b = [await stack.enter_async_context(Node(f"h{i}", cookie=COOKIE, **FAST)) for i in range(2)]
        await b.connect(a.id)  # b runs no workers service yet: a's ring is a alone
        [wa] = await start_workers([a])
        name = next(f"s{i}" for i in range(1000) if Ring([a.id, b.id]).node_for(f"s{i}") == b.id)
        old = await wa.spawn(name, counter, 1)
        assert old.node == a.id
        await wa.call(name, ("add", 41))
        wb = await Workers.start(b, "w", functions=FNS)
        await eventually(lambda: len(wa.nodes()) == 2, what="a's ring has b")
        await eventually(lambda: wb.processes().get(name) == old, what="b adopted the old worker")
        seen: list[Any] = []
        ref = await run_as(spawn_agent(a, seen), lambda: pgr.monitor(old))
        with pytest.raises(NoProcess):
            await wb.handoff(name, 0)  # b does not run it
        new = await wa.handoff(name, await wa.call(name, "get"))
        assert new.node == b.id and new != old
        assert await wb.call(name, "get") == 42 and await wa.whereis(name) == new
        await eventually(lambda: any(isinstance(m, Down) and m.ref == ref for m in seen), what="old exited")
        assert [m.reason for m in seen if isinstance(m, Down)] == ["handoff"]
        # A tracked process has no function: it cannot be handed off.
        tracked = a.spawn(idle)
        tracked_name = next(f"t{i}" for i in range(1000) if wa.node_for(f"t{i}") == a.id)
        wa.track(tracked_name, tracked)
        with pytest.raises(ValueError, match="tracked"):
            await wa.handoff(tracked_name, 1)
        assert await wb.whereis(tracked_name) == tracked
        with pytest.raises(NotLocal):
            wa.track("x", new)


async def test_a_function_the_owner_does_not_list_is_refused_and_nothing_is_imported() -> None:
    async with contextlib.AsyncExitStack() as stack:
        a, b = [await stack.enter_async_context(Node(f"f{i}", cookie=COOKIE, **FAST)) for i in range(2)]
        await b.connect(a.id)
        wa = await Workers.start(a, "w", functions=(counter, other))
        wb = await Workers.start(b, "w", functions=(counter,))
        for w in (wa, wb):
            await eventually(lambda w=w: len(w.nodes()) == 2, what="rings")
        name = next(f"o{i}" for i in range(1000) if wa.node_for(f"o{i}") == b.id)
        with pytest.raises(ValueError, match="tests.workers_fns:other"):
            await wa.spawn(name, other)
        assert wb.processes() == {} and await wa.whereis(name) is None
        # A hostile peer naming a module nobody listed: refused, never imported.
        module = "tests.never_imported_by_workers"
        reply = await wb.requests.call(a.id, "start", [wa.ring.digest(), name, f"{module}:f", [], 1.0], 2.0)
        assert reply[0] in ("moved", "error")
        own = next(f"o{i}" for i in range(1000) if wa.node_for(f"o{i}") == a.id)
        reply = await wb.requests.call(a.id, "start", [wa.ring.digest(), own, f"{module}:f", [], 1.0], 2.0)
        assert reply[0] == "error" and "not one of the functions" in reply[1]
        reply = await wb.requests.call(a.id, "start", [wa.ring.digest(), own, "os:system", ["true"], 1.0], 2.0)
        assert reply[0] == "error"
        assert module not in sys.modules and wa.processes() == {}
        assert await wa.spawn(name, counter) == await wb.whereis(name)


async def test_a_peer_with_other_placement_rules_is_left_out_of_the_ring() -> None:
    async with contextlib.AsyncExitStack() as stack:
        a, b = [await stack.enter_async_context(Node(f"x{i}", cookie=COOKIE, **FAST)) for i in range(2)]
        await b.connect(a.id)
        wa = await Workers.start(a, "w", functions=FNS, points=64)
        wb = await Workers.start(b, "w", functions=FNS, points=128)
        await eventually(lambda: b.id in wa.refused and a.id in wb.refused, what="both refused")
        assert wa.nodes() == (a.id,) and wb.nodes() == (b.id,)
        assert "points" in wa.refused[b.id]
        pid = await wa.spawn("alone", counter)
        assert pid.node == a.id


async def test_a_call_to_an_owner_that_does_not_answer_times_out_then_the_ring_moves_on() -> None:
    async with proxied(2) as (members, part):
        (a, wa), (b, wb) = members
        name = next(f"q{i}" for i in range(1000) if wa.node_for(f"q{i}") == b.id)
        pid = await wa.spawn(name, counter)
        part.split({"p0"}, {"p1"})  # silent: b is not declared down for down_after
        with pytest.raises(CallTimeout):
            await wa.whereis(name, timeout=0.2)
        await eventually(lambda: wa.nodes() == (a.id,), timeout=5, what="b declared down")
        assert await wa.whereis(name) is None  # the ring moved on: a owns it now, empty
        assert (await wa.get_or_start(name, counter)).node == a.id
        assert pid.node == b.id


async def test_hostile_payloads_are_refused_and_cost_nobody_anything() -> None:
    async with cluster(2) as members:
        (a, wa), (b, wb) = members
        pid = await wa.spawn("kept", counter)
        owner = wa if wa.node_for("kept") == a.id else wb
        hostile = [
            None, [], ["adopt"], ["adopt", b"x", "no", True], ["adopt", b"x", [["n", a.runtime.new_ref()]], True],
            ["adopt", owner.ring.digest(), [["kept", Pid("zz@127.0.0.1:1", 9, 1)]], True],  # a third node's pid
            ["adopt", owner.ring.digest(), [[[1, 2], Pid(b.id, 1, b.creation)]], True],
            ["gone", [["kept", pid]]], ["forget", "x"], ["dienow", [["kept", 5]]],
            ["fwd", "x", "kept", 1, False], ["fwd", 0, [1], 1, False], ["req", -1, "start", [b"", "n"]],
            ["req", -2, "start", [b"", [1], "p", []]], ["rep", "x"], ["hello", 1], ["bye", 1], ["zzz", 1],
        ]
        for payload in hostile:  # request ids < 0: the peer's own requests' replies stay apart
            b.send_service(a.id, "w", payload)
            a.send_service(b.id, "w", payload)
        assert await wb.whereis("kept") == pid and await wa.whereis("kept") == pid
        assert await wb.call("kept", "get") == 0
        assert len(wa.nodes()) == 2 and len(wb.nodes()) == 2


async def test_no_traffic_between_nodes_while_nothing_changes() -> None:
    async with cluster(2) as members:
        (a, wa), (b, wb) = members
        for i in range(300):
            await wa.spawn(("quiet", i), counter)
        await eventually(lambda: wa.stat()["workers"] + wb.stat()["workers"] == 300, what="all started")
        await asyncio.sleep(0.05)  # let the last replies leave
        sent = [a.connection_stats(b.id), b.connection_stats(a.id)]
        await asyncio.sleep(0.5)  # a quiet half second is what is measured, not waited for
        after = [a.connection_stats(b.id), b.connection_stats(a.id)]
        for s0, s1 in zip(sent, after, strict=True):
            assert s0 is not None and s1 is not None
            assert s1["messages_sent"] == s0["messages_sent"]  # ticks are not messages


async def test_a_join_adopts_more_workers_than_one_adopt_message_holds() -> None:
    async with contextlib.AsyncExitStack() as stack:
        a, b = [await stack.enter_async_context(Node(f"big{i}", cookie=COOKIE, **FAST)) for i in range(2)]
        await b.connect(a.id)
        [wa] = await start_workers([a])
        count = 5 * ADOPT_PART + 517  # several full parts and a partial one, for b
        for i in range(count):
            wa.track(("big", i), a.spawn(idle))
        wb = await Workers.start(b, "w", functions=FNS)
        await eventually(lambda: len(wa.nodes()) == 2 and len(wb.nodes()) == 2, what="rings")
        owned = {("big", i) for i in range(count) if wb.node_for(("big", i)) == b.id}
        assert len(owned) > 2 * ADOPT_PART
        await eventually(lambda: set(wb.processes()) == owned, what="every adopted worker held")
        assert wb.stat()["adopted"] == len(owned) and wb.stat()["awaited_done"] == 0
        # A start on b's new arc is not held back: every done arrived.
        fresh = next(("fresh", i) for i in range(1000) if wb.node_for(("fresh", i)) == b.id)
        loop = asyncio.get_running_loop()
        began = loop.time()
        assert (await wb.get_or_start(fresh, counter, timeout=10_000_000)).node == b.id  # any timeout is fine
        assert loop.time() - began < FAST["down_after"]
        # Exits reach the adopter: the count follows.
        gone = sorted(owned)[:10]
        for name in gone:
            pgr.exit(wa.processes()[name], "shutdown")
        await eventually(lambda: wb.stat()["adopted"] == len(owned) - 10, what="exits forgotten at the adopter")


async def test_a_node_cannot_hand_off_another_nodes_worker() -> None:
    async with cluster(3) as members:
        (a, wa), (b, wb), (c, wc) = members
        name = next(f"v{i}" for i in range(1000) if wa.node_for(f"v{i}") == b.id)
        victim = await wa.spawn(name, counter)
        assert victim.node == b.id
        path = "tests.workers_fns:counter"
        reply = await wc.requests.call(b.id, "handoff", [wc.ring.digest(), name, path, [], 0, victim, 1.0, None], 2.0)
        assert reply[0] == "error" and "another node" in reply[1]
        assert await wa.whereis(name) == victim and b.runtime.process(victim) is not None


async def test_a_node_asked_at_once_after_joining_finds_the_running_workers_and_starts_none() -> None:
    async with contextlib.AsyncExitStack() as stack:
        a, b, c = [await stack.enter_async_context(Node(f"jn{i}", cookie=COOKIE, **FAST)) for i in range(3)]
        await b.connect(a.id)
        wa, wb = await start_workers([a, b])
        names = [f"s{i}" for i in range(300)]
        pids = {n: await wa.spawn(n, counter) for n in names}
        gained = [n for n in names if Ring([a.id, b.id, c.id]).node_for(n) == c.id]
        wc = await Workers.start(c, "w", functions=FNS)
        await c.connect(a.id)
        # Asked the moment its ring is complete (a poll every loop iteration), before the
        # others' adopts may have come.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 5
        while len(wc.nodes()) < 3:
            assert loop.time() < deadline, "c's ring never completed"
            await asyncio.sleep(0)
        got = await asyncio.gather(*(wc.get_or_start(n, counter) for n in gained))
        assert got == [pids[n] for n in gained]
        assert [await wc.whereis(n) for n in names] == [pids[n] for n in names]
        assert wa.stat()["dienow"] == wb.stat()["dienow"] == wc.stat()["started"] == 0
