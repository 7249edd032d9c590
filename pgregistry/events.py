"""Messages pgregistry puts in mailboxes.

All are named tuples, so they compare equal by value, unpack, and work in ``match``
statements: ``case Join(ref, key, entries):``.

Subscriber events (from `Registry.monitor_scope` / `Registry.monitor`):
    ``Join(ref, key, entries)``, ``Leave(ref, key, entries)`` with entries
    ``[(pid, value), ...]``, and ``Update(ref, key, changes)`` with changes
    ``[(pid, old_value, new_value), ...]``.
Listener messages (sent to locally registered names given as ``listeners=``):
    ``Registered(scope, key, pid, value)`` and ``Unregistered(scope, key, pid)``.
Process and node monitoring:
    ``Down(ref, pid, reason)``, ``NodeUp(node)``, ``NodeDown(node, reason)``.
"""

from __future__ import annotations

from typing import Any, NamedTuple

__all__ = ["Join", "Leave", "Update", "Registered", "Unregistered", "Down", "NodeUp", "NodeDown"]


class Join(NamedTuple):
    ref: Any
    key: Any
    entries: list


class Leave(NamedTuple):
    ref: Any
    key: Any
    entries: list


class Update(NamedTuple):
    ref: Any
    key: Any
    changes: list


class Registered(NamedTuple):
    scope: str
    key: Any
    pid: Any
    value: Any


class Unregistered(NamedTuple):
    scope: str
    key: Any
    pid: Any


class Down(NamedTuple):
    ref: Any
    pid: Any
    reason: Any


class NodeUp(NamedTuple):
    node: str


class NodeDown(NamedTuple):
    node: str
    reason: Any
