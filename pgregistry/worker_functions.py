"""The functions a `Workers` service may run, named by import path (layer 6).

A peer asks a node to start a worker by naming a function, never by sending one: the
request carries an import path ``"module:qualname"`` and the node runs the function only
if it is in the list its own service was started with. Nothing is imported on a peer's
word and nothing is unpickled, so a cookie holder can make a node run only what that
node chose to offer.

That is why a function must have a path that means the same on every node: a module-level
``async def`` reachable as ``module.qualname``. A lambda, a function defined inside
another, a bound method, a `functools.partial`, a function of ``__main__`` (each node's
``__main__`` is a different script) or a decorated function whose name leads elsewhere
has no such path, and `function_path` says which of these it is.
"""

from __future__ import annotations

import functools
import inspect
import sys
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from .terms import short_repr

__all__ = ["Functions", "function_path"]

WorkerFunction = Callable[..., Awaitable[Any]]


def function_path(fn: Any) -> str:
    """``"module:qualname"`` of `fn`, a module-level async function; `TypeError` naming
    why `fn` cannot be named by a path every node resolves alike."""
    if isinstance(fn, functools.partial):
        raise TypeError(f"{short_repr(fn, 60)} is a functools.partial: it has no import path; "
                        "list the function itself and pass the arguments to spawn")
    if inspect.ismethod(fn):
        raise TypeError(f"{fn.__qualname__} is a bound method: its object cannot travel; "
                        "use a module-level async function")
    name = getattr(fn, "__name__", None)
    qualname = getattr(fn, "__qualname__", None)
    if name == "<lambda>":
        raise TypeError(f"{qualname} is a lambda: it has no import path")
    if type(qualname) is str and "<locals>" in qualname:
        raise TypeError(f"{qualname} is defined inside another function (a closure): it has no import path; "
                        "define it at module level")
    if not inspect.iscoroutinefunction(fn):
        raise TypeError(f"{short_repr(fn, 60)} is not an async function (a worker is an `async def`)")
    module = fn.__module__
    if type(qualname) is not str or type(module) is not str:
        raise TypeError(f"{short_repr(fn, 60)} has no module and qualified name to be found by")
    if module == "__main__":
        raise TypeError(f"{qualname} is defined in __main__, which is a different script on every node; "
                        "move it to a module")
    found: Any = sys.modules.get(module)
    for part in qualname.split("."):
        found = getattr(found, part, None)
    if found is not fn:
        raise TypeError(f"{module}.{qualname} does not lead back to {short_repr(fn, 60)} "
                        "(decorated or replaced?): it cannot be named by its path")
    return f"{module}:{qualname}"


class Functions:
    """The functions one `Workers` service offers, by path.

    ``Functions(fns)`` checks each (`function_path`'s `TypeError`); `path_of` is the check
    at a call site, `get` the lookup of a path a peer sent.
    """

    __slots__ = ("_by_path", "_paths")

    def __init__(self, fns: Iterable[Any]) -> None:
        if isinstance(fns, str | bytes) or not isinstance(fns, Iterable):
            raise TypeError(f"functions must be an iterable of async functions, got {short_repr(fns, 60)}")
        self._by_path: dict[str, WorkerFunction] = {}
        self._paths: dict[WorkerFunction, str] = {}
        for fn in fns:
            path = function_path(fn)
            self._by_path[path] = fn
            self._paths[fn] = path

    def path_of(self, fn: Any, service: str) -> str:
        """The path of `fn`; `TypeError` if it has none or the service does not list it."""
        try:
            path = self._paths.get(fn)
        except TypeError:  # unhashable: certainly not listed
            path = None
        if path is not None:
            return path
        path = function_path(fn)  # says why it could never be listed, if that is the reason
        raise TypeError(f"{path} is not one of the functions of workers service {service!r}: "
                        "list it in Workers.start(..., functions=...) on every node that hosts the service")

    def get(self, path: Any) -> WorkerFunction | None:
        """The listed function of `path`, or None: never an import."""
        return self._by_path.get(path) if type(path) is str else None

    @property
    def paths(self) -> list[str]:
        return sorted(self._by_path)

    def __len__(self) -> int:
        return len(self._by_path)
