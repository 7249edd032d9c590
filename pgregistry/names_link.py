"""How a names service talks to the same service on other nodes (layer 7).

`NamesLink` is the plumbing between a `pgregistry.names.Names` service and the node's
connections; it knows nothing of consensus. Payloads, all terms:

    ["hello", nonce, want_reply]
        Sent when a peer comes up (and when the service starts): the peer's incarnation is
        ``(peer node id, peer creation, nonce)``, the id and creation being those of the
        connection, never fields. A core message from a peer that has not said hello is
        dropped and answered with a hello that asks for one.
    ["m", [msg, ...]]
        Core messages (`pgregistry.names_core`), batched: everything one loop iteration
        sends to one peer leaves in one payload (or a few, `BATCH` messages each).
    ["req", request_id, what, args] / ["rep", request_id, result]
        A request the service answers itself (the configuration for a join, a lease
        generation for a handoff, a forwarded update) and its reply.
    ["invite", config]
        A member telling a restarted node (a new incarnation of a member) which cluster it
        belonged to, so that it can ask to replace its old incarnation.

Messages from a peer arrive in the order sent (one connection per peer). Everything here
runs on the node's loop thread.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any, Final

from .errors import JoinRefused
from .logbudget import LogBudget
from .names_config import Incarnation
from .node import Node
from .service import Requests, fail
from .terms import short_repr

__all__ = ["NamesLink", "BATCH", "fail", "parse_config"]

log = logging.getLogger("pgregistry.names")

BATCH: Final = 512
"""Most core messages in one payload (a frame per this many messages to one peer)."""


class NamesLink:
    """Incarnations of peers, batched core messages, and requests with replies.

    `deliver(sender, msg)` is called for each core message (from a peer or from this
    node itself), `request(peer, what, args)` for each request (its return value, or an
    awaitable of it, is the reply), `invited(peer, config)` for an invite, and
    `hello(peer, incarnation)` when a peer's incarnation becomes known.
    """

    def __init__(
        self,
        node: Node,
        service: str,
        me: Incarnation,
        deliver: Callable[[Incarnation, Any], None],
        request: Callable[[str, str, list[Any]], Any],
        invited: Callable[[str, list[Any]], None],
        hello: Callable[[str, Incarnation], None],
    ) -> None:
        self.node = node
        self.service = service
        self.me = me
        self.peers: dict[str, Incarnation] = {}  # node id -> incarnation of its names service
        self._deliver = deliver
        self._invited = invited
        self._hello = hello
        self._out: dict[str, list[Any]] = {}
        self._local: list[Any] = []
        self._flush_handle: asyncio.Handle | None = None
        self._waiting_hello: dict[str, list[asyncio.Future[None]]] = {}
        self._input_log = LogBudget(log, f"names service {service!r}")
        self.requests = Requests(node, service, request, self._input_log)
        self.closed = False
        self.messages_out = 0
        self.payloads_out = 0

    # -- core messages ------------------------------------------------------------------

    def send(self, dest: Incarnation, msg: tuple[Any, ...]) -> None:
        """Queue `msg` for the incarnation `dest`; dropped if that incarnation is not the
        one connected now (a restarted node's old self never gets it)."""
        if dest == self.me:
            self._local.append(msg)
        else:
            node_id = dest[0]
            if self.peers.get(node_id) != dest:
                return
            batch = self._out.get(node_id)
            if batch is None:
                batch = self._out[node_id] = []
            batch.append(msg)
        if self._flush_handle is None and not self.closed:
            self._flush_handle = asyncio.get_running_loop().call_soon(self.flush)

    def flush(self) -> None:
        """Send what this iteration queued: one payload per peer (split every `BATCH`)."""
        self._flush_handle = None
        out, self._out = self._out, {}
        for node_id, msgs in out.items():
            for i in range(0, len(msgs), BATCH):
                self._send_payload(node_id, ["m", msgs[i:i + BATCH]])
            self.messages_out += len(msgs)
        local, self._local = self._local, []
        for msg in local:
            self._deliver(self.me, msg)

    def _send_payload(self, node_id: str, payload: list[Any]) -> None:
        try:
            # Core messages are built from checked terms (names, pids, ints, tuples).
            self.node.send_service(node_id, self.service, payload, trusted=True)
            self.payloads_out += 1
        except ValueError:
            # Over the peer's frame limit: send the messages one by one; one that is too
            # big alone is dropped (the core retries, and a name that big cannot travel).
            if payload[0] == "m" and len(payload[1]) > 1:
                for msg in payload[1]:
                    self._send_payload(node_id, ["m", [msg]])
            else:
                self._input_log.warning("names: a message to %s exceeds its frame limit; dropped", node_id)

    # -- hello ------------------------------------------------------------------------------

    def say_hello(self, peer: str, want_reply: bool = True) -> None:
        self.node.send_service(peer, self.service, ["hello", self.me[2], want_reply], trusted=True)

    async def wait_hello(self, peer: str, timeout: float) -> Incarnation:
        """The incarnation of `peer`'s names service, once it said hello (`TimeoutError`)."""
        if peer not in self.peers:
            fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._waiting_hello.setdefault(peer, []).append(fut)
            self.say_hello(peer)
            try:
                await asyncio.wait_for(fut, timeout)
            except TimeoutError:
                raise TimeoutError(f"{peer} runs no names service {self.service!r} (no answer within "
                                   f"{timeout:.3g} s)") from None
        return self.peers[peer]

    def peer_down(self, peer: str) -> None:
        self.peers.pop(peer, None)
        self._out.pop(peer, None)
        self.requests.peer_down(peer)

    # -- requests ---------------------------------------------------------------------------

    async def call(self, peer: str, what: str, args: list[Any], timeout: float) -> Any:
        """Ask `peer`'s names service `what`; its reply. `NoProcess` if `peer` is not
        connected or goes down first, `TimeoutError` after `timeout` seconds."""
        return await self.requests.call(peer, what, args, timeout)

    # -- input ------------------------------------------------------------------------------

    def on_payload(self, peer: str, payload: Any) -> None:
        """Handle one payload from `peer` (malformed ones are logged and dropped)."""
        if type(payload) is not list or not payload or type(payload[0]) is not str:
            self._input_log.warning("names: malformed payload from %s: %s", peer, short_repr(payload, 200))
            return
        kind = payload[0]
        if kind == "m" and len(payload) == 2 and type(payload[1]) is list:
            sender = self.peers.get(peer)
            if sender is None:
                self.say_hello(peer)  # it knows us, we do not know it (yet): ask
                return
            for msg in payload[1]:
                self._deliver(sender, msg)
        elif kind == "hello" and len(payload) == 3 and type(payload[1]) is int and type(payload[2]) is bool:
            stats = self.node.connection_stats(peer)
            if stats is None:
                return
            inc = (peer, stats["creation"], payload[1])
            known = self.peers.get(peer) == inc
            self.peers[peer] = inc
            if payload[2]:
                self.say_hello(peer, want_reply=False)
            for fut in self._waiting_hello.pop(peer, []):
                if not fut.done():
                    fut.set_result(None)
            if not known:
                self._hello(peer, inc)
        elif kind == "invite" and len(payload) == 2 and type(payload[1]) is list:
            self._invited(peer, payload[1])
        elif not self.requests.on_payload(peer, payload):
            self._input_log.warning("names: malformed payload from %s: %s", peer, short_repr(payload, 200))

    def bad_message(self, peer: str, why: str, msg: Any) -> None:
        """Log (within the budget) a core message refused as malformed or hostile."""
        self._input_log.warning("names: refused a message from %s (%s): %s", peer, why, short_repr(msg, 200))

    def close(self) -> None:
        self.closed = True
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        self.requests.close()


def parse_config(config: Any, peer: str) -> tuple[str, int, list[Incarnation], float, int]:
    """A "config" reply's ``[cluster_id, epoch, members, lease, shard_count]``, checked;
    `JoinRefused` naming `peer` if it is malformed."""
    try:
        cluster_id, epoch, members, lease, shard_count = config
        incs = [(str(m[0]), int(m[1]), int(m[2])) for m in members]
        if type(cluster_id) is not str or type(epoch) is not int or not incs:
            raise ValueError
        return cluster_id, epoch, incs, float(lease), int(shard_count)
    except (TypeError, ValueError, IndexError):
        raise JoinRefused(f"{peer} sent a malformed names configuration: {short_repr(config, 200)}") from None
