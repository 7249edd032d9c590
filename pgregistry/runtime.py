"""The process table of one node: pids, refs, local names, spawn, exit and monitors (layer 2).

A `Runtime` makes the `Process` objects of `pgregistry.process` and owns them: it
hands out pids and refs (node id, serial, creation), spawns and adopts tasks, keeps
local names, routes sends, monitors and exit signals to local processes or, for other
nodes, to the `Router` the node layer installs. Each `Process` reaches back to it only
through the `ProcessTable` protocol, so this module sits above `process` and the
import points one way.
"""

from __future__ import annotations

import asyncio
import inspect
import threading
from collections.abc import Awaitable, Callable
from typing import Any

from .errors import AlreadyStarted, NoProcess, NotLocal
from .events import Down
from .naming import Via
from .process import Process, Router, _run, _tasks
from .terms import Counter, Pid, Ref, short_repr

__all__ = ["MAX_NAME_LENGTH", "Runtime"]

#: Longest local name accepted (Erlang's atom limit).
MAX_NAME_LENGTH = 255


def _checked_node_id(value: Any) -> str:
    if type(value) is not str or not value:
        raise TypeError(f"node_id must be a non-empty str, got {short_repr(value)}")
    return value


def _checked_creation(value: Any) -> int:
    if type(value) is not int or value < 0:
        raise TypeError(f"creation must be a non-negative int, got {short_repr(value)}")
    return value


class Runtime:
    """The process table of one node.

    ``node_id`` and ``creation`` may be changed until the first pid or ref is made.
    ``loop`` and ``loop_thread`` are set by the node when it starts; writes (`spawn`,
    `adopt`, `register_name`, `unregister_name`) from another thread, before the start
    or after `close` raise `RuntimeError`. ``router`` is None or a `Router`: without
    one, a send to another node's pid is dropped, a monitor of one gets
    ``Down(ref, pid, "noconnection")`` at once, and an exit signal to one does nothing.
    """

    __slots__ = (
        "_node_id",
        "_creation",
        "_frozen",
        "loop",
        "loop_thread",
        "router",
        "closed",
        "_procs",
        "_names",
        "_next_pid",
        "_next_ref",
    )

    loop: asyncio.AbstractEventLoop | None
    loop_thread: int | None
    router: Router | None
    closed: bool

    def __init__(self, node_id: str, creation: int = 0) -> None:
        self._node_id = _checked_node_id(node_id)
        self._creation = _checked_creation(creation)
        self._frozen = False
        self.loop = None
        self.loop_thread = None
        self.router = None
        self.closed = False
        self._procs: dict[Pid, Process] = {}
        self._names: dict[str, Process] = {}
        self._next_pid = Counter(1).next
        self._next_ref = Counter(1).next

    def __repr__(self) -> str:
        return f"<Runtime {self._node_id} creation={self._creation} processes={len(self._procs)}>"

    @property
    def node_id(self) -> str:
        return self._node_id

    @node_id.setter
    def node_id(self, value: str) -> None:
        self._check_unfrozen("node_id")
        self._node_id = _checked_node_id(value)

    @property
    def creation(self) -> int:
        return self._creation

    @creation.setter
    def creation(self, value: int) -> None:
        self._check_unfrozen("creation")
        self._creation = _checked_creation(value)

    def _check_unfrozen(self, what: str) -> None:
        # Pids and refs carry the node id and creation: once one exists, they are fixed.
        if self._frozen:
            raise RuntimeError(f"{what} cannot change once pids or refs have been made")

    def _check_writable(self, what: str) -> None:
        if self.closed:
            raise RuntimeError(f"{what}: the node has stopped")
        if threading.get_ident() != self.loop_thread:
            if self.loop_thread is None:
                raise RuntimeError(f"{what}: the node has not been started")
            raise RuntimeError(f"{what} must be called on the node's event loop thread")

    # -- identities -----------------------------------------------------------------

    def new_ref(self) -> Ref:
        """A new reference, unique in the cluster (node id, serial, creation)."""
        self._frozen = True
        return Ref(self._node_id, self._next_ref(), self._creation)

    def _new_pid(self) -> Pid:
        self._frozen = True
        return Pid(self._node_id, self._next_pid(), self._creation)

    def is_local(self, pid: Pid) -> bool:
        """True if `pid` names a process of this node and incarnation (alive or not)."""
        return pid.node == self._node_id and pid.creation == self._creation

    def is_remote(self, dest: Any) -> bool:
        """True if `dest` (a pid or a ``(name, node_id)`` tuple) lives on another node."""
        if type(dest) is Pid:
            return dest.node != self._node_id
        return dest[1] != self._node_id

    def process(self, pid: Pid) -> Process | None:
        """The live local process `pid`, or None."""
        return self._procs.get(pid)

    def __len__(self) -> int:
        return len(self._procs)

    def forget(self, process: Process) -> None:
        """`process` exited: it leaves the table and releases its local name."""
        self._procs.pop(process.pid, None)
        if process.name is not None and self._names.get(process.name) is process:
            del self._names[process.name]

    # -- processes ------------------------------------------------------------------

    def spawn(self, fn: Callable[..., Awaitable[Any]], /, *args: Any, **kwargs: Any) -> Pid:
        """Start ``fn(*args, **kwargs)`` as a new process and return its pid at once.

        The process is in the table (it can be sent messages, monitored, named) before
        its task first runs. `fn` must be an async callable: a non-callable raises
        `TypeError` here, a callable that returns no awaitable crashes the process with
        `TypeError`.
        """
        self._check_writable("spawn")
        if not callable(fn):
            hint = " (pass the async function, not a coroutine object)" if inspect.iscoroutine(fn) else ""
            raise TypeError(f"spawn: fn must be an async callable, got {short_repr(fn)}{hint}")
        pid = self._new_pid()
        proc = Process(self, pid)
        self._procs[pid] = proc
        assert self.loop is not None
        task = self.loop.create_task(_run(proc, fn, args, kwargs), name=f"pgregistry process {short_repr(pid)}")
        proc.task = task
        task.add_done_callback(proc._task_done)
        return pid

    def adopt(self, task: asyncio.Task) -> Process:
        """Make `task` (not a spawned process) a process of this runtime and return it.

        From now on `current_process` in `task` is this process; when it exits (an exit
        signal, the node stopping, or `task` finishing) the task reverts to the most
        recent still-alive process it was adopted as before, if any. The task itself is
        never cancelled by the runtime. Adopting a task already adopted here returns its
        process. A spawned process cannot be adopted (`RuntimeError`).
        """
        self._check_writable("adopt")
        if task.done():
            raise RuntimeError(f"adopt: {task!r} has finished")
        previous = _tasks.get(task)
        if previous is not None:
            if not previous.adopted:
                raise RuntimeError(f"adopt: the task is already the spawned process {short_repr(previous.pid)}")
            if previous.runtime is self:
                return previous
        proc = Process(self, self._new_pid(), adopted=True)
        proc.task = task
        proc._previous = previous
        self._procs[proc.pid] = proc
        _tasks[task] = proc
        task.add_done_callback(proc._task_done)
        return proc

    def exit(self, pid: Pid, reason: Any = "kill", sender: Pid | None = None) -> None:
        """Send the exit signal `reason` to `pid` on behalf of `sender`.

        ``"normal"`` is ignored unless `sender` is `pid` itself. A dead or unknown local
        pid is ignored; a pid of another node goes to the router (ignored without one).
        See `Process.signal_exit` for what the target does.
        """
        if type(pid) is not Pid:
            raise TypeError(f"exit: expected a Pid, got {short_repr(pid)}")
        if type(reason) is str and reason == "normal" and sender != pid:
            return
        proc = self._procs.get(pid)
        if proc is not None:
            proc.signal_exit(reason)
        elif pid.node != self._node_id and self.router is not None:
            self.router.exit_remote(pid, reason)

    def close(self, exclude: asyncio.Task | None = None) -> list[asyncio.Task]:
        """Refuse new processes and kill every process (reason ``"killed"``).

        Exit hooks run for each process. Spawned tasks are cancelled, except `exclude`
        (the task calling this, which must keep running); they are returned so that the
        caller can wait for them to unwind. Idempotent.
        """
        self.closed = True
        tasks: list[asyncio.Task] = []
        while self._procs:
            for proc in list(self._procs.values()):
                task = proc.task
                proc._finish("killed")
                if not proc.adopted and task is not None and task is not exclude and not task.done():
                    task.cancel()
                    tasks.append(task)
        return tasks

    # -- names ----------------------------------------------------------------------

    @staticmethod
    def check_name(name: Any) -> str:
        """Return `name` if it is a valid local name, else raise `TypeError`/`ValueError`."""
        if type(name) is not str:
            raise TypeError(f"a process name must be a str, got {short_repr(name)}")
        if not name or len(name) > MAX_NAME_LENGTH:
            raise ValueError(f"a process name must have 1 to {MAX_NAME_LENGTH} characters, got {short_repr(name)}")
        return name

    def register_name(self, name: str, pid: Pid) -> None:
        """Register the live local process `pid` under the local name `name`.

        Like ``erlang:register``: `AlreadyStarted` (``.pid`` the holder) if a process
        holds `name`; `ValueError` if `pid` already holds another name; `TypeError` or
        `ValueError` for a bad name; `TypeError` for a non-pid; `NotLocal` for a pid of
        another node; `NoProcess` for a dead pid. The name is released when the process
        exits.
        """
        self._check_writable("register_name")
        self.check_name(name)
        if type(pid) is not Pid:
            raise TypeError(f"register_name: expected a Pid, got {short_repr(pid)}")
        proc = self._procs.get(pid)
        if proc is None:
            if not self.is_local(pid):
                raise NotLocal(pid, self._node_id)
            raise NoProcess(f"register_name: {short_repr(pid)} is not alive")
        holder = self._names.get(name)
        if holder is not None:
            raise AlreadyStarted(holder.pid, name)
        if proc.name is not None:
            raise ValueError(f"register_name: {short_repr(pid)} is already registered as {short_repr(proc.name)}")
        self._names[name] = proc
        proc.name = name

    def unregister_name(self, name: str) -> None:
        """Release the local name `name`; nothing happens if no process holds it."""
        self._check_writable("unregister_name")
        self.check_name(name)
        proc = self._names.pop(name, None)
        if proc is not None:
            proc.name = None

    def whereis(self, name: str) -> Pid | None:
        """The pid registered under the local name `name`, or None. Any thread."""
        if type(name) is not str:
            raise TypeError(f"whereis: a process name must be a str, got {short_repr(name)}")
        proc = self._names.get(name)
        return None if proc is None else proc.pid

    # -- messages -------------------------------------------------------------------

    def resolve(self, dest: Any) -> Any:
        """Turn a destination into a pid (or a ``(name, node_id)`` of another node).

        `dest` is a `Pid`, a local name, a ``(name, node_id)`` tuple or a `Via`. An
        unregistered local name or a `Via` that resolves to None raises `NoProcess`;
        exceptions of ``Via.service.whereis_name`` propagate; anything else raises
        `TypeError`.
        """
        kind = type(dest)
        if kind is Pid:
            return dest
        if kind is str:
            pid = self.whereis(dest)
            if pid is None:
                raise NoProcess(f"no process is registered as {short_repr(dest)}")
            return pid
        if kind is tuple and len(dest) == 2 and type(dest[0]) is str and type(dest[1]) is str:
            if dest[1] != self._node_id:
                return dest
            pid = self.whereis(dest[0])
            if pid is None:
                raise NoProcess(f"no process is registered as {short_repr(dest[0])} on {dest[1]}")
            return pid
        if kind is Via:
            pid = dest.service.whereis_name(dest.key)
            if pid is None:
                raise NoProcess(f"no process is registered under {short_repr(dest, 200)}")
            return pid
        raise TypeError("a destination must be a Pid, a name, a (name, node_id) tuple or a Via, "
                        f"got {short_repr(dest)}")

    def send(self, dest: Any, msg: Any) -> None:
        """Send `msg` to `dest` (see `resolve`); never waits.

        To a dead pid: dropped silently. To another node: handed to the router, or
        dropped without one.
        """
        proc = self._procs.get(dest) if type(dest) is Pid else None
        if proc is not None:
            proc.deliver(msg)
            return
        target = self.resolve(dest)
        proc = self._procs.get(target)
        if proc is not None:
            proc.deliver(msg)
        elif self.router is not None and self.is_remote(target):
            self.router.send_remote(target, msg)

    # -- monitors -------------------------------------------------------------------

    def monitor(self, watcher: Process, target: Any, ref: Ref | None = None) -> Ref:
        """Make `watcher` monitor `target` (a pid, or ``(name, node_id)`` of another node).

        Returns the monitor's ref (a new one unless `ref` is given). A dead local target
        yields ``Down(ref, target, "noproc")`` at once; a remote one without a router
        ``"noconnection"``.
        """
        if ref is None:
            ref = self.new_ref()
        monitors = watcher._monitors
        if monitors is None:
            monitors = watcher._monitors = {}
        monitors[ref] = target
        proc = self._procs.get(target)
        if proc is not None:
            watchers = proc._monitored_by
            if watchers is None:
                watchers = proc._monitored_by = {}
            watchers[ref] = watcher.pid
        elif not self.is_remote(target):
            watcher.deliver_down(ref, target, "noproc")
        elif self.router is None:
            watcher.deliver_down(ref, target, "noconnection")
        else:
            self.router.monitor_remote(watcher.pid, ref, target)
        return ref

    def demonitor(self, watcher: Process, ref: Ref, flush: bool = True) -> bool:
        """Remove `watcher`'s monitor `ref`; True if it was active.

        No ``Down`` for `ref` reaches `watcher` afterwards; with `flush`, one already
        queued (the monitor had fired) is removed from the mailbox.
        """
        if type(ref) is not Ref:
            raise TypeError(f"demonitor: expected a Ref, got {short_repr(ref)}")
        monitors = watcher._monitors
        target = monitors.pop(ref, None) if monitors else None
        if target is None:
            if flush:
                watcher.flush(lambda msg: type(msg) is Down and msg.ref == ref)
            return False
        self.drop_monitor(ref, target)
        return True

    def drop_monitor(self, ref: Ref, target: Any) -> None:
        """Forget, on the target's side, the monitor `ref` on `target`."""
        proc = self._procs.get(target)
        if proc is not None:
            if proc._monitored_by:
                proc._monitored_by.pop(ref, None)
        elif self.router is not None and self.is_remote(target):
            self.router.demonitor_remote(ref, target)

    def notify_down(self, watcher: Pid, ref: Ref, pid: Pid, reason: Any) -> None:
        """Deliver ``Down(ref, pid, reason)`` to `watcher`, local or on another node."""
        proc = self._procs.get(watcher)
        if proc is not None:
            proc.deliver_down(ref, pid, reason)
        elif self.router is not None and watcher.node != self._node_id:
            self.router.down_remote(watcher, ref, pid, reason)
