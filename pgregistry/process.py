"""Processes: asyncio tasks with a mailbox, identified by a `Pid` (layer 2).

The model, in brief:

* A **process** is an asyncio task plus a mailbox (a deque and at most one waiter
  future). ``Runtime.spawn`` (`pgregistry.runtime`) makes one from an async callable;
  ``Runtime.adopt`` turns an existing task (a node's "main" task) into one. Every
  process belongs to one runtime, the per-node process table, which it reaches through
  the `ProcessTable` protocol, and runs on that node's event loop.
* The calling process is found from the running task (`current_process`), never from a
  context variable, so a plain task created by a process is *not* that process.
* Messages to local processes are any Python objects. Local delivery appends to the
  mailbox and wakes the waiter; `receive` pops in arrival order. A message to a pid of
  another node goes to the runtime's ``router`` (installed by the node layer, see
  `Router`), which carries it as a term (a non-term raises `TypeError` at the ``send``);
  with no router it is dropped. Two runtimes in one event loop never deliver to each
  other directly.
* A process **exits** once: its function returns (reason ``"normal"``), raises (the
  exception object, logged with its traceback), its task is cancelled (``"killed"``), or
  it gets an exit signal `exit(pid, reason)`. On exit, in this order: the process leaves
  the table and releases its local name, its exit hooks run (in insertion order, each
  once), the monitors it holds are dropped, its watchers get ``Down(ref, pid, reason)``,
  and its mailbox is discarded.
* ``exit(pid, "kill")`` finishes the process at once (reason ``"killed"``) and cancels its
  task; no code of it runs before its exit is complete. Any other reason (except
  ``"normal"`` from another process, which is ignored, as in Erlang) is recorded in
  `Process.exit_request` and delivered as a cancellation, so the process may clean up (a
  `Server` runs ``terminate``); it then exits with that reason. Adopted processes do
  not own their task: an exit signal finishes them without cancelling the task.
* Monitors: ``monitor(pid)`` returns a `Ref`; the watcher later gets
  ``Down(ref, pid, reason)`` unless it calls `demonitor` first. Monitoring a dead pid
  yields ``"noproc"`` at once, a pid of an unreachable node ``"noconnection"``.
* Calls (`pgregistry.server.call`) wait on a future registered in the caller under the
  call's ref (`Process.expect_reply`): a `Reply` or the ``Down`` for that ref resolves it
  instead of entering the mailbox, and a `Reply` nobody waits for is dropped.

Writes to a runtime (spawn, names, adopt) must happen on the node's loop thread;
`whereis` and `process` may be called from any thread.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Hashable
from typing import Any, NamedTuple, Protocol

from .errors import NoProcess
from .events import Down
from .naming import NamingService, Via
from .terms import Pid, Ref, short_repr

__all__ = [
    "Process",
    "ProcessTable",
    "Router",
    "NamingService",
    "Via",
    "Call",
    "Cast",
    "Reply",
    "current_process",
    "task_process",
    "self",
    "send",
    "receive",
    "monitor",
    "demonitor",
    "exit",
]

logger = logging.getLogger("pgregistry.process")

_NOT_A_PROCESS = (
    "this task is not a pgregistry process: run the code in a process with "
    "node.spawn(fn, ...), or inside `async with node:` (or after `await node.start()`)"
)

# Every live process, by the task it runs in. Module-level because `current_process`
# does not know which runtime the calling task belongs to.
_tasks: dict[asyncio.Task, Process] = {}


def _fast_current_task() -> Callable[[], asyncio.Task | None]:
    """`asyncio.current_task` without its Python-level wrapper where that is safe.

    Every registry write asks for the calling task, so this is on the hot path. From
    Python 3.12 `asyncio.current_task` is C already. On 3.11 it is a Python function
    reading ``asyncio.tasks._current_tasks`` (a dict kept by the C task
    implementation) for the running loop; reading it directly saves about a third of
    a microsecond. If that private dict is missing, fall back to the public function.
    """
    current = asyncio.current_task
    table = getattr(asyncio.tasks, "_current_tasks", None)
    if isinstance(current, type(len)) or not isinstance(table, dict):
        return current
    get_running_loop = asyncio.get_running_loop
    get = table.get

    def current_task() -> asyncio.Task | None:
        return get(get_running_loop())

    return current_task


_current_task = _fast_current_task()


# The three messages of a call (`pgregistry.server.call`): they live here, below the
# server, because the node layer carries them between nodes.


class Call(NamedTuple):
    """A synchronous request: answer ``Reply(ref, value)`` to ``caller``."""

    ref: Ref
    caller: Pid
    request: Any


class Cast(NamedTuple):
    """An asynchronous request for ``handle_cast``."""

    msg: Any


class Reply(NamedTuple):
    """The answer to a call: sent to the caller, consumed by its pending future.

    A `Reply` never enters a mailbox: if nobody waits for ``ref`` any more (the call
    timed out or was cancelled) it is dropped.
    """

    ref: Ref
    value: Any


class Router(Protocol):
    """What the node layer installs as `Runtime.router` to reach other nodes.

    ``dest`` of `send_remote` is a pid of another node or a ``(name, node_id)`` tuple;
    ``pid`` of `monitor_remote` and `demonitor_remote` likewise.

    * `send_remote` raises `TypeError` for a message that cannot cross the network (not a
      term), whether or not the node is connected; otherwise it never raises.
    * `monitor_remote` is called after the monitor was recorded in the watcher (so
      `Process.monitor_target` knows it); the router later calls
      ``Process.deliver_down(ref, target, reason)`` on the watcher, at once if the node is
      not reachable (``"noconnection"``).
    * `down_remote` reports the exit of a local process to a watcher on another node
      (the remote half of a monitor set up by the peer); it is called from inside an
      exit and must not raise.
    * `demonitor_remote` and `exit_remote` must not raise either.
    * `call_remote` starts a call (`pgregistry.server.call`) to `dest` on another node
      in one step: it records the monitor `ref` in `caller` (`Process.add_monitor`) and
      sends ``Call(ref, caller.pid, request)``; the remote node monitors `dest` for the
      caller. A `Down` (``"noconnection"``, ``"noproc"``) is delivered as for
      `monitor_remote`; `TypeError` if `request` is not a term.
    """

    def send_remote(self, dest: Any, msg: Any) -> None: ...

    def monitor_remote(self, watcher: Pid, ref: Ref, pid: Any) -> None: ...

    def demonitor_remote(self, ref: Ref, pid: Any) -> None: ...

    def exit_remote(self, pid: Pid, reason: Any) -> None: ...

    def down_remote(self, watcher: Pid, ref: Ref, pid: Pid, reason: Any) -> None: ...

    def call_remote(self, caller: Process, ref: Ref, dest: Any, request: Any) -> None: ...


class ProcessTable(Protocol):
    """What processes and their callers need of the table that owns them.

    Implemented by `pgregistry.runtime.Runtime`, the per-node process table, which sits
    above this module and hands itself to every `Process` it makes.
    """

    loop: asyncio.AbstractEventLoop | None
    router: Router | None

    def new_ref(self) -> Ref: ...

    def is_remote(self, dest: Any) -> bool: ...

    def resolve(self, dest: Any) -> Any: ...

    def send(self, dest: Any, msg: Any) -> None: ...

    def monitor(self, watcher: Process, target: Any, ref: Ref | None = None) -> Ref: ...

    def demonitor(self, watcher: Process, ref: Ref, flush: bool = True) -> bool: ...

    def exit(self, pid: Pid, reason: Any = "kill", sender: Pid | None = None) -> None: ...

    def forget(self, process: Process) -> None:
        """`process` exited: it leaves the table and releases its local name."""

    def drop_monitor(self, ref: Ref, target: Any) -> None:
        """Forget, on the target's side, the monitor `ref` on `target`."""

    def notify_down(self, watcher: Pid, ref: Ref, pid: Pid, reason: Any) -> None:
        """Deliver ``Down(ref, pid, reason)`` to `watcher`, local or on another node."""


def _wake(waiter: asyncio.Future) -> None:
    if not waiter.done():
        waiter.set_result(None)


def _log_crash(pid: Pid, exc: BaseException) -> None:
    logger.error("process %s crashed: %s", short_repr(pid), short_repr(exc, 200), exc_info=exc)


def _exited_error(pid: Any, reason: Any) -> NoProcess:
    """The `NoProcess` a call gets when its destination is gone."""
    if type(reason) is str and reason == "noproc":
        exc = NoProcess(f"no process {short_repr(pid)} (noproc)")
    elif type(reason) is str and reason == "noconnection":
        exc = NoProcess(f"no connection to the node of {short_repr(pid)} (noconnection)", reason="noconnection")
    else:
        exc = NoProcess(f"{short_repr(pid)} exited ({short_repr(reason)})")
    if isinstance(reason, BaseException):
        exc.__cause__ = reason
    return exc


def check_timeout(timeout: Any, what: str) -> None:
    """Raise `TypeError`/`ValueError` unless `timeout` is a number of seconds >= 0."""
    if type(timeout) is bool or not isinstance(timeout, (int, float)):
        raise TypeError(f"{what}: timeout must be a number of seconds or None, got {short_repr(timeout)}")
    if not timeout >= 0:
        raise ValueError(f"{what}: timeout must be >= 0, got {short_repr(timeout)}")


class Process:
    """One process of a `Runtime`: its pid, task, mailbox, monitors and exit hooks.

    Only the process's own task may wait on its mailbox (`receive`); any code on the
    node's loop may call `deliver`, `deliver_down`, `flush` and the hook methods.
    """

    __slots__ = (
        "pid",
        "runtime",
        "task",
        "alive",
        "exit_reason",
        "exit_request",
        "adopted",
        "name",
        "_loop",
        "_mailbox",
        "_waiter",
        "_pending",
        "_monitors",
        "_monitored_by",
        "_hooks",
        "_started",
        "_previous",
    )

    pid: Pid
    runtime: ProcessTable
    task: asyncio.Task | None
    #: True until the process has exited.
    alive: bool
    #: The exit reason once the process has exited, else None.
    exit_reason: Any
    #: ``(reason,)`` once a non-kill exit signal arrived and is being delivered as a
    #: cancellation; None otherwise. A `Server` reads it to call ``terminate(reason)``.
    exit_request: tuple[Any] | None
    #: True for a task adopted with `Runtime.adopt` (the runtime does not own its task).
    adopted: bool
    #: The local name the process holds, if any.
    name: str | None

    def __init__(self, runtime: ProcessTable, pid: Pid, adopted: bool = False) -> None:
        self.pid = pid
        self.runtime = runtime
        self.task = None
        self.alive = True
        self.exit_reason = None
        self.exit_request = None
        self.adopted = adopted
        self.name = None
        loop = runtime.loop
        if loop is None:  # a runtime makes processes only once its node has started
            raise RuntimeError(f"process {short_repr(pid)}: its runtime has no event loop yet")
        self._loop = loop
        self._mailbox: deque[Any] = deque()
        self._waiter: asyncio.Future | None = None
        # The four dicts below are made on first use: most processes never need them.
        self._pending: dict[Ref, asyncio.Future] | None = None  # call ref -> future
        self._monitors: dict[Ref, Any] | None = None  # monitors held: ref -> target
        self._monitored_by: dict[Ref, Pid] | None = None  # monitors on us: ref -> watcher
        self._hooks: dict[Hashable, Callable[[Pid, Any], None]] | None = None
        self._started = adopted
        self._previous: Process | None = None

    def __repr__(self) -> str:
        state = "alive" if self.alive else f"exited {short_repr(self.exit_reason)}"
        return f"<Process {short_repr(self.pid)} {state}>"

    # -- mailbox --------------------------------------------------------------------

    def deliver(self, msg: Any) -> None:
        """Put `msg` in the mailbox, or resolve the pending call it replies to.

        A `Reply` resolves the future registered under its ref and never enters the
        mailbox; a `Reply` for no pending call is dropped. Messages to a process that
        has exited are dropped.
        """
        if type(msg) is Reply:
            pending = self._pending
            if pending is not None:
                fut = pending.pop(msg.ref, None)
                if fut is not None and not fut.done():
                    fut.set_result(msg.value)
            return
        if not self.alive:
            return
        self._mailbox.append(msg)
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)

    def deliver_down(self, ref: Ref, pid: Any, reason: Any) -> None:
        """Deliver the ``Down`` of a monitor this process holds under `ref`.

        Dropped if the monitor is no longer active (demonitored, or already fired), so
        no ``Down`` arrives after `demonitor`. A pending call under `ref` fails with
        `NoProcess` instead of receiving a message.
        """
        monitors = self._monitors
        if monitors is None or monitors.pop(ref, None) is None:
            return
        pending = self._pending
        if pending is not None:
            fut = pending.pop(ref, None)
            if fut is not None:
                if not fut.done():
                    fut.set_exception(_exited_error(pid, reason))
                return
        self.deliver(Down(ref, pid, reason))

    async def _wait(self, timeout: float | None) -> Any:
        """Wait for a message (the mailbox is empty) and pop it; see `receive`."""
        loop = self._loop
        mailbox = self._mailbox
        deadline = None if timeout is None else loop.time() + timeout
        while not mailbox:
            if not self.alive:
                raise RuntimeError(f"process {short_repr(self.pid)} exited ({short_repr(self.exit_reason)}) "
                                   "while receiving")
            waiter = loop.create_future()
            self._waiter = waiter
            if deadline is None:
                try:
                    await waiter
                finally:
                    self._waiter = None
            else:
                delay = deadline - loop.time()
                if delay <= 0:
                    self._waiter = None
                    raise TimeoutError(f"receive: no message within {timeout} s")
                timer = loop.call_later(delay, _wake, waiter)
                try:
                    await waiter
                finally:
                    timer.cancel()
                    self._waiter = None
        return mailbox.popleft()

    def flush(self, predicate: Callable[[Any], bool]) -> int:
        """Remove every queued message for which `predicate` is true; return how many.

        If `predicate` raises, the mailbox is left unchanged and the exception propagates.
        """
        mailbox = self._mailbox
        if not mailbox:
            return 0
        keep = [msg for msg in mailbox if not predicate(msg)]
        removed = len(mailbox) - len(keep)
        if removed:
            mailbox.clear()
            mailbox.extend(keep)
        return removed

    # -- calls ----------------------------------------------------------------------

    def expect_reply(self, ref: Ref) -> asyncio.Future:
        """Register and return the future that a `Reply` (or ``Down``) for `ref` resolves.

        The caller must `forget_reply` once it stops waiting (also on timeout and
        cancellation), after which a late `Reply` for `ref` is dropped.
        """
        pending = self._pending
        if pending is None:
            pending = self._pending = {}
        fut = self._loop.create_future()
        pending[ref] = fut
        return fut

    def forget_reply(self, ref: Ref) -> None:
        """Stop waiting for a reply under `ref` (no error if there was none)."""
        pending = self._pending
        if pending:
            pending.pop(ref, None)

    # -- monitors (for the node layer) ------------------------------------------------

    def add_monitor(self, ref: Ref, target: Any) -> None:
        """Record that this process monitors `target` under `ref` (its ``Down`` is expected).

        Only the watcher's half: the caller arranges for the target's side to report.
        """
        monitors = self._monitors
        if monitors is None:
            monitors = self._monitors = {}
        monitors[ref] = target

    def monitor_target(self, ref: Ref) -> Any:
        """What this process monitors under `ref` (a pid or ``(name, node_id)``), or None."""
        monitors = self._monitors
        return None if monitors is None else monitors.get(ref)

    def add_watcher(self, ref: Ref, watcher: Pid) -> None:
        """Record that `watcher` (usually a process of another node) monitors this process.

        When this process exits, ``ProcessTable.notify_down`` tells the watcher (through the
        router for a remote one). Raises `NoProcess` if the process has already exited.
        """
        self._require_alive()
        watchers = self._monitored_by
        if watchers is None:
            watchers = self._monitored_by = {}
        watchers[ref] = watcher

    def _require_alive(self) -> None:
        if not self.alive:
            raise NoProcess(f"{short_repr(self.pid)} has exited ({short_repr(self.exit_reason)})")

    def remove_watcher(self, ref: Ref) -> bool:
        """Forget the monitor `ref` on this process; True if it was recorded."""
        watchers = self._monitored_by
        if not watchers:
            return False
        return watchers.pop(ref, None) is not None

    # -- exit hooks -----------------------------------------------------------------

    def add_exit_hook(self, key: Hashable, fn: Callable[[Pid, Any], None]) -> None:
        """Run ``fn(pid, reason)`` once when this process exits.

        Hooks run synchronously, in the order their keys were first added, after the
        process has left the table and released its local name and before monitors get
        ``Down``; they run in whatever task causes the exit, so they must not rely on
        `current_process`. An exception in a hook is logged and the other hooks still
        run. Adding under an existing key replaces that hook in place. Raises
        `NoProcess` if the process has already exited.
        """
        self._require_alive()
        hooks = self._hooks
        if hooks is None:
            hooks = self._hooks = {}
        hooks[key] = fn

    def remove_exit_hook(self, key: Hashable) -> None:
        """Remove the hook under `key`; nothing happens if there is none."""
        hooks = self._hooks
        if hooks:
            hooks.pop(key, None)

    # -- exit -----------------------------------------------------------------------

    def signal_exit(self, reason: Any) -> None:
        """Deliver an exit signal (the caller has already applied the ``"normal"`` rule).

        ``"kill"`` finishes the process at once with ``"killed"`` and cancels its task.
        Another reason finishes an adopted process, or a spawned one whose function has
        not started, at once; a running spawned process gets it as a cancellation
        (first signal wins) and exits with it once its code has unwound.
        """
        if not self.alive:
            return
        kill = type(reason) is str and reason == "kill"
        task = self.task
        if kill or self.adopted or not self._started:
            self._finish("killed" if kill else reason)
            if not self.adopted and task is not None:
                task.cancel()
        elif self.exit_request is None:
            self.exit_request = (reason,)
            if task is not None:
                task.cancel()

    def _task_done(self, task: asyncio.Task) -> None:
        """Done-callback of the task: finish the process if nothing else has."""
        if not self.alive:
            return
        if self.exit_request is not None:
            reason = self.exit_request[0]
        elif task.cancelled():
            reason = "killed"
        else:
            exc = task.exception()
            if exc is None:
                reason = "normal"
            else:
                reason = exc
                _log_crash(self.pid, exc)
        self._finish(reason)

    def _finish(self, reason: Any) -> None:
        """Exit with `reason`; later calls do nothing.

        Leaves the table, releases the name, runs the hooks, drops the monitors held,
        sends ``Down`` to the watchers, discards the mailbox and detaches from the task.
        """
        if not self.alive:
            return
        self.alive = False
        self.exit_reason = reason
        runtime = self.runtime
        pid = self.pid
        runtime.forget(self)
        self.name = None

        hooks = self._hooks
        if hooks:
            self._hooks = None
            for key, fn in hooks.items():
                try:
                    fn(pid, reason)
                except Exception:
                    logger.exception("exit hook %s of process %s failed", short_repr(key), short_repr(pid))

        monitors = self._monitors
        if monitors:
            self._monitors = None
            for ref, target in monitors.items():
                runtime.drop_monitor(ref, target)
        watchers = self._monitored_by
        if watchers:
            self._monitored_by = None
            for ref, watcher in watchers.items():
                runtime.notify_down(watcher, ref, pid, reason)

        pending = self._pending
        if pending:
            self._pending = None
            for fut in pending.values():
                if fut.done():
                    continue
                if self.adopted:
                    # The task lives on: fail its call instead of faking a cancellation.
                    fut.set_exception(RuntimeError(f"process {short_repr(pid)} exited ({short_repr(reason)}) "
                                                   "during a call"))
                else:
                    fut.cancel()
        self._mailbox.clear()
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            _wake(waiter)

        task = self.task
        if task is not None:
            if self.adopted:
                task.remove_done_callback(self._task_done)
                if _tasks.get(task) is self:
                    previous = self._previous
                    while previous is not None and not previous.alive:
                        previous = previous._previous
                    if previous is None:
                        del _tasks[task]
                    else:
                        _tasks[task] = previous
            elif _tasks.get(task) is self:
                del _tasks[task]


async def _run(proc: Process, fn: Callable[..., Awaitable[Any]], args: tuple, kwargs: dict) -> None:
    """Body of a spawned process's task: run `fn` and finish the process with its outcome."""
    task = _current_task()
    assert task is not None
    proc.task = task
    _tasks[task] = proc
    proc._started = True
    try:
        awaitable = fn(*args, **kwargs)
        if not inspect.isawaitable(awaitable):
            raise TypeError(f"spawn: {short_repr(fn)} returned {type(awaitable).__name__}, not an awaitable; "
                            "pass an async function")
        await awaitable
    except asyncio.CancelledError:
        request = proc.exit_request
        proc._finish(request[0] if request is not None else "killed")
    except Exception as exc:
        if proc.alive:
            _log_crash(proc.pid, exc)
            proc._finish(exc)
    except BaseException as exc:
        proc._finish(exc)
        raise
    else:
        request = proc.exit_request
        proc._finish(request[0] if request is not None else "normal")


# -- the calling process ------------------------------------------------------------


def current_process() -> Process:
    """The process the calling task is; `RuntimeError` if it is none."""
    try:
        task = _current_task()
    except RuntimeError:
        raise RuntimeError(_NOT_A_PROCESS) from None
    proc = _tasks.get(task)  # type: ignore[arg-type]
    if proc is None:
        raise RuntimeError(_NOT_A_PROCESS)
    return proc


def task_process(task: asyncio.Task) -> Process | None:
    """The live process `task` currently is, or None."""
    return _tasks.get(task)


def self() -> Pid:
    """The pid of the calling process (a spawned process, or a node's adopted task)."""
    return current_process().pid


def send(dest: Any, msg: Any) -> None:
    """Send `msg` to `dest`: a `Pid`, a local name, ``(name, node_id)`` or a `Via`.

    Never waits. A dead pid drops the message silently; an unregistered local name (or a
    `Via` that finds nobody) raises `NoProcess`; another node's pid goes through the
    node's connections (dropped if there is none).
    """
    current_process().runtime.send(dest, msg)


async def receive(timeout: float | None = None) -> Any:
    """Return the calling process's oldest message, waiting up to `timeout` seconds.

    ``timeout=None`` waits forever, ``0`` only takes a queued message. Raises
    `TimeoutError` when nothing arrives in time. If the wait is cancelled no message is
    lost: it stays in the mailbox for the next `receive`.
    """
    proc = current_process()
    mailbox = proc._mailbox
    if mailbox:
        return mailbox.popleft()
    if timeout is not None:
        check_timeout(timeout, "receive")
    return await proc._wait(timeout)


def monitor(pid: Pid) -> Ref:
    """Monitor `pid`: the caller later receives ``Down(ref, pid, reason)``.

    ``reason`` is ``"noproc"`` (at once) if `pid` is already dead and ``"noconnection"``
    if its node cannot be reached.
    """
    if type(pid) is not Pid:
        raise TypeError(f"monitor: expected a Pid, got {short_repr(pid)}")
    proc = current_process()
    return proc.runtime.monitor(proc, pid)


def demonitor(ref: Ref) -> bool:
    """Cancel the caller's monitor `ref`; True if it was still active.

    No ``Down`` for `ref` arrives afterwards, and one already in the mailbox is removed.
    """
    proc = current_process()
    return proc.runtime.demonitor(proc, ref)


def exit(pid: Pid, reason: Any = "kill") -> None:  # noqa: A001 - Erlang's name
    """Send the exit signal `reason` to `pid`.

    ``"kill"``: `pid` exits at once with reason ``"killed"``. ``"normal"``: ignored
    unless `pid` is the caller, which then exits normally. Any other reason: `pid`
    exits with it (a `Server` runs ``terminate(reason)`` first). A dead pid is ignored.
    """
    proc = current_process()
    proc.runtime.exit(pid, reason, proc.pid)
