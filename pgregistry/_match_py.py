"""Match specs compiled to Python closures: the pure table's matcher (layer 0).

`compile_test` turns one clause of a checked spec (`pgregistry.spec`) into a function
``(key, pid, value) -> slots | None`` (the bound variables when the head and guards
match), and `compile_body` its body into a function of those slots. The pure twin of the
table (`pgregistry._core_py`) builds its `Matcher` from them; the Cython table compiles
the same specs in C, and the differential tests keep the two agreeing.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any

from .spec import (
    OPERATORS,
    Clause,
    ExprBindings,
    ExprConst,
    ExprDict,
    ExprList,
    ExprOp,
    ExprTuple,
    ExprVar,
    ExprWhole,
    PatAny,
    PatDict,
    PatList,
    PatLit,
    PatTuple,
    PatVar,
)
from .terms import short_repr

__all__ = ["Eval", "Test", "compile_body", "compile_test"]

# Index of the first variable in a slot list ``[key, pid, value, var0, var1, ...]``.
_BASE = 3

_PatFn = Callable[[Any, list], bool]
Eval = Callable[[list], Any]
Test = Callable[[Any, Any, Any], list | None]

# Comparisons, arithmetic and indexing are Python's operators (spec.OPERATORS says so);
# the C functions of `operator` compute exactly ``a == b``, ``a + b``, ``a[i]`` ... and
# save a Python-level call per application. Every other name uses spec.OPERATORS.
_PYTHON_OPERATORS: dict[str, Callable[..., Any]] = {
    "eq": operator.eq,
    "ne": operator.ne,
    "lt": operator.lt,
    "le": operator.le,
    "gt": operator.gt,
    "ge": operator.ge,
    "add": operator.add,
    "sub": operator.sub,
    "mul": operator.mul,
    "truediv": operator.truediv,
    "floordiv": operator.floordiv,
    "mod": operator.mod,
    "neg": operator.neg,
    "getitem": operator.getitem,
}


def _compile_pattern(node: Any) -> _PatFn | None:
    """A function ``(x, slots) -> bool`` matching `node`; None for `PatAny` (no test)."""
    t = type(node)
    if t is PatAny:
        return None
    if t is PatLit:
        lit = node.value

        def match_literal(x: Any, s: list) -> bool:
            return x is lit or x == lit

        return match_literal
    if t is PatVar:
        i = _BASE + node.slot
        if node.bind:
            def bind(x: Any, s: list) -> bool:
                s[i] = x
                return True

            return bind

        def same(x: Any, s: list) -> bool:
            y = s[i]
            return x is y or x == y

        return same
    if t is PatTuple or t is PatList:
        want = tuple if t is PatTuple else list
        n = len(node.items)
        subs = tuple((i, f) for i, f in enumerate(map(_compile_pattern, node.items)) if f is not None)

        def match_sequence(x: Any, s: list) -> bool:
            if type(x) is not want or len(x) != n:
                return False
            for i, f in subs:
                if not f(x[i], s):
                    return False
            return True

        return match_sequence
    if t is PatDict:
        items = tuple((k, _compile_pattern(p)) for k, p in node.items)

        def match_dict(x: Any, s: list) -> bool:
            if type(x) is not dict:
                return False
            for k, f in items:
                if k not in x:
                    return False
                if f is not None and not f(x[k], s):
                    return False
            return True

        return match_dict
    raise TypeError(f"not a normalized pattern node: {short_repr(node, 80)}")


def _junction(args: tuple[Eval, ...], decisive: bool, name: str) -> Eval:
    """``and`` (`decisive` False) or ``or`` (True): stops at the first operand equal to
    `decisive` and returns it; an operand that is not a bool raises (the guard fails)."""

    def junction(s: list) -> bool:
        for a in args:
            r = a(s)
            if r is decisive:
                return decisive
            if r is not (not decisive):
                raise TypeError(f"{name}: operand is {type(r).__name__}, not a bool")
        return not decisive

    return junction


def _and(args: tuple[Eval, ...]) -> Eval:
    return _junction(args, False, "and")


def _or(args: tuple[Eval, ...]) -> Eval:
    return _junction(args, True, "or")


def _not(arg: Eval) -> Eval:
    def not_(s: list) -> bool:
        r = arg(s)
        if r is True:
            return False
        if r is False:
            return True
        raise TypeError(f"not: operand is {type(r).__name__}, not a bool")

    return not_


def _apply(fn: Callable[..., Any], nodes: tuple, args: tuple[Eval, ...]) -> Eval:
    """``fn`` applied to evaluated arguments; direct slot and constant reads are inlined."""
    if len(nodes) == 1:
        (a,) = nodes
        if type(a) is ExprVar:
            i = _BASE + a.slot
            return lambda s: fn(s[i])
        (fa,) = args
        return lambda s: fn(fa(s))
    if len(nodes) == 2:
        a, b = nodes
        ta, tb = type(a), type(b)
        if ta is ExprVar and tb is ExprConst:
            i, c = _BASE + a.slot, b.value
            return lambda s: fn(s[i], c)
        if ta is ExprVar and tb is ExprVar:
            i, j = _BASE + a.slot, _BASE + b.slot
            return lambda s: fn(s[i], s[j])
        if ta is ExprConst and tb is ExprVar:
            c, j = a.value, _BASE + b.slot
            return lambda s: fn(c, s[j])
        fa, fb = args
        return lambda s: fn(fa(s), fb(s))
    return lambda s: fn(*[f(s) for f in args])


def _compile_expr(node: Any) -> Eval:
    """A function ``slots -> value`` evaluating the expression `node`."""
    t = type(node)
    if t is ExprConst:
        c = node.value
        return lambda s: c
    if t is ExprVar:
        return operator.itemgetter(_BASE + node.slot)
    if t is ExprWhole:
        return operator.itemgetter(0, 1, 2)  # a new tuple (key, pid, value)
    if t is ExprBindings:
        return lambda s: s[_BASE:]  # a new list of the slots, in variable order
    if t is ExprTuple:
        items = node.items
        if len(items) >= 2 and all(type(i) is ExprVar for i in items):
            return operator.itemgetter(*(_BASE + i.slot for i in items))
        fs = tuple(map(_compile_expr, items))
        if len(fs) == 2:
            f0, f1 = fs
            return lambda s: (f0(s), f1(s))
        if len(fs) == 3:
            f0, f1, f2 = fs
            return lambda s: (f0(s), f1(s), f2(s))
        return lambda s: tuple([f(s) for f in fs])
    if t is ExprList:
        fs = tuple(map(_compile_expr, node.items))
        return lambda s: [f(s) for f in fs]
    if t is ExprDict:
        pairs = tuple((k, _compile_expr(v)) for k, v in node.items)
        return lambda s: {k: f(s) for k, f in pairs}
    if t is ExprOp:
        op = node.op
        args = tuple(map(_compile_expr, node.args))
        if op == "and":
            return _and(args)
        if op == "or":
            return _or(args)
        if op == "not":
            if len(args) != 1:
                raise ValueError(f"not takes 1 argument, got {len(args)}")
            return _not(args[0])
        fn = _PYTHON_OPERATORS.get(op) or OPERATORS.get(op)
        if fn is None:
            raise ValueError(f"unknown function {short_repr(op)}")
        return _apply(fn, node.args, args)
    raise TypeError(f"not a normalized expression node: {short_repr(node, 80)}")


def compile_test(clause: Clause) -> Test:
    """The head and guards of `clause` as ``(key, pid, value) -> slots or None``.

    A head part that is a variable's first occurrence is a plain copy into its slot
    (``binds``), done before the other parts are tested: no earlier part reads that
    slot, so this is the same as matching key, pid, value in order.
    """
    pad = (None,) * clause.nslots
    binds = []
    checks = []
    for i, node in enumerate((clause.key, clause.pid, clause.value)):
        if type(node) is PatVar and node.bind:
            binds.append((i, _BASE + node.slot))
        else:
            f = _compile_pattern(node)
            if f is not None:
                checks.append((i, f))
    bind_parts = tuple(binds)
    check_parts = tuple(checks)
    guards = tuple(map(_compile_expr, clause.guards))

    # Three closures that repeat the head match on purpose: this runs once per row of a
    # select, and a shared helper would add a Python call per row (about a third more
    # time for the twin's select over 100 000 rows).
    if not guards:
        def test_head(k: Any, p: Any, v: Any) -> list | None:
            s = [k, p, v, *pad]
            for i, j in bind_parts:
                s[j] = s[i]
            for i, f in check_parts:
                if not f(s[i], s):
                    return None
            return s

        return test_head

    if len(guards) == 1:
        (guard,) = guards

        def test_guard(k: Any, p: Any, v: Any) -> list | None:
            s = [k, p, v, *pad]
            for i, j in bind_parts:
                s[j] = s[i]
            for i, f in check_parts:
                if not f(s[i], s):
                    return None
            try:
                if guard(s) is not True:
                    return None
            except Exception:  # a guard that raises is false
                return None
            return s

        return test_guard

    def test_guards(k: Any, p: Any, v: Any) -> list | None:
        s = [k, p, v, *pad]
        for i, j in bind_parts:
            s[j] = s[i]
        for i, f in check_parts:
            if not f(s[i], s):
                return None
        try:
            for g in guards:
                if g(s) is not True:
                    return None
        except Exception:  # a guard that raises is false
            return None
        return s

    return test_guards


def compile_body(body: tuple) -> Eval | None:
    """Evaluate every expression in order and return the last; None for an empty body."""
    if not body:
        return None
    fs = tuple(map(_compile_expr, body))
    if len(fs) == 1:
        return fs[0]
    first, last = fs[:-1], fs[-1]

    def evaluate(s: list) -> Any:
        for f in first:
            f(s)
        return last(s)

    return evaluate
