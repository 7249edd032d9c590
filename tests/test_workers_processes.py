"""`Workers` across real node processes on loopback TCP, with real faults.

Three nodes (``tests/workers_node_main.py``), each an OS process running the workers
service "w" with fast liveness (ticks every 0.1 s, a silent peer down after 0.5 s),
connected directly. The test drives them through their stdin and reads their answers:

1. placement: about 60 workers started from every node run on the node `node_for` names
   (the same on every node); every node finds the same pid and reaches it by name;
2. SIGKILL of a node: the survivors' rings drop it; a `get_or_start` restarts exactly
   the lost workers, on their new owners, and leaves every other worker alone;
3. SIGSTOP of a node for longer than ``down_after``, then SIGCONT: while it is stopped the
   others start its workers anew; once it is back, the duplicates meet at their owner,
   one instance per name remains (the owner's own) and the others exit with ``"dienow"``.

Every wait polls with a deadline. The children are SIGCONTed and SIGKILLed in a
``finally``, and exit if this process dies (their stdin is a pipe from it).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from pgregistry.workers import DIENOW_GRACE

from .helpers import ChildProcess, poll

pytestmark = pytest.mark.multiprocess

ROOT = Path(__file__).resolve().parent.parent
NODE_MAIN = ROOT / "tests" / "workers_node_main.py"
COOKIE = "workers-processes-test-cookie"
NODES = ("a", "b", "c")
TICK = 0.1
DOWN_AFTER = 0.5
NAMES = [f"user-{i}" for i in range(60)]
START_TIMEOUT = 20.0  # a cold interpreter start on a loaded machine
REPLY_TIMEOUT = 15.0  # of a command (each request to the service inside is bounded by 5 s)
SOON = 10.0  # a ring change, a heal, duplicates settled: within this



def node_of(pid: str) -> str:
    """The node id in a pid's repr ``<node@host:port.serial.creation>``."""
    return pid[1:-1].rsplit(".", 2)[0]


class Child(ChildProcess):
    """One node process: its commands and their answers, its log."""

    def __init__(self, name: str, proc: asyncio.subprocess.Process, log: Path) -> None:
        self.name = name
        self.proc = proc
        self.log = log
        self.id = ""
        self.replies: asyncio.Queue[str] = asyncio.Queue()
        self.reader: asyncio.Task[None] | None = None
        self.lock = asyncio.Lock()  # one command at a time: answers come in order

    async def read_ready(self) -> None:
        assert self.proc.stdout is not None
        line = await asyncio.wait_for(self.proc.stdout.readline(), START_TIMEOUT)
        words = line.decode().split()
        if len(words) != 3 or words[0] != "READY":
            raise AssertionError(f"node {self.name} did not start: {line!r}\n{self.logs()}")
        self.id = words[1]
        self.reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        assert self.proc.stdout is not None
        while line := await self.proc.stdout.readline():
            self.replies.put_nowait(line.decode().rstrip("\n"))

    async def command(self, *command: Any) -> Any:
        """Send `command`; its result (`AssertionError` for an ``ERR`` answer)."""
        assert self.proc.stdin is not None
        async with self.lock:
            self.proc.stdin.write((json.dumps(list(command)) + "\n").encode())
            await self.proc.stdin.drain()
            reply = await asyncio.wait_for(self.replies.get(), REPLY_TIMEOUT)
        head = f"OK {command[0]} "
        assert reply.startswith(head), f"{self.name}: {command} -> {reply}\n{self.logs()}"
        return json.loads(reply[len(head):])

    async def stat(self) -> dict[str, Any]:
        result: dict[str, Any] = await self.command("stat")
        return result



class Cluster:
    """The node processes."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.children: dict[str, Child] = {}
        self.notes: list[str] = []  # how long the recoveries took

    async def start_node(self, name: str) -> Child:
        log = self.tmp / f"{name}.log"
        args = [sys.executable, str(NODE_MAIN), "--name", name, "--tick", str(TICK),
                "--down-after", str(DOWN_AFTER)]
        with log.open("wb") as stderr:
            proc = await asyncio.create_subprocess_exec(
                *args, cwd=ROOT, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=stderr,
                env={**os.environ, "PGREGISTRY_COOKIE": COOKIE})
        child = Child(name, proc, log)
        self.children[name] = child
        await child.read_ready()
        return child

    def alive(self, *but: str) -> list[Child]:
        return [child for name, child in self.children.items() if name not in but]

    def ids(self, *but: str) -> list[str]:
        return sorted(child.id for child in self.alive(*but))

    async def close(self) -> None:
        for child in self.children.values():
            child.signal(signal.SIGCONT)
            child.signal(signal.SIGKILL)
        for child in self.children.values():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(child.proc.wait(), 5.0)
            if child.reader is not None:
                child.reader.cancel()

    def report(self) -> str:
        lines = list(self.notes)
        for child in self.children.values():
            lines.append(f"--- {child.name} ({child.id}, exit {child.proc.returncode})")
            lines.append(child.logs())
        return "\n".join(lines)


@contextlib.asynccontextmanager
async def cluster(tmp: Path) -> AsyncIterator[Cluster]:
    """Three connected node processes whose rings hold all three."""
    started = Cluster(tmp)
    try:
        await asyncio.gather(*(started.start_node(name) for name in NODES))
        first = started.children[NODES[0]]
        for child in started.alive(NODES[0]):
            await child.command("connect", first.id)
        await rings_are(started, started.ids(), "every ring complete")
        yield started
        for child in started.children.values():
            crashes = [line for line in child.logs(None).splitlines()
                       if "Traceback" in line or "never retrieved" in line]
            assert not crashes, f"{child.name}:\n{child.logs(None)}"
    except BaseException:
        print(started.report())
        raise
    finally:
        await started.close()


async def rings_are(c: Cluster, ids: list[str], what: str, *but: str) -> None:
    """Wait until the ring of every node but `but` is `ids`."""
    async def probe() -> bool:
        stats = [await child.stat() for child in c.alive(*but)]
        return all(s["ring"] == ids for s in stats)
    await poll(probe, what, SOON)


async def whereis_everywhere(c: Cluster, *but: str) -> dict[str, str | None]:
    """Every name's pid, asked of every node but `but`: they must all give the same."""
    answers = {child.name: await child.command("whereis", NAMES) for child in c.alive(*but)}
    first = next(iter(answers.values()))
    for node, answer in answers.items():
        assert answer == first, f"{node} disagrees: {sorted(set(answer.items()) ^ set(first.items()))}"
    return first


async def owners(c: Cluster, *but: str) -> dict[str, str]:
    """Every name's owner, the same on every node but `but`."""
    answers = [await child.command("node_for", NAMES) for child in c.alive(*but)]
    assert all(answer == answers[0] for answer in answers)
    return answers[0]


async def started_count(c: Cluster, *but: str) -> int:
    """How many workers the nodes but `but` started in all (`Workers.stat`)."""
    return sum([(await child.stat())["started"] for child in c.alive(*but)])


async def instances(c: Cluster, *but: str) -> dict[str, set[str]]:
    """Every pid some node but `but` answers for, by name (`Workers.processes`)."""
    held: dict[str, set[str]] = {name: set() for name in NAMES}
    for child in c.alive(*but):
        for name, pid in (await child.command("processes")).items():
            held[name].add(pid)
    return held


async def placed(c: Cluster) -> tuple[dict[str, str], dict[str, str]]:
    """Start every name from some node (a third from each); check where they run and that
    every node finds and reaches them. The pids and the owners, by name."""
    pids: dict[str, str] = {}
    for i, child in enumerate(c.alive()):
        started = await child.command("spawn", NAMES[i::len(NODES)])
        assert all(pid.startswith("<") for pid in started.values()), started
        pids.update(started)
    owner = await owners(c)
    assert {owner[name] for name in NAMES} == set(c.ids())  # every node owns some
    assert await whereis_everywhere(c) == pids
    for name in NAMES:
        assert node_of(pids[name]) == owner[name], name
    for child in c.alive():
        assert await child.command("call", NAMES, "where") == owner, child.name
    return pids, owner


# -- the scenarios --------------------------------------------------------------------------


async def test_workers_run_on_their_owner_and_every_node_finds_them(tmp_path: Path) -> None:
    """Workers started from any node run on the owner that every node names; every node
    finds the same pid, and a call by name from any node reaches it. Each node answers
    only for its own workers: nothing is held elsewhere while the nodes stay the same."""
    async with cluster(tmp_path) as c:
        pids, owner = await placed(c)
        for child in c.alive():
            assert await child.command("processes") == {n: p for n, p in pids.items() if owner[n] == child.id}
        # A second start of a running name, from any node, gives its pid and starts nothing.
        for child in c.alive():
            assert await child.command("get_or_start", NAMES) == pids
        assert await started_count(c) == len(NAMES)


async def test_a_killed_nodes_workers_start_again_on_their_new_owners(tmp_path: Path) -> None:
    """After SIGKILL of a node, the survivors drop it from their rings; a `get_or_start`
    from a survivor starts exactly the workers lost with it, each on its owner in the new
    ring, and returns the running pid of every other; every survivor then finds the same."""
    async with cluster(tmp_path) as c:
        pids, _ = await placed(c)
        victim = c.children["c"]
        lost = {name for name, pid in pids.items() if node_of(pid) == victim.id}
        assert lost
        before = await started_count(c, "c")
        victim.signal(signal.SIGKILL)
        await rings_are(c, c.ids("c"), "the survivors' rings without the killed node", "c")
        new_owner = await owners(c, "c")
        a, b = c.alive("c")
        again = await a.command("get_or_start", NAMES)
        for name in NAMES:
            if name in lost:
                assert node_of(again[name]) == new_owner[name] != victim.id, (name, again[name])
            else:
                assert again[name] == pids[name], name
        assert await b.command("get_or_start", NAMES) == again
        assert await whereis_everywhere(c, "c") == again
        assert await b.command("call", NAMES, "where") == new_owner
        after = await started_count(c, "c")
        assert after - before == len(lost)


@pytest.mark.parametrize("pause", [0.0, 3 * DOWN_AFTER], ids=["short", "long"])
async def test_a_paused_node_comes_back_and_one_instance_per_name_remains(tmp_path: Path, pause: float) -> None:
    """SIGSTOP of a node for longer than ``down_after``: the others declare it down and
    start its workers anew when asked. After SIGCONT the rings heal, the duplicates meet at
    their owner, which keeps its own instance; within a bounded time every node answers
    for and finds that one pid only, and every other instance got DieNow and exited with
    reason ``"dienow"``.

    `pause`, the least the SIGSTOP lasts: 0 ends it as soon as the others started the
    paused node's workers anew; 1.5 s lets their redials of it back off meanwhile.
    """
    async with cluster(tmp_path) as c:
        loop = asyncio.get_running_loop()
        pids, owner = await placed(c)
        victim = c.children["c"]
        paused = {name for name, pid in pids.items() if node_of(pid) == victim.id}
        assert paused
        changes = (await victim.stat())["ring_changes"]
        victim.signal(signal.SIGSTOP)
        stopped = loop.time()
        await rings_are(c, c.ids("c"), "the others' rings without the paused node", "c")
        c.notes.append(f"paused node dropped after {loop.time() - stopped:.2f} s")
        a, b = c.alive("c")
        during = await a.command("get_or_start", NAMES)
        assert await whereis_everywhere(c, "c") == during
        # One instance per name on the others (each node watches its own from now on).
        assert await instances(c, "c") == {name: {pid} for name, pid in during.items()}
        duplicates = {name: during[name] for name in paused}
        for name in NAMES:
            if name in paused:
                assert node_of(during[name]) != victim.id, name
            else:
                assert during[name] == pids[name], name
        await asyncio.sleep(max(0.0, stopped + pause - loop.time()))  # makes the fault last; no sync
        victim.signal(signal.SIGCONT)
        resumed = loop.time()
        await rings_are(c, c.ids(), "every ring complete again after SIGCONT")
        changes = (await victim.stat())["ring_changes"] - changes
        c.notes.append(f"rings healed {loop.time() - resumed:.2f} s after SIGCONT (the paused node's ring "
                       f"changed {changes} times)")

        async def settled() -> bool:
            held = await instances(c)
            return all(held[name] == {pids[name]} for name in NAMES)
        await poll(settled, "one instance per name, the owner's own", SOON)
        c.notes.append(f"duplicates settled {loop.time() - resumed:.2f} s after SIGCONT")
        assert await whereis_everywhere(c) == pids
        for child in c.alive():
            assert await child.command("call", NAMES, "where") == owner, child.name

        async def losers_exited() -> bool:
            exits: dict[str, Any] = {}
            for child in (a, b):
                exits.update(await child.command("exits"))
            return all(exits.get(pid) == "dienow" for pid in duplicates.values())
        await poll(losers_exited, "every duplicate exited with reason 'dienow'", DIENOW_GRACE + SOON)
        c.notes.append(f"duplicates exited {loop.time() - resumed:.2f} s after SIGCONT")
        assert await whereis_everywhere(c) == pids
        held = await instances(c)
        assert all(held[name] == {pids[name]} for name in NAMES)
        print("\n".join(c.notes))
