"""What a node service is, and which peers run it (layer 3).

A *service* is an object attached to a `pgregistry.node.Node` under a name
(`Node.attach_service`); the services of one name on different nodes talk to each other
through their nodes' connections (`Node.send_service`). A registry scope
(`pgregistry.scope.ScopeServer`) is one; the name, placement and discovery services are
the next. `Service` is the interface the node calls; `PeerDiscovery` is the exchange
every service needs to learn which connected nodes run it too.

Everything here runs on the node's loop thread.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, Final, Protocol

__all__ = ["Service", "PeerDiscovery", "DISCOVER"]

DISCOVER: Final = "discover"
"""The tag of the payload ``[DISCOVER]`` that asks a peer node whether it runs the service."""


class Service(Protocol):
    """What `Node.attach_service` expects of a service.

    The node calls the four ``peer_*`` methods on its loop thread and tolerates a
    service that lacks one of them; `close` is required (`Node.stop` calls it). An
    exception raised by any of them is logged and the node carries on; an awaitable
    returned by ``peer_up`` or ``peer_down`` is run as a task (its failure logged).
    Order around one peer: ``peer_up`` after node monitors got ``NodeUp``; ``peer_down``
    after the monitors of that peer's processes fired and before node monitors get
    ``NodeDown``.
    """

    def peer_up(self, peer: str) -> Awaitable[None] | None:
        """The connection to the node `peer` was confirmed (after the attach)."""

    def peer_down(self, peer: str, reason: str) -> Awaitable[None] | None:
        """The connection to `peer` is lost; `reason` is a NodeDown reason (`REPLACED`...)."""

    def peer_message(self, peer: str, payload: Any) -> None:
        """`payload` (a term) arrived from the service of this name on `peer`."""

    def peer_absent(self, peer: str) -> None:
        """`peer` answered a message of ours: no service of this name runs there."""

    def stat(self) -> dict[str, Any]:
        """Counters and sizes for status and metrics: a flat dict of str keys, cheap to build."""

    async def drain(self, timeout: float) -> None:
        """Finish what is under way toward peers, within `timeout` seconds, for a graceful stop.

        Raises `TimeoutError` if that takes longer; cancellation stops the wait and
        leaves the service running as it was (nothing is dropped or half-sent).
        """

    def close(self) -> Awaitable[None] | None:
        """Stop serving (called by `Node.stop`, awaited when it returns an awaitable)."""


class PeerDiscovery:
    """Which connected nodes have answered whether they run one service.

    A service cannot know whether a newly connected node runs it too until it asks: it
    sends ``[DISCOVER]`` (`discover`) when it starts and whenever a peer comes up. The
    peer's service answers with whatever the service's protocol says (a scope: a sync
    round and a discover of its own), and a node that runs no service of that name
    answers at the node level ("no such service": the service's ``peer_absent``). Each
    of those, and the peer going down, is an answer (`answered`). `settled` waits until
    every discover sent has been answered, so that a barrier over "the peers that run
    this service" does not miss a peer that was about to say it runs it.
    """

    __slots__ = ("_send", "_asked", "_waiters", "_stopped")

    def __init__(self, send: Callable[[str, list[Any]], None]) -> None:
        """`send(peer, payload)` sends a payload to this service on the node `peer`."""
        self._send = send
        self._asked: set[str] = set()  # peers sent a discover that has not been answered
        self._waiters: list[asyncio.Future[None]] = []  # `settled` calls waiting for them
        self._stopped: Callable[[], BaseException] | None = None

    @property
    def pending(self) -> int:
        """How many peers have not answered a discover yet."""
        return len(self._asked)

    def is_asked(self, peer: str) -> bool:
        """True if a discover was sent to `peer` and it has not answered yet."""
        return peer in self._asked

    def discover(self, peer: str) -> None:
        """Ask `peer` whether it runs this service (``[DISCOVER]``)."""
        self._asked.add(peer)
        self._send(peer, [DISCOVER])

    def answered(self, peer: str) -> bool:
        """`peer` answered (a discover or the protocol's reply, absent, or gone).

        Returns True if a discover of ours to it was still unanswered: a service that
        gets a discover from a peer it had asked need not ask back.
        """
        if peer not in self._asked:
            return False
        self._asked.discard(peer)
        if not self._asked and self._waiters:
            for waiter in self._waiters:
                if not waiter.done():
                    waiter.set_result(None)
            self._waiters.clear()
        return True

    async def settled(self, timeout: float) -> None:
        """Wait until every peer asked so far has answered (at once if none is pending).

        `TimeoutError` after `timeout` seconds; the error `close` makes if the
        service stops meanwhile. Cancellation only ends this wait.
        """
        if self._stopped is not None:
            raise self._stopped()
        if not self._asked:
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        await asyncio.wait_for(waiter, timeout)

    def close(self, error: Callable[[], BaseException]) -> None:
        """Forget every peer; each `settled` call, waiting now or made later, raises ``error()``."""
        self._stopped = error
        self._asked.clear()
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_exception(error())
        self._waiters.clear()
