"""What one node of a `Workers` service answers for, and what a ring change does to it (layer 6).

A node *holds* a worker's name in one of two ways:

* **local**: the worker is a process of this node, started (or tracked) here. The node
  keeps its function path and arguments, for a `handoff`.
* **adopted**: the worker is a process of another node, which told this node (the owner
  in that node's view of the ring) about it with an ``adopt``. This node answers lookups
  with it, so a moved worker that has not restarted yet is still found.

Conflicts (two pids for one name, after a partition heals) are settled by one rule: what a
node holds wins over what it is told; among adopted workers, the first wins, except that a
node's new word about its own pids replaces its old one. Each key's `key_hash` is taken
once, when the worker is added, so a ring change rescans without rehashing.

No I/O here: `pgregistry.workers` sends what `rescan` and `adopt` return.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterator
from typing import Any

from .placement import Ring
from .terms import Pid

__all__ = ["Worker", "WorkerTable", "Rescan"]


class Worker:
    """One held name: its pid, key hash and, for a local worker, how it was started."""

    __slots__ = ("name", "pid", "hash", "fn", "args", "told")

    def __init__(self, name: Any, pid: Pid, h: int, fn: str | None = None, args: list[Any] | None = None) -> None:
        self.name = name
        self.pid = pid
        self.hash = h
        self.fn = fn  # the function's path; None for a tracked process and an adopted one
        self.args = args
        self.told: str | None = None  # a local worker's: the node last asked to adopt it

    def __repr__(self) -> str:
        return f"Worker({self.name!r}, {self.pid!r})"


class Rescan:
    """What a ring change means for one node's workers.

    `adopts`: for each other node of the new ring, the ``[name, pid]`` pairs of this node's
    local workers it now owns (a list for every node, empty or not: the empty ones still
    say "done"). `untold`: for each node that was asked to adopt a local worker it no
    longer owns, those pairs (it must forget them: an adopted entry lives only where its
    node last sent it). `should_restart`: local workers whose owner moved to another
    node. `dropped`: adopted workers this node no longer owns (forgotten here; their own
    node tells the new owner).
    """

    __slots__ = ("adopts", "untold", "should_restart", "dropped")

    def __init__(self, peers: tuple[str, ...]) -> None:
        self.adopts: dict[str, list[list[Any]]] = {peer: [] for peer in peers}
        self.untold: dict[str, list[list[Any]]] = {}
        self.should_restart: list[Worker] = []
        self.dropped: list[Worker] = []


class WorkerTable:
    """The workers one node holds, local and adopted, by name."""

    __slots__ = ("me", "held", "local_count")

    def __init__(self, me: str) -> None:
        self.me = me
        self.held: dict[Any, Worker] = {}
        self.local_count = 0

    def __len__(self) -> int:
        return len(self.held)

    def get(self, name: Any) -> Worker | None:
        return self.held.get(name)

    def is_local(self, worker: Worker) -> bool:
        return worker.pid.node == self.me

    def local(self) -> Iterator[Worker]:
        me = self.me
        return (w for w in self.held.values() if w.pid.node == me)

    def add_local(self, worker: Worker) -> None:
        """Hold `worker` (a process of this node) under its name; `ValueError` if the name
        is held by another pid."""
        held = self.held.get(worker.name)
        if held is not None:
            if held.pid == worker.pid:
                return
            raise ValueError(f"{worker.name!r} is held by {held.pid}")
        self.held[worker.name] = worker
        self.local_count += 1

    def adopt(self, name: Any, pid: Pid, h: int) -> Pid | None:
        """`pid`'s node says `pid` runs `name` and this node owns it: hold it, unless the
        name is held by another pid (then that one wins, and the pid that lost is returned).

        A node's word about its own pids replaces its earlier word: an adopted worker of
        the same node under another pid is replaced (that node runs one worker per name).
        """
        held = self.held.get(name)
        if held is None:
            self.held[name] = Worker(name, pid, h)
            return None
        if held.pid == pid:
            return None
        if held.pid.node == pid.node and pid.node != self.me:
            held.pid = pid
            return None
        return pid

    def remove(self, name: Any, pid: Pid) -> Worker | None:
        """Forget `name` if `pid` holds it; the worker forgotten, or None."""
        held = self.held.get(name)
        if held is None or held.pid != pid:
            return None
        del self.held[name]
        if held.pid.node == self.me:
            self.local_count -= 1
        return held

    def forget_node(self, node_id: str) -> list[Worker]:
        """Forget every adopted worker of `node_id` (it went down); those forgotten."""
        gone = [w for w in self.held.values() if w.pid.node == node_id]
        for w in gone:
            del self.held[w.name]
        return gone

    def rescan(self, old: Ring, new: Ring, adopting: bool = True) -> Rescan:
        """Compare owners in `old` and `new` for every held worker (cached hashes).

        `adopting` False (an exact service, whose names cluster knows every holder): only
        `Rescan.should_restart` is filled."""
        me = self.me
        out = Rescan(tuple(n for n in new.nodes if n != me))
        adopts = out.adopts
        if not len(new):
            return out
        # Ring._owner_table: node_for_hash inlined, without its per-call checks (every
        # hash here was made by key_hash), and Pid.node read as the tuple's first item.
        positions, owners = new._owner_table()
        old_positions, old_owners = old._owner_table() if len(old) else ([], [me])
        find = bisect_left
        node_of = tuple.__getitem__
        dropped = out.dropped
        untold = out.untold
        should_restart = out.should_restart
        for w in self.held.values():
            h = w.hash
            owner = owners[find(positions, h)]
            if node_of(w.pid, 0) != me:
                if owner != me:
                    dropped.append(w)
                continue
            if owner != me and old_owners[find(old_positions, h)] != owner:
                should_restart.append(w)
            if not adopting:
                continue
            told = w.told
            if told is not None and told != owner:
                untold.setdefault(told, []).append([w.name, w.pid])
            if owner == me:
                w.told = None
            else:
                w.told = owner
                adopts[owner].append([w.name, w.pid])
        for w in dropped:
            del self.held[w.name]
        return out
