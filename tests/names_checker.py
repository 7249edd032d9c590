"""The checker of the names guarantee over trace histories of real node processes.

A history is what one incarnation of a node traced (``tests/names_node_main.py`` writes one
JSON-lines file per process): ``(clock, event)`` pairs in the order traced, the clock
being `pgregistry.names.lease_clock` (``CLOCK_BOOTTIME``, the same for every process of
the machine) read just before the event. Events: ``("grant", name, pid, token, lgen)``,
``("revoke", name, pid, token, why)``, ``("lease", lgen, valid_until)``,
``("lapse", lgen)``; others (``"start"``) are ignored.

A grant is *valid* at time T iff it was granted at or before T, not revoked by T, its lgen
is the current generation of its incarnation at T (the highest announced by a lease, or
one past the highest lapsed) and T is below the newest ``valid_until`` of that lgen
announced by T. A process that died stops tracing, so its grants stay valid until their
``valid_until``: that is the bound the others must wait out.

`check` raises `Violation` when, for some name, grants with different ``(pid, token)`` are
valid at the same instant, when tokens do not strictly increase in grant order (across
all histories), or when a lapsed lgen's ``valid_until`` grows after the lapse.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

Event = tuple[float, list[Any]]


class Violation(AssertionError):
    """A history breaks the names guarantee."""


@dataclass
class History:
    """The events one incarnation traced; `node` is its node's name."""

    label: str
    node: str
    events: list[Event]


@dataclass
class Grant:
    """One grant and the intervals ``[start, end)`` in which it was valid."""

    label: str
    node: str
    name: str
    pid: str
    token: int
    lgen: int
    at: float
    intervals: list[tuple[float, float]] = field(default_factory=list)

    def add(self, start: float, end: float) -> None:
        if self.intervals and self.intervals[-1][1] >= start:
            self.intervals[-1] = (self.intervals[-1][0], max(self.intervals[-1][1], end))
        else:
            self.intervals.append((start, end))

    def valid_at(self, t: float) -> bool:
        return any(a <= t < b for a, b in self.intervals)

    def valid_within(self, t0: float, t1: float) -> bool:
        """Valid at some instant of ``[t0, t1)``."""
        return any(a < t1 and t0 < b for a, b in self.intervals)

    def describe(self) -> str:
        spans = ", ".join(f"[{a:.3f}, {b:.3f})" for a, b in self.intervals)
        return f"{self.pid} token {self.token} lgen {self.lgen} of {self.label} granted at {self.at:.3f}, valid {spans}"


def read_history(path: Path, node: str) -> History:
    """A history file; a last line cut short (the writer was killed mid-line) is ignored."""
    events: list[Event] = []
    text = path.read_text() if path.exists() else ""
    for line in text.splitlines(keepends=True):
        if not line.endswith("\n"):
            break
        record = json.loads(line)
        events.append((float(record["c"]), list(record["e"])))
    return History(path.name, node, events)


@dataclass
class Analysis:
    """Every grant of the histories with its validity intervals, by name."""

    grants: dict[str, list[Grant]]
    lapses: list[tuple[str, float, int]]  # (label, clock, lgen)

    def valid_at(self, name: str, t: float) -> list[Grant]:
        return [g for g in self.grants.get(name, []) if g.valid_at(t)]

    def held_within(self, name: str, t0: float, t1: float) -> bool:
        return any(g.valid_within(t0, t1) for g in self.grants.get(name, []))

    def granted_after(self, name: str, t: float, not_on: str | None = None) -> list[Grant]:
        return [g for g in self.grants.get(name, []) if g.at > t and g.node != not_on]


def analyse(histories: Iterable[History]) -> Analysis:
    """Validity intervals of every grant; `Violation` if a lapsed lgen's valid_until grows."""
    grants: dict[str, list[Grant]] = {}
    lapses: list[tuple[str, float, int]] = []
    for history in histories:
        active: dict[tuple[str, str, int], Grant] = {}
        valid_until: dict[int, float] = {}
        lapsed: dict[int, float] = {}
        current = -1
        events = history.events
        for i, (t, ev) in enumerate(events):
            kind = ev[0]
            if i and t < events[i - 1][0]:
                raise Violation(f"{history.label}: clock goes back from {events[i - 1][0]} to {t} at {ev}")
            if kind == "grant":
                _, name, pid, token, lgen = ev
                g = Grant(history.label, history.node, name, pid, token, lgen, t)
                active[name, pid, token] = g
                grants.setdefault(name, []).append(g)
            elif kind == "revoke":
                active.pop((ev[1], ev[2], ev[3]), None)
            elif kind == "lease":
                _, lgen, until = ev
                if lgen in lapsed and until > lapsed[lgen]:
                    raise Violation(f"{history.label}: lapsed lgen {lgen} (valid until {lapsed[lgen]}) "
                                    f"grew to {until} at {t}")
                valid_until[lgen] = max(until, valid_until.get(lgen, until))
                current = max(current, lgen)
            elif kind == "lapse":
                lgen = ev[1]
                lapsed[lgen] = valid_until.get(lgen, -math.inf)
                current = max(current, lgen + 1)
                lapses.append((history.label, t, lgen))
            t_next = events[i + 1][0] if i + 1 < len(events) else math.inf
            for g in active.values():
                if g.lgen == current and g.lgen in valid_until:
                    end = min(t_next, valid_until[g.lgen])
                    if t < end:
                        g.add(t, end)
    return Analysis(grants, lapses)


def check(histories: Iterable[History]) -> Analysis:
    """`analyse`, then `Violation` for overlapping valid grants or tokens out of order."""
    analysis = analyse(histories)
    for name, gs in analysis.grants.items():
        spans = sorted(((a, b, g) for g in gs for a, b in g.intervals), key=lambda s: (s[0], s[1]))
        for i, (_start, b, g) in enumerate(spans):
            for a2, b2, g2 in spans[i + 1:]:
                if a2 >= b:
                    break
                if (g2.pid, g2.token) != (g.pid, g.token):
                    raise Violation(f"{name!r} has two valid holders from {a2:.6f} to {min(b, b2):.6f}:\n"
                                    f"  {g.describe()}\n  {g2.describe()}")
        in_order = sorted(gs, key=lambda g: g.at)
        for before, after in zip(in_order, in_order[1:]):
            if after.token <= before.token:
                raise Violation(f"{name!r}: token {after.token} granted after token {before.token}:\n"
                                f"  {before.describe()}\n  {after.describe()}")
    return analysis
