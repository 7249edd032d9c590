"""Helpers shared by the registry tests: a node with a registry, and agent processes.

An *agent* is a process that runs the callables sent to it, inside itself, and replies
with the result. Tests use agents to act as several processes (register as them, exit
them) without writing a message protocol each time.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from pgregistry.events import Down, Join, Leave, Update
from pgregistry.node import Node
from pgregistry.process import current_process, receive
from pgregistry.registry import Registry
from pgregistry.terms import Pid
from pgregistry.testing import Partition

RECEIVE_TIMEOUT = 5.0


@contextlib.asynccontextmanager
async def started_registry(keys: str = "duplicate", name: str = "reg",
                           **options: Any) -> AsyncIterator[tuple[Node, Registry]]:
    """A started node (entered by the calling task) and a registry on it."""
    async with Node("test") as node:
        reg = await Registry.start(node, name, keys=keys, **options)
        yield node, reg


async def _agent_loop(inbox: list[Any] | None = None) -> None:
    while True:
        msg = await receive()
        if msg == "stop":
            return
        if isinstance(msg, tuple) and len(msg) == 3 and msg[0] == "run":
            _tag, fn, result = msg
            try:
                value = fn()
                if inspect.isawaitable(value):  # a coroutine runs as the agent, too
                    value = await value
                result.set_result(value)
            except Exception as exc:  # handed back to the test, which re-raises it
                result.set_exception(exc)
        elif isinstance(msg, tuple) and len(msg) == 2 and msg[0] == "raise":
            raise msg[1]
        elif inbox is not None:
            inbox.append(msg)


# Which node each agent runs on: `run_as` hands work to an agent directly, in-process, so
# that a test can drive processes of several nodes (the registry traffic under test
# still goes over the nodes' connections).
_agent_nodes: dict[Pid, Node] = {}


def spawn_agent(node: Node, inbox: list[Any] | None = None) -> Pid:
    """A process of `node` that runs what `run_as` sends it; other messages go to `inbox`."""
    pid = node.spawn(_agent_loop, inbox)
    _agent_nodes[pid] = node
    return pid


def _agent_process(agent: Pid) -> Any:
    """The live process of an agent (or of any process of the caller's node)."""
    node = _agent_nodes.get(agent)
    runtime = node.runtime if node is not None else current_process().runtime
    process = runtime.process(agent)
    assert process is not None and process.task is not None, f"{agent!r} is not a live local process"
    return process


async def eventually(predicate: Callable[[], bool | Awaitable[bool]], timeout: float = 5.0,
                     what: str = "condition", report: Callable[[], str] | None = None) -> None:
    """Poll `predicate` until it holds; `AssertionError` after `timeout` seconds.

    `predicate` may be async (it is awaited at each poll). `report`, if given, is called
    on failure and its text added to the error.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not await _holds(predicate):
        if loop.time() > deadline:
            detail = f"\n{report()}" if report is not None else ""
            raise AssertionError(f"{what} did not hold within {timeout:.1f} s{detail}")
        await asyncio.sleep(0.005)


async def _holds(predicate: Callable[[], bool | Awaitable[bool]]) -> bool:
    result = predicate()
    return bool(await result) if inspect.isawaitable(result) else bool(result)


async def run_as(agent: Pid, fn: Callable[[], Any]) -> Any:
    """Run `fn` inside the agent process; return its result or raise its exception.

    If `fn` returns an awaitable, the agent awaits it (as itself) and returns that result.

    The result comes back through a future, not the caller's mailbox, so whatever the
    registry sends the caller meanwhile stays there, in order, for the test to check.
    """
    result: asyncio.Future = asyncio.get_running_loop().create_future()
    _agent_process(agent).deliver(("run", fn, result))
    return await asyncio.wait_for(result, RECEIVE_TIMEOUT)


async def stop_agent(agent: Pid, how: str = "stop") -> Any:
    """End an agent ("stop": normally, "crash": by an exception, "kill": by exit(pid, "kill")).

    Returns the exit reason.

    Returns once the exit is complete: the registry has removed the agent's entries.
    """
    process = _agent_process(agent)
    if how == "kill":
        process.runtime.exit(agent, "kill")
    else:
        process.deliver(("raise", RuntimeError("agent crashed on purpose")) if how == "crash" else "stop")
    await asyncio.wait({process.task}, timeout=RECEIVE_TIMEOUT)
    assert not process.alive, f"{agent!r} did not stop in time"
    return process.exit_reason


async def wait_down(ref: Any) -> Any:
    """The reason of the `Down` for `ref`, skipping (and dropping) other messages."""
    while True:
        msg = await receive(RECEIVE_TIMEOUT)
        if isinstance(msg, Down) and msg.ref == ref:
            return msg.reason


async def drain(timeout: float = 0.0) -> list[Any]:
    """Every message already in the caller's mailbox (nothing is awaited when timeout=0)."""
    out = []
    while True:
        try:
            out.append(await receive(timeout))
        except TimeoutError:
            return out


def apply_event(view: dict[Any, list[tuple[Pid, Any]]], event: Any) -> None:
    """Apply one subscriber event to a replayed view; `AssertionError` if it cannot apply."""
    entries = view.setdefault(event.key, [])
    if isinstance(event, Join):
        entries.extend(event.entries)
    elif isinstance(event, Leave):
        for entry in event.entries:
            assert entry in entries, f"{event!r} removes {entry!r}, which the subscriber never saw"
            entries.remove(entry)
    elif isinstance(event, Update):
        for pid, old, new in event.changes:
            assert (pid, old) in entries, f"{event!r} updates {(pid, old)!r}, which the subscriber never saw"
            entries.remove((pid, old))
            entries.append((pid, new))
    if not entries:
        del view[event.key]


@contextlib.asynccontextmanager
async def registry_cluster(count: int, cookie: str, keys: str = "duplicate", listeners: tuple[str, ...] = (),
                           last_node_options: dict[str, Any] | None = None,
                           **node_options: Any) -> AsyncIterator[list[tuple[Node, Registry]]]:
    """`count` connected nodes ``n0``, ``n1``, ... in this loop, each running registry "r".

    `node_options` go to every node, `last_node_options` to the last one only (a node
    that differs from the others). Yields once the mesh is full and every registry synced.
    """
    async with contextlib.AsyncExitStack() as stack:
        members = []
        for i in range(count):
            options = {**node_options, **(last_node_options or {})} if i == count - 1 else node_options
            node = await stack.enter_async_context(Node(f"n{i}", cookie=cookie, **options))
            members.append((node, await Registry.start(node, "r", keys=keys, listeners=listeners)))
        for node, _reg in members[1:]:
            await node.connect(members[0][0].id)
        for node, _reg in members:
            await eventually(lambda node=node: len(node.peers()) == count - 1, what="full mesh")
        for _node, reg in members:
            await reg.sync()
        yield members


async def proxied_links(stack: contextlib.AsyncExitStack, nodes: list[Node]) -> Partition:
    """A started `Partition` with a proxy on every directed link between `nodes` (closed
    with `stack`); each node dials each other one through its proxy, so that a test can
    split and heal them. Call it before the nodes connect."""
    part = Partition.for_targets({n.name: f"{n.host}:{n.port}" for n in nodes})
    await part.start()
    stack.push_async_callback(part.close)
    for src in nodes:
        for dst in nodes:
            if src is not dst:
                src.add_route(dst.id, part.address(src.name, dst.name))
    return part


async def poll(probe: Callable[[], Any], what: str, timeout: float, interval: float = 0.02) -> Any:
    """Call `probe` (sync or async) until it returns something other than None or False;
    that result. `AssertionError` naming `what` after `timeout` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        result = probe()
        if inspect.isawaitable(result):
            result = await result
        if result is not None and result is not False:
            return result
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(interval)


class ChildProcess:
    """What every test harness of node OS processes needs of one child: signals and its log."""

    proc: asyncio.subprocess.Process
    log: Any  # a pathlib.Path

    def signal(self, sig: int) -> None:
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, sig)

    def logs(self, limit: int | None = 3000) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return text if limit is None else text[-limit:]
