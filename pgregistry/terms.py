"""Process identifiers and the term types that may be stored and sent.

A *term* is what pgregistry can store in a table and put on the wire without pickle:

* keys: ``None``, ``bool``, ``int``, ``float``, ``str``, ``bytes``, `Pid`, `Ref`, and
  tuples of keys;
* values: keys, plus ``list`` and ``dict`` (with ``str`` or ``int`` keys), nested.

Anything else is refused at the call site with a `TypeError` naming the offending part,
never later while gossiping. Equality is Python's (``1 == 1.0``), as in a dict.

`Pid` and `Ref` are tuple subclasses so that hashing them costs what hashing a tuple
costs (they are hashed on every table write); their ``__eq__`` refuses other types, so a
pid never equals a plain tuple with the same fields.
"""

from __future__ import annotations

import itertools
import math
from typing import Any, Final

__all__ = [
    "ENVELOPE_DEPTH",
    "MAX_DEPTH",
    "MAX_TERM_DEPTH",
    "Pid",
    "Ref",
    "check_key",
    "check_message",
    "check_value",
    "is_key",
    "is_value",
    "same_term",
    "short_repr",
]


class _Id(tuple):
    """Common shape of `Pid` and `Ref`: ``(node, serial, creation)``."""

    __slots__ = ()

    def __new__(cls, node: str, serial: int, creation: int = 0) -> Any:
        if type(node) is not str:
            raise TypeError(f"{cls.__name__} node must be a str, got {node!r}")
        if type(serial) is not int or serial < 0:
            raise TypeError(f"{cls.__name__} serial must be a non-negative int, got {serial!r}")
        if type(creation) is not int or creation < 0:
            raise TypeError(f"{cls.__name__} creation must be a non-negative int, got {creation!r}")
        return tuple.__new__(cls, (node, serial, creation))

    @property
    def node(self) -> str:
        """The id of the node the process (or reference) belongs to."""
        return tuple.__getitem__(self, 0)

    @property
    def serial(self) -> int:
        return tuple.__getitem__(self, 1)

    @property
    def creation(self) -> int:
        """The incarnation of the node: a restarted node gets a new one."""
        return tuple.__getitem__(self, 2)

    __hash__ = tuple.__hash__

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and tuple.__eq__(self, other)

    def __ne__(self, other: object) -> bool:
        return not (type(other) is type(self) and tuple.__eq__(self, other))

    def _order(self, other: object) -> tuple:
        if type(other) is not type(self):
            raise TypeError(f"'<' not supported between {type(self).__name__} and {type(other).__name__}")
        return tuple(self), tuple(other)  # type: ignore[arg-type]

    def __lt__(self, other: object) -> bool:
        a, b = self._order(other)
        return a < b

    def __le__(self, other: object) -> bool:
        a, b = self._order(other)
        return a <= b

    def __gt__(self, other: object) -> bool:
        a, b = self._order(other)
        return a > b

    def __ge__(self, other: object) -> bool:
        a, b = self._order(other)
        return a >= b

    def __getnewargs__(self) -> tuple:
        return tuple(self)

    def __reduce__(self) -> tuple:
        return (type(self), tuple(self))


class Pid(_Id):
    """Identifies one process: the node it runs on, a serial, the node's creation.

    Hashable and ordered among pids. ``repr`` is short: ``<a@127.0.0.1:4000.12.1>``.
    """

    __slots__ = ()

    def __repr__(self) -> str:
        node, serial, creation = tuple.__iter__(self)
        return f"<{node}.{serial}.{creation}>"


class Ref(_Id):
    """A reference unique within the cluster: made by `Node`s for monitors and calls."""

    __slots__ = ()

    def __repr__(self) -> str:
        node, serial, creation = tuple.__iter__(self)
        return f"#Ref<{node}.{serial}.{creation}>"


_SCALARS: Final = frozenset({type(None), bool, int, float, str, bytes, Pid, Ref})
SCALAR_TYPES: Final = _SCALARS
"""The types of the terms that hold no other term (nothing in them can be mutated)."""

# One depth budget for everything that travels. A decoded message may nest `MAX_DEPTH`
# containers (the decoder refuses deeper input, so hostile nesting cannot exhaust the
# stack). Every protocol message wraps the terms it carries in at most `ENVELOPE_DEPTH`
# containers of its own (a sync part: the service envelope, the payload, the part's
# groups, one group, its flat rows), so a stored key or value may nest at most
# `MAX_TERM_DEPTH`: whatever `register` accepts fits every message it travels in.
MAX_DEPTH: Final = 64
ENVELOPE_DEPTH: Final = 8
MAX_TERM_DEPTH: Final = MAX_DEPTH - ENVELOPE_DEPTH

_TOO_DEEP: Final = "too deep"  # a problem the checks word with the limit that applies


def _key_problem(x: Any, depth: int) -> str | None:
    t = type(x)
    if t in _SCALARS:
        return None
    if t is tuple:
        if depth >= MAX_DEPTH:
            return _TOO_DEEP
        for item in x:
            if type(item) not in _SCALARS:
                problem = _key_problem(item, depth + 1)
                if problem is not None:
                    return problem
        return None
    return f"{t.__name__} {x!r:.60} is not a key term (None, bool, int, float, str, bytes, Pid, Ref, tuple)"


def _value_problem(x: Any, depth: int) -> str | None:
    t = type(x)
    if t in _SCALARS:
        return None
    if depth >= MAX_DEPTH:
        return _TOO_DEEP
    if t is tuple or t is list:
        for item in x:
            if type(item) not in _SCALARS:
                problem = _value_problem(item, depth + 1)
                if problem is not None:
                    return problem
        return None
    if t is dict:
        for k, item in x.items():
            if type(k) is not str and type(k) is not int:
                return f"dict key {k!r:.60} is not a str or int"
            if type(item) not in _SCALARS:
                problem = _value_problem(item, depth + 1)
                if problem is not None:
                    return problem
        return None
    return (
        f"{t.__name__} {x!r:.60} is not a value term "
        "(None, bool, int, float, str, bytes, Pid, Ref, tuple, list, dict)"
    )


def _raise(what: str, problem: str, limit: int) -> Any:
    if problem is _TOO_DEEP:
        problem = f"nested deeper than {limit} levels (containers within containers)"
    raise TypeError(f"{what}: {problem}")


def check_key(key: Any, what: str = "key") -> Any:
    """Return `key` unchanged if it is a key term, else raise `TypeError` saying why.

    A key may nest `MAX_TERM_DEPTH` tuples (the outermost is level 1).
    """
    if type(key) in _SCALARS:
        return key
    problem = _key_problem(key, ENVELOPE_DEPTH)
    if problem is not None:
        _raise(what, problem, MAX_TERM_DEPTH)
    return key


def check_value(value: Any, what: str = "value") -> Any:
    """Return `value` unchanged if it is a value term, else raise `TypeError` saying why.

    A value may nest `MAX_TERM_DEPTH` containers (the outermost is level 1).
    """
    if type(value) in _SCALARS:
        return value
    problem = _value_problem(value, ENVELOPE_DEPTH)
    if problem is not None:
        _raise(what, problem, MAX_TERM_DEPTH)
    return value


def check_message(message: Any, what: str = "message") -> Any:
    """`check_value` for a whole protocol message: it may nest `MAX_DEPTH` containers."""
    if type(message) in _SCALARS:
        return message
    problem = _value_problem(message, 0)
    if problem is not None:
        _raise(what, problem, MAX_DEPTH)
    return message


def same_term(a: Any, b: Any) -> bool:
    """Whether `a` and `b` are the same term: equal, with the same types throughout.

    Python's ``==`` says ``1 == 1.0 == True`` and ``[1] == [True]``; a registry value
    that changed from one to the other has changed. Floats compare by bits, so a NaN is
    the same as itself and ``0.0`` is not ``-0.0``. Both must be terms (of any depth).
    """
    if a is b:
        return True
    t = type(a)
    if t is not type(b):
        return False
    if t is float:
        return a == b and math.copysign(1.0, a) == math.copysign(1.0, b) or (a != a and b != b)
    if t is list or t is tuple:
        return len(a) == len(b) and all(map(same_term, a, b))
    if t is dict:
        return a.keys() == b.keys() and all(same_term(v, b[k]) for k, v in a.items())
    return bool(a == b)


def is_key(x: Any) -> bool:
    return type(x) in _SCALARS or _key_problem(x, ENVELOPE_DEPTH) is None


def is_value(x: Any) -> bool:
    return type(x) in _SCALARS or _value_problem(x, ENVELOPE_DEPTH) is None


class Counter:
    """A monotonic counter; ``next()`` is a C-level call (used for serials and tags)."""

    __slots__ = ("next",)

    def __init__(self, start: int = 1) -> None:
        self.next = itertools.count(start).__next__


def short_repr(x: Any, limit: int = 80) -> str:
    """``repr(x)`` cut to about `limit` characters; never raises, whatever `x` holds.

    For error messages and logs about terms a caller or a peer supplied: an int too long
    for Python's int-to-str conversion is shown by its size, deep nesting is cut off.
    """
    try:
        text = _bounded_repr(x, limit, 0)
    except Exception:  # a broken __repr__ of something that is not a term
        text = f"<{type(x).__name__}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _bounded_repr(x: Any, limit: int, depth: int) -> str:
    t = type(x)
    if t is int and x.bit_length() > 64 * 8:
        return f"<int of {x.bit_length()} bits>"
    if t is tuple or t is list or t is dict:
        if depth >= 8:
            return "..."
        opener, closer = {tuple: "()", list: "[]", dict: "{}"}[t]
        parts: list[str] = []
        size = 0
        items = x.items() if t is dict else x
        for item in items:
            if size > limit:
                parts.append("...")
                break
            if t is dict:
                part = f"{_bounded_repr(item[0], limit, depth + 1)}: {_bounded_repr(item[1], limit, depth + 1)}"
            else:
                part = _bounded_repr(item, limit, depth + 1)
            parts.append(part)
            size += len(part) + 2
        inner = ", ".join(parts)
        if t is tuple and len(parts) == 1 and len(x) == 1:
            inner += ","
        return opener + inner + closer
    text = repr(x)
    return text if len(text) <= limit else text[:limit] + "..."
