"""Process identifiers and the term types that may be stored and sent.

A *term* is what pgregistry can store in a table and put on the wire without pickle:

* keys: ``None``, ``bool``, ``int``, ``float``, ``str``, ``bytes``, `Pid`, `Ref`, and
  tuples of keys; a key never holds a NaN (below);
* values: keys, plus ``list`` and ``dict`` (with ``str`` or ``int`` keys), nested; a
  value may hold NaN anywhere.

Anything else is refused at the call site with a `TypeError` naming the offending part,
never later while gossiping. Equality is Python's (``1 == 1.0``), as in a dict.

A NaN anywhere in a key is refused with a `ValueError`: a NaN is not equal to itself,
so an entry under such a key could never be found or removed (a table finds keys by
identity, then ``==``, and a peer decodes a new NaN object that equals nothing). Values
compare with `same_term`, which takes a NaN for the same term as any other NaN.

Error messages show terms with `short_repr`, which never raises: ``repr`` of an int
beyond Python's int-to-str limit (4 300 digits) raises `ValueError`, and a key or value
may be such an int.

`Pid` and `Ref` are tuple subclasses so that hashing them costs what hashing a tuple
costs (they are hashed on every table write); their ``__eq__`` refuses other types, so a
pid never equals a plain tuple with the same fields.
"""

from __future__ import annotations

import contextlib
import itertools
import math
from collections.abc import Iterable
from typing import Any, Final

__all__ = [
    "ENVELOPE_DEPTH",
    "MAX_DEPTH",
    "MAX_TERM_DEPTH",
    "SCALAR_TYPES",
    "Pid",
    "Ref",
    "check_key",
    "check_message",
    "check_value",
    "is_key",
    "is_value",
    "key_problem",
    "keys_problem",
    "same_term",
    "short_repr",
]


class _Id(tuple):
    """Common shape of `Pid` and `Ref`: ``(node, serial, creation)``."""

    __slots__ = ()

    def __new__(cls, node: str, serial: int, creation: int = 0) -> Any:
        if type(node) is not str:
            raise TypeError(f"{cls.__name__} node must be a str, got {short_repr(node)}")
        if type(serial) is not int or serial < 0:
            raise TypeError(f"{cls.__name__} serial must be a non-negative int, got {short_repr(serial)}")
        if type(creation) is not int or creation < 0:
            raise TypeError(f"{cls.__name__} creation must be a non-negative int, got {short_repr(creation)}")
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
        return tuple(self), tuple(other)

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
        return f"<{node}.{_int_text(serial)}.{_int_text(creation)}>"


class Ref(_Id):
    """A reference unique within the cluster: made by `Node`s for monitors and calls."""

    __slots__ = ()

    def __repr__(self) -> str:
        node, serial, creation = tuple.__iter__(self)
        return f"#Ref<{node}.{_int_text(serial)}.{_int_text(creation)}>"


# Ints longer than this (about 100 digits) are shown by size: their decimal form costs
# time quadratic in their length, and ``repr`` raises beyond 4 300 digits.
_REPR_INT_BITS: Final = 332
# Containers nested deeper than this are shown as "...": the output is short anyway, and
# a self-referencing list (not a term, but it may reach an error message) must end.
_REPR_DEPTH: Final = 8


class _Full(Exception):
    """Raised by `_emit` once the text is longer than the limit: nothing more is shown."""


def _emit(out: list[str], budget: list[int], piece: str) -> None:
    out.append(piece)
    budget[0] -= len(piece)
    if budget[0] < 0:
        raise _Full


def _int_text(n: int) -> str:
    if n.bit_length() <= _REPR_INT_BITS:
        return repr(n)
    return f"<{'negative ' if n < 0 else ''}int of {n.bit_length()} bits>"


def _render(x: Any, out: list[str], budget: list[int], depth: int) -> None:
    t = type(x)
    if t is int:
        _emit(out, budget, _int_text(x))
    elif t is str or t is bytes:
        # a prefix one longer than what is left still shows that the text goes on
        _emit(out, budget, repr(x[:budget[0] + 1]))
    elif t is tuple or t is list or t is dict:
        if depth >= _REPR_DEPTH:
            _emit(out, budget, "...")
            return
        opening, closing = ("(", ")") if t is tuple else ("[", "]") if t is list else ("{", "}")
        _emit(out, budget, opening)
        if t is dict:
            for i, (k, v) in enumerate(x.items()):
                if i:
                    _emit(out, budget, ", ")
                _render(k, out, budget, depth + 1)
                _emit(out, budget, ": ")
                _render(v, out, budget, depth + 1)
        else:
            for i, item in enumerate(x):
                if i:
                    _emit(out, budget, ", ")
                _render(item, out, budget, depth + 1)
            if t is tuple and len(x) == 1:
                _emit(out, budget, ",")
        _emit(out, budget, closing)
    elif t is Pid or t is Ref:
        node, serial, creation = tuple.__iter__(x)
        _emit(out, budget, "<" if t is Pid else "#Ref<")
        _emit(out, budget, node[:budget[0] + 1])
        _emit(out, budget, f".{_int_text(serial)}.{_int_text(creation)}>")
    elif isinstance(x, BaseException) and t.__repr__ is BaseException.__repr__:
        args = x.args
        _emit(out, budget, f"{t.__name__}(")
        for i, arg in enumerate(args if type(args) is tuple else ()):
            if i:
                _emit(out, budget, ", ")
            _render(arg, out, budget, depth + 1)
        _emit(out, budget, ")")
    else:
        try:
            text = repr(x)
        except Exception:
            text = f"<{t.__name__} object>"
        _emit(out, budget, text)


def short_repr(x: Any, limit: int = 80) -> str:
    """``repr(x)``, at most `limit` characters long (cut text ends with "..."); never raises.

    For error messages and logs that show a term a caller or a peer supplied. Whatever
    `x` is, the work is bounded by `limit` (at least 4), not by the size of `x`: an int
    of more than about 100 digits is shown as ``<int of N bits>`` (``repr`` raises
    beyond 4 300 digits), a container stops being walked once the text is long enough
    and shows what is nested deeper than 8 as ``...``, and an object whose ``repr``
    raises is shown as ``<type object>``. Terms that fit are shown exactly as by ``repr``.
    """
    limit = max(limit, 4)
    out: list[str] = []
    try:
        with contextlib.suppress(_Full):  # the text reached the limit: `out` holds enough
            _render(x, out, [limit + 1], 0)
    except Exception:  # a hostile object (a __len__ or __iter__ that raises): show its type
        out = [f"<{type(x).__name__} object>"]
    text = "".join(out)
    return text if len(text) <= limit else text[:limit - 3] + "..."


_SCALARS: Final = frozenset({type(None), bool, int, float, str, bytes, Pid, Ref})
SCALAR_TYPES: Final = _SCALARS
"""The types of the terms that hold no other term (nothing in them can be mutated)."""
# The key scalars that need no further look: a float may be a NaN.
_KEY_SCALARS: Final = _SCALARS - {float}
_DICT_KEY_TYPES: Final = frozenset({str, int})
#: The exact types `check_value` / `check_key` accept without looking further: a caller on
#: a hot path may skip the call when ``type(x) in VALUE_SCALARS`` (or ``KEY_SCALARS``).
VALUE_SCALARS: Final = _SCALARS
KEY_SCALARS: Final = _KEY_SCALARS

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

_KEY_TYPES: Final = "(None, bool, int, float, str, bytes, Pid, Ref, tuple)"
_VALUE_TYPES: Final = "(None, bool, int, float, str, bytes, Pid, Ref, tuple, list, dict)"


class _NaN:
    """What `_key_problem` returns for a NaN: the message names the whole key, not the float."""

    __slots__ = ()


_NAN: Final = _NaN()


def _key_problem(x: Any, depth: int) -> str | _NaN | None:
    t = type(x)
    if t is tuple:
        if depth >= MAX_DEPTH:
            return _TOO_DEEP
        for item in x:
            if type(item) not in _KEY_SCALARS:
                if type(item) is float:  # inline: a call per float item is not free
                    if item != item:
                        return _NAN
                else:
                    problem = _key_problem(item, depth + 1)
                    if problem is not None:
                        return problem
        return None
    if t in _KEY_SCALARS:
        return None
    if t is float:
        return None if x == x else _NAN
    return f"{t.__name__} {short_repr(x, 60)} is not a key term {_KEY_TYPES}"


def _nan_reason(key: Any) -> str:
    where = "is a NaN" if type(key) is float else "holds a NaN"
    return (f"{short_repr(key, 60)} {where}, which is not equal to itself, so an entry under it could "
            "never be found or removed: a key may not hold NaN (a value may)")


def _value_problem(x: Any, depth: int) -> str | None:
    t = type(x)
    if t in _SCALARS:
        return None
    if depth >= MAX_DEPTH:
        return _TOO_DEEP
    if t is tuple or t is list:
        if _SCALARS.issuperset(map(type, x)):  # all scalars (a sync part's rows): one C loop
            return None
        for item in x:
            if type(item) not in _SCALARS:
                problem = _value_problem(item, depth + 1)
                if problem is not None:
                    return problem
        return None
    if t is dict:
        if _DICT_KEY_TYPES.issuperset(map(type, x)) and _SCALARS.issuperset(map(type, x.values())):
            return None
        for k, item in x.items():
            if type(k) is not str and type(k) is not int:
                return f"dict key {short_repr(k, 60)} is not a str or int"
            if type(item) not in _SCALARS:
                problem = _value_problem(item, depth + 1)
                if problem is not None:
                    return problem
        return None
    return f"{t.__name__} {short_repr(x, 60)} is not a value term {_VALUE_TYPES}"


def _raise(what: str, problem: str, limit: int) -> Any:
    """Raise the `TypeError` for `problem` (a `_key_problem` or `_value_problem` result)."""
    if problem is _TOO_DEEP:
        problem = f"nested deeper than {limit} levels (containers within containers)"
    raise TypeError(f"{what}: {problem}")


def check_key(key: Any, what: str = "key") -> Any:
    """Return `key` unchanged if it is a key term, else raise saying why.

    `TypeError` for a part that is not a key term (or tuples nested deeper than
    `MAX_TERM_DEPTH` levels, the outermost being level 1), `ValueError` for a NaN
    anywhere in it (see the module docstring).
    """
    if type(key) in _KEY_SCALARS:
        return key
    if type(key) is float and key == key:
        return key
    problem = _key_problem(key, ENVELOPE_DEPTH)
    if problem is not None:
        if problem is _NAN:
            raise ValueError(f"{what}: {_nan_reason(key)}")
        _raise(what, problem, MAX_TERM_DEPTH)  # type: ignore[arg-type]
    return key


def key_problem(x: Any) -> str | None:
    """Why `x` is not a key (not a key term, too deep, or holding a NaN); None if it is one.

    For input that is not the caller's own, such as keys decoded from a peer.
    """
    if type(x) in _KEY_SCALARS:
        return None
    return _worded(x, _key_problem(x, ENVELOPE_DEPTH))


def keys_problem(keys: Iterable[Any]) -> str | None:
    """`key_problem` of the first of `keys` that is not a key; None if all are keys.

    For the thousands of keys of one sync part: one loop, no call for a scalar key.
    """
    for key in keys:
        if type(key) not in _KEY_SCALARS:
            if type(key) is float:
                if key == key:
                    continue
                return _nan_reason(key)
            problem = _key_problem(key, ENVELOPE_DEPTH)
            if problem is not None:
                return _worded(key, problem)
    return None


def _worded(key: Any, problem: str | _NaN | None) -> str | None:
    if problem is _NAN:
        return _nan_reason(key)
    if problem is _TOO_DEEP:
        return f"{short_repr(key, 60)} is nested deeper than {MAX_TERM_DEPTH} levels"
    return problem  # type: ignore[return-value]


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
    """Whether `x` is a key term holding no NaN (`check_key` would accept it)."""
    return type(x) in _KEY_SCALARS or _key_problem(x, ENVELOPE_DEPTH) is None


def is_value(x: Any) -> bool:
    """Whether `x` is a value term (`check_value` would accept it)."""
    return type(x) in _SCALARS or _value_problem(x, ENVELOPE_DEPTH) is None


class Counter:
    """A monotonic counter; ``next()`` is a C-level call (used for serials and tags)."""

    __slots__ = ("next",)

    def __init__(self, start: int = 1) -> None:
        self.next = itertools.count(start).__next__
