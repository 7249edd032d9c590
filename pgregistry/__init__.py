"""pgregistry: a distributed process registry for Python.

Processes are asyncio tasks with a mailbox and a `Pid`; a `Registry` keeps
``(key, pid, value)`` entries in a compiled table and shares them with the same
registry on connected nodes. Start with:

    import pgregistry as pgr

    async with pgr.Node("a") as node:
        reg = await pgr.Registry.start(node, "workers")
        reg.register("jobs", {"load": 0})
        reg.lookup("jobs")            # [(pid, {"load": 0})]

Match-spec vocabulary lives in `pgregistry.spec` (``from pgregistry.spec import _, V1``).
This module only re-exports; every name is defined in a private module below it.
"""

from . import spec
from ._table import IMPLEMENTATION as TABLE_IMPLEMENTATION
from ._version import __version__
from .errors import (
    AlreadyRegistered,
    AlreadyStarted,
    AuthenticationError,
    CallTimeout,
    JoinRefused,
    NoProcess,
    NoQuorum,
    NotLocal,
    NotReplicated,
    RegistryError,
    RemoteError,
    RingUnsettled,
)
from .events import (
    DieNow,
    Down,
    HandoffState,
    Join,
    Leave,
    NameLost,
    NodeDown,
    NodeUp,
    Registered,
    ShouldRestart,
    Unregistered,
    Update,
)
from .names import Names
from .node import Node
from .placement import Ring
from .process import Via, demonitor, exit, monitor, receive, self, send
from .registry import Registry
from .server import Server, call, cast
from .terms import Pid, Ref
from .workers import Workers

__all__ = [
    "Node", "Registry", "Names", "Ring", "Workers", "Server", "Via", "Pid", "Ref",
    "self", "send", "receive", "monitor", "demonitor", "exit", "call", "cast",
    "Join", "Leave", "Update", "Registered", "Unregistered", "Down", "NodeUp", "NodeDown", "NameLost",
    "ShouldRestart", "DieNow", "HandoffState",
    "RegistryError", "AlreadyRegistered", "AlreadyStarted", "NotLocal", "NoProcess",
    "CallTimeout", "AuthenticationError", "RemoteError", "NotReplicated",
    "NoQuorum", "JoinRefused", "RingUnsettled",
    "spec", "TABLE_IMPLEMENTATION", "__version__",
]
