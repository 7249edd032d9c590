"""What a scope peer may send: the shapes of scope protocol messages, checked (layer 4).

A scope applies nothing from a peer before the part of the message it is about to apply
has been checked whole: a pid must be one of the sending node's processes (a peer only
ever speaks for its own), a tag an int64 unique among the pid's rows, a key a key term
without NaN (a row under a NaN could never be found or removed). Each function returns
what it checked, in the form the scope applies, or raises `BadPeerMessage`, which the
scope logs (rate-limited) before dropping the message. Nothing here touches a table.
"""

from __future__ import annotations

from typing import Any, Final

from .errors import RemoteError
from .terms import Pid, key_problem, keys_problem, short_repr

__all__ = ["BadPeerMessage", "check_key", "check_pid", "check_rows", "check_tag", "parse_leave",
           "parse_leave_reason", "parse_part", "parse_sync"]

TAG_MIN: Final = -(2**63)  # tags are int64 in the table
TAG_MAX: Final = 2**63 - 1


class BadPeerMessage(Exception):
    """A message from a scope peer that does not have the scope protocol's shape."""


def check_pid(peer: str, pid: Any) -> Pid:
    """`pid`, if it is a pid of the node `peer`."""
    if type(pid) is not Pid or pid.node != peer:
        raise BadPeerMessage(f"{short_repr(pid)} is not a pid of {peer}")
    return pid


def check_tag(tag: Any) -> int:
    if type(tag) is not int or not TAG_MIN <= tag <= TAG_MAX:
        raise BadPeerMessage(f"tag {short_repr(tag)} is not an int64")
    return tag


def check_key(key: Any) -> Any:
    problem = key_problem(key)
    if problem is not None:
        raise BadPeerMessage(f"key {problem}")
    return key


def check_rows(pid: Pid, flat: list[Any]) -> list[Any]:
    """Flat ``key, value, tag`` rows of `pid` (a sync part's or a join op's), checked."""
    if len(flat) % 3:
        raise BadPeerMessage(f"rows of {pid!r} are not key, value, tag triples")
    tags = flat[2::3]
    if tags and not (set(map(type, tags)) == {int} and TAG_MIN <= min(tags) and max(tags) <= TAG_MAX):
        raise BadPeerMessage(f"rows of {pid!r} have a tag that is not an int64")
    if len(set(tags)) != len(tags):
        raise BadPeerMessage(f"rows of {pid!r} repeat a tag")
    problem = keys_problem(flat[0::3])
    if problem is not None:
        raise BadPeerMessage(f"rows of {pid!r} have a key that is not a key: {problem}")
    return flat


def parse_sync(peer: str, payload: list[Any]) -> tuple[int, list[tuple[Pid, list[Any]]], bool]:
    """``["sync", n, groups, last]``, the whole part checked: ``(n, [(pid, flat rows)], last)``."""
    if len(payload) != 4 or type(payload[1]) is not int or type(payload[2]) is not list \
            or type(payload[3]) is not bool:
        raise BadPeerMessage("sync needs a part number, a list of groups and a bool")
    return payload[1], parse_part(peer, payload[2]), payload[3]


def parse_part(peer: str, groups: list[Any]) -> list[tuple[Pid, list[Any]]]:
    """The groups of a sync part, ``[(pid, flat rows)]``, each pid once."""
    parsed = []
    for group in groups:
        if type(group) is not list or len(group) != 2 or type(group[1]) is not list:
            raise BadPeerMessage(f"sync group {short_repr(group)} is not [pid, rows]")
        pid = check_pid(peer, group[0])
        parsed.append((pid, check_rows(pid, group[1])))
    if len({pid for pid, _flat in parsed}) != len(parsed):
        raise BadPeerMessage("a sync part lists a pid twice")
    return parsed


def parse_leave(peer: str, triples: list[Any]) -> list[tuple[Any, Pid, int]]:
    """The ``[key, pid, tag]`` entries of a leave op, all checked before any row goes."""
    checked = []
    for triple in triples:
        if type(triple) is not list or len(triple) != 3:
            raise BadPeerMessage(f"leave entry {short_repr(triple)} is not [key, pid, tag]")
        key, pid, tag = triple
        checked.append((check_key(key), check_pid(peer, pid), check_tag(tag)))
    return checked


def parse_leave_reason(field: Any) -> Any:
    """The optional last field of a leave op: ``[reason]`` (a term, as it is) or
    ``[type_name, message]`` (two str: an exception, as a `RemoteError`)."""
    if type(field) is list and len(field) == 1:
        return field[0]
    if type(field) is list and len(field) == 2 and type(field[0]) is str and type(field[1]) is str:
        return RemoteError(field[0], field[1])
    raise BadPeerMessage(f"leave reason {short_repr(field)} is not [reason] or [type_name, message]")
