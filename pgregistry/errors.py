"""The exceptions pgregistry raises.

Each one is also a subclass of the built-in exception a Python caller would reach for
first (`NoProcess` is a `LookupError`, `CallTimeout` a `TimeoutError`, `NotLocal` a
`ValueError`), so code that does not know pgregistry still catches them sensibly.
"""

from __future__ import annotations

from typing import Any

from .terms import short_repr

__all__ = [
    "RegistryError",
    "AlreadyRegistered",
    "AlreadyStarted",
    "NotLocal",
    "NoProcess",
    "CallTimeout",
    "AuthenticationError",
    "RemoteError",
    "NotReplicated",
    "NoQuorum",
    "JoinRefused",
    "RingUnsettled",
]


class RegistryError(Exception):
    """Base class of every pgregistry error."""


class AlreadyRegistered(RegistryError):
    """A unique key is already held by a live local process, `holder`."""

    def __init__(self, holder: Any, key: Any = None) -> None:
        self.holder = holder
        self.key = key
        super().__init__(f"key {short_repr(key)} is already registered by {short_repr(holder)}")


class AlreadyStarted(RegistryError):
    """A name (a process name, a via name or a scope name) is already taken by `pid`."""

    def __init__(self, pid: Any, name: Any = None) -> None:
        self.pid = pid
        self.name = name
        super().__init__(f"{short_repr(name, 200)} is already started as {short_repr(pid)}")


class NotLocal(RegistryError, ValueError):
    """A pid of another node was given where a pid of this node is required."""

    def __init__(self, pid: Any, node_id: str | None = None) -> None:
        self.pid = pid
        where = f" (this node is {node_id})" if node_id else ""
        super().__init__(f"{short_repr(pid)} is not a process of this node{where}")


class NoProcess(RegistryError, LookupError):
    """The destination process does not exist (dead pid, or no process under a name).

    ``.reason`` is ``"noproc"`` (there is no such process) or ``"noconnection"`` (the
    node that would hold it is not connected, or went down before it answered).
    """

    def __init__(self, *args: Any, reason: str = "noproc") -> None:
        super().__init__(*args)
        self.reason = reason


class CallTimeout(RegistryError, TimeoutError):
    """A `call` got no reply in time."""


class AuthenticationError(RegistryError):
    """A peer failed the cookie challenge, or this node failed the peer's."""


class NotReplicated(RegistryError):
    """`Registry.sync` found entries that this node could not send to its peers.

    ``.entries`` lists them as ``(key, pid, why)``: a value that stopped being a term
    after it was registered (it was mutated), or rows too large for a peer's frame
    limit. Everything else was sent and applied; the peers do not hold these.
    """

    def __init__(self, scope: str, entries: list[tuple[Any, Any, str]], more: int = 0) -> None:
        self.scope = scope
        self.entries = entries
        self.more = more
        shown = "; ".join(f"key {short_repr(key, 60)} of {short_repr(pid)}: {why}" for key, pid, why in entries[:5])
        rest = len(entries) - 5 + more
        super().__init__(f"registry {scope!r}: {len(entries) + more} entries were not sent to peers: {shown}"
                         + (f"; and {rest} more" if rest > 0 else ""))


class NoQuorum(RegistryError, TimeoutError):
    """No majority of the names cluster's members answered within the timeout.

    The operation may still be decided later; if it would make a process of this node a
    holder, the node releases the name again (see `pgregistry.names.Names`)."""


class RingUnsettled(RegistryError, TimeoutError):
    """The nodes of a `pgregistry.workers.Workers` service kept disagreeing on a name's
    owner until the timeout (each sent the request on to another, or views were changing)."""


class JoinRefused(RegistryError):
    """A names cluster cannot take this node: it holds names, belongs to another
    multi-member cluster, or its ``lease``/``shard_count`` differ from the cluster's."""


class RemoteError(RegistryError):
    """An exception that happened on another node, as its type name and message.

    Exceptions are not terms, so they never cross the network: a process on another
    node that crashed with ``ValueError("bad")`` is reported to a local monitor as
    ``Down(ref, pid, RemoteError("ValueError", "bad"))`` (the same for exit signals whose
    reason is an exception). ``type_name`` is the class's qualified name, prefixed with
    its module unless it is a built-in (``"ValueError"``, ``"myapp.jobs.JobFailed"``);
    ``message`` is ``str(exc)``, truncated. Two `RemoteError` are equal when both fields
    are, so a reason can be compared like any other.
    """

    def __init__(self, type_name: str, message: str = "") -> None:
        super().__init__(type_name, message)
        self.type_name = type_name
        self.message = message

    def __str__(self) -> str:
        return f"{self.type_name}: {self.message}" if self.message else self.type_name

    def __repr__(self) -> str:
        return f"RemoteError({self.type_name!r}, {self.message!r})"

    def __eq__(self, other: object) -> bool:
        if type(other) is not RemoteError:
            return NotImplemented
        return self.type_name == other.type_name and self.message == other.message

    def __hash__(self) -> int:
        return hash((RemoteError, self.type_name, self.message))
