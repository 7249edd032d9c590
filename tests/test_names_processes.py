"""Names across real node processes, with real faults, checked from their trace histories.

Three nodes (``tests/names_node_main.py``), each an OS process on loopback running a
`Names` service, form one names cluster; every link between two of them goes through a
`pgregistry.testing.LinkProxy` (each node routes each peer through its own proxy with
`Node.add_route`, set before any connection). Every node keeps contending for a few names
and appends every trace event to its history file. The faults, each on the node holding
a name at that moment:

1. a partition isolating it (blackhole) for longer than the lease, then healed;
2. SIGSTOP for longer than the lease, then SIGCONT;
3. SIGKILL, then a restart (same name and port, a new incarnation) that the members
   invite back into the names cluster by themselves.

During the run: after each fault starts, the other nodes take over every name the victim
held within a lease plus a few seconds; after each heals, every node serves again and
every name has a holder again within a lease plus a few seconds. After the run, the
checker (`tests/names_checker.py`) reads every history and asserts the guarantee: per
name no two different (pid, token) valid at once, tokens strictly increasing in grant
order across all nodes, a lapsed lease generation's valid_until never growing. The unit
tests below show that the checker fails on hand-made histories that break each part.

Every wait polls with a deadline; sleeps only make a fault last. The children are
SIGKILLed (and SIGCONTed first) in a ``finally``, and exit if this process dies (their
stdin is a pipe from it).
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

from pgregistry.names import lease_clock
from pgregistry.testing import Partition

from .helpers import ChildProcess, poll
from .names_checker import Analysis, History, Violation, analyse, check, read_history

pytestmark = pytest.mark.multiprocess

ROOT = Path(__file__).resolve().parent.parent
NODE_MAIN = ROOT / "tests" / "names_node_main.py"
COOKIE = "names-processes-test-cookie"
NODES = ("a", "b", "c")
NAMES = ("n0", "n1", "n2")
LEASE = 0.8
FAULT = 2.5 * LEASE  # how long a partition or a SIGSTOP lasts at least (more than down_after = 1 s, too)
SOON = LEASE + 3.0  # a takeover, or a holder again after a heal, within this
RECOVER = 8.0  # every node serving again after a heal (reconnects, a rejoin)
CHURN = 6  # grants after each heal before the next fault
START_TIMEOUT = 20.0  # a cold interpreter start on a loaded machine
REPLY_TIMEOUT = 15.0  # of a command (a join waits up to 10 s)



# -- the checker fails on broken histories -------------------------------------------------

def hist(label: str, *events: tuple[float, list[Any]]) -> History:
    return History(label, label, list(events))


def test_checker_accepts_a_clean_takeover() -> None:
    """Holder a's lease ends at 2.0 (it stops renewing: killed or cut off); b takes over
    at 2.5 with a larger token; a later lapses, c grants after a lapse of b: all fine."""
    a = hist("a", (0.0, ["lease", 1, 2.0]), (1.0, ["grant", "n", "<a.1>", 1, 1]))
    b = hist("b", (0.0, ["lease", 1, 9.0]), (2.5, ["grant", "n", "<b.1>", 2, 1]), (3.0, ["lapse", 1]),
             (3.0, ["revoke", "n", "<b.1>", 2, "lapse"]))
    c = hist("c", (0.0, ["lease", 1, 9.0]), (3.5, ["grant", "n", "<c.1>", 3, 1]))
    analysis = check([a, b, c])
    assert [g.intervals for g in analysis.grants["n"]] == [[(1.0, 2.0)], [(2.5, 3.0)], [(3.5, 9.0)]]
    assert analysis.valid_at("n", 2.2) == [] and analysis.held_within("n", 2.0, 2.6)


def test_checker_catches_two_overlapping_valid_grants() -> None:
    a = hist("a", (0.0, ["lease", 1, 5.0]), (1.0, ["grant", "n", "<a.1>", 1, 1]))
    b = hist("b", (0.0, ["lease", 1, 5.0]), (4.0, ["grant", "n", "<b.1>", 2, 1]))
    with pytest.raises(Violation, match="two valid holders from 4.0"):
        check([a, b])
    # The same, the first one's lease renewed after the second grant.
    a2 = hist("a", (0.0, ["lease", 1, 2.0]), (1.0, ["grant", "n", "<a.1>", 1, 1]), (2.9, ["lease", 1, 4.0]))
    b2 = hist("b", (0.0, ["lease", 1, 9.0]), (2.5, ["grant", "n", "<b.1>", 2, 1]))
    with pytest.raises(Violation, match="two valid holders from 2.9"):
        check([a2, b2])


def test_checker_catches_a_decreasing_token() -> None:
    a = hist("a", (0.0, ["lease", 1, 5.0]), (1.0, ["grant", "n", "<a.1>", 2, 1]),
             (1.5, ["revoke", "n", "<a.1>", 2, "released"]))
    b = hist("b", (0.0, ["lease", 1, 5.0]), (3.0, ["grant", "n", "<b.1>", 1, 1]))
    with pytest.raises(Violation, match="token 1 granted after token 2"):
        check([a, b])


def test_checker_catches_a_lapsed_generation_that_grows() -> None:
    a = hist("a", (0.0, ["lease", 1, 2.0]), (2.0, ["lapse", 1]), (2.5, ["lease", 1, 3.0]))
    with pytest.raises(Violation, match="lapsed lgen 1"):
        analyse([a])


def test_checker_ends_validity_at_a_lapse_or_a_newer_generation() -> None:
    a = hist("a", (0.0, ["lease", 1, 9.0]), (1.0, ["grant", "n", "<a.1>", 1, 1]), (2.0, ["lapse", 1]),
             (3.0, ["lease", 2, 9.0]), (4.0, ["grant", "m", "<a.2>", 1, 1]))
    b = hist("b", (0.0, ["lease", 1, 9.0]), (2.5, ["grant", "n", "<b.1>", 2, 1]))
    analysis = check([a, b])
    assert analysis.grants["n"][0].intervals == [(1.0, 2.0)]
    assert analysis.grants["m"][0].intervals == []  # granted with an lgen that is not current
    assert analysis.lapses == [("a", 2.0, 1)]


# -- the node processes --------------------------------------------------------------------

class Child(ChildProcess):
    """One node process: its commands, its latest STAT, its history file."""

    def __init__(self, name: str, proc: asyncio.subprocess.Process, history: Path, log: Path) -> None:
        self.name = name
        self.proc = proc
        self.history = history
        self.log = log
        self.id = ""
        self.creation = 0
        self.stat: dict[str, Any] = {}
        self.replies: asyncio.Queue[str] = asyncio.Queue()
        self.reader: asyncio.Task[None] | None = None
        self.stopped = False  # SIGSTOPped by the test

    @property
    def port(self) -> int:
        return int(self.id.rpartition(":")[2])

    @property
    def address(self) -> str:
        return self.id.rpartition("@")[2]

    async def read_ready(self) -> None:
        assert self.proc.stdout is not None
        line = await asyncio.wait_for(self.proc.stdout.readline(), START_TIMEOUT)
        words = line.decode().split()
        if len(words) != 3 or words[0] != "READY":
            raise AssertionError(f"node {self.name} did not start: {line!r}\n{self.logs()}")
        self.id, self.creation = words[1], int(words[2])
        self.reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        assert self.proc.stdout is not None
        while line := await self.proc.stdout.readline():
            text = line.decode().rstrip("\n")
            if text.startswith("STAT "):
                self.stat = json.loads(text[5:])
            else:
                self.replies.put_nowait(text)

    async def command(self, *command: Any) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write((json.dumps(list(command)) + "\n").encode())
        await self.proc.stdin.drain()
        reply = await asyncio.wait_for(self.replies.get(), REPLY_TIMEOUT)
        assert reply == f"OK {command[0]}", f"{self.name}: {command} -> {reply}\n{self.logs()}"

    def signal(self, sig: int) -> None:
        super().signal(sig)
        if sig == signal.SIGSTOP:
            self.stopped = True
        elif sig == signal.SIGCONT:
            self.stopped = False

    def serving(self, since: float) -> bool:
        """A STAT read after `since` shows a member of all three, serving with a valid lease."""
        s = self.stat
        return (bool(s) and s["clock"] > since and s["is_member"] and s["serving"] and s["lease_valid"]
                and len(s["members"]) == len(NODES) and len(s["live_members"]) == len(NODES))

class Cluster:
    """The node processes, their proxies and their histories."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.children: dict[str, Child] = {}
        self.every: list[Child] = []  # every incarnation started
        self.partition: Partition | None = None
        self.notes: list[str] = []  # how long the takeovers and recoveries took

    async def start_node(self, name: str, port: int = 0) -> Child:
        index = sum(1 for c in self.every if c.name == name)
        history = self.tmp / f"{name}-{index}.jsonl"
        log = self.tmp / f"{name}-{index}.log"
        args = [sys.executable, str(NODE_MAIN), "--name", name, "--port", str(port), "--history", str(history),
                "--lease", str(LEASE), "--names", ",".join(NAMES), "--seed", str(10 * index + NODES.index(name))]
        with log.open("wb") as stderr:
            proc = await asyncio.create_subprocess_exec(
                *args, cwd=ROOT, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=stderr,
                env={**os.environ, "PGREGISTRY_COOKIE": COOKIE})
        child = Child(name, proc, history, log)
        self.every.append(child)
        self.children[name] = child
        await child.read_ready()
        return child

    async def route(self, child: Child) -> None:
        """Make `child` reach each peer through its own proxy (before it dials anyone)."""
        assert self.partition is not None
        for peer in self.children.values():
            if peer.name != child.name:
                await child.command("route", peer.id, self.partition.address(child.name, peer.name))

    def histories(self) -> list[History]:
        return [read_history(c.history, c.name) for c in self.every]

    def analysis(self) -> Analysis:
        return analyse(self.histories())

    async def close(self) -> None:
        for child in self.every:
            child.signal(signal.SIGCONT)
            child.signal(signal.SIGKILL)
        for child in self.every:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(child.proc.wait(), 5.0)
            if child.reader is not None:
                child.reader.cancel()
        if self.partition is not None:
            await self.partition.close()

    def report(self) -> str:
        lines = list(self.notes)
        for child in self.every:
            lines.append(f"--- {child.history.name} ({child.id}, exit {child.proc.returncode}) stat: {child.stat}")
            lines.append(child.logs())
        return "\n".join(lines)


@contextlib.asynccontextmanager
async def cluster(tmp: Path) -> AsyncIterator[Cluster]:
    started = Cluster(tmp)
    try:
        yield started
    except BaseException:
        print(started.report())
        raise
    finally:
        await started.close()


# -- the run ----------------------------------------------------------------------------------

def pick_victim(c: Cluster) -> tuple[str, list[str]] | None:
    """The node holding the most names now (a live one), and those names."""
    analysis = c.analysis()
    now = lease_clock()
    held: dict[str, list[str]] = {}
    for name in NAMES:
        for g in analysis.valid_at(name, now):
            if not c.children[g.node].stopped and c.children[g.node].proc.returncode is None:
                held.setdefault(g.node, []).append(name)
    if not held:
        return None
    node = max(held, key=lambda n: len(held[n]))
    return node, held[node]


async def takeover(c: Cluster, victim: str, names: list[str], since: float, what: str) -> None:
    """Every name of `names` granted on another node than `victim` after `since`, soon."""
    def taken() -> bool:
        analysis = c.analysis()
        return all(analysis.granted_after(name, since, not_on=victim) for name in names)
    await poll(taken, f"the others to take over {names} from {victim} ({what})", SOON)
    c.notes.append(f"{what}: {names} taken over from {victim} after {lease_clock() - since:.2f} s")


async def healed(c: Cluster, since: float, what: str) -> None:
    """After a fault ended at `since`: every name is held at some instant within `SOON`,
    every node serves with all three members within `RECOVER`, then names keep changing
    hands (`CHURN` grants)."""
    def held_again() -> bool:
        analysis = c.analysis()
        return all(analysis.held_within(name, since, lease_clock() + 1.0) for name in NAMES)
    await poll(held_again, f"every name to be held again after {what}", SOON)
    await poll(lambda: all(child.serving(since) for child in c.children.values()),
               f"every node to serve again after {what}", RECOVER)
    ready = lease_clock()
    c.notes.append(f"{what}: every node serving {ready - since:.2f} s after it ended")

    def churned() -> bool:
        analysis = c.analysis()
        return sum(len(analysis.granted_after(name, ready)) for name in NAMES) >= CHURN
    await poll(churned, f"{CHURN} grants after {what}", 2 * SOON)


def lapsed_since(c: Cluster, victim: str, since: float) -> bool:
    """The lease of (an incarnation of) `victim` lapsed after `since`."""
    return any(label.startswith(f"{victim}-") and t > since for label, t, _ in c.analysis().lapses)


async def victim_now(c: Cluster) -> tuple[str, list[str]]:
    return await poll(lambda: pick_victim(c), "a holder of some name", SOON)


async def test_names_cluster_of_processes_under_partition_pause_and_kill(tmp_path: Path) -> None:
    async with cluster(tmp_path) as c:
        for name in NODES:
            await c.start_node(name)
        c.partition = Partition.for_targets({name: child.address for name, child in c.children.items()})
        await c.partition.start()
        for child in c.children.values():
            await c.route(child)
        first = c.children[NODES[0]]
        for name in NODES[1:]:
            await c.children[name].command("join", first.id)
        started = lease_clock()
        await poll(lambda: all(child.serving(started) for child in c.children.values()),
                   "a cluster of three", RECOVER)
        for child in c.children.values():
            await child.command("contend")
        await poll(lambda: all(c.analysis().grants.get(name) for name in NAMES), "every name granted", SOON)

        # 1. A partition isolating a holder's node, longer than the lease, then healed.
        victim, held = await victim_now(c)
        fault = lease_clock()
        c.partition.isolate(victim)
        await takeover(c, victim, held, fault, "partition")
        await asyncio.sleep(max(0.0, fault + FAULT - lease_clock()))
        c.partition.heal()
        await healed(c, lease_clock(), "the partition")
        assert lapsed_since(c, victim, fault), f"{victim}'s lease did not lapse while it was cut off"

        # 2. SIGSTOP of a holder's node, longer than the lease, then SIGCONT.
        victim, held = await victim_now(c)
        fault = lease_clock()
        c.children[victim].signal(signal.SIGSTOP)
        await takeover(c, victim, held, fault, "SIGSTOP")
        await asyncio.sleep(max(0.0, fault + FAULT - lease_clock()))
        c.children[victim].signal(signal.SIGCONT)
        await healed(c, lease_clock(), "the SIGSTOP")
        assert lapsed_since(c, victim, fault), f"{victim}'s lease did not lapse while it was stopped"

        # 3. SIGKILL of a holder's node, then a restart that the members invite back.
        victim, held = await victim_now(c)
        fault = lease_clock()
        killed = c.children[victim]
        killed.signal(signal.SIGKILL)
        await takeover(c, victim, held, fault, "SIGKILL")
        reborn = await c.start_node(victim, port=killed.port)
        assert reborn.id == killed.id and reborn.creation != killed.creation
        await c.route(reborn)
        restarted = lease_clock()
        # Invited back by the members; it contends only as a member (alone it would be a
        # cluster of its own, and a node busy with names is not invited).
        await poll(lambda: reborn.serving(restarted), "the restarted node to serve in the cluster", RECOVER)
        await reborn.command("contend")
        contending = lease_clock()
        await healed(c, restarted, "the restart")
        await poll(lambda: any(g.label == reborn.history.name for name in NAMES
                               for g in c.analysis().grants.get(name, [])),
                   "the restarted node to hold a name", 3 * SOON)
        c.notes.append(f"the restarted node held a name {lease_clock() - contending:.2f} s after it contended")

        for child in c.every:
            assert not child.stat.get("unexpected"), f"{child.name}: {child.stat['unexpected']}"
    for child in c.every:
        crashes = [line for line in child.logs(None).splitlines() if "Traceback" in line or "never retrieved" in line]
        assert not crashes, f"{child.log.name}:\n{child.logs(None)}"
    # Every process is gone: the histories are complete.
    analysis = check(c.histories())
    grants = sum(len(gs) for gs in analysis.grants.values())
    assert grants >= 3 * len(NAMES), grants
    tries = [f"{child.history.name}: took {child.stat.get('tries')}, raised {child.stat.get('errors')}"
             for child in c.every]
    print("\n".join([*c.notes, f"{grants} grants checked", *tries]))
