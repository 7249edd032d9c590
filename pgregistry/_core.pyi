"""Type stubs and the contract of the registry table (layer 0).

Two implementations provide exactly this API and the same results, list order included:
``pgregistry._core`` (Cython, the fast path) and ``pgregistry._core_py`` (plain Python,
the reference model and the fallback). ``pgregistry._table`` picks one at import.

A `Table` holds rows ``(key, pid, value, tag)``. It is type-agnostic: keys, pids and
values are any hashable/any objects (the registry validates terms before inserting);
``tag`` is an int in the int64 range (`TypeError`/`OverflowError` otherwise), and
``(pid, tag)`` identifies a row: the caller keeps it unique (if it does not, methods
that name a row act on the first such row in key order). Values are stored by
reference, never copied. An unhashable key or pid passed to a method raises
`TypeError` and changes nothing.

Equal but distinguishable keys (``1``, ``1.0``, ``True``) share a group. Per-row results
(`rows`, `pid_entries`, `keys`, `WHOLE`, bindings) report the key object each row was
inserted with; `groups` and `snapshot` report the object the group was created with.

Orders (both implementations must produce them identically):

* *key order*: the rows of one key in insertion order; `Table.update` moves the rows it
  changes to the end, keeping their relative order.
* *pid order*: the rows of one pid in insertion order (`update` does not change it).
* *index order*: the rows of one key in an order that `at` reads in O(1). An insert
  appends the row; a removal moves the last row of the key's index order into the
  removed row's place (swap-remove); `update`/`update_row` do not change it.
* *group order*: keys in the order their group was created; a key whose last row goes
  away loses its place and gets a new one at the end when a row is inserted again.
* `select`/`count_select` visit rows as follows. If every clause has a literal key
  (``Clause.literal_key is not MISSING``): the distinct literal keys in order of first
  appearance among the clauses, each key's rows in key order. Else, if every clause has
  a literal pid: the distinct literal pids likewise, each pid's rows in pid order.
  Else: every key in group order, each key's rows in key order.

Match semantics (``Matcher``), for each visited row, clauses in order:

* the key, pid and value patterns must match: `PatAny` matches anything; `PatLit`
  matches ``x is lit or x == lit``; `PatVar` binds its slot if ``bind`` else compares
  like `PatLit` with the bound value; `PatTuple`/`PatList` match ``type(x) is
  tuple``/``list`` of equal length element-wise; `PatDict` matches ``type(x) is dict``
  holding every key of the pattern with a matching value. Patterns are matched key,
  pid, value, depth-first left to right (this decides which occurrence binds).
* every guard must evaluate to exactly ``True``; an exception (an `Exception`
  subclass) anywhere in it makes the whole guard false, whatever ``not``/``and``/``or``
  encloses it (``spec.OPERATORS["has_key"]`` and ``["size"]`` raise for an argument of
  the wrong type); an exception raised while comparing a *pattern* literal propagates
  (terms never raise there);
* the first clause that passes decides the row: in `select` its body is evaluated
  (every expression in order, the last is the result; an exception skips the row);
  `count_select` counts the row iff the result ``is True``. `match`, `count_match` and
  `pop_match` ignore bodies; `select`/`count_select` with a matcher built from
  `spec.check_match` (no body) raise `ValueError`. An unhashable literal key or pid in a
  head matches nothing.
* expressions: `ExprConst` is its value (the same object), `ExprVar` the slot,
  `ExprWhole` the tuple ``(key, pid, value)``, `ExprBindings` the list of all slots,
  `ExprTuple`/`ExprList`/`ExprDict` build a new container of evaluated items,
  `ExprOp` applies ``spec.OPERATORS[op]`` to the evaluated arguments, except ``and``
  and ``or`` (left to right; ``False``/``True`` respectively stops with that result,
  ``True``/``False`` goes on, anything else raises ``TypeError``; the end gives
  ``True``/``False``) and ``not`` (``True``→``False``, ``False``→``True``, else
  ``TypeError``).
"""

from typing import Any

from .spec import Clause

class Matcher:
    """A compiled match spec; build once and reuse (compiling costs microseconds)."""

    clauses: tuple[Clause, ...]
    def __init__(self, clauses: tuple[Clause, ...]) -> None: ...

class Table:
    def __init__(self) -> None: ...
    def __len__(self) -> int:
        """Number of rows."""
    def __contains__(self, key: Any) -> bool:
        """Whether `key` has at least one row."""

    # -- writes ---------------------------------------------------------------------
    def insert(self, key: Any, pid: Any, value: Any, tag: int) -> bool:
        """Append a row at the end of its key order and pid order.

        Returns True if it is the first row of `pid` (the caller then watches the pid).
        """
    def insert_flat(self, pid: Any, flat: list[Any]) -> bool:
        """`insert` of each ``key, value, tag`` triple of `flat` for `pid`, in order; True
        if the first was the first row of `pid`. A failing row raises and leaves the rows
        before it inserted."""
    def pop(self, key: Any, pid: Any, tag: int, default: Any = None) -> Any:
        """Remove the row ``(key, pid, tag)``; return its value, or `default` if absent."""
    def pop_latest(self, key: Any, pid: Any) -> tuple[int, Any] | None:
        """Remove the row of `pid` under `key` with the highest tag; ``(tag, value)`` or None."""
    def pop_pid(self, pid: Any) -> list[tuple[Any, Any, int]]:
        """Remove every row of `pid`; return ``[(key, value, tag)]`` in pid order.

        Costs O(rows of pid), never O(table).
        """
    def pop_match(self, key: Any, pid: Any, matcher: Matcher) -> list[tuple[int, Any]]:
        """Remove the rows of `pid` under `key` whose row matches; ``[(tag, value)]`` in key order."""
    def update(self, key: Any, pid: Any, value: Any) -> list[tuple[int, Any]]:
        """Set the value of every row of `pid` under `key`; move them to the end of the key order.

        Returns ``[(tag, old_value)]`` in their former key order; empty if none.
        """
    def update_row(self, key: Any, pid: Any, tag: int, value: Any, default: Any = None) -> Any:
        """Set the value of the row ``(key, pid, tag)`` and move it to the end of its key order.

        Returns the old value, or `default` (changing nothing) if there is no such row.
        """
    def clear(self) -> None:
        """Remove every row."""

    # -- reads ----------------------------------------------------------------------
    def lookup(self, key: Any) -> list[tuple[Any, Any]]:
        """``[(pid, value)]`` of `key` in key order; ``[]`` if none."""
    def pids(self, key: Any) -> list[Any]:
        """The pid of each row of `key`, in key order (a pid repeats once per row)."""
    def entries(self, key: Any) -> list[tuple[Any, Any, int]]:
        """``[(pid, value, tag)]`` of `key` in key order."""
    def values(self, key: Any, pid: Any) -> list[Any]:
        """Values of the rows of `pid` under `key`, in key order."""
    def keys(self, pid: Any) -> list[Any]:
        """Distinct keys of `pid`'s rows, in pid order of their first row."""
    def pid_entries(self, pid: Any) -> list[tuple[Any, Any, int]]:
        """``[(key, value, tag)]`` of `pid` in pid order."""
    def owners(self) -> list[Any]:
        """Distinct pids that have rows, in pid-group order: a pid's place is where its
        first row was inserted; a pid whose last row goes away loses its place."""
    def pid_rows_flat(self, pid: Any) -> list[Any]:
        """``[key, value, tag, key, value, tag, ...]`` of `pid` in pid order: what
        `pid_entries` returns, without a tuple per row (a scope sync sends this)."""
    def groups(self) -> list[Any]:
        """Distinct keys, in group order."""
    def count_key(self, key: Any) -> int: ...
    def count_pid(self, pid: Any) -> int: ...
    def at(self, key: Any, i: int) -> tuple[Any, Any] | None:
        """``(pid, value)`` of the row at place `i` (0-based) of `key`'s index order; None if
        `key` has no row or `i` is not in ``range(count_key(key))``. O(1)."""
    def first(self, key: Any) -> tuple[Any, Any] | None:
        """``(pid, value)`` of the first row of `key` in key order (the oldest); None if none."""
    def last(self, key: Any) -> tuple[Any, Any] | None:
        """``(pid, value)`` of the last row of `key` in key order (the newest); None if none."""
    def snapshot(self) -> dict[Any, list[tuple[Any, Any]]]:
        """``{key: [(pid, value)]}`` in group order, lists in key order."""
    def rows(self) -> list[tuple[Any, Any, Any, int]]:
        """Every row ``(key, pid, value, tag)``: keys in group order, rows in key order."""

    # -- match specs ----------------------------------------------------------------
    def match(self, key: Any, matcher: Matcher) -> list[tuple[Any, Any]]:
        """``[(pid, value)]`` of the rows of `key` that match, in key order."""
    def count_match(self, key: Any, matcher: Matcher) -> int: ...
    def select(self, matcher: Matcher) -> list[Any]:
        """The body result of every row that matches a clause (see the module docstring)."""
    def count_select(self, matcher: Matcher) -> int:
        """How many rows' body result ``is True``."""
