"""Match specifications: the vocabulary users write, and its validation.

A *match spec* selects rows ``(key, pid, value)`` of a registry and says what to return
for each. It is a list of clauses ``(head, guards, body)``:

* ``head`` is a 3-tuple of patterns for ``(key, pid, value)``. In a pattern, `_` matches
  anything, a variable ``V1`` … ``V9`` (or ``var(n)``) binds the matched part (a variable
  repeated in the head must match an equal value each time), a ``tuple``/``list``
  matches a tuple/list of the same length element-wise, a ``dict`` matches any dict
  that holds those keys with matching values, and any other term matches what equals
  it (Python equality: ``1 == 1.0``). A NaN cannot stand in a pattern (`ValueError`): it
  is not equal to itself, so it would match only the very float object it is, never a
  peer's copy, and no key at all. To find NaN values, bind a variable and guard with
  ``V1 != V1``.
* ``guards`` is a list of expressions; the clause applies only if every one evaluates
  to exactly ``True``. A guard that raises counts as false as a whole: an exception
  anywhere inside it is not turned into ``True`` by an enclosing ``~``, `not_` or
  ``|``. So a guard function given an argument of the wrong type (`has_key` or `size`
  of an int, ``V1[0]`` of a dict without key 0) and a comparison of unordered types
  (``V1 < 2`` with a str) make the whole guard false; the type tests (`is_int`, ...)
  accept any term.
* ``body`` is a non-empty list of expressions evaluated in order; the last one is the
  result for the row. Tuples, lists and dicts in a body are built with their elements
  evaluated; `WHOLE` is ``(key, pid, value)``; `BINDINGS` is the list of bound variables
  ordered by their number; ``const(x)`` is ``x`` taken literally. A body that raises
  skips the row.

For each row the clauses are tried in order and the first whose head matches and whose
guards hold produces the row's result.

Expressions use Python operators on variables: ``== != < <= > >=``, ``& | ~`` (and, or,
not: short-circuit, on booleans only), ``+ - * / // %`` and unary ``-``, and indexing
``V1[0]`` or ``V3["role"]``; plus the functions of this module: `is_int`, `is_float`,
`is_number`, `is_str`, `is_bytes`, `is_tuple`, `is_list`, `is_dict`, `is_pid`,
`has_key`, `size`, `and_`, `or_`, `not_`. Python's ``and``/``or``/``not`` and chained
comparisons cannot be overloaded, so using them on a spec expression raises `TypeError`.

Spec objects are not terms: they are unhashable, so passing one where a key is expected
raises `TypeError`.

`check_spec` and `check_match` validate what users wrote and return the normalized form
defined at the bottom of this module (`Clause`, ``Pat*`` and ``Expr*`` nodes), which
both table implementations compile. An invalid spec raises `ValueError` naming the part
that is wrong.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any, Final

from .terms import MAX_DEPTH, Pid, Ref, is_value, short_repr

__all__ = [
    "_", "V1", "V2", "V3", "V4", "V5", "V6", "V7", "V8", "V9", "var", "WHOLE", "BINDINGS",
    "const", "is_int", "is_float", "is_number", "is_str", "is_bytes", "is_tuple", "is_list",
    "is_dict", "is_pid", "has_key", "size", "and_", "or_", "not_",
    "check_spec", "check_match", "canonical", "Clause", "OPERATORS",
]


# --------------------------------------------------------------------------------------
# The user vocabulary
# --------------------------------------------------------------------------------------

class Expression:
    """Something that can stand in a guard or a body; Python operators build more."""

    __slots__ = ()
    __hash__ = None  # type: ignore[assignment]  # never a term, never a dict key

    def __bool__(self) -> bool:
        raise TypeError(
            "a match-spec expression has no truth value: combine guards with & | ~ "
            "(not and/or/not), and write a < V1 < b as (a < V1) & (V1 < b)"
        )

    def __eq__(self, other: object) -> Op:  # type: ignore[override]
        return Op("eq", (self, other))

    def __ne__(self, other: object) -> Op:  # type: ignore[override]
        return Op("ne", (self, other))

    def __lt__(self, other: object) -> Op:
        return Op("lt", (self, other))

    def __le__(self, other: object) -> Op:
        return Op("le", (self, other))

    def __gt__(self, other: object) -> Op:
        return Op("gt", (self, other))

    def __ge__(self, other: object) -> Op:
        return Op("ge", (self, other))

    def __and__(self, other: object) -> Op:
        return Op("and", (self, other))

    def __rand__(self, other: object) -> Op:
        return Op("and", (other, self))

    def __or__(self, other: object) -> Op:
        return Op("or", (self, other))

    def __ror__(self, other: object) -> Op:
        return Op("or", (other, self))

    def __invert__(self) -> Op:
        return Op("not", (self,))

    def __add__(self, other: object) -> Op:
        return Op("add", (self, other))

    def __radd__(self, other: object) -> Op:
        return Op("add", (other, self))

    def __sub__(self, other: object) -> Op:
        return Op("sub", (self, other))

    def __rsub__(self, other: object) -> Op:
        return Op("sub", (other, self))

    def __mul__(self, other: object) -> Op:
        return Op("mul", (self, other))

    def __rmul__(self, other: object) -> Op:
        return Op("mul", (other, self))

    def __truediv__(self, other: object) -> Op:
        return Op("truediv", (self, other))

    def __rtruediv__(self, other: object) -> Op:
        return Op("truediv", (other, self))

    def __floordiv__(self, other: object) -> Op:
        return Op("floordiv", (self, other))

    def __rfloordiv__(self, other: object) -> Op:
        return Op("floordiv", (other, self))

    def __mod__(self, other: object) -> Op:
        return Op("mod", (self, other))

    def __rmod__(self, other: object) -> Op:
        return Op("mod", (other, self))

    def __neg__(self) -> Op:
        return Op("neg", (self,))

    def __getitem__(self, index: object) -> Op:
        return Op("getitem", (self, index))


class Var(Expression):
    """A match variable; ``V1`` … ``V9`` are predefined, ``var(n)`` makes any other."""

    __slots__ = ("n",)

    def __init__(self, n: int) -> None:
        if type(n) is not int or n < 0:
            raise ValueError(f"a match variable number must be a non-negative int, got {short_repr(n)}")
        self.n = n

    def __repr__(self) -> str:
        return f"V{self.n}" if 1 <= self.n <= 9 else f"var({self.n})"


class _Whole(Expression):
    __slots__ = ()

    def __repr__(self) -> str:
        return "WHOLE"


class _Bindings(Expression):
    __slots__ = ()

    def __repr__(self) -> str:
        return "BINDINGS"


class Op(Expression):
    """An operator or guard-function application, built by operators and functions."""

    __slots__ = ("op", "args")

    def __init__(self, op: str, args: tuple) -> None:
        self.op = op
        self.args = args

    def __repr__(self) -> str:
        return f"{self.op}({', '.join([short_repr(a) for a in self.args])})"


class Const:
    """``const(x)``: `x` taken literally in a guard or body, never evaluated or built."""

    __slots__ = ("value",)
    __hash__ = None  # type: ignore[assignment]

    def __init__(self, value: Any) -> None:
        self.value = value

    def __repr__(self) -> str:
        return f"const({short_repr(self.value)})"


class _Wildcard:
    __slots__ = ()
    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return "_"


_: Final = _Wildcard()
"""Matches anything in a pattern and binds nothing."""

V1, V2, V3, V4, V5, V6, V7, V8, V9 = (Var(i) for i in range(1, 10))
WHOLE: Final = _Whole()
"""In a guard or body: the whole row ``(key, pid, value)``."""
BINDINGS: Final = _Bindings()
"""In a guard or body: the list of bound variables, ordered by their number."""


def var(n: int) -> Var:
    """The match variable number `n` (``var(1) is`` equivalent to ``V1``)."""
    return Var(n)


def const(value: Any) -> Const:
    return Const(value)


# --------------------------------------------------------------------------------------
# Guard functions: the builders users call, and the semantics both tables share
# --------------------------------------------------------------------------------------

def _type_is(*types: type) -> Callable[[Any], bool]:
    def test(x: Any) -> bool:
        return type(x) in types
    return test


def _has_key(d: Any, k: Any) -> bool:
    # Raising (not returning False) for a non-dict makes the whole guard false, so
    # ``~has_key(V1, k)`` does not hold for a tuple, as ``not is_map_key(K, M)`` in ETS.
    if type(d) is not dict:
        raise TypeError(f"has_key() of {type(d).__name__}, not a dict")
    return k in d


def _size(x: Any) -> int:
    if type(x) in (str, bytes, tuple, list, dict):
        return len(x)
    raise TypeError(f"size() of {type(x).__name__}")


def _truediv(a: Any, b: Any) -> Any:
    return a / b


OPERATORS: Final[dict[str, Callable[..., Any]]] = {
    # Comparisons and arithmetic are Python's; a TypeError fails the guard.
    "eq": lambda a, b: a == b,
    "ne": lambda a, b: a != b,
    "lt": lambda a, b: a < b,
    "le": lambda a, b: a <= b,
    "gt": lambda a, b: a > b,
    "ge": lambda a, b: a >= b,
    "add": lambda a, b: a + b,
    "sub": lambda a, b: a - b,
    "mul": lambda a, b: a * b,
    "truediv": _truediv,
    "floordiv": lambda a, b: a // b,
    "mod": lambda a, b: a % b,
    "neg": lambda a: -a,
    "getitem": lambda a, i: a[i],
    "is_int": _type_is(int),
    "is_float": _type_is(float),
    "is_number": _type_is(int, float),
    "is_str": _type_is(str),
    "is_bytes": _type_is(bytes),
    "is_tuple": _type_is(tuple),
    "is_list": _type_is(list),
    "is_dict": _type_is(dict),
    "is_pid": _type_is(Pid),
    "has_key": _has_key,
    "size": _size,
}
"""Python implementation of every non-boolean operator, by name.

``and``, ``or`` and ``not`` are not here: they short-circuit and accept only booleans
(anything else raises `TypeError`, so the guard fails), and each table evaluates them
itself. ``is_int`` is false for ``bool``; ``is_tuple`` is false for a `Pid`/`Ref`.
``has_key`` and ``size`` raise `TypeError` for an argument of the wrong type.
"""

_ARITY: Final = {name: (1 if name in ("neg", "is_int", "is_float", "is_number", "is_str",
                                      "is_bytes", "is_tuple", "is_list", "is_dict", "is_pid",
                                      "size") else 2)
                 for name in OPERATORS}
_ARITY.update({"not": 1})
BOOLEAN_OPS: Final = frozenset({"and", "or", "not"})


def _unary(name: str) -> Callable[[Any], Op]:
    def build(x: Any) -> Op:
        return Op(name, (x,))
    build.__name__ = name
    build.__doc__ = f"Guard function ``{name}(x)``."
    return build


is_int = _unary("is_int")
is_float = _unary("is_float")
is_number = _unary("is_number")
is_str = _unary("is_str")
is_bytes = _unary("is_bytes")
is_tuple = _unary("is_tuple")
is_list = _unary("is_list")
is_dict = _unary("is_dict")
is_pid = _unary("is_pid")
size = _unary("size")


def has_key(d: Any, key: Any) -> Op:
    """Guard function: whether the dict `d` holds `key`.

    If `d` is not a dict it raises, so the guard is false as a whole, even under
    ``~``/`not_` (test with ``is_dict(d)`` first to tell "not a dict" apart).
    """
    return Op("has_key", (d, key))


def and_(*args: Any) -> Op:
    """All of `args` are ``True`` (evaluated left to right, stopping at the first false)."""
    if len(args) < 2:
        raise ValueError("and_() takes at least two expressions")
    return Op("and", args)


def or_(*args: Any) -> Op:
    """Any of `args` is ``True`` (evaluated left to right, stopping at the first true)."""
    if len(args) < 2:
        raise ValueError("or_() takes at least two expressions")
    return Op("or", args)


def not_(x: Any) -> Op:
    return Op("not", (x,))


# --------------------------------------------------------------------------------------
# The normalized form handed to tables
# --------------------------------------------------------------------------------------

class PatAny:
    """Matches anything."""
    __slots__ = ()


PAT_ANY: Final = PatAny()


class PatVar:
    """A variable in a pattern: binds `slot` on first sight (`bind`), else compares."""
    __slots__ = ("slot", "bind")

    def __init__(self, slot: int, bind: bool) -> None:
        self.slot = slot
        self.bind = bind


class PatLit:
    """A literal term matched with ``==`` (it holds no dict and no spec object)."""
    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value


class PatTuple:
    __slots__ = ("items",)

    def __init__(self, items: tuple) -> None:
        self.items = items


class PatList:
    __slots__ = ("items",)

    def __init__(self, items: tuple) -> None:
        self.items = items


class PatDict:
    """Matches a dict holding every key in `items` (pairs ``(key, pattern)``)."""
    __slots__ = ("items",)

    def __init__(self, items: tuple) -> None:
        self.items = items


class ExprConst:
    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value


class ExprVar:
    __slots__ = ("slot",)

    def __init__(self, slot: int) -> None:
        self.slot = slot


class ExprWhole:
    __slots__ = ()


class ExprBindings:
    __slots__ = ()


EXPR_WHOLE: Final = ExprWhole()
EXPR_BINDINGS: Final = ExprBindings()


class ExprTuple:
    __slots__ = ("items",)

    def __init__(self, items: tuple) -> None:
        self.items = items


class ExprList:
    __slots__ = ("items",)

    def __init__(self, items: tuple) -> None:
        self.items = items


class ExprDict:
    """Builds a dict; `items` are pairs ``(literal key, expression)``."""
    __slots__ = ("items",)

    def __init__(self, items: tuple) -> None:
        self.items = items


class ExprOp:
    """``op`` applied to evaluated `args`; ``op`` is ``and``/``or``/``not`` or a key of OPERATORS."""
    __slots__ = ("op", "args")

    def __init__(self, op: str, args: tuple) -> None:
        self.op = op
        self.args = args


class Clause:
    """One validated clause.

    ``key``, ``pid``, ``value``: patterns. ``guards``: expressions that must all be
    ``True``. ``body``: expressions, the last is the result (empty for `check_match`
    clauses, whose result is fixed by the caller). ``nslots``: number of variables;
    slot ``i`` is the ``i``-th variable by number, so `BINDINGS` is the slots in order.
    ``literal_key``/``literal_pid``: the head's key/pid is a literal term (the table
    then uses its key/pid index instead of scanning); `MISSING` when not.
    """

    __slots__ = ("key", "pid", "value", "guards", "body", "nslots", "literal_key", "literal_pid")

    def __init__(self, key: Any, pid: Any, value: Any, guards: tuple, body: tuple, nslots: int) -> None:
        self.key = key
        self.pid = pid
        self.value = value
        self.guards = guards
        self.body = body
        self.nslots = nslots
        self.literal_key = key.value if type(key) is PatLit else MISSING
        self.literal_pid = pid.value if type(pid) is PatLit else MISSING


class _Missing:
    __slots__ = ()

    def __repr__(self) -> str:
        return "MISSING"


MISSING: Final = _Missing()


# --------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------

def _is_spec_object(x: Any) -> bool:
    return isinstance(x, (Expression, Const, _Wildcard))


def _holds_spec_or_dict(x: Any, depth: int = 0) -> bool:
    t = type(x)
    if t is dict or _is_spec_object(x):
        return True
    if (t is tuple or t is list) and depth < MAX_DEPTH:
        return any(_holds_spec_or_dict(item, depth + 1) for item in x)
    return False


def _collect_head_vars(pattern: Any, where: str, found: list[int], depth: int = 0) -> None:
    """Append every variable number in `pattern` (head order), rejecting bad parts."""
    if depth > MAX_DEPTH:
        raise ValueError(f"{where}: pattern nested deeper than {MAX_DEPTH}")
    t = type(pattern)
    if t is Var:
        found.append(pattern.n)
    elif pattern is _:
        return
    elif t is tuple or t is list:
        for item in pattern:
            _collect_head_vars(item, where, found, depth + 1)
    elif t is dict:
        for k, item in pattern.items():
            if type(k) is not str and type(k) is not int:
                raise ValueError(f"{where}: dict pattern key {short_repr(k)} must be a literal str or int")
            _collect_head_vars(item, where, found, depth + 1)
    elif t is float and pattern != pattern:
        raise ValueError(f"{where}: a NaN cannot be matched: it is not equal to itself (no key holds a "
                         "NaN; to find NaN values, bind a variable and guard with V1 != V1)")
    elif _is_spec_object(pattern):
        raise ValueError(f"{where}: {short_repr(pattern)} cannot stand in a pattern (only _, variables and terms)")
    elif not is_value(pattern):
        raise ValueError(f"{where}: {type(pattern).__name__} {short_repr(pattern, 60)} is not a term")


def _pattern(pattern: Any, slots: dict[int, int], bound: set[int]) -> Any:
    t = type(pattern)
    if t is Var:
        slot = slots[pattern.n]
        first = pattern.n not in bound
        bound.add(pattern.n)
        return PatVar(slot, first)
    if pattern is _:
        return PAT_ANY
    if t is dict:
        return PatDict(tuple((k, _pattern(v, slots, bound)) for k, v in pattern.items()))
    if (t is tuple or t is list) and _holds_spec_or_dict(pattern):
        items = tuple(_pattern(item, slots, bound) for item in pattern)
        return PatTuple(items) if t is tuple else PatList(items)
    return PatLit(pattern)


def _expr(x: Any, slots: dict[int, int], where: str, depth: int = 0) -> Any:
    if depth > MAX_DEPTH:
        raise ValueError(f"{where}: expression nested deeper than {MAX_DEPTH}")
    t = type(x)
    if t is Var:
        if x.n not in slots:
            raise ValueError(f"{where}: {short_repr(x)} is used but not bound in the head")
        return ExprVar(slots[x.n])
    if t is Op:
        if x.op in ("and", "or"):
            if len(x.args) < 2:
                raise ValueError(f"{where}: {x.op} needs at least two expressions")
        elif x.op not in _ARITY:
            raise ValueError(f"{where}: unknown function {short_repr(x.op)}")
        elif len(x.args) != _ARITY[x.op]:
            raise ValueError(f"{where}: {x.op} takes {_ARITY[x.op]} argument(s), got {len(x.args)}")
        return ExprOp(x.op, tuple(_expr(a, slots, where, depth + 1) for a in x.args))
    if x is WHOLE:
        return EXPR_WHOLE
    if x is BINDINGS:
        return EXPR_BINDINGS
    if t is Const:
        if not is_value(x.value):
            raise ValueError(f"{where}: const({short_repr(x.value, 60)}) is not a term")
        return ExprConst(x.value)
    if x is _:
        raise ValueError(f"{where}: _ matches in patterns only; it cannot be evaluated")
    if isinstance(x, Expression):
        raise ValueError(f"{where}: {short_repr(x)} is not a valid expression")
    if t is tuple or t is list:
        if not _holds_spec_or_dict(x):
            if not is_value(x):
                raise ValueError(f"{where}: {short_repr(x, 60)} is not a term")
            return ExprConst(x)
        items = tuple(_expr(item, slots, where, depth + 1) for item in x)
        return ExprTuple(items) if t is tuple else ExprList(items)
    if t is dict:
        pairs = []
        for k, v in x.items():
            if type(k) is not str and type(k) is not int:
                raise ValueError(f"{where}: dict key {short_repr(k)} in a body must be a literal str or int")
            pairs.append((k, _expr(v, slots, where, depth + 1)))
        return ExprDict(tuple(pairs))
    if not is_value(x):
        raise ValueError(f"{where}: {type(x).__name__} {short_repr(x, 60)} is not a term")
    return ExprConst(x)


def _guards(guards: Any, slots: dict[int, int], where: str) -> tuple:
    if type(guards) is not list and type(guards) is not tuple:
        raise ValueError(f"{where}: guards must be a list of expressions, got {short_repr(guards, 60)}")
    return tuple(_expr(g, slots, f"{where} guard {i}", 0) for i, g in enumerate(guards))


def _slots(numbers: Iterable[int]) -> dict[int, int]:
    return {n: slot for slot, n in enumerate(sorted(set(numbers)))}


def check_spec(spec: Any) -> tuple[Clause, ...]:
    """Validate a full spec ``[(head, guards, body), ...]`` and normalize it.

    Raises `ValueError` naming the clause and the part that is wrong.
    """
    if type(spec) is not list and type(spec) is not tuple:
        raise ValueError(f"a match spec must be a list of (head, guards, body) clauses, got {short_repr(spec, 60)}")
    clauses = []
    for i, clause in enumerate(spec):
        where = f"clause {i}"
        if type(clause) is not tuple or len(clause) != 3:
            raise ValueError(f"{where}: must be a 3-tuple (head, guards, body), got {short_repr(clause, 60)}")
        head, guards, body = clause
        if type(head) is not tuple or len(head) != 3:
            raise ValueError(f"{where}: the head must be a 3-tuple (key, pid, value), got {short_repr(head, 60)}")
        numbers: list[int] = []
        for part, name in zip(head, ("key", "pid", "value")):
            _collect_head_vars(part, f"{where} head {name}", numbers)
        slots = _slots(numbers)
        bound: set[int] = set()
        key, pid, value = (_pattern(part, slots, bound) for part in head)
        if type(body) is not list or not body:
            raise ValueError(f"{where}: the body must be a non-empty list of expressions, got {short_repr(body, 60)}")
        checked_body = tuple(_expr(b, slots, f"{where} body {j}") for j, b in enumerate(body))
        clauses.append(Clause(key, pid, value, _guards(guards, slots, where), checked_body, len(slots)))
    return tuple(clauses)


def check_match(pattern: Any, guards: Any = ()) -> Clause:
    """Validate a value pattern and guards (for ``match``/``count_match``/``unregister_match``).

    The returned clause matches any key and pid; the caller supplies the key (always
    literal: `_` as a key is not a wildcard) and decides what to return.
    """
    numbers: list[int] = []
    _collect_head_vars(pattern, "pattern", numbers)
    slots = _slots(numbers)
    value = _pattern(pattern, slots, set())
    return Clause(PAT_ANY, PAT_ANY, value, _guards(guards, slots, "match"), (), len(slots))


# --------------------------------------------------------------------------------------
# Canonical form, for caching compiled specs
# --------------------------------------------------------------------------------------

def canonical(x: Any, depth: int = 0) -> Any:
    """A hashable value that is equal for two specs exactly when they mean the same.

    Literals keep their type (``1``, ``1.0`` and ``True`` give different results in a
    body) and a float its sign (``0.0 == -0.0``, yet they are different results), so a
    cache keyed by this never confuses them. Raises `ValueError` on nesting deeper than
    the spec validator accepts.
    """
    t = type(x)
    if t is float:
        return (t, x, math.copysign(1.0, x))
    if t is tuple or t is list:
        if depth > MAX_DEPTH + 4:
            raise ValueError(f"match spec nested deeper than {MAX_DEPTH}")
        return (t, tuple(canonical(item, depth + 1) for item in x))
    if t is dict:
        return (dict, tuple((type(k), k, canonical(v, depth + 1)) for k, v in x.items()))
    if t is Var:
        return (Var, x.n)
    if t is Op:
        return (Op, x.op, tuple(canonical(a, depth + 1) for a in x.args))
    if t is Const:
        return (Const, canonical(x.value, depth + 1))
    if x is _ or x is WHOLE or x is BINDINGS:
        return (t,)
    if t is Pid or t is Ref:
        return (t, tuple(x))
    return (t, x)
