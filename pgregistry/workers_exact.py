"""An exact `Workers` service: each worker's name taken by consensus (layer 7).

With ``Workers.start(..., names=names_service)``, the ring still says *where* a worker
starts, but *whether* it runs is decided by the names cluster: worker `key` of service
`s` is the names entry ``("pgregistry.workers", s, key)``. A start on the owner is
`pgregistry.names.Names.get_or_start` (the new process waits for the name before it runs
any of the worker's function, and is killed if another instance won), a hand-off is
`Names.update` (compare-and-set on the fencing token), lookups read the names service.
So a name never has two valid holders, even while nodes disagree on the ring, and a
minority raises `NoQuorum` instead of starting a second instance. No ``adopt``,
``done`` or ``DieNow`` is needed: the names cluster already knows every holder.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, Final

from .events import HandoffState
from .names import Names
from .node import Node
from .terms import Pid, short_repr

__all__ = ["ExactNames", "ENTRY_TAG"]

ENTRY_TAG: Final = "pgregistry.workers"
"""The first element of every names entry of an exact workers service."""


class ExactNames:
    """The names side of one exact workers service."""

    __slots__ = ("names", "service", "_runtime")

    def __init__(self, names: Any, node: Node, service: str) -> None:
        """`ValueError` unless `names` is a `Names` service running on `node`."""
        if not isinstance(names, Names):
            raise TypeError(f"names must be a pgregistry Names service or None, got {short_repr(names, 60)}")
        if names.node is not node:
            raise ValueError(f"names service {names.service!r} runs on {names.node.id}, not on {node.id}")
        if names.closed:
            raise ValueError(f"names service {names.service!r} is stopped")
        self.names = names
        self.service = service
        self._runtime = node.runtime

    @property
    def cluster_id(self) -> str:
        """The names cluster this node belongs to: every node of the service must share it."""
        return self.names.cluster_id

    def entry(self, name: Any) -> tuple[str, str, Any]:
        return (ENTRY_TAG, self.service, name)

    def whereis_here(self, name: Any) -> Pid | None:
        """The valid holder as this node knows it (a local read)."""
        return self.names.whereis_name((ENTRY_TAG, self.service, name))

    async def whereis(self, name: Any, timeout: float) -> Pid | None:
        """The holder as this node knows it, else as a majority decided (`NoQuorum`)."""
        pid = self.names.whereis_name((ENTRY_TAG, self.service, name))
        if pid is not None:
            return pid
        found = await self.names.lookup((ENTRY_TAG, self.service, name), timeout)
        return None if found is None else found[0]

    async def start(self, name: Any, fn: Callable[..., Awaitable[Any]], args: list[Any], timeout: float) -> Pid:
        """The holder of the name, or a new process of this node running ``fn(*args)`` that
        won it (it runs nothing of ``fn`` before). `NoQuorum` after `timeout`."""
        return await self.names.get_or_start((ENTRY_TAG, self.service, name), fn, *args, timeout=timeout)

    async def handoff(self, name: Any, fn: Callable[..., Awaitable[Any]], args: list[Any], state: Any,
                      token: int, timeout: float) -> Pid:
        """Start ``fn(*args)`` here with ``HandoffState(name, state)`` first and hand it the
        name if its token is still `token`; the new pid. It runs nothing of ``fn`` unless it
        got the name. `ValueError` if the token moved on, `NoQuorum` after `timeout`."""
        gate: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        pid = self._runtime.spawn(_gated, gate, fn, *args)
        self._runtime.send(pid, HandoffState(name, state))
        try:
            moved = await self.names.update((ENTRY_TAG, self.service, name), pid, token, timeout)
        except BaseException:
            self._runtime.exit(pid, "kill")
            raise
        if not moved:
            self._runtime.exit(pid, "kill")
            raise ValueError(f"{short_repr(name)} is no longer held with token {token}: not handed off")
        gate.set_result(None)
        return pid

    def token(self, name: Any) -> int | None:
        return self.names.token((ENTRY_TAG, self.service, name))

    async def unregister(self, name: Any, timeout: float) -> bool:
        """Free the name if a process of this node holds it."""
        return await self.names.unregister_name((ENTRY_TAG, self.service, name), timeout)


async def _gated(gate: asyncio.Future[None], fn: Callable[..., Awaitable[Any]], *args: Any) -> Any:
    """A hand-off's new worker: runs ``fn`` only once it holds the name."""
    await gate
    return await fn(*args)
