"""Registries shared by nodes in separate OS processes (``pgregistry node``) and this one.

Each child is a ``pgregistry node`` started with `pgregistry._control.NodeProcess`; the
test drives it through its control server. Children are always SIGKILLed in a
``finally`` (and hold a stdin pipe from this process, so they also stop if it dies).
Every wait polls against a deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any

import pytest

from pgregistry._control import ControlError, NodeProcess, control
from pgregistry.events import Join, Leave, Update
from pgregistry.node import Node
from pgregistry.process import receive
from pgregistry.registry import Registry
from pgregistry.spec import V1, V2, V3
from pgregistry.terms import Pid

pytestmark = pytest.mark.multiprocess

COOKIE = "multiprocess-registry-cookie"
SCOPE = "jobs"
TICK = 0.1
DOWN = 1.0
T = 10.0
SELECT_ALL = [((V1, V2, V3), [], [(V1, V2, V3)])]

Row = tuple[Any, Pid, Any]


def view(rows: Iterable[Row]) -> list[Row]:
    """Rows in a canonical order (values may be dicts, so no sets)."""
    return sorted(rows, key=repr)


class Cluster:
    """Child node processes, killed on exit, and their logs for a failure report."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.children: list[NodeProcess] = []

    async def start(self, name: str, *, port: int = 0, connect: tuple[str, ...] = ()) -> NodeProcess:
        child = await NodeProcess.start(name, cookie=COOKIE, scopes=[SCOPE], connect=connect, port=port,
                                        tick_interval=TICK, down_after=DOWN,
                                        log=self.tmp / f"{name}-{len(self.children)}.log")
        self.children.append(child)
        return child

    def kill_all(self) -> None:
        for child in self.children:
            child.kill()
        for child in self.children:
            child.stop(5.0)


@contextlib.asynccontextmanager
async def cluster(tmp: Path) -> AsyncIterator[tuple[Node, Registry, list[NodeProcess], Cluster]]:
    """k1, k2, k3 in their own processes and this task's node "t", all running SCOPE."""
    kids = Cluster(tmp)
    try:
        async with Node("t", cookie=COOKIE, tick_interval=TICK, down_after=DOWN) as t:
            reg = await Registry.start(t, SCOPE)
            k1 = await kids.start("k1")
            k2, k3 = await asyncio.gather(kids.start("k2", connect=(k1.id,)), kids.start("k3", connect=(k1.id,)))
            await t.connect(k1.id)  # joins the whole cluster through k1
            nodes = [k1, k2, k3]
            every = {t.id} | {k.id for k in nodes}
            await eventually(lambda: set(t.peers()) == every - {t.id}, "t to join every child")
            for k in nodes:
                await eventually_async(lambda k=k: peers_are(k, every - {k.id}), f"{k.name} to join the mesh")
            yield t, reg, nodes, kids
    except BaseException:
        for child in kids.children:
            print(f"--- log of {child.name} ({child.state}) ---\n{child.log_tail()}")
        raise
    finally:
        kids.kill_all()


async def peers_are(child: NodeProcess, expected: set[str]) -> bool:
    return set(await control(child.id, ("peers",))) == expected


async def eventually(predicate: Callable[[], bool], what: str, timeout: float = T) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out after {timeout} s waiting for {what}"
        await asyncio.sleep(0.01)


async def eventually_async(predicate: Callable[[], Awaitable[bool]], what: str, timeout: float = T) -> None:
    deadline = time.monotonic() + timeout
    while not await predicate():
        assert time.monotonic() < deadline, f"timed out after {timeout} s waiting for {what}"
        await asyncio.sleep(0.01)


async def converge(reg: Registry, nodes: list[NodeProcess], expected: list[Row]) -> None:
    """Wait until this node's view and every child's ``select_all`` equal `expected`."""
    views: dict[str, list[Row]] = {}

    async def all_equal() -> bool:
        views["t"] = view(reg.select(SELECT_ALL))
        for child in nodes:
            views[child.name] = view(await control(child.id, ("select_all", SCOPE)))
        return all(v == expected for v in views.values())

    try:
        await eventually_async(all_equal, "every node to hold the expected view")
    except AssertionError:
        raise AssertionError(f"expected {expected}\nviews: {views}") from None


async def drain() -> list[Any]:
    """Every message already in this process's mailbox, without waiting for more."""
    messages = []
    while True:
        try:
            messages.append(await receive(0))
        except TimeoutError:
            return messages


async def idle() -> None:
    """A local process that holds registry entries."""
    while True:
        await receive()


def rows_of(events: list[Any], kind: type) -> list[Row]:
    return view((event.key, pid, value) for event in events if type(event) is kind for pid, value in event.entries)


async def test_three_node_processes_and_this_node_converge(tmp_path: Path) -> None:
    async with cluster(tmp_path) as (t, reg, nodes, _kids):
        k1, k2, k3 = nodes
        web1 = await control(k1.id, ("register", SCOPE, "web", {"n": 1}, 2))
        shard2 = await control(k2.id, ("register", SCOPE, ("shard", 2), [2, "two"], 1))
        web3 = await control(k3.id, ("register", SCOPE, "web", {"n": 3}, 3))
        local = t.spawn(idle)
        assert reg.register_name("web", local, {"n": 0})
        expected = view([("web", p, {"n": 1}) for p in web1] + [(("shard", 2), p, [2, "two"]) for p in shard2]
                        + [("web", p, {"n": 3}) for p in web3] + [("web", local, {"n": 0})])
        assert {pid.node for _key, pid, _value in expected} == {t.id, k1.id, k2.id, k3.id}
        await converge(reg, nodes, expected)
        for child in nodes:
            assert await control(child.id, ("count", SCOPE)) == 7
            assert view(("web", *entry) for entry in await control(child.id, ("lookup", SCOPE, "web"))) == view(
                ("web", *entry) for entry in reg.lookup("web"))

        # Changes made on each node converge too: an update, an unregister, workers stopped.
        assert await control(k3.id, ("update", SCOPE, "web", {"n": 33})) == 3
        assert await control(k1.id, ("unregister", SCOPE, "web")) == 2
        assert await control(k2.id, ("stop_workers", SCOPE, ("shard", 2))) == 1
        expected = view([("web", p, {"n": 33}) for p in web3] + [("web", local, {"n": 0})])
        await converge(reg, nodes, expected)

        # A bad request is refused with a clear error, and the node keeps serving.
        with pytest.raises(ControlError, match="no registry 'nope'"):
            await control(k2.id, ("count", "nope"))
        with pytest.raises(ControlError, match="unknown command 'explode'"):
            await control(k2.id, ("explode",))
        assert await control(k2.id, ("count", SCOPE)) == 4


async def test_sigkill_purges_a_node_and_its_restart_rejoins_with_new_pids(tmp_path: Path) -> None:
    async with cluster(tmp_path) as (t, reg, nodes, kids):
        k1, k2, k3 = nodes
        ref, snapshot = reg.monitor_scope()
        assert snapshot == {}
        web1 = await control(k1.id, ("register", SCOPE, "web", {"n": 1}, 2))
        db2 = await control(k2.id, ("register", SCOPE, "db", "primary", 1))
        web3 = await control(k3.id, ("register", SCOPE, "web", {"n": 3}, 2))
        job3 = await control(k3.id, ("register", SCOPE, ("job", 7), None, 1))
        survivors = view([("web", p, {"n": 1}) for p in web1] + [("db", p, "primary") for p in db2])
        on_k3 = view([("web", p, {"n": 3}) for p in web3] + [(("job", 7), p, None) for p in job3])
        await converge(reg, nodes, view(survivors + on_k3))
        joined = await drain()  # the view is complete, so every Join has been delivered
        assert all(type(e) is Join and e.ref == ref for e in joined) and rows_of(joined, Join) == view(
            survivors + on_k3)

        old_creation = web3[0].creation
        k3.kill()
        await converge(reg, [k1, k2], survivors)
        left = await drain()  # this node's view lost k3's rows: their Leave events are all here
        assert all(type(e) is Leave and e.ref == ref for e in left), left
        assert rows_of(left, Leave) == on_k3

        # The same name and port again: a new incarnation that rejoins through k1.
        k3b = await kids.start("k3", port=k3.port, connect=(k1.id,))
        assert k3b.id == k3.id
        await eventually(lambda: k3.id in t.peers(), "t to see k3 again")
        info = await control(k3b.id, ("info",))
        assert info["creation"] != old_creation and info["os_pid"] == k3b.pid
        assert t.connection_stats(k3.id)["creation"] == info["creation"]  # type: ignore[index]
        new3 = await control(k3b.id, ("register", SCOPE, "web", {"n": 4}, 2))
        assert all(p.node == k3.id and p.creation == info["creation"] for p in new3)
        expected = view(survivors + [("web", p, {"n": 4}) for p in new3])
        await converge(reg, [k1, k2, k3b], expected)
        rejoined = await drain()
        assert all(type(e) is Join and e.ref == ref for e in rejoined), rejoined
        assert rows_of(rejoined, Join) == view([("web", p, {"n": 4}) for p in new3])
        old_pids = set(web3 + job3)
        for child in (k1, k2, k3b):
            rows = await control(child.id, ("select_all", SCOPE))
            assert not old_pids & {pid for _key, pid, _value in rows}
        assert not old_pids & {pid for _key, pid, _value in reg.select(SELECT_ALL)}
        assert not [e for e in await drain() if type(e) in (Join, Update)]
