"""`Node`: one member of a cluster, owning its processes and local names (layer 3).

A node runs on one asyncio event loop. `start` (or ``async with node``) binds it to the
running loop and thread, picks a new *creation* (so pids of an earlier incarnation never
match), and makes the calling task a process of the node (`pgregistry.process.self`
works there). Writes (`spawn`, `register_name`, services) must run on that thread.
`stop` kills every process of the node, running their exit hooks, then closes the
attached services.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import math
import os
import secrets
import ssl as _ssl
import threading
from typing import Any, Awaitable, Callable

from .errors import AlreadyStarted
from .process import Runtime, task_process
from .terms import Pid

__all__ = ["Node"]

logger = logging.getLogger("pgregistry.node")

#: How long `Node.stop` waits for the cancelled tasks of killed processes to unwind.
STOP_GRACE = 5.0

_NEW, _RUNNING, _STOPPING, _STOPPED = "new", "running", "stopping", "stopped"

_FORBIDDEN_IN_NAME = frozenset("@:/ \t\r\n")


def _check_text(what: str, value: Any, forbidden: frozenset[str]) -> str:
    if type(value) is not str:
        raise TypeError(f"{what} must be a str, got {value!r}")
    if not value or not value.isprintable() or any(ch in forbidden for ch in value):
        shown = "".join(sorted(forbidden - {"\t", "\r", "\n"}))
        raise ValueError(f"{what} must be non-empty, printable and free of {shown!r}, got {value!r}")
    return value


def _check_seconds(what: str, value: Any) -> float:
    if type(value) is bool or not isinstance(value, (int, float)):
        raise TypeError(f"{what} must be a number of seconds, got {value!r}")
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"{what} must be a positive finite number of seconds, got {value!r}")
    return float(value)


def _new_creation() -> int:
    """A random non-zero 32-bit creation for a new incarnation of a node."""
    while True:
        creation = secrets.randbits(32)
        if creation:
            return creation


class Node:
    """A node: an id, its processes and local names, and attached services.

    ``Node(name, host=, port=, cookie=, ssl=, tick_interval=, down_after=)``: every
    argument is checked here (`TypeError` for a wrong type, `ValueError` for a bad
    value, each naming the argument). ``cookie=None`` takes ``PGREGISTRY_COOKIE`` from
    the environment, else a random cookie.
    """

    runtime: Runtime

    def __init__(
        self,
        name: str,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        cookie: str | None = None,
        ssl: _ssl.SSLContext | None = None,
        tick_interval: float = 1.0,
        down_after: float = 5.0,
    ) -> None:
        self.name = _check_text("name", name, _FORBIDDEN_IN_NAME)
        self.host = _check_text("host", host, frozenset("@/ \t\r\n"))
        if type(port) is not int:
            raise TypeError(f"port must be an int, got {port!r}")
        if not 0 <= port <= 65535:
            raise ValueError(f"port must be in 0..65535, got {port!r}")
        self.port = port
        if cookie is None:
            cookie = os.environ.get("PGREGISTRY_COOKIE") or secrets.token_urlsafe(32)
        elif type(cookie) is not str:
            raise TypeError(f"cookie must be a str or None, got {type(cookie).__name__}")
        elif not cookie:
            raise ValueError("cookie must not be empty")
        self._cookie = cookie
        if ssl is not None and not isinstance(ssl, _ssl.SSLContext):
            raise TypeError(f"ssl must be an ssl.SSLContext or None, got {ssl!r}")
        self.ssl = ssl
        self.tick_interval = _check_seconds("tick_interval", tick_interval)
        self.down_after = _check_seconds("down_after", down_after)
        self.runtime = Runtime(self.id)
        self._state = _NEW
        self._stopped = asyncio.Event()
        self._services: dict[str, Any] = {}

    def __repr__(self) -> str:
        return f"<Node {self.id} {self._state}>"

    @property
    def id(self) -> str:
        """``"name@host:port"``."""
        return f"{self.name}@{self.host}:{self.port}"

    @property
    def loop_thread(self) -> int | None:
        """The ident of the thread running the node's loop (None before `start`)."""
        return self.runtime.loop_thread

    @property
    def running(self) -> bool:
        """True between `start` and `stop`."""
        return self._state == _RUNNING

    # -- lifecycle ------------------------------------------------------------------

    async def __aenter__(self) -> "Node":
        await self.start()
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        await self.stop()

    async def start(self) -> None:
        """Bind the node to the running loop and make the calling task its process.

        A calling task that is a spawned process (of any node) stays that process; any
        other task becomes a process of this node until the node stops or the task ends.
        A node starts once: `RuntimeError` if it was started before.
        """
        if self._state != _NEW:
            raise RuntimeError(f"node {self.id} was already started; make a new Node to start again")
        loop = asyncio.get_running_loop()
        runtime = self.runtime
        runtime.node_id = self.id
        runtime.creation = _new_creation()
        runtime.loop = loop
        runtime.loop_thread = threading.get_ident()
        self._state = _RUNNING
        task = asyncio.current_task()
        if task is not None:
            current = task_process(task)
            if current is None or current.adopted:
                runtime.adopt(task)

    async def stop(self) -> None:
        """Kill every process of the node, then close every attached service.

        Exit hooks run for each process (reason ``"killed"``; `Server.terminate` does not
        run). The node then waits up to `STOP_GRACE` seconds for the killed tasks to
        unwind and calls ``close()`` on each service (awaiting it if it returns an
        awaitable; errors are logged). Idempotent: stopping a stopped or never-started
        node does nothing, and a concurrent `stop` waits for the first one. If `stop`
        is cancelled while waiting, the processes are already dead and the services are
        closed before the cancellation propagates.
        """
        if self._state == _NEW:
            self._state = _STOPPED
            self._stopped.set()
            return
        if self._state == _STOPPED:
            return
        if self._state == _STOPPING:
            await self._stopped.wait()
            return
        if threading.get_ident() != self.runtime.loop_thread:
            raise RuntimeError(f"stop of node {self.id} must run on the node's event loop thread")
        self._state = _STOPPING
        try:
            tasks = self.runtime.close(exclude=asyncio.current_task())
            if tasks:
                _, still_running = await asyncio.wait(tasks, timeout=STOP_GRACE)
                for task in still_running:
                    logger.warning("node %s: %r ignored its cancellation and is still running", self.id, task)
        finally:
            services = list(self._services.items())
            self._services.clear()
            for name, service in services:
                await self._close_service(name, service)
            self._state = _STOPPED
            self._stopped.set()

    async def _close_service(self, name: str, service: Any) -> None:
        try:
            closed = service.close()
            if inspect.isawaitable(closed):
                await closed
        except Exception:
            logger.exception("node %s: closing service %r failed", self.id, name)

    # -- processes ------------------------------------------------------------------

    def spawn(self, fn: Callable[..., Awaitable[Any]], /, *args: Any, **kwargs: Any) -> Pid:
        """Run ``fn(*args, **kwargs)`` as a new process of this node; return its pid at once.

        Messages sent before the process first runs are kept. `fn` must be an async
        callable (`TypeError`). `RuntimeError` off the node's loop thread, before
        `start` or after `stop`.
        """
        return self.runtime.spawn(fn, *args, **kwargs)

    def register_name(self, name: str, pid: Pid) -> None:
        """Register the live local `pid` under the local `name` (like ``erlang:register``).

        `AlreadyStarted` (``.pid`` the holder) if the name is taken; `ValueError` if
        `pid` already has a name or `name` is empty or too long; `TypeError` for a
        non-str name or a non-pid; `NotLocal` for another node's pid; `NoProcess` for a
        dead pid. The name is released when the process exits.
        """
        self.runtime.register_name(name, pid)

    def unregister_name(self, name: str) -> None:
        """Release the local `name`; nothing happens if nobody holds it."""
        self.runtime.unregister_name(name)

    def whereis(self, name: str) -> Pid | None:
        """The pid registered under the local `name`, or None. Callable from any thread."""
        return self.runtime.whereis(name)

    def peers(self) -> list[str]:
        """The ids of the connected peer nodes."""
        return []

    # -- services -------------------------------------------------------------------

    def attach_service(self, name: str, service: Any) -> None:
        """Attach `service` (e.g. a registry scope) under `name`; closed when the node stops.

        `AlreadyStarted` (``.pid`` the attached service) if `name` is taken;
        `RuntimeError` off the loop thread or when the node is not running.
        """
        self.require_loop_thread("attach_service")
        if type(name) is not str:
            raise TypeError(f"attach_service: name must be a str, got {name!r}")
        if not name:
            raise ValueError("attach_service: name must not be empty")
        existing = self._services.get(name)
        if existing is not None:
            raise AlreadyStarted(existing, name)
        self._services[name] = service

    def detach_service(self, name: str) -> None:
        """Forget the service under `name` without closing it; nothing if there is none.

        Allowed while the node stops (a service may detach itself from ``close``);
        `RuntimeError` off the loop thread.
        """
        loop_thread = self.runtime.loop_thread
        if loop_thread is not None and threading.get_ident() != loop_thread:
            raise RuntimeError("detach_service must be called on the node's event loop thread")
        self._services.pop(name, None)

    def service(self, name: str) -> Any | None:
        """The service attached under `name`, or None."""
        return self._services.get(name)

    def require_loop_thread(self, what: str) -> None:
        """Raise `RuntimeError` naming `what` unless the node runs and this is its loop thread.

        The guard of every write, for the layers above too.
        """
        if self._state != _RUNNING:
            raise RuntimeError(f"{what}: node {self.id} is not running")
        if threading.get_ident() != self.runtime.loop_thread:
            raise RuntimeError(f"{what} must be called on the node's event loop thread")
