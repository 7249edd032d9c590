"""Remote messaging: sends, calls, monitors, exits and service messages between nodes (layer 3).

`Remote` is what a node installs as its runtime's `pgregistry.process.Router`: it turns
a send, call, monitor or exit signal aimed at a process of another node into one message
on the confirmed connection to that node (`pgregistry.mesh`), and carries out the same
messages when a peer sends them. In the manner of Erlang's distribution:

* ``send`` / ``send_t`` deliver a term, or a pgregistry message named tuple rebuilt from
  its type name (`pgregistry.events.MESSAGE_TYPES`), to a pid or a locally registered
  name; ``call`` / ``cast`` / ``reply`` carry `Call`, `Cast` and `Reply`;
* a remote monitor is one ``monitor`` message (and ``demonitor``); the target's node
  answers ``down`` (``down_exc`` for an exception reason, as a `RemoteError`); a
  ``call`` carries its monitor, and the reply ends it on both nodes;
* ``exit`` / ``exit_exc`` are exit signals (``"normal"`` from another node is ignored);
* ``svc`` carries a payload to the service of a name (`pgregistry.service`); a node
  running none answers ``nosvc`` and the sender's service hears ``peer_absent``.

Pids of another incarnation of the peer are never delivered to: a send is dropped, a
monitor fires ``"noproc"``. When a peer is lost, `peer_lost` fires every monitor held on
its processes (``"noconnection"``) and drops the ones its processes held here. Nothing a
peer sends is executed; a malformed message raises `MalformedMessage` to the mesh,
which logs it (rate-limited) and drops it.

The full protocol is in docs/protocol.md.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any, Final

from .errors import RemoteError
from .events import MESSAGE_TYPE_NAMES, MESSAGE_TYPES
from .mesh import MalformedMessage, Mesh, PeerHandler, PeerRecord, need
from .process import Call, Cast, Process, Reply
from .runtime import Runtime
from .service import Service
from .terms import Pid, Ref, check_value, is_value
from .transport import Connection
from .wire import encode, encode_trusted

__all__ = ["MAX_ERROR_TEXT", "Remote", "error_parts"]

# The node layer logs under one name, whichever of its modules speaks.
logger = logging.getLogger("pgregistry.node")

#: Longest exception message carried in a `RemoteError`.
MAX_ERROR_TEXT: Final = 2000

_NOT_A_CALL: Final = object()  # `Remote._open_monitor` opens a plain monitor


def error_parts(reason: Any) -> tuple[str, str]:
    """``(type_name, message)`` of a reason that is not a term (usually an exception)."""
    if isinstance(reason, RemoteError):
        return reason.type_name, reason.message[:MAX_ERROR_TEXT]
    cls = type(reason)
    name = cls.__qualname__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__qualname__}"
    try:
        text = str(reason) if isinstance(reason, BaseException) else repr(reason)
    except Exception:  # a broken __str__ must not break an exit
        text = f"<{name} whose str() raised>"
    return name, text[:MAX_ERROR_TEXT]


def _send_reason(conn: Connection, term: list) -> bool:
    """Send `term`, whose last item is an exit reason, if that reason can cross as a term.

    False (nothing sent) for a reason that is not a term (an exception) or too large
    for the peer's frame limit: the caller sends it as a `RemoteError` instead.
    """
    reason = term[-1]
    if type(reason) is not str and not is_value(reason):
        return False
    try:
        conn.send(term)
    except ValueError:
        return False
    return True


class Remote:
    """The remote half of one node's processes and services (see the module docstring).

    Reads the peers of `mesh` (never changes its connections) and the node's
    `services` (a dict the node keeps). Every method runs on the node's loop thread.
    """

    def __init__(self, mesh: Mesh, runtime: Runtime, services: Mapping[str, Service]) -> None:
        self._mesh = mesh
        self._peers = mesh.peers  # the mesh's dict itself, for the hot paths
        self._runtime = runtime
        self._services = services
        self.handlers: dict[str, PeerHandler] = {
            "send": self._on_send,
            "call": self._on_call,
            "reply": self._on_reply,
            "cast": self._on_cast,
            "svc": self._on_svc,
            "nosvc": self._on_nosvc,
            "send_t": self._on_send_t,
            "monitor": self._on_monitor,
            "demonitor": self._on_demonitor,
            "down": self._on_down,
            "down_exc": self._on_down_exc,
            "exit": self._on_exit,
            "exit_exc": self._on_exit_exc,
        }

    def _route(self, dest: Any) -> tuple[Any, PeerRecord | None, Connection | None]:
        """`dest` (another node's pid or ``(name, node_id)``) as a message names it, the
        record of its node and that node's confirmed connection (None if not connected)."""
        if type(dest) is Pid:
            record = self._peers.get(dest.node)
            to: Any = dest
        else:
            to, node_id = dest
            record = self._peers.get(node_id)
        return to, record, None if record is None else record.conn

    def connection(self, peer: str) -> Connection | None:
        """The confirmed connection to the node `peer`, or None."""
        record = self._peers.get(peer)
        return None if record is None else record.conn

    # -- process.Router: from local processes to other nodes ----------------------------

    def send_remote(self, dest: Any, msg: Any) -> None:
        """Send `msg` to `dest` (a pid of another node, or ``(name, node_id)``).

        Dropped when the node is not connected or the pid belongs to another incarnation
        of it; `TypeError` for a message that is not a term in every case.
        """
        to, record, conn = self._route(dest)
        if conn is not None and type(dest) is Pid and dest.creation != record.creation:  # type: ignore[union-attr]
            conn = None
        kind = type(msg)
        if kind is Call:
            term: list = ["call", to, msg.ref, msg.caller, msg.request]
        elif kind is Reply:
            term = ["reply", to, msg.ref, msg.value]
        elif kind is Cast:
            term = ["cast", to, msg.msg]
        elif kind in MESSAGE_TYPE_NAMES:
            term = ["send_t", to, MESSAGE_TYPE_NAMES[kind], list(msg)]
        else:
            term = ["send", to, msg]
        if conn is None:
            check_value(term, "message")
            return
        conn.send(term)
        if kind is Reply and record.in_monitors:  # type: ignore[union-attr]
            # The caller drops its monitor once the reply arrives: drop ours now.
            target = record.in_monitors.pop(msg.ref, None)  # type: ignore[union-attr]
            if target is not None:
                proc = self._runtime.process(target)
                if proc is not None:
                    proc.remove_watcher(msg.ref)

    def monitor_remote(self, watcher: Pid, ref: Ref, pid: Any) -> None:
        """Start the remote half of `watcher`'s monitor `ref` on `pid` (or ``(name, node)``)."""
        proc = self._runtime.process(watcher)
        if proc is not None:
            self._open_monitor(proc, ref, pid)

    def call_remote(self, caller: Process, ref: Ref, dest: Any, request: Any) -> None:
        """Monitor `dest` (another node's pid or ``(name, node_id)``) and call it, in one message."""
        caller.add_monitor(ref, dest)
        self._open_monitor(caller, ref, dest, request)

    def _open_monitor(self, watcher: Process, ref: Ref, dest: Any, request: Any = _NOT_A_CALL) -> None:
        """Send a ``monitor`` of `dest` for `watcher`, or with a `request` the ``call`` that carries it.

        If `dest`'s node is not connected, or `dest` is a pid of an earlier incarnation
        of it, nothing is sent and the monitor fires at once (``"noconnection"``,
        ``"noproc"``), after `TypeError` if `request` is not a term.
        """
        to, record, conn = self._route(dest)
        if conn is None or record is None or (type(dest) is Pid and dest.creation != record.creation):
            if request is not _NOT_A_CALL:
                check_value(request, "call request")
            watcher.deliver_down(ref, dest, "noconnection" if conn is None else "noproc")
            return
        if request is _NOT_A_CALL:
            conn.send(["monitor", watcher.pid, ref, to])
        else:
            conn.send(["call", to, ref, watcher.pid, request])
        record.out_monitors[ref] = watcher.pid

    def demonitor_remote(self, ref: Ref, pid: Any) -> None:
        """Cancel the remote half of the monitor `ref` on `pid`."""
        _to, record, conn = self._route(pid)
        if record is None or record.out_monitors.pop(ref, None) is None:
            return
        if conn is not None:
            conn.send(["demonitor", ref])

    def exit_remote(self, pid: Pid, reason: Any) -> None:
        """Send the exit signal `reason` to the process `pid` of another node."""
        _to, record, conn = self._route(pid)
        if conn is None or record is None or pid.creation != record.creation:
            return
        if not _send_reason(conn, ["exit", pid, reason]):
            conn.send(["exit_exc", pid, *error_parts(reason)])

    def down_remote(self, watcher: Pid, ref: Ref, pid: Pid, reason: Any) -> None:
        """Tell `watcher` (a process of another node) that `pid` exited with `reason`."""
        try:
            record = self._peers.get(watcher.node)
            if record is None:
                return
            record.in_monitors.pop(ref, None)
            conn = record.conn
            if conn is None or watcher.creation != record.creation:
                return
            if not _send_reason(conn, ["down", watcher, ref, reason]):
                conn.send(["down_exc", watcher, ref, *error_parts(reason)])
        except Exception:  # called from inside an exit: never let it fail
            logger.exception("node %s: reporting the exit of %r to %r failed", self._mesh.id, pid, watcher)

    def peer_lost(self, peer: PeerRecord) -> None:
        """`peer`'s connection is gone: fire the monitors held on its processes, drop theirs."""
        out_monitors = peer.out_monitors
        if out_monitors:
            peer.out_monitors = {}
            for ref, watcher in out_monitors.items():
                proc = self._runtime.process(watcher)
                if proc is not None:
                    proc.deliver_down(ref, proc.monitor_target(ref), "noconnection")
        in_monitors = peer.in_monitors
        if in_monitors:
            peer.in_monitors = {}
            for ref, target in in_monitors.items():
                proc = self._runtime.process(target)
                if proc is not None:
                    proc.remove_watcher(ref)

    # -- service messages ------------------------------------------------------------------

    def send_service(self, peer: str, name: str, payload: Any, *, trusted: bool = False) -> bool:
        """See `Node.send_service`."""
        conn = self.connection(peer)
        if conn is None:
            if not trusted:
                check_value(payload, "send_service payload")
            return False
        if trusted:
            conn.send_encoded(encode_trusted(["svc", name, payload]))
        else:
            conn.send(["svc", name, payload])
        return True

    def broadcast_service(self, name: str, payload: Any, peers: Iterable[str] | None, *,
                          trusted: bool, too_big: list[str] | None) -> int:
        """See `Node.broadcast_service`."""
        data = (encode_trusted if trusted else encode)(["svc", name, payload])
        if peers is None:
            records: Iterable[PeerRecord] = self._mesh.up.values()
        else:
            records = [record for record in map(self._peers.get, peers) if record is not None]
        size = len(data)
        targets = []
        for record in records:
            conn = record.conn
            if conn is None:
                continue
            if size <= conn.peer_max_frame:
                targets.append(conn)
            elif too_big is not None:
                too_big.append(record.id)
            else:
                raise ValueError(f"message of {size} bytes exceeds the frame limit of {conn.peer_max_frame} "
                                 f"of {record.id}; sent to nobody")
        for conn in targets:
            conn.send_encoded(data)
        return len(targets)

    async def drain_peer(self, peer: str) -> bool:
        """See `Node.drain_peer`."""
        conn = self.connection(peer)
        if conn is None:
            return False
        try:
            await conn.drain()
        except ConnectionError:
            return False
        return True

    # -- messages from peers ------------------------------------------------------------------

    def _local_process(self, to: Any) -> Process | None:
        """The live local process a message from a peer is addressed to, or None."""
        if type(to) is Pid:
            return self._runtime.process(to)
        need(type(to) is str, "the destination is not a pid or a name")
        pid = self._runtime.whereis(to)
        return None if pid is None else self._runtime.process(pid)

    def _deliver(self, to: Any, msg: Any) -> None:
        proc = self._local_process(to)
        if proc is not None:
            proc.deliver(msg)

    def _on_send(self, peer: PeerRecord, m: list) -> None:
        need(len(m) == 3, "send: wrong length")
        self._deliver(m[1], m[2])

    def _on_cast(self, peer: PeerRecord, m: list) -> None:
        need(len(m) == 3, "cast: wrong length")
        self._deliver(m[1], Cast(m[2]))

    def _on_send_t(self, peer: PeerRecord, m: list) -> None:
        need(len(m) == 4 and type(m[2]) is str and type(m[3]) is list, "send_t: malformed")
        cls = MESSAGE_TYPES.get(m[2])
        if cls is None or len(m[3]) != len(cls._fields):  # type: ignore[attr-defined]
            raise MalformedMessage("send_t: unknown type or wrong arity")
        self._deliver(m[1], cls(*m[3]))

    def _on_reply(self, peer: PeerRecord, m: list) -> None:
        need(len(m) == 4 and type(m[1]) is Pid and type(m[2]) is Ref, "reply: malformed")
        ref = m[2]
        if peer.out_monitors:
            peer.out_monitors.pop(ref, None)  # the callee's node dropped its half already
        proc = self._runtime.process(m[1])
        if proc is not None:
            proc.deliver(Reply(ref, m[3]))

    def _watch_for(self, peer: PeerRecord, watcher: Pid, ref: Ref, to: Any) -> Process | None:
        """Make `watcher` (a process of `peer`) monitor the local `to`; None, having answered
        ``down`` ``"noproc"``, if `to` is not alive."""
        proc = self._local_process(to)
        if proc is None:
            peer.conn.send(["down", watcher, ref, "noproc"])  # type: ignore[union-attr]
            return None
        proc.add_watcher(ref, watcher)
        peer.in_monitors[ref] = proc.pid
        return proc

    def _on_call(self, peer: PeerRecord, m: list) -> None:
        need(len(m) == 5, "call: wrong length")
        _, to, ref, caller, request = m
        need(type(ref) is Ref and type(caller) is Pid and caller.node == peer.id, "call: bad ref or caller")
        # A call carries its monitor: the caller learns if the server dies first.
        proc = self._watch_for(peer, caller, ref, to)
        if proc is not None:
            proc.deliver(Call(ref, caller, request))

    def _on_monitor(self, peer: PeerRecord, m: list) -> None:
        need(len(m) == 4, "monitor: wrong length")
        _, watcher, ref, to = m
        need(type(watcher) is Pid and watcher.node == peer.id and type(ref) is Ref, "monitor: bad watcher or ref")
        self._watch_for(peer, watcher, ref, to)

    def _on_demonitor(self, peer: PeerRecord, m: list) -> None:
        need(len(m) == 2 and type(m[1]) is Ref, "demonitor: malformed")
        target = peer.in_monitors.pop(m[1], None)
        if target is not None:
            proc = self._runtime.process(target)
            if proc is not None:
                proc.remove_watcher(m[1])

    def _deliver_down(self, peer: PeerRecord, watcher: Any, ref: Any, reason: Any) -> None:
        need(type(watcher) is Pid and type(ref) is Ref, "down: bad watcher or ref")
        if peer.out_monitors.pop(ref, None) is None:
            return  # demonitored meanwhile (or never asked for): nothing to deliver
        proc = self._runtime.process(watcher)
        if proc is not None:
            proc.deliver_down(ref, proc.monitor_target(ref), reason)

    def _on_down(self, peer: PeerRecord, m: list) -> None:
        need(len(m) == 4, "down: wrong length")
        self._deliver_down(peer, m[1], m[2], m[3])

    def _on_down_exc(self, peer: PeerRecord, m: list) -> None:
        need(len(m) == 5 and type(m[3]) is str and type(m[4]) is str, "down_exc: malformed")
        self._deliver_down(peer, m[1], m[2], RemoteError(m[3], m[4]))

    def _exit_local(self, pid: Any, reason: Any) -> None:
        need(type(pid) is Pid, "exit: not a pid")
        if type(reason) is str and reason == "normal":
            return  # "normal" from another process is ignored, as in Erlang
        proc = self._runtime.process(pid)
        if proc is not None:
            proc.signal_exit(reason)

    def _on_exit(self, peer: PeerRecord, m: list) -> None:
        need(len(m) == 3, "exit: wrong length")
        self._exit_local(m[1], m[2])

    def _on_exit_exc(self, peer: PeerRecord, m: list) -> None:
        need(len(m) == 4 and type(m[2]) is str and type(m[3]) is str, "exit_exc: malformed")
        self._exit_local(m[1], RemoteError(m[2], m[3]))

    def _on_svc(self, peer: PeerRecord, m: list) -> None:
        need(len(m) == 3 and type(m[1]) is str, "svc: malformed")
        service = self._services.get(m[1])
        handler = getattr(service, "peer_message", None) if service is not None else None
        if handler is None:
            # Tell the sender, so a service waiting to learn who runs it (a scope's
            # discovery) need not wait for an answer that will never come.
            peer.conn.send(["nosvc", m[1]])  # type: ignore[union-attr]
            return
        try:
            handler(peer.id, m[2])
        except Exception:
            logger.exception("node %s: service %r: peer_message from %s raised", self._mesh.id, m[1], peer.id)

    def _on_nosvc(self, peer: PeerRecord, m: list) -> None:
        need(len(m) == 2 and type(m[1]) is str, "nosvc: malformed")
        service = self._services.get(m[1])
        handler = getattr(service, "peer_absent", None) if service is not None else None
        if handler is None:
            return
        try:
            handler(peer.id)
        except Exception:
            logger.exception("node %s: service %r: peer_absent from %s raised", self._mesh.id, m[1], peer.id)
