"""`Workers`: named workers spread over the nodes by consistent hashing (layer 7).

A workers service runs on every node that hosts it. Each name has one *owner*, the node
its key hash falls to on a `pgregistry.placement.Ring` of the nodes running the service;
the owner starts the name's worker as its own process and answers for it. Nothing is
broadcast while the nodes stay the same: a lookup or a start is one request to the owner,
and a worker costs the other nodes nothing.

When the nodes change, every node rescans its workers (cached hashes) and tells each new
owner, in one batched ``adopt``, which of its workers that owner now answers for. A
worker whose owner moved gets `ShouldRestart` and keeps running until it exits (it is
never killed for it). After a ring change, a start (or a lookup that would find
nothing) of a name the node does not hold waits until every other node of the new ring
said it sent everything (``done``), for at most the node's ``down_after``: a node that
joins or comes back may run workers that others now answer for, so nodes that agree on
the ring never start a second worker. After a
partition heals, two instances of a name may meet at their owner: the owner keeps its
own, else the first one it was told of, and every other gets `DieNow`, is unregistered
at once and exited with reason ``"dienow"`` a second later. While a partition lasts,
each side may start its own instance: that is the price of needing no majority.

Workers are started from functions the service lists (`functions=`): a peer names one by
its import path and a node runs only what its own list holds. Arguments are terms.

Protocol between the services of one name (payloads are terms):

    ["hello", version, points, cluster, want_reply]   I run the service, with these placement
                                             rules (cluster: the names cluster id of an
                                             exact service, else None)
    ["bye"]                                  I stopped
    ["req", id, what, args] / ["rep", id, result]   (`pgregistry.service.Requests`)
        what: "start" [digest, name, path, args, timeout], "whereis" [digest, name],
              "unregister" [digest, name, timeout],
              "handoff" [digest, name, path, args, state, old_pid, timeout, token]
        (timeout: what the owner may spend, a share of the caller's; token: the
        holder's fencing token on an exact service, else None)
        result: ["ok", pid | None | bool], ["moved", owner, digest], ["error", message]
    ["adopt", digest, [[name, pid], ...], done]   your workers among mine (soft state)
    ["dienow", [[name, pid], ...]]           these of yours lost to another instance
    ["gone", [[name, pid], ...]]             these of mine you answered for have exited
    ["forget", [[name, pid], ...]]           these of yours were unregistered
    ["fwd", hops, name, msg, is_cast]        a send or cast by name, forwarded once at most

A request carries the sender's ring digest; a node that holds the name answers whatever
its view, one that neither holds nor owns it answers ``moved``. The sender follows one
redirect, then waits for its own ring to change and tries again, and raises
`RingUnsettled` at the timeout: without consensus, rings cannot be ordered, so it never
chases a node that redirects back.

Everything here runs on the node's loop thread.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, Final

from .errors import CallTimeout, NoProcess, NoQuorum, NotLocal, RingUnsettled
from .events import DieNow, HandoffState, ShouldRestart
from .logbudget import LogBudget
from .node import Node
from .placement import PLACEMENT_VERSION, Ring, key_hash
from .process import Cast, check_timeout, current_process
from .server import call as call_server
from .service import Requests, check_reply
from .terms import Pid, check_key, check_message, check_value, key_problem, short_repr
from .worker_functions import Functions, WorkerFunction
from .workers_exact import ExactNames
from .workers_table import Worker, WorkerTable

__all__ = ["Workers", "ADOPT_PART", "DIENOW_GRACE"]

log = logging.getLogger("pgregistry.workers")

ADOPT_PART: Final = 1000
"""Most ``[name, pid]`` pairs in one ``adopt``, ``gone``, ``dienow`` or ``forget`` payload."""

DIENOW_GRACE: Final = 1.0
"""Seconds a worker that lost to another instance has to exit before it is exited with ``"dienow"``."""

_MAX_HOPS: Final = 1  # a forwarded send or cast is forwarded once more at most
_OWNER_SHARE: Final = 0.9  # of a request's timeout, for the owner's own work (a names decision)
_MAX_TIMEOUT: Final = 86_400.0  # the longest timeout a request carries (a day; longer waits are the caller's)


class Workers:
    """A workers service on one node: ``await Workers.start(node, "sessions", functions=(fn,))``."""

    def __init__(self, node: Node, service: str, functions: Functions, points: int,
                 exact: ExactNames | None) -> None:
        self.node = node
        self.service = service
        self.functions = functions
        self.points = points
        self.me = node.id
        self._exact = exact
        self._announced = None if exact is None else exact.cluster_id  # the names cluster our hello named
        self._runtime = node.runtime
        self._loop = asyncio.get_running_loop()
        self._log = LogBudget(log, f"workers service {service!r}")
        self.requests = Requests(node, service, self._request, self._log)
        self.table = WorkerTable(node.id)
        self.ring = Ring([node.id], points)
        self._members: set[str] = {node.id}  # this node and the peers that said hello in agreement
        self.refused: dict[str, str] = {}  # peer -> why its placement rules were refused
        self._ring_handle: asyncio.Handle | None = None
        self._ring_waiters: list[asyncio.Future[None]] = []
        self._awaited_done: set[str] = set()  # old-ring peers yet to say "done" for this ring
        self._gate_until = 0.0
        self._gate_open = asyncio.Event()
        self._gate_open.set()
        self._last_done: dict[str, bytes] = {}  # peer -> digest of its last "done"
        self._out: dict[tuple[str, str], list[list[Any]]] = {}  # (peer, kind) -> pairs this iteration
        self._flush_handle: asyncio.Handle | None = None
        self._hook_tag = ("pgregistry.workers", service)
        self.closed = False
        self.counters = dict.fromkeys(
            ("started", "adopts_received", "should_restart", "dienow", "handoffs", "forwarded", "dropped_sends",
             "ring_changes", "redirects"), 0)
        self.last_rescan_seconds = 0.0

    # -- lifecycle ------------------------------------------------------------------------

    @classmethod
    async def start(cls, node: Node, service: str = "workers", *, functions: Iterable[Callable[..., Awaitable[Any]]],
                    points: int = 128, names: Any = None) -> Workers:
        """Start the workers service `service` on `node`, offering `functions`.

        `functions`: the module-level async functions this node may run as workers; a
        peer's request names one by import path and is refused unless it is listed here.
        `points`: virtual points per node on the ring (every node of the service must use
        the same, or it is left out of this node's ring and logged). `TypeError` naming
        a function that cannot be listed (a lambda, a closure, a bound method, a partial,
        a function of ``__main__``); `TypeError`/`ValueError` for other bad options;
        `AlreadyStarted` if `service` runs on `node` already.

        `names`: a `pgregistry.names.Names` service of this node makes the service *exact*
        (`pgregistry.workers_exact`): every node of the service must be a member of the
        same names cluster (a node of another cluster is left out of the ring, and logged),
        a worker's name is decided by that cluster, and a minority raises `NoQuorum`.
        """
        if not isinstance(node, Node):
            raise TypeError(f"node must be a pgregistry Node, got {short_repr(node, 60)}")
        if type(service) is not str or not service:
            raise TypeError(f"the service name must be a non-empty str, got {short_repr(service, 60)}")
        fns = Functions(functions)
        node.require_loop_thread("Workers.start")
        exact = None if names is None else ExactNames(names, node, service)
        self = cls(node, service, fns, points, exact)  # Ring checks points
        node.attach_service(service, self)
        for peer in node.peers():
            self._say_hello(peer, True)
        return self

    async def stop(self) -> None:
        """Stop the service on this node: its workers are exited with reason ``"shutdown"``
        and the other nodes take this node off their rings at once.

        Waits for nothing. `RuntimeError` off the node's loop thread or once stopped."""
        self._check_open("stop")
        for w in list(self.table.local()):
            self._runtime.exit(w.pid, "shutdown")
        self._flush()
        self.node.broadcast_service(self.service, ["bye"], self.ring.nodes, trusted=True)
        self.close()
        self.node.detach_service(self.service)

    def close(self) -> None:
        """Stop at once (the node calls it when it stops); the workers are left running."""
        if self.closed:
            return
        self.closed = True
        self.requests.close()
        for handle in (self._ring_handle, self._flush_handle):
            if handle is not None:
                handle.cancel()
        for w in list(self.table.local()):
            proc = self._runtime.process(w.pid)
            if proc is not None:
                proc.remove_exit_hook((self._hook_tag, w.name))
        self._wake_ring_waiters()
        self._gate_open.set()

    def __repr__(self) -> str:
        return f"<Workers {self.service!r} on {self.me}: {len(self.ring)} nodes, {len(self.table)} workers>"

    def _check_open(self, what: str) -> None:
        self.node.require_loop_thread(f"Workers.{what}")
        if self.closed:
            raise RuntimeError(f"Workers.{what}: workers service {self.service!r} is stopped")
        if self._exact is not None and self._exact.cluster_id != self._announced:
            # This node joined another names cluster since it said hello: say it again.
            self._announced = self._exact.cluster_id
            for peer in self.node.peers():
                self._say_hello(peer, True)

    # -- the ring -------------------------------------------------------------------------

    def _say_hello(self, peer: str, want_reply: bool) -> None:
        self.node.send_service(peer, self.service,
                               ["hello", PLACEMENT_VERSION, self.points, self._announced, want_reply], trusted=True)

    def _on_hello(self, peer: str, version: Any, points: Any, cluster: Any, want_reply: Any) -> None:
        why = None
        if version != PLACEMENT_VERSION or points != self.points:
            why = (f"placement version {short_repr(version)} and points {short_repr(points)} differ from this "
                   f"node's {PLACEMENT_VERSION} and {self.points}")
        elif cluster != self._announced:
            why = (f"it is {'not exact' if cluster is None else f'exact in names cluster {short_repr(cluster)}'}, "
                   f"this node {'is not exact' if self._announced is None else f'in {self._announced!r}'}")
        if why is not None:
            if self.refused.get(peer) != why:
                self._log.warning("workers service %r: %s left out of the ring: %s", self.service, peer, why)
            self.refused[peer] = why
            self._leave_ring(peer)
        else:
            self.refused.pop(peer, None)
            if peer not in self._members:
                self._members.add(peer)
                self._ring_changed()
        if want_reply is True:
            self._say_hello(peer, False)

    def _leave_ring(self, peer: str) -> None:
        self._last_done.pop(peer, None)
        self.table.forget_node(peer)
        if peer in self._members:
            self._members.discard(peer)
            self._ring_changed()

    def _ring_changed(self) -> None:
        if self._ring_handle is None and not self.closed:
            self._ring_handle = self._loop.call_soon(self._new_ring)

    def _new_ring(self) -> None:
        """Take the members seen this iteration as the ring: rescan, adopt, ShouldRestart."""
        self._ring_handle = None
        new = Ring(self._members, self.points)
        digest = new.digest()
        if digest == self.ring.digest():
            return
        started = time.perf_counter()
        old, self.ring = self.ring, new
        self.counters["ring_changes"] += 1
        # Every other node of the new ring may run workers this node now answers for (a
        # node that joins or comes back may have started some alone): starts and lookups
        # wait until each said it sent them (its "done" for this ring), or down_after.
        self._awaited_done = set() if self._exact is not None else {
            n for n in new.nodes if n != self.me and self._last_done.get(n) != digest}
        self._gate_until = self._loop.time() + self.node.down_after
        if self._awaited_done:
            self._gate_open.clear()
        else:
            self._gate_open.set()
        rescan = self.table.rescan(old, new, adopting=self._exact is None)
        for peer, pairs in rescan.untold.items():
            for pair in pairs:
                self._queue(peer, "gone", pair)
        for peer, pairs in rescan.adopts.items():  # first: the new owners work on them while this loop goes on
            self._send_adopt(peer, digest, pairs, True)
        send = self._runtime.send
        for w in rescan.should_restart:
            send(w.pid, ShouldRestart(w.name))
        self.counters["should_restart"] += len(rescan.should_restart)
        self.last_rescan_seconds = time.perf_counter() - started
        self._wake_ring_waiters()

    def _send_adopt(self, peer: str, digest: bytes, pairs: list[list[Any]], done: bool) -> None:
        """`pairs` in parts of `ADOPT_PART` (one empty part if none), `done` on the last only."""
        count = len(pairs)
        for i in range(0, max(count, 1), ADOPT_PART):
            part = pairs[i:i + ADOPT_PART]
            self.node.send_service(peer, self.service, ["adopt", digest, part, done and i + ADOPT_PART >= count],
                                   trusted=True)

    def _wake_ring_waiters(self) -> None:
        waiters, self._ring_waiters = self._ring_waiters, []
        for fut in waiters:
            if not fut.done():
                fut.set_result(None)

    async def _ring_after(self, digest: bytes, deadline: float, name: Any) -> None:
        """Return once the ring is no longer the one of `digest`; `RingUnsettled` at `deadline`."""
        while self.ring.digest() == digest and not self.closed:
            fut: asyncio.Future[None] = self._loop.create_future()
            self._ring_waiters.append(fut)
            try:
                await asyncio.wait_for(fut, max(0.0, deadline - self._loop.time()))
            except TimeoutError:
                raise RingUnsettled(f"workers service {self.service!r}: the nodes kept disagreeing on the owner "
                                    f"of {short_repr(name)} until the timeout") from None

    def _gated(self) -> bool:
        """True while a start or a lookup of a name this node does not hold must wait: since
        the last ring change, some node of the ring has not said it sent the workers this
        node now answers for (at most ``down_after``)."""
        return bool(self._awaited_done) and self._loop.time() < self._gate_until

    async def _after_gate(self) -> None:
        while self._awaited_done and not self.closed:
            remaining = self._gate_until - self._loop.time()
            if remaining <= 0:
                return
            try:
                await asyncio.wait_for(self._gate_open.wait(), remaining)
            except TimeoutError:
                return

    # -- the node's calls -----------------------------------------------------------------

    def peer_up(self, peer: str) -> None:
        """Service hook (called by the node): send `peer` this node's hello (its ring rules)."""
        self._say_hello(peer, True)

    def peer_down(self, peer: str, reason: str) -> None:
        """Service hook (called by the node): fail the requests waiting on `peer` and take
        it off the ring."""
        self.requests.peer_down(peer)
        self.refused.pop(peer, None)
        self._leave_ring(peer)

    def peer_absent(self, peer: str) -> None:
        """`peer` runs no workers service of this name: it is not on the ring (nothing to do)."""

    def peer_message(self, peer: str, payload: Any) -> None:
        """Service hook (called by the node): a message of the workers protocol from `peer`."""
        if self.closed:
            return
        if type(payload) is not list or not payload:
            self._bad(peer, payload)
            return
        kind = payload[0]
        n = len(payload)
        if kind == "hello" and n == 5:
            self._on_hello(peer, payload[1], payload[2], payload[3], payload[4])
        elif peer not in self._members and kind != "rep":
            if kind == "req" and n == 4:  # not on our ring (yet): it may be refused; the asker learns why
                self.requests.on_payload(peer, ["req", payload[1], "refused", []])
            elif kind != "bye":
                self._say_hello(peer, True)
        elif kind in ("req", "rep"):
            if not self.requests.on_payload(peer, payload):
                self._bad(peer, payload)
        elif kind == "adopt" and n == 4 and type(payload[1]) is bytes and type(payload[2]) is list:
            self._on_adopt(peer, payload[1], payload[2], payload[3] is True)
        elif kind in ("dienow", "gone", "forget") and n == 2 and type(payload[1]) is list:
            self._on_pairs(peer, kind, payload[1])
        elif kind == "fwd" and n == 5 and type(payload[1]) is int:
            self._on_forward(peer, payload[1], payload[2], payload[3], payload[4] is True)
        elif kind == "bye" and n == 1:
            self._leave_ring(peer)
        else:
            self._bad(peer, payload)

    def _bad(self, peer: str, payload: Any) -> None:
        self._log.warning("workers service %r: malformed payload from %s: %s", self.service, peer,
                          short_repr(payload, 200))

    def _pairs(self, peer: str, pairs: list[Any], own_node: str) -> Iterable[tuple[Any, Pid]]:
        """The well-formed ``[name, pid]`` pairs of `pairs` whose pid is of `own_node`."""
        for pair in pairs:
            if (type(pair) is list and len(pair) == 2 and type(pair[1]) is Pid and pair[1].node == own_node
                    and key_problem(pair[0]) is None):
                yield pair[0], pair[1]
            else:
                self._log.warning("workers service %r: refused a malformed pair from %s: %s", self.service, peer,
                                  short_repr(pair, 200))

    def _on_adopt(self, peer: str, digest: bytes, pairs: list[Any], done: bool) -> None:
        losers = []
        for name, pid in self._pairs(peer, pairs, peer):
            loser = self.table.adopt(name, pid, key_hash(name))
            if loser is None:
                self.counters["adopts_received"] += 1
            else:
                losers.append([name, loser])
        for i in range(0, len(losers), ADOPT_PART):
            self.node.send_service(peer, self.service, ["dienow", losers[i:i + ADOPT_PART]], trusted=True)
        if done:
            self._last_done[peer] = digest
            if digest == self.ring.digest() and peer in self._awaited_done:
                self._awaited_done.discard(peer)
                if not self._awaited_done:
                    self._gate_open.set()

    def _on_pairs(self, peer: str, kind: str, pairs: list[Any]) -> None:
        if kind == "gone":  # its pids we answered for exited
            for name, pid in self._pairs(peer, pairs, peer):
                self.table.remove(name, pid)
            return
        for name, pid in self._pairs(peer, pairs, self.me):  # our own pids
            w = self.table.remove(name, pid)
            if w is None:
                continue
            self._unhook(w)
            self._untell(w, peer)
            if kind == "dienow":
                self.counters["dienow"] += 1
                self._runtime.send(pid, DieNow(name))
                self._loop.call_later(DIENOW_GRACE, self._exit_if_alive, pid, "dienow")

    def _exit_if_alive(self, pid: Pid, reason: str) -> None:
        if self._runtime.process(pid) is not None:
            self._runtime.exit(pid, reason)

    def _on_forward(self, peer: str, hops: int, name: Any, msg: Any, is_cast: bool) -> None:
        if key_problem(name) is not None:
            self._bad(peer, ["fwd", hops, name])
            return
        self._deliver(name, msg, is_cast, hops + 1)

    # -- requests -------------------------------------------------------------------------

    def _request(self, peer: str, what: str, args: list[Any]) -> Any:
        """Answer a request (`Requests` calls it for a peer's; `_route` for this node's own)."""
        if what == "refused":
            why = self.refused.get(peer, "it has not said hello to this node yet")
            return ["error", f"NoProcess: {self.me} does not count {peer} on its ring: {why}"]
        if len(args) < 2:
            return ["error", f"ValueError: malformed {short_repr(what)} request"]
        name = args[1]
        check_key(name, "name")
        h = key_hash(name)
        if what == "whereis" and len(args) == 2:
            return self._answer_whereis(name, h)
        if what == "start" and len(args) == 5 and type(args[3]) is list and _is_timeout(args[4]):
            return self._answer_start(name, h, args[2], args[3], None, float(args[4]))
        if (what == "handoff" and len(args) == 8 and type(args[3]) is list and type(args[5]) is Pid
                and _is_timeout(args[6]) and (args[7] is None or type(args[7]) is int)):
            if args[5].node != peer:  # a node hands off its own workers only
                return ["error", f"ValueError: {peer} cannot hand off {short_repr(args[5])}, a process of another node"]
            return self._answer_start(name, h, args[2], args[3], (args[4], args[5], args[7]), float(args[6]))
        if what == "unregister" and len(args) == 3 and _is_timeout(args[2]):
            if self._exact is not None:
                return self._exact_unregister(name, float(args[2]))
            return self._answer_unregister(name, h)
        return ["error", f"ValueError: unknown request {short_repr(what)}"]

    def _moved(self, h: int) -> list[Any] | None:
        owner = self.ring.node_for_hash(h)
        return None if owner == self.me else ["moved", owner, self.ring.digest()]

    def _answer_whereis(self, name: Any, h: int) -> Any:
        w = self.table.get(name)
        if w is not None:
            return ["ok", w.pid]
        moved = self._moved(h)
        if moved is not None:
            return moved
        if self._gated():
            return self._answer_later(lambda: self._answer_whereis(name, h))
        return ["ok", None]

    def _answer_start(self, name: Any, h: int, path: Any, args: list[Any],
                      handoff: tuple[Any, Pid, int | None] | None, timeout: float) -> Any:
        w = self.table.get(name)
        if w is not None and handoff is None:
            return ["ok", w.pid]
        if self._exact is not None:
            return self._moved(h) or self._exact_start(name, h, path, args, handoff, timeout)
        if w is not None and handoff is not None and w.pid != handoff[1]:
            return ["error", f"ValueError: {short_repr(name)} is held by {w.pid}, not by {handoff[1]}"]
        moved = self._moved(h)
        if moved is not None:
            return moved
        fn = self._function(path)
        if self._gated():
            return self._answer_later(lambda: self._answer_start(name, h, path, args, handoff, timeout))
        if w is not None:  # a handoff from a worker of this node: it gives way to the new one
            self.table.remove(name, w.pid)
            self._unhook(w)
        pid = self._runtime.spawn(fn, *args)
        if handoff is not None:
            self._runtime.send(pid, HandoffState(name, handoff[0]))  # first in the mailbox: fn has not run
            self.counters["handoffs"] += 1
        self._hold_local(Worker(name, pid, h, path, args))
        self.counters["started"] += 1
        return ["ok", pid]

    def _function(self, path: Any) -> WorkerFunction:
        fn = self.functions.get(path)
        if fn is None:
            raise ValueError(f"{short_repr(path)} is not one of the functions of workers service {self.service!r} "
                             f"on {self.me}; nothing was started")
        return fn

    async def _exact_start(self, name: Any, h: int, path: Any, args: list[Any],
                           handoff: tuple[Any, Pid, int | None] | None, timeout: float) -> list[Any]:
        assert self._exact is not None
        fn = self._function(path)
        if handoff is None:
            pid = await self._exact.start(name, fn, args, timeout)
        elif handoff[2] is None:
            raise ValueError(f"a hand-off of {short_repr(name)} on an exact service needs the holder's token")
        else:
            pid = await self._exact.handoff(name, fn, args, handoff[0], handoff[2], timeout)
            self.counters["handoffs"] += 1
        w = self.table.get(name)
        if self._runtime.is_local(pid) and (w is None or w.pid != pid) and self._runtime.process(pid) is not None:
            if w is not None:
                self.table.remove(name, w.pid)
                self._unhook(w)
            self._hold_local(Worker(name, pid, h, path, args))
            self.counters["started"] += 1
        return ["ok", pid]

    async def _exact_unregister(self, name: Any, timeout: float) -> list[Any]:
        assert self._exact is not None
        freed = await self._exact.unregister(name, timeout)
        w = self.table.get(name)
        if w is not None:
            self.table.remove(name, w.pid)
            self._unhook(w)
        return ["ok", freed]

    async def _answer_later(self, answer: Callable[[], Any]) -> Any:
        await self._after_gate()
        reply = answer()
        return (await reply) if asyncio.iscoroutine(reply) else reply

    def _answer_unregister(self, name: Any, h: int) -> Any:
        w = self.table.get(name)
        if w is None:
            return self._moved(h) or ["ok", False]
        self.table.remove(name, w.pid)
        if self.table.is_local(w):
            self._unhook(w)
            self._untell(w)
        else:
            self._queue(w.pid.node, "forget", [name, w.pid])
        return ["ok", True]

    async def _route(self, what: str, name: Any, h: int, args: list[Any], deadline: float) -> list[Any]:
        """Ask `name`'s owner `what`: its ``["ok", ...]`` reply, after one redirect at most
        per ring. `RingUnsettled`, `CallTimeout` or the error the owner names."""
        redirect: str | None = None
        while True:
            self._check_open(what)
            digest = self.ring.digest()
            target = redirect or self.ring.node_for_hash(h)
            request = [digest, name, *args]
            remaining = deadline - self._loop.time()
            try:
                if target == self.me:
                    reply = self._request(self.me, what, request)
                    if asyncio.iscoroutine(reply):
                        reply = await asyncio.wait_for(reply, max(0.0, remaining))
                else:
                    reply = await self.requests.call(target, what, request, max(0.0, remaining))
            except NoProcess:  # the target is not connected (any more): wait for the ring to change
                await self._ring_after(digest, deadline, name)
                redirect = None
                continue
            except (NoQuorum, CallTimeout):  # the owner's own verdict (these are TimeoutErrors too)
                raise
            except TimeoutError:
                raise CallTimeout(f"workers service {self.service!r}: {target} did not answer a {what} of "
                                  f"{short_repr(name)} in time") from None
            if type(reply) is list and len(reply) == 3 and reply[0] == "moved" and type(reply[1]) is str:
                self.counters["redirects"] += 1
                if redirect is None and reply[1] != target:
                    redirect = reply[1]
                else:
                    await self._ring_after(digest, deadline, name)
                    redirect = None
                continue
            return check_reply(reply, target, f"workers {what}")

    # -- local workers --------------------------------------------------------------------

    def _hold_local(self, w: Worker) -> None:
        proc = self._runtime.process(w.pid)
        if proc is None:
            raise NoProcess(f"{short_repr(w.pid)} is not alive")
        self.table.add_local(w)
        proc.add_exit_hook((self._hook_tag, w.name), functools.partial(self._local_exited, w.name))

    def _unhook(self, w: Worker) -> None:
        proc = self._runtime.process(w.pid)
        if proc is not None:
            proc.remove_exit_hook((self._hook_tag, w.name))

    def _local_exited(self, name: Any, pid: Pid, reason: Any) -> None:
        w = self.table.remove(name, pid)
        if w is not None and not self.closed:
            self._untell(w)

    def _untell(self, w: Worker, already_knows: str | None = None) -> None:
        """Tell the node asked to adopt the local worker `w` that it is gone."""
        if w.told is not None and w.told != already_knows:
            self._queue(w.told, "gone", [w.name, w.pid])
        w.told = None

    def _queue(self, peer: str, kind: str, pair: list[Any]) -> None:
        batch = self._out.get((peer, kind))
        if batch is None:
            batch = self._out[(peer, kind)] = []
        batch.append(pair)
        if self._flush_handle is None and not self.closed:
            self._flush_handle = self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_handle = None
        out, self._out = self._out, {}
        for (peer, kind), pairs in out.items():
            for i in range(0, len(pairs), ADOPT_PART):
                self.node.send_service(peer, self.service, [kind, pairs[i:i + ADOPT_PART]], trusted=True)

    def _deliver(self, name: Any, msg: Any, is_cast: bool, hops: int) -> None:
        w = self.table.get(name)
        pid = w.pid if w is not None else None if self._exact is None else self._exact.whereis_here(name)
        if pid is not None:
            self._runtime.send(pid, Cast(msg) if is_cast else msg)
            return
        owner = self.ring.node_for_hash(key_hash(name))
        if owner == self.me or hops > _MAX_HOPS or owner not in self._members:
            self.counters["dropped_sends"] += 1
            return
        self.counters["forwarded"] += 1
        self.node.send_service(owner, self.service, ["fwd", hops, name, msg, is_cast], trusted=True)

    # -- the API --------------------------------------------------------------------------

    def _deadline(self, timeout: float, what: str) -> float:
        check_timeout(timeout, f"Workers.{what}")
        return self._loop.time() + timeout

    async def spawn(self, name: Any, fn: Callable[..., Awaitable[Any]], *args: Any, timeout: float = 5.0) -> Pid:
        """Start ``fn(*args)`` as the worker `name` on its owner node; its pid, or the pid
        of the worker already running under `name` (then nothing is started).

        `fn` must be one of the service's functions (`TypeError` naming why not), the
        arguments terms (`TypeError`), `name` a key term (`TypeError`, `ValueError` for a
        NaN). `ValueError` if the owner does not list `fn`; `CallTimeout` if the owner
        does not answer within `timeout` seconds (the worker may still start there);
        `RingUnsettled` if the nodes keep sending the request on to each other until
        then. Cancellation abandons the wait, not the start.
        """
        self._check_open("spawn")
        check_key(name, "name")
        path = self.functions.path_of(fn, self.service)
        fn_args = check_value(list(args), "args")
        deadline = self._deadline(timeout, "spawn")
        # The owner gets most of the time, so that its own timeout (NoQuorum) is what the caller sees.
        reply = await self._route("start", name, key_hash(name), [path, fn_args, _owner_timeout(timeout)], deadline)
        return _pid_in(reply, "start")

    async def get_or_start(self, name: Any, fn: Callable[..., Awaitable[Any]], *args: Any,
                           timeout: float = 5.0) -> Pid:
        """The worker `name` if this node answers for it, else `spawn` (same errors, timeout
        and cancellation)."""
        try:
            w = self.table.held.get(name)
        except TypeError:
            w = None
        if w is not None and not self.closed:
            return w.pid
        if self._exact is not None and not self.closed:
            pid = self._exact.whereis_here(check_key(name, "name"))
            if pid is not None:
                return pid
        return await self.spawn(name, fn, *args, timeout=timeout)

    async def whereis(self, name: Any, timeout: float = 5.0) -> Pid | None:
        """The pid of the worker `name` (asking its owner unless this node answers for it);
        None when the owner says it has none. Errors as for `spawn`; a timeout
        (`CallTimeout`) or a cancellation abandons the wait."""
        self._check_open("whereis")
        w = self.table.get(check_key(name, "name"))
        if w is not None:
            return w.pid
        if self._exact is not None:
            check_timeout(timeout, "Workers.whereis")
            return await self._exact.whereis(name, timeout)
        reply = await self._route("whereis", name, key_hash(name), [], self._deadline(timeout, "whereis"))
        return _pid_in(reply, "whereis", none_ok=True)

    async def call(self, name: Any, request: Any, timeout: float = 5.0) -> Any:
        """`pgregistry.call` the worker `name` (a `Server`) with `request`; its reply.

        Must run in a process. `NoProcess` (``.reason`` ``"noproc"``) if the owner has
        no such worker; `CallTimeout` if the lookup or the call take longer than
        `timeout` in all; a call that reached the worker is never sent twice. A timeout
        or a cancellation abandons the wait: a late reply is dropped, and the worker may
        still handle the request.
        """
        deadline = self._deadline(timeout, "call")
        current_process()
        pid = await self.whereis(name, timeout)
        if pid is None:
            raise NoProcess(f"workers service {self.service!r} has no worker {short_repr(name)}", reason="noproc")
        return await call_server(pid, request, max(0.0, deadline - self._loop.time()))

    def send(self, name: Any, msg: Any) -> None:
        """Send `msg` to the worker `name`, wherever it runs; never waits.

        Delivered directly when this node answers for `name`, else forwarded by its owner
        (once more at most if the owner's ring differs); dropped, like a send to a dead
        pid, if nobody holds it. `TypeError` if `msg` is not a term.
        """
        self._send(name, msg, False)

    def cast(self, name: Any, msg: Any) -> None:
        """`send` of ``Cast(msg)``, for a `Server` worker's ``handle_cast``."""
        self._send(name, msg, True)

    def _send(self, name: Any, msg: Any, is_cast: bool) -> None:
        self._check_open("cast" if is_cast else "send")
        check_key(name, "name")
        check_message(msg)
        self._deliver(name, msg, is_cast, 0)

    async def handoff(self, name: Any, state: Any, timeout: float = 5.0) -> Pid:
        """Start the worker `name` again on its owner, with ``HandoffState(name, state)`` as
        its first message, then exit this node's instance with reason ``"handoff"``.

        The worker must run on this node and have been started by the service (a tracked
        process has no function to start again: `ValueError`). On any failure (the owner
        refuses, `CallTimeout`, `RingUnsettled`) the old instance keeps running. Called
        from the worker itself, it does not return: the worker exits. A timeout or a
        cancellation abandons the wait and leaves the old instance running; the new one
        may still have started on the owner.
        """
        self._check_open("handoff")
        w = self.table.get(check_key(name, "name"))
        if w is None or not self.table.is_local(w):
            raise NoProcess(f"handoff: no worker {short_repr(name)} runs on {self.me}")
        if w.fn is None:
            raise ValueError(f"handoff: {short_repr(name)} is a tracked process, not started by the service: "
                             "there is no function to start it again with")
        check_value(state, "state")
        token = None
        if self._exact is not None:
            token = self._exact.token(name)
            if token is None or self._exact.whereis_here(name) != w.pid:
                raise NoProcess(f"handoff: {short_repr(name)} is not validly held by {w.pid} now")
        deadline = self._deadline(timeout, "handoff")
        reply = await self._route("handoff", name, w.hash,
                                  [w.fn, w.args, state, w.pid, _owner_timeout(timeout), token], deadline)
        new = _pid_in(reply, "handoff")
        if new != w.pid:
            if self.table.remove(name, w.pid) is not None:
                self._unhook(w)
            self._exit_if_alive(w.pid, "handoff")
        return new

    def track(self, name: Any, pid: Pid) -> None:
        """Make the live process `pid` of this node the worker `name` (it was not started by
        the service). Its owner is told at once. `NotLocal`/`NoProcess` for another node's
        or a dead pid, `ValueError` if this node holds `name` under another pid."""
        self._check_open("track")
        if self._exact is not None:
            raise ValueError("track: on an exact workers service a worker's name is taken by consensus; "
                             "start it with spawn or get_or_start")
        check_key(name, "name")
        if type(pid) is not Pid:
            raise TypeError(f"track: pid must be a Pid, got {short_repr(pid, 60)}")
        if not self._runtime.is_local(pid):
            raise NotLocal(pid, self.me)
        h = key_hash(name)
        w = Worker(name, pid, h)
        self._hold_local(w)
        owner = self.ring.node_for_hash(h)
        if owner != self.me:
            w.told = owner
            self.node.send_service(owner, self.service, ["adopt", self.ring.digest(), [[name, pid]], False],
                                   trusted=True)

    async def unregister(self, name: Any, timeout: float = 5.0) -> bool:
        """Forget the worker `name` (the process keeps running); True if one was held.
        Asks the owner unless this node runs it. Errors, timeout and cancellation as for
        `whereis`."""
        self._check_open("unregister")
        w = self.table.get(check_key(name, "name"))
        if self._exact is not None:
            return await self._unregister_exact(name, self._deadline(timeout, "unregister"))
        if w is not None and self.table.is_local(w):
            self.table.remove(name, w.pid)
            self._unhook(w)
            self._untell(w)
            return True
        reply = await self._route("unregister", name, key_hash(name), [_owner_timeout(timeout)],
                                  self._deadline(timeout, "unregister"))
        return reply[1] is True

    async def _unregister_exact(self, name: Any, deadline: float) -> bool:
        assert self._exact is not None
        holder = await self._exact.whereis(name, max(0.0, deadline - self._loop.time()))
        if holder is None:
            return False
        remaining = max(0.0, deadline - self._loop.time())
        if holder.node == self.me:
            return (await self._exact_unregister(name, remaining))[1] is True
        try:
            reply = await self.requests.call(holder.node, "unregister",
                                             [self.ring.digest(), name, _owner_timeout(remaining)], remaining)
        except TimeoutError:
            raise CallTimeout(f"{holder.node} did not answer an unregister of {short_repr(name)} in time") from None
        return check_reply(reply, holder.node, "workers unregister")[1] is True

    def processes(self) -> dict[Any, Pid]:
        """The workers this node answers for, by name: its own and those it adopted."""
        return {name: w.pid for name, w in self.table.held.items()}

    def nodes(self) -> tuple[str, ...]:
        """The nodes on this node's ring (those that run the service), sorted."""
        return self.ring.nodes

    def node_for(self, name: Any) -> str:
        """The owner of `name` on this node's ring: the same on every node that sees the same nodes."""
        return self.ring.node_for(name)

    def nodes_for(self, name: Any, n: int) -> list[str]:
        """The owner of `name` and the next ``n - 1`` distinct nodes clockwise."""
        return self.ring.nodes_for(name, n)

    # -- observability --------------------------------------------------------------------

    def stat(self) -> dict[str, Any]:
        """Sizes and counters: workers held (local, adopted), ring nodes, refused peers,
        peers whose ``done`` a start is waiting for, the last rescan's seconds."""
        local = self.table.local_count
        return {
            "workers": len(self.table), "local": local, "adopted": len(self.table) - local,
            "nodes": len(self.ring), "refused_peers": len(self.refused), "awaited_done": len(self._awaited_done),
            "last_rescan_seconds": self.last_rescan_seconds, **self.counters,
        }

    async def drain(self, timeout: float) -> None:
        """Send what is queued for peers now (nothing else is under way between nodes)."""
        self._flush()


def _owner_timeout(timeout: float) -> float:
    """The part of a request's `timeout` its owner gets for its own work (a names decision),
    so that the owner's verdict (`NoQuorum`) reaches the caller before the caller gives up."""
    return min(timeout * _OWNER_SHARE, _MAX_TIMEOUT)


def _is_timeout(x: Any) -> bool:
    return type(x) in (int, float) and 0 <= x <= _MAX_TIMEOUT


def _pid_in(reply: list[Any], what: str, none_ok: bool = False) -> Any:
    pid = reply[1] if len(reply) > 1 else None
    if type(pid) is Pid or (none_ok and pid is None):
        return pid
    raise NoProcess(f"a workers {what} was answered with {short_repr(reply, 100)}")

