"""`Server`, a gen_server-like process, and `call` / `cast` (layer 2).

A server is a process that loops on its mailbox: a `Call` message runs
``handle_call(request, caller)`` and its return value goes back to the caller as a
`pgregistry.process.Reply`; a `Cast` runs ``handle_cast(msg)``; anything else (plain
messages, ``Down`` of its monitors) runs ``handle_info(msg)``. Messages are handled one at
a time, in arrival order.

How a server stops, and whether ``terminate(reason)`` runs first:

* an exit signal other than ``"kill"`` (``exit(pid, "shutdown")``, or
  ``exit(self(), "normal")`` from inside): it arrives as a cancellation of whatever the
  server is awaiting; ``terminate(reason)`` runs, then the process exits with ``reason``;
* a handler raises: ``terminate(exc)`` runs, then the process exits with ``exc`` (logged
  with its traceback); a pending caller gets `NoProcess` chained to ``exc``;
* ``exit(pid, "kill")``, a cancellation of its task, or its node stopping: the process is
  gone at once and ``terminate`` does not run.

Call protocol: the caller monitors the destination and sends ``Call(ref, caller, request)``
with the monitor's ref; the reply or the monitor's ``Down`` resolves a future in the
caller (see `pgregistry.process.Process.expect_reply`), so neither enters its mailbox.
To another node, the monitor and the call travel as one message
(`pgregistry.process.Router.call_remote`). `Call`, `Cast` and `Reply` are defined in
`pgregistry.process`, below the node layer that carries them; this module re-exports
`Call` and `Cast`.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from typing import Any, Protocol

from .errors import AlreadyStarted, CallTimeout, NoProcess
from .process import Call, Cast, Process, Reply, Via, check_timeout, current_process, receive
from .runtime import Runtime
from .terms import Pid, short_repr

__all__ = ["Server", "Call", "Cast", "call", "cast"]

logger = logging.getLogger("pgregistry.server")


class _HasRuntime(Protocol):
    """What `Server.start` needs of a node (a `pgregistry.node.Node`)."""

    runtime: Runtime


class Server:
    """Base class of gen_server-like processes; override the callbacks you need.

    A server object is made with ``cls()`` inside its new process, so a subclass's
    ``__init__`` takes no arguments; the arguments of `start` go to `init`. Callbacks run
    in the server's process: `pgregistry.process.self`, ``send``, ``monitor`` and `call`
    work there.
    """

    async def init(self, *args: Any) -> None:
        """Set up the state from the arguments of `start`; raising makes `start` raise."""

    async def handle_call(self, request: Any, caller: Pid) -> Any:
        """Answer `request` from the process `caller`; the return value is the reply.

        The default raises `RuntimeError`: a server without this callback crashes on a
        call, as in Elixir.
        """
        raise RuntimeError(f"{type(self).__name__} got call {short_repr(request)} from {short_repr(caller)} "
                           "but defines no handle_call")

    async def handle_cast(self, msg: Any) -> None:
        """Handle a `cast`. The default raises `RuntimeError` (the server crashes)."""
        raise RuntimeError(f"{type(self).__name__} got cast {short_repr(msg)} but defines no handle_cast")

    async def handle_info(self, msg: Any) -> None:
        """Handle any other message. The default logs it as unexpected and drops it."""
        logger.warning("%s %s dropped an unexpected message: %s", type(self).__name__, short_repr(_self_pid()),
                       short_repr(msg, 200))

    async def terminate(self, reason: Any) -> None:
        """Clean up before the process exits with `reason` (not run on a kill)."""

    @classmethod
    async def serve(cls, *args: Any) -> None:
        """Run this server in the calling process: ``init(*args)``, then the message loop.

        For a process started some other way (a `pgregistry.workers.Workers` function is
        ``async def f(*args): await MyServer.serve(*args)``). Returns never; the process
        ends with an exit signal or a crash of a callback, as a started server does.
        """
        proc = current_process()
        server = cls()
        await server.init(*args)
        await _loop(server, proc)

    @classmethod
    async def start(cls, node: _HasRuntime, *args: Any, name: str | Via | None = None) -> Pid:
        """Start a server process on `node`, run ``init(*args)`` in it, return its pid.

        `name` is None, a local name (registered before ``init`` runs and released when
        the process exits) or a `Via` (``whereis_name`` is asked first, then
        ``register_name(key, pid, value)`` is called, and awaited if it returns an
        awaitable, from inside the new process before ``init``). A taken name raises
        `AlreadyStarted` with the holder's pid, and the new process exits ``"normal"``.
        Exceptions of the naming service propagate. If ``init`` raises, the process
        exits with that exception and `start` raises it. Returns once ``init`` has
        finished. If `start` is cancelled while ``init`` runs, the new process is killed.
        Must run on the node's loop thread.
        """
        runtime = getattr(node, "runtime", None)
        if not isinstance(runtime, Runtime):
            raise TypeError(f"Server.start: expected a Node, got {short_repr(node)}")
        via: Via | None = None
        if type(name) is Via:
            via = name
            holder = via.service.whereis_name(via.key)
            if holder is not None:
                raise AlreadyStarted(holder, via)
        elif name is not None:
            holder = runtime.whereis(runtime.check_name(name))
            if holder is not None:
                raise AlreadyStarted(holder, name)

        started: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        pid = runtime.spawn(_serve, cls, args, via, started)
        proc = runtime.process(pid)
        assert proc is not None
        proc.add_exit_hook(started, _starter_notifier(started))
        if type(name) is str:
            runtime.register_name(name, pid)
        try:
            await started
        except asyncio.CancelledError:
            runtime.exit(pid, "kill")
            raise
        return pid


def _self_pid() -> Pid | None:
    try:
        return current_process().pid
    except RuntimeError:
        return None


def _starter_notifier(started: asyncio.Future[None]) -> Any:
    """An exit hook failing `started` if the server dies before its init finished."""

    def notify(pid: Pid, reason: Any) -> None:
        if not started.done():
            exc = NoProcess(f"{short_repr(pid)} exited ({short_repr(reason)}) before init finished")
            if isinstance(reason, BaseException):
                exc.__cause__ = reason
            started.set_exception(exc)

    return notify


async def _serve(cls: type[Server], args: tuple, via: Via | None, started: asyncio.Future[None]) -> None:
    """The body of a server process: register, init, then the message loop."""
    proc = current_process()
    try:
        registered = None if via is None else via.service.register_name(via.key, proc.pid, via.value)
        if inspect.isawaitable(registered):
            registered = await registered  # a naming service that asks its peers (Names)
        if via is not None and not registered:
            holder = via.service.whereis_name(via.key)
            if not started.done():
                started.set_exception(AlreadyStarted(holder, via))
            return
        server = cls()
        await server.init(*args)
    except BaseException as exc:
        if not started.done() and not isinstance(exc, asyncio.CancelledError):
            started.set_exception(exc)
        raise
    proc.remove_exit_hook(started)
    if not started.done():
        started.set_result(None)
    await _loop(server, proc)


async def _loop(server: Server, proc: Process) -> None:
    """Handle messages until an exit signal or a crash; run ``terminate`` as due."""
    runtime = proc.runtime
    try:
        while True:
            msg = await receive()
            kind = type(msg)
            if kind is Call:
                reply = await server.handle_call(msg.request, msg.caller)
                runtime.send(msg.caller, Reply(msg.ref, reply))
            elif kind is Cast:
                await server.handle_cast(msg.msg)
            else:
                await server.handle_info(msg)
    except asyncio.CancelledError:
        request = proc.exit_request
        if proc.alive and request is not None:
            await server.terminate(request[0])
        raise
    except Exception as exc:
        await server.terminate(exc)
        raise


async def call(dest: Any, request: Any, timeout: float | None = 5.0) -> Any:
    """Send `request` to the server `dest` and return its reply.

    `dest` is a `Pid`, a local name, ``(name, node_id)`` or a `Via`. Raises
    `CallTimeout` (a `TimeoutError`) if no reply comes within `timeout` seconds (None:
    wait forever); `NoProcess` if `dest` does not exist or exits before replying (the
    message names the exit reason; an exception reason is the ``__cause__``);
    `RuntimeError` for a call to the caller itself. On timeout or cancellation the call
    is abandoned: a late reply is dropped and never reaches the mailbox. The server still
    handles the request.
    """
    proc = current_process()
    if timeout is not None:
        check_timeout(timeout, "call")
    runtime = proc.runtime
    target = runtime.resolve(dest)
    if target == proc.pid:
        raise RuntimeError(f"call: {short_repr(dest, 200)} is the calling process itself; the call would deadlock")
    ref = runtime.new_ref()
    fut = proc.expect_reply(ref)
    timer: asyncio.TimerHandle | None = None
    try:
        router = runtime.router
        if router is not None and runtime.is_remote(target):
            # One message does both the monitor and the call (see Router.call_remote).
            router.call_remote(proc, ref, target, request)
        else:
            runtime.monitor(proc, target, ref)
            if not fut.done():
                runtime.send(target, Call(ref, proc.pid, request))
        if timeout is not None and not fut.done():
            timer = asyncio.get_running_loop().call_later(timeout, _time_out, fut, dest, timeout)
        return await fut
    finally:
        if timer is not None:
            timer.cancel()
        proc.forget_reply(ref)
        runtime.demonitor(proc, ref, flush=False)


def _time_out(fut: asyncio.Future, dest: Any, timeout: float) -> None:
    if not fut.done():
        fut.set_exception(CallTimeout(f"call to {short_repr(dest, 200)} got no reply within {short_repr(timeout)} s"))


def cast(dest: Any, msg: Any) -> None:
    """Send `msg` to the server `dest` for ``handle_cast``; never waits, never fails.

    A dead or unknown destination drops the message (like Erlang's ``gen_server:cast``);
    a bad destination type raises `TypeError`, and exceptions of a `Via`'s naming
    service propagate.
    """
    runtime = current_process().runtime
    try:
        runtime.send(dest, Cast(msg))
    except NoProcess:
        return
