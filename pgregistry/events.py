"""Messages pgregistry puts in mailboxes.

All are named tuples, so they compare equal by value, unpack, and work in ``match``
statements: ``case Join(ref, key, entries):``.

Subscriber events (from `Registry.monitor_scope` / `Registry.monitor`):
    ``Join(ref, key, entries)``, ``Leave(ref, key, entries)`` with entries
    ``[(pid, value), ...]``, and ``Update(ref, key, changes)`` with changes
    ``[(pid, old_value, new_value), ...]``.
Listener messages (sent to locally registered names given as ``listeners=``):
    ``Registered(scope, key, pid, value)`` and ``Unregistered(scope, key, pid)``.
Names by consensus (`pgregistry.names.Names` with ``on_lost="notify"``):
    ``NameLost(name, pid, token)``: the holder `pid` is no longer the valid holder.
Process and node monitoring:
    ``Down(ref, pid, reason)``, ``NodeUp(node)``, ``NodeDown(node, reason)``.

Every one of them may also be sent to a process of another node: `MESSAGE_TYPES` names
the types the node protocol rebuilds from a type name and its fields.
"""

from __future__ import annotations

from typing import Any, Final, NamedTuple

__all__ = ["Join", "Leave", "Update", "Registered", "Unregistered", "Down", "NodeUp", "NodeDown", "NameLost",
           "ShouldRestart", "DieNow", "HandoffState"]


class Join(NamedTuple):
    """``Join(ref, key, entries)``: entries ``[(pid, value), ...]`` were added under `key`.

    Sent to a subscriber of `Registry.monitor_scope` or `Registry.monitor`; `ref` is
    the subscription's reference.
    """

    ref: Any
    key: Any
    entries: list


class _LeaveFields(NamedTuple):
    ref: Any
    key: Any
    entries: list


class Leave(_LeaveFields):
    """``Leave(ref, key, entries)``: entries ``[(pid, value), ...]`` left `key`.

    ``reason`` says why, and is an instance attribute outside the tuple (it takes no
    part in unpacking, ``len`` or equality): ``"unregistered"`` (the default: an
    unregister call, `Registry.leave`/`leave_all`), the process's exit reason,
    ``"nodedown"`` (the connection to the entries' node was lost), ``"scope_stopped"``
    (the scope stopped on the entries' node, or that node does not run it) or
    ``"sync"`` (a sync round from the entries' node no longer lists them). For entries
    of another node the reason comes from that node; an exit reason that is not a term
    (an exception) arrives as a `pgregistry.errors.RemoteError`.
    """

    reason: Any = "unregistered"


class Update(NamedTuple):
    """``Update(ref, key, changes)``: values under `key` changed.

    `changes` is ``[(pid, old_value, new_value), ...]``, one per entry. Sent to a
    subscriber of `Registry.monitor_scope` or `Registry.monitor`; `ref` is the
    subscription's reference.
    """

    ref: Any
    key: Any
    changes: list


class Registered(NamedTuple):
    """``Registered(scope, key, pid, value)``: to a registry's `listeners`, one per entry
    added, whatever the cause (a local or a remote change, a resynchronisation)."""

    scope: str
    key: Any
    pid: Any
    value: Any


class Unregistered(NamedTuple):
    """``Unregistered(scope, key, pid)``: to a registry's `listeners`, one per entry
    removed, whatever the cause (an unregister, a process exit, a node lost)."""

    scope: str
    key: Any
    pid: Any


class Down(NamedTuple):
    """``Down(ref, pid, reason)``: the process `pid`, watched with `pgregistry.monitor`
    (which returned `ref`), exited with `reason` (``"noconnection"`` when its node was
    lost, ``"noproc"`` when it was not alive when the monitor was made)."""

    ref: Any
    pid: Any
    reason: Any


class NodeUp(NamedTuple):
    """``NodeUp(node)``: to a process that called `Node.monitor_nodes`, when the peer
    `node` (a node id) comes up."""

    node: str


class NodeDown(NamedTuple):
    """``NodeDown(node, reason)``: to a process that called `Node.monitor_nodes`, when the
    peer `node` (a node id) goes down; `reason` says why (e.g. ``"disconnect"``)."""

    node: str
    reason: Any


class NameLost(NamedTuple):
    """``NameLost(name, pid, token)``: to the holder `pid` of a `Names` name, with
    ``on_lost="notify"``, when its hold (with fencing token `token`) stops being valid."""

    name: Any
    pid: Any
    token: int


class ShouldRestart(NamedTuple):
    """To a worker of a `Workers` service: its name is now owned by another node; exit and
    let it be started there (it is never killed for it)."""

    name: Any


class DieNow(NamedTuple):
    """To a worker of a `Workers` service: another instance of its name won; it was
    unregistered and is exited with reason ``"dienow"`` one second later."""

    name: Any


class HandoffState(NamedTuple):
    """The first message of a worker started by `Workers.handoff`: its predecessor's state."""

    name: Any
    state: Any


MESSAGE_TYPES: Final[dict[str, type]] = {
    cls.__name__: cls for cls in (Down, NodeUp, NodeDown, Join, Leave, Update, Registered, Unregistered, NameLost,
                                  ShouldRestart, DieNow, HandoffState)
}
"""The message types above by name: what a ``send_t`` message of the node protocol may carry."""

MESSAGE_TYPE_NAMES: Final[dict[type, str]] = {cls: name for name, cls in MESSAGE_TYPES.items()}
"""`MESSAGE_TYPES` the other way round: the wire name of each type."""
