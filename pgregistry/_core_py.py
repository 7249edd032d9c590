"""The registry table in plain Python: the reference model and the fallback of ``_core``.

This module implements the contract written in ``_core.pyi`` (read that docstring for
the orders and the match semantics); ``pgregistry._table`` uses it when the Cython
extension is unavailable or ``PGREGISTRY_PURE_PYTHON=1``. Match specs are compiled to
closures by `pgregistry._match_py`.

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
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from ._match_py import Eval, Test, compile_body, compile_test
from .spec import (
    MISSING,
    Clause,
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
        self._tests: tuple[Test, ...] = tuple(map(compile_test, clauses))
        bodies = tuple(compile_body(c.body) for c in clauses)
        self._has_bodies = all(b is not None for b in bodies)
        self._pairs: tuple[tuple[Test, Eval | None], ...] = tuple(zip(self._tests, bodies))
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

    def insert_flat(self, pid: Any, flat: list[Any]) -> bool:
        """`insert` of each ``key, value, tag`` triple of `flat` for `pid`, in order; True
        if the first was the first row of `pid`. A failing row raises and leaves the rows
        before it inserted."""
        if len(flat) % 3:
            raise ValueError("insert_flat takes key, value, tag triples")
        first = False
        for i in range(0, len(flat), 3):
            made = self.insert(flat[i], pid, flat[i + 1], flat[i + 2])
            if i == 0:
                first = made
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
        return self._end(key, iter)

    def last(self, key: Any) -> tuple[Any, Any] | None:
        """``(pid, value)`` of the last row of `key` in key order (the newest); None if none."""
        return self._end(key, reversed)

    def _end(self, key: Any, walk: Callable[[_Rows], Iterator[_Row]]) -> tuple[Any, Any] | None:
        with self._lock:
            krows = self._keys.get(key)
            if krows is None:
                return None
            row = next(walk(krows))
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
