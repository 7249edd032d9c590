"""What a node service is, and which peers run it (layer 3).

A *service* is an object attached to a `pgregistry.node.Node` under a name
(`Node.attach_service`); the services of one name on different nodes talk to each other
through their nodes' connections (`Node.send_service`). A registry scope
(`pgregistry.scope.ScopeServer`) is one; the name, placement and discovery services are
the next. `Service` is the interface the node calls; `PeerDiscovery` is the exchange
every service needs to learn which connected nodes run it too; `Requests` carries the
requests a service asks of its peer services and their replies.

Everything here runs on the node's loop thread.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, Final, Protocol

from .errors import NoProcess, NoQuorum
from .logbudget import LogBudget
from .terms import short_repr

__all__ = ["Service", "PeerDiscovery", "Requests", "DISCOVER", "fail"]

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


class Requests:
    """Requests to the services of one name on other nodes, and their replies.

    A request is the payload ``["req", request_id, what, args]`` and its reply
    ``["rep", request_id, result]``. `handle(peer, what, args)` answers the requests that
    arrive (its return value, or an awaitable of it, is the result); a `TypeError`,
    `ValueError` or `LookupError` it raises, or an awaitable's failure, becomes the result
    ``["error", "TypeName: message"]``. The owner of this object passes it the payloads
    whose tag is ``"req"`` or ``"rep"`` (`on_payload`) and tells it of peers going down.
    """

    __slots__ = ("_node", "_service", "_handle", "_log", "_next", "_replies", "_closed")

    def __init__(self, node: Any, service: str, handle: Callable[[str, str, list[Any]], Any],
                 log: LogBudget) -> None:
        """`node` is the `pgregistry.node.Node` (its ``send_service``), `service` the name."""
        self._node = node
        self._service = service
        self._handle = handle
        self._log = log
        self._next = 0
        self._replies: dict[int, tuple[str, asyncio.Future[Any]]] = {}
        self._closed = False

    async def call(self, peer: str, what: str, args: list[Any], timeout: float) -> Any:
        """Ask `peer`'s service `what` with `args` (terms); its result.

        `NoProcess` if `peer` is not connected or goes down before it answers,
        `TimeoutError` after `timeout` seconds, `RuntimeError` once `close` was called.
        On timeout or cancellation the request is forgotten: a late reply is dropped.
        """
        if self._closed:
            raise RuntimeError(f"service {self._service!r} stopped")
        self._next += 1
        rid = self._next
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        if not self._node.send_service(peer, self._service, ["req", rid, what, args]):
            raise NoProcess(f"{peer} is not connected", reason="noconnection")
        self._replies[rid] = (peer, fut)
        if timeout is None or not timeout > 0:  # (wait_for: what it did for these before)
            try:
                return await asyncio.wait_for(fut, timeout)
            finally:
                self._replies.pop(rid, None)
        # A timer rather than wait_for: the reply wakes the caller without a loop turn between.
        timer = fut.get_loop().call_later(timeout, _time_out, fut)
        try:
            return await fut
        finally:
            timer.cancel()
            self._replies.pop(rid, None)

    def on_payload(self, peer: str, payload: list[Any]) -> bool:
        """Handle a ``"req"`` or ``"rep"`` payload from `peer`; False if it is neither or malformed."""
        kind = payload[0] if payload else None
        if kind == "req" and len(payload) == 4 and type(payload[2]) is str and type(payload[3]) is list:
            try:
                result = self._handle(peer, payload[2], payload[3])
            except (TypeError, ValueError, LookupError) as e:
                result = ["error", f"{type(e).__name__}: {e}"]
            self._answer(peer, payload[1], result)
            return True
        if kind == "rep" and len(payload) == 3:
            entry = self._replies.pop(payload[1], None) if type(payload[1]) is int else None
            if entry is not None and entry[0] == peer and not entry[1].done():
                entry[1].set_result(payload[2])
            return True
        return False

    def _answer(self, peer: str, rid: Any, result: Any) -> None:
        if asyncio.isfuture(result) or asyncio.iscoroutine(result):
            asyncio.ensure_future(self._answer_when_done(peer, rid, result))
            return
        if self._closed:
            return
        try:
            self._node.send_service(peer, self._service, ["rep", rid, result])
        except (TypeError, ValueError) as e:
            # A result that is no term or too big for the peer: the asker gets the reason.
            self._log.warning("service %r: a reply to %s cannot be sent (%s)", self._service, peer, e)
            self._node.send_service(peer, self._service, ["rep", rid, ["error", f"{type(e).__name__}: {e}"]])

    async def _answer_when_done(self, peer: str, rid: Any, awaitable: Any) -> None:
        """Answer with `awaitable`'s outcome from the task that ran it (not a loop turn later)."""
        try:
            result = await awaitable
        except asyncio.CancelledError:
            self._answer(peer, rid, ["error", "cancelled"])
            raise
        except Exception as exc:
            result = ["error", f"{type(exc).__name__}: {exc}"]
        self._answer(peer, rid, result)

    def peer_down(self, peer: str) -> None:
        """`peer` went down: its unanswered requests raise `NoProcess`."""
        for rid, (node_id, fut) in list(self._replies.items()):
            if node_id == peer:
                del self._replies[rid]
                if not fut.done():
                    fail(fut, NoProcess(f"{peer} went down before it answered", reason="noconnection"))

    def close(self) -> None:
        """Fail every unanswered request with `RuntimeError`; later calls raise it at once."""
        self._closed = True
        for _peer, fut in self._replies.values():
            if not fut.done():
                fail(fut, RuntimeError(f"service {self._service!r} stopped"))
        self._replies.clear()


def _time_out(fut: asyncio.Future[Any]) -> None:
    if not fut.done():
        fut.set_exception(TimeoutError())


def fail(fut: asyncio.Future[Any], exc: BaseException) -> None:
    """Fail `fut` with `exc` without a "never retrieved" log if its waiter is gone (its wait
    timed out or was cancelled): the error is for whoever still waits, nobody else."""
    fut.set_exception(exc)
    fut.exception()


_REPLY_ERRORS: Final[dict[str, type[Exception]]] = {
    "NoProcess": NoProcess, "NoQuorum": NoQuorum, "TypeError": TypeError, "ValueError": ValueError,
}


def error_reply(reply: Any) -> str | None:
    """The message of an ``["error", message]`` reply; None for any other reply."""
    if type(reply) is list and reply and reply[0] == "error":
        return str(reply[1]) if len(reply) > 1 else "error"
    return None


def check_reply(reply: Any, peer: str, what: str) -> list[Any]:
    """`reply` if it is ``["ok", ...]``; the error it names otherwise.

    An error named `NoProcess`, `NoQuorum`, `TypeError` or `ValueError` raises that
    type, any other `ValueError`; a reply of neither shape `NoProcess` (the peer speaks
    another protocol); each message names `peer`.
    """
    message = error_reply(reply)
    if message is not None:
        kind = message.partition(":")[0]
        if kind in _REPLY_ERRORS:
            raise _REPLY_ERRORS[kind](f"{peer}: {message}")
        raise ValueError(f"{peer} refused a {what} request: {message}")
    if type(reply) is not list or not reply or reply[0] != "ok":
        raise NoProcess(f"{peer} answered a {what} request with {short_repr(reply, 100)}")
    return reply
