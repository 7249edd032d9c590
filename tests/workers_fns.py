"""Worker functions for the `Workers` tests: module-level, so every node (in this process
or another) names them by the same import path."""

from __future__ import annotations

from typing import Any

import pgregistry as pgr
from pgregistry.events import DieNow, HandoffState, ShouldRestart


class Counter(pgr.Server):
    """A worker that counts, says where it runs and keeps the service's messages it got."""

    async def init(self, start: int = 0) -> None:
        self.count = start
        self.seen: list[Any] = []

    async def handle_call(self, request: Any, caller: pgr.Pid) -> Any:
        if request == "get":
            return self.count
        if request == "where":
            return pgr.self().node
        if request == "seen":
            return [list(m) for m in self.seen]
        if type(request) is tuple and request[0] == "add":
            self.count += request[1]
            return self.count
        raise ValueError(f"unknown request {request!r}")

    async def handle_cast(self, msg: Any) -> None:
        self.count += msg

    async def handle_info(self, msg: Any) -> None:
        if type(msg) is HandoffState:
            self.count = msg.state
        elif type(msg) in (ShouldRestart, DieNow):
            self.seen.append((type(msg).__name__, msg.name))
        elif type(msg) is tuple and msg[0] == "add":
            self.count += msg[1]


async def counter(start: int = 0) -> None:
    await Counter.serve(start)


async def other(start: int = 0) -> None:
    """Listed by some nodes only."""
    await Counter.serve(start)


async def not_listed() -> None:
    await Counter.serve(0)


RAN: list[tuple[Any, pgr.Pid]] = []
"""``(name, pid)`` of every `logged` worker that ran its code, in this OS process (for the
exact tests: an instance that lost its name must never get here)."""


async def logged(name: Any) -> None:
    RAN.append((name, pgr.self()))
    await Counter.serve(0)
