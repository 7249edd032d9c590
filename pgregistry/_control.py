"""Driving nodes from outside: the control server, its client, node processes (layer 7).

Beside the CLI (the top layer), used by ``pgregistry node``, ``pgregistry demo`` and the
multi-process tests. Two halves:

* **in a node**: `Control`, the `~pgregistry.server.Server` that ``pgregistry node``
  registers under the local name `CONTROL_NAME`, so that any connected node can drive it
  with ``call((CONTROL_NAME, node_id), request)``;
* **outside it**: `control` (that call, with the reply unwrapped) and `NodeProcess` (a
  ``pgregistry node`` child process: start it, learn its id, stop or kill it).

The control protocol
====================
A request is a tuple whose first item names the command. The reply is always a tuple:
``("ok", result)``, or ``("error", "TypeName: message")`` when the request is malformed
or fails. The server never crashes on a request; `control` turns an error reply into
`ControlError`. ``scope`` names a registry the node runs (``pgregistry node --scope``).

``("register", scope, key, value, n)``
    Spawn `n` (1..`MAX_WORKERS`) worker processes, each registered under `key` with
    `value` before the reply; returns their pids. Workers do nothing else until stopped.
``("unregister", scope, key)``
    Remove every entry of this node's processes under `key` (workers stay alive);
    returns how many entries left.
``("update", scope, key, value)``
    Give every local process's entries under `key` the value `value`; returns how many
    processes were updated.
``("stop_workers", scope, key)``
    Kill the workers ``register`` started under `key` (exit reason ``"killed"``: their
    entries are gone when the reply arrives); returns how many were alive.
``("lookup", scope, key)``
    ``[(pid, value), ...]``: the node's view of `key`, every node's entries.
``("select_all", scope)``
    ``[(key, pid, value), ...]``: every entry in the node's view.
``("count", scope)``
    The number of entries in the node's view.
``("subscribe", scope, report_to)``
    Start a process that subscribes to the whole scope (``monitor_scope``) before the
    reply, and sends each event it gets to the pid `report_to` as ``("event", node_id,
    kind, key, items, t_ns)``: `kind` is ``"Join"``, ``"Leave"`` or ``"Update"``, `items`
    the event's entries ``[(pid, value)]`` or changes ``[(pid, old, new)]``, and `t_ns`
    ``time.monotonic_ns()`` when it arrived (comparable between processes of one host).
    It ends when `report_to` exits or becomes unreachable, or on an exit signal.
    Returns the subscriber's pid.
``("connect", address)``
    `Node.connect`; returns the peer's id.
``("peers",)``
    The ids of the connected nodes.
``("add_route", peer, address)``
    `Node.add_route`; returns None.
``("info",)``
    ``{"id", "creation", "os_pid", "scopes", "names", "peers"}``.

Names (`pgregistry.names.Names`): ``service`` names a names service the node runs
(``pgregistry node --names``). The commands start no code of the caller's choosing: a
name can only be given to `Singleton`, the control server's own echo server, and every
wait has a fixed bound (`NAMES_TIMEOUT`), not one taken from the request.

``("names_join", service, address)``
    `Names.join` the names cluster of the node at `address` (an id or ``host:port``);
    returns the member ids.
``("names_stat", service)``
    `Names.stat`: members, live members, lease state, counters.
``("names_serve", service, name)``
    Start a `Singleton` server under ``names.via(name)``: the name is decided by a
    majority (a holder whose node stopped renewing is waited out). Returns ``(pid, token,
    True)`` once it holds the name, or ``(holder, token, False)`` if a live process of
    another node holds it (`holder` and `token` as this node knows them, maybe None).
``("names_call", service, name, request)``
    `~pgregistry.server.call` ``names.via(name)`` with `request` from this node; returns
    the reply (a `Singleton` answers ``(node_id, pid, token, request)``).
``("names_whereis", service, name)``
    ``(pid, token)`` of the valid holder as this node knows it (a local read), or None.
``("names_lookup", service, name)``
    `Names.lookup`: ``(pid, token)`` as a majority decided it, or None.

Workers (`pgregistry.workers.Workers`): ``service`` names a workers service the node runs
(``pgregistry node --workers``). Its only function is `session`, so these commands too
start no code of the caller's choosing; a request names at most `MAX_WORKERS` keys.

``("workers_start", service, keys)``
    `Workers.get_or_start` ``session(key)`` for each key; returns ``[(key, pid), ...]``.
``("workers_where", service, keys)``
    `Workers.whereis` of each key: ``[(key, pid or None), ...]``.
``("workers_stat", service)``
    `Workers.stat`, with ``"nodes"`` the ring's node ids.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, Final, TypeVar

from .errors import AlreadyStarted, RegistryError
from .events import Down, Join, Leave, Update
from .names import Names
from .node import Node
from .process import current_process, monitor, receive, send
from .process import exit as exit_process
from .registry import Registry
from .server import Server, call
from .spec import V1, V2, V3
from .terms import Pid, check_key, check_value, short_repr
from .workers import Workers

T = TypeVar("T")

__all__ = ["CONTROL_NAME", "MAX_WORKERS", "NAMES_TIMEOUT", "Control", "ControlError", "NodeProcess", "Singleton",
           "Session", "control", "session"]

#: The local name of the control server on every ``pgregistry node``.
CONTROL_NAME: Final = "pgregistry_control"

#: Most workers one ``register`` request may start.
MAX_WORKERS: Final = 10_000

#: Seconds a names command may wait for a majority (the caller's `control` timeout must be longer).
NAMES_TIMEOUT: Final = 10.0

#: Seconds a new ``pgregistry node`` process gets to print its ``NODE`` line.
START_TIMEOUT: Final = 20.0

#: Seconds `NodeProcess.stop` waits after SIGTERM before it sends SIGKILL.
STOP_GRACE: Final = 5.0

SELECT_ALL: Final[list[tuple[Any, list[Any], list[Any]]]] = [((V1, V2, V3), [], [(V1, V2, V3)])]
"""The match spec of every row as ``(key, pid, value)``."""

# Command name -> its arguments, for validation and error messages.
_COMMANDS: Final[dict[str, tuple[str, ...]]] = {
    "register": ("scope", "key", "value", "n"),
    "unregister": ("scope", "key"),
    "update": ("scope", "key", "value"),
    "stop_workers": ("scope", "key"),
    "lookup": ("scope", "key"),
    "select_all": ("scope",),
    "count": ("scope",),
    "subscribe": ("scope", "report_to"),
    "connect": ("address",),
    "peers": (),
    "add_route": ("peer", "address"),
    "info": (),
    "names_join": ("service", "address"),
    "names_stat": ("service",),
    "names_serve": ("service", "name"),
    "names_call": ("service", "name", "request"),
    "names_whereis": ("service", "name"),
    "names_lookup": ("service", "name"),
    "workers_start": ("service", "keys"),
    "workers_where": ("service", "keys"),
    "workers_stat": ("service",),
}


class ControlError(RegistryError):
    """A node's control server refused or failed a request (`control` raises it).

    ``node`` is the node's id, ``request`` the request, ``reason`` the server's
    ``"TypeName: message"``.
    """

    def __init__(self, node: str, request: Any, reason: str) -> None:
        super().__init__(f"{node} refused {short_repr(request, 200)}: {reason}")
        self.node = node
        self.request = request
        self.reason = reason


def _usage(command: str) -> str:
    """``"('register', scope, key, value, n)"``: the shape of a command's request."""
    return "(" + ", ".join([repr(command), *_COMMANDS[command]]) + ")"


async def _worker() -> None:
    """A worker process: holds its registry entries and ignores messages until killed."""
    while True:
        await receive()


async def _subscriber(reg: Registry, report_to: Pid, subscribed: asyncio.Future[None]) -> None:
    """Forward every event of `reg` to `report_to` (see ``subscribe`` in the module doc)."""
    try:
        ref, _snapshot = reg.monitor_scope()
        watch = monitor(report_to)
    except BaseException as exc:
        if not subscribed.done():
            subscribed.set_exception(exc)
        raise
    subscribed.set_result(None)
    node_id = reg.node.id
    while True:
        msg = await receive()
        t_ns = time.monotonic_ns()
        kind = type(msg)
        if kind is Down and msg.ref == watch:
            return
        if (kind is Join or kind is Leave or kind is Update) and msg.ref == ref:
            send(report_to, ("event", node_id, kind.__name__, msg.key, msg[2], t_ns))


class Singleton(Server):
    """The server ``names_serve`` starts under a names via: answers every call with
    ``(node_id, pid, token, request)``, `token` the fencing token of its name as its node
    knows it (None once the name is no longer validly held)."""

    names: Names
    name: Any

    async def init(self, names: Names, name: Any) -> None:
        """Keep the names service and the name this server holds."""
        self.names = names
        self.name = name

    async def handle_call(self, request: Any, caller: Pid) -> tuple[str, Pid, int | None, Any]:
        """Say who answers, with which token."""
        return (self.names.node.id, current_process().pid, self.names.token(self.name), request)


class Session(Server):
    """The worker `session` runs: answers every call with ``(node_id, pid, key, calls)``,
    `calls` how many calls it answered so far."""

    key: Any
    calls: int

    async def init(self, key: Any) -> None:
        """Keep the worker's key."""
        self.key = key
        self.calls = 0

    async def handle_call(self, request: Any, caller: Pid) -> tuple[str, Pid, Any, int]:
        """Say where it runs and how often it was called."""
        self.calls += 1
        pid = current_process().pid
        return (pid.node, pid, self.key, self.calls)


async def session(key: Any) -> None:
    """The function of the workers services of ``pgregistry node --workers``."""
    await Session.serve(key)


class Control(Server):
    """The control server of a node: answers the requests of the module docstring.

    Start it with ``await Control.start(node, node, registries, names, workers,
    name=CONTROL_NAME)``, `registries` mapping each scope name to its running `Registry`,
    `names` (optional) each names service name to its running `Names`, `workers`
    (optional) each workers service name to its running `Workers`.
    """

    node: Node
    registries: dict[str, Registry]
    names: dict[str, Names]
    workers: dict[tuple[str, Any], list[Pid]]
    placements: dict[str, Workers]

    async def init(self, node: Node, registries: dict[str, Registry], names: dict[str, Names] | None = None,
                   placements: dict[str, Workers] | None = None) -> None:
        """Keep the node, its registries, names and workers services; no worker runs yet."""
        self.node = node
        self.registries = dict(registries)
        self.names = dict(names or {})
        self.placements = dict(placements or {})
        self.workers = {}

    async def handle_call(self, request: Any, caller: Pid) -> tuple[str, Any]:
        """Run `request`; reply ``("ok", result)`` or ``("error", "TypeName: message")``."""
        try:
            return ("ok", await self._run(request))
        except Exception as exc:  # every failure goes back to the caller; the server lives on
            return ("error", f"{type(exc).__name__}: {exc}")

    async def _run(self, request: Any) -> Any:
        if type(request) is not tuple or not request or type(request[0]) is not str:
            raise ValueError(f"a control request is a tuple ('command', ...), got {short_repr(request, 200)}")
        command, args = request[0], request[1:]
        params = _COMMANDS.get(command)
        if params is None:
            raise ValueError(f"unknown command {short_repr(command)}; commands: {', '.join(_COMMANDS)}")
        if len(args) != len(params):
            raise ValueError(f"{short_repr(command)} takes {_usage(command)}, got {len(args)} argument(s)")
        handler: Callable[..., Awaitable[Any]] = getattr(self, f"_cmd_{command}")
        return await handler(*args)

    def _names(self, service: Any) -> Names:
        return self._named(self.names, "names service", service)

    def _registry(self, scope: Any) -> Registry:
        return self._named(self.registries, "registry", scope)

    def _named(self, running: dict[str, T], what: str, name: Any) -> T:
        found = running.get(name) if type(name) is str else None
        if found is None:
            raise ValueError(f"no {what} {short_repr(name, 80)} on {self.node.id}; it runs {sorted(running)}")
        return found

    async def _cmd_register(self, scope: Any, key: Any, value: Any, n: Any) -> list[Pid]:
        reg = self._registry(scope)
        if type(n) is not int or not 1 <= n <= MAX_WORKERS:
            raise ValueError(f"n must be an int in 1..{MAX_WORKERS}, got {short_repr(n, 40)}")
        check_key(key)  # before any process starts
        check_value(value)
        pids: list[Pid] = []
        for _ in range(n):
            pid = self.node.spawn(_worker)
            if not reg.register_name(key, pid, value):
                exit_process(pid, "kill")
                raise ValueError(f"{short_repr(key, 80)} is held by {short_repr(reg.whereis_name(key))} "
                                 f"in unique registry {short_repr(scope)}")
            pids.append(pid)
        self.workers.setdefault((scope, key), []).extend(pids)
        return pids

    async def _cmd_unregister(self, scope: Any, key: Any) -> int:
        reg = self._registry(scope)
        removed = len(reg.lookup_local(key))
        reg.unregister_name(key)
        return removed

    async def _cmd_update(self, scope: Any, key: Any, value: Any) -> int:
        reg = self._registry(scope)
        pids = dict.fromkeys(pid for pid, _value in reg.lookup_local(key))
        return sum(reg.update_value(key, value, pid) for pid in pids)

    async def _cmd_stop_workers(self, scope: Any, key: Any) -> int:
        self._registry(scope)
        runtime = self.node.runtime
        stopped = 0
        for pid in self.workers.pop((scope, key), []):
            if runtime.process(pid) is not None:
                exit_process(pid, "kill")
                stopped += 1
        return stopped

    async def _cmd_lookup(self, scope: Any, key: Any) -> list[tuple[Pid, Any]]:
        return self._registry(scope).lookup(key)

    async def _cmd_select_all(self, scope: Any) -> list[Any]:
        return self._registry(scope).select(SELECT_ALL)

    async def _cmd_count(self, scope: Any) -> int:
        return self._registry(scope).count()

    async def _cmd_subscribe(self, scope: Any, report_to: Any) -> Pid:
        reg = self._registry(scope)
        if type(report_to) is not Pid:
            raise TypeError(f"report_to must be a Pid, got {report_to!r:.80}")
        subscribed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        pid = self.node.spawn(_subscriber, reg, report_to, subscribed)
        await asyncio.wait_for(subscribed, 5.0)
        return pid

    async def _cmd_connect(self, address: Any) -> str:
        return await self.node.connect(address)

    async def _cmd_peers(self) -> list[str]:
        return self.node.peers()

    async def _cmd_add_route(self, peer: Any, address: Any) -> None:
        self.node.add_route(peer, address)

    async def _cmd_info(self) -> dict[str, Any]:
        node = self.node
        return {"id": node.id, "creation": node.creation, "os_pid": os.getpid(),
                "scopes": sorted(self.registries), "names": sorted(self.names), "peers": node.peers()}

    async def _cmd_names_join(self, service: Any, address: Any) -> list[str]:
        names = self._names(service)
        if type(address) is not str:
            raise TypeError(f"address must be a str, got {short_repr(address, 80)}")
        await names.join(address, timeout=NAMES_TIMEOUT)
        return names.nodes()

    async def _cmd_names_stat(self, service: Any) -> dict[str, Any]:
        return self._names(service).stat()

    async def _cmd_names_serve(self, service: Any, name: Any) -> tuple[Pid | None, int | None, bool]:
        names = self._names(service)
        via = names.via(name)  # TypeError for a name that is not a key
        try:
            pid = await asyncio.wait_for(Singleton.start(self.node, names, name, name=via), NAMES_TIMEOUT)
        except AlreadyStarted:
            return (names.whereis_name(name), names.token(name), False)
        return (pid, names.token(name), True)

    async def _cmd_names_call(self, service: Any, name: Any, request: Any) -> Any:
        return await call(self._names(service).via(name), request, NAMES_TIMEOUT)

    async def _cmd_names_whereis(self, service: Any, name: Any) -> tuple[Pid, int] | None:
        names = self._names(service)
        pid = names.whereis_name(name)
        token = names.token(name)
        return None if pid is None or token is None else (pid, token)

    async def _cmd_names_lookup(self, service: Any, name: Any) -> tuple[Pid, int] | None:
        return await self._names(service).lookup(name, timeout=NAMES_TIMEOUT)

    def _placement(self, service: Any) -> Workers:
        return self._named(self.placements, "workers service", service)

    async def _cmd_workers_start(self, service: Any, keys: Any) -> list[tuple[Any, Pid]]:
        workers = self._placement(service)
        checked = _keys(keys)
        pids = await asyncio.gather(*(workers.get_or_start(key, session, key, timeout=NAMES_TIMEOUT)
                                      for key in checked))
        return list(zip(checked, pids, strict=True))

    async def _cmd_workers_where(self, service: Any, keys: Any) -> list[tuple[Any, Pid | None]]:
        workers = self._placement(service)
        checked = _keys(keys)
        pids = await asyncio.gather(*(workers.whereis(key, timeout=NAMES_TIMEOUT) for key in checked))
        return list(zip(checked, pids, strict=True))

    async def _cmd_workers_stat(self, service: Any) -> dict[str, Any]:
        workers = self._placement(service)
        return {**workers.stat(), "nodes": list(workers.nodes())}


async def control(node_id: str, request: tuple[Any, ...], timeout: float = 5.0) -> Any:
    """Send `request` to the control server of the node `node_id`; return the result.

    Must run in a process of a node connected to `node_id`. Raises `ControlError` for an
    ``("error", ...)`` reply, and what `~pgregistry.server.call` raises
    (`~pgregistry.errors.CallTimeout`, `~pgregistry.errors.NoProcess` if the node is not
    connected or runs no control server).
    """
    reply = await call((CONTROL_NAME, node_id), request, timeout)
    if type(reply) is tuple and len(reply) == 2 and reply[0] in ("ok", "error"):
        if reply[0] == "ok":
            return reply[1]
        raise ControlError(node_id, request, str(reply[1]))
    raise ControlError(node_id, request, f"malformed reply {reply!r:.200}")


class NodeProcess:
    """A ``pgregistry node`` running as a child OS process of this one.

    Made by `start`, which returns once the child printed its ``NODE <id>`` line. The
    cookie travels in the child's environment (``PGREGISTRY_COOKIE``), not on its command
    line. The child runs with ``--exit-with-stdin`` and its stdin is a pipe held by this
    object, so it also stops if this process dies. Its stderr (logs) goes to `log` if
    given, else to this process's stderr.
    """

    def __init__(self, name: str, popen: subprocess.Popen[bytes], log: Path | None) -> None:
        self.name = name
        self.popen = popen
        self.log = log
        self.id = ""
        self._terminated = False

    def __repr__(self) -> str:
        return f"<NodeProcess {self.id or self.name} pid {self.pid} {self.state}>"

    @property
    def pid(self) -> int:
        """The child's OS process id."""
        return self.popen.pid

    @property
    def address(self) -> str:
        """``"host:port"`` where the node listens (from its id)."""
        return self.id.rpartition("@")[2]

    @property
    def port(self) -> int:
        """The port the node listens on."""
        return int(self.id.rpartition(":")[2])

    @property
    def state(self) -> str:
        """``"running"`` or ``"exited <status>"`` (a negative status: killed by that signal)."""
        status = self.popen.poll()
        return "running" if status is None else f"exited {status}"

    @classmethod
    async def start(
        cls,
        name: str,
        *,
        cookie: str,
        scopes: Iterable[str] = (),
        connect: Iterable[str] = (),
        host: str = "127.0.0.1",
        port: int = 0,
        tick_interval: float = 1.0,
        down_after: float = 5.0,
        names: str | None = None,
        lease: float | None = None,
        join: str | None = None,
        workers: str | None = None,
        test_control: bool = True,
        env: Mapping[str, str] | None = None,
        log: Path | None = None,
        timeout: float = START_TIMEOUT,
    ) -> NodeProcess:
        """Start ``python -m pgregistry node`` with these options and wait for its id.

        `names`, `lease`, `join` and `workers` are ``--names``, ``--lease``, ``--join``
        and ``--workers`` (None: left out); `test_control` adds ``--test-control`` (the
        control server this module's `control` drives); `env` adds to the child's
        environment (``PGREGISTRY_LOOP``, say).

        Raises `RuntimeError` (with the end of its log) if the child exits or prints
        something else first, `TimeoutError` after `timeout` seconds; the child is
        killed in both cases.
        """
        args = [sys.executable, "-m", "pgregistry", "node", "--name", name, "--host", host, "--port", str(port),
                "--tick-interval", repr(tick_interval), "--down-after", repr(down_after), "--exit-with-stdin"]
        if test_control:
            args.append("--test-control")
        for scope in scopes:
            args += ["--scope", scope]
        for address in connect:
            args += ["--connect", address]
        if names is not None:
            args += ["--names", names]
        if lease is not None:
            args += ["--lease", repr(lease)]
        if join is not None:
            args += ["--join", join]
        if workers is not None:
            args += ["--workers", workers]
        environment = {**os.environ, **(env or {}), "PGREGISTRY_COOKIE": cookie}
        with contextlib.ExitStack() as files:
            stderr = files.enter_context(log.open("ab")) if log is not None else None
            popen = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr,
                                     env=environment)
        child = cls(name, popen, log)
        try:
            await child._read_id(timeout)
        except BaseException:
            child.kill()
            child.wait(STOP_GRACE)
            raise
        return child

    async def _read_id(self, timeout: float) -> None:
        stdout = self.popen.stdout
        assert stdout is not None
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        transport, _ = await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), stdout)
        try:
            line = await asyncio.wait_for(reader.readline(), timeout)
        except TimeoutError:
            raise TimeoutError(f"node {self.name} printed no NODE line within {timeout} s\n{self.log_tail()}") from None
        finally:
            transport.close()  # the node prints nothing else on stdout
        words = line.decode(errors="replace").split()
        if len(words) != 2 or words[0] != "NODE":
            self.wait(STOP_GRACE)
            raise RuntimeError(f"node {self.name} did not start ({self.state}): {line!r}\n{self.log_tail()}")
        self.id = words[1]

    def kill(self) -> None:
        """SIGKILL the child now (its peers see its connections die, no goodbye)."""
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.popen.pid, signal.SIGKILL)

    def terminate(self) -> None:
        """Ask the child to stop cleanly (SIGTERM, sent once); `wait` for it."""
        if self.popen.poll() is None and not self._terminated:
            self._terminated = True
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.popen.pid, signal.SIGTERM)

    def wait(self, timeout: float) -> int | None:
        """Wait up to `timeout` seconds for the child to exit; its status, or None."""
        try:
            status = self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            return None
        if self.popen.stdin is not None:
            self.popen.stdin.close()
        return status

    def stop(self, grace: float = STOP_GRACE) -> int:
        """SIGTERM, then SIGKILL if still running after `grace` seconds; return the status.

        Idempotent; the child is reaped when this returns.
        """
        self.terminate()
        status = self.wait(grace)
        if status is None:
            self.kill()
            status = self.popen.wait()
            if self.popen.stdin is not None:
                self.popen.stdin.close()
        return status

    def log_tail(self, limit: int = 4000) -> str:
        """The end of the child's log file ("" without one)."""
        if self.log is None or not self.log.exists():
            return ""
        return self.log.read_text(errors="replace")[-limit:]


def _keys(keys: Any) -> list[Any]:
    if type(keys) is not list or len(keys) > MAX_WORKERS:
        raise TypeError(f"keys must be a list of at most {MAX_WORKERS} keys, got {short_repr(keys, 80)}")
    return [check_key(key, "key") for key in keys]
