"""Names resolved by a naming service: `Via` and the `NamingService` it asks (layer 1).

Besides a pid, a local name and ``(name, node_id)``, a process can be addressed as
``Via(service, key)``: the service (a unique `pgregistry.registry.Registry`, or anything
with the three methods of `NamingService`) is asked for the pid at every use, so the
name follows whichever process holds the key. `pgregistry.process.send`,
`pgregistry.server.call` and ``cast`` resolve it; `pgregistry.server.Server.start`
registers a new server under it.
"""

from __future__ import annotations

from collections.abc import Awaitable
from typing import Any, Protocol

from .terms import Pid, short_repr

__all__ = ["NamingService", "Via"]


class NamingService(Protocol):
    """A name service usable through `Via` (a unique `Registry` is one).

    `whereis_name` answers at once from what the service knows here. `register_name` and
    `unregister_name` may return an awaitable instead of their result, for a service
    that must ask its peers first (`pgregistry.names.Names`); `Server.start` awaits it.
    """

    def whereis_name(self, key: Any) -> Pid | None: ...

    def register_name(self, key: Any, pid: Pid, value: Any = None) -> bool | Awaitable[bool]: ...

    def unregister_name(self, key: Any) -> Any: ...


class Via:
    """A name resolved by a `NamingService`: ``Via(service, key, value=None)``.

    Accepted by `send`, `pgregistry.server.call` and `pgregistry.server.cast`, and as
    ``name=`` of `Server.start` (which registers the new process with ``value``).
    Immutable; equal and hashed by ``(id(service), key)``, so ``value`` does not count.
    """

    __slots__ = ("service", "key", "value")

    service: NamingService
    key: Any
    value: Any

    def __init__(self, service: NamingService, key: Any, value: Any = None) -> None:
        object.__setattr__(self, "service", service)
        object.__setattr__(self, "key", key)
        object.__setattr__(self, "value", value)

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("Via is immutable")

    def __delattr__(self, name: str) -> None:
        raise AttributeError("Via is immutable")

    def __eq__(self, other: object) -> bool:
        if type(other) is not Via:
            return NotImplemented
        return self.service is other.service and self.key == other.key

    def __hash__(self) -> int:
        return hash((id(self.service), self.key))

    def __repr__(self) -> str:
        if self.value is None:
            return f"Via({self.service!r}, {short_repr(self.key)})"
        return f"Via({self.service!r}, {short_repr(self.key)}, value={short_repr(self.value)})"
