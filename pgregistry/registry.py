"""`Registry`: the Elixir-Registry-shaped façade over a scope's table and server.

Reads (`lookup`, `match`, `select`, `count`, `meta`, …) go straight to the table and may
be called from any thread. Writes (`register`, `unregister`, `update_value`, `put_meta`,
…) are synchronous and must run on the node's event-loop thread; they validate every
argument *before* touching the table, so a write that raises changes nothing.

Semantics follow PgRegistry (docs/contract.md has every rule and the differences): `unregister` removes the caller's
most recent entry under a key; `unregister_name` removes every local entry under a key;
`keys` is distinct; `dispatch` passes pids; unique mode is per node; `whereis_name`,
`send` and via names resolve to the holder on the calling node only.

Group operations in the style of cpg: `join`/`leave` of several local pids, `leave_all`,
`count_pid`, `lookup_remote`, `pick` (one member: random, local, remote, closest,
furthest, oldest, newest or round_robin; random, oldest, newest and round_robin in O(1)
through the table's per-key index order, `Table.at`) and `via_group`, a `Via` resolved
by `pick` at each use.

Keys and values are terms (`pgregistry.terms`). Every method that takes a key (metadata
and via keys included) raises `TypeError` for one that is not a key term and
`ValueError` for one holding a NaN anywhere: a NaN is not equal to itself, so an entry
under it could never be found, unregistered or removed on a peer. Values may hold NaN;
a value that holds one is still the same value when a peer sends it again.
"""

from __future__ import annotations

import asyncio
import random
import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, Final

from ._table import Matcher
from .errors import AlreadyRegistered, AlreadyStarted, NoProcess, NotLocal
from .node import Node
from .process import Process, Via, current_process, task_process
from .process import _tasks as _PROCESS_OF_TASK
from .scope import ScopeServer
from .spec import canonical, check_match, check_spec
from .terms import KEY_SCALARS, VALUE_SCALARS, Pid, Ref, check_key, check_value, short_repr

__all__ = ["Registry"]

_NO_DEFAULT: Final = object()

# asyncio's map of running loop -> current task (a C-level dict on CPython). Writes run on
# the node's loop thread, so the node's loop is the running one and its entry is the
# calling task: reading it directly skips `get_running_loop`, which on Python 3.11 makes
# a getpid system call on every call. Where the map is absent or not kept up to date,
# `current_process` (the public path) decides.
_CURRENT_TASKS: Final = getattr(asyncio.tasks, "_current_tasks", None)
#: The same map when it is a plain dict (read directly by `Registry.register`), else an
#: empty one (then `register` finds no task and asks `_caller`).
_TASK_OF_LOOP: Final[dict[Any, Any]] = _CURRENT_TASKS if type(_CURRENT_TASKS) is dict else {}
_get_ident: Final = threading.get_ident
_MATCHER_CACHE_SIZE: Final = 256

PICK_MODES: Final = ("random", "local", "remote", "closest", "furthest", "oldest", "newest", "round_robin")
"""The values of `Registry.pick`'s ``how``."""
_SAMPLES: Final = 16  # random draws a filtered pick tries before it walks the group
_CURSORS_MIN: Final = 1024  # round-robin cursors kept before the first pruning
_random: Final = random.random


class _GroupNames:
    """The naming service of `Registry.via_group`: a name resolves to ``pick(key, how)``."""

    __slots__ = ("registry", "how")

    def __init__(self, registry: Registry, how: str) -> None:
        self.registry = registry
        self.how = how

    def whereis_name(self, key: Any) -> Pid | None:
        return self.registry.pick(key, self.how)

    def register_name(self, key: Any, pid: Pid, value: Any = None) -> bool:
        return self.registry.register_name(key, pid, value)

    def unregister_name(self, key: Any) -> None:
        self.registry.unregister_name(key)

    def __repr__(self) -> str:
        return f"<group of {self.registry!r}, {self.how}>"


class Registry:
    """A named scope of ``(key, pid, value)`` entries on one node, shared with its peers.

    Create one with ``await Registry.start(node, "name", keys="duplicate")``.

    A key is a key term without NaN (`TypeError` for a non-term, `ValueError` for a
    NaN anywhere in it, from every method taking a key); a value is any value term,
    NaN included. See the module docstring.
    """

    __slots__ = ("name", "keys_mode", "listeners", "node", "_runtime", "_scope", "_table",
                 "_matchers", "_loop_thread", "_cursors", "_cursors_limit", "_group_names",
                 "_loop", "_watchers", "_plain", "_next_tag", "_watch")

    def __init__(self, node: Node, name: str, scope: ScopeServer) -> None:
        self.name = name
        self.keys_mode = "unique" if scope.unique else "duplicate"
        self.listeners = scope.listeners
        self.node = node
        self._runtime = node.runtime
        self._scope = scope
        self._table = scope.table
        self._matchers: OrderedDict[Any, Matcher] = OrderedDict()
        self._loop_thread = node.loop_thread
        # For `register`'s inlined write (all fixed for the scope's life): the loop whose
        # current task is the caller, the scope's live "who else cares" dicts, whether the
        # scope is duplicate-keyed without listeners, its tag counter and exit watch.
        self._loop = node.runtime.loop
        self._watchers = scope.write_watchers
        self._plain = not scope.unique and not scope.listeners
        self._next_tag = scope.next_tag
        self._watch = scope.watch
        self._cursors: dict[Any, int] = {}  # round_robin: the next place per key
        self._cursors_limit = _CURSORS_MIN
        self._group_names = {how: _GroupNames(self, how) for how in PICK_MODES}

    @classmethod
    async def start(cls, node: Node, name: str, *, keys: str = "duplicate",
                    listeners: tuple[str, ...] | list[str] = (), partitions: int = 1) -> Registry:
        """Start the scope `name` on `node` and return its registry.

        `keys` is ``"duplicate"`` (process groups: any number of entries per key) or
        ``"unique"`` (at most one live local holder per key, per node). `listeners`
        are locally registered process names that receive `Registered`/`Unregistered`
        messages. `partitions` must be 1 (one table per scope). A bad option value
        raises `ValueError`, an unknown option `TypeError`, a scope name already
        running on the node `AlreadyStarted`.
        """
        if not isinstance(node, Node):
            raise TypeError(f"node must be a pgregistry Node, got {short_repr(node, 60)}")
        if type(name) is not str or not name:
            raise TypeError(f"the registry name must be a non-empty str, got {short_repr(name, 60)}")
        if keys not in ("duplicate", "unique"):
            raise ValueError(f'keys must be "duplicate" or "unique", got {short_repr(keys, 60)}')
        if type(partitions) is not int or partitions != 1:
            extra = (" (pgregistry keeps one table per scope; start several registries to split "
                     "the load)" if type(partitions) is int and partitions > 1 else "")
            raise ValueError(f"partitions must be 1, got partitions={short_repr(partitions, 60)}{extra}")
        if type(listeners) not in (tuple, list) or not all(type(n) is str and n for n in listeners):
            raise ValueError("listeners must be a list of registered process names (str), "
                             f"got {short_repr(listeners, 60)}")
        node.require_loop_thread("Registry.start")
        existing = node.service(name)
        if existing is not None:
            raise AlreadyStarted(existing, name)
        scope = ScopeServer(node, name, unique=keys == "unique", listeners=tuple(listeners))
        node.attach_service(name, scope)
        scope.start()
        return cls(node, name, scope)

    async def stop(self) -> None:
        """Stop the scope on this node: its entries, subscriptions and metadata are gone.

        Waits for nothing (peers drop this node's entries when they hear of it).
        `RuntimeError` off the node's loop thread or if the registry is already stopped.
        """
        self._check_thread("stop")
        self._scope.close()

    def __repr__(self) -> str:
        return f"<Registry {self.name!r} {self.keys_mode} on {self.node.id} with {len(self._table)} entries>"

    def stat(self) -> dict[str, Any]:
        """Sizes and counters of the scope on this node, for status and metrics (O(1)):
        ``rows``, ``peers``, ``subscribers``, sync rounds under way, queued ops, ... (the
        scope server's `pgregistry.scope.ScopeServer.stat`)."""
        return self._scope.stat()

    # -- guards -----------------------------------------------------------------------------

    def _check_thread(self, what: str) -> None:
        if threading.get_ident() != self._loop_thread:
            raise RuntimeError(f"Registry.{what} must be called on the node's event-loop thread "
                               "(reads may run anywhere)")
        if self._scope.closed:
            raise RuntimeError(f"registry {self.name!r} is stopped")

    def _caller(self, what: str) -> Process:
        self._check_thread(what)
        process = None
        if type(_CURRENT_TASKS) is dict:
            task = _CURRENT_TASKS.get(self._runtime.loop)
            if task is not None:
                process = task_process(task)
        if process is None:
            process = current_process()
        if process.runtime is not self._runtime:
            raise NotLocal(process.pid, self.node.id)
        return process

    def _local_pid(self, pid: Any) -> Pid:
        if type(pid) is not Pid:
            raise TypeError(f"pid must be a Pid, got {short_repr(pid, 60)}")
        if not self._runtime.is_local(pid):
            raise NotLocal(pid, self.node.id)
        return pid

    def _pid_list(self, pids: Any, what: str) -> list[Pid]:
        """`pids` (a `Pid`, or a list or tuple of them) as a list of local pids."""
        if type(pids) is Pid:
            pids = [pids]
        elif type(pids) not in (list, tuple):
            raise TypeError(f"Registry.{what} takes a Pid or a list or tuple of pids, got {short_repr(pids, 60)}")
        return [self._local_pid(pid) for pid in pids]

    def _require_unique(self, what: str) -> None:
        if self.keys_mode != "unique":
            raise ValueError(f"Registry.{what} needs keys='unique'; {self.name!r} is a duplicate registry")

    def _matcher(self, kind: str, spec: Any, build: Callable[[], Any]) -> Matcher:
        try:
            cache_key = (kind, canonical(spec))
            matcher = self._matchers.get(cache_key)
        except TypeError:  # an unhashable non-term inside the spec: let validation name it
            return self._scope.Matcher(build())
        if matcher is None:
            matcher = self._scope.Matcher(build())
            self._matchers[cache_key] = matcher
            if len(self._matchers) > _MATCHER_CACHE_SIZE:
                self._matchers.popitem(last=False)
        return matcher

    def _value_matcher(self, pattern: Any, guards: Any) -> Matcher:
        return self._matcher("match", (pattern, guards), lambda: (check_match(pattern, guards),))

    # -- writes -----------------------------------------------------------------------------

    def register(self, key: Any, value: Any = None) -> Pid:
        """Register the calling process under `key` with `value`; return its pid.

        Duplicate mode always adds an entry (the same process may register a key many
        times). Unique mode raises `AlreadyRegistered(holder)` if a live process of this
        node holds `key` (the caller included). `TypeError` if `key` is not a key term
        or `value` not a value term; `ValueError` if `key` holds a NaN.
        """
        # The write path of every registration: its checks are inlined (each Python call
        # here costs as much as the table insert); anything unusual takes `_caller`.
        process = None
        if _get_ident() == self._loop_thread:
            task = _TASK_OF_LOOP.get(self._loop)
            if task is not None:
                process = _PROCESS_OF_TASK.get(task)
        if process is None or process.runtime is not self._runtime or self._scope.closed:
            process = self._caller("register")
        if type(key) is not str and type(key) not in KEY_SCALARS:
            check_key(key)
        if type(value) is not int and type(value) not in VALUE_SCALARS:
            check_value(value)
        subs, key_subs, peers, sending = self._watchers
        if subs or key_subs or peers or sending or not self._plain:
            self._scope.join(key, process, value)
            return process.pid
        # `ScopeServer.join` when nobody listens, no peer gossips and no round is being
        # sent (the table insert and the exit watch are all it does then), inlined
        pid = process.pid
        if self._table.insert(key, pid, value, self._next_tag()):
            self._watch(process)
        return pid

    def register_name(self, key: Any, pid: Pid, value: Any = None) -> bool:
        """Register any live local process under `key`; False on a unique collision.

        `TypeError` for a non-pid, `NotLocal` for a pid of another node, `NoProcess`
        for a dead one.
        """
        self._check_thread("register_name")
        self._local_pid(pid)
        check_key(key)
        check_value(value)
        process = self._scope.live_local_process(pid)
        if self._scope.unique and self._scope.local_holder(key) is not None:
            return False
        self._scope.join(key, process, value)
        return True

    def unregister(self, key: Any) -> None:
        """Remove the calling process's most recent entry under `key` (if any)."""
        process = self._caller("unregister")
        check_key(key)
        self._scope.leave_latest(key, process.pid)

    def unregister_name(self, key: Any) -> None:
        """Remove every entry under `key` of every process of this node."""
        self._check_thread("unregister_name")
        check_key(key)
        self._scope.leave_local(key)

    def update_value(self, key: Any, value: Any, pid: Pid | None = None) -> bool:
        """Set the value of every entry of `pid` (default: the caller) under `key`.

        The updated entries move to the end of the key's order. Returns False, changing
        nothing, if `pid` has no entry under `key`.
        """
        if pid is None:
            pid = self._caller("update_value").pid
        else:
            self._check_thread("update_value")
            self._local_pid(pid)
        check_key(key)
        check_value(value)
        return self._scope.update(key, pid, value)

    def unregister_match(self, key: Any, pattern: Any, guards: Any = ()) -> int:
        """Remove the caller's entries under `key` whose value matches; return how many."""
        process = self._caller("unregister_match")
        check_key(key)
        return self._scope.leave_match(key, process.pid, self._value_matcher(pattern, guards))

    def join(self, key: Any, pids: Any, value: Any = None) -> None:
        """Register each of `pids` (live local processes) under `key` with `value`.

        `pids` is a `Pid` or a list or tuple of them (a pid listed twice joins twice);
        every pid is checked before anything changes: `TypeError` for a non-pid,
        `NotLocal` for another node's, `NoProcess` for a dead one. In a unique registry
        `pids` may name one pid only (`ValueError` otherwise), which then joins like
        `register_name`, except that a collision raises `AlreadyRegistered(holder)`.
        """
        self._check_thread("join")
        check_key(key)
        check_value(value)
        wanted = self._pid_list(pids, "join")
        processes = [self._scope.live_local_process(pid) for pid in wanted]
        if self._scope.unique:
            if len(processes) > 1:
                raise ValueError(f"Registry.join of {len(processes)} pids in the unique registry {self.name!r}: "
                                 "a unique key has one holder per node")
            holder = self._scope.local_holder(key) if processes else None
            if holder is not None:
                raise AlreadyRegistered(holder, key)
        for process in processes:
            self._scope.join(key, process, value)

    def leave(self, key: Any, pids: Any) -> int:
        """Remove the most recent entry under `key` of each of `pids`; return how many went.

        `pids` is a `Pid` or a list or tuple of local pids (dead ones included; a pid
        listed twice loses two entries); all are checked first (`TypeError`,
        `NotLocal`). A pid without an entry under `key` removes nothing.
        """
        self._check_thread("leave")
        check_key(key)
        removed = 0
        for pid in self._pid_list(pids, "leave"):
            if self._scope.leave_latest(key, pid):
                removed += 1
        return removed

    def leave_all(self) -> int:
        """Remove every entry of the calling process, under every key; return how many."""
        process = self._caller("leave_all")
        return self._scope.leave_pid(process.pid)

    def put_meta(self, key: Any, value: Any) -> None:
        """Set node-local scope metadata `key` (a key term) to `value` (any object)."""
        self._check_thread("put_meta")
        check_key(key, "meta key")
        self._scope.meta[key] = value

    def delete_meta(self, key: Any) -> None:
        """Remove metadata `key`; nothing happens if it is absent."""
        self._check_thread("delete_meta")
        check_key(key, "meta key")
        self._scope.meta.pop(key, None)

    # -- via names ----------------------------------------------------------------------------

    def whereis_name(self, key: Any) -> Pid | None:
        """The local holder of `key` (unique mode only; `ValueError` otherwise), or None."""
        self._require_unique("whereis_name")
        check_key(key)
        return self._scope.local_holder(key)

    def send(self, key: Any, msg: Any) -> Pid:
        """Send `msg` to the local holder of `key` and return its pid (unique mode only).

        `NoProcess` if no process of this node holds `key`. Like a write, it must run on
        the node's loop thread (delivery wakes the receiver): `RuntimeError` otherwise.
        """
        self._check_thread("send")
        pid = self.whereis_name(key)
        if pid is None:
            raise NoProcess(f"no process of {self.node.id} is registered under {short_repr(key)} in {self.name!r}")
        process = self._runtime.process(pid)
        if process is not None:
            process.deliver(msg)
        return pid

    def via(self, key: Any, value: Any = None) -> Via:
        """A name for `Server.start`, `call`, `cast` and `send` resolved by this registry."""
        check_key(key)
        check_value(value)
        return Via(self, key, value)

    def via_group(self, key: Any, how: str = "random") -> Via:
        """A name for `send`, `call` and `cast` that resolves to ``pick(key, how)`` at each use.

        Any registry (duplicate or unique). A use that picks nobody raises `NoProcess`
        (`cast` drops the message). Two `via_group` names are equal when their registry,
        `how` and `key` are; never equal to ``via(key)``. As ``name=`` of `Server.start`
        it registers the new server like `register_name`, and only if the group is
        empty (the start refuses a name that resolves to a process).
        """
        self._check_how(how)
        check_key(key)
        return Via(self._group_names[how], key)

    # -- groups --------------------------------------------------------------------------------

    @staticmethod
    def _check_how(how: Any) -> None:
        if type(how) is not str or how not in PICK_MODES:
            raise ValueError(f"how must be one of {', '.join(PICK_MODES)}; got {short_repr(how, 60)}")

    def pick(self, key: Any, how: str = "random", exclude: Any = ()) -> Pid | None:
        """One member of the group `key` (every node's entries), or None if there is none.

        `how`: ``"random"`` (uniform over entries: a pid with two entries is twice as
        likely), ``"local"``/``"remote"`` (uniform over this node's / other nodes'
        entries), ``"closest"`` (local if any, else remote), ``"furthest"`` (remote if
        any, else local), ``"oldest"``/``"newest"`` (first/last in this node's order of
        the key's entries, as `lookup` lists them), ``"round_robin"`` (cycles through
        the entries: see docs/contract.md). `ValueError` for another `how`. `exclude`
        is a collection of pids (a list, tuple, set or frozenset) whose entries are
        skipped. random, oldest, newest and round_robin take O(1) without `exclude`.
        """
        table = self._table
        try:
            n = table.count_key(key)
        except TypeError:  # unhashable: say which rule the key breaks
            check_key(key)
            raise
        try:
            known = how in self._group_names
        except TypeError:  # unhashable
            known = False
        if not known:
            self._check_how(how)
        if type(exclude) not in (list, tuple, set, frozenset):
            raise TypeError(f"exclude must be a list, tuple, set or frozenset of pids, "
                            f"got {short_repr(exclude, 60)}")
        if exclude:
            for pid in exclude:
                if type(pid) is not Pid:
                    raise TypeError(f"exclude must hold pids, got {short_repr(pid, 60)}")
        if not n:
            check_key(key)
            return None
        if not exclude:
            entry = None
            if how == "random":
                entry = table.at(key, int(_random() * n))
            elif how == "oldest":
                entry = table.first(key)
            elif how == "newest":
                entry = table.last(key)
            elif how == "round_robin":
                cursors = self._cursors
                place = cursors.get(key, 0) % n
                entry = table.at(key, place)
                if entry is not None:
                    if len(cursors) >= self._cursors_limit:
                        self._prune_cursors()
                        cursors = self._cursors
                    cursors[key] = place + 1
                    return entry[0]
            if entry is not None:
                return entry[0]
            # a filtered pick, or the group changed under a read from another thread
        return self._pick_slow(key, how, frozenset(exclude), n)

    def _pick_slow(self, key: Any, how: str, exclude: frozenset[Pid], n: int) -> Pid | None:
        table = self._table
        if how == "round_robin":
            return self._round_robin(key, n, exclude)
        if how == "oldest" or how == "newest":
            entry = table.first(key) if how == "oldest" else table.last(key)
            if entry is not None and entry[0] not in exclude:
                return entry[0]
            pids = table.pids(key)
            for pid in (pids if how == "oldest" else reversed(pids)):
                if pid not in exclude:
                    return pid
            return None
        is_local = self._runtime.is_local
        want = None if how == "random" else how in ("local", "closest")
        # A few random draws first: accepted draws are uniform over the wanted entries,
        # and a group that is mostly of the wanted kind is never walked.
        for _ in range(_SAMPLES):
            entry = table.at(key, int(_random() * n))
            if entry is None:
                break
            pid = entry[0]
            if pid not in exclude and (want is None or is_local(pid) is want):
                return pid
        pids = [pid for pid in table.pids(key) if pid not in exclude]
        if want is not None:
            wanted = [pid for pid in pids if is_local(pid) is want]
            if wanted or how in ("local", "remote"):
                pids = wanted
        return random.choice(pids) if pids else None

    def _round_robin(self, key: Any, n: int, exclude: frozenset[Pid]) -> Pid | None:
        """The next entry of `key`'s index order after the last one picked here."""
        cursors = self._cursors
        start = cursors.get(key, 0)
        table = self._table
        for step in range(n if exclude else 1):
            place = (start + step) % n
            entry = table.at(key, place)
            if entry is None:  # the group shrank under a read from another thread
                break
            if entry[0] not in exclude:
                if len(cursors) >= self._cursors_limit:
                    self._prune_cursors()
                    cursors = self._cursors
                cursors[key] = place + 1
                return entry[0]
        else:
            return None  # every entry is excluded
        # the group shrank under a read from another thread: go round again with its new size
        n = table.count_key(key)
        return self._round_robin(key, n, exclude) if n else None

    def _prune_cursors(self) -> None:
        """Forget the round-robin places of keys that have no entry left (amortized O(1))."""
        table = self._table
        self._cursors = {key: place for key, place in self._cursors.items() if key in table}
        self._cursors_limit = max(_CURSORS_MIN, 2 * len(self._cursors))

    def lookup_remote(self, key: Any) -> list[tuple[Pid, Any]]:
        """Like `lookup`, only the entries of other nodes' processes."""
        is_local = self._runtime.is_local
        return [entry for entry in self.lookup(key) if not is_local(entry[0])]

    def count_pid(self, key: Any, pid: Pid) -> int:
        """How many entries `pid` (any node's) has under `key`."""
        if type(pid) is not Pid:
            raise TypeError(f"pid must be a Pid, got {short_repr(pid, 60)}")
        check_key(key)
        return len(self._table.values(key, pid))

    # -- reads -------------------------------------------------------------------------------

    def lookup(self, key: Any) -> list[tuple[Pid, Any]]:
        """``[(pid, value)]`` under `key`, every node's entries, in insertion order."""
        try:
            entries = self._table.lookup(key)
        except TypeError:  # unhashable: say which rule the key breaks
            check_key(key)
            raise
        if not entries:
            check_key(key)
        return entries

    def lookup_local(self, key: Any) -> list[tuple[Pid, Any]]:
        """Like `lookup`, only the entries of this node's processes."""
        is_local = self._runtime.is_local
        return [entry for entry in self.lookup(key) if is_local(entry[0])]

    def values(self, key: Any, pid: Pid) -> list[Any]:
        """The values of `pid`'s entries under `key`, in insertion order."""
        if type(pid) is not Pid:
            raise TypeError(f"pid must be a Pid, got {short_repr(pid, 60)}")
        check_key(key)
        return self._table.values(key, pid)

    def keys(self, pid: Pid) -> list[Any]:
        """The distinct keys under which `pid` has an entry."""
        if type(pid) is not Pid:
            raise TypeError(f"pid must be a Pid, got {short_repr(pid, 60)}")
        return self._table.keys(pid)

    def which_groups(self) -> list[Any]:
        """Every key that has at least one entry."""
        return self._table.groups()

    def count(self) -> int:
        """The number of entries, every node's included."""
        return len(self._table)

    def match(self, key: Any, pattern: Any, guards: Any = ()) -> list[tuple[Pid, Any]]:
        """``[(pid, value)]`` under `key` whose value matches `pattern` and `guards`."""
        check_key(key)
        return self._table.match(key, self._value_matcher(pattern, guards))

    def count_match(self, key: Any, pattern: Any, guards: Any = ()) -> int:
        """How many entries under `key` match `pattern` and `guards`."""
        check_key(key)
        return self._table.count_match(key, self._value_matcher(pattern, guards))

    def select(self, spec: Any) -> list[Any]:
        """Evaluate a match spec ``[(head, guards, body)]`` over every entry."""
        return self._table.select(self._matcher("select", spec, lambda: check_spec(spec)))

    def count_select(self, spec: Any) -> int:
        """How many entries' body result ``is True``."""
        return self._table.count_select(self._matcher("select", spec, lambda: check_spec(spec)))

    def dispatch(self, key: Any, fn: Callable[[list[Pid]], Any]) -> None:
        """Call ``fn(pids)`` with one pid per entry under `key`; not called if there is none."""
        if not callable(fn):
            raise TypeError(f"dispatch needs a callable, got {short_repr(fn, 60)}")
        check_key(key)
        pids = self._table.pids(key)
        if pids:
            fn(pids)

    def meta(self, key: Any, default: Any = _NO_DEFAULT) -> Any:
        """Node-local metadata `key`; `default` if absent, else `KeyError`."""
        check_key(key, "meta key")
        try:
            return self._scope.meta[key]
        except KeyError:
            if default is _NO_DEFAULT:
                raise KeyError(key) from None
            return default

    # -- subscriptions -----------------------------------------------------------------------

    def monitor_scope(self) -> tuple[Ref, dict[Any, list[tuple[Pid, Any]]]]:
        """Subscribe the caller to every change; return ``(ref, snapshot)``.

        The caller then receives `Join`, `Leave` and `Update` events carrying `ref`.
        Applying the snapshot and then the events gives exactly the registry's view.
        """
        process = self._caller("monitor_scope")
        return self._scope.subscribe(process), self._table.snapshot()

    def monitor(self, key: Any) -> tuple[Ref, list[tuple[Pid, Any]]]:
        """Subscribe the caller to changes of `key`; return ``(ref, current entries)``."""
        process = self._caller("monitor")
        check_key(key)
        return self._scope.subscribe(process, key), self._table.lookup(key)

    def demonitor(self, ref: Ref) -> bool:
        """End a subscription and drop its events still in the caller's mailbox.

        Returns False if `ref` is not an active subscription of this registry.
        """
        process = self._caller("demonitor")
        return self._scope.unsubscribe(ref, process)

    async def sync(self, timeout: float = 5.0) -> None:
        """Return once every connected peer has applied what this node sent before the call.

        With no connected peer there is nothing to wait for and it returns at once.
        Raises `TimeoutError` if the peers do not confirm within `timeout` seconds, and
        `errors.NotReplicated`, once everything else is applied, naming the entries this
        node could not send since the last such report: a value mutated after it was
        registered into something that is not a term, or rows larger than a peer's
        frame limit. Peers do not hold those entries; the others were not held up.
        Cancellation abandons the wait (peers still apply what was sent). `ValueError`
        for a negative `timeout`; `RuntimeError` off the node's loop thread or once the
        registry is stopped.
        """
        if type(timeout) not in (int, float) or timeout < 0:
            raise ValueError(f"timeout must be a non-negative number, got {short_repr(timeout, 60)}")
        self._check_thread("sync")
        await self._scope.sync(timeout)
