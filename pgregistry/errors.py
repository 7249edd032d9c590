"""The exceptions pgregistry raises.

Each one is also a subclass of the built-in exception a Python caller would reach for
first (`NoProcess` is a `LookupError`, `CallTimeout` a `TimeoutError`, `NotLocal` a
`ValueError`), so code that does not know pgregistry still catches them sensibly.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "RegistryError",
    "AlreadyRegistered",
    "AlreadyStarted",
    "NotLocal",
    "NoProcess",
    "CallTimeout",
    "AuthenticationError",
]


class RegistryError(Exception):
    """Base class of every pgregistry error."""


class AlreadyRegistered(RegistryError):
    """A unique key is already held by a live local process, `holder`."""

    def __init__(self, holder: Any, key: Any = None) -> None:
        self.holder = holder
        self.key = key
        super().__init__(f"key {key!r} is already registered by {holder!r}")


class AlreadyStarted(RegistryError):
    """A name (a process name, a via name or a scope name) is already taken by `pid`."""

    def __init__(self, pid: Any, name: Any = None) -> None:
        self.pid = pid
        self.name = name
        super().__init__(f"{name!r} is already started as {pid!r}")


class NotLocal(RegistryError, ValueError):
    """A pid of another node was given where a pid of this node is required."""

    def __init__(self, pid: Any, node_id: str | None = None) -> None:
        self.pid = pid
        where = f" (this node is {node_id})" if node_id else ""
        super().__init__(f"{pid!r} is not a process of this node{where}")


class NoProcess(RegistryError, LookupError):
    """The destination process does not exist (dead pid, or no process under a name)."""


class CallTimeout(RegistryError, TimeoutError):
    """A `call` got no reply in time."""


class AuthenticationError(RegistryError):
    """A peer failed the cookie challenge, or this node failed the peer's."""
