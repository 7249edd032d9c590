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
``["rep", id, ["error", "TypeName: message"]]`` (version `INSPECTION_VERSION`):

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
    ``{"rows": [(key, pid, value), ...], "next": cursor or None, "total": rows in the
    view}``: rows from `cursor` (an offset, 0 first), at most `limit` (1..`MAX_PAGE`),
    fewer if they would not fit in one frame to the tool. An offset is not a snapshot:
    writes between pages may shift rows.
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
from .wire import encode
from .workers import Workers

__all__ = ["INSPECTION_VERSION", "MAX_PAGE", "Inspection", "InspectionClient", "InspectionError"]

log = logging.getLogger("pgregistry.inspection")

INSPECTION_VERSION: Final = 1
"""The version of the requests and replies above."""

MAX_PAGE: Final = 10_000
"""Most rows one ``select`` request may ask for."""

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
        _req, rid, command, args = term
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
        conn.send(["rep", rid, result])

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
        rows = self._registry(scope).select(_ALL_ROWS)
        page = rows[cursor:cursor + limit]
        budget = conn.peer_max_frame - 1024  # the reply's own wrapping
        while page and len(encode(page)) > budget:
            page = page[:len(page) // 2]  # halve until one frame holds it
        end = cursor + len(page)
        return {"rows": page, "next": end if end < len(rows) else None, "total": len(rows)}

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
                      ssl: _ssl.SSLContext | None = None) -> InspectionClient:
        """Connect to the node at `address` (``host:port`` or a node id) as a tool.

        `AuthenticationError` if the cookies differ; `OSError`, `ConnectionError` or
        `TimeoutError` if the node cannot be reached or does not open the exchange within
        `timeout`; `InspectionError` if it refuses tools.
        """
        endpoint = Endpoint("pgregistry-tool", cookie, ssl=ssl, handshake_timeout=timeout,
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
        conn.send(["req", rid, command, list(args)])
        try:
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
