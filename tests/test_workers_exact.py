"""Exact `Workers` services (``names=``) on real nodes in one event loop: starts decided by
the names cluster, never two instances running a worker's code even while the ring
changes under racing starts, `NoQuorum` in a minority, hand-off by fencing token."""

from __future__ import annotations

import asyncio
import contextlib
from collections import defaultdict
from collections.abc import AsyncIterator
from typing import Any

import pytest

import pgregistry as pgr
from pgregistry.errors import NoQuorum
from pgregistry.events import Down
from pgregistry.names import Names
from pgregistry.node import Node
from pgregistry.placement import Ring
from pgregistry.testing import Partition
from pgregistry.workers import Workers
from pgregistry.workers_exact import ENTRY_TAG

from .helpers import eventually, proxied_links, run_as, spawn_agent
from .workers_fns import RAN, counter, logged

COOKIE = "workers-exact-tests"
LEASE = 0.6
FAST = {"tick_interval": 0.1, "down_after": 0.5}
FNS = (counter, logged)


async def join_all(services: list[Names]) -> None:
    for names in services[1:]:
        await names.join(services[0].node.id)
    ids = sorted(n.node.id for n in services)
    for names in services:
        await eventually(lambda names=names: sorted(names.live_nodes()) == ids, what="every member live")


async def exact_workers(pairs: list[tuple[Node, Names]]) -> list[Workers]:
    services = [await Workers.start(node, "w", functions=FNS, names=names) for node, names in pairs]
    ids = sorted(node.id for node, _ in pairs)
    for w in services:
        await eventually(lambda w=w: list(w.nodes()) == ids, what="every ring complete")
    return services


@contextlib.asynccontextmanager
async def exact_cluster(count: int, proxied: bool = False) -> AsyncIterator[tuple[list[Workers], Partition | None]]:
    async with contextlib.AsyncExitStack() as stack:
        nodes = [await stack.enter_async_context(Node(f"e{i}", cookie=COOKIE, **FAST)) for i in range(count)]
        part = None
        if proxied:
            part = await proxied_links(stack, nodes)
        names = [await Names.start(node, lease=LEASE) for node in nodes]
        await join_all(names)
        yield await exact_workers(list(zip(nodes, names, strict=True))), part


def ran_by_name(names: set[Any]) -> dict[Any, set[pgr.Pid]]:
    ran: dict[Any, set[pgr.Pid]] = defaultdict(set)
    for name, pid in RAN:
        if name in names:
            ran[name].add(pid)
    return ran


async def test_raced_starts_run_one_instance_on_the_owner_and_every_node_finds_it() -> None:
    async with exact_cluster(3) as (services, _):
        names = [("exact", i) for i in range(15)]
        results = await asyncio.gather(*(w.get_or_start(n, logged, n) for n in names for w in services))
        for i, name in enumerate(names):
            pids = set(results[i * 3:i * 3 + 3])
            assert len(pids) == 1, name
            pid = pids.pop()
            assert pid.node == services[0].node_for(name)
            for w in services:
                assert await w.whereis(name) == pid
            assert await services[i % 3].call(name, ("add", 1)) == 1
        ran = ran_by_name(set(names))
        assert all(len(ran[n]) == 1 for n in names)
        # Sends and casts by name reach the holder from every node.
        for w in services:
            w.cast(names[0], 10)

        async def arrived() -> bool:
            return await services[2].call(names[0], "get") == 31

        await eventually(arrived, what="casts arrived")


async def test_a_ring_change_under_racing_starts_never_runs_two_instances() -> None:
    async with exact_cluster(3) as (services, _):
        async with Node("e3", cookie=COOKIE, **FAST) as late:
            late_names = await Names.start(late, lease=LEASE)
            names = [("churn", i) for i in range(40)]

            async def racing() -> list[pgr.Pid]:
                out = []
                for name in names:
                    out += await asyncio.gather(*(w.get_or_start(name, logged, name) for w in services))
                return out

            async def joining() -> Workers:
                await late_names.join(services[0].node.id)
                return await Workers.start(late, "w", functions=FNS, names=late_names)

            _results, late_workers = await asyncio.gather(racing(), joining())
            everyone = [*services, late_workers]
            ids = sorted(w.me for w in everyone)
            for w in everyone:
                await eventually(lambda w=w: list(w.nodes()) == ids, what="four-node rings")
            more = await asyncio.gather(*(w.get_or_start(n, logged, n) for n in names for w in everyone))
            ran = ran_by_name(set(names))
            for i, name in enumerate(names):
                assert len(ran[name]) == 1, (name, ran[name])  # a losing instance never ran user code
                assert set(more[i * 4:i * 4 + 4]) == ran[name]


async def test_a_minority_raises_no_quorum_and_starts_nothing() -> None:
    async with exact_cluster(3, proxied=True) as (services, part):
        assert part is not None
        minority = services[0]
        part.isolate(minority.node.name)
        await eventually(lambda: minority.nodes() == (minority.me,), timeout=5, what="minority ring")
        name = "lonely"
        with pytest.raises(NoQuorum):
            await minority.get_or_start(name, logged, name, timeout=1.0)
        assert name not in ran_by_name({name})
        pid = await services[1].get_or_start(name, logged, name)
        assert pid.node in (services[1].me, services[2].me)
        part.heal()
        await eventually(lambda: len(minority.nodes()) == 3, timeout=10, what="healed ring")
        assert await minority.get_or_start(name, logged, name) == pid
        assert len(ran_by_name({name})[name]) == 1


async def test_handoff_moves_the_name_by_token_and_exits_the_old_instance() -> None:
    async with contextlib.AsyncExitStack() as stack:
        a, b = [await stack.enter_async_context(Node(f"eh{i}", cookie=COOKIE, **FAST)) for i in range(2)]
        na, nb = Names.start, Names.start
        names_a, names_b = await na(a, lease=LEASE), await nb(b, lease=LEASE)
        await join_all([names_a, names_b])
        [wa] = await exact_workers([(a, names_a)])
        name = next(f"s{i}" for i in range(1000) if Ring([a.id, b.id]).node_for(f"s{i}") == b.id)
        old = await wa.spawn(name, counter, 40)
        token = names_a.token((ENTRY_TAG, "w", name))
        assert token is not None and old.node == a.id
        wb = await Workers.start(b, "w", functions=FNS, names=names_b)
        await eventually(lambda: len(wa.nodes()) == 2, what="a's ring has b")
        assert await wa.call(name, "seen") == [["ShouldRestart", name]]
        seen: list[Any] = []
        ref = await run_as(spawn_agent(a, seen), lambda: pgr.monitor(old))
        new = await wa.handoff(name, 42)
        assert new.node == b.id
        assert await wb.call(name, "get") == 42
        new_token = names_b.token((ENTRY_TAG, "w", name))
        assert new_token is not None and new_token > token
        await eventually(lambda: any(isinstance(m, Down) and m.ref == ref for m in seen), what="old exited")
        assert [m.reason for m in seen if isinstance(m, Down)] == ["handoff"]
        assert await wa.whereis(name) == new
        with pytest.raises(ValueError, match="consensus"):
            wa.track("t", a.spawn(counter))
        assert await wa.unregister(name) is True  # asked of b, the holder's node
        await eventually(lambda: names_a.whereis_name((ENTRY_TAG, "w", name)) is None, what="freed")
        assert await wa.whereis(name) is None


async def test_nodes_of_another_names_cluster_or_not_exact_are_left_out() -> None:
    async with contextlib.AsyncExitStack() as stack:
        a, b, c = [await stack.enter_async_context(Node(f"eo{i}", cookie=COOKIE, **FAST)) for i in range(3)]
        await b.connect(a.id)
        await c.connect(a.id)
        wa = await Workers.start(a, "w", functions=FNS, names=await Names.start(a, lease=LEASE))
        wb = await Workers.start(b, "w", functions=FNS, names=await Names.start(b, lease=LEASE))
        wc = await Workers.start(c, "w", functions=FNS)
        await eventually(lambda: {b.id, c.id} <= set(wa.refused), what="a refused both")
        assert "names cluster" in wa.refused[b.id] and "not exact" in wa.refused[c.id]
        assert wa.nodes() == (a.id,) and wb.nodes() == (b.id,) and wc.nodes() == (c.id,)
        with pytest.raises(TypeError, match="Names"):
            await Workers.start(a, "w2", functions=FNS, names="names")
        with pytest.raises(ValueError, match="runs on"):
            await Workers.start(c, "w2", functions=FNS, names=wa._exact.names if wa._exact else None)
