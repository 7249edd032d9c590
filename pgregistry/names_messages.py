"""The messages of names by consensus, and the checks each passes before it is used (layer 6).

Every message is a tuple ``(kind, cluster_id, epoch, ...)``; the sender is the peer of the
connection it came on, never a field. Lists are accepted wherever tuples are (msgpack).

    prepare(name, ballot)
        Proposer -> members. An acceptor promises if ballot >= its promise for the name.
    promise(name, ballot, accepted_ballot, value)
        The current accepted value and its ballot: the proposer picks the highest of a
        majority, applies its change function and sends accept.
    nack(name, ballot, competing_ballot, retry_after)
        Refusal of a prepare or accept, with the promise that beat it; retry_after > 0
        when an accept was refused by the takeover check (seconds until it may pass).
        The proposer then waits for the competing ballot's commit (see Contention).
    accept(name, ballot, value, base_ballot, base_value)
        The new value, and the value (with its ballot) it was computed from. Accepting
        also promises the proposer's next ballot for this name only, so its next operation
        on the name skips prepare.
    accepted(name, ballot)
        Acknowledges an accept; a majority decides the value.
    commit(name, ballot, value)
        Sent by the decider to every member; applied only if newer than what it has.
    renew(lgen, seq)
        Every lease/3, to every member including the sender. Refused (no answer) from a
        non-member or when lgen is below the generation a takeover fenced off.
    renew_ack(lgen, seq)
        Counts toward the sender's lease once a majority acked the same seq.
    wrong_epoch(epoch, members)
        The answer to a request of an older epoch, and the decider's notice of a new
        configuration: the receiver adopts it if newer and restarts its operations there.
    sealed(name, ballot)
        Refusal of a prepare or accept by an acceptor whose epoch is sealed (a change runs).

Configuration slot next(e), CASPaxos among e's members (messages carry epoch e):

    cprepare(ballot) / cpromise(ballot, accepted_ballot, members) / cnack(ballot, promised)
    caccept(ballot, members) / caccepted(ballot)
        ``members`` is () when nothing was accepted. A promise or an accept seals e here.

Copy (messages carry the new epoch E):

    copy(cursor)
        A member of E asks for the registers after ``cursor`` (None: from the start).
    copy_part(cursor, entries, next_cursor, kind)
        Up to a bounded number of ``(name, ballot, value, decided)`` (decided: the source
        knows the value decided); next_cursor None ends the copy;
        kind is "sealed" (the source served E-1 and left it or sealed it: its registers of
        E-1 are final) or "complete" (it serves E or later).

Each parser below returns its input when it is well formed (no copy per message) and
raises `BadMessage` otherwise; `pgregistry.names_core.Member.on_message` runs them all
before it changes anything.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

from .names_config import NO_BALLOT, Ballot, Cursor, Incarnation, Members, Value
from .terms import key_problem

__all__ = [
    "ARITY", "BadMessage", "ballot_of", "cursor_of", "freeze", "incarnation_of", "int_of", "members_of", "name_of",
    "value_of", "shared_ballot", "shared_value", "copy_entries_of",
]


class BadMessage(ValueError):
    """A message that is malformed, of another cluster, or from a sender that may not send it.

    Raised by `Member.on_message` before anything changes; the caller logs it and drops the
    message."""


def freeze(x: Any) -> Any:
    """Lists (as plain msgpack decodes tuples) become tuples, recursively, so terms hash and
    compare; a `pgregistry.terms.Pid` (a tuple subclass) stays what it is."""
    if type(x) is list or type(x) is tuple:
        return tuple(freeze(y) for y in x)
    return x


def int_of(x: Any, what: str) -> int:
    if type(x) is not int:
        raise BadMessage(f"{what} must be an int, not {type(x).__name__}")
    return x


def incarnation_of(x: Any, what: str = "incarnation") -> Incarnation:
    # The parsers return their input when it is well formed: no copy per message.
    if type(x) is tuple and len(x) == 3 and type(x[0]) is str and type(x[1]) is int and type(x[2]) is int:
        return x
    raise BadMessage(f"{what} must be (node_id, creation, nonce)")


def ballot_of(x: Any) -> Ballot:
    if not (type(x) is tuple and len(x) == 3):
        raise BadMessage("ballot must be (epoch, counter, incarnation)")
    if x[2] == ():
        if (x[0], x[1]) != (-1, -1):
            raise BadMessage("only the empty ballot has no incarnation")
        return NO_BALLOT
    int_of(x[0], "epoch")
    int_of(x[1], "counter")
    incarnation_of(x[2], "ballot incarnation")
    return x


def value_of(x: Any) -> Value:
    if not (type(x) is tuple and len(x) == 4):
        raise BadMessage("value must be (pid, token, lgen, owner)")
    pid, token, lgen, owner = x
    if int_of(token, "token") < 0 or int_of(lgen, "lgen") < 0:
        raise BadMessage("token and lgen are never negative")
    if (pid is None) != (owner is None):
        raise BadMessage("a value has a pid and an owner, or neither")
    if owner is not None:
        incarnation_of(owner, "owner")
    return x


def members_of(x: Any, empty: bool = False) -> Members:
    if not isinstance(x, tuple) or (not x and not empty):
        raise BadMessage("members must be a tuple of incarnations")
    out = tuple(incarnation_of(m, "member") for m in x)
    if len(set(out)) != len(out):
        raise BadMessage("members repeat")
    return out


def cursor_of(x: Any) -> Cursor:
    if x is None:
        return None
    if not (isinstance(x, tuple) and len(x) == 2 and type(x[1]) is str):
        raise BadMessage("cursor must be None or (int, str)")
    return (int_of(x[0], "cursor"), x[1])


def name_of(x: Any) -> Any:
    if type(x) is str:
        # One str object per name however many messages carry it (an accept's and a
        # commit's copies would otherwise both stay, as table and as decided-value keys).
        return sys.intern(x)
    problem = key_problem(x)
    if problem is not None:
        raise BadMessage(f"name: {problem}")
    return x


#: Expected arity (fields after kind, cluster_id, epoch) of each message kind.
ARITY = {
    "prepare": 2,
    "promise": 4,
    "nack": 4,
    "accept": 5,
    "accepted": 2,
    "commit": 3,
    "renew": 2,
    "renew_ack": 2,
    "wrong_epoch": 2,
    "sealed": 2,
    "cprepare": 1,
    "cpromise": 3,
    "cnack": 2,
    "caccept": 2,
    "caccepted": 1,
    "copy": 1,
    "copy_part": 4,
}


def shared_value(x: Any, members: dict[Incarnation, Incarnation], pid_ok: Callable[[Any], bool] | None) -> Value:
    """`value_of`, with a holder that `pid_ok` accepts, and a member owner replaced by the
    member's own tuple (`members` maps each to itself): one tuple per member, not one per
    register."""
    v = value_of(x)
    if v[0] is not None:
        if pid_ok is not None and not pid_ok(v[0]):
            raise BadMessage("a value's holder is not a pid")
        owner = members.get(v[3])
        if owner is not None and owner is not v[3]:
            v = (v[0], v[1], v[2], owner)
    return v


def shared_ballot(x: Any, members: dict[Incarnation, Incarnation]) -> Ballot:
    """`ballot_of`, with a member's incarnation replaced by the member's own tuple."""
    b = ballot_of(x)
    inc = members.get(b[2])
    if inc is not None and inc is not b[2]:
        b = (b[0], b[1], inc)
    return b


def copy_entries_of(entries: Any, kind: Any, ballot: Callable[[Any], Ballot],
                    value: Callable[[Any], Value]) -> list[tuple[Any, Ballot, Value, bool]]:
    """A copy_part's entries ``(name, ballot, value, decided)``, each part checked by the
    given parsers, and its kind ("sealed" or "complete")."""
    if type(entries) is not tuple or kind not in ("sealed", "complete"):
        raise BadMessage("copy_part entries must be a tuple and kind sealed or complete")
    if not all(type(e) is tuple and len(e) == 4 and type(e[3]) is bool for e in entries):
        raise BadMessage("a copy entry is (name, ballot, value, decided)")
    return [(name_of(e[0]), ballot(e[1]), value(e[2]), e[3]) for e in entries]
