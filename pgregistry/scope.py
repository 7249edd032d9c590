"""The scope server: one per registry name per node, the only writer of its table.

A scope server owns a `Table` of rows ``(key, pid, value, tag)`` — this node's view of
the scope, its own processes' rows and those learned from peers — and everything that
reacts to a change of it:

* it watches every local process that has a row or a subscription (an exit hook on the
  process), so a process's exit removes all of its rows at once;
* it fans every change out, in this order: whole-scope subscribers, then that key's
  subscribers (most recent subscription first), then listeners (one message per row
  per listener, to a locally registered name; a missing name is skipped);
* it gossips its own processes' changes to the same scope on every connected node, and
  applies theirs;
* it keeps the node-local scope metadata.

Event shapes (DESIGN.md §4): ``Join(ref, key, [(pid, value)])``,
``Leave(ref, key, [(pid, value)])``, ``Update(ref, key, [(pid, old, new)])`` to
subscribers; ``Registered(scope, key, pid, value)`` and ``Unregistered(scope, key, pid)``
to listeners, which never see updates. One operation emits one event per key it
touched: a process exit emits one ``Leave`` per key listing all of that process's rows.

Every write is a synchronous method that must run on the node's loop thread (the
`Registry` façade checks that and validates arguments); it mutates the table, emits
events, queues gossip and returns. Nothing awaits. Tags come from a per-scope counter,
so ``(pid, tag)`` names a row uniquely across the cluster (a pid carries its node).

Peer protocol
-------------
Scope servers of the same name talk through their nodes' connections
(`Node.send_service`); per connection, messages arrive in the order sent. Payloads are
lists of terms:

``["discover"]``
    "I run this scope". Sent to every peer node when the scope starts and when a node
    connection comes up. The receiver answers with ``sync``; if the sender was not yet a
    scope peer it becomes one and gets a ``discover`` back.
``["sync", [[pid, [[key, value, tag], ...]], ...]]``
    The sender's complete set of local rows, grouped by pid. The receiver makes its view
    of the sender equal to it: rows it no longer lists leave (``Leave``), rows whose
    value differs are updated (``Update``), new rows join (``Join``). Idempotent.
``["ops", [op, ...]]``
    Changes of the sender's own rows, batched once per loop iteration, in order:
    ``["j", key, pid, value, tag]`` join, ``["l", [[key, pid, tag], ...]]`` leave (one op
    per local leave, unregister_match or process exit), ``["u", key, pid, value]``
    update of every row of pid under key.
``["ping", n]`` / ``["pong", n]``
    Barrier for `sync`: the answer comes after everything the receiver got before it.
``["bye"]``
    The sender's scope stops: drop its rows as if its node was lost.

A node that does not run the scope answers ``discover`` at the node level ("no such
service", `peer_absent`), so a scope knows when discovery of every connected node is
settled; `sync` waits for that before its barrier.

Messages from a node that is not a scope peer (other than ``discover`` and ``sync``)
are ignored; so are malformed messages, and rows whose pid does not belong to the
sending node (a peer only ever speaks for its own processes). When a peer is lost
(``peer_down``) or says ``bye``, its rows leave with events. Queued ``ops`` are always
flushed before any other message to a peer, so a ``sync`` never overtakes them.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from types import ModuleType
from typing import Any, Callable, Iterable

from . import _table
from ._table import Matcher
from .errors import AlreadyRegistered, NoProcess
from .events import Join, Leave, Registered, Unregistered, Update
from .node import Node
from .process import Process
from .terms import Pid, Ref

__all__ = ["ScopeServer"]

log = logging.getLogger("pgregistry.scope")

_SCOPE = object()  # subscription target meaning "every key"
_ABSENT = object()  # "no such row", where None could be a stored value


class _Subscription:
    __slots__ = ("ref", "target", "process")

    def __init__(self, ref: Ref, target: Any, process: Process) -> None:
        self.ref = ref
        self.target = target
        self.process = process


class _Malformed(Exception):
    """A peer message that does not have the protocol's shape."""


def _group_by_key(pid: Pid, rows: Iterable[tuple[Any, Any]]) -> dict[Any, list[tuple[Pid, Any]]]:
    by_key: dict[Any, list[tuple[Pid, Any]]] = {}
    for key, value in rows:
        entries = by_key.get(key)
        if entries is None:
            by_key[key] = [(pid, value)]
        else:
            entries.append((pid, value))
    return by_key


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
        self._scope_subs: dict[Ref, _Subscription] = {}
        self._key_subs: dict[Any, dict[Ref, _Subscription]] = {}
        self._subs: dict[Ref, _Subscription] = {}
        self._subs_of_pid: dict[Pid, set[Ref]] = {}
        # Gossip state: scope peers, the pids each one contributed rows for, the ops
        # queued for the next flush, and pending `sync` barriers.
        self._peers: dict[str, set[Pid]] = {}
        self._outbox: list[list[Any]] = []
        self._flush_scheduled = False
        self._next_ping: Callable[[], int] = itertools.count(1).__next__
        self._barriers: dict[int, tuple[set[str], asyncio.Future[None]]] = {}
        # Nodes sent a ``discover`` that have not yet answered (a sync, a discover, or
        # "not running this scope"), and the `sync` calls waiting for them to answer.
        self._discovering: set[str] = set()
        self._discovery_waiters: list[asyncio.Future[None]] = []

    # -- lifecycle ---------------------------------------------------------------------

    def start(self) -> None:
        """Announce the scope to every connected node (after `Node.attach_service`)."""
        for peer in self.node.peers():
            self._discover(peer)

    def _discover(self, peer: str) -> None:
        self._discovering.add(peer)
        self._send(peer, ["discover"])

    def _discovered(self, peer: str) -> None:
        """`peer` answered our discover, one way or another (or is gone)."""
        self._discovering.discard(peer)
        if not self._discovering and self._discovery_waiters:
            for waiter in self._discovery_waiters:
                if not waiter.done():
                    waiter.set_result(None)
            self._discovery_waiters.clear()

    def close(self) -> None:
        """Stop serving: tell peers, forget every row, subscription and meta."""
        if self.closed:
            return
        for peer in list(self._peers):
            self._send(peer, ["bye"])
        self.closed = True
        for pid in {row[1] for row in self.table.rows()} | set(self._subs_of_pid):
            process = self.runtime.process(pid)
            if process is not None:
                process.remove_exit_hook(self)
        self.table.clear()
        self.meta.clear()
        self._scope_subs.clear()
        self._key_subs.clear()
        self._subs.clear()
        self._subs_of_pid.clear()
        self._peers.clear()
        self._outbox.clear()
        self._discovering.clear()
        for waiter in self._discovery_waiters:
            if not waiter.done():
                waiter.set_exception(RuntimeError(f"registry {self.name!r} stopped"))
        self._discovery_waiters.clear()
        for _waiting, future in self._barriers.values():
            if not future.done():
                future.set_exception(RuntimeError(f"registry {self.name!r} stopped"))
        self._barriers.clear()
        self.node.detach_service(self.name)

    def _watch(self, process: Process) -> None:
        process.add_exit_hook(self, self._on_exit)

    def _on_exit(self, pid: Pid, reason: Any) -> None:
        rows = self.table.pop_pid(pid)
        if rows:
            self._publish_leaves(pid, rows)
            if self._peers:
                self._queue(["l", [[key, pid, tag] for key, _value, tag in rows]])
        refs = self._subs_of_pid.pop(pid, None)
        if refs:
            for ref in refs:
                self._drop_subscription(ref)

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
        if not self._quiet():
            self._publish_join(key, [(pid, value)])
        if self._peers:
            self._queue(["j", key, pid, value, tag])

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
        return True

    def local_holder(self, key: Any) -> Pid | None:
        """The oldest live local process holding `key`, or None."""
        runtime = self.runtime
        for pid in self.table.pids(key):
            if runtime.is_local(pid) and runtime.process(pid) is not None:
                return pid
        return None

    # -- subscriptions -------------------------------------------------------------------

    def subscribe(self, process: Process, key: Any = _SCOPE) -> Ref:
        """Subscribe `process` to every key (default) or to one key; return the ref."""
        ref = self.runtime.new_ref()
        sub = _Subscription(ref, key, process)
        self._subs[ref] = sub
        if key is _SCOPE:
            self._scope_subs[ref] = sub
        else:
            self._key_subs.setdefault(key, {})[ref] = sub
        self._subs_of_pid.setdefault(process.pid, set()).add(ref)
        self._watch(process)
        return ref

    def unsubscribe(self, ref: Any, caller: Process) -> bool:
        """End a subscription and flush its pending events from `caller`'s mailbox."""
        sub = self._subs.get(ref) if type(ref) is Ref else None
        if sub is None:
            return False
        self._drop_subscription(ref)
        refs = self._subs_of_pid.get(sub.process.pid)
        if refs is not None:
            refs.discard(ref)
            if not refs:
                del self._subs_of_pid[sub.process.pid]
        caller.flush(lambda msg: type(msg) in (Join, Leave, Update) and msg[0] == ref)
        return True

    def _drop_subscription(self, ref: Ref) -> None:
        sub = self._subs.pop(ref, None)
        if sub is None:
            return
        if sub.target is _SCOPE:
            del self._scope_subs[ref]
        else:
            subs = self._key_subs[sub.target]
            del subs[ref]
            if not subs:
                del self._key_subs[sub.target]

    # -- fan-out -------------------------------------------------------------------------

    def _subscribers(self, key: Any) -> Iterable[_Subscription]:
        yield from self._scope_subs.values()
        subs = self._key_subs.get(key)
        if subs:
            yield from reversed(subs.values())

    def _quiet(self) -> bool:
        """Nobody to tell: no subscriber and no listener (the common, fast case)."""
        return not (self._scope_subs or self._key_subs or self.listeners)

    def _publish_join(self, key: Any, entries: list[tuple[Pid, Any]]) -> None:
        if self._quiet():
            return
        for sub in self._subscribers(key):
            sub.process.deliver(Join(sub.ref, key, entries))
        if self.listeners:
            self._tell_listeners([Registered(self.name, key, pid, value) for pid, value in entries])

    def _publish_leave(self, key: Any, entries: list[tuple[Pid, Any]]) -> None:
        if self._quiet():
            return
        for sub in self._subscribers(key):
            sub.process.deliver(Leave(sub.ref, key, entries))
        if self.listeners:
            self._tell_listeners([Unregistered(self.name, key, pid) for pid, _value in entries])

    def _publish_update(self, key: Any, changes: list[tuple[Pid, Any, Any]]) -> None:
        if not (self._scope_subs or key in self._key_subs):
            return  # listeners never see updates
        for sub in self._subscribers(key):
            sub.process.deliver(Update(sub.ref, key, changes))

    def _publish_leaves(self, pid: Pid, rows: list[tuple[Any, Any, int]]) -> None:
        """One `Leave` per key for the rows a process lost (in its join order)."""
        if self._quiet():
            return
        for key, entries in _group_by_key(pid, ((key, value) for key, value, _tag in rows)).items():
            self._publish_leave(key, entries)

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
        message = ["ops", self._outbox]
        self._outbox = []
        self.node.broadcast_service(self.name, message, self._peers)

    def _send(self, peer: str, message: list[Any]) -> None:
        if self._outbox:
            self._flush()
        self.node.send_service(peer, self.name, message)

    def _local_rows(self) -> list[list[Any]]:
        """This node's rows grouped by pid, as ``sync`` carries them."""
        is_local = self.runtime.is_local
        by_pid: dict[Pid, list[list[Any]]] = {}
        for key, pid, value, tag in self.table.rows():
            if is_local(pid):
                rows = by_pid.get(pid)
                if rows is None:
                    by_pid[pid] = [[key, value, tag]]
                else:
                    rows.append([key, value, tag])
        return [[pid, rows] for pid, rows in by_pid.items()]

    # -- gossip: node callbacks -------------------------------------------------------------

    def peer_up(self, peer: str) -> None:
        """A node connection came up: ask whether it runs this scope."""
        if not self.closed:
            self._discover(peer)

    def peer_down(self, peer: str, reason: str) -> None:
        """A node connection was lost: its processes' rows leave."""
        self._discovered(peer)
        self._forget_peer(peer)

    def peer_absent(self, peer: str) -> None:
        """`peer`'s node does not run this scope (answer to a message we sent it)."""
        self._discovered(peer)

    def peer_message(self, peer: str, payload: Any) -> None:
        """Apply one message of the peer protocol; malformed input is logged and dropped."""
        if self.closed:
            return
        try:
            self._dispatch(peer, payload)
        except _Malformed as exc:
            log.warning("scope %r: dropped a malformed message from %s: %s", self.name, peer, exc)

    def _dispatch(self, peer: str, payload: Any) -> None:
        if type(payload) is not list or not payload or type(payload[0]) is not str:
            raise _Malformed(f"not a tagged list: {payload!r:.80}")
        kind = payload[0]
        if kind == "discover" or kind == "sync":
            self._discovered(peer)
        if kind == "discover":
            self._send(peer, ["sync", self._local_rows()])
            if peer not in self._peers:
                self._peers[peer] = set()
                self._send(peer, ["discover"])
        elif kind == "sync":
            if len(payload) != 2 or type(payload[1]) is not list:
                raise _Malformed("sync needs one list of rows")
            if peer not in self._peers:
                self._peers[peer] = set()
            self._apply_sync(peer, payload[1])
        elif kind == "ping":
            self._send(peer, ["pong", payload[1] if len(payload) == 2 else None])
        elif peer not in self._peers:
            return  # stale: from before the peer was lost, or from outside the overlay
        elif kind == "ops":
            if len(payload) != 2 or type(payload[1]) is not list:
                raise _Malformed("ops needs one list")
            for op in payload[1]:
                self._apply_op(peer, op)
        elif kind == "pong":
            self._pong(peer, payload[1] if len(payload) == 2 else None)
        elif kind == "bye":
            self._forget_peer(peer)
        else:
            raise _Malformed(f"unknown message kind {kind!r:.40}")

    # -- gossip: applying a peer's changes ------------------------------------------------

    def _check_pid(self, peer: str, pid: Any) -> Pid:
        if type(pid) is not Pid or pid.node != peer:
            raise _Malformed(f"{pid!r:.80} is not a pid of {peer}")
        return pid

    @staticmethod
    def _check_tag(tag: Any) -> int:
        if type(tag) is not int:
            raise _Malformed(f"tag {tag!r:.40} is not an int")
        return tag

    @staticmethod
    def _check_key(key: Any) -> Any:
        try:
            hash(key)
        except TypeError:
            raise _Malformed(f"key {key!r:.60} is not hashable") from None
        return key

    def _apply_op(self, peer: str, op: Any) -> None:
        if type(op) is not list or not op:
            raise _Malformed(f"op {op!r:.60} is not a tagged list")
        kind = op[0]
        if kind == "j" and len(op) == 5:
            _kind, key, pid, value, tag = op
            self._remote_join(peer, self._check_key(key), self._check_pid(peer, pid), value, self._check_tag(tag))
        elif kind == "l" and len(op) == 2 and type(op[1]) is list:
            self._remote_leave(peer, op[1])
        elif kind == "u" and len(op) == 4:
            _kind, key, pid, value = op
            self._remote_update(self._check_key(key), self._check_pid(peer, pid), value)
        else:
            raise _Malformed(f"unknown op {op!r:.60}")

    def _remote_join(self, peer: str, key: Any, pid: Pid, value: Any, tag: int) -> None:
        self.table.insert(key, pid, value, tag)
        self._peers[peer].add(pid)
        if not self._quiet():
            self._publish_join(key, [(pid, value)])

    def _remote_leave(self, peer: str, triples: list[Any]) -> None:
        removed: dict[Any, list[tuple[Pid, Any]]] = {}
        touched: set[Pid] = set()
        for triple in triples:
            if type(triple) is not list or len(triple) != 3:
                raise _Malformed(f"leave entry {triple!r:.60} is not [key, pid, tag]")
            key, pid, tag = triple
            pid = self._check_pid(peer, pid)
            value = self.table.pop(self._check_key(key), pid, self._check_tag(tag), _ABSENT)
            if value is not _ABSENT:
                removed.setdefault(key, []).append((pid, value))
                touched.add(pid)
        pids = self._peers[peer]
        for pid in touched:
            if not self.table.count_pid(pid):
                pids.discard(pid)
        for key, entries in removed.items():
            self._publish_leave(key, entries)

    def _remote_update(self, key: Any, pid: Pid, value: Any) -> None:
        changed = self.table.update(key, pid, value)
        if changed and (self._scope_subs or key in self._key_subs):
            self._publish_update(key, [(pid, old, value) for _tag, old in changed])

    def _apply_sync(self, peer: str, groups: list[Any]) -> None:
        """Make this node's view of `peer` equal to `groups` (its complete local rows)."""
        incoming: dict[Pid, dict[int, tuple[Any, Any]]] = {}
        for group in groups:
            if type(group) is not list or len(group) != 2 or type(group[1]) is not list:
                raise _Malformed(f"sync group {group!r:.60} is not [pid, rows]")
            pid = self._check_pid(peer, group[0])
            rows = incoming.setdefault(pid, {})
            for row in group[1]:
                if type(row) is not list or len(row) != 3:
                    raise _Malformed(f"sync row {row!r:.60} is not [key, value, tag]")
                key, value, tag = row
                rows[self._check_tag(tag)] = (self._check_key(key), value)
        known = self._peers[peer]
        leaves: dict[Any, list[tuple[Pid, Any]]] = {}
        updates: dict[Any, list[tuple[Pid, Any, Any]]] = {}
        joins: dict[Any, list[tuple[Pid, Any]]] = {}
        for pid in known - incoming.keys():
            for key, value, _tag in self.table.pop_pid(pid):
                leaves.setdefault(key, []).append((pid, value))
        table = self.table
        for pid, rows in incoming.items():
            for key, value, tag in table.pid_entries(pid):
                now = rows.get(tag)
                if now is None or not (now[0] is key or now[0] == key):
                    table.pop(key, pid, tag)
                    leaves.setdefault(key, []).append((pid, value))
                elif not (now[1] is value or now[1] == value):
                    table.update_row(key, pid, tag, now[1])
                    updates.setdefault(key, []).append((pid, value, now[1]))
                    del rows[tag]
                else:
                    del rows[tag]
            for tag, (key, value) in rows.items():
                table.insert(key, pid, value, tag)
                joins.setdefault(key, []).append((pid, value))
        self._peers[peer] = {pid for pid in incoming if table.count_pid(pid)}
        for key, entries in leaves.items():
            self._publish_leave(key, entries)
        for key, changes in updates.items():
            self._publish_update(key, changes)
        for key, entries in joins.items():
            self._publish_join(key, entries)

    def _forget_peer(self, peer: str) -> None:
        pids = self._peers.pop(peer, None)
        for waiting, future in list(self._barriers.values()):
            waiting.discard(peer)
            if not waiting and not future.done():
                future.set_result(None)
        if not pids:
            return
        for pid in pids:
            rows = self.table.pop_pid(pid)
            if rows:
                self._publish_leaves(pid, rows)

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
        """
        if self.closed:
            raise RuntimeError(f"registry {self.name!r} is stopped")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        if self._discovering:
            # A node just connected may run this scope without having said so yet;
            # wait until every connected node has answered our discover.
            waiter: asyncio.Future[None] = loop.create_future()
            self._discovery_waiters.append(waiter)
            await asyncio.wait_for(waiter, timeout)
        peers = set(self._peers)
        if not peers:
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

    # -- helpers for the façade ------------------------------------------------------------

    def live_local_process(self, pid: Pid) -> Process:
        """The live local process of `pid`; `NoProcess` if it is dead."""
        process = self.runtime.process(pid)
        if process is None:
            raise NoProcess(f"{pid!r} is not alive")
        return process
