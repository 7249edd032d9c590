"""`Names`: names unique in the whole cluster, decided by a majority (layer 7).

A names service runs the consensus core (`pgregistry.names_core.Member`) over the node's
connections (`pgregistry.names_link.NamesLink`) and the boot-time clock. The guarantee:
for every name, at most one holder is *valid* at any instant, and the fencing tokens of
successive holders strictly increase, whatever the network does and whatever crashes or
restarts happen, provided the members' clocks run within a rate ratio of 1 % of each
other. *Valid* is the holder node's belief, checked at every use: a process can outlive
its validity (a long pause, ``on_lost="notify"``), so resources downstream should check
fencing tokens (docs/names.md shows how).

Leases are per node, not per name: each member renews with every member every
``lease / 3`` seconds, one small message per peer whatever the number of names. A node
whose lease lapses invalidates its holders at once (killed with reason ``"lost_quorum"``,
or sent `NameLost` with ``on_lost="notify"``); a survivor may take a name over once the
holder's node has not renewed for a whole lease. A process that exits releases its names.

Everything here runs on the node's loop thread; every call that waits takes a `timeout`
and raises `NoQuorum` (a `TimeoutError`) when no majority answers in time. Cancelling a
call abandons the wait only: an operation already proposed still completes, and a name it
would give to a process of this node is released again.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import secrets
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any, Final

from .errors import JoinRefused, NoProcess, NoQuorum, NotLocal
from .names_config import Effects, Incarnation
from .names_core import BadMessage, Member
from .names_holders import Holders
from .names_link import NamesLink, fail, parse_config
from .naming import Via
from .node import Node
from .process import check_timeout, current_process
from .terms import Pid, check_key, short_repr

__all__ = ["Names", "lease_clock", "RHO"]

RHO: Final = 0.01
"""The bound on clock-rate drift between members that the lease formula assumes (1 %)."""

_BOOTTIME: Final = getattr(time, "CLOCK_BOOTTIME", None)


def lease_clock() -> float:
    """Seconds of the clock leases are measured with: ``CLOCK_BOOTTIME`` where there is one
    (it keeps counting through a suspend, unlike the event loop's monotonic clock), else
    `time.monotonic`."""
    return _clock()


_clock: Callable[[], float] = (
    functools.partial(time.clock_gettime, _BOOTTIME) if _BOOTTIME is not None else time.monotonic
)


_ON_LOST: Final = ("kill", "notify")
_NO_NAME: Final = object()
# Timers are set this much late, so that a loop that rounds delays (uvloop: to whole
# milliseconds) fires them at or after the lease clock's instant, not a hair before.
_TIMER_SLACK: Final = 0.001
_TELL_SLICE: Final = 2048  # commits of held names sent to a peer per loop iteration on its hello
_LATENCY_SAMPLES: Final = 1024


class _Naming:
    """What `Via` asks: `Names` as a `pgregistry.naming.NamingService`. The third argument
    of ``register_name`` (a via's value) is not used: a name has no value here. With a
    `token`, a name resolves only while its holder has that fencing token."""

    __slots__ = ("names", "token")

    def __init__(self, names: Names, token: int | None = None) -> None:
        self.names = names
        self.token = token

    def whereis_name(self, key: Any) -> Pid | None:
        if self.token is None:
            return self.names.whereis_name(key)
        held = self.names.holder(key)
        return held[0] if held is not None and held[1] == self.token else None

    def register_name(self, key: Any, pid: Pid, value: Any = None) -> Awaitable[bool]:
        return self.names.register_name(key, pid)

    def unregister_name(self, key: Any) -> Awaitable[bool]:
        return self.names.unregister_name(key)

    def __repr__(self) -> str:
        return repr(self.names)


class _Latencies:
    """The last `_LATENCY_SAMPLES` durations of one kind of operation, for `stat`."""

    __slots__ = ("samples",)

    def __init__(self) -> None:
        self.samples: deque[float] = deque(maxlen=_LATENCY_SAMPLES)

    def percentiles(self) -> dict[str, float | None]:
        ordered = sorted(self.samples)
        if not ordered:
            return {"p50": None, "p99": None}
        return {p: ordered[min(len(ordered) - 1, int(q * len(ordered)))] for p, q in (("p50", 0.5), ("p99", 0.99))}


class Names:
    """A names service on one node: ``await Names.start(node, "names", lease=3.0)``.

    It starts as a cluster of this node alone (a majority of one); `join` makes it a
    member of another node's cluster. See the module docstring for the guarantee.

    Every method runs on the node's loop thread (`RuntimeError` off it, or once the
    service is stopped). Every call that waits for the cluster takes a `timeout` in
    seconds and raises `NoQuorum` (a `TimeoutError`) when no majority answers within
    it. A timeout or a cancellation abandons the wait, not the operation: one that has
    already left this node still completes (a name it gives to a process of this node
    is then released again), one that has not is withdrawn.
    """

    def __init__(self, node: Node, service: str, lease: float, shard_count: int, on_lost: str,
                 trace: Callable[[float, tuple[Any, ...]], None] | None) -> None:
        self.node = node
        self.service = service
        self.lease = lease
        self.shard_count = shard_count
        self.on_lost = on_lost
        self.trace = trace
        self._runtime = node.runtime
        self._loop = asyncio.get_running_loop()
        self.me: Incarnation = (node.id, node.creation, secrets.randbits(62))
        self.link = NamesLink(node, service, self.me, self._deliver, self._request, self._invited, self._hello)
        self.core = self._new_core(secrets.token_hex(8), 0, [self.me])  # started by `start`
        self._naming = _Naming(self)
        self._timers: dict[tuple[Any, ...], tuple[tuple[Any, ...], asyncio.TimerHandle]] = {}
        self._waiters: dict[int, asyncio.Future[tuple[Any, ...]]] = {}
        self._abandoned: dict[int, Any] = {}  # op id -> the name it would give a holder
        self.holders = Holders(self._runtime, on_lost, self._release_if_held)
        self._next_op = 0
        self._rejoining = False
        self._joining = False  # a join (or rejoin) is under way: not a member yet, soon one
        self.closed = False
        self.counters = dict.fromkeys(
            ("registers", "lookups", "updates", "releases", "handoffs", "refused_messages"), 0)
        self._latency = {"register": _Latencies(), "lookup": _Latencies()}

    # -- lifecycle ------------------------------------------------------------------------

    @classmethod
    async def start(cls, node: Node, service: str = "names", *, lease: float = 3.0, shard_count: int = 1,
                    on_lost: str = "kill", trace: Callable[[float, tuple[Any, ...]], None] | None = None) -> Names:
        """Start a names service called `service` on `node` (a cluster of this node alone).

        `lease`: seconds a node's lease lasts (renewed every third of it); a name held on
        a node that stopped renewing can be taken over after it. `shard_count`: how many
        tables the name registers are spread over (every member must use the same).
        `on_lost`: ``"kill"`` (a holder that stops being valid is killed with reason
        ``"lost_quorum"``) or ``"notify"`` (it is sent ``NameLost(name, pid, token)``).
        `trace(clock, event)`, if given, sees the lease, grant and revoke events with the
        lease clock read before them (for audits and the checker of the tests).
        `TypeError`/`ValueError` for a bad option, `AlreadyStarted` if `service` runs.
        """
        if not isinstance(node, Node):
            raise TypeError(f"node must be a pgregistry Node, got {short_repr(node, 60)}")
        if type(service) is not str or not service:
            raise TypeError(f"the service name must be a non-empty str, got {short_repr(service, 60)}")
        if type(lease) not in (int, float) or not 0.05 <= lease <= 3600:
            raise ValueError(f"lease must be a number of seconds in 0.05..3600, got {short_repr(lease)}")
        if type(shard_count) is not int or not 1 <= shard_count <= 4096:
            raise ValueError(f"shard_count must be an int in 1..4096, got {short_repr(shard_count)}")
        if on_lost not in _ON_LOST:
            raise ValueError(f'on_lost must be "kill" or "notify", got {short_repr(on_lost)}')
        if trace is not None and not callable(trace):
            raise TypeError(f"trace must be callable or None, got {short_repr(trace)}")
        node.require_loop_thread("Names.start")
        self = cls(node, service, float(lease), shard_count, on_lost, trace)
        node.attach_service(service, self)
        self._apply(self.core.start(lease_clock()))
        for peer in node.peers():
            self.link.say_hello(peer)
        return self

    async def stop(self, timeout: float = 1.0) -> None:
        """Stop the service on this node: release the names held here (within `timeout`,
        so that others may take them at once rather than after a lease), then close. The
        holders are killed (or notified) as for a lost lease; the other members see this
        node as a member that stopped answering until it is removed (`leave`).

        A release that takes longer than `timeout` raises nothing: the service closes
        anyway. If `stop` is cancelled while the names are being released, the service
        is left running (`stop` or `close` it again)."""
        self.node.require_loop_thread("Names.stop")
        check_timeout(timeout, "Names.stop")
        with contextlib.suppress(TimeoutError):
            await self.drain(timeout)
        self.close()
        self.node.detach_service(self.service)

    def close(self) -> None:
        """Stop at once (the node calls it when it stops)."""
        if self.closed:
            return
        self.closed = True
        self.link.close()
        for _timer_id, handle in self._timers.values():
            handle.cancel()
        self._timers.clear()
        for name, (pid, token, _lgen) in list(self.core.grants.items()):
            self.holders.lost(name, pid, token)
        self.core.grants.clear()
        for fut in self._waiters.values():
            if not fut.done():
                fail(fut, RuntimeError(f"names service {self.service!r} stopped"))
        self._waiters.clear()

    def __repr__(self) -> str:
        return f"<Names {self.service!r} on {self.node.id}: {len(self.core.members)} members>"

    def _install(self, core: Member) -> None:
        """Run `core` from now on; the timers of the one it replaces are cancelled."""
        for _timer_id, handle in self._timers.values():
            handle.cancel()
        self._timers.clear()
        self.core = core
        self._apply(core.start(lease_clock()))

    def _new_core(self, cluster_id: str, epoch: int, members: list[Incarnation]) -> Member:
        return Member(self.me, members, epoch, cluster_id, self.lease, RHO, self.shard_count,
                      now=lease_clock(), pid_ok=lambda p: type(p) is Pid, freeze=False)

    # -- the core's inputs and outputs ----------------------------------------------------

    def _apply(self, fx: Effects) -> None:
        """Carry out what the core asked: events first (grants hook their holders before a
        caller hears "ok"), then results, timers and messages."""
        for ev in fx.events:
            self._on_event(ev)
        for op_id, result in fx.results:
            self._on_result(op_id, result)
        for timer_id in fx.cancels:
            entry = self._timers.get(_timer_key(timer_id))
            if entry is not None and entry[0] == timer_id:
                entry[1].cancel()
                del self._timers[_timer_key(timer_id)]
        for timer_id, at in fx.timers:
            self._set_timer(timer_id, at)
        send = self.link.send
        for dest, msg in fx.messages:
            send(dest, msg)

    def _set_timer(self, timer_id: tuple[Any, ...], at: float) -> None:
        if self.closed:
            return
        key = _timer_key(timer_id)
        old = self._timers.get(key)
        if old is not None:
            old[1].cancel()  # the core only acts on the newest timer of one key
        delay = max(0.0, at - lease_clock())
        handle = self._loop.call_at(self._loop.time() + delay + _TIMER_SLACK, self._fire, key, timer_id, at)
        self._timers[key] = (timer_id, handle)

    def _fire(self, key: tuple[Any, ...], timer_id: tuple[Any, ...], at: float) -> None:
        entry = self._timers.get(key)
        if entry is not None and entry[0] == timer_id:
            del self._timers[key]
        if self.closed:
            return
        now = lease_clock()
        if now < at:
            # Early by the loop's rounding (uvloop keeps whole milliseconds), or the loop's
            # clock ran ahead of the lease clock: the core must see its own time reached.
            self._set_timer(timer_id, at)
            return
        self._apply(self.core.on_timer(timer_id, now))

    def _deliver(self, sender: Incarnation, msg: Any) -> None:
        if self.closed:
            return
        try:
            if sender is self.me:
                fx = self.core.on_own(msg, lease_clock())
            else:
                fx = self.core.on_message(sender, msg, lease_clock())
        except BadMessage as e:
            self.counters["refused_messages"] += 1
            self.link.bad_message(sender[0], str(e), msg)
            return
        self._apply(fx)

    def _on_event(self, ev: tuple[Any, ...]) -> None:
        kind = ev[0]
        if self.trace is not None and kind in ("grant", "revoke", "lease", "lapse"):
            self.trace(lease_clock(), ev)
        if kind == "grant":
            self.holders.granted(ev[1], ev[2])
        elif kind == "revoke":
            self.holders.revoked(ev[1], ev[2], ev[3], ev[4])

    def _release_if_held(self, name: Any, pid: Pid) -> None:
        g = self.core.grants.get(name)
        if g is not None and g[0] == pid and not self.closed:
            self.counters["releases"] += 1
            self._apply(self.core.release(name, lease_clock(), None))

    def _on_result(self, op_id: Any, result: tuple[Any, ...]) -> None:
        fut = self._waiters.pop(op_id, None)
        if fut is not None and not fut.done():
            fut.set_result(result)
            return
        name = self._abandoned.pop(op_id, _NO_NAME)
        if name is not _NO_NAME and result[0] == "ok" and type(result[2]) is tuple and result[2][0] is not None:
            # Its caller gave up (a timeout, a cancellation): the holder it made lets go.
            self._loop.call_soon(self._release_if_held, name, result[2][0])

    async def _run(self, start: Callable[[int, float], Effects], timeout: float, what: str,
                   gives: Any = _NO_NAME, to: Pid | None = None) -> tuple[Any, ...]:
        """Start one core operation and wait for its result (`NoQuorum` after `timeout`).

        `gives`: the name the operation may give `to`, a process of this node; released
        again if the caller stops waiting before the result."""
        self._check_open(what)
        with self.holders.expect(to):
            return await self._wait_result(start, timeout, what, gives)

    async def _wait_result(self, start: Callable[[int, float], Effects], timeout: float, what: str,
                           gives: Any) -> tuple[Any, ...]:
        self._next_op += 1
        op_id = self._next_op
        fut: asyncio.Future[tuple[Any, ...]] = self._loop.create_future()
        self._waiters[op_id] = fut
        self._apply(start(op_id, lease_clock()))
        try:
            return await asyncio.wait_for(fut, timeout)
        except TimeoutError:
            raise NoQuorum(f"{what}: no majority of the names cluster {self.service!r} answered within "
                           f"{short_repr(timeout)} s ({len(self.live_nodes())} of {len(self.core.members)} "
                           "members connected)") from None
        finally:
            if self._waiters.pop(op_id, None) is not None:
                # Given up on (timeout, cancellation): withdrawn if it never left this node,
                # so that it cannot run later (after a heal, say) for nobody.
                fx = self.core.withdraw(op_id, lease_clock())
                withdrawn = any(r[0] == op_id for r in fx.results)
                self._apply(fx)
                if not withdrawn and gives is not _NO_NAME:
                    self._abandoned[op_id] = gives

    def _check_open(self, what: str) -> None:
        self.node.require_loop_thread(f"Names.{what}")
        if self.closed:
            raise RuntimeError(f"Names.{what}: names service {self.service!r} is stopped")

    def _check_member(self, what: str) -> None:
        if not self.core.is_member and not self._joining:
            raise NoQuorum(f"Names.{what}: {self.node.id} is not a member of a names cluster (it left one): "
                           "join one, or reset(force=True) to start one alone")

    # -- peers ----------------------------------------------------------------------------

    def peer_up(self, peer: str) -> None:
        """Service hook (called by the node): greet `peer`'s names service."""
        self.link.say_hello(peer)

    def peer_down(self, peer: str, reason: str) -> None:
        """Service hook (called by the node): `peer` is disconnected; its lease runs out."""
        self.link.peer_down(peer)

    def peer_message(self, peer: str, payload: Any) -> None:
        """Service hook (called by the node): a message of the names protocol from `peer`."""
        if not self.closed:
            self.link.on_payload(peer, payload)

    def peer_absent(self, peer: str) -> None:
        """`peer` runs no names service of this name: nothing to do (it is no member)."""

    def _hello(self, peer: str, inc: Incarnation) -> None:
        """A peer's incarnation became known: tell it the names held here (members learn
        holders from commits, and a node that was away missed them), and invite it back
        if it is a restarted member."""
        core = self.core
        if not core.is_member:
            return
        if inc in core.members:
            if core.grants:
                task = asyncio.ensure_future(self._tell_held(inc, list(core.grants)))
                task.add_done_callback(self._log_failure)
        elif any(m[0] == peer for m in core.members):
            self.node.send_service(peer, self.service, ["invite", self._config()], trusted=True)

    async def _tell_held(self, inc: Incarnation, names: list[Any]) -> None:
        """Send `inc` the decided values of `names` (held here) as commits, a slice per loop
        iteration: a node holding a million names must not stall its loop (and its lease)."""
        core = self.core
        for start in range(0, len(names), _TELL_SLICE):
            if self.closed or core is not self.core or self.link.peers.get(inc[0]) != inc:
                return
            for name in names[start:start + _TELL_SLICE]:
                known = core.known(name)
                if known is not None and name in core.grants:
                    self.link.send(inc, ("commit", core.cluster_id, core.epoch, name, known[0], known[1]))
            await asyncio.sleep(0)

    def _log_failure(self, task: asyncio.Future[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            self.link.bad_message(self.node.id, f"a background task failed: {task.exception()!r}", None)

    def _config(self) -> list[Any]:
        core = self.core
        return [core.cluster_id, core.epoch, [list(m) for m in core.members], self.lease, self.shard_count]

    def _request(self, peer: str, what: str, args: list[Any]) -> Any:
        if what == "config" and not args:
            return ["ok", self._config()]
        if what == "lease" and len(args) == 1:
            # A handoff to a pid of ours: vouch for it with our generation, while valid.
            pid = args[0]
            if type(pid) is not Pid or not self._runtime.is_local(pid) or self._runtime.process(pid) is None:
                return ["error", f"NoProcess: {short_repr(pid)} is not a live process of {self.node.id}"]
            self.holders.expect_handoff(pid, 2 * self.lease)
            return self._vouch()
        if what == "update" and len(args) == 4:
            name, new_pid, token, timeout = args
            if type(token) is not int or type(timeout) not in (int, float) or not 0 <= timeout <= 3600:
                return ["error", "ValueError: bad update request"]
            return self._answer_update(name, new_pid, token, float(timeout))
        return ["error", f"ValueError: unknown request {short_repr(what)}"]

    async def _vouch(self) -> list[Any]:
        try:
            await self._lease_valid(self._loop.time() + self.lease, "handoff")
        except NoQuorum:
            return ["error", f"NoQuorum: {self.node.id} holds no valid lease"]
        return ["ok", list(self.me), self.core.lgen]

    async def _answer_update(self, name: Any, new_pid: Any, token: int, timeout: float) -> list[Any]:
        if self.core.holder(name, lease_clock()) is None:
            return ["ok", False]
        return ["ok", await self.update(name, new_pid, token, timeout=timeout)]

    def _invited(self, peer: str, config: list[Any]) -> None:
        """A member says this node is a new incarnation of one of its members."""
        if self._rejoining or self.core.grants or self.core.busy() or len(self.core.members) > 1:
            return
        self._rejoining = True
        task = asyncio.ensure_future(self._rejoin(peer, config))
        task.add_done_callback(self._rejoined)

    async def _rejoin(self, peer: str, config: list[Any]) -> None:
        await self._enter(peer, config, self.lease * 3)

    def _rejoined(self, task: asyncio.Future[None]) -> None:
        self._rejoining = False
        if not task.cancelled() and task.exception() is not None:
            self.link.bad_message(self.node.id, f"could not rejoin: {task.exception()}", None)

    # -- membership -----------------------------------------------------------------------

    def nodes(self) -> list[str]:
        """The node ids of the cluster's members, as this node last learned them."""
        return [m[0] for m in self.core.members]

    def live_nodes(self) -> list[str]:
        """The members connected to this node now (this node included if it is one)."""
        peers = self.link.peers
        return [m[0] for m in self.core.members if m == self.me or peers.get(m[0]) == m]

    async def join(self, peer: str, timeout: float = 10.0) -> None:
        """Become a member of the names cluster of `peer` (a node id or "host:port").

        Connects to `peer` first if needed. Returns once this node serves as a member.
        `JoinRefused` if this node holds names, belongs to another cluster of several
        members, or its ``lease`` or ``shard_count`` differ from the cluster's;
        `NoQuorum` if the change is not decided within `timeout` (it may still be: call
        `join` again to wait for it). A restarted node replaces its old incarnation.
        Cancellation abandons the wait, as a timeout does.
        """
        self._check_open("join")
        check_timeout(timeout, "Names.join")
        deadline = self._loop.time() + timeout
        peer_id = peer if peer in self.node.peers() else await self.node.connect(peer)
        await self.link.wait_hello(peer_id, max(0.0, deadline - self._loop.time()))
        reply = await self._ask(peer_id, "config", [], deadline)
        await self._enter(peer_id, reply[1], max(0.0, deadline - self._loop.time()))

    async def _enter(self, peer: str, config: list[Any], timeout: float) -> None:
        cluster_id, epoch, members, lease, shard_count = parse_config(config, peer)
        core = self.core
        if cluster_id == core.cluster_id and self.me in core.members:
            return
        if self.me in members:
            raise JoinRefused(f"{peer}'s names cluster lists this very incarnation of {self.node.id} as a member, "
                              "with registers it does not have: restart the names service to join as a new one")
        if lease != self.lease:
            raise JoinRefused(f"{peer}'s names cluster uses lease={lease}, this node lease={self.lease}: "
                              "every member must use the same lease (its safety depends on it)")
        if shard_count != self.shard_count:
            raise JoinRefused(f"{peer}'s names cluster uses shard_count={shard_count}, this node "
                              f"shard_count={self.shard_count}: every member must use the same")
        if cluster_id != core.cluster_id:
            if len(core.members) > 1 and core.is_member:
                raise JoinRefused(f"{self.node.id} is a member of another names cluster of {len(core.members)} "
                                  "members: leave it first")
            if core.grants or core.busy():
                held = ", ".join(short_repr(n, 40) for n in list(core.grants)[:3])
                raise JoinRefused(f"{self.node.id} holds names ({held or 'operations under way'}): "
                                  "unregister them first")
            self._install(self._new_core(cluster_id, epoch, members))
        old = [m for m in self.core.members if m[0] == self.me[0] and m != self.me]
        deadline = self._loop.time() + timeout
        self._joining = True
        try:
            await self._change(timeout, "join", add=self.me, remove=old[0] if old else None)
            # Usable at once: a member's first registration needs its lease, counted once a
            # majority acked a renewal sent after the change.
            await self._lease_valid(deadline, "join")
        finally:
            self._joining = False

    async def _lease_valid(self, deadline: float, what: str) -> None:
        """Wait until this node serves as a member with a valid lease (`NoQuorum` at `deadline`)."""
        core = self.core
        while not (core.is_member and core.serving and core.lease_valid(lease_clock())):
            if self._loop.time() >= deadline or self.closed or core is not self.core:
                raise NoQuorum(f"{what}: this node has no valid lease (no majority acked its renewals in time)")
            await asyncio.sleep(0.005)

    async def leave(self, node_id: str, timeout: float = 10.0) -> None:
        """Remove the member `node_id` (this node, or one that is dead) from the cluster.

        Returns once the change is decided. A removed node's holders step down; a node
        that left stays outside every cluster (its registers still answer the members
        copying them) until it `join`s one or `reset`s. `ValueError` if `node_id` is not
        a member or is the last one; `NoQuorum` after `timeout`. Cancellation abandons
        the wait, not the change.
        """
        self._check_open("leave")
        check_timeout(timeout, "Names.leave")
        found = [m for m in self.core.members if m[0] == node_id]
        if not found:
            raise ValueError(f"{short_repr(node_id)} is not a member of names cluster {self.service!r} "
                             f"(members: {self.nodes()})")
        if len(self.core.members) == 1:
            raise ValueError("the last member cannot leave its names cluster")
        await self._change(timeout, "leave", remove=found[0])

    async def _change(self, timeout: float, what: str, add: Incarnation | None = None,
                      remove: Incarnation | None = None) -> None:
        deadline = self._loop.time() + timeout
        while True:
            remaining = max(0.0, deadline - self._loop.time())
            result = await self._run(
                lambda op_id, now: self.core.change(op_id, now, add=add, remove=remove), remaining, what)
            if result[0] == "ok":
                return
            if result[0] == "invalid":
                raise ValueError(f"Names.{what}: the change is no longer possible ({result})")
            # "busy": another change of this node runs; try again shortly.
            if self._loop.time() + 0.05 > deadline:
                raise NoQuorum(f"Names.{what}: another membership change is still under way")
            await asyncio.sleep(0.05)

    async def reset(self, force: bool = False) -> None:
        """Start a new cluster of this node alone, with a new cluster id.

        For a cluster whose majority is gone for good. Tokens of the new cluster start
        again: compare ``(cluster_id, token)`` pairs downstream. Holders of this node lose
        their names. `ValueError` unless ``force=True``.
        """
        self._check_open("reset")
        if force is not True:
            raise ValueError("Names.reset needs force=True: it abandons the cluster and its names")
        for name, (pid, token, _lgen) in list(self.core.grants.items()):
            self.holders.lost(name, pid, token)
        for fut in self._waiters.values():
            if not fut.done():
                fail(fut, NoQuorum(f"names service {self.service!r} was reset"))
        self._waiters.clear()
        # A new incarnation too: this node's old self is still a member of the old cluster
        # (with registers it no longer has); rejoining it must go through a replace step.
        self.me = (self.node.id, self.node.creation, secrets.randbits(62))
        self.link.me = self.me
        self.link.peers.clear()
        self._install(self._new_core(secrets.token_hex(8), 0, [self.me]))
        for peer in self.node.peers():
            self.link.say_hello(peer)

    @property
    def cluster_id(self) -> str:
        """The id of the cluster this node belongs to (new after `reset`)."""
        return str(self.core.cluster_id)

    # -- names ----------------------------------------------------------------------------

    async def register_name(self, name: Any, pid: Pid | None = None, timeout: float = 5.0) -> bool:
        """Make `pid` (a live process of this node; default the caller) the holder of `name`.

        True once it holds the name (also if it already did); False at once if a process
        of another node holds it and that node is connected and renews its lease, or a
        process of this node holds it. If the holder's node is not connected or stopped
        renewing, waits (within `timeout`) for its lease to end and takes the name over;
        False if it is still held at the timeout. `TypeError` for a name that is not
        a key term, `NotLocal`/`NoProcess` for a pid that is not a live local process,
        `NoQuorum` after `timeout`. After a timeout or a cancellation the process does
        not keep a name the operation gives it later: it is released again.
        """
        self._check_open("register_name")
        self._check_member("register_name")
        check_key(name, "name")
        check_timeout(timeout, "Names.register_name")
        pid = self._live_local(pid, "register_name")
        return await self._register(name, pid, self._loop.time() + timeout, timeout, wait_while_renewed=True)

    async def _register(self, name: Any, pid: Pid, deadline: float, timeout: float, wait_while_renewed: bool) -> bool:
        """`register_name`'s rounds. With `wait_while_renewed` False, a holder whose node
        still renews at some acceptors ("busy") is an answer too: False at once."""
        started = self._loop.time()
        self.counters["registers"] += 1
        while True:
            held = self.core.holder(name, lease_clock())
            if held is not None and held[0] == pid:
                return True
            result = await self._run(lambda op_id, now: self.core.register(name, pid, now, op_id),
                                     max(0.0, deadline - self._loop.time()), "register_name", name, pid)
            status = result[0]
            if status == "ok":
                self._latency["register"].samples.append(self._loop.time() - started)
                return True
            if status == "held":
                owner = result[2][3]
                if owner == self.me or self.link.peers.get(owner[0]) == owner:
                    return False
                # Its node is not connected: wait for its lease to end, then try again.
                pause = min(self.lease / 4, deadline - self._loop.time())
                if pause <= 0:
                    return False
                await asyncio.sleep(pause)
                continue
            # "busy": the holder's node renewed lately (wait until its lease may be over);
            # "lost": decided while this node's lease lapsed (it waits for a new one).
            if status == "busy" and not wait_while_renewed:
                return False
            pause = result[2] if status == "busy" else 0.0
            if self._loop.time() + pause > deadline:
                raise NoQuorum(f"register_name: {short_repr(name)} is still held by a node whose lease has "
                               f"not ended after {short_repr(timeout)} s")
            if pause > 0:
                await asyncio.sleep(pause)

    async def unregister_name(self, name: Any, timeout: float = 5.0) -> bool:
        """Free `name` if a process of this node validly holds it: True once freed, False
        if none does. `NoQuorum` after `timeout` (the release goes on until decided);
        a cancellation abandons the wait the same way."""
        self._check_open("unregister_name")
        check_key(name, "name")
        check_timeout(timeout, "Names.unregister_name")
        if self.core.holder(name, lease_clock()) is None:
            return False
        self.counters["releases"] += 1
        result = await self._run(lambda op_id, now: self.core.release(name, now, op_id), timeout, "unregister_name")
        return result[0] == "ok"

    def whereis_name(self, name: Any) -> Pid | None:
        """The valid holder of `name` as this node knows it, or None: a local read.

        A holder of this node counts while this node's lease is valid; one of another node
        while that node is connected and has renewed here within a lease, in the holder's
        lease generation. `TypeError` for a name that is not a key term.
        """
        core = self.core
        try:
            grant = core.grants.get(name)
        except TypeError:
            grant = check_key(name, "name")  # raises, naming what is wrong with it
        if grant is not None:  # the hot path: one dict lookup and one clock read
            return grant[0] if grant[2] == core.lgen and _clock() < core.valid_until else None
        if type(name) is not str:
            check_key(name, "name")
        value = core.remote_holder(name, _clock())
        if value is None or self.link.peers.get(value[3][0]) != value[3]:
            return None  # another node's holder counts while that node is connected
        return value[0]

    def token(self, name: Any) -> int | None:
        """The fencing token of `name`'s valid holder as this node knows it, or None."""
        held = self.holder(name)
        return None if held is None else held[1]

    def holder(self, name: Any) -> tuple[Pid, int] | None:
        """``(pid, token)`` of the valid holder of `name` as this node knows it, or None
        (what `whereis_name` and `token` read)."""
        core = self.core
        try:
            grant = core.grants.get(name)
        except TypeError:
            grant = check_key(name, "name")  # raises, naming what is wrong with it
        if grant is not None:
            return (grant[0], grant[1]) if grant[2] == core.lgen and _clock() < core.valid_until else None
        return self._remote_holder(name)

    def _remote_holder(self, name: Any) -> tuple[Pid, int] | None:
        if type(name) is not str:
            check_key(name, "name")
        value = self.core.remote_holder(name, _clock())
        if value is None or self.link.peers.get(value[3][0]) != value[3]:
            return None  # another node's holder counts while that node is connected
        return (value[0], value[1])

    async def lookup(self, name: Any, timeout: float = 5.0) -> tuple[Pid, int] | None:
        """The holder of `name` and its token as a majority has decided it (linearizable),
        or None if it is free. The holder's node may have died since; `NoQuorum` after
        `timeout`. Cancellation abandons the wait (a read changes nothing)."""
        self._check_open("lookup")
        check_key(name, "name")
        check_timeout(timeout, "Names.lookup")
        started = self._loop.time()
        self.counters["lookups"] += 1
        result = await self._run(lambda op_id, now: self.core.lookup(name, now, op_id), timeout, "lookup")
        self._latency["lookup"].samples.append(self._loop.time() - started)
        value = result[2]
        return None if value[0] is None else (value[0], value[1])

    async def update(self, name: Any, new_pid: Pid, expected_token: int | None = None,
                     timeout: float = 5.0) -> bool:
        """Hand `name` to `new_pid` if its token is still `expected_token` (compare-and-set).

        `expected_token` None takes the token this node knows. Runs on the holder's node
        (forwarded there if the holder is elsewhere); a `new_pid` of another node must be
        alive there and that node must hold a valid lease. True once `new_pid` holds the
        name with a larger token; False if the token changed, the name is free or held by
        a node this one cannot reach. `NoProcess` if `new_pid` is dead, `NoQuorum` after
        `timeout`. A timeout or a cancellation abandons the wait, not the hand-over: it
        may still happen.
        """
        self._check_open("update")
        check_key(name, "name")
        check_timeout(timeout, "Names.update")
        if type(new_pid) is not Pid:
            raise TypeError(f"update: new_pid must be a Pid, got {short_repr(new_pid, 60)}")
        if expected_token is None:
            expected_token = self.token(name)
            if expected_token is None:
                return False
        elif type(expected_token) is not int:
            raise TypeError(f"update: expected_token must be an int or None, got {short_repr(expected_token)}")
        deadline = self._loop.time() + timeout
        self.counters["updates"] += 1
        if self.core.holder(name, lease_clock()) is None:
            return await self._forward_update(name, new_pid, expected_token, deadline)
        owner: Incarnation | None = None
        lgen = 0
        if self._runtime.is_local(new_pid):
            if self._runtime.process(new_pid) is None:
                raise NoProcess(f"update: {short_repr(new_pid)} is not alive")
        else:
            reply = await self._ask(new_pid.node, "lease", [new_pid], deadline)
            owner = (str(reply[1][0]), int(reply[1][1]), int(reply[1][2]))
            lgen = int(reply[2])
            if owner != self.link.peers.get(new_pid.node):
                return False
        token = expected_token
        result = await self._run(
            lambda op_id, now: self.core.update(name, new_pid, token, now, op_id, owner, lgen),
            max(0.0, deadline - self._loop.time()), "update", name, new_pid if owner is None else None)
        if result[0] == "ok":
            self.counters["handoffs"] += 1
            return True
        return False

    async def _forward_update(self, name: Any, new_pid: Pid, token: int, deadline: float) -> bool:
        known = self.core.known(name)
        if known is None or known[1][0] is None or known[1][3] == self.me:
            return False
        holder_node = known[1][3][0]
        if holder_node not in self.link.peers:
            return False
        remaining = max(0.0, deadline - self._loop.time())
        reply = await self._ask(holder_node, "update", [name, new_pid, token, remaining], deadline)
        return reply[1] is True

    async def _ask(self, peer: str, what: str, args: list[Any], deadline: float) -> list[Any]:
        """A request to `peer`'s service; its ``["ok", ...]`` reply, or the error it names."""
        remaining = max(0.0, deadline - self._loop.time())
        try:
            reply = await self.link.call(peer, what, args, remaining)
        except TimeoutError:
            raise NoQuorum(f"{peer} did not answer a names {what} request within {short_repr(remaining)} s") \
                from None
        if type(reply) is not list or not reply or reply[0] not in ("ok", "error"):
            raise NoProcess(f"{peer} answered a names {what} request with {short_repr(reply, 100)}")
        if reply[0] == "error":
            message = str(reply[1]) if len(reply) > 1 else "error"
            if message.startswith("NoProcess"):
                raise NoProcess(f"{peer}: {message}")
            if message.startswith("NoQuorum"):
                raise NoQuorum(f"{peer}: {message}")
            raise ValueError(f"{peer} refused a names {what} request: {message}")
        return reply

    async def get_or_start(self, name: Any, fn: Callable[..., Awaitable[Any]], *args: Any,
                           timeout: float = 5.0) -> Pid:
        """The holder of `name`, or a new process running ``fn(*args)`` that now holds it.

        The new process starts here but waits for the name before it runs ``fn``: if
        another node's process wins the name, this one is killed without running any of
        ``fn`` and the winner is returned. `NoQuorum` after `timeout`; after a timeout or a
        cancellation a name the new process is given later is released again.
        """
        self._check_open("get_or_start")
        self._check_member("get_or_start")
        check_key(name, "name")
        check_timeout(timeout, "Names.get_or_start")
        if not callable(fn):
            raise TypeError(f"get_or_start: fn must be an async function, got {short_repr(fn, 60)}")
        deadline = self._loop.time() + timeout
        while True:
            holder = self.whereis_name(name)
            if holder is not None:
                return holder
            # Not validly held as this node knows it: ask a majority before trying to take it,
            # so that a holder whose node is connected (its renewals not counted here yet, as
            # just after a heal) is found rather than challenged by a takeover it would refuse.
            found = await self.lookup(name, timeout=max(0.0, deadline - self._loop.time()))
            if found is not None and self._reachable(found[0]):
                return found[0]
            gate: asyncio.Future[None] = self._loop.create_future()
            pid = self._runtime.spawn(_gated, gate, fn, *args)
            try:
                # A holder still renewing somewhere is looked up rather than waited out.
                won = await self._register(name, pid, deadline, timeout, wait_while_renewed=False)
            except BaseException:
                self._runtime.exit(pid, "kill")
                raise
            if won:
                gate.set_result(None)
                return pid
            self._runtime.exit(pid, "kill")
            found = await self.lookup(name, timeout=max(0.0, deadline - self._loop.time()))
            if found is not None:
                return found[0]
            # Freed meanwhile: try again.

    def _reachable(self, pid: Pid) -> bool:
        """A live process of this node, or a process of a connected member's service."""
        if self._runtime.is_local(pid):
            return self._runtime.process(pid) is not None
        return pid.node in self.link.peers

    def send(self, name: Any, msg: Any) -> Pid:
        """Send `msg` to the valid holder of `name` (as `whereis_name` finds it); its pid.
        `NoProcess` if there is none."""
        pid = self.whereis_name(name)
        if pid is None:
            raise NoProcess(f"no valid holder of {short_repr(name)} in names service {self.service!r}")
        self._runtime.send(pid, msg)
        return pid

    def via(self, name: Any, token: int | None = None) -> Via:
        """A `Via` for `Server.start(name=...)`, `call`, `cast` and `send`: resolved by
        `whereis_name` at each use, registered by `register_name`.

        With `token`, it resolves only while the holder has that fencing token: a call
        through it reaches the holder the caller saw, or raises `NoProcess` once the name
        has moved on."""
        check_key(name, "name")
        if token is None:
            return Via(self._naming, name)
        if type(token) is not int:
            raise TypeError(f"via: token must be an int or None, got {short_repr(token)}")
        return Via(_Naming(self, token), name)

    def _live_local(self, pid: Any, what: str) -> Pid:
        if pid is None:
            proc = current_process()
            if proc.runtime is not self._runtime:
                raise NotLocal(proc.pid, self.node.id)
            return proc.pid
        if type(pid) is not Pid:
            raise TypeError(f"{what}: pid must be a Pid, got {short_repr(pid, 60)}")
        if not self._runtime.is_local(pid):
            raise NotLocal(pid, self.node.id)
        if self._runtime.process(pid) is None:
            raise NoProcess(f"{what}: {short_repr(pid)} is not alive")
        return pid

    # -- observability --------------------------------------------------------------------

    def stat(self) -> dict[str, Any]:
        """Members, lease state, names held here, latency percentiles (seconds) and counters."""
        core = self.core
        now = lease_clock()
        out: dict[str, Any] = {
            "cluster_id": self.cluster_id,
            "epoch": core.epoch,
            "members": self.nodes(),
            "live_members": self.live_nodes(),
            "is_member": core.is_member,
            "serving": core.serving,
            "lease": self.lease,
            "lease_valid": core.lease_valid(now),
            "lease_remaining": max(0.0, core.valid_until - now) if core.lease_valid(now) else 0.0,
            "lgen": core.lgen,
            "held_here": len(core.grants),
            "round_trip": core.round_trip(),
            "retries": core.retries,
            "accepts": core.accepts,
            "rejects": core.rejects,
            "messages_sent": self.link.messages_out,
            "payloads_sent": self.link.payloads_out,
        }
        out.update(self.counters)
        out["step_downs"] = self.holders.step_downs
        for kind, lat in self._latency.items():
            for p, v in lat.percentiles().items():
                out[f"{kind}_{p}"] = v
        return out

    async def drain(self, timeout: float) -> None:
        """Before a graceful stop: release the names held here (so that other members may
        take them at once, not a lease later), then wait until no operation of this node is
        under way; `TimeoutError` after `timeout` seconds (a release still under way goes
        on; so does it after a cancellation). The holders are let go as for a lost lease
        (killed, or sent `NameLost`).

        It waits a lease at most, whatever `timeout`: past a lease the names are free
        anyway (the lease lapses). Without a connected majority it releases nothing: no
        release could be decided."""
        bound = min(timeout, self.lease)
        deadline = self._loop.time() + bound
        if self.core.grants and len(self.live_nodes()) >= self.core.majority:
            releases = [self.unregister_name(name, bound) for name in list(self.core.grants)]
            await asyncio.gather(*releases, return_exceptions=True)
        while self.core.busy():
            if self._loop.time() >= deadline:
                raise TimeoutError(f"names service {self.service!r}: operations still under way")
            await asyncio.sleep(0.01)


def _timer_key(timer_id: tuple[Any, ...]) -> tuple[Any, ...]:
    """Timers of one key replace each other: a round's timer (or a wait's) is per name, the
    attempt it belongs to only tells the core whether it is stale."""
    return timer_id[:2] if timer_id[0] in ("retry", "wait") else timer_id


async def _gated(gate: asyncio.Future[None], fn: Callable[..., Awaitable[Any]], *args: Any) -> Any:
    """A `get_or_start` process: runs ``fn`` only once it holds its name."""
    await gate
    return await fn(*args)
