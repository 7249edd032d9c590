"""Shared pieces of the benchmarks: the table implementations, the registry helper and
the plain-dict baseline registries.

Both the pytest-benchmark suite (``test_bench_registry.py``) and the memory probe
(``memory.py``) import this module, so every figure is built the same way:

* `table_module` names an implementation: ``"cython"`` (``pgregistry._core``) or
  ``"python"`` (``pgregistry._core_py``, the pure twin).
* `make_registry` starts a registry on a chosen implementation without touching the
  process-wide choice of ``pgregistry._table``: a `ScopeServer` built with
  ``table_module=...``, attached to the node like ``Registry.start`` does.
* `DictRegistry` / `LockedDictRegistry` are what a user would write instead of a
  registry: ``dict[key, list[(pid, value)]]``, with and without a lock.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import os
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any, Final

# Run against the working tree (in-place build of the extension included), whether or
# not the package is installed in the interpreter's site-packages.
REPO_ROOT: Final = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from pgregistry.node import Node  # noqa: E402  (needs the path above)
from pgregistry.registry import Registry  # noqa: E402
from pgregistry.scope import ScopeServer  # noqa: E402

__all__ = [
    "TABLE_MODULES", "REPO_ROOT", "extension_status", "table_module", "make_registry",
    "DictRegistry", "LockedDictRegistry",
]

#: Implementation name -> module providing ``Table`` and ``Matcher``.
TABLE_MODULES: Final[dict[str, str]] = {"cython": "pgregistry._core", "python": "pgregistry._core_py"}


def extension_status() -> str | None:
    """None if the Cython table can be imported, else why not (for skip reasons).

    A missing extension module (not built yet) gives ``"extension not built"``; an
    extension file that exists but fails to import is *not* hidden: it is reported
    with its error so that a broken build is visible in the bench output too.
    """
    built = any((REPO_ROOT / "pgregistry").glob("_core*.so")) or any((REPO_ROOT / "pgregistry").glob("_core*.pyd"))
    try:
        importlib.import_module(TABLE_MODULES["cython"])
    except ModuleNotFoundError as exc:
        if exc.name == TABLE_MODULES["cython"] and not built:
            return "extension not built"
        return f"extension failed to import: {exc}"
    except ImportError as exc:
        return f"extension failed to import: {exc}"
    return None


def table_module(impl: str) -> ModuleType:
    """The module of the table implementation `impl` (``"cython"`` or ``"python"``)."""
    return importlib.import_module(TABLE_MODULES[impl])


def make_registry(node: Node, name: str, impl: str, *, unique: bool = False) -> Registry:
    """A registry `name` on the running `node` whose table is implementation `impl`.

    Same as ``await Registry.start(node, name, keys=...)`` with no listeners, except that
    the scope server gets its table from `impl` instead of the process-wide default, so
    both implementations can be measured side by side in one process.
    """
    node.require_loop_thread("make_registry")
    scope = ScopeServer(node, name, unique=unique, listeners=(), table_module=table_module(impl))
    node.attach_service(name, scope)
    return Registry(node, name, scope)


class DictRegistry:
    """The baseline: the registry a user writes by hand, ``dict[key, list[(pid, value)]]``.

    `lookup` returns a copy of the key's list (callers may not see later changes, as
    with `Registry.lookup`); `register` appends; `unregister` drops the most recent
    entry of a pid under a key. No pid index (so no O(rows) exit cleanup), no
    validation, no events: a lower bound for a hand-written registry.
    """

    __slots__ = ("entries",)

    def __init__(self) -> None:
        self.entries: dict[Any, list[tuple[Any, Any]]] = {}

    def register(self, key: Any, pid: Any, value: Any) -> None:
        """Append ``(pid, value)`` under `key`."""
        entries = self.entries.get(key)
        if entries is None:
            self.entries[key] = [(pid, value)]
        else:
            entries.append((pid, value))

    def unregister(self, key: Any, pid: Any) -> None:
        """Remove the most recent entry of `pid` under `key`, if any."""
        entries = self.entries.get(key)
        if not entries:
            return
        for i in range(len(entries) - 1, -1, -1):
            if entries[i][0] == pid:
                del entries[i]
                break
        if not entries:
            del self.entries[key]

    def lookup(self, key: Any) -> list[tuple[Any, Any]]:
        """A copy of the ``[(pid, value)]`` list of `key` (``[]`` if none)."""
        entries = self.entries.get(key)
        return list(entries) if entries else []

    def clear(self) -> None:
        """Forget every entry."""
        self.entries.clear()


class LockedDictRegistry(DictRegistry):
    """`DictRegistry` behind a `threading.Lock`, as it must be when threads read it."""

    __slots__ = ("lock",)

    def __init__(self) -> None:
        super().__init__()
        self.lock = threading.Lock()

    def register(self, key: Any, pid: Any, value: Any) -> None:
        """Append ``(pid, value)`` under `key`, holding the lock."""
        with self.lock:
            entries = self.entries.get(key)
            if entries is None:
                self.entries[key] = [(pid, value)]
            else:
                entries.append((pid, value))

    def unregister(self, key: Any, pid: Any) -> None:
        """Remove the most recent entry of `pid` under `key`, holding the lock."""
        with self.lock:
            DictRegistry.unregister(self, key, pid)

    def lookup(self, key: Any) -> list[tuple[Any, Any]]:
        """A copy of the list of `key`, taken under the lock."""
        with self.lock:
            entries = self.entries.get(key)
            return list(entries) if entries else []


def pure_python_forced() -> bool:
    """True when ``PGREGISTRY_PURE_PYTHON=1``: the bench then measures the twin only."""
    return os.environ.get("PGREGISTRY_PURE_PYTHON") == "1"


def loop_factories(only: str | None) -> list[tuple[str, Callable[[], asyncio.AbstractEventLoop]]]:
    """The event loops to measure: the standard one, and uvloop when installed."""
    factories: list[tuple[str, Callable[[], asyncio.AbstractEventLoop]]] = [("asyncio", asyncio.new_event_loop)]
    try:
        import uvloop
    except ImportError:
        print("(uvloop not installed: standard loop only)")
    else:
        factories.append(("uvloop", uvloop.new_event_loop))
    return [(name, factory) for name, factory in factories if only in (None, name)]


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), or ``"unknown cpu"``."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return "unknown cpu"


def git_commit() -> str:
    """The short hash of the checked-out commit, or ``"?"``."""
    try:
        done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True)
    except OSError:
        return "?"
    return done.stdout.strip() or "?"
