"""Worker functions of ``bench/workers.py``: module-level async functions, so every node
of the bench (each a copy of that script, with ``bench/`` first on ``sys.path``) names
them by the same import path, ``_workers_fns:<name>``."""

from __future__ import annotations

from typing import Any

import pgregistry as pgr


async def idle() -> None:
    """A worker that does nothing: it takes every message (ShouldRestart included) and waits."""
    while True:
        await pgr.receive()


class Echo(pgr.Server):
    """A `Server` worker that answers every call with its request."""

    async def handle_call(self, request: Any, caller: pgr.Pid) -> Any:
        return request


async def echo() -> None:
    """The `Echo` server as a worker."""
    await Echo.serve()
