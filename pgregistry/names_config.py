"""Membership changes for the names core: the configuration slot and the copy (no I/O).

A configuration is ``(epoch, members)``. The slot next(e) is one CASPaxos register decided
by a majority of e's members; its value is the member tuple of epoch e+1. `ConfigSlot` is
an acceptor's state for it (a promise or an accept there seals e at that acceptor),
`ConfigRound` a proposer's round. `Copy` is the bookkeeping of a member of e+1 that merges
the per-name registers of its sources before it serves, and `CopyOrder` the source's side.
`Membership` drives the three steps of a change for one `pgregistry.names_core.Member`
(which parses the messages and hands them over). The records both modules handle live
here too: `Operation` (a client operation on one name), `AcceptorSlot` (an acceptor's
register for one name) and `Effects` (what one input produced).

A change (add, remove, or replace a restarted incarnation) runs one at a time, in three
steps. (1) Seal: a proposer decides next(e) = M' in the configuration slot; an acceptor
that promised or accepted there stops serving e's writes (it answers `sealed`, and the
proposer of that write backs off), and an acceptor sealed for half a lease completes
next(e) itself (an empty slot is completed with e's members, so nothing is lost). Only
sealed acceptors do: a writer that met `sealed` and raced the change's proposer with "e's
members unchanged" would, under a steady load of writes, win epoch after epoch and the
change would never land. (2) Copy: each member of (e+1, M') merges the registers of a
majority of e's sealed members (in parts, keeping the highest ballot per name), or of one
member already serving e+1 or later (its registers hold everything decided before e+1);
a holder that an undecided higher value moved away from stays guarded by the takeover
check there (only the source checked that move). (3) Serve: then it serves e+1, from
serve_start. Removed members stop and their holders step down (the generation lapses). A
restarted incarnation is a new one: it is not a member until a replace step names it.
"""

from __future__ import annotations

import bisect
import zlib
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

Incarnation = tuple[str, int, int]
Ballot = tuple[int, int, tuple[Any, ...]]
Value = tuple[Any, int, int, Any]  # (pid | None, token, lgen, owner incarnation | None)
Members = tuple[Incarnation, ...]
Cursor = tuple[int, str] | None

NO_BALLOT: Ballot = (-1, -1, ())
FREE_VALUE: Value = (None, 0, 0, None)


TimerId = tuple[Any, ...]


@dataclass(slots=True)
class Effects:
    """What one input produced: messages ``(dest, msg)``, timers ``(timer_id, at)`` in the
    member's clock, timers no longer needed (`cancels`: a driver may drop them; firing
    them anyway changes nothing), completed operations ``(op_id, result)`` and checker
    events."""

    messages: list[tuple[Incarnation, tuple[Any, ...]]] = field(default_factory=list)
    timers: list[tuple[TimerId, float]] = field(default_factory=list)
    cancels: list[TimerId] = field(default_factory=list)
    results: list[tuple[Any, tuple[Any, ...]]] = field(default_factory=list)
    events: list[tuple[Any, ...]] = field(default_factory=list)


@dataclass
class Operation:
    """One client (or internal) operation on one name; a node runs one per name at a time."""

    name: Any
    kind: str  # "register" | "update" | "release" | "lookup"
    args: tuple[Any, ...]
    op_id: Any
    attempt: int = 0
    phase: str = "queued"  # queued | wait_lease | wait_epoch | prepare | accept | wait_commit | backoff
    ballot: Ballot = NO_BALLOT
    sent: float = 0.0  # local time this attempt's prepare went out (a round-trip sample)
    competing: Ballot = NO_BALLOT  # in wait_commit: the ballot whose commit would end the wait
    promises: dict[Incarnation, tuple[Ballot, Value]] = field(default_factory=dict)
    accepted: set[Incarnation] = field(default_factory=set)
    nacked: set[Incarnation] = field(default_factory=set)
    retry_after: float = 0.0
    base: tuple[Ballot, Value] = (NO_BALLOT, FREE_VALUE)
    new: Value = FREE_VALUE
    result: tuple[Any, ...] = ()
    doubt: bool = False  # an accept naming a pid of this node went out


@dataclass(slots=True)
class AcceptorSlot:
    """An acceptor's register for one name.

    `promised` is the highest ballot promised. After an accept it is the accepted ballot's
    next one (the proposer's piggy-backed promise), the common case: stored as None then
    and built when read, rather than one more tuple per name kept on every member."""

    promise: Ballot | None = NO_BALLOT  # None: the next ballot after `ballot`
    ballot: Ballot = NO_BALLOT
    value: Value = FREE_VALUE
    # A copy may bring a higher-ballot value that moved the name away from a holder without
    # being decided (it passed the takeover check at its source only): the holder it
    # replaced here stays checked, as if it were still the value, until a check passes.
    guard: Value = FREE_VALUE
    decided: bool = False  # the value is known decided (a commit, or a source said so)

    @property
    def promised(self) -> Ballot:
        p = self.promise
        if p is None:
            b = self.ballot
            return (b[0], b[1] + 1, b[2])
        return p

    @promised.setter
    def promised(self, b: Ballot) -> None:
        # Set after `ballot` (an accept sets its ballot, then promises the next one).
        self.promise = None if (b[0], b[1] - 1, b[2]) == self.ballot else b


class MemberCore(Protocol):
    """What the membership part needs of the `pgregistry.names_core.Member` it belongs to.

    The two are one state machine split in two modules; this protocol is the seam, so
    the import points one way (the core imports this module, never the reverse). The
    records both parts handle (`Operation`, `AcceptorSlot`, `Effects`) live here too.
    """

    me: Incarnation
    members: list[Incarnation]
    epoch: int
    cluster_id: Any
    lease: float
    bugs: frozenset[str]
    majority: int
    serving: bool
    counter: int
    _member_set: dict[Incarnation, Incarnation]  # each member -> itself (to share one tuple)
    _ballot_id: tuple[Any, ...]
    _rng: Any
    _tables: list[dict[Any, AcceptorSlot]]
    _serve_start: float
    _ops: dict[Any, deque[Operation]]
    _piggy: dict[Any, tuple[Ballot, Ballot, Value]]
    _known: dict[Any, tuple[Ballot, Value]]
    _fx: Effects

    is_member: bool

    def _send(self, dest: Incarnation, msg: tuple[Any, ...]) -> None: ...

    def _broadcast(self, msg: tuple[Any, ...]) -> None: ...

    def _timer(self, timer_id: tuple[Any, ...], at: float) -> None: ...

    def _event(self, *ev: Any) -> None: ...

    def _see(self, b: Ballot) -> None: ...

    def _lapse(self, now: float) -> None: ...

    def _current(self, name: Any) -> Operation | None: ...

    def _slot(self, name: Any) -> AcceptorSlot: ...

    def _start_round(self, name: Any, op: Operation, now: float) -> None: ...

# A proposer's round gives up and retries after this fraction of a lease without a majority;
# backoffs after a nack are drawn at random up to a cap that doubles from base to cap.
ROUND_FRACTION = 1 / 6
ROUND_TRIPS_PER_ROUND = 8  # a round's timeout is at least this many estimated round trips
BACKOFF_CAP = 0.05
BACKOFF_BASE = 0.005
# A proposer nacked by a competing ballot first waits this many round trips for that
# ballot's commit (see `pgregistry.names_core`). The round trip is estimated from its own
# prepare -> promise exchanges (the first sample, then a moving average with this gain),
# never below the floor (a clock that reads the same twice would make the wait zero), and
# RTT_DEFAULT before any sample. The wait never exceeds a round's timeout.
COMMIT_WAIT_ROUND_TRIPS = 2
RTT_DEFAULT = 0.01
RTT_FLOOR = 0.0005
RTT_GAIN = 1 / 8
# Registers per copy_part: a big table goes in many small messages, never one huge one.
COPY_PART = 256
MAX_COPY_ORDERS = 2  # epochs whose copy orders are kept; the oldest is dropped first


class RoundTrips:
    """A proposer's estimate of a round trip to a majority, in seconds of its own clock.

    Measured from its own prepare -> promise exchanges (the time until a majority
    promised): the first sample replaces RTT_DEFAULT (which may be far off), later ones
    are smoothed with RTT_GAIN so that one slow round does not stretch every wait; never
    below RTT_FLOOR (a clock that reads the same twice would make a wait zero)."""

    __slots__ = ("_rtt",)

    def __init__(self) -> None:
        self._rtt: float | None = None

    def estimate(self) -> float:
        return max(RTT_FLOOR, RTT_DEFAULT if self._rtt is None else self._rtt)

    def sample(self, seconds: float) -> None:
        seconds = max(seconds, 0.0)
        self._rtt = seconds if self._rtt is None else self._rtt + RTT_GAIN * (seconds - self._rtt)

    def round_timeout(self, lease: float) -> float:
        """A sixth of a lease, or more when round trips are slow (an overloaded cluster would
        otherwise restart every round before it could finish, and never finish one), at
        most half a lease."""
        return min(lease / 2, max(lease * ROUND_FRACTION, ROUND_TRIPS_PER_ROUND * self.estimate()))


def apply_change(members: Members, add: Incarnation | None, remove: Incarnation | None) -> Members:
    """The member tuple after adding `add` and removing `remove` (either may be None).

    Raises ValueError for a change that would leave no member, or that adds one node and
    removes another (two changes: majorities of the old and new sets might not meet)."""
    if add is not None and remove is not None and add[0] != remove[0]:
        raise ValueError("one change at a time: a replace names two incarnations of one node")
    new = tuple(m for m in members if m != remove)
    if add is not None and add not in new:
        new += (add,)
    if not new:
        raise ValueError("a configuration keeps at least one member")
    return new


def name_key(name: Any) -> tuple[int, str]:
    """A total order on arbitrary hashable names (the copy's cursor), stable across nodes."""
    r = repr(name)
    return (zlib.crc32(r.encode()), r)


Entry = tuple[Any, Ballot, Value, bool]  # (name, ballot, value, known decided)


class CopyOrder:
    """A source's order of the names it sends one requester, built once per copy.

    The registers accepted when the copy began, sorted by `name_key`; each part is the
    next `limit` of them after the requester's cursor, read from the tables as they are
    then. A name first accepted later is not needed: a register decided in the new epoch
    was decided without the requester, which has not voted yet. Never-accepted registers
    are left out: an empty register is what the requester already has."""

    __slots__ = ("keys", "names")

    def __init__(self, tables: Iterable[dict[Any, Any]]) -> None:
        pairs = [(name_key(n), n) for t in tables for n, slot in t.items() if slot.ballot != NO_BALLOT]
        pairs.sort(key=lambda p: p[0])
        self.keys = [k for k, _n in pairs]
        self.names = [n for _k, n in pairs]

    def page(self, cursor: Cursor, limit: int) -> tuple[list[Any], Cursor]:
        """The names of the part after `cursor`, and the cursor that follows it (None: the last)."""
        start = 0 if cursor is None else bisect.bisect_right(self.keys, cursor)
        end = start + limit
        return self.names[start:end], (self.keys[end - 1] if end < len(self.keys) else None)


@dataclass
class ConfigSlot:
    """An acceptor's state for the slot next(e) of the epoch e it serves."""

    promised: Ballot = NO_BALLOT
    ballot: Ballot = NO_BALLOT
    value: Members = ()

    @property
    def sealed(self) -> bool:
        """Whether this acceptor promised or accepted here: it no longer serves e's writes,
        so the registers it holds for e are final and can be copied."""
        return self.promised != NO_BALLOT

    def prepare(self, b: Ballot) -> tuple[Any, ...]:
        """The reply fields (after kind) to cprepare(b): a promise, or a nack."""
        if b >= self.promised:
            self.promised = b
            return ("cpromise", b, self.ballot, self.value)
        return ("cnack", b, self.promised)

    def accept(self, b: Ballot, members: Members) -> tuple[Any, ...]:
        """The reply fields to caccept(b, members): accepted, or a nack."""
        if b >= self.promised:
            self.promised, self.ballot, self.value = b, b, members
            return ("caccepted", b)
        return ("cnack", b, self.promised)


@dataclass
class ConfigRound:
    """A proposer's round on next(`epoch`)."""

    epoch: int
    ballot: Ballot
    attempt: int
    phase: str = "prepare"  # prepare | accept | backoff
    promises: dict[Incarnation, tuple[Ballot, Members]] = field(default_factory=dict)
    accepted: set[Incarnation] = field(default_factory=set)
    value: Members = ()

    def choose(self, members: Members, change: tuple[Incarnation | None, Incarnation | None] | None) -> Members:
        """The value to accept once a majority promised: the highest accepted one (it may be
        decided already), else this proposer's change, else e's members unchanged (that
        completes a seal nobody finished; nothing is lost, the epoch only grows)."""
        best = max(self.promises.values(), key=lambda p: p[0])
        if best[0] != NO_BALLOT:
            return best[1]
        if change is not None:
            try:
                return apply_change(members, *change)
            except ValueError:
                return members
        return members


@dataclass
class Copy:
    """A member's copy toward serving `epoch` with `members`.

    Done when one source that serves `epoch` or later has sent all its registers (they
    hold every value decided before `epoch`), or when a majority of `prev` (the previous
    epoch's members, None when this member skipped epochs and does not know them) have,
    each "sealed": it served the previous epoch (so it held everything decided before
    that) and no longer does (it sealed it, or moved on), so its registers of the previous
    epoch are final. `self_sealed`: this member is such a source itself."""

    epoch: int
    members: Members
    prev: Members | None
    me: Incarnation
    self_sealed: bool
    cursors: dict[Incarnation, Cursor] = field(default_factory=dict)
    kinds: dict[Incarnation, str] = field(default_factory=dict)
    done: dict[Incarnation, str] = field(default_factory=dict)
    attempt: int = 0

    def sources(self) -> list[Incarnation]:
        """The members still to ask (each from its cursor)."""
        every = list(self.prev or ()) + [m for m in self.members if m not in (self.prev or ())]
        return [m for m in every if m != self.me and m not in self.done]

    def on_part(self, sender: Incarnation, cursor: Cursor, nxt: Cursor, kind: str) -> bool:
        """Record one part; False if it is not the one expected from `sender` (a duplicate,
        a reordered or stale part), whose entries must then be ignored."""
        if sender in self.done or self.cursors.get(sender) != cursor:
            return False
        if cursor is None and kind == "sealed" and (self.prev is None or sender not in self.prev):
            return False  # cannot count: asked again, it answers "complete" once it serves
        if cursor is None:
            self.kinds[sender] = kind  # the source's state when the scan began
        elif sender not in self.kinds:
            return False
        if nxt is None:
            self.done[sender] = self.kinds[sender]
        else:
            self.cursors[sender] = nxt
        return True

    def finished(self) -> bool:
        if "complete" in self.done.values():
            return True
        if self.prev is None:
            return False
        sealed = sum(1 for s in self.prev if self.done.get(s) == "sealed" or (s == self.me and self.self_sealed))
        return sealed >= len(self.prev) // 2 + 1


class Membership:
    """The membership part of one `Member`: its configuration slot (as acceptor and
    proposer), its copy toward the epoch it adopted, and the change started on it.

    It reads and sets the member's configuration (epoch, members, serving, serve_start) and
    sends through the member; names_core keeps the per-name registers and the leases."""

    def __init__(self, m: MemberCore) -> None:
        self.m = m
        self.slot = ConfigSlot()
        # This member served the epoch before the one it adopted, up to adopting this one: its
        # registers of that epoch are final (it takes no write of an epoch it left).
        self.sealed_prev = False
        self.copy: Copy | None = None
        self.round: ConfigRound | None = None
        self.pending: tuple[Any, Incarnation | None, Incarnation | None] | None = None
        self.orders: dict[int, CopyOrder] = {}  # epoch -> the order of the copies served toward it

    def on_timer(self, timer_id: tuple[Any, ...], now: float) -> None:
        """The seal, cretry and copy timers."""
        kind = timer_id[0]
        if kind == "seal":
            # Sealed for a while and still no new epoch: complete next(e) from here.
            if timer_id[1] == self.m.epoch and self.slot.sealed:
                if self.round is None:
                    self.config_round(now)
                self.m._timer(("seal", self.m.epoch), now + self.m.lease / 2)
        elif kind == "cretry":
            r = self.round
            if r is not None and (r.epoch, r.attempt) == (timer_id[1], timer_id[2]):
                self.config_round(now)
        elif kind == "copy":
            c = self.copy
            if c is not None and (c.epoch, c.attempt) == (timer_id[1], timer_id[2]):
                self.copy_ask(now)

    def change_progress(self, now: float) -> None:
        """Complete the pending change if the configuration reflects it, else propose it
        (a member only once it serves: its proposals must see a complete copy)."""
        if self.pending is None:
            return
        op_id, add, remove = self.pending
        members = tuple(self.m.members)
        try:
            target = apply_change(members, add, remove)
        except ValueError:
            target = None  # another change made this one impossible (it would empty the set)
        if target is None or target == members:
            if not self.m.is_member or self.m.serving:
                self.pending = None
                self.m._fx.results.append((op_id, ("ok" if target else "invalid", self.m.epoch, members)))
            return
        if (not self.m.is_member or self.m.serving) and self.round is None:
            self.config_round(now)

    def config_round(self, now: float) -> None:
        """Start (or restart, with a new ballot) a round on next(e) among e's members."""
        attempt = self.round.attempt + 1 if self.round is not None else 1
        self.m.counter += 1
        b = (self.m.epoch, self.m.counter, self.m._ballot_id)
        self.round = ConfigRound(self.m.epoch, b, attempt)
        self.m._broadcast(("cprepare", self.m.cluster_id, self.m.epoch, b))
        self.m._timer(("cretry", self.m.epoch, attempt), now + self.m.lease * ROUND_FRACTION)

    def on_config_message(
        self, sender: Incarnation, kind: str, b: Ballot, other: Ballot, members: Members, now: float
    ) -> None:
        """A message of the slot next(e), parsed: `other` is the accepted ballot of a
        cpromise or the promise of a cnack, `members` the value of a caccept or cpromise."""
        if kind in ("cprepare", "caccept"):
            if not self.m.is_member or not self.m.serving:
                return  # a member still copying does not vote on the next slot yet
            self.m._see(b)
            was = self.slot.sealed
            reply = self.slot.prepare(b) if kind == "cprepare" else self.slot.accept(b, members)
            self.m._send(sender, (reply[0], self.m.cluster_id, self.m.epoch, *reply[1:]))
            if self.slot.sealed and not was:
                self.m._event("seal", self.m.epoch)
                self.m._timer(("seal", self.m.epoch), now + self.m.lease / 2)
            return
        r = self.round
        if kind == "cpromise":
            ab, value = other, members
            self.m._see(ab)
            if r is None or r.ballot != b or r.phase != "prepare":
                return
            r.promises[sender] = (ab, value)
            if len(r.promises) < self.m.majority:
                return
            r.value = r.choose(tuple(self.m.members), None if self.pending is None else self.pending[1:])
            r.phase = "accept"
            self.m._broadcast(("caccept", self.m.cluster_id, self.m.epoch, b, r.value))
            self.m._timer(("cretry", self.m.epoch, r.attempt), now + self.m.lease * ROUND_FRACTION)
        elif kind == "caccepted":
            if r is None or r.ballot != b or r.phase != "accept":
                return
            r.accepted.add(sender)
            if len(r.accepted) >= self.m.majority:
                self.config_decided(r.value, now)
        else:
            self.m._see(other)
            if r is None or r.ballot != b or r.phase not in ("prepare", "accept"):
                return
            r.phase = "backoff"
            cap = min(BACKOFF_CAP, BACKOFF_BASE * 2 ** min(r.attempt, 6))
            self.m._timer(("cretry", self.m.epoch, r.attempt), now + cap * self.m._rng.random())

    def config_decided(self, members: Members, now: float) -> None:
        """next(e) is decided: tell the old and new members, then adopt it here."""
        prev = tuple(self.m.members)
        notice = ("wrong_epoch", self.m.cluster_id, self.m.epoch, self.m.epoch + 1, members)
        for m in dict.fromkeys(prev + members):
            if m != self.m.me:
                self.m._send(m, notice)
        self.adopt(self.m.epoch + 1, members, prev, now)

    def on_sealed(self, name: Any, b: Ballot, now: float) -> None:
        """Our round met a sealed acceptor: back off until the change completes.

        No round of our own on next(e) here: it would race the change's proposer with
        "e's members unchanged" and, under a steady load of writes that all meet the
        seal, win again and again (epochs grow, the change never lands). A sealed
        acceptor completes next(e) itself if the seal outlasts half a lease (its "seal"
        timer), which covers a proposer that died."""
        op = self.m._current(name)
        if op is not None and op.phase in ("prepare", "accept") and b == op.ballot:
            self.m._piggy.pop(name, None)
            op.phase = "backoff"
            self.m._timer(("retry", name, op.attempt), now + self.m.lease * ROUND_FRACTION)

    def adopt(self, epoch: int, members: Members, prev: Members | None, now: float) -> None:
        """Move to configuration (epoch, members); `prev` is the previous epoch's members when
        this node knows them (it was at epoch - 1), else None."""
        was_member = self.m.is_member
        self.sealed_prev = was_member and self.m.serving and prev is not None
        self.m._event("config", epoch, members)
        self.m.epoch, self.m.members = epoch, list(members)
        self.m._member_set = {m: m for m in members}
        self.m.majority = len(members) // 2 + 1
        self.m.is_member = self.m.me in self.m._member_set
        self.slot, self.round, self.copy = ConfigSlot(), None, None
        self.m._piggy.clear()  # promises of the old epoch's ballots
        if self.m.is_member and "no_epoch_wait" not in self.m.bugs:
            self.m.serving = False
            self.copy = Copy(epoch, members, prev, self.m.me, self.sealed_prev)
            if self.copy.finished():
                self.serve(now)
            else:
                self.copy_ask(now)
            return
        self.m.serving = True
        if self.m.is_member:
            self.serve(now)  # the planted bug: no copy
            return
        if was_member:
            self.m._lapse(now)  # removed: its holders step down at once
        self.restart_ops(now)
        self.change_progress(now)

    def serve(self, now: float) -> None:
        """The copy is done: serve the adopted epoch from now (the takeover check counts a
        lease from serve_start), run the waiting operations, and go on with a change."""
        self.m.serving, self.copy, self.m._serve_start = True, None, now
        self.m._event("serve", self.m.epoch, tuple(self.m.members))
        self.restart_ops(now)
        self.change_progress(now)

    def restart_ops(self, now: float) -> None:
        """Run every current operation again in the epoch now served (or wait for it)."""
        for name in list(self.m._ops):
            op = self.m._current(name)
            if op is not None:
                self.m._start_round(name, op, now)

    def copy_ask(self, now: float) -> None:
        """Ask every source not done yet for its next part, and ask again after a round."""
        c = self.copy
        if c is None:
            return
        c.attempt += 1
        for s in c.sources():
            self.m._send(s, ("copy", self.m.cluster_id, c.epoch, c.cursors.get(s)))
        self.m._timer(("copy", c.epoch, c.attempt), now + self.m.lease * ROUND_FRACTION)

    def on_copy(self, sender: Incarnation, epoch: int, cursor: Cursor) -> None:
        """Send one part of this member's registers, if they are final for `epoch - 1`."""
        complete = self.m.is_member and self.m.serving and self.m.epoch >= epoch
        sealed = (self.m.epoch == epoch - 1 and self.m.is_member and self.m.serving and self.slot.sealed) or (
            self.m.epoch == epoch and self.sealed_prev
        )
        if not (complete or sealed):
            return  # not final yet: the requester asks again
        # One order per epoch, shared by every member copying toward it, and kept while
        # they copy (a requester that asks again from the start reuses it): sorting all
        # the registers is the expensive part.
        order = self.orders.get(epoch)
        if order is None:
            order = self.orders[epoch] = CopyOrder(self.m._tables)
            while len(self.orders) > MAX_COPY_ORDERS:
                del self.orders[next(iter(self.orders))]
        names, nxt = order.page(cursor, COPY_PART)
        known = self.m._known
        entries = []
        for n in names:
            s = self.m._slot(n)
            entries.append((n, s.ballot, s.value, s.decided or known.get(n, (NO_BALLOT,))[0] == s.ballot))
        kind = "complete" if complete else "sealed"
        self.m._send(sender, ("copy_part", self.m.cluster_id, epoch, cursor, tuple(entries), nxt, kind))

    def merge(self, name: Any, b: Ballot, v: Value, decided: bool) -> None:
        """Keep the highest ballot. If the lower value has a holder that the higher one, not
        known decided, moved away from, guard that holder: the higher value passed the
        takeover check at its source only, and this acceptor must not vote as if it had
        checked it too."""
        slot = self.m._slot(name)
        if b > slot.ballot:
            loser, winner, win_decided = slot.value, v, decided
            promised = slot.promised  # before the ballot it may be derived from changes
            slot.ballot, slot.value, slot.decided = b, v, decided
            slot.promised = promised
            if decided:
                slot.guard = FREE_VALUE
            self.m._event("copied", name, b, v)
        else:
            loser, winner, win_decided = v, slot.value, slot.decided or (b == slot.ballot and decided)
            slot.decided = win_decided
        if b > slot.promised:
            slot.promised = b
        if not win_decided and loser[0] is not None and (loser[0], loser[1]) != (winner[0], winner[1]):
            if slot.guard[0] is None or loser[1] > slot.guard[1]:
                slot.guard = loser

    def on_copy_part(
        self, sender: Incarnation, epoch: int, cursor: Cursor, entries: list[Entry],
        nxt: Cursor, kind: str, now: float,
    ) -> None:
        """Merge one part from a source, then serve if the copy is done or ask for the next."""
        c = self.copy
        if c is None or c.epoch != epoch or (sender not in c.members and sender not in (c.prev or ())):
            return
        if not c.on_part(sender, cursor, nxt, kind):
            return
        for name, b, v, decided in entries:
            self.merge(name, b, v, decided)
        if c.finished():
            self.serve(now)
        elif nxt is not None:
            self.m._send(sender, ("copy", self.m.cluster_id, epoch, nxt))
