"""Names by consensus: the protocol core, with no I/O and no clock.

A `Member` is one node's part of a names cluster: an acceptor for every name (when it is a
member), a proposer for the operations started on it, and the keeper of its own lease.
It is a deterministic state machine: messages, timer firings and client operations go in
together with the local clock reading `now`; `Effects` come out (messages to send, timers
to set, completed operations, and events a checker can replay). The service that runs it
over the mesh, and the simulator in the tests, only move these values around.

Each name is a compare-and-set register decided by a majority of the configured members
(CASPaxos). A register holds a value ``(pid | None, token, lgen, owner)``: the holder's
pid (an opaque term here), its fencing token (it grows by one whenever a holder is set),
the lease generation of the holder's node when it was set, and the incarnation of that
node (``None`` when free). The empty register is ``(None, 0, 0, None)``.

Identities:
    incarnation  (node_id: str, creation: int, nonce: int); members are incarnations.
    ballot       (epoch, counter, incarnation); the counter is a Lamport clock, raised by
                 every ballot this member sees, so a restarted node (a new incarnation)
                 never reuses the ballots of its previous life.

The messages, and the checks every one of them passes before it changes anything, are in
`pgregistry.names_messages`.

Leases: a node's lease is valid until ``t_sent + lease - (lease*rho + 0.001)`` where t_sent
is its local send time of the newest renewal a majority acked in the current generation.
When its clock passes that, the generation lapses: ``lgen`` grows by one, its holders are
revoked and released, and acks of the old generation never count again.

Membership changes (seal, copy, serve) are `pgregistry.names_config`'s part of the state
machine; renewals are acked across epochs, so valid holders carry on through a change.

Contention: a proposer whose round is nacked with a competing ballot above its own waits up
to COMMIT_WAIT_ROUND_TRIPS (2) of its round trips (never longer than a round's timeout) for
a commit of that name with a ballot at or above the competing one; when it comes (or had
already come) it starts the operation again at once with a ballot past the decider's next
one (promised with its accept), so the new round reads the decided value (for a register
on a name now held elsewhere, "held"). If the wait ends on its timer, it backs off at random
(up to BACKOFF_CAP) as before. The round trip is estimated from its own prepare -> promise
exchanges (the time until a majority promised: the first sample, then a moving average),
RTT_DEFAULT before any sample and never below RTT_FLOOR; this core reads no clock of its
own, only the `now` passed in. A nack carrying the proposer's own next ballot (its prepare
overtaken by its own accept at that acceptor) stops nothing, and a takeover refusal
(retry_after > 0) backs off without waiting: neither has a competitor to wait for.

Takeover check: an accept that moves a name away from holder h of node X, proposed by
anyone but X, passes only if X has not renewed here for a whole lease (and this acceptor
has served for a lease), or X renewed with a generation above h's; on accepting, renewals
of X below h.lgen + 1 are refused from then on.
"""

from __future__ import annotations

import random
import zlib
from collections import deque
from collections.abc import Callable
from typing import Any

from .names_config import (
    BACKOFF_BASE,
    BACKOFF_CAP,
    COMMIT_WAIT_ROUND_TRIPS,
    FREE_VALUE,
    NO_BALLOT,
    AcceptorSlot,
    Ballot,
    Effects,
    Incarnation,
    Membership,
    Operation,
    RoundTrips,
    TimerId,
    Value,
    apply_change,
)
from .names_messages import (
    ARITY,
    BadMessage,
    copy_entries_of,
    cursor_of,
    freeze,
    incarnation_of,
    int_of,
    members_of,
    name_of,
    shared_ballot,
    shared_value,
)

__all__ = ["BadMessage", "Effects", "Member", "FREE", "NO_BALLOT", "BUGS"]

FREE: Value = FREE_VALUE
# Piggy-backed promises kept (for the names of the most recent decisions of this node): a
# later operation on one of them skips prepare; on any other it prepares first, as always.
PIGGY_LIMIT = 16384
# Why an operation of this node revokes its own grant (see `Member._revoke`).
_REVOKED_BY = {"update": "handoff", "release": "released"}
NEVER = float("-inf")
_OWN_FAST = frozenset({"prepare", "promise", "accept", "accepted", "commit", "renew", "renew_ack"})
_NEVER_RENEWED = (NEVER, 0)

#: Planted bugs, for the simulator to show that its checker catches each one:
#: "no_lgen": a lapse keeps the generation, so late acks extend a lapsed lease (and acceptors
#: no longer fence generations); "ballot_without_incarnation": ballots carry the node id only,
#: so a restarted node reuses its old ballots; "shard_wide_skip_prepare": one decided accept
#: lets the proposer skip prepare on every name, trusting what it last heard of them;
#: "no_takeover_check": acceptors let anyone move a name away from a renewing holder;
#: "no_epoch_wait": a member serves a new epoch as soon as it learns it, without the copy;
#: "read_from_memory": an operation that changes nothing, run on a piggy-backed promise,
#: answers from what this node decided last, without asking a majority.
BUGS = frozenset({
    "no_lgen", "ballot_without_incarnation", "shard_wide_skip_prepare", "no_takeover_check", "no_epoch_wait",
    "read_from_memory",
})



class Member:
    """One node's names core: acceptor (if a member), proposer, and lease keeper.

    `me` is this node's incarnation; `members` the member set of `epoch` as this node last
    learned it (it changes through `change`; a node outside it is a proposer only); `lease` the
    lease length in seconds of the local clock; `rho` the bound on clock rate drift;
    `shard_count` how many tables the acceptor keeps (names are spread by a stable hash);
    `bugs` plants protocol bugs for the simulator (see `BUGS`); `now` is the local clock at
    start, from which the acceptor counts its first lease before allowing takeovers;
    `pid_ok` tells whether a holder in a peer's message is a pid (None: anything is);
    `freeze` turns lists into tuples in every message first (for a transport, like plain
    msgpack, that decodes tuples as lists; one that keeps tuples passes False, and a
    list where a tuple belongs is then refused as malformed).
    Call `start` once to get the first renewal going."""

    def __init__(
        self,
        me: Incarnation,
        members: list[Incarnation],
        epoch: int,
        cluster_id: bytes | str,
        lease: float,
        rho: float,
        shard_count: int = 1,
        bugs: frozenset[str] = frozenset(),
        now: float = 0.0,
        seed: int | None = None,
        pid_ok: Callable[[Any], bool] | None = None,
        freeze: bool = True,
    ) -> None:
        if not bugs <= BUGS:
            raise ValueError(f"unknown bugs: {sorted(bugs - BUGS)}")
        if shard_count < 1 or lease <= 0 or not 0 <= rho < 1:
            raise ValueError("shard_count >= 1, lease > 0 and 0 <= rho < 1")
        self.me = me
        self._pid_ok = pid_ok
        self._freeze = freeze
        self.members = list(members)
        self._member_set = {m: m for m in members}
        self.epoch = epoch
        self.cluster_id = cluster_id
        self.lease = lease
        self.rho = rho
        self.bugs = bugs
        self.majority = len(members) // 2 + 1
        self.is_member = me in self._member_set
        # Without the incarnation in ballots, a restarted node would reuse its old ballots.
        self._ballot_id: tuple[Any, ...] = (me[0], 0, 0) if "ballot_without_incarnation" in bugs else me
        self._rng = random.Random(seed if seed is not None else zlib.crc32(repr(me).encode()))
        # Acceptor state.
        self._tables: list[dict[Any, AcceptorSlot]] = [{} for _ in range(shard_count)]
        self._serve_start = now
        # Per member: (local time its newest renewal arrived, highest generation it renewed).
        self._renewed: dict[Incarnation, tuple[float, int]] = {}
        self._min_lgen: dict[Incarnation, int] = {}
        # Membership state: serving is False from adopting an epoch until its copy is done.
        self.serving = True
        # Proposer state.
        self.counter = 0
        self._ops: dict[Any, deque[Operation]] = {}
        self._piggy: dict[Any, tuple[Ballot, Ballot, Value]] = {}  # name -> (next, decided ballot, value)
        self._known: dict[Any, tuple[Ballot, Value]] = {}
        self.grants: dict[Any, tuple[Any, int, int]] = {}  # name -> (pid, token, lgen)
        self._rtt = RoundTrips()
        self.retries = 0  # rounds started again (after a timeout, a nack or a wait)
        self.accepts = 0  # accepts this acceptor took
        self.rejects = 0  # prepares and accepts it refused (nack)
        # Lease state.
        self.lgen = 1
        self._seq = 0
        self._sent: dict[int, float] = {}
        self._acks: dict[int, set[Incarnation]] = {}
        self._counted = 0
        self.valid_until = NEVER
        self._fx = Effects()
        self._cfg = Membership(self)

    # ----------------------------------------------------------------- public inputs

    def start(self, now: float) -> Effects:
        """Send the first renewal (members only: a non-member's renewals are refused)."""
        fx = self._begin()
        self._renew(now)
        return fx

    def lease_valid(self, now: float) -> bool:
        """Whether this node's lease is valid at local time `now` (checked at every use)."""
        return now < self.valid_until

    def holder(self, name: Any, now: float) -> tuple[Any, int] | None:
        """This node's valid holder of `name` as (pid, token), or None."""
        g = self.grants.get(name)
        if g is None or g[2] != self.lgen or not self.lease_valid(now):
            return None
        return (g[0], g[1])

    def known(self, name: Any) -> tuple[Ballot, Value] | None:
        """The newest decided value of `name` this node learned (with its ballot), or None."""
        return self._known.get(name)

    def remote_holder(self, name: Any, now: float) -> Value | None:
        """The newest decided value of `name` if its holder is on another node that `renews`
        here in the holder's generation; else None."""
        known = self._known.get(name)
        if known is None:
            return None
        value = known[1]
        owner = value[3]
        if owner is None or owner is self.me or owner == self.me:
            return None
        receipt, renewed_lgen = self._renewed.get(owner, _NEVER_RENEWED)
        if now - receipt >= self.lease or renewed_lgen > value[2]:
            return None
        return value

    def renews(self, inc: Incarnation, lgen: int, now: float) -> bool:
        """Whether the member `inc` renewed here less than a lease ago and, as far as this
        node heard, is still in generation `lgen` (a renewal of a later one means it lapsed:
        its holders of `lgen` stepped down)."""
        receipt, renewed_lgen = self._renewed.get(inc, _NEVER_RENEWED)
        return now - receipt < self.lease and renewed_lgen <= lgen

    def busy(self) -> bool:
        """Whether any operation is queued or running on this node (its own included)."""
        return bool(self._ops)

    def register(self, name: Any, pid: Any, now: float, op_id: Any) -> Effects:
        """Make `pid` (a process of this node) hold `name` if it is free, or take it over from
        a node that stopped renewing. Results: ("ok", ballot, value) once granted here;
        ("held", ballot, value) when another holder stays; ("busy", None, retry_after) when
        acceptors still see the holder's node renewing; ("lost", ballot, value) when the
        value was decided but this node could not grant it (its lease lapsed meanwhile, or it
        is not a member and has no lease); the name is then released again.

        On a member, a register or update waits (without a timer: the caller bounds it) for
        this node's lease to be valid before proposing. Operations on one name run one at a
        time on this node; later ones queue."""
        return self._submit(name, Operation(name, "register", (pid,), op_id), now)

    def update(self, name: Any, new_pid: Any, expected_token: int, now: float, op_id: Any,
               owner: Incarnation | None = None, owner_lgen: int = 0) -> Effects:
        """Hand `name`, held here with `expected_token`, to `new_pid` (the token grows).

        `new_pid` is a process of this node, or (with `owner`) of the member `owner`,
        whose lease generation is `owner_lgen` (that node vouched for a valid lease): it
        grants the name when it learns the decided value and its generation is still
        `owner_lgen`, and releases it otherwise. Results: ("ok", ballot, value),
        ("mismatch", ballot, value) when the name is not held here with that token, or
        ("lost", ballot, value) as for `register`."""
        op = Operation(name, "update", (new_pid, expected_token, owner, owner_lgen), op_id)
        return self._submit(name, op, now)

    def release(self, name: Any, now: float, op_id: Any) -> Effects:
        """Free `name` if a pid of this node holds it. Results: ("ok", ballot, value) or
        ("not_held", ballot, value). Retries until decided."""
        return self._submit(name, Operation(name, "release", (), op_id), now)

    def lookup(self, name: Any, now: float, op_id: Any) -> Effects:
        """Majority read. Result: ("value", ballot, value)."""
        return self._submit(name, Operation(name, "lookup", (), op_id), now)

    def change(
        self, op_id: Any, now: float, add: Incarnation | None = None, remove: Incarnation | None = None
    ) -> Effects:
        """Add a member, remove one, or replace an incarnation of a node by a new one (both).

        Result ("ok", epoch, members) once an epoch whose members reflect the change serves
        here (or, on a node that is not one of them, once it learned that epoch); ("busy",
        epoch, members) at once if a change started here still runs. Another node's change
        deciding the slot first is no failure: this one is proposed again in the next epoch.
        Raises ValueError for a change that is not one step (see `apply_change`)."""
        fx = self._begin()
        apply_change(tuple(self.members), add, remove)
        if self._cfg.pending is not None:
            self._fx.results.append((op_id, ("busy", self.epoch, tuple(self.members))))
            return fx
        self._cfg.pending = (op_id, add, remove)
        self._cfg.change_progress(now)
        return fx

    def on_timer(self, timer_id: TimerId, now: float) -> Effects:
        """A timer this member asked for has fired (stale ones are ignored): "renew", "lapse",
        the membership ones, "retry" (a round's timeout or the end of a backoff) and "wait"
        (the end of a wait for a competing ballot's commit)."""
        fx = self._begin()
        kind = timer_id[0]
        if kind == "renew":
            self._renew(now)
        elif kind == "lapse":
            # One set before a renewal moved valid_until on is stale; ignored. (So a driver
            # must never fire a timer before its time: `pgregistry.names` re-arms one
            # that its loop runs early.)
            if timer_id[1] == self.lgen and self.valid_until != NEVER and now >= self.valid_until:
                self._lapse(now)
        elif kind in ("seal", "cretry", "copy"):
            self._cfg.on_timer(timer_id, now)
        elif kind == "wait":
            name, attempt = timer_id[1], timer_id[2]
            op = self._current(name)
            if op is not None and op.attempt == attempt and op.phase == "wait_commit":
                self._backoff(name, op, now)  # the competing ballot's commit did not come
        elif kind == "retry":
            name, attempt = timer_id[1], timer_id[2]
            op = self._current(name)
            if op is not None and op.attempt == attempt and op.phase in ("prepare", "accept", "backoff"):
                self._piggy.pop(name, None)
                if op.phase == "accept" and op.retry_after > 0 and op.kind == "register":
                    # Some acceptors refused the takeover and the rest did not answer in time.
                    self._finish(name, op, ("busy", None, op.retry_after), now)
                else:
                    self._start_round(name, op, now)
        return fx

    def on_message(self, sender: Incarnation, msg: Any, now: float) -> Effects:
        """Handle one message from the incarnation at the other end of the connection.

        Raises `BadMessage` (and changes nothing) for a malformed message, another cluster's,
        or a reply from a non-member."""
        m = freeze(msg) if self._freeze else msg
        if not (isinstance(m, tuple) and len(m) >= 3 and isinstance(m[0], str)):
            raise BadMessage("a message is (kind, cluster_id, epoch, ...)")
        kind, cid, epoch = m[0], m[1], m[2]
        if kind not in ARITY or len(m) != 3 + ARITY[kind]:
            raise BadMessage(f"unknown kind or wrong arity: {kind!r}")
        if cid != self.cluster_id:
            raise BadMessage("message of another cluster")
        int_of(epoch, "epoch")
        sender = incarnation_of(sender, "sender")
        args = m[3:]
        fx = self._begin()
        if kind == "wrong_epoch":
            e2, members = int_of(args[0], "epoch"), members_of(args[1])
            if e2 > self.epoch:
                self._cfg.adopt(e2, members, tuple(self.members) if e2 == self.epoch + 1 else None, now)
            elif e2 < self.epoch:
                self._send_config(sender)  # a node that fell behind asks for the news
            return fx
        if kind == "copy":
            self._cfg.on_copy(sender, epoch, cursor_of(args[0]))
            return fx
        if kind == "copy_part":
            entries = copy_entries_of(args[1], args[3], self._ballot, self._value)
            self._cfg.on_copy_part(sender, epoch, cursor_of(args[0]), entries, cursor_of(args[2]), args[3], now)
            return fx
        if kind in ("renew", "renew_ack"):
            # Leases span epochs: an acceptor acks the members of its own configuration, and
            # tells a renewing node of an older epoch about the newer one.
            if kind == "renew" and epoch != self.epoch:
                # Older sender: tell it. Newer: this node missed a change (say the notice
                # that added it); its own configuration in reply makes the sender send back
                # the newer one.
                self._send_config(sender)
            lgen, seq = int_of(args[0], "lgen"), int_of(args[1], "seq")
            if kind == "renew":
                self._on_renew(sender, lgen, seq, now)
            elif sender in self._member_set:
                self._on_renew_ack(sender, lgen, seq, now)
            elif epoch == self.epoch:
                raise BadMessage("renew_ack from a non-member")
            return fx
        if epoch != self.epoch:
            if epoch < self.epoch and kind in ("prepare", "accept", "commit", "cprepare", "caccept"):
                self._send_config(sender)
            return fx
        replies = ("promise", "nack", "accepted", "sealed", "cpromise", "cnack", "caccepted")
        if kind in replies and sender not in self._member_set:
            raise BadMessage(f"{kind} from a non-member")
        if kind in ("cprepare", "caccept", "cpromise", "cnack", "caccepted"):
            b = self._ballot(args[0])
            other = self._ballot(args[1]) if kind in ("cpromise", "cnack") else NO_BALLOT
            members = members_of(args[1]) if kind == "caccept" else ()
            if kind == "cpromise":
                members = members_of(args[2], empty=True)
            self._cfg.on_config_message(sender, kind, b, other, members, now)
        elif kind == "sealed":
            self._cfg.on_sealed(name_of(args[0]), self._ballot(args[1]), now)
        elif kind == "prepare":
            self._on_prepare(sender, name_of(args[0]), self._ballot(args[1]))
        elif kind == "accept":
            name, b, v = name_of(args[0]), self._ballot(args[1]), self._value(args[2])
            self._on_accept(sender, name, b, v, self._ballot(args[3]), self._value(args[4]), now)
        elif kind == "commit":
            self._on_commit(name_of(args[0]), self._ballot(args[1]), self._value(args[2]), now)
        elif kind == "renew":
            self._on_renew(sender, int_of(args[0], "lgen"), int_of(args[1], "seq"), now)
        elif kind == "promise":
            b, ab, av = self._ballot(args[1]), self._ballot(args[2]), self._value(args[3])
            self._on_promise(sender, name_of(args[0]), b, ab, av, now)
        elif kind == "nack":
            ra = args[3]
            if not isinstance(ra, int | float) or isinstance(ra, bool) or not ra >= 0:
                raise BadMessage("retry_after must be a number >= 0")
            self._on_nack(sender, name_of(args[0]), self._ballot(args[1]), self._ballot(args[2]), float(ra), now)
        else:
            self._on_accepted(sender, name_of(args[0]), self._ballot(args[1]), now)
        return fx

    def on_own(self, msg: tuple[Any, ...], now: float) -> Effects:
        """Handle a message this member sent itself (`Effects.messages` to `me`).

        It built the message, so the hot kinds of the current epoch skip the parsing of
        `on_message` (a third of the messages a register makes); anything else goes
        through `on_message` as if from a peer."""
        kind = msg[0]
        if msg[2] != self.epoch or msg[1] != self.cluster_id or kind not in _OWN_FAST:
            return self.on_message(self.me, msg, now)
        fx = self._begin()
        me = self.me
        if kind == "accept":
            self._on_accept(me, msg[3], msg[4], msg[5], msg[6], msg[7], now)
        elif kind == "prepare":
            self._on_prepare(me, msg[3], msg[4])
        elif kind == "promise":
            self._on_promise(me, msg[3], msg[4], msg[5], msg[6], now)
        elif kind == "accepted":
            self._on_accepted(me, msg[3], msg[4], now)
        elif kind == "commit":
            self._on_commit(msg[3], msg[4], msg[5], now)
        elif kind == "renew":
            self._on_renew(me, msg[3], msg[4], now)
        elif me in self._member_set:  # renew_ack
            self._on_renew_ack(me, msg[3], msg[4], now)
        return fx

    # ----------------------------------------------------------------- plumbing

    def _value(self, x: Any) -> Value:
        return shared_value(x, self._member_set, self._pid_ok)

    def _ballot(self, x: Any) -> Ballot:
        return shared_ballot(x, self._member_set)

    def _begin(self) -> Effects:
        self._fx = Effects()
        return self._fx

    def _send_config(self, dest: Incarnation) -> None:
        self._send(dest, ("wrong_epoch", self.cluster_id, self.epoch, self.epoch, tuple(self.members)))

    def _send(self, dest: Incarnation, msg: tuple[Any, ...]) -> None:
        self._fx.messages.append((dest, msg))

    def _broadcast(self, msg: tuple[Any, ...]) -> None:
        for m in self.members:
            self._send(m, msg)

    def _timer(self, timer_id: TimerId, at: float) -> None:
        self._fx.timers.append((timer_id, at))

    def _event(self, *ev: Any) -> None:
        self._fx.events.append(ev)

    def _see(self, b: Ballot) -> None:
        """Lamport rule: never propose below a counter already seen."""
        if b[1] > self.counter:
            self.counter = b[1]

    def _slot(self, name: Any) -> AcceptorSlot:
        tables = self._tables
        table = tables[0] if len(tables) == 1 else tables[zlib.crc32(repr(name).encode()) % len(tables)]
        slot = table.get(name)
        if slot is None:
            slot = table[name] = AcceptorSlot()
        return slot

    # ----------------------------------------------------------------- acceptor

    def _writes_paused(self, sender: Incarnation, name: Any, b: Ballot) -> bool:
        """Between seal and serve this acceptor takes no prepare or accept of a name."""
        if not self.is_member or not self.serving:
            return True  # copying: the proposer's round times out and retries
        if self._cfg.slot.sealed:
            self._send(sender, ("sealed", self.cluster_id, self.epoch, name, b))
            return True
        return False

    def _on_prepare(self, sender: Incarnation, name: Any, b: Ballot) -> None:
        if self._writes_paused(sender, name, b):
            return
        self._see(b)
        slot = self._slot(name)
        # >= so that a duplicated or retransmitted prepare of the same proposer is answered.
        if b >= slot.promised:
            slot.promised = b
            self._send(sender, ("promise", self.cluster_id, self.epoch, name, b, slot.ballot, slot.value))
        else:
            self.rejects += 1
            self._send(sender, ("nack", self.cluster_id, self.epoch, name, b, slot.promised, 0.0))

    def _takeover_wait(self, sender: Incarnation, h: Value, new: Value, now: float) -> float | None:
        """None if `new` does not move the name away from holder `h` of another node; else
        the seconds the takeover check still asks to wait (0.0: it may pass now)."""
        pid, token, lgen, owner = h
        if pid is None or owner is None or owner == sender or (new[0], new[1]) == (pid, token):
            return None
        receipt, renewed_lgen = self._renewed.get(owner, _NEVER_RENEWED)
        if "no_takeover_check" in self.bugs or renewed_lgen > lgen:
            return 0.0
        wait = max(receipt + self.lease - now, self._serve_start + self.lease - now)
        return max(wait, 0.0)

    def _on_accept(
        self, sender: Incarnation, name: Any, b: Ballot, v: Value, bb: Ballot, bv: Value, now: float
    ) -> None:
        if self._writes_paused(sender, name, b):
            return
        self._see(b)
        slot = self._slot(name)
        if b < slot.promised:
            self.rejects += 1
            self._send(sender, ("nack", self.cluster_id, self.epoch, name, b, slot.promised, 0.0))
            return
        moved: list[Value] = []
        for h in (bv, slot.value, slot.guard):
            wait = self._takeover_wait(sender, h, v, now)
            if wait is None:
                continue
            if wait > 0:
                self.rejects += 1
                self._send(sender, ("nack", self.cluster_id, self.epoch, name, b, slot.promised, wait))
                return
            moved.append(h)
        for h in moved:
            # Fence the old holder's generation: its node cannot renew it back to life here.
            self._min_lgen[h[3]] = max(self._min_lgen.get(h[3], 0), h[2] + 1)
        slot.ballot, slot.value, slot.guard, slot.decided = b, v, FREE, False
        # Piggy-backed promise of the proposer's next ballot, for this name only.
        slot.promised = (b[0], b[1] + 1, b[2])
        self._event("accepted", name, b, v, bb)
        self.accepts += 1
        self._send(sender, ("accepted", self.cluster_id, self.epoch, name, b))

    def _on_commit(self, name: Any, b: Ballot, v: Value, now: float) -> None:
        self._see(b)
        if self.is_member:
            slot = self._slot(name)
            if b > slot.ballot:
                promised = slot.promised  # before the ballot it may be derived from changes
                slot.ballot, slot.value, slot.guard, slot.decided = b, v, FREE, True
                slot.promised = max(promised, b)
            elif b == slot.ballot:
                slot.decided = True
                b, v = slot.ballot, slot.value  # the accepted objects: kept once, not twice
        self._learn(name, b, v, now)
        op = self._current(name)
        if op is not None and op.phase == "wait_commit" and b >= op.competing:
            self._restart_after_commit(name, op, b, now)

    def _on_renew(self, sender: Incarnation, lgen: int, seq: int, now: float) -> None:
        if not self.is_member or sender not in self._member_set:
            return
        if "no_lgen" not in self.bugs and lgen < self._min_lgen.get(sender, 0):
            return
        self._renewed[sender] = (now, max(lgen, self._renewed.get(sender, _NEVER_RENEWED)[1]))
        self._send(sender, ("renew_ack", self.cluster_id, self.epoch, lgen, seq))

    # ----------------------------------------------------------------- lease keeper

    def _renew(self, now: float) -> None:
        # The timer keeps going on a non-member, which may be added later.
        if self.is_member:
            self._seq += 1
            self._sent[self._seq] = now
            self._broadcast(("renew", self.cluster_id, self.epoch, self.lgen, self._seq))
        self._timer(("renew",), now + self.lease / 3)

    def _on_renew_ack(self, sender: Incarnation, lgen: int, seq: int, now: float) -> None:
        # A lapsed generation never revives: its acks are ignored (the "no_lgen" bug counts them).
        if lgen != self.lgen and "no_lgen" not in self.bugs:
            return
        if seq not in self._sent or seq <= self._counted:
            return
        acks = self._acks.setdefault(seq, set())
        acks.add(sender)
        if len(acks) < self.majority:
            return
        was_valid = self.lease_valid(now)
        self._counted = seq
        until = self._sent[seq] + self.lease - (self.lease * self.rho + 0.001)
        for s in [s for s in self._sent if s <= seq]:
            del self._sent[s]
            self._acks.pop(s, None)
        if until > self.valid_until:
            self.valid_until = until
            self._event("lease", self.lgen, until)
            self._timer(("lapse", self.lgen), until)
        if not was_valid and self.lease_valid(now):
            for name in list(self._ops):
                op = self._current(name)
                if op is not None and op.phase == "wait_lease":
                    self._start_round(name, op, now)

    def _lapse(self, now: float) -> None:
        self._event("lapse", self.lgen)
        if "no_lgen" not in self.bugs:
            self.lgen += 1
            self._sent.clear()
            self._acks.clear()
            self._counted = self._seq
            self.valid_until = NEVER
        for name in list(self.grants):
            self._revoke(name, "lapse")
            self._enqueue_front(name, Operation(name, "release", (), None), now)

    def _revoke(self, name: Any, why: str) -> None:
        """Drop this node's grant of `name`; `why` is "lapse" (the lease lapsed), "lost"
        (another value was decided), "handoff" or "released" (an operation of this node)."""
        g = self.grants.pop(name, None)
        if g is not None:
            self._event("revoke", name, g[0], g[1], why)

    # ----------------------------------------------------------------- proposer

    def _current(self, name: Any) -> Operation | None:
        q = self._ops.get(name)
        return q[0] if q else None

    def _submit(self, name: Any, op: Operation, now: float) -> Effects:
        fx = self._begin()
        try:
            hash(name)
        except TypeError as e:
            raise TypeError("a name must be hashable") from e
        q = self._ops.setdefault(name, deque())
        q.append(op)
        if len(q) == 1:
            self._start_round(name, op, now)
        return fx

    def withdraw(self, op_id: Any, now: float) -> Effects:
        """Drop the operation `op_id` if nothing of it can still take effect: it waits in the
        queue, or for a lease or an epoch, and no accept naming a pid of this node went out
        (a proposer that gives up there is one that crashed). Its result is then
        ``("withdrawn",)``; otherwise nothing happens and the operation runs on (its
        caller stopped waiting; see `pgregistry.names`)."""
        fx = self._begin()
        for name, q in self._ops.items():
            for i, op in enumerate(q):
                if op.op_id != op_id:
                    continue
                if op.phase not in ("queued", "wait_lease", "wait_epoch") or op.doubt:
                    return fx
                del q[i]
                self._fx.cancels.append(("retry", name, op.attempt))
                fx.results.append((op_id, ("withdrawn",)))
                if not q:
                    del self._ops[name]
                elif i == 0:
                    self._start_round(name, q[0], now)
                return fx
        return fx

    def _enqueue_front(self, name: Any, op: Operation, now: float) -> None:
        """Queue an internal release right after the operation running on `name` (or run it)."""
        q = self._ops.setdefault(name, deque())
        if not q:
            q.append(op)
            self._start_round(name, op, now)
        else:
            q.insert(1, op)

    def _needs_lease(self, op: Operation) -> bool:
        return self.is_member and op.kind in ("register", "update")

    def _start_round(self, name: Any, op: Operation, now: float) -> None:
        op.attempt += 1
        if op.attempt > 1:
            self.retries += 1
        op.promises, op.accepted, op.nacked, op.retry_after = {}, set(), set(), 0.0
        if self.is_member and not self.serving:
            op.phase = "wait_epoch"  # resumed when this member serves its epoch
            return
        if self._needs_lease(op) and not self.lease_valid(now):
            op.phase = "wait_lease"  # resumed when a renewal is counted
            return
        piggy = self._piggy.get(name)
        if piggy is None and "shard_wide_skip_prepare" in self.bugs and self._piggy:
            # The planted bug: one promise taken as good for every name.
            kb, kv = self._known.get(name, (NO_BALLOT, FREE))
            piggy = ((self.epoch, self.counter + 1, self._ballot_id), kb, kv)
        if piggy is not None:
            op.ballot = piggy[0]
            self._see(op.ballot)
            # Not `agreed`: what this node decided may have been replaced since, so even an
            # operation that changes nothing sends its (identity) accept, which a majority
            # takes only if no newer ballot was promised: a read is never answered from
            # memory alone.
            self._propose(name, op, (piggy[1], piggy[2]), "read_from_memory" in self.bugs, now)
            return
        self.counter += 1
        op.ballot = (self.epoch, self.counter, self._ballot_id)
        op.phase = "prepare"
        op.sent = now
        self._broadcast(("prepare", self.cluster_id, self.epoch, name, op.ballot))
        self._timer(("retry", name, op.attempt), now + self.round_timeout())

    def _on_promise(self, sender: Incarnation, name: Any, b: Ballot, ab: Ballot, av: Value, now: float) -> None:
        self._see(ab)
        op = self._current(name)
        if op is None or op.phase != "prepare" or b != op.ballot:
            return
        op.promises[sender] = (ab, av)
        if len(op.promises) < self.majority:
            return
        # The round trip that matters is the one to a majority. Each attempt prepares with a
        # ballot of its own, so a promise always answers this very prepare (no retransmission
        # ambiguity in the sample).
        self._rtt.sample(now - op.sent)
        base = max(op.promises.values(), key=lambda p: p[0])
        agreed = len({p for p in op.promises.values()}) == 1
        self._propose(name, op, base, agreed, now)

    def _change(self, op: Operation, v: Value, now: float) -> tuple[Value | None, str]:
        """The operation's compare-and-set function: (new value or None for none, status)."""
        pid, token, lgen, owner = v
        if op.kind == "lookup":
            return None, "value"
        if op.kind == "release":
            if pid is not None and owner == self.me:
                return (None, token, 0, None), "ok"
            return None, "not_held"
        if op.kind == "update":
            new_pid, expected, new_owner, new_lgen = op.args
            if pid is not None and owner == self.me and token == expected:
                if new_owner is None:
                    return (new_pid, token + 1, self.lgen, self.me), "ok"
                return (new_pid, token + 1, new_lgen, new_owner), "ok"
            return None, "mismatch"
        want = op.args[0]
        if pid is None:
            return (want, token + 1, self.lgen, self.me), "ok"
        if owner == self.me:
            if pid == want:
                return None, "ok"
            g = self.grants.get(op.name)
            if g is not None and (g[0], g[1]) == (pid, token):
                return None, "held"
            # A value of ours that was never granted here (an outcome in doubt): reuse it.
            return (want, token + 1, self.lgen, self.me), "ok"
        # Held elsewhere: refuse at once while its node renews here in the holder's own
        # generation; else try a takeover, which the acceptors' lease check decides.
        if self.is_member and self.renews(owner, lgen, now):
            return None, "held"
        return (want, token + 1, self.lgen, self.me), "ok"

    def _propose(self, name: Any, op: Operation, base: tuple[Ballot, Value], agreed: bool, now: float) -> None:
        op.base = base
        new, status = self._change(op, base[1], now)
        if new is None and op.kind == "register" and status == "ok":
            # Already ours: granted if this node still holds it validly, otherwise redo it.
            g = self.grants.get(name)
            if g is None or (g[0], g[1]) != (base[1][0], base[1][1]) or not self.lease_valid(now):
                new = (op.args[0], base[1][1] + 1, self.lgen, self.me)
        if new is None:
            if agreed:
                # A majority accepted this very ballot: its value is decided. Tell everyone
                # (its own commit may have been lost, say when this is our retried release).
                if base[0] != NO_BALLOT and self._learn(name, base[0], base[1], now):
                    self._broadcast(("commit", self.cluster_id, self.epoch, name, base[0], base[1]))
                if op.kind == "release" and base[1][0] is None and base[0][2] == self._ballot_id:
                    status = "ok"  # our own release, decided in an earlier round of this one
                self._finish(name, op, (status, base[0], base[1]), now)
                return
            new = base[1]  # a majority disagree: an identity accept decides the value read
        op.new, op.result = new, (status, op.ballot, new)
        if new[0] is not None and new[3] == self.me and op.kind in ("register", "update") and new != base[1]:
            op.doubt = True  # a new value naming our pid (an identity accept proposes nothing new)
        g = self.grants.get(name)
        if g is not None and (new[0], new[1]) != (g[0], g[1]):
            # Before the first accept that moves the name away.
            self._revoke(name, _REVOKED_BY.get(op.kind, "lost"))
        op.phase = "accept"
        self._broadcast(("accept", self.cluster_id, self.epoch, name, op.ballot, new, base[0], base[1]))
        self._timer(("retry", name, op.attempt), now + self.round_timeout())

    def _on_accepted(self, sender: Incarnation, name: Any, b: Ballot, now: float) -> None:
        op = self._current(name)
        if op is None or op.phase != "accept" or b != op.ballot:
            return
        op.accepted.add(sender)
        if len(op.accepted) < self.majority:
            return
        b, new = op.ballot, op.new
        piggy = self._piggy
        piggy.pop(name, None)  # to the end: the oldest promise is the first dropped
        piggy[name] = ((b[0], b[1] + 1, b[2]), b, new)
        if len(piggy) > PIGGY_LIMIT:
            del piggy[next(iter(piggy))]
        self._broadcast(("commit", self.cluster_id, self.epoch, name, b, new))
        self._known[name] = (b, new)
        result = op.result
        if new[0] is not None and new[3] == self.me and op.kind in ("register", "update"):
            if new[2] == self.lgen and self.lease_valid(now):
                if self.grants.get(name) != (new[0], new[1], new[2]):
                    self.grants[name] = (new[0], new[1], new[2])
                    self._event("grant", name, new[0], new[1], new[2])
            else:
                # Decided but not grantable: release it rather than leave the name blocked.
                result = ("lost", b, new)
                self._enqueue_front(name, Operation(name, "release", (), None), now)
        self._finish(name, op, result, now)

    def _on_nack(self, sender: Incarnation, name: Any, b: Ballot, competing: Ballot, retry_after: float,
                 now: float) -> None:
        self._see(competing)
        op = self._current(name)
        if op is None or op.phase not in ("prepare", "accept") or b != op.ballot:
            return
        if retry_after == 0 and competing[2] == self._ballot_id and competing > b:
            # Our own next ballot, promised with our accept at ballot b: our prepare for b
            # reached this acceptor after that accept. No one competes (and no commit of that
            # ballot would ever come): the round goes on.
            return
        self._piggy.pop(name, None)
        op.nacked.add(sender)
        op.retry_after = max(op.retry_after, retry_after)
        if retry_after > 0 and len(op.nacked) <= len(self.members) - self.majority:
            return  # a takeover refusal: the other acceptors may still pass it
        if op.phase == "accept" and op.retry_after > 0 and op.kind in ("register", "release"):
            # The takeover check refused: the holder's node still renews at some acceptors.
            # A release meets it only when the value it read names another node's holder
            # (a takeover of ours that no majority took): that name is not ours to free,
            # and retrying would block this node's operations on it while the holder lives.
            status = "busy" if op.kind == "register" else "not_held"
            self._finish(name, op, (status, None, op.retry_after), now)
            return
        # A competing ballot: this round cannot win at that acceptor. Give up on it at once
        # rather than at the round timeout, which two duelling proposers would reach together.
        if op.retry_after > 0 or competing <= op.ballot:
            self._backoff(name, op, now)  # a takeover refusal, not a competitor: nothing to wait for
            return
        known = self._known.get(name)
        if known is not None and known[0] >= competing:
            self._restart_after_commit(name, op, known[0], now)  # its commit came first
            return
        # The competitor most likely holds a majority's promises and decides within a round
        # trip or two: wait for its commit, then restart against the decided value, instead of
        # a random backoff and a prepare that its next ballot (promised with its accept) beats.
        op.phase, op.competing = "wait_commit", competing
        wait = min(COMMIT_WAIT_ROUND_TRIPS * self.round_trip(), self.round_timeout())
        self._timer(("wait", name, op.attempt), now + wait)

    def _backoff(self, name: Any, op: Operation, now: float) -> None:
        """Retry `op` after a random pause (capped), or after the takeover check's wait."""
        op.phase = "backoff"
        cap = min(BACKOFF_CAP, BACKOFF_BASE * 2 ** min(op.attempt, 6))
        self._timer(("retry", name, op.attempt), now + max(op.retry_after, cap * self._rng.random()))

    def _restart_after_commit(self, name: Any, op: Operation, b: Ballot, now: float) -> None:
        """The competing ballot's commit (at `b`) came: start `op` again at once.

        The decider's acceptors promised its next ballot, (epoch, counter + 1), with its
        accept; a prepare at or below it would be refused again, so count past it."""
        self._see((b[0], b[1] + 1, b[2]))
        self._start_round(name, op, now)

    def round_trip(self) -> float:
        """This proposer's round-trip estimate to a majority (see `RoundTrips`)."""
        return self._rtt.estimate()

    def round_timeout(self) -> float:
        """How long a round waits for a majority before it starts again (see `RoundTrips`)."""
        return self._rtt.round_timeout(self.lease)

    def _learn(self, name: Any, b: Ballot, v: Value, now: float) -> bool:
        """A decided value (a commit, or a majority's agreeing promises): remember it and step
        down if it replaced ours. False if it was not newer than what this node knew."""
        known = self._known.get(name)
        if known is not None and known[0] >= b:
            return False
        self._known[name] = (b, v)
        # Its decider holds the acceptors' promise of its next ballot: count past it, so that
        # a prepare of ours is not refused by that promise.
        self._see((b[0], b[1] + 1, b[2]))
        piggy = self._piggy.get(name)
        if piggy is not None and piggy[1] < b:
            self._piggy.pop(name)
        g = self.grants.get(name)
        if g is not None and (v[0], v[1]) != (g[0], g[1]):
            self._revoke(name, "lost")
        if v[0] is not None and v[3] == self.me and self.grants.get(name) is None and self._current(name) is None:
            if v[2] == self.lgen and self.lease_valid(now):
                # Handed to a pid of ours by the holder's node (`update` with an owner): the
                # value carries our current generation, so it is ours to grant.
                self.grants[name] = (v[0], v[1], v[2])
                self._event("grant", name, v[0], v[1], v[2])
            else:
                # A value naming our pid that we cannot grant (an outcome in doubt, or a
                # handoff that reached us after a lapse): free it.
                self._enqueue_front(name, Operation(name, "release", (), None), now)
        return True

    def _finish(self, name: Any, op: Operation, result: tuple[Any, ...], now: float) -> None:
        q = self._ops[name]
        q.popleft()
        self._fx.cancels.append(("retry", name, op.attempt))
        if op.phase == "wait_commit":
            self._fx.cancels.append(("wait", name, op.attempt))
        if op.op_id is not None:
            self._fx.results.append((op.op_id, result))
        if op.doubt and result[0] not in ("ok", "lost"):
            # An accept of our value went out and may yet be decided by someone's read:
            # free the name rather than leave an ungranted holder blocking it.
            q.appendleft(Operation(name, "release", (), None))
        if q:
            self._start_round(name, q[0], now)
        else:
            del self._ops[name]
