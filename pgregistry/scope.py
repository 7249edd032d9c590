"""The scope server: one per registry name per node, the only writer of its table.

A scope server owns a `Table` of rows ``(key, pid, value, tag)`` — this node's view of
the scope — and everything that reacts to a change of it:

* it watches every local process that has a row or a subscription (an exit hook on the
  process), so a process's exit removes all of its rows at once;
* it fans every change out, in this order: whole-scope subscribers, then that key's
  subscribers (most recent subscription first), then listeners (one message per row
  per listener, to a locally registered name; a missing name is skipped);
* it keeps the node-local scope metadata.

Event shapes (DESIGN.md §4): ``Join(ref, key, [(pid, value)])``,
``Leave(ref, key, [(pid, value)])``, ``Update(ref, key, [(pid, old, new)])`` to
subscribers; ``Registered(scope, key, pid, value)`` and ``Unregistered(scope, key, pid)``
to listeners, which never see updates. One operation emits one event per key it
touched: a process exit emits one ``Leave`` per key listing all of that process's rows
under it.

Every write is a synchronous method that must run on the node's loop thread (the
`Registry` façade checks that and validates arguments); it mutates the table, emits
events and returns. Nothing awaits. Tags come from a per-scope counter, so ``(pid, tag)``
names a row uniquely; they never leave the scope server's API.
"""

from __future__ import annotations

import itertools
import logging
from typing import Any, Callable, Iterable

from types import ModuleType

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


class _Subscription:
    __slots__ = ("ref", "target", "process")

    def __init__(self, ref: Ref, target: Any, process: Process) -> None:
        self.ref = ref
        self.target = target
        self.process = process


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

    # -- lifecycle ---------------------------------------------------------------------

    def close(self) -> None:
        """Stop serving: forget every row, subscription and meta; later writes fail."""
        if self.closed:
            return
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
        self.node.detach_service(self.name)

    def _watch(self, process: Process) -> None:
        process.add_exit_hook(self, self._on_exit)

    def _on_exit(self, pid: Pid, reason: Any) -> None:
        rows = self.table.pop_pid(pid)
        if rows:
            self._publish_leaves(pid, rows)
        refs = self._subs_of_pid.pop(pid, None)
        if refs:
            for ref in refs:
                self._drop_subscription(ref)

    # -- writes --------------------------------------------------------------------------

    def join(self, key: Any, process: Process, value: Any) -> None:
        """Add a row for a live local process; `AlreadyRegistered` on a unique collision."""
        pid = process.pid
        if self.unique:
            holder = self.local_holder(key)
            if holder is not None:
                raise AlreadyRegistered(holder, key)
        if self.table.insert(key, pid, value, self._next_tag()):
            self._watch(process)
        if self._scope_subs or self._key_subs or self.listeners:
            self._publish_join(key, [(pid, value)])

    def leave_latest(self, key: Any, pid: Pid) -> bool:
        """Remove the most recently joined row of `pid` under `key`."""
        popped = self.table.pop_latest(key, pid)
        if popped is None:
            return False
        self._publish_leave(key, [(pid, popped[1])])
        return True

    def leave_local(self, key: Any) -> int:
        """Remove every row of every local process under `key`; one `Leave` lists them all."""
        is_local = self.runtime.is_local
        removed = []
        for pid, value, tag in self.table.entries(key):
            if is_local(pid):
                self.table.pop(key, pid, tag)
                removed.append((pid, value))
        if removed:
            self._publish_leave(key, removed)
        return len(removed)

    def leave_match(self, key: Any, pid: Pid, matcher: Matcher) -> int:
        """Remove the rows of `pid` under `key` that match; return how many."""
        popped = self.table.pop_match(key, pid, matcher)
        if popped:
            self._publish_leave(key, [(pid, value) for _tag, value in popped])
        return len(popped)

    def update(self, key: Any, pid: Pid, value: Any) -> bool:
        """Give every row of `pid` under `key` the new value; False if it has none."""
        changed = self.table.update(key, pid, value)
        if not changed:
            return False
        if self._scope_subs or key in self._key_subs:
            self._publish_update(key, [(pid, old, value) for _tag, old in changed])
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

    def _publish_join(self, key: Any, entries: list[tuple[Pid, Any]]) -> None:
        for sub in self._subscribers(key):
            sub.process.deliver(Join(sub.ref, key, entries))
        if self.listeners:
            self._tell_listeners([Registered(self.name, key, pid, value) for pid, value in entries])

    def _publish_leave(self, key: Any, entries: list[tuple[Pid, Any]]) -> None:
        for sub in self._subscribers(key):
            sub.process.deliver(Leave(sub.ref, key, entries))
        if self.listeners:
            self._tell_listeners([Unregistered(self.name, key, pid) for pid, _value in entries])

    def _publish_update(self, key: Any, changes: list[tuple[Pid, Any, Any]]) -> None:
        for sub in self._subscribers(key):
            sub.process.deliver(Update(sub.ref, key, changes))

    def _publish_leaves(self, pid: Pid, rows: list[tuple[Any, Any, int]]) -> None:
        """One `Leave` per key for the rows a process lost (in its join order)."""
        if not (self._scope_subs or self._key_subs or self.listeners):
            return
        by_key: dict[Any, list[tuple[Pid, Any]]] = {}
        for key, value, _tag in rows:
            entries = by_key.get(key)
            if entries is None:
                by_key[key] = [(pid, value)]
            else:
                entries.append((pid, value))
        for key, entries in by_key.items():
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

    async def sync(self, timeout: float) -> None:
        """Wait until every connected peer scope has applied what this server sent.

        A scope server exchanges changes only with the same scope on connected nodes;
        while the node has no peer connection there is nothing in flight, so this
        returns at once.
        """
        if self.closed:
            raise RuntimeError(f"registry {self.name!r} is stopped")

    # -- helpers for the façade ------------------------------------------------------------

    def live_local_process(self, pid: Pid) -> Process:
        """The live local process of `pid`; `NoProcess` if it is dead."""
        process = self.runtime.process(pid)
        if process is None:
            raise NoProcess(f"{pid!r} is not alive")
        return process
