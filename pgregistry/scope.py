"""The scope server: one per registry name per node, the only writer of its table.

A scope server owns a `Table` of rows ``(key, pid, value, tag)``: its own processes' rows
and those learned from peers. Like Erlang's pg, it watches every local process that has
a row or a subscription (an exit removes all of its rows at once), fans each change out
(whole-scope subscribers, then the key's, most recent first, then listeners; one event
per key an operation touched), and replicates its own processes' rows to the same scope
on every connected node. Tags come from a per-scope counter, so ``(pid, tag)`` names a
row across the cluster. Writes are synchronous, run on the node's loop thread and
never await.

Replication, a `pgregistry.service.Service` over `Node.send_service`: a scope discovers
which nodes run it (``discover``; a node without it answers "no such service"), then each
sends the other a *sync round* (its local rows, streamed in parts of about
`SYNC_PART_ROWS` rows, reconciled pid by pid on arrival), and after that ``ops``
(joins, leaves, updates, batched once per loop iteration, flushed before any other
message). ``ping``/``pong`` make the `sync` barrier; ``bye`` says the scope stops. A
lost peer's rows leave with events, except across a replaced connection, where the next
round reconciles them. What fits no frame of a peer, or a value mutated into a
non-term, is left out for that peer, logged and reported by `sync` (`NotReplicated`).
Malformed messages and rows a peer sends for another node's pids are dropped.

The full protocol is in docs/protocol.md.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Callable, Iterable
from types import ModuleType
from typing import Any, Final

from . import _table
from ._table import Matcher
from .errors import AlreadyRegistered, NoProcess, NotReplicated
from .events import Join, Leave, Registered, Unregistered, Update
from .logbudget import LogBudget
from .node import REPLACED, Node
from .process import Process
from .remote import error_parts
from .scope_checks import (
    BadPeerMessage,
    check_key,
    check_pid,
    check_rows,
    parse_leave,
    parse_leave_reason,
    parse_sync,
)
from .service import DISCOVER, PeerDiscovery
from .subscriptions import EVERY_KEY, Subscriptions
from .terms import SCALAR_TYPES as _SCALARS
from .terms import Pid, Ref, is_value, same_term, short_repr

__all__ = ["ScopeServer", "SYNC_PART_ROWS"]

log = logging.getLogger("pgregistry.scope")

SYNC_PART_ROWS: Final = 4096
"""Rows per part of a sync round (a part closes after the pid that reaches it)."""


_UNSENT_KEPT: Final = 100  # entries left out of replication that `sync` names; the rest are counted

_ABSENT = object()  # "no such row", where None could be a stored value


class _Round:
    """A sync round this server is sending to one peer."""

    __slots__ = ("peer", "pids", "listed", "next", "part", "task", "held", "started")

    def __init__(self, peer: str, pids: list[Pid], held: list[list[Any]]) -> None:
        self.peer = peer
        # Local pids with rows when the round began (table order), then those that join
        # while it runs; each once.
        self.pids = pids
        self.listed = set(pids)
        self.next = 0  # index into `pids` of the next part's first pid
        self.part = 0  # number of the next part
        self.task: asyncio.Task[None] | None = None
        self.held = held  # ping/pong to send once the round is out
        self.started = time.monotonic()

    def list_pid(self, pid: Pid) -> None:
        """`pid` joined: make sure the round sends its state."""
        if pid not in self.listed:
            self.listed.add(pid)
            self.pids.append(pid)


def _group_by_key(pid: Pid, rows: Iterable[tuple[Any, Any]]) -> dict[Any, list[tuple[Pid, Any]]]:
    by_key: dict[Any, list[tuple[Pid, Any]]] = {}
    for key, value in rows:
        entries = by_key.get(key)
        if entries is None:
            by_key[key] = [(pid, value)]
        else:
            entries.append((pid, value))
    return by_key


def wire_reason(reason: Any) -> list[Any]:
    """The trailing field of a leave op for an exit `reason`: ``[reason]`` for a term,
    ``[type_name, message]`` for anything else (an exception; the peer rebuilds a
    `RemoteError`). See `scope_checks.parse_leave_reason`."""
    if type(reason) is str or is_value(reason):
        return [reason]
    return list(error_parts(reason))


def _halves(ops: list[list[Any]]) -> tuple[list[list[Any]], list[list[Any]]] | None:
    """`ops` as two smaller batches: halves of the batch, or of one op's rows (a burst of
    joins, a process exit's leaves); None for a single op about a single row."""
    if len(ops) > 1:
        middle = len(ops) // 2
        return ops[:middle], ops[middle:]
    op = ops[0]
    if op[0] == "j" and len(op[2]) > 3:
        middle = len(op[2]) // 6 * 3  # whole key, value, tag triples
        return [["j", op[1], op[2][:middle]]], [["j", op[1], op[2][middle:]]]
    if op[0] == "l" and len(op[1]) > 1:
        middle = len(op[1]) // 2  # the reason, if any, goes with each half
        return [["l", op[1][:middle], *op[2:]]], [["l", op[1][middle:], *op[2:]]]
    return None


class ScopeServer:
    """The server of one scope on one node. Created and driven by `Registry`."""

    def __init__(self, node: Node, name: str, *, unique: bool, listeners: tuple[str, ...],
                 table_module: ModuleType | None = None) -> None:
        # `table_module` (default: the one `_table` picked) lets benchmarks and tests run
        # the same server on either table implementation in one process.
        impl = table_module if table_module is not None else _table
        self.node = node
        self.runtime = node.runtime
        self.name = name
        self.unique = unique
        self.listeners = listeners
        self.table = impl.Table()
        self.Matcher: type[Matcher] = impl.Matcher
        self.meta: dict[Any, Any] = {}
        self.closed = False
        self._next_tag: Callable[[], int] = itertools.count(1).__next__
        self._subs = Subscriptions(name, log)
        # The two dicts every write reads to know whether anyone listens (never replaced).
        self._scope_subs = self._subs.scope
        self._key_subs = self._subs.by_key
        # Gossip state: scope peers, the pids each one contributed rows for, the ops
        # queued for the next flush, and pending `sync` barriers.
        self._peers: dict[str, set[Pid]] = {}
        self._outbox: list[list[Any]] = []
        self._flush_scheduled = False
        self._next_ping: Callable[[], int] = itertools.count(1).__next__
        self._barriers: dict[int, tuple[set[str], asyncio.Future[None]]] = {}
        # Which connected nodes run this scope: a sync, a discover or "not running this
        # scope" answers our discover; `sync` waits for every answer.
        self._discovery = PeerDiscovery(self._send)
        # Sync rounds: being sent, per peer; being received, per peer: the number of
        # the next part and the pids the round listed so far.
        self._sending: dict[str, _Round] = {}
        self._receiving: dict[str, tuple[int, set[Pid]]] = {}  # next part, pids so far
        # Entries that could not be sent since the last `sync` (which reports them).
        self._unsent: list[tuple[Any, Pid, str]] = []
        self._unsent_more = 0
        self._held_back: set[tuple[Any, Pid]] = set()  # (key, pid) of rows some peer lacks
        self._input_log = LogBudget(log, f"scope {name!r}")
        self._unsent_log = LogBudget(log, f"scope {name!r}")
        # For readiness and metrics, touched only at rare events: peers a whole round
        # was received from, when the round being received began, and the counts
        # `stat` adds (rounds and their seconds; peers added and lost; messages dropped).
        self._synced: set[str] = set()
        self._receive_started: dict[str, float] = {}
        self._counts: dict[str, float] = dict.fromkeys(
            ("rounds_sent", "rounds_sent_seconds", "rounds_received", "rounds_received_seconds",
             "peers_added", "peers_lost", "malformed_dropped", "left_out"), 0)
        # While these (never replaced) dicts are empty a local write is a bare insert, which
        # `Registry.register` then does itself with `next_tag` and `watch`.
        self.write_watchers = (self._scope_subs, self._key_subs, self._peers, self._sending)
        self.next_tag = self._next_tag

    # -- lifecycle ---------------------------------------------------------------------

    def start(self) -> None:
        """Announce the scope to every connected node (after `Node.attach_service`)."""
        for peer in self.node.peers():
            self._discovery.discover(peer)

    def close(self) -> None:
        """Stop serving: tell peers, forget every row, subscription and meta."""
        if self.closed:
            return
        for peer in list(self._peers):
            self._send(peer, ["bye"])
        self.closed = True
        for pid in {row[1] for row in self.table.rows()} | self._subs.subscriber_pids():
            process = self.runtime.process(pid)
            if process is not None:
                process.remove_exit_hook(self)
        self.table.clear()
        self.meta.clear()
        self._subs.clear()
        self._peers.clear()
        self._outbox.clear()
        self._discovery.close(lambda: RuntimeError(f"registry {self.name!r} stopped"))
        for peer in list(self._sending):
            self._stop_round(peer)
        self._receiving.clear()
        self._synced.clear()
        self._receive_started.clear()
        for _waiting, future in self._barriers.values():
            if not future.done():
                future.set_exception(RuntimeError(f"registry {self.name!r} stopped"))
        self._barriers.clear()
        self.node.detach_service(self.name)

    def stat(self) -> dict[str, Any]:
        """Sizes and counters of this scope on this node, for status and metrics (O(1)).

        ``rows``: entries in the table (local and replicated); ``peers``: nodes whose
        scope this one exchanges rows with; ``subscribers``: subscriptions
        (``monitor_scope`` and per key); ``rounds_sending`` / ``rounds_receiving``: sync
        rounds under way to / from peers; ``discovering``: peers that have not answered
        our discover yet; ``barriers``: `sync` calls waiting for pongs; ``queued_ops``:
        local changes not flushed to peers yet; ``unsent``: entries left out of
        replication since the last `sync` reported them; ``held_back``: rows some peer
        lacks until they are updated; ``meta``: metadata keys; ``closed``. Counters since
        start: ``rounds_sent`` / ``rounds_received`` (complete sync rounds) and their
        total ``rounds_sent_seconds`` / ``rounds_received_seconds`` (first part to last);
        ``peers_added`` / ``peers_lost`` (scope peers gained, and lost with their rows);
        ``malformed_dropped`` (peer messages dropped as malformed); ``left_out`` (entries
        not sent to some peer).
        """
        return {
            **self._counts,
            "rows": len(self.table),
            "peers": len(self._peers),
            "subscribers": len(self._subs),
            "rounds_sending": len(self._sending),
            "rounds_receiving": len(self._receiving),
            "discovering": self._discovery.pending,
            "barriers": len(self._barriers),
            "queued_ops": len(self._outbox),
            "unsent": len(self._unsent) + self._unsent_more,
            "held_back": len(self._held_back),
            "meta": len(self.meta),
            "closed": self.closed,
        }

    def unsynced(self, peers: Iterable[str]) -> list[str]:
        """Those of `peers` (connected node ids) this scope has not caught up with yet:
        that have not answered its discover, or run the scope and have not sent a whole
        sync round yet, or are sending one now. For readiness probes."""
        return [peer for peer in peers
                if self._discovery.is_asked(peer) or peer in self._receiving
                or (peer in self._peers and peer not in self._synced)]

    async def drain(self, timeout: float) -> None:
        """Before a graceful stop: send the queued ops, then wait for the sync rounds under way.

        The ops queued for the next flush go to every peer at once; then this waits
        until each sync round this server is streaming to a peer has sent its last part
        (a round whose peer is lost meanwhile ends with it). It does not wait for peers
        to apply what they got: that is `sync`. `TimeoutError` if rounds are still
        being sent after `timeout` seconds. On timeout or cancellation only the wait
        ends: the rounds go on, nothing is dropped. Returns at once on a closed scope.
        """
        if self.closed:
            return
        if self._outbox:
            self._flush()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            # A failed round stays registered with its task done: nothing left to wait for.
            streaming = [r.task for r in self._sending.values() if r.task is not None and not r.task.done()]
            if not streaming:
                return
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise TimeoutError(f"scope {self.name!r}: {len(streaming)} sync rounds still being sent "
                                   f"after {timeout} s")
            await asyncio.wait(streaming, timeout=remaining)

    def _watch(self, process: Process) -> None:
        process.add_exit_hook(self, self._on_exit)
    watch = _watch

    def _on_exit(self, pid: Pid, reason: Any) -> None:
        rows = self.table.pop_pid(pid)
        if rows:
            self._publish_leaves(pid, rows, reason)
            if self._peers:
                self._queue(["l", [[key, pid, tag] for key, _value, tag in rows], wire_reason(reason)])
        self._subs.remove_pid(pid)
        if self._held_back:
            self._held_back = {entry for entry in self._held_back if entry[1] != pid}

    # -- local writes --------------------------------------------------------------------

    def join(self, key: Any, process: Process, value: Any) -> None:
        """Add a row for a live local process; `AlreadyRegistered` on a unique collision."""
        pid = process.pid
        if self.unique:
            holder = self.local_holder(key)
            if holder is not None:
                raise AlreadyRegistered(holder, key)
        tag = self._next_tag()
        if self.table.insert(key, pid, value, tag):
            self._watch(process)
        if self._scope_subs or self._key_subs or self.listeners:  # `not self._quiet()`, inlined
            self._publish_join(key, [(pid, value)])
        if self._sending:
            for round_ in self._sending.values():
                round_.list_pid(pid)
        if self._peers:
            outbox = self._outbox
            if outbox and outbox[-1][1] is pid and outbox[-1][0] == "j":
                outbox[-1][2] += (key, value, tag)  # a burst of one process's joins: one op
            else:
                self._queue(["j", pid, [key, value, tag]])

    def leave_latest(self, key: Any, pid: Pid) -> bool:
        """Remove the most recently joined row of `pid` under `key`."""
        popped = self.table.pop_latest(key, pid)
        if popped is None:
            return False
        tag, value = popped
        self._publish_leave(key, [(pid, value)])
        if self._peers:
            self._queue(["l", [[key, pid, tag]]])
        return True

    def leave_local(self, key: Any) -> int:
        """Remove every row of every local process under `key`; one `Leave` lists them all."""
        is_local = self.runtime.is_local
        removed = []
        wire = []
        for pid, value, tag in self.table.entries(key):
            if is_local(pid):
                self.table.pop(key, pid, tag)
                removed.append((pid, value))
                wire.append([key, pid, tag])
        if removed:
            self._publish_leave(key, removed)
            if self._peers:
                self._queue(["l", wire])
        return len(removed)

    def leave_pid(self, pid: Pid) -> int:
        """Remove every row of the local process `pid` (one `Leave` per key); return how many."""
        rows = self.table.pop_pid(pid)
        if rows:
            self._publish_leaves(pid, rows, None)
            if self._peers:
                self._queue(["l", [[key, pid, tag] for key, _value, tag in rows]])
        return len(rows)

    def leave_match(self, key: Any, pid: Pid, matcher: Matcher) -> int:
        """Remove the rows of `pid` under `key` that match; return how many."""
        popped = self.table.pop_match(key, pid, matcher)
        if popped:
            self._publish_leave(key, [(pid, value) for _tag, value in popped])
            if self._peers:
                self._queue(["l", [[key, pid, tag] for tag, _value in popped]])
        return len(popped)

    def update(self, key: Any, pid: Pid, value: Any) -> bool:
        """Give every row of `pid` under `key` the new value; False if it has none."""
        changed = self.table.update(key, pid, value)
        if not changed:
            return False
        if self._scope_subs or key in self._key_subs:
            self._publish_update(key, [(pid, old, value) for _tag, old in changed])
        if self._peers:
            self._queue(["u", key, pid, value])
            if self._held_back and (key, pid) in self._held_back:
                # Some peer lacks these rows (left out earlier), so an update would
                # change nothing there: a new round gives every peer this pid's rows.
                self._held_back.discard((key, pid))
                for peer in list(self._peers):
                    self._start_round(peer)
        return True

    def local_holder(self, key: Any) -> Pid | None:
        """The oldest live local process holding `key`, or None."""
        runtime = self.runtime
        for pid in self.table.pids(key):
            if runtime.is_local(pid) and runtime.process(pid) is not None:
                return pid
        return None

    # -- subscriptions -------------------------------------------------------------------

    def subscribe(self, process: Process, key: Any = EVERY_KEY) -> Ref:
        """Subscribe `process` to every key (default) or to one key; return the ref."""
        ref = self.runtime.new_ref()
        self._subs.add(ref, key, process)
        self._watch(process)
        return ref

    def unsubscribe(self, ref: Any, caller: Process) -> bool:
        """End a subscription and flush its pending events from `caller`'s mailbox."""
        sub = self._subs.get(ref)
        if sub is None:
            return False
        self._subs.remove(sub.ref)
        caller.flush(lambda msg: type(msg) in (Join, Leave, Update) and msg[0] == ref)
        return True

    # -- fan-out -------------------------------------------------------------------------

    def _quiet(self) -> bool:
        """Nobody to tell: no subscriber and no listener (the common, fast case)."""
        return not (self._scope_subs or self._key_subs or self.listeners)

    def _publish_join(self, key: Any, entries: list[tuple[Pid, Any]]) -> None:
        if self._quiet():
            return
        self._subs.fan_out(Join, key, entries)
        if self.listeners:
            self._tell_listeners([Registered(self.name, key, pid, value) for pid, value in entries])

    def _publish_leave(self, key: Any, entries: list[tuple[Pid, Any]], reason: Any = None) -> None:
        """`Leave` events; `reason` None is ``"unregistered"`` (the class default)."""
        if self._quiet():
            return
        self._subs.fan_out(Leave, key, entries, reason)
        if self.listeners:
            self._tell_listeners([Unregistered(self.name, key, pid) for pid, _value in entries])

    def _publish_update(self, key: Any, changes: list[tuple[Pid, Any, Any]]) -> None:
        if not (self._scope_subs or key in self._key_subs):
            return  # listeners never see updates
        self._subs.fan_out(Update, key, changes)

    def _publish_leaves(self, pid: Pid, rows: list[tuple[Any, Any, int]], reason: Any) -> None:
        """One `Leave` per key for the rows a process lost (in its join order)."""
        if self._quiet():
            return
        for key, entries in _group_by_key(pid, ((key, value) for key, value, _tag in rows)).items():
            self._publish_leave(key, entries, reason)

    def _tell_listeners(self, messages: list[Any]) -> None:
        runtime = self.runtime
        for name in self.listeners:
            pid = runtime.whereis(name)
            process = runtime.process(pid) if pid is not None else None
            if process is None:
                continue  # a listener that is not running misses the event, by design
            for message in messages:
                process.deliver(message)

    # -- gossip: sending -------------------------------------------------------------------

    def _queue(self, op: list[Any]) -> None:
        self._outbox.append(op)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        if not self._outbox:
            return
        ops, self._outbox = self._outbox, []
        self._broadcast_ops(self._sendable_ops(ops))

    def _sendable_ops(self, ops: list[list[Any]]) -> list[list[Any]]:
        """`ops` without the rows whose value stopped being a term since it was registered.

        Values are stored by reference, so a caller that mutates one can make it
        unencodable (or too deep for any peer); only that row is left out, recorded for
        `sync` to report, and every other op goes.
        """
        values = []
        for op in ops:
            if op[0] == "j":
                values += op[2][1::3]
            elif op[0] == "u":
                values.append(op[3])
        if _SCALARS.issuperset(map(type, values)):
            return ops  # the common case: nothing that can have been mutated
        kept = []
        for op in ops:
            if op[0] == "j":
                flat = self._sendable_rows(op[1], op[2])
                if flat:
                    kept.append(["j", op[1], flat])
            elif op[0] == "u" and not is_value(op[3]):
                self._left_out(op[1], op[2], "its value is no longer a term (mutated after it was registered?)")
            else:
                kept.append(op)
        return kept

    def _sendable_rows(self, pid: Pid, flat: list[Any]) -> list[Any]:
        """`pid`'s flat rows without those whose value is no longer a term (see `_sendable_ops`)."""
        if _SCALARS.issuperset(map(type, flat[1::3])):
            return flat
        kept = []
        for i in range(0, len(flat), 3):
            if is_value(flat[i + 1]):
                kept += flat[i:i + 3]
            else:
                self._left_out(flat[i], pid, "its value is no longer a term (mutated after it was registered?)")
        return kept

    def _left_out(self, key: Any, pid: Pid, why: str) -> None:
        """Record an entry that could not be sent: logged, and reported by the next `sync`."""
        self._unsent_log.error("scope %r: the entry under key %s of %r was not sent to peers: %s",
                               self.name, short_repr(key), pid, why)
        self._counts["left_out"] += 1
        self._held_back.add((key, pid))
        if len(self._unsent) < _UNSENT_KEPT:
            self._unsent.append((key, pid, why))
        else:
            self._unsent_more += 1

    def _broadcast_ops(self, ops: list[list[Any]]) -> None:
        """Send `ops` to every scope peer; split them for a peer whose frame limit they exceed."""
        if not ops:
            return
        too_big: list[str] = []
        self.node.broadcast_service(self.name, ["ops", ops], self._peers, trusted=True, too_big=too_big)
        for peer in too_big:
            self._send_ops(peer, ops)

    def _send_ops(self, peer: str, ops: list[list[Any]]) -> None:
        """Send `ops` to `peer` alone, in halves (see `_halves`) until they fit its frames."""
        try:
            self.node.send_service(peer, self.name, ["ops", ops], trusted=True)
        except ValueError:  # over this peer's frame limit: nothing was sent
            if len(ops) == 1 and ops[0][0] == "l" and len(ops[0]) == 3:
                # an exit's leave: its reason may be what is too large; the rows always
                # fit (halved below if need be), and the peer then reports "unregistered"
                self._send_ops(peer, [ops[0][:2]])
                return
            halves = _halves(ops)
            if halves is not None:
                for half in halves:
                    self._send_ops(peer, half)
                return
            # One row or one update larger than this peer takes; the others have it. (A
            # leave of one row without a reason always fits where that row's join did.)
            op = ops[0]
            if op[0] == "j":
                self._left_out(op[2][0], op[1], f"too large for the frame limit of {peer}")
            elif op[0] == "u":
                self._left_out(op[1], op[2], f"too large for the frame limit of {peer}")

    def _send(self, peer: str, message: list[Any]) -> None:
        if self._outbox:
            self._flush()
        round_ = self._sending.get(peer)
        if round_ is not None and message[0] in ("ping", "pong"):
            round_.held.append(message)  # a barrier answers for the whole round
            return
        # Every payload here is built from validated terms: no second check.
        self.node.send_service(peer, self.name, message, trusted=True)

    # -- gossip: sync rounds, sending --------------------------------------------------------

    def _start_round(self, peer: str) -> None:
        """Send `peer` this node's rows: part 0 now, the rest from a task.

        A round that was still running to `peer` stops; the pings and pongs it held
        move to the new round.
        """
        old = self._sending.pop(peer, None)
        if old is not None and old.task is not None:
            old.task.cancel()
        is_local = self.runtime.is_local
        round_ = _Round(peer, [pid for pid in self.table.owners() if is_local(pid)],
                        old.held if old is not None else [])
        self._sending[peer] = round_
        # Part 0 goes out now, before any op that follows, so that the receiver sees
        # every later op after the round began.
        try:
            last = self._send_part(round_)
        except Exception:
            self._round_failed(round_)
            return
        if last:
            self._end_round(round_)
        else:
            round_.task = asyncio.get_running_loop().create_task(
                self._stream_round(round_), name=f"pgregistry sync {self.name} -> {peer}")

    async def _stream_round(self, round_: _Round) -> None:
        """Send the rest of `round_`, one part per loop iteration, as the peer takes them.

        Returns without ending the round when the peer is gone or a newer round took
        over (whoever did that dealt with it); cancelled by `_stop_round`.
        """
        peer = round_.peer
        try:
            while True:
                await asyncio.sleep(0)
                if not await self.node.drain_peer(peer) or self._sending.get(peer) is not round_:
                    return
                if self._send_part(round_):
                    break
        except Exception:
            self._round_failed(round_)
            return
        self._end_round(round_)

    def _round_failed(self, round_: _Round) -> None:
        # A bug, not a peer's doing. The round stays registered, unfinished: the peer
        # keeps what it got, and the barriers it holds time out rather than report a
        # sync that did not happen. The peer's next discover starts a new round.
        log.exception("scope %r: the sync round to %s failed at part %d", self.name, round_.peer, round_.part)

    def _send_part(self, round_: _Round) -> bool:
        """Send the next part of `round_`; True if it was the last."""
        pids, flat_rows = round_.pids, self.table.pid_rows_flat
        groups: list[list[Any]] = []
        rows = 0
        i = round_.next
        while i < len(pids) and rows < SYNC_PART_ROWS:
            flat = self._sendable_rows(pids[i], flat_rows(pids[i]))
            groups.append([pids[i], flat])  # empty: its rows went since the round began
            rows += len(flat) // 3 or 1
            i += 1
        round_.next = i
        last = i >= len(pids)
        if self._outbox:
            self._flush()
        self._send_groups(round_, groups, last)
        return last

    def _send_groups(self, round_: _Round, groups: list[list[Any]], last: bool) -> None:
        """Send `groups` as the next part(s): one part, or one per pid if that is too big."""
        try:
            self.node.send_service(round_.peer, self.name, ["sync", round_.part, groups, last], trusted=True)
        except ValueError:  # over the peer's frame limit; nothing was sent
            if len(groups) > 1:
                for i, group in enumerate(groups):
                    self._send_groups(round_, [group], last and i == len(groups) - 1)
                return
            # One process with more rows than a frame holds: the peer does without them.
            pid, flat = groups[0]
            for i in range(0, len(flat), 3):
                self._left_out(flat[i], pid, f"its process's rows are too large for the frame limit of {round_.peer}")
            self.node.send_service(round_.peer, self.name, ["sync", round_.part, [], last], trusted=True)
        round_.part += 1

    def _end_round(self, round_: _Round) -> None:
        if self._sending.get(round_.peer) is round_:
            del self._sending[round_.peer]
            self._counts["rounds_sent"] += 1
            self._counts["rounds_sent_seconds"] += time.monotonic() - round_.started
        for message in round_.held:
            self._send(round_.peer, message)

    def _stop_round(self, peer: str) -> None:
        round_ = self._sending.pop(peer, None)
        if round_ is not None and round_.task is not None:
            round_.task.cancel()

    # -- gossip: node callbacks -------------------------------------------------------------

    def peer_up(self, peer: str) -> None:
        """A node connection came up: ask whether it runs this scope."""
        if not self.closed:
            self._discovery.discover(peer)

    def peer_down(self, peer: str, reason: str) -> None:
        """A node connection was lost: its processes' rows leave (not when it was `REPLACED`)."""
        self._discovery.answered(peer)
        if reason == REPLACED and peer in self._peers:
            # Keep the rows: the peer's next round, on the new connection, reconciles.
            self._stop_round(peer)
            self._receiving.pop(peer, None)
            self._receive_started.pop(peer, None)
            self._release_barriers(peer)
            return
        self._forget_peer(peer, "nodedown")

    def peer_absent(self, peer: str) -> None:
        """`peer`'s node does not run this scope (answer to a message we sent it)."""
        self._discovery.answered(peer)
        self._forget_peer(peer, "scope_stopped")  # rows kept across a replaced connection, if any

    def peer_message(self, peer: str, payload: Any) -> None:
        """Apply one message of the peer protocol; malformed input is logged and dropped."""
        if self.closed:
            return
        try:
            self._dispatch(peer, payload)
        except BadPeerMessage as exc:
            self._counts["malformed_dropped"] += 1
            self._input_log.warning("scope %r: dropped a malformed message from %s: %s", self.name, peer, exc)

    def _dispatch(self, peer: str, payload: Any) -> None:
        if type(payload) is not list or not payload or type(payload[0]) is not str:
            raise BadPeerMessage(f"not a tagged list: {short_repr(payload)}")
        kind = payload[0]
        if kind == DISCOVER:
            asked_already = self._discovery.answered(peer)
            self._start_round(peer)
            if peer not in self._peers:
                self._peers[peer] = set()
                self._counts["peers_added"] += 1
                if not asked_already:
                    self._send(peer, [DISCOVER])
        elif kind == "sync":
            n, groups, last = parse_sync(peer, payload)
            round_ = self._receiving.get(peer)
            if n != (0 if round_ is None or n == 0 else round_[0]):
                raise BadPeerMessage(f"sync part {n} out of sequence")
            self._discovery.answered(peer)
            if peer not in self._peers:
                self._peers[peer] = set()
                self._counts["peers_added"] += 1
            self._apply_part(peer, n, groups, last)
        elif kind == "ping":
            self._send(peer, ["pong", payload[1] if len(payload) == 2 else None])
        elif peer not in self._peers:
            return  # stale: from before the peer was lost, or from outside the overlay
        elif kind == "ops":
            if len(payload) != 2 or type(payload[1]) is not list:
                raise BadPeerMessage("ops needs one list")
            bad = []
            for op in payload[1]:  # each op stands alone: a bad one costs only itself
                try:
                    self._apply_op(peer, op)
                except BadPeerMessage as exc:
                    bad.append(str(exc))
            if bad:
                raise BadPeerMessage(f"{len(bad)} of {len(payload[1])} ops dropped, the first: {bad[0]}")
        elif kind == "pong":
            self._pong(peer, payload[1] if len(payload) == 2 else None)
        elif kind == "bye":
            self._forget_peer(peer, "scope_stopped")
        else:
            raise BadPeerMessage(f"unknown message kind {short_repr(kind)}")

    # -- gossip: applying a peer's changes ------------------------------------------------

    def _apply_op(self, peer: str, op: Any) -> None:
        if type(op) is not list or not op:
            raise BadPeerMessage(f"op {short_repr(op)} is not a tagged list")
        kind = op[0]
        if kind == "j" and len(op) == 3 and type(op[2]) is list:
            pid = check_pid(peer, op[1])
            self._remote_joins(peer, pid, check_rows(pid, op[2]))
        elif kind == "l" and len(op) in (2, 3) and type(op[1]) is list:
            # the reason is an optional trailing field (a peer before it sends none)
            reason = parse_leave_reason(op[2]) if len(op) == 3 else None
            self._remote_leave(peer, parse_leave(peer, op[1]), reason)
        elif kind == "u" and len(op) == 4:
            _kind, key, pid, value = op
            self._remote_update(check_key(key), check_pid(peer, pid), value)
        else:
            raise BadPeerMessage(f"unknown op {short_repr(op)}")

    def _insert_rows(self, pid: Pid, flat: list[Any], joins: dict[Any, list[tuple[Pid, Any]]] | None) -> None:
        """Insert flat ``key, value, tag`` rows of `pid` (compiled); collect them by key in `joins`."""
        self.table.insert_flat(pid, flat)
        if joins is not None:
            for i in range(0, len(flat), 3):
                joins.setdefault(flat[i], []).append((pid, flat[i + 1]))

    def _remote_joins(self, peer: str, pid: Pid, flat: list[Any]) -> None:
        self._insert_rows(pid, flat, None)
        if not flat:
            return
        self._peers[peer].add(pid)
        if not self._quiet():
            for i in range(0, len(flat), 3):
                self._publish_join(flat[i], [(pid, flat[i + 1])])

    def _remote_leave(self, peer: str, checked: list[tuple[Any, Pid, int]], reason: Any) -> None:
        removed: dict[Any, list[tuple[Pid, Any]]] = {}
        touched: set[Pid] = set()
        for key, pid, tag in checked:
            value = self.table.pop(key, pid, tag, _ABSENT)
            if value is not _ABSENT:
                removed.setdefault(key, []).append((pid, value))
                touched.add(pid)
        pids = self._peers[peer]
        for pid in touched:
            if not self.table.count_pid(pid):
                pids.discard(pid)
        for key, entries in removed.items():
            self._publish_leave(key, entries, reason)

    def _remote_update(self, key: Any, pid: Pid, value: Any) -> None:
        changed = self.table.update(key, pid, value)
        if changed and (self._scope_subs or key in self._key_subs):
            self._publish_update(key, [(pid, old, value) for _tag, old in changed])

    def _apply_part(self, peer: str, n: int, groups: list[tuple[Pid, list[Any]]], last: bool) -> None:
        """Make this node's view of each pid in `groups` what part `n` says (see the protocol)."""
        mentioned = set() if n == 0 else self._receiving[peer][1]
        if n == 0:
            self._receive_started[peer] = time.monotonic()
        self._receiving[peer] = (n + 1, mentioned)
        known = self._peers[peer]
        table = self.table
        quiet = self._quiet()
        leaves: dict[Any, list[tuple[Pid, Any]]] = {}
        updates: dict[Any, list[tuple[Pid, Any, Any]]] = {}
        joins: dict[Any, list[tuple[Pid, Any]]] = {}
        for pid, flat in groups:
            mentioned.add(pid)
            if pid not in known:  # nothing held of this pid: every row joins (catch-up)
                self._insert_rows(pid, flat, None if quiet else joins)
            else:
                self._reconcile(pid, flat, leaves, updates, joins)
            if table.count_pid(pid):
                known.add(pid)
            else:
                known.discard(pid)
        if last:
            del self._receiving[peer]
            self._synced.add(peer)
            self._counts["rounds_received"] += 1
            self._counts["rounds_received_seconds"] += time.monotonic() - self._receive_started.pop(peer)
            log.info("registry %r on %s: a sync round from %s applied (%d parts, %d processes)", self.name,
                     self.node.id, peer, n + 1, len(mentioned),
                     extra={"node": self.node.id, "event": "sync_round", "peer": peer})
            for pid in known - mentioned:
                for key, value, _tag in table.pop_pid(pid):
                    leaves.setdefault(key, []).append((pid, value))
                known.discard(pid)
        for key, entries in leaves.items():
            self._publish_leave(key, entries, "sync")
        for key, changes in updates.items():
            self._publish_update(key, changes)
        for key, entries in joins.items():
            self._publish_join(key, entries)

    def _reconcile(self, pid: Pid, flat: list[Any], leaves: dict[Any, list[tuple[Pid, Any]]],
                   updates: dict[Any, list[tuple[Pid, Any, Any]]], joins: dict[Any, list[tuple[Pid, Any]]]) -> None:
        """Diff the rows held of `pid` against its rows in a sync part."""
        table = self.table
        incoming = {flat[i + 2]: (flat[i], flat[i + 1]) for i in range(0, len(flat), 3)}
        for key, value, tag in table.pid_entries(pid):
            now = incoming.pop(tag, None)
            if now is None or not (now[0] is key or now[0] == key):
                table.pop(key, pid, tag)
                leaves.setdefault(key, []).append((pid, value))
                if now is not None:
                    incoming[tag] = now  # same tag, other key: a new row
            elif not same_term(now[1], value):
                table.update_row(key, pid, tag, now[1])
                updates.setdefault(key, []).append((pid, value, now[1]))
        for tag, (key, value) in incoming.items():
            table.insert(key, pid, value, tag)
            joins.setdefault(key, []).append((pid, value))

    def _release_barriers(self, peer: str) -> None:
        """`peer` will not answer the pings it was sent: barriers stop waiting for it."""
        for waiting, future in list(self._barriers.values()):
            waiting.discard(peer)
            if not waiting and not future.done():
                future.set_result(None)

    def _forget_peer(self, peer: str, reason: str) -> None:
        """Drop `peer`'s rows (their `Leave` events carry `reason`)."""
        self._stop_round(peer)
        self._receiving.pop(peer, None)
        self._receive_started.pop(peer, None)
        self._synced.discard(peer)
        pids = self._peers.pop(peer, None)
        if pids is not None:
            self._counts["peers_lost"] += 1
        self._release_barriers(peer)
        if not pids:
            return
        for pid in pids:
            rows = self.table.pop_pid(pid)
            if rows:
                self._publish_leaves(pid, rows, reason)

    # -- barrier ----------------------------------------------------------------------------

    def _pong(self, peer: str, n: Any) -> None:
        barrier = self._barriers.get(n) if type(n) is int else None
        if barrier is None:
            return
        waiting, future = barrier
        waiting.discard(peer)
        if not waiting and not future.done():
            future.set_result(None)

    async def sync(self, timeout: float) -> None:
        """Wait until every scope peer has applied what this server sent before the call.

        A ``ping`` goes to every scope peer after the queued changes; each answers after
        applying everything before it. A peer lost meanwhile no longer counts.
        `TimeoutError` if some peer does not answer within `timeout` seconds.
        `NotReplicated` (after the barrier) if entries were left out of what this server
        sent since the previous report: values mutated into non-terms, rows too large
        for a peer; each is reported once.
        """
        if self.closed:
            raise RuntimeError(f"registry {self.name!r} is stopped")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        # A node just connected may run this scope without having said so yet: wait
        # until every connected node has answered our discover.
        await self._discovery.settled(timeout)
        peers = set(self._peers)
        if not peers:
            self._raise_unsent()
            return
        n = self._next_ping()
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._barriers[n] = (peers, future)
        try:
            for peer in list(peers):
                self._send(peer, ["ping", n])
            await asyncio.wait_for(asyncio.shield(future), max(0.0, deadline - loop.time()))
        finally:
            self._barriers.pop(n, None)
        self._raise_unsent()

    def _raise_unsent(self) -> None:
        """`NotReplicated` for the entries left out since the last report, if any."""
        if self._unsent or self._unsent_more:
            entries, more = self._unsent, self._unsent_more
            self._unsent, self._unsent_more = [], 0
            raise NotReplicated(self.name, entries, more)

    # -- helpers for the façade ------------------------------------------------------------

    def live_local_process(self, pid: Pid) -> Process:
        """The live local process of `pid`; `NoProcess` if it is dead."""
        process = self.runtime.process(pid)
        if process is None:
            raise NoProcess(f"{pid!r} is not alive")
        return process
