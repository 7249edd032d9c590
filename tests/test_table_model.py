"""Stateful tests of the registry table (hypothesis `RuleBasedStateMachine`).

(a) `test_model_python` / `test_model_cython`: each implementation against `Model`, a
    trivially correct table written here: two flat lists of rows with O(n) operations
    and a naive, recursive interpreter of the normalized match-spec nodes. It implements
    the contract of ``pgregistry/_core.pyi`` the plain way, so any difference is a bug
    in the implementation (or in the model, which is short enough to check by eye).
(b) `test_differential_cython`: the Cython table and the pure-Python table driven side
    by side with the same operations (skipped only when ``PGREGISTRY_PURE_PYTHON=1``;
    a Cython module that fails to import makes it ERROR).

After every step every read is compared, list order and types included (``1``, ``1.0``
and ``True`` are distinct in the comparison), plus fixed and random match specs.
Domains are small so that keys, pids, values and tags collide often.
"""

from __future__ import annotations

import functools
import importlib
import os
from collections.abc import Callable
from types import ModuleType
from typing import Any, ClassVar

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from pgregistry import spec as S
from pgregistry.spec import (
    BINDINGS,
    MISSING,
    OPERATORS,
    V1,
    V2,
    V3,
    WHOLE,
    Clause,
    Op,
    Var,
    _,
    check_match,
    check_spec,
    const,
)
from pgregistry.terms import Pid

# ======================================================================================
# The model: flat lists, O(n) everything
# ======================================================================================


class MRow:
    __slots__ = ("key", "pid", "value", "tag")

    def __init__(self, key: Any, pid: Any, value: Any, tag: int) -> None:
        self.key = key
        self.pid = pid
        self.value = value
        self.tag = tag


def same(a: Any, b: Any) -> bool:
    """Equality as a dict sees it (``is`` first, then ``==``)."""
    return a is b or a == b


class ModelMatcher:
    """The clauses, interpreted node by node for every row (no compilation)."""

    def __init__(self, clauses: tuple[Clause, ...]) -> None:
        self.clauses = tuple(clauses)


def m_pattern(node: Any, x: Any, s: list) -> bool:
    t = type(node)
    if t is S.PatAny:
        return True
    if t is S.PatLit:
        return x is node.value or x == node.value
    if t is S.PatVar:
        if node.bind:
            s[node.slot] = x
            return True
        return x is s[node.slot] or x == s[node.slot]
    if t is S.PatTuple or t is S.PatList:
        if type(x) is not (tuple if t is S.PatTuple else list) or len(x) != len(node.items):
            return False
        for item, sub in zip(node.items, x):
            if not m_pattern(item, sub, s):
                return False
        return True
    if t is S.PatDict:
        if type(x) is not dict:
            return False
        for k, item in node.items:
            if k not in x or not m_pattern(item, x[k], s):
                return False
        return True
    raise AssertionError(node)


def m_eval(node: Any, s: list, row: MRow) -> Any:
    t = type(node)
    if t is S.ExprConst:
        return node.value
    if t is S.ExprVar:
        return s[node.slot]
    if t is S.ExprWhole:
        return (row.key, row.pid, row.value)
    if t is S.ExprBindings:
        return list(s)
    if t is S.ExprTuple:
        return tuple([m_eval(i, s, row) for i in node.items])
    if t is S.ExprList:
        return [m_eval(i, s, row) for i in node.items]
    if t is S.ExprDict:
        return {k: m_eval(v, s, row) for k, v in node.items}
    if t is S.ExprOp:
        if node.op == "and" or node.op == "or":
            stop = node.op == "or"  # "or" stops at True, "and" at False
            for a in node.args:
                r = m_eval(a, s, row)
                if r is stop:
                    return stop
                if r is not (not stop):
                    raise TypeError("not a bool")
            return not stop
        if node.op == "not":
            r = m_eval(node.args[0], s, row)
            if r is True:
                return False
            if r is False:
                return True
            raise TypeError("not a bool")
        return OPERATORS[node.op](*[m_eval(a, s, row) for a in node.args])
    raise AssertionError(node)


def m_clause(clause: Clause, row: MRow) -> list | None:
    """The slots if `row` passes the head and guards of `clause`, else None."""
    s: list = [None] * clause.nslots
    if not (m_pattern(clause.key, row.key, s) and m_pattern(clause.pid, row.pid, s)
            and m_pattern(clause.value, row.value, s)):
        return None
    for g in clause.guards:
        try:
            if m_eval(g, s, row) is not True:
                return None
        except Exception:
            return None
    return s


def m_matches(matcher: ModelMatcher, row: MRow) -> bool:
    return any(m_clause(c, row) is not None for c in matcher.clauses)


class Model:
    """The table contract, the obvious way.

    ``korder`` holds every row in the order it last joined the end of its key order
    (insert, update); ``porder`` every row in insertion order; ``groups_`` the key
    object of each group in creation order.
    """

    def __init__(self) -> None:
        self.korder: list[MRow] = []
        self.porder: list[MRow] = []
        self.groups_: list[Any] = []
        self.owners_: list[Any] = []
        self.index_: list[tuple[Any, list[MRow]]] = []  # (group key, rows in index order)

    def _index_of(self, key: Any) -> list[MRow] | None:
        for group, rows in self.index_:
            if same(group, key):
                return rows
        return None

    # -- helpers
    def _key_rows(self, key: Any) -> list[MRow]:
        return [r for r in self.korder if same(r.key, key)]

    def _pid_rows(self, pid: Any) -> list[MRow]:
        return [r for r in self.porder if same(r.pid, pid)]

    def _of(self, key: Any, pid: Any) -> list[MRow]:
        return [r for r in self._key_rows(key) if same(r.pid, pid)]

    def _remove(self, row: MRow) -> None:
        index = self._index_of(row.key)
        assert index is not None
        place = next(i for i, r in enumerate(index) if r is row)
        index[place] = index[-1]  # the last row takes the removed row's place
        index.pop()
        if not index:
            self.index_ = [(g, rows) for g, rows in self.index_ if rows]
        self.korder = [r for r in self.korder if r is not row]
        self.porder = [r for r in self.porder if r is not row]
        if not self._key_rows(row.key):
            self.groups_ = [g for g in self.groups_ if not same(g, row.key)]
        if not self._pid_rows(row.pid):
            self.owners_ = [p for p in self.owners_ if not same(p, row.pid)]

    def _to_end(self, row: MRow) -> None:
        self.korder = [r for r in self.korder if r is not row] + [row]

    # -- writes
    def insert(self, key: Any, pid: Any, value: Any, tag: int) -> bool:
        first = not self._pid_rows(pid)
        if first:
            self.owners_.append(pid)
        if not self._key_rows(key):
            self.groups_.append(key)
        row = MRow(key, pid, value, tag)
        index = self._index_of(key)
        if index is None:
            self.index_.append((key, [row]))
        else:
            index.append(row)
        self.korder.append(row)
        self.porder.append(row)
        return first

    def pop(self, key: Any, pid: Any, tag: int, default: Any = None) -> Any:
        for r in self._of(key, pid):
            if r.tag == tag:
                self._remove(r)
                return r.value
        return default

    def pop_latest(self, key: Any, pid: Any) -> tuple[int, Any] | None:
        rows = self._of(key, pid)
        if not rows:
            return None
        best = rows[0]
        for r in rows:
            if r.tag > best.tag:
                best = r
        self._remove(best)
        return best.tag, best.value

    def pop_pid(self, pid: Any) -> list[tuple[Any, Any, int]]:
        rows = self._pid_rows(pid)
        for r in rows:
            self._remove(r)
        return [(r.key, r.value, r.tag) for r in rows]

    def pop_match(self, key: Any, pid: Any, matcher: ModelMatcher) -> list[tuple[int, Any]]:
        rows = [r for r in self._of(key, pid) if m_matches(matcher, r)]
        for r in rows:
            self._remove(r)
        return [(r.tag, r.value) for r in rows]

    def update(self, key: Any, pid: Any, value: Any) -> list[tuple[int, Any]]:
        out = []
        for r in self._of(key, pid):
            out.append((r.tag, r.value))
            r.value = value
            self._to_end(r)
        return out

    def update_row(self, key: Any, pid: Any, tag: int, value: Any, default: Any = None) -> Any:
        for r in self._of(key, pid):
            if r.tag == tag:
                old = r.value
                r.value = value
                self._to_end(r)
                return old
        return default

    def clear(self) -> None:
        self.__init__()  # type: ignore[misc]

    # -- reads
    def __len__(self) -> int:
        return len(self.porder)

    def __contains__(self, key: Any) -> bool:
        return bool(self._key_rows(key))

    def lookup(self, key: Any) -> list:
        return [(r.pid, r.value) for r in self._key_rows(key)]

    def pids(self, key: Any) -> list:
        return [r.pid for r in self._key_rows(key)]

    def entries(self, key: Any) -> list:
        return [(r.pid, r.value, r.tag) for r in self._key_rows(key)]

    def values(self, key: Any, pid: Any) -> list:
        return [r.value for r in self._of(key, pid)]

    def keys(self, pid: Any) -> list:
        out: list = []
        for r in self._pid_rows(pid):
            if not any(same(k, r.key) for k in out):
                out.append(r.key)
        return out

    def pid_entries(self, pid: Any) -> list:
        return [(r.key, r.value, r.tag) for r in self._pid_rows(pid)]

    def groups(self) -> list:
        return list(self.groups_)

    def owners(self) -> list:
        return list(self.owners_)

    def pid_rows_flat(self, pid: Any) -> list:
        return [x for r in self._pid_rows(pid) for x in (r.key, r.value, r.tag)]

    def count_key(self, key: Any) -> int:
        return len(self._key_rows(key))

    def at(self, key: Any, i: int) -> tuple[Any, Any] | None:
        index = self._index_of(key) or []
        return (index[i].pid, index[i].value) if 0 <= i < len(index) else None

    def first(self, key: Any) -> tuple[Any, Any] | None:
        rows = self._key_rows(key)
        return (rows[0].pid, rows[0].value) if rows else None

    def last(self, key: Any) -> tuple[Any, Any] | None:
        rows = self._key_rows(key)
        return (rows[-1].pid, rows[-1].value) if rows else None

    def count_pid(self, pid: Any) -> int:
        return len(self._pid_rows(pid))

    def snapshot(self) -> dict:
        return {g: self.lookup(g) for g in self.groups_}

    def rows(self) -> list:
        return [(r.key, r.pid, r.value, r.tag) for g in self.groups_ for r in self._key_rows(g)]

    # -- match specs
    def match(self, key: Any, matcher: ModelMatcher) -> list:
        return [(r.pid, r.value) for r in self._key_rows(key) if m_matches(matcher, r)]

    def count_match(self, key: Any, matcher: ModelMatcher) -> int:
        return len(self.match(key, matcher))

    def _visit(self, matcher: ModelMatcher) -> list[MRow]:
        clauses = matcher.clauses
        if all(c.literal_key is not MISSING for c in clauses):
            found: list = []
            for c in clauses:
                if not any(same(k, c.literal_key) for k in found):
                    found.append(c.literal_key)
            return [r for k in found for r in self._key_rows(k)]
        if all(c.literal_pid is not MISSING for c in clauses):
            found = []
            for c in clauses:
                if not any(same(p, c.literal_pid) for p in found):
                    found.append(c.literal_pid)
            return [r for p in found for r in self._pid_rows(p)]
        return [r for g in self.groups_ for r in self._key_rows(g)]

    def _results(self, matcher: ModelMatcher) -> list[tuple[bool, Any]]:
        if not all(c.body for c in matcher.clauses):
            raise ValueError("select needs bodies")
        out = []
        for row in self._visit(matcher):
            for c in matcher.clauses:
                s = m_clause(c, row)
                if s is None:
                    continue
                try:
                    result = None
                    for expr in c.body:
                        result = m_eval(expr, s, row)
                    out.append((True, result))
                except Exception:
                    pass
                break
        return out

    def select(self, matcher: ModelMatcher) -> list:
        return [r for _ok, r in self._results(matcher)]

    def count_select(self, matcher: ModelMatcher) -> int:
        return sum(1 for _ok, r in self._results(matcher) if r is True)


# ======================================================================================
# Domains and spec strategies
# ======================================================================================

P1 = Pid("n@h:1", 1)
P2 = Pid("n@h:1", 2)
P3 = Pid("m@h:2", 1)
KEYS: list[Any] = ["a", "b", 1, 1.0, True, 0, None, (1, "a"), (1.0, "a")]
PIDS: list[Any] = [P1, P2, P3, ("n@h:1", 1, 0), 7, 7.0]  # the plain tuple is not P1
SCALARS: list[Any] = [None, True, False, 0, 1, 1.0, 2, -1, 2.5, "a", "b", "", b"x",
                      2**40, -0.0, float("inf"), "é", "\U0001d11e", b"xy"]  # C-compared shapes too
DICT_KEYS = ["n", "r", 1]
NAN = float("nan")

scalars = st.sampled_from(SCALARS)
# Values may hold NaN (keys and patterns may not): one shared NaN object, which a
# pattern variable repeated over it matches by identity, and fresh ones, which equal
# nothing, not even themselves.
value_scalars = st.one_of(scalars, st.just(NAN), st.builds(float, st.just("nan")))
values = st.recursive(
    value_scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3).map(tuple),
        st.lists(inner, max_size=3),
        st.dictionaries(st.sampled_from(DICT_KEYS), inner, max_size=3),
    ),
    max_leaves=6,
)
# Biased towards a few members so that rows pile up under the same key and pid.
keys = st.one_of(st.sampled_from(["a", 1]), st.sampled_from(KEYS))
pids = st.one_of(st.sampled_from([P1, P2]), st.sampled_from(PIDS))
VARS = [V1, V2, V3]

value_patterns = st.recursive(
    st.one_of(st.just(_), st.sampled_from(VARS), scalars),
    lambda inner: st.one_of(
        st.lists(inner, max_size=3).map(tuple),
        st.lists(inner, max_size=3),
        st.dictionaries(st.sampled_from(DICT_KEYS), inner, max_size=2),
    ),
    max_leaves=5,
)
key_patterns = st.one_of(
    st.just(_), st.sampled_from(VARS), keys, st.just([1]), st.tuples(st.sampled_from(VARS), st.just("a"))
)
pid_patterns = st.one_of(st.just(_), st.sampled_from(VARS), pids)

BINARY = ["eq", "ne", "lt", "le", "gt", "ge", "add", "sub", "mul", "truediv", "floordiv", "mod", "getitem", "has_key"]
UNARY = ["neg", "size", "is_int", "is_float", "is_number", "is_str", "is_bytes", "is_tuple", "is_list",
         "is_dict", "is_pid", "not"]


def head_vars(x: Any, found: set[int]) -> set[int]:
    if type(x) is Var:
        found.add(x.n)
    elif type(x) in (tuple, list):
        for i in x:
            head_vars(i, found)
    elif type(x) is dict:
        for i in x.values():
            head_vars(i, found)
    return found


@functools.cache
def expressions(numbers: tuple[int, ...]) -> st.SearchStrategy[Any]:
    """Guard and body expressions over the variables `numbers` (strategies are cached:
    building one per draw makes drawing, and above all shrinking, very slow)."""
    bound = [VARS[n - 1] for n in numbers]
    leaves = st.one_of(
        *([st.sampled_from(bound)] * 3 if bound else []),
        scalars,
        st.just(WHOLE),
        st.just(BINDINGS),
        values.map(const),
    )

    def extend(inner: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
        return st.one_of(
            st.builds(lambda op, a, b: Op(op, (a, b)), st.sampled_from(BINARY), inner, inner),
            st.builds(lambda op, a: Op(op, (a,)), st.sampled_from(UNARY), inner),
            st.builds(lambda op, xs: Op(op, tuple(xs)), st.sampled_from(["and", "or"]),
                      st.lists(inner, min_size=2, max_size=3)),
            st.lists(inner, min_size=1, max_size=3).map(tuple),
            st.lists(inner, max_size=2),
            st.dictionaries(st.sampled_from(DICT_KEYS), inner, max_size=2),
        )

    return st.recursive(leaves, extend, max_leaves=5)


@functools.cache
def likely_guards(numbers: tuple[int, ...]) -> st.SearchStrategy[Any]:
    """Guards that often hold, so that guarded clauses select something."""
    bound = [VARS[n - 1] for n in numbers]
    if not bound:
        return st.just(True)
    v = st.sampled_from(bound)
    return st.one_of(
        st.builds(lambda a, c: a > c, v, st.sampled_from([0, 1, 1.0, "a"])),
        st.builds(lambda a, c: a == c, v, scalars),
        st.builds(lambda a: S.is_int(a), v),
        st.builds(lambda a: S.has_key(a, "n"), v),
        st.builds(lambda a, b: (a == 1) | (b != 0), v, v),
        st.builds(lambda a: ~(a == None), v),  # noqa: E711
        st.builds(lambda a: S.size(a) >= 1, v),
    )


def bound_vars(head: Any) -> tuple[int, ...]:
    """The numbers of the variables in `head`, in order."""
    return tuple(sorted(head_vars(head, set())))


@functools.cache
def guard_lists(numbers: tuple[int, ...]) -> st.SearchStrategy[list]:
    return st.one_of(
        st.just([]),
        st.lists(likely_guards(numbers), min_size=1, max_size=2),
        st.lists(st.one_of(likely_guards(numbers), expressions(numbers)), min_size=1, max_size=2),
    )


@functools.cache
def bodies(numbers: tuple[int, ...]) -> st.SearchStrategy[list]:
    return st.one_of(
        st.sampled_from([[WHOLE], [BINDINGS], [True], [False]]),
        st.lists(expressions(numbers), min_size=1, max_size=2),
        likely_guards(numbers).map(lambda g: [g]),
    )


random_heads = st.tuples(key_patterns, pid_patterns, value_patterns)
CHOICE = st.integers(0, 9)
VAR_INDEX = st.integers(0, len(VARS) - 1)
COIN = st.booleans()
CLAUSE_COUNT = st.sampled_from([1, 2, 3, 0])
ROW_PICK = st.integers(0, 10**6)


def holds_nan(x: Any) -> bool:
    t = type(x)
    if t is float:
        return x != x
    if t is tuple or t is list:
        return any(map(holds_nan, x))
    if t is dict:
        return any(map(holds_nan, x.values()))
    return False


def generalize(data: st.DataObject, x: Any, depth: int = 0) -> Any:
    """A pattern that usually matches `x`: parts become ``_``, variables (a repeated
    variable may or may not match), the part itself, or a random scalar. A part holding
    a NaN is never kept as a literal (a pattern may not hold one): it becomes ``_``."""
    c = data.draw(CHOICE)
    if c <= 1:
        return _
    if c <= 3:
        return VARS[data.draw(VAR_INDEX)]
    if c == 4:
        return data.draw(scalars)
    t = type(x)
    if c <= 7 and depth < 3:
        if t is tuple or t is list:
            items = [generalize(data, i, depth + 1) for i in x]
            return tuple(items) if t is tuple else items
        if t is dict:
            return {k: generalize(data, v, depth + 1) for k, v in x.items() if data.draw(COIN)}
    return _ if holds_nan(x) else x


def draw_clause_parts(data: st.DataObject, rows: list) -> tuple[Any, Any, Any]:
    """A head: mostly one generalized from an existing row (so that it matches), else random."""
    if rows and data.draw(CHOICE) < 7:
        key, pid, value, _tag = rows[data.draw(ROW_PICK) % len(rows)]
        return generalize(data, key, 2), generalize(data, pid, 2), generalize(data, value)
    return data.draw(random_heads)


def draw_spec(data: st.DataObject, rows: list) -> tuple[Clause, ...]:
    clauses = []
    for _i in range(data.draw(CLAUSE_COUNT)):
        head = draw_clause_parts(data, rows)
        bound = bound_vars(head)
        clauses.append((head, data.draw(guard_lists(bound)), data.draw(bodies(bound))))
    return check_spec(clauses)


def draw_match(data: st.DataObject, values_seen: list) -> tuple[Clause, ...]:
    if values_seen and data.draw(CHOICE) < 7:
        pat = generalize(data, values_seen[data.draw(ROW_PICK) % len(values_seen)])
    else:
        pat = data.draw(value_patterns)
    return (check_match(pat, data.draw(guard_lists(bound_vars(pat)))),)


# Fixed specs checked after every step: each visiting order and the common shapes.
FIXED_SPECS: list[tuple[Clause, ...]] = [
    check_spec([((_, _, _), [], [WHOLE])]),
    check_spec([((V1, V2, V3), [], [BINDINGS])]),
    check_spec([((V1, _, V2), [S.is_int(V2) | S.is_float(V2)], [(V1, V2 + 1)])]),
    check_spec([(("a", _, V1), [], [V1]), ((1, _, V1), [], [(V1,)]), (("a", _, _), [], ["dup"])]),
    check_spec([((V1, P1, _), [], [WHOLE]), ((_, 7, V1), [V1 == 1], [True])]),
    check_spec([((_, _, {"n": V1}), [V1 > 0], [V1 > 1]), ((_, _, (V1, V2)), [], [V1 == V2])]),
    check_spec([((_, _, V1), [], [V1 == True])]),  # noqa: E712
    check_spec([((_, _, [V1, V1]), [], [V1]), ((_, _, V1), [S.is_float(V1)], [(V1 != V1, V1 + 1)])]),
    check_spec([((_, _, V1), [V1 > 0], [V1])]),  # the guard raises for most non-numbers
    check_spec([((_, _, V1), [], [V1 + 1]), ((_, _, _), [], ["fallback"])]),  # bodies that raise
    check_spec([  # and/or/not take booleans only: anything else raises (the row is skipped)
        ((_, _, V1), [S.is_str(V1)], [S.and_(V1 == "a", V1)]),
        ((_, _, V1), [S.is_int(V1)], [S.or_(V1 == 7, V1)]),
        ((_, _, V1), [], [S.not_(V1)]),
    ]),
]
FIXED_MATCHES: list[tuple[Clause, ...]] = [
    (check_match(_),),
    # NaN in values: a repeated variable matches the same NaN object, never another NaN;
    # a NaN differs from itself in a guard.
    (check_match((V1, V1)),),
    (check_match(V1, [V1 != V1]),),
    (check_match((V1, _), [S.is_int(V1)]),),
    (check_match({"n": _}),),
    (check_match(V1, [V1 == 1]),),
    (check_match(V1, [V1["n"] == 1]),),
]


def typed(x: Any) -> Any:
    """`x` with every part's type spelled out (``1``, ``1.0``, ``True`` differ); every
    NaN is the same (a body computes new NaN objects, which equal nothing)."""
    t = type(x)
    if t is float and x != x:
        return ("float", "nan")
    if t is list or t is tuple:
        return (t.__name__, tuple(typed(i) for i in x))
    if t is dict:
        return ("dict", tuple((typed(k), typed(v)) for k, v in x.items()))
    return (t.__name__, x)


def agree(got: Any, want: Any, what: str) -> None:
    assert typed(got) == typed(want), f"{what}: subject {got!r} != reference {want!r}"


# ======================================================================================
# The machine
# ======================================================================================

class TableMachine(RuleBasedStateMachine):
    """Drives a subject table and a reference side by side; subclasses pick both."""

    make_subject: ClassVar[Callable[[], Any]]
    make_subject_matcher: ClassVar[Callable[[tuple[Clause, ...]], Any]]
    make_reference: ClassVar[Callable[[], Any]]
    make_reference_matcher: ClassVar[Callable[[tuple[Clause, ...]], Any]]

    def __init__(self) -> None:
        super().__init__()
        self.sub = type(self).make_subject()
        self.ref = type(self).make_reference()
        self.used_tags: set[int] = set()
        self.fixed = [self.matchers(c) for c in FIXED_SPECS]
        self.fixed_match = [self.matchers(c) for c in FIXED_MATCHES]

    def matchers(self, clauses: tuple[Clause, ...]) -> tuple[Any, Any]:
        cls = type(self)
        return cls.make_subject_matcher(clauses), cls.make_reference_matcher(clauses)

    def both(self, method: str, *args: Any) -> Any:
        got = getattr(self.sub, method)(*args)
        want = getattr(self.ref, method)(*args)
        agree(got, want, f"{method}{args!r}")
        return want

    def pick_row(self, pick: int) -> tuple[Any, Any, Any, int] | None:
        rows = self.ref.rows()
        return rows[pick % len(rows)] if rows else None

    # -- writes -----------------------------------------------------------------------

    @initialize(rows=st.lists(st.tuples(keys, pids, values, st.integers(0, 40)), min_size=3, max_size=15))
    def start(self, rows: list[tuple[Any, Any, Any, int]]) -> None:
        for key, pid, value, tag in rows:
            self.insert(key, pid, value, tag)

    @rule(key=keys, pid=pids, value=values, tag=st.integers(0, 40))
    def insert(self, key: Any, pid: Any, value: Any, tag: int) -> None:
        if tag in self.used_tags:  # the caller keeps (pid, tag) unique: tags are unique here
            tag = max(self.used_tags) + 1
        self.used_tags.add(tag)
        self.both("insert", key, pid, value, tag)

    @rule(rows=st.lists(st.tuples(keys, pids, values, st.integers(0, 40)), min_size=1, max_size=6))
    def insert_many(self, rows: list[tuple[Any, Any, Any, int]]) -> None:
        for key, pid, value, tag in rows:
            self.insert(key, pid, value, tag)

    @rule(pid=pids, rows=st.lists(st.tuples(keys, values), max_size=6))
    def insert_flat(self, pid: Any, rows: list[tuple[Any, Any]]) -> None:
        """A sync part's rows of one pid: the subject's `insert_flat` is the reference's
        `insert` row by row."""
        flat: list[Any] = []
        for key, value in rows:
            tag = max(self.used_tags, default=0) + 1
            self.used_tags.add(tag)
            flat += [key, value, tag]
        got = self.sub.insert_flat(pid, flat)
        firsts = [self.ref.insert(flat[i], pid, flat[i + 1], flat[i + 2]) for i in range(0, len(flat), 3)]
        agree(got, bool(firsts and firsts[0]), f"insert_flat({pid!r}, {flat!r})")

    @rule(pick=st.integers(0, 10**6), existing=st.booleans(), key=keys, pid=pids, tag=st.integers(0, 45))
    def pop(self, pick: int, existing: bool, key: Any, pid: Any, tag: int) -> None:
        row = self.pick_row(pick)
        if existing and row is not None:
            key, pid, _v, tag = row
        sentinel = ("absent",)
        got = self.sub.pop(key, pid, tag, sentinel)
        want = self.ref.pop(key, pid, tag, sentinel)
        assert got is want, f"pop: {got!r} is not {want!r}"  # values by reference
        agree(self.sub.pop(key, pid, tag), self.ref.pop(key, pid, tag), "pop of a popped row")

    @rule(pick=st.integers(0, 10**6), existing=st.booleans(), key=keys, pid=pids)
    def pop_latest(self, pick: int, existing: bool, key: Any, pid: Any) -> None:
        row = self.pick_row(pick)
        if existing and row is not None:
            key, pid = row[0], row[1]
        self.both("pop_latest", key, pid)

    @precondition(lambda self: len(self.ref) > 6)  # it removes a lot: keep some rows around
    @rule(pick=st.integers(0, 10**6), existing=st.booleans(), pid=pids)
    def pop_pid(self, pick: int, existing: bool, pid: Any) -> None:
        row = self.pick_row(pick)
        if existing and row is not None:
            pid = row[1]
        self.both("pop_pid", pid)

    @rule(pick=st.integers(0, 10**6), existing=st.booleans(), key=keys, pid=pids, data=st.data())
    def pop_match(self, pick: int, existing: bool, key: Any, pid: Any, data: st.DataObject) -> None:
        row = self.pick_row(pick)
        if existing and row is not None:
            key, pid = row[0], row[1]
        clauses = draw_match(data, self.ref.values(key, pid))
        m_sub, m_ref = self.matchers(clauses)
        agree(self.sub.pop_match(key, pid, m_sub), self.ref.pop_match(key, pid, m_ref), "pop_match")

    @rule(pick=st.integers(0, 10**6), existing=st.booleans(), key=keys, pid=pids, value=values)
    def update(self, pick: int, existing: bool, key: Any, pid: Any, value: Any) -> None:
        row = self.pick_row(pick)
        if existing and row is not None:
            key, pid = row[0], row[1]
        self.both("update", key, pid, value)

    @rule(pick=st.integers(0, 10**6), existing=st.booleans(), key=keys, pid=pids,
          tag=st.integers(0, 45), value=values)
    def update_row(self, pick: int, existing: bool, key: Any, pid: Any, tag: int, value: Any) -> None:
        row = self.pick_row(pick)
        if existing and row is not None:
            key, pid, _v, tag = row
        sentinel = ("absent",)
        got = self.sub.update_row(key, pid, tag, value, sentinel)
        want = self.ref.update_row(key, pid, tag, value, sentinel)
        assert got is want, f"update_row: {got!r} is not {want!r}"

    @precondition(lambda self: len(self.ref) > 25)
    @rule()
    def clear(self) -> None:
        self.sub.clear()
        self.ref.clear()

    # -- random match specs -------------------------------------------------------------

    @rule(data=st.data())
    def select(self, data: st.DataObject) -> None:
        clauses = draw_spec(data, self.ref.rows())
        m_sub, m_ref = self.matchers(clauses)
        agree(self.sub.select(m_sub), self.ref.select(m_ref), "select")
        agree(self.sub.count_select(m_sub), self.ref.count_select(m_ref), "count_select")

    @rule(data=st.data())
    def match(self, data: st.DataObject) -> None:
        clauses = draw_match(data, [row[2] for row in self.ref.rows()])
        m_sub, m_ref = self.matchers(clauses)
        for key in KEYS:
            agree(self.sub.match(key, m_sub), self.ref.match(key, m_ref), f"match {key!r}")
            agree(self.sub.count_match(key, m_sub), self.ref.count_match(key, m_ref), f"count_match {key!r}")

    # -- every read, after every step ---------------------------------------------------

    @invariant()
    def reads_agree(self) -> None:
        sub, ref = self.sub, self.ref
        agree(len(sub), len(ref), "len")
        agree(sub.groups(), ref.groups(), "groups")
        agree(sub.owners(), ref.owners(), "owners")
        agree(sub.rows(), ref.rows(), "rows")
        snap_sub, snap_ref = sub.snapshot(), ref.snapshot()
        assert type(snap_sub) is dict
        agree(list(snap_sub.items()), list(snap_ref.items()), "snapshot")
        for key in KEYS:
            agree(key in sub, key in ref, f"contains {key!r}")
            agree(sub.lookup(key), ref.lookup(key), f"lookup {key!r}")
            agree(sub.pids(key), ref.pids(key), f"pids {key!r}")
            agree(sub.entries(key), ref.entries(key), f"entries {key!r}")
            agree(sub.count_key(key), ref.count_key(key), f"count_key {key!r}")
            agree(sub.first(key), ref.first(key), f"first {key!r}")
            agree(sub.last(key), ref.last(key), f"last {key!r}")
            for i in range(-1, sub.count_key(key) + 2):
                agree(sub.at(key, i), ref.at(key, i), f"at {key!r} {i}")
            for pid in PIDS:
                agree(sub.values(key, pid), ref.values(key, pid), f"values {key!r} {pid!r}")
            for m_sub, m_ref in self.fixed_match:
                agree(sub.match(key, m_sub), ref.match(key, m_ref), f"match {key!r}")
                agree(sub.count_match(key, m_sub), ref.count_match(key, m_ref), f"count_match {key!r}")
        for pid in PIDS:
            agree(sub.keys(pid), ref.keys(pid), f"keys {pid!r}")
            agree(sub.pid_entries(pid), ref.pid_entries(pid), f"pid_entries {pid!r}")
            agree(sub.pid_rows_flat(pid), ref.pid_rows_flat(pid), f"pid_rows_flat {pid!r}")
            agree(sub.count_pid(pid), ref.count_pid(pid), f"count_pid {pid!r}")
        for m_sub, m_ref in self.fixed:
            agree(sub.select(m_sub), ref.select(m_ref), "select (fixed spec)")
            agree(sub.count_select(m_sub), ref.count_select(m_ref), "count_select (fixed spec)")


# Bounded so that the whole file runs well under a minute; no deadline (CI machines vary).
SETTINGS = settings(
    max_examples=60,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)


def load_core(name: str) -> ModuleType:
    if name == "python":
        return importlib.import_module("pgregistry._core_py")
    if os.environ.get("PGREGISTRY_PURE_PYTHON") == "1":
        pytest.skip("PGREGISTRY_PURE_PYTHON=1: the Cython table is not under test")
    return importlib.import_module("pgregistry._core")  # an ImportError errors the test


def machine(subject: ModuleType, reference: ModuleType | None) -> type[TableMachine]:
    """A machine testing `subject` against `reference` (a table module) or the `Model`."""
    attrs: dict[str, Any] = {
        "make_subject": staticmethod(subject.Table),
        "make_subject_matcher": staticmethod(subject.Matcher),
        "make_reference": staticmethod(reference.Table if reference else Model),
        "make_reference_matcher": staticmethod(reference.Matcher if reference else ModelMatcher),
    }
    return type(f"TableMachine_{subject.__name__.rsplit('.', 1)[-1]}", (TableMachine,), attrs)


@pytest.fixture(autouse=True)
def bounded_shrinking(monkeypatch: pytest.MonkeyPatch) -> None:
    """Report a failure within the 60 s per-test timeout.

    Shrinking a failing 30-step history can take minutes (hypothesis stops at
    ``MAX_SHRINKING_SECONDS``, 300 by default, and has no public setting for it); a
    test killed by the timeout would report nothing. 20 s still shrinks most
    histories to a handful of steps.
    """
    from hypothesis.internal.conjecture import engine

    monkeypatch.setattr(engine, "MAX_SHRINKING_SECONDS", 20, raising=False)


@pytest.fixture(params=["python", "cython"])
def core(request: pytest.FixtureRequest) -> ModuleType:
    return load_core(request.param)


@pytest.fixture
def cython_core() -> ModuleType:
    return load_core("cython")


def test_model(core: ModuleType) -> None:
    run_state_machine_as_test(machine(core, None), settings=SETTINGS)


def test_differential_cython(cython_core: ModuleType) -> None:
    run_state_machine_as_test(machine(cython_core, load_core("python")), settings=SETTINGS)


def test_model_agrees_with_itself_on_a_known_history() -> None:
    """A hand-checked history: guards the model itself against silly mistakes."""
    m = Model()
    assert m.insert("k", P1, 1, 5) is True
    assert m.insert("k", P2, 2, 6) is True
    assert m.insert("k", P1, 3, 7) is False
    assert m.update("k", P1, 9) == [(5, 1), (7, 3)]
    assert m.lookup("k") == [(P2, 2), (P1, 9), (P1, 9)]
    assert m.pop_latest("k", P1) == (7, 9)
    assert m.pid_entries(P1) == [("k", 9, 5)]
    assert m.select(ModelMatcher(check_spec([((V1, _, V2), [V2 > 5], [(V1, V2)])]))) == [("k", 9)]
    assert m.pop_pid(P1) == [("k", 9, 5)]
    assert m.groups() == ["k"]
    m.pop("k", P2, 6)
    assert m.groups() == [] and len(m) == 0
