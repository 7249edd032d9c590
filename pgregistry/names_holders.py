"""The processes of one node that hold names by consensus, as its names service sees them (layer 7).

`Holders` turns the core's grant and revoke events into what happens to processes: a
holder's exit releases its names; a holder that stops being valid without asking (its
node's lease lapsed, another value was decided) is killed with reason ``"lost_quorum"``
or sent `NameLost`; a grant that no caller on this node waits for (an outcome in doubt
decided late) is let go at once. It knows which pids an operation of this node may make
holders (`expect`) and which another node is handing a name to (`expect_handoff`).

Everything here runs on the node's loop thread. Kills and releases are deferred with
``call_soon``: an exit runs hooks inside whatever caused it, which may be the core.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Final

from .events import NameLost
from .runtime import Runtime
from .terms import Pid

__all__ = ["Holders"]

_HANDOFF_MEMORY: Final = 1024  # vouched handoff targets remembered at most (expired ones dropped)


class Holders:
    """Exit hooks, kills and notices for the holders of one names service.

    `release(name, pid)` frees `name` if `pid` still holds it here; `on_lost` is
    ``"kill"`` or ``"notify"``.
    """

    def __init__(self, runtime: Runtime, on_lost: str, release: Callable[[Any, Pid], None]) -> None:
        self._runtime = runtime
        self._on_lost = on_lost
        self._release = release
        self._loop = asyncio.get_running_loop()
        self._held_by: dict[Pid, set[Any]] = {}  # live holders of this node -> their names
        self._expected: dict[Pid, int] = {}  # pids an operation of this node may make holders
        self._handoffs: dict[Pid, float] = {}  # pids another node hands a name to -> until when
        self.step_downs = 0

    def granted(self, name: Any, pid: Pid) -> None:
        """The core granted `name` to `pid`: watch its exit (or free the name if it is gone,
        or if nobody here waits for this grant)."""
        proc = self._runtime.process(pid)
        if proc is None:  # it exited while its name was being decided
            self._loop.call_soon(self._release, name, pid)
            return
        held = self._held_by.get(pid)
        if held is None:
            held = self._held_by[pid] = set()
            proc.add_exit_hook(self, self._exited)
        held.add(name)
        if pid not in self._expected and self._handoffs.get(pid, 0.0) < self._loop.time():
            # An outcome in doubt decided late (say by another node's read after this node's
            # caller gave up): nobody here waits for it.
            self._loop.call_soon(self._release, name, pid)

    def revoked(self, name: Any, pid: Pid, token: int, why: str) -> None:
        """The core revoked `pid`'s grant of `name`; `why` as `pgregistry.names_core` says."""
        held = self._held_by.get(pid)
        if held is not None:
            held.discard(name)
            if not held:
                del self._held_by[pid]
                proc = self._runtime.process(pid)
                if proc is not None:
                    proc.remove_exit_hook(self)
        if why in ("lapse", "lost"):
            self.lost(name, pid, token)

    def lost(self, name: Any, pid: Pid, token: int) -> None:
        """`pid` stopped being the valid holder of `name` without asking: kill or notify it."""
        self.step_downs += 1
        if self._runtime.process(pid) is None:
            return
        if self._on_lost == "kill":
            self._loop.call_soon(self._runtime.exit, pid, "lost_quorum")
        else:
            self._runtime.send(pid, NameLost(name, pid, token))

    @contextmanager
    def expect(self, pid: Pid | None) -> Iterator[None]:
        """While the block runs, a grant to `pid` is awaited here (None: no pid)."""
        if pid is None:
            yield
            return
        self._expected[pid] = self._expected.get(pid, 0) + 1
        try:
            yield
        finally:
            count = self._expected.pop(pid) - 1
            if count:
                self._expected[pid] = count

    def expect_handoff(self, pid: Pid, within: float) -> None:
        """Another node is about to hand a name to `pid`: its grant is awaited for `within` s."""
        now = self._loop.time()
        self._handoffs[pid] = now + within
        if len(self._handoffs) > _HANDOFF_MEMORY:
            self._handoffs = {p: t for p, t in self._handoffs.items() if t >= now}

    def _exited(self, pid: Pid, reason: Any) -> None:
        names = self._held_by.pop(pid, ())
        if names:
            self._loop.call_soon(self._release_all, list(names), pid)

    def _release_all(self, names: list[Any], pid: Pid) -> None:
        for name in names:
            self._release(name, pid)
