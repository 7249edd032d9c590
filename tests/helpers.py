"""Helpers shared by the registry tests: a node with a registry, and agent processes.

An *agent* is a process that runs the callables sent to it, inside itself, and replies
with the result. Tests use agents to act as several processes (register as them, exit
them) without writing a message protocol each time.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any, AsyncIterator, Callable

from pgregistry.events import Down
from pgregistry.node import Node
from pgregistry.process import current_process, receive, send
from pgregistry.process import exit as exit_process
from pgregistry.registry import Registry
from pgregistry.terms import Pid

RECEIVE_TIMEOUT = 5.0


@contextlib.asynccontextmanager
async def started_registry(keys: str = "duplicate", name: str = "reg",
                           **options: Any) -> AsyncIterator[tuple[Node, Registry]]:
    """A started node (entered by the calling task) and a registry on it."""
    async with Node("test") as node:
        reg = await Registry.start(node, name, keys=keys, **options)
        yield node, reg


async def _agent_loop() -> None:
    while True:
        msg = await receive()
        if msg == "stop":
            return
        if isinstance(msg, tuple) and len(msg) == 3 and msg[0] == "run":
            _tag, fn, result = msg
            try:
                result.set_result(fn())
            except Exception as exc:  # handed back to the test, which re-raises it
                result.set_exception(exc)
        elif isinstance(msg, tuple) and len(msg) == 2 and msg[0] == "raise":
            raise msg[1]


def spawn_agent(node: Node) -> Pid:
    return node.spawn(_agent_loop)


async def run_as(agent: Pid, fn: Callable[[], Any]) -> Any:
    """Run `fn` inside the agent process; return its result or raise its exception.

    The result comes back through a future, not the caller's mailbox, so whatever the
    registry sends the caller meanwhile stays there, in order, for the test to check.
    """
    result: asyncio.Future = asyncio.get_running_loop().create_future()
    send(agent, ("run", fn, result))
    return await asyncio.wait_for(result, RECEIVE_TIMEOUT)


async def stop_agent(agent: Pid, how: str = "stop") -> Any:
    """End an agent ("stop": normally, "crash": by an exception, "kill": by exit(pid, "kill")).

    Returns the exit reason.

    Returns once the exit is complete: the registry has removed the agent's entries.
    """
    process = current_process().runtime.process(agent)
    assert process is not None and process.task is not None, f"{agent!r} is not a live local agent"
    if how == "kill":
        exit_process(agent, "kill")
    else:
        send(agent, ("raise", RuntimeError("agent crashed on purpose")) if how == "crash" else "stop")
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
