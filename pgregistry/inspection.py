"""Looking inside a running node from outside: the operator's interface (layer 7).

``pgregistry status``, ``lookup``, ``select``, ``whereis`` and ``drain`` connect to a node
as a *tool*: the connection proves the cookie like a peer's, then opens with
``["tool", 1]`` and never becomes a peer (no ``NodeUp``, no ``peer_up``, never gossiped:
see `pgregistry.mesh`). Two halves, like the protocol they share:

* `Inspection`, on the node: answers the requests below from the node's registries,
  names and workers services. Read-only, except ``drain``, which asks the node to stop
  gracefully if its owner allowed it (``on_drain``).
* `InspectionClient`, in the tool: connects, asks, closes.

Requests ``["req", id, command, args]``, replies ``["rep", id, ["ok", result]]`` or
``["rep", id, ["error", "TypeName: message"]]`` (version `INSPECTION_VERSION`). A node
answers one request per loop iteration, in order; a tool with more than
`MAX_PENDING` requests waiting is disconnected.

``version []``
    ``{"inspection": 1, "pgregistry": version, "protocol": wire protocol version,
    "core": "cython" | "python"}``.
``info []``
    ``{"id", "creation", "os_pid", "scopes", "names", "workers", "peers"}``.
``peers []``
    ``{peer: connection counters}`` for every connected peer.
``lookup [scope, key]``
    ``[(pid, value), ...]``: the node's view of `key` in registry `scope`.
``select [scope, cursor, limit]``
    ``{"rows": [(key, pid, value), ...], "next": cursor or None, "total": rows,
    "skipped": n}``: rows from `cursor` (0 first), at most `limit` (1..`MAX_PAGE`), fewer if
    more would not fit in one frame to the tool. Cursor 0 takes a snapshot of the view
    for this connection (the one cost proportional to the registry); later cursors page
    through that snapshot, so pages neither shift nor cost more than themselves. A row
    too large for a frame on its own is skipped and counted in ``skipped``.
``stat []``
    ``{"node": {...}, "scopes": {scope: stat}, "names": {...}, "workers": {...}}``.
``whereis [service, name]``
    ``(pid, token)`` of the name's valid holder as the node knows it, or None.
``drain []``
    Start a graceful stop of the node (`Inspection` ``on_drain``); an error if the node
    does not allow it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import ssl as _ssl
from collections import deque
from collections.abc import Callable
from typing import Any, Final

from ._table import IMPLEMENTATION
from ._version import __version__
from .handshake import PROTOCOL_VERSION
from .logbudget import LogBudget
from .mesh import TOOL_VERSION
from .names import Names
from .node import Node
from .registry import Registry
from .spec import V1, V2, V3
from .terms import check_key, short_repr
from .transport import Connection, Endpoint
from .wire import MAX_FRAME, encode
from .workers import Workers

__all__ = ["INSPECTION_VERSION", "MAX_PAGE", "Inspection", "InspectionClient", "InspectionError"]

log = logging.getLogger("pgregistry.inspection")

INSPECTION_VERSION: Final = 1
"""The version of the requests and replies above."""

MAX_PAGE: Final = 10_000
"""Most rows one ``select`` request may ask for."""

MAX_PENDING: Final = 64
"""Most requests of one tool waiting for their answer; more closes its connection."""

_TOOL_TICK: Final = 0.1  # seconds between a tool's ticks

_ALL_ROWS: Final[list[Any]] = [((V1, V2, V3), [], [(V1, V2, V3)])]


class InspectionError(Exception):
    """A node refused or failed an inspection request; the message is the node's reason."""


class Inspection:
    """Answers the tools that connect to one node (``Inspection.serve(node, ...)``)."""

    def __init__(self, node: Node, registries: dict[str, Registry], names: dict[str, Names],
                 workers: dict[str, Workers], on_drain: Callable[[], None] | None) -> None:
        self.node = node
        self.registries = registries
        self.names = names
        self.workers = workers
        self.on_drain = on_drain
        self._log = LogBudget(log, f"inspection on {node.id}")
        self._pending: dict[Connection, deque[list[Any]]] = {}  # requests not answered yet
        self._snapshots: dict[Connection, tuple[str, list[Any]]] = {}  # a select's rows, per tool
        self._commands: dict[str, Callable[..., Any]] = {
            "version": self._version, "info": self._info, "peers": self._peers, "lookup": self._lookup,
            "select": self._select, "stat": self._stat, "whereis": self._whereis, "drain": self._drain,
        }

    @classmethod
    def serve(cls, node: Node, *, registries: dict[str, Registry] | None = None,
              names: dict[str, Names] | None = None, workers: dict[str, Workers] | None = None,
              on_drain: Callable[[], None] | None = None) -> Inspection:
        """Answer tools on `node` from these services (by name), until the node stops.

        `on_drain`, if given, is called (on the loop thread) for a ``drain`` request; it
        should start a graceful stop and return at once.
        """
        self = cls(node, dict(registries or {}), dict(names or {}), dict(workers or {}), on_drain)
        node.serve_tools(self._on_message)
        return self

    def _on_message(self, conn: Connection, term: Any) -> None:
        if type(term) is not list or len(term) != 4 or term[0] != "req" or type(term[2]) is not str \
                or type(term[3]) is not list:
            self._log.warning("inspection: malformed request from %s: %s", conn.peer_id, short_repr(term, 200))
            conn.close("malformed tool request")
            return
        queue = self._pending.get(conn)
        if queue is None:
            queue = self._pending[conn] = deque()
            asyncio.get_running_loop().call_soon(self._answer_next, conn)
        elif len(queue) >= MAX_PENDING:
            self._log.warning("inspection: %s sent more than %d requests at once; closing it", conn.peer_id,
                              MAX_PENDING)
            conn.close("too many tool requests at once")
            return
        queue.append(term)

    def _answer_next(self, conn: Connection) -> None:
        """Answer one request of `conn`, then let the loop run before the next."""
        queue = self._pending.get(conn)
        if not queue or conn.closed:
            self._pending.pop(conn, None)
            self._snapshots.pop(conn, None)
            return
        _req, rid, command, args = queue.popleft()
        handler = self._commands.get(command)
        try:
            if handler is None:
                raise ValueError(f"unknown command {short_repr(command)}; commands: {', '.join(self._commands)}")
            result = ["ok", handler(conn, *args)]
        except TypeError as e:
            result = ["error", f"TypeError: {e}" if handler is None or "positional" not in str(e)
                      else f"TypeError: wrong arguments for {command}: {short_repr(args, 100)}"]
        except (ValueError, LookupError) as e:
            result = ["error", f"{type(e).__name__}: {e}"]
        try:
            conn.send(["rep", rid, result])
        except (TypeError, ValueError) as e:  # not a term, or over the tool's frame limit
            conn.send(["rep", rid, ["error", f"ValueError: the reply cannot be sent: {e}"]])
        if queue:
            asyncio.get_running_loop().call_soon(self._answer_next, conn)
        else:
            del self._pending[conn]
        for other in [c for c in self._snapshots if c.closed]:
            del self._snapshots[other]

    def _registry(self, scope: Any) -> Registry:
        reg = self.registries.get(scope) if type(scope) is str else None
        if reg is None:
            raise LookupError(f"no registry {short_repr(scope)} on {self.node.id}; it runs {sorted(self.registries)}")
        return reg

    # -- commands -------------------------------------------------------------------------

    def _version(self, conn: Connection) -> dict[str, Any]:
        return {"inspection": INSPECTION_VERSION, "pgregistry": __version__, "protocol": PROTOCOL_VERSION,
                "core": IMPLEMENTATION}

    def _info(self, conn: Connection) -> dict[str, Any]:
        node = self.node
        return {"id": node.id, "creation": node.creation, "os_pid": os.getpid(), "scopes": sorted(self.registries),
                "names": sorted(self.names), "workers": sorted(self.workers), "peers": sorted(node.peers())}

    def _peers(self, conn: Connection) -> dict[str, Any]:
        node = self.node
        return {peer: node.connection_stats(peer) for peer in sorted(node.peers())}

    def _lookup(self, conn: Connection, scope: Any, key: Any) -> list[Any]:
        return self._registry(scope).lookup(check_key(key))

    def _select(self, conn: Connection, scope: Any, cursor: Any, limit: Any) -> dict[str, Any]:
        if type(cursor) is not int or cursor < 0:
            raise ValueError(f"cursor must be an int >= 0, got {short_repr(cursor)}")
        if type(limit) is not int or not 1 <= limit <= MAX_PAGE:
            raise ValueError(f"limit must be an int in 1..{MAX_PAGE}, got {short_repr(limit)}")
        snapshot = self._snapshots.get(conn)
        if cursor == 0 or snapshot is None or snapshot[0] != scope:
            snapshot = self._snapshots[conn] = (scope, self._registry(scope).select(_ALL_ROWS))
        rows = snapshot[1]
        budget = conn.peer_max_frame - 1024  # the reply's own wrapping
        page: list[Any] = []
        size = skipped = 0
        end = cursor
        while end < len(rows) and len(page) < limit:
            row_size = len(encode(rows[end]))
            if row_size > budget:
                skipped += 1  # too large for any frame to this tool
            elif size + row_size > budget:
                break
            else:
                page.append(rows[end])
                size += row_size
            end += 1
        return {"rows": page, "next": end if end < len(rows) else None, "total": len(rows), "skipped": skipped}

    def _stat(self, conn: Connection) -> dict[str, Any]:
        node = self.node
        return {
            "node": {"id": node.id, "peers": len(node.peers()), "processes": len(node.runtime)},
            "scopes": {name: reg.stat() for name, reg in self.registries.items()},
            "names": {name: _plain_stat(names.stat()) for name, names in self.names.items()},
            "workers": {name: workers.stat() for name, workers in self.workers.items()},
        }

    def _whereis(self, conn: Connection, service: Any, name: Any) -> Any:
        names = self.names.get(service) if type(service) is str else None
        if names is None:
            raise LookupError(f"no names service {short_repr(service)} on {self.node.id}")
        return names.holder(check_key(name, "name"))

    def _drain(self, conn: Connection) -> str:
        if self.on_drain is None:
            raise ValueError(f"{self.node.id} does not take drain requests from tools")
        self.on_drain()
        return "draining"


def _plain_stat(stat: dict[str, Any]) -> dict[str, Any]:
    """A stat dict with its values made terms (lists for tuples of ids stay as they are)."""
    return {k: (list(v) if isinstance(v, set | frozenset) else v) for k, v in stat.items()}


class InspectionClient:
    """A tool's connection to one node: ``await InspectionClient.connect(address, cookie)``."""

    def __init__(self, endpoint: Endpoint) -> None:
        self._endpoint = endpoint
        self._conn: Connection | None = None
        self._opened: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._replies: dict[int, asyncio.Future[Any]] = {}
        self._next = 0
        self.node_id = ""

    @classmethod
    async def connect(cls, address: str, cookie: str, *, timeout: float = 5.0,
                      ssl: _ssl.SSLContext | None = None, max_frame: int = MAX_FRAME) -> InspectionClient:
        """Connect to the node at `address` (``host:port`` or a node id) as a tool.

        `max_frame` is the largest frame this tool accepts (the node sizes its replies
        to fit, `select` pages included).

        `AuthenticationError` if the cookies differ; `OSError`, `ConnectionError` or
        `TimeoutError` if the node cannot be reached or does not open the exchange within
        `timeout`; `InspectionError` if it refuses tools.
        """
        # Ticks often, so that a node with a short down_after never takes an idle tool for dead.
        endpoint = Endpoint("pgregistry-tool", cookie, ssl=ssl, handshake_timeout=timeout, max_frame=max_frame,
                            tick_interval=_TOOL_TICK, down_after=max(2 * _TOOL_TICK, timeout),
                            on_message=lambda conn, term: self._on_message(term),
                            on_close=lambda conn, reason: self._on_close(reason))
        self = cls(endpoint)
        await endpoint.start()
        endpoint.node_id = f"tool-{secrets.token_hex(4)}@{endpoint.host}:{endpoint.port}"
        try:
            conn = await endpoint.connect(address)
            self._conn = conn
            self.node_id = conn.peer_id or address
            conn.send(["tool", TOOL_VERSION])
            await asyncio.wait_for(asyncio.shield(self._opened), timeout)
        except BaseException:
            await endpoint.close()
            raise
        return self

    def _on_message(self, term: Any) -> None:
        if type(term) is not list or not term:
            return
        if term[0] == "tool" and not self._opened.done():
            self._opened.set_result(None)
        elif term[0] == "refuse" and not self._opened.done():
            self._opened.set_exception(InspectionError(f"refused: {short_repr(term[1:], 200)}"))
        elif term[0] == "rep" and len(term) == 3 and type(term[1]) is int:
            fut = self._replies.pop(term[1], None)
            if fut is not None and not fut.done():
                fut.set_result(term[2])

    def _on_close(self, reason: str) -> None:
        error = ConnectionError(f"the connection closed: {reason}")
        if not self._opened.done():
            self._opened.set_exception(error)
            self._opened.exception()
        for fut in self._replies.values():
            if not fut.done():
                fut.set_exception(error)
        self._replies.clear()

    async def request(self, command: str, *args: Any, timeout: float = 5.0) -> Any:
        """Ask `command` with `args`; its result. `InspectionError` with the node's reason
        for an error reply, `TimeoutError` after `timeout` seconds, `ConnectionError` if
        the connection drops. A timeout or a cancellation abandons the wait: a late reply
        is dropped."""
        conn = self._conn
        if conn is None or conn.closed:
            raise ConnectionError("not connected")
        self._next += 1
        rid = self._next
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._replies[rid] = fut
        try:
            conn.send(["req", rid, command, list(args)])
            reply = await asyncio.wait_for(fut, timeout)
        finally:
            self._replies.pop(rid, None)
        if type(reply) is list and len(reply) == 2 and reply[0] == "ok":
            return reply[1]
        if type(reply) is list and len(reply) == 2 and reply[0] == "error":
            raise InspectionError(str(reply[1]))
        raise InspectionError(f"malformed reply {short_repr(reply, 200)}")

    async def close(self) -> None:
        """Close the connection and the client's endpoint."""
        await self._endpoint.close()

    async def __aenter__(self) -> InspectionClient:
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        await self.close()
