"""The registry table in plain Python: the reference model and the fallback of ``_core``.

This module implements the contract written in ``_core.pyi`` (read that docstring for
the orders and the match semantics); ``pgregistry._table`` uses it when the Cython
extension is unavailable or ``PGREGISTRY_PURE_PYTHON=1``.

Data structure
--------------
A row is a small slotted object `_Row` ``(key, pid, value, tag, seq)``. It keeps the
key and pid objects it was inserted with, by reference, and ``seq``: a table-wide
counter stamped when the row is appended to its key order (on insert and on every
move to the end), so sorting some rows of one key by ``seq`` gives their key order.

Two indexes hold every row once each::

    _keys: dict[key, _Rows]     key order of each key; the dict's own order is group order
    _pids: dict[pid, _Rows]     pid order of each pid

and each key's `_Rows` keeps ``arr``, a list of its rows in *index order* (``_Row.kpos``
is a row's place in it): an insert appends, a removal moves the list's last row into the
removed row's place (swap-remove), an update changes nothing. The list is made with the
key's second row (a key of one row has ``arr`` None, its row at place 0). `at` reads one place in
O(1); the C table keeps the same array, so both give the same answer.

A `_Rows` is an insertion-ordered set of rows: a ``dict`` whose keys are rows (hashed
by identity) and whose values are ``None``. Appending is ``d[row] = None``, removing one
row is ``del d[row]`` and moving a row to the end is a delete plus an append, all O(1).
Group order comes for free from ``_keys``: a new key is appended, a key whose last row
goes is deleted, and so comes back at the end. The key a group is reported under
(`groups`, `snapshot`) is the key object of the row that created the group; per-row
reads (`rows`, `pid_entries`, `keys`, ``WHOLE``) report each row's own key object. The
two differ only for keys that are equal but not identical (``1``, ``1.0``, ``True``),
exactly as in a ``dict``.

Costs: `insert`, `lookup` of one key and `pop_pid` are proportional to the rows
involved. `pop`, `pop_latest`, `pop_match`, `update`, `update_row` and `values` walk the
shorter of the key's rows and the pid's rows, testing membership in the other index
by identity (O(1)); when they walk the pid's rows the hits are sorted by ``seq``. No
write scans the table. A CPython dict does not shrink when entries are deleted (its
iteration then skips the holes), so every container counts its deletions and is
compacted when they exceed four times its size: amortized O(1), and iteration stays
proportional to the live rows.

Match specs
-----------
`Matcher` compiles every clause once into Python closures: the head into one test
function ``(key, pid, value) -> slots | None`` and the body into one evaluator
``slots -> result``. The slot list is ``[key, pid, value, var0, var1, ...]``, so
``WHOLE`` is ``slots[0:3]`` as a tuple and ``BINDINGS`` is ``slots[3:]``. Nothing
walks the normalized node tree per row.

Concurrency: reads may come from any thread while the loop thread writes (see docs/contract.md, "Threads"),
and pure-Python iteration can be interrupted by a thread switch, so every operation
that reads more than one index entry runs under the table's lock; each operation is
therefore atomic.

Where ``_core.pyi`` is silent (both implementations, tested in ``tests/test_table.py``)
--------------------------------------------------------------------------------------
* Keys and pids are dict keys: "equal" means ``hash`` and ``==`` as in a ``dict``
  (``1``, ``1.0`` and ``True`` are one key). An unhashable key or pid passed to a
  method raises `TypeError` and changes nothing.
* Group key vs row key: see "Data structure" above.
* `select`/`count_select` with a clause that has no body (made by ``check_match``)
  raise `ValueError`: there is no result to return. `match`, `count_match` and
  `pop_match` test the whole head (key and pid patterns too), not only the value.
* Literal keys (or pids) of the clauses are made distinct as dict keys, so a row is
  visited once even if ``1`` and ``1.0`` both appear; an unhashable literal (a list)
  visits nothing, which is what a scan would find.
* `pop_latest` with two rows of the same tag (the caller keeps tags unique) removes
  the first in key order; `pop`/`update_row` likewise take the first in key order.
"""

from __future__ import annotations

import itertools
import operator
import threading
from collections.abc import Callable, Iterable
from typing import Any

from .spec import (
    MISSING,
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

__all__ = ["Table", "Matcher"]

# A container is compacted once it has seen more than this many deletions and more
# than four times as many deletions as it has rows left.
_COMPACT_MIN = 32


class _Row:
    """One row. ``seq`` orders the rows of one key (see the module docstring)."""

    __slots__ = ("key", "pid", "value", "tag", "seq", "kpos")

    def __init__(self, key: Any, pid: Any, value: Any, tag: int, seq: int) -> None:
        self.key = key
        self.pid = pid
        self.value = value
        self.tag = tag
        self.seq = seq
        self.kpos = 0

    def __repr__(self) -> str:
        return f"_Row({short_repr(self.key)}, {short_repr(self.pid)}, {short_repr(self.value)}, {short_repr(self.tag)})"


class _Rows(dict["_Row", None]):
    """An insertion-ordered set of rows, with a count of deletions since its last compaction.

    A key's container also holds ``arr``, its rows in index order, from its second row
    on (None while it has one row, which is then place 0; a pid's container has none).
    """

    __slots__ = ("removed", "arr")

    removed: int
    arr: list[_Row] | None


def _new_rows() -> _Rows:
    rows = _Rows()
    rows.removed = 0
    return rows


def _unindex(krows: _Rows, row: _Row) -> None:
    """Take `row` out of its key's index order: the last row takes its place (swap-remove)."""
    arr = krows.arr
    if arr is None:  # the key's only row: the key goes with it
        return
    last = arr.pop()
    if last is not row:
        pos = row.kpos
        arr[pos] = last
        last.kpos = pos


def _discard(rows: _Rows, row: _Row) -> None:
    """Remove `row` from `rows`, compacting the dict when deletions have piled up."""
    del rows[row]
    removed = rows.removed + 1
    if removed > _COMPACT_MIN and removed > 4 * len(rows):
        kept = list(rows)
        rows.clear()
        rows.update(dict.fromkeys(kept))
        removed = 0
    rows.removed = removed


_seq_of: Callable[[_Row], int] = operator.attrgetter("seq")

_INT64_MIN = -(2**63)
_INT64_MAX = 2**63 - 1


def _tag(tag: Any) -> int:
    """`tag` as the C table reads it: an integer (``__index__``) in the int64 range, as a plain int.

    `TypeError` for anything else, `OverflowError` out of range, as the C table raises.
    """
    if type(tag) is not int:
        tag = operator.index(tag)
    if not _INT64_MIN <= tag <= _INT64_MAX:
        raise OverflowError("int too big to convert")
    return tag


# --------------------------------------------------------------------------------------
# Match-spec compilation
# --------------------------------------------------------------------------------------

# Index of the first variable in a slot list ``[key, pid, value, var0, var1, ...]``.
_BASE = 3

_PatFn = Callable[[Any, list], bool]
_Eval = Callable[[list], Any]
_Test = Callable[[Any, Any, Any], list | None]

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


def _junction(args: tuple[_Eval, ...], decisive: bool, name: str) -> _Eval:
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


def _and(args: tuple[_Eval, ...]) -> _Eval:
    return _junction(args, False, "and")


def _or(args: tuple[_Eval, ...]) -> _Eval:
    return _junction(args, True, "or")


def _not(arg: _Eval) -> _Eval:
    def not_(s: list) -> bool:
        r = arg(s)
        if r is True:
            return False
        if r is False:
            return True
        raise TypeError(f"not: operand is {type(r).__name__}, not a bool")

    return not_


def _apply(fn: Callable[..., Any], nodes: tuple, args: tuple[_Eval, ...]) -> _Eval:
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


def _compile_expr(node: Any) -> _Eval:
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


def _compile_test(clause: Clause) -> _Test:
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


def _compile_body(body: tuple) -> _Eval | None:
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


def _distinct(literals: Iterable[Any]) -> list[Any]:
    """Distinct literals in order of first appearance, compared as dict keys.

    An unhashable literal (a list) is dropped: it equals no key or pid in the index,
    so a scan would not match it either.
    """
    seen: dict[Any, None] = {}
    for x in literals:
        try:
            seen.setdefault(x, None)
        except TypeError:
            continue
    return list(seen)


class Matcher:
    """A compiled match spec; build once and reuse (compiling costs microseconds)."""

    __slots__ = ("clauses", "_tests", "_pairs", "_has_bodies", "_literal_keys", "_literal_pids")

    clauses: tuple[Clause, ...]

    def __init__(self, clauses: tuple[Clause, ...]) -> None:
        clauses = tuple(clauses)
        for c in clauses:
            if type(c) is not Clause:
                raise TypeError(f"Matcher takes spec.Clause objects (from check_spec/check_match), "
                                f"got {short_repr(c, 80)}")
        self.clauses = clauses
        self._tests: tuple[_Test, ...] = tuple(map(_compile_test, clauses))
        bodies = tuple(_compile_body(c.body) for c in clauses)
        self._has_bodies = all(b is not None for b in bodies)
        self._pairs: tuple[tuple[_Test, _Eval | None], ...] = tuple(zip(self._tests, bodies))
        self._literal_keys: list[Any] | None = None
        self._literal_pids: list[Any] | None = None
        if all(c.literal_key is not MISSING for c in clauses):
            self._literal_keys = _distinct(c.literal_key for c in clauses)
        elif all(c.literal_pid is not MISSING for c in clauses):
            self._literal_pids = _distinct(c.literal_pid for c in clauses)

    def _test(self, row: _Row) -> bool:
        """Whether some clause's head and guards pass for `row` (bodies are ignored)."""
        k, p, v = row.key, row.pid, row.value
        for test in self._tests:
            if test(k, p, v) is not None:
                return True
        return False

    def __repr__(self) -> str:
        return f"<Matcher of {len(self.clauses)} clause(s)>"


def _need_bodies(matcher: Matcher, what: str) -> None:
    if not matcher._has_bodies:
        raise ValueError(
            f"{what} needs a body in every clause: build the matcher with spec.check_spec; "
            "check_match clauses have none"
        )


# --------------------------------------------------------------------------------------
# The table
# --------------------------------------------------------------------------------------

class Table:
    """Rows ``(key, pid, value, tag)`` indexed by key and by pid; see ``_core.pyi``."""

    __slots__ = ("_keys", "_pids", "_n", "_seq", "_lock", "_keys_removed", "_pids_removed")

    def __init__(self) -> None:
        self._keys: dict[Any, _Rows] = {}
        self._pids: dict[Any, _Rows] = {}
        self._n = 0
        self._seq: Callable[[], int] = itertools.count().__next__
        self._lock = threading.Lock()
        self._keys_removed = 0
        self._pids_removed = 0

    def __len__(self) -> int:
        """Number of rows."""
        return self._n

    def __contains__(self, key: Any) -> bool:
        """Whether `key` has at least one row."""
        return key in self._keys

    def __repr__(self) -> str:
        return f"<pgregistry._core_py.Table: {self._n} rows, {len(self._keys)} keys, {len(self._pids)} pids>"

    # -- internals (the caller holds the lock) ------------------------------------------

    def _drop_key(self, key: Any) -> None:
        del self._keys[key]
        self._keys_removed += 1
        if self._keys_removed > _COMPACT_MIN and self._keys_removed > 4 * len(self._keys):
            self._keys = dict(self._keys)
            self._keys_removed = 0

    def _drop_pid(self, pid: Any) -> None:
        del self._pids[pid]
        self._pids_removed += 1
        if self._pids_removed > _COMPACT_MIN and self._pids_removed > 4 * len(self._pids):
            self._pids = dict(self._pids)
            self._pids_removed = 0

    def _remove(self, row: _Row, key: Any, krows: _Rows, pid: Any, prows: _Rows) -> None:
        """Remove `row` from both indexes; `key`/`pid` are what ``krows``/``prows`` are filed under."""
        _unindex(krows, row)
        _discard(krows, row)
        if not krows:
            self._drop_key(key)
        _discard(prows, row)
        if not prows:
            self._drop_pid(pid)
        self._n -= 1

    def _move_to_end(self, row: _Row, krows: _Rows) -> None:
        del krows[row]
        krows[row] = None
        row.seq = self._seq()

    def _both(self, key: Any, pid: Any) -> tuple[_Rows, _Rows] | None:
        krows = self._keys.get(key)
        if krows is None:
            return None
        prows = self._pids.get(pid)
        if prows is None:
            return None
        return krows, prows

    def _locate(self, key: Any, pid: Any, tag: int) -> tuple[_Row, _Rows, _Rows] | None:
        """The row ``(key, pid, tag)`` with its key's and its pid's containers, or None."""
        both = self._both(key, pid)
        if both is None:
            return None
        krows, prows = both
        row = self._find(krows, prows, tag)
        return None if row is None else (row, krows, prows)

    @staticmethod
    def _rows_of(krows: _Rows, prows: _Rows) -> list[_Row]:
        """The rows in both containers, in key order, walking the shorter one."""
        if len(krows) <= len(prows):
            return [r for r in krows if r in prows]
        found = [r for r in prows if r in krows]
        if len(found) > 1:
            found.sort(key=_seq_of)
        return found

    @staticmethod
    def _find(krows: _Rows, prows: _Rows, tag: int) -> _Row | None:
        """The first row in both containers with `tag`, walking the shorter one."""
        if len(krows) <= len(prows):
            for r in krows:
                if r.tag == tag and r in prows:
                    return r
            return None
        found = None
        for r in prows:
            if r.tag == tag and r in krows and (found is None or r.seq < found.seq):
                found = r
        return found

    def _visit(self, matcher: Matcher) -> list[_Rows]:
        """The containers `select` walks, in the order of the contract."""
        if matcher._literal_keys is not None:
            index, wanted = self._keys, matcher._literal_keys
        elif matcher._literal_pids is not None:
            index, wanted = self._pids, matcher._literal_pids
        else:
            return list(self._keys.values())
        found = []
        for x in wanted:
            rows = index.get(x)
            if rows is not None:
                found.append(rows)
        return found

    # -- writes ---------------------------------------------------------------------

    def insert(self, key: Any, pid: Any, value: Any, tag: int) -> bool:
        """Append a row at the end of its key order and pid order.

        Returns True if it is the first row of `pid` (the caller then watches the pid).
        """
        tag = _tag(tag)
        with self._lock:
            row = _Row(key, pid, value, tag, self._seq())
            krows = self._keys.get(key)
            prows = self._pids.get(pid)
            if krows is None:
                krows = self._keys[key] = _new_rows()
                krows.arr = None  # one row: place 0 is the row itself
            else:
                arr = krows.arr
                if arr is None:
                    arr = krows.arr = [next(iter(krows))]
                row.kpos = len(arr)
                arr.append(row)
            krows[row] = None
            first = prows is None
            if first:
                prows = self._pids[pid] = _new_rows()
            prows[row] = None  # type: ignore[index]
            self._n += 1
            return first

    def pop(self, key: Any, pid: Any, tag: int, default: Any = None) -> Any:
        """Remove the row ``(key, pid, tag)``; return its value, or `default` if absent."""
        tag = _tag(tag)
        with self._lock:
            found = self._locate(key, pid, tag)
            if found is None:
                return default
            row, krows, prows = found
            self._remove(row, key, krows, pid, prows)
            return row.value

    def pop_latest(self, key: Any, pid: Any) -> tuple[int, Any] | None:
        """Remove the row of `pid` under `key` with the highest tag; ``(tag, value)`` or None.

        Should two such rows share a tag (the caller keeps tags unique), the first in
        key order goes.
        """
        with self._lock:
            both = self._both(key, pid)
            if both is None:
                return None
            krows, prows = both
            best: _Row | None = None
            for r in self._rows_of(krows, prows):
                if best is None or r.tag > best.tag:
                    best = r
            if best is None:
                return None
            self._remove(best, key, krows, pid, prows)
            return best.tag, best.value

    def pop_pid(self, pid: Any) -> list[tuple[Any, Any, int]]:
        """Remove every row of `pid`; return ``[(key, value, tag)]`` in pid order.

        Costs O(rows of pid), never O(table).
        """
        with self._lock:
            prows = self._pids.get(pid)
            if prows is None:
                return []
            self._drop_pid(pid)
            out = []
            for row in prows:
                k = row.key
                krows = self._keys[k]  # not hoisted: `_drop_key` may compact `_keys`
                _unindex(krows, row)
                _discard(krows, row)
                if not krows:
                    self._drop_key(k)
                out.append((k, row.value, row.tag))
            self._n -= len(out)
            return out

    def pop_match(self, key: Any, pid: Any, matcher: Matcher) -> list[tuple[int, Any]]:
        """Remove the rows of `pid` under `key` whose row matches; ``[(tag, value)]`` in key order."""
        with self._lock:
            both = self._both(key, pid)
            if both is None:
                return []
            krows, prows = both
            hits = [r for r in self._rows_of(krows, prows) if matcher._test(r)]
            for r in hits:
                # `_remove` may drop the key or pid entry; the containers stay valid to read.
                self._remove(r, key, krows, pid, prows)
            return [(r.tag, r.value) for r in hits]

    def update(self, key: Any, pid: Any, value: Any) -> list[tuple[int, Any]]:
        """Set the value of every row of `pid` under `key`; move them to the end of the key order.

        Returns ``[(tag, old_value)]`` in their former key order; empty if none.
        """
        with self._lock:
            both = self._both(key, pid)
            if both is None:
                return []
            krows, prows = both
            out = []
            for r in self._rows_of(krows, prows):
                out.append((r.tag, r.value))
                r.value = value
                self._move_to_end(r, krows)
            return out

    def update_row(self, key: Any, pid: Any, tag: int, value: Any, default: Any = None) -> Any:
        """Set the value of the row ``(key, pid, tag)`` and move it to the end of its key order.

        Returns the old value, or `default` (changing nothing) if there is no such row.
        """
        tag = _tag(tag)
        with self._lock:
            found = self._locate(key, pid, tag)
            if found is None:
                return default
            row, krows, _prows = found
            old = row.value
            row.value = value
            self._move_to_end(row, krows)
            return old

    def clear(self) -> None:
        """Remove every row."""
        with self._lock:
            self._keys = {}
            self._pids = {}
            self._n = 0
            self._keys_removed = 0
            self._pids_removed = 0

    # -- reads ----------------------------------------------------------------------

    def lookup(self, key: Any) -> list[tuple[Any, Any]]:
        """``[(pid, value)]`` of `key` in key order; ``[]`` if none."""
        with self._lock:
            krows = self._keys.get(key)
            if krows is None:
                return []
            return [(r.pid, r.value) for r in krows]

    def pids(self, key: Any) -> list[Any]:
        """The pid of each row of `key`, in key order (a pid repeats once per row)."""
        with self._lock:
            krows = self._keys.get(key)
            if krows is None:
                return []
            return [r.pid for r in krows]

    def entries(self, key: Any) -> list[tuple[Any, Any, int]]:
        """``[(pid, value, tag)]`` of `key` in key order."""
        with self._lock:
            krows = self._keys.get(key)
            if krows is None:
                return []
            return [(r.pid, r.value, r.tag) for r in krows]

    def values(self, key: Any, pid: Any) -> list[Any]:
        """Values of the rows of `pid` under `key`, in key order."""
        with self._lock:
            both = self._both(key, pid)
            if both is None:
                return []
            return [r.value for r in self._rows_of(*both)]

    def keys(self, pid: Any) -> list[Any]:
        """Distinct keys of `pid`'s rows, in pid order of their first row."""
        with self._lock:
            prows = self._pids.get(pid)
            if prows is None:
                return []
            return list(dict.fromkeys([r.key for r in prows]))

    def pid_entries(self, pid: Any) -> list[tuple[Any, Any, int]]:
        """``[(key, value, tag)]`` of `pid` in pid order."""
        with self._lock:
            prows = self._pids.get(pid)
            if prows is None:
                return []
            return [(r.key, r.value, r.tag) for r in prows]

    def owners(self) -> list[Any]:
        """Distinct pids that have rows, in pid-group order (like `groups` for keys)."""
        with self._lock:
            return list(self._pids)

    def pid_rows_flat(self, pid: Any) -> list[Any]:
        """``[key, value, tag, key, value, tag, ...]`` of `pid` in pid order (no tuples)."""
        with self._lock:
            prows = self._pids.get(pid)
            if prows is None:
                return []
            out: list[Any] = []
            for r in prows:
                out += (r.key, r.value, r.tag)
            return out

    def groups(self) -> list[Any]:
        """Distinct keys, in group order."""
        with self._lock:
            return list(self._keys)

    def count_key(self, key: Any) -> int:
        krows = self._keys.get(key)
        return 0 if krows is None else len(krows)

    def count_pid(self, pid: Any) -> int:
        prows = self._pids.get(pid)
        return 0 if prows is None else len(prows)

    def at(self, key: Any, i: int) -> tuple[Any, Any] | None:
        """``(pid, value)`` of the row at place `i` of `key`'s index order; None if out of range."""
        if type(i) is not int:
            i = operator.index(i)
        with self._lock:
            krows = self._keys.get(key)
            if krows is None:
                return None
            arr = krows.arr
            if arr is None:
                if i != 0:
                    return None
                row = next(iter(krows))
            elif 0 <= i < len(arr):
                row = arr[i]
            else:
                return None
            return row.pid, row.value

    def first(self, key: Any) -> tuple[Any, Any] | None:
        """``(pid, value)`` of the first row of `key` in key order (the oldest); None if none."""
        with self._lock:
            krows = self._keys.get(key)
            if krows is None:
                return None
            row = next(iter(krows))
            return row.pid, row.value

    def last(self, key: Any) -> tuple[Any, Any] | None:
        """``(pid, value)`` of the last row of `key` in key order (the newest); None if none."""
        with self._lock:
            krows = self._keys.get(key)
            if krows is None:
                return None
            row = next(reversed(krows))
            return row.pid, row.value

    def snapshot(self) -> dict[Any, list[tuple[Any, Any]]]:
        """``{key: [(pid, value)]}`` in group order, lists in key order."""
        with self._lock:
            return {k: [(r.pid, r.value) for r in krows] for k, krows in self._keys.items()}

    def rows(self) -> list[tuple[Any, Any, Any, int]]:
        """Every row ``(key, pid, value, tag)``: keys in group order, rows in key order."""
        with self._lock:
            return [(r.key, r.pid, r.value, r.tag) for krows in self._keys.values() for r in krows]

    # -- match specs ----------------------------------------------------------------

    def match(self, key: Any, matcher: Matcher) -> list[tuple[Any, Any]]:
        """``[(pid, value)]`` of the rows of `key` that match, in key order."""
        with self._lock:
            krows = self._keys.get(key)
            if krows is None:
                return []
            test = matcher._test
            return [(r.pid, r.value) for r in krows if test(r)]

    def count_match(self, key: Any, matcher: Matcher) -> int:
        with self._lock:
            krows = self._keys.get(key)
            if krows is None:
                return 0
            test = matcher._test
            n = 0
            for r in krows:
                if test(r):
                    n += 1
            return n

    def select(self, matcher: Matcher) -> list[Any]:
        """The body result of every row that matches a clause (see the module docstring)."""
        _need_bodies(matcher, "select")
        out: list[Any] = []
        append = out.append
        pairs = matcher._pairs
        with self._lock:
            if len(pairs) == 1:
                ((test, body),) = pairs
                for krows in self._visit(matcher):
                    for r in krows:
                        s = test(r.key, r.pid, r.value)
                        if s is not None:
                            try:
                                append(body(s))  # type: ignore[misc]
                            except Exception:  # a body that raises skips the row
                                pass
                return out
            for krows in self._visit(matcher):
                for r in krows:
                    k, p, v = r.key, r.pid, r.value
                    for test, body in pairs:
                        s = test(k, p, v)
                        if s is not None:
                            try:
                                append(body(s))  # type: ignore[misc]
                            except Exception:
                                pass
                            break
            return out

    def count_select(self, matcher: Matcher) -> int:
        """How many rows' body result ``is True``."""
        _need_bodies(matcher, "count_select")
        n = 0
        pairs = matcher._pairs
        with self._lock:
            for krows in self._visit(matcher):
                for r in krows:
                    k, p, v = r.key, r.pid, r.value
                    for test, body in pairs:
                        s = test(k, p, v)
                        if s is not None:
                            try:
                                if body(s) is True:  # type: ignore[misc]
                                    n += 1
                            except Exception:
                                pass
                            break
            return n
