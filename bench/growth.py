"""How the table's costs grow: each figure at several sizes, per operation and per row.

Usage, from the repository root::

    .venv/bin/python bench/growth.py                      # everything (about a minute)
    .venv/bin/python bench/growth.py --only select --sizes-select 1000,10000

Figures (the Cython table, the pure twin where it finishes in reasonable time, and the
plain-dict baseline of ``_support.DictRegistry`` in the same process):

* ``lookup``: ``Table.lookup`` of a key holding 1, 10 or 1 000 entries.
* ``select``: ``select`` with the guard ``V3 > 0.9 * N`` over N rows (distinct int keys,
  int values, 10 % hits), N = 10^3 .. 10^6, against the dict comprehension.
* ``catchup``: what a new node does with a holder's sync round of N rows (100 rows per
  pid, parts of ``SYNC_PART_ROWS`` rows as the holder sends them): decode every part,
  check it (``parse_sync``) and apply it (``insert_flat``, the scope's quiet catch-up;
  ``insert`` row by row on a table without it, for a before/after comparison),
  N = 10^4 .. 10^6; "longest part" is the longest single part (decode + check + apply),
  which bounds how long the receiving loop is blocked at a time. The end-to-end figure
  over real sockets is ``bench/cluster.py --phases catchup``.

Each row gives the median of several runs, the cost per row (or per entry), and the
growth of that per-row cost from the smallest size: 1.0 is linear growth of the total.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _support import DictRegistry, extension_status, table_module  # noqa: E402

from pgregistry import wire  # noqa: E402
from pgregistry.scope import SYNC_PART_ROWS  # noqa: E402
from pgregistry.scope_checks import parse_sync  # noqa: E402
from pgregistry.spec import V1, V2, V3, check_spec  # noqa: E402
from pgregistry.terms import Pid  # noqa: E402

HOLDER = "h@127.0.0.1:4000"
ME = Pid("n@127.0.0.1:4001", 1)


def median_time(fn: Callable[[], Any], min_runs: int = 5, budget: float = 1.0) -> float:
    """Median seconds of `fn` over at least `min_runs` runs (more while under `budget`)."""
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < min_runs or (time.perf_counter() - start < budget and len(times) < 200):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def fmt(seconds: float) -> str:
    for scale, unit in ((1.0, "s"), (1e-3, "ms"), (1e-6, "us")):
        if seconds >= scale:
            return f"{seconds / scale:.3g} {unit}"
    return f"{seconds / 1e-9:.3g} ns"


def impls() -> list[str]:
    return ["cython", "python"] if extension_status() is None else ["python"]


def lookup_rows(sizes: list[int]) -> list[list[str]]:
    rows = []
    for n in sizes:
        cells = [f"lookup, {n} entries/key"]
        for impl in impls():
            t = table_module(impl).Table()
            for i in range(n):
                t.insert("group", ME, i, i + 1)
            cells.append(fmt(median_time(lambda t=t: t.lookup("group"), budget=0.3)))
        d = DictRegistry()
        for i in range(n):
            d.register("group", ME, i)
        cells.append(fmt(median_time(lambda d=d: d.lookup("group"), budget=0.3)))
        rows.append(cells)
    return rows


def select_rows(sizes: list[int], pure_max: int) -> list[list[str]]:
    rows = []
    first_per_row: float | None = None
    for n in sizes:
        bound = n * 9 // 10
        matcher_spec = check_spec([((V1, V2, V3), [V3 > bound], [V1])])
        cells = [f"select, {n:,} rows"]
        cy_time = None
        for impl in impls():
            if impl == "python" and n > pure_max:
                cells.append("-")
                continue
            core = table_module(impl)
            t = core.Table()
            for i in range(n):
                t.insert(i, ME, i, i + 1)
            m = core.Matcher(matcher_spec)
            took = median_time(lambda t=t, m=m: t.select(m))
            cells.append(fmt(took))
            cy_time = took if cy_time is None else cy_time
            del t
        d = DictRegistry()
        for i in range(n):
            d.register(i, ME, i)
        entries = d.entries
        base = median_time(lambda e=entries, b=bound: [k for k, es in e.items() for _p, v in es if v > b])
        cells.append(fmt(base))
        assert cy_time is not None
        per_row = cy_time / n
        first_per_row = first_per_row or per_row
        cells += [f"{cy_time / base:.2f}", fmt(per_row), f"{per_row / first_per_row:.2f}"]
        rows.append(cells)
    return rows


def sync_parts(n: int) -> list[bytes]:
    """The holder's sync round of `n` rows (100 per pid), encoded part by part."""
    parts = []
    i = part = 0
    while i < n:
        groups: list[list[Any]] = []
        rows = 0
        while i < n and rows < SYNC_PART_ROWS:
            pid = Pid(HOLDER, i // 100 + 1)
            flat: list[Any] = []
            for j in range(i, min(i + 100, n)):
                flat += [f"key-{j}", j, j + 1]
            groups.append([pid, flat])
            rows += len(flat) // 3
            i += len(flat) // 3
        parts.append(wire.encode(["sync", part, groups, i >= n]))
        part += 1
    return parts


def catchup_rows(sizes: list[int]) -> list[list[str]]:
    rows = []
    first_per_row: float | None = None
    for n in sizes:
        parts = sync_parts(n)
        best: tuple[float, float, float, float, float] | None = None
        for _run in range(3):
            table = table_module(impls()[0]).Table()
            decode = check = apply = longest = 0.0
            for data in parts:
                t0 = time.perf_counter()
                payload = wire.decode(data)
                t1 = time.perf_counter()
                _n, groups, _last = parse_sync(HOLDER, payload)
                t2 = time.perf_counter()
                for pid, flat in groups:
                    if hasattr(table, "insert_flat"):
                        table.insert_flat(pid, flat)
                    else:  # a table from before insert_flat: what the scope did then
                        for i in range(0, len(flat), 3):
                            table.insert(flat[i], pid, flat[i + 1], flat[i + 2])
                t3 = time.perf_counter()
                decode, check, apply = decode + t1 - t0, check + t2 - t1, apply + t3 - t2
                longest = max(longest, t3 - t0)
            assert len(table) == n
            total = decode + check + apply
            if best is None or total < best[0]:
                best = (total, decode, check, apply, longest)
            del table
        assert best is not None
        total, decode, check, apply, longest = best
        per_row = total / n
        first_per_row = first_per_row or per_row
        rows.append([f"catch-up, {n:,} rows ({len(parts)} parts)", fmt(total), fmt(decode), fmt(check),
                     fmt(apply), fmt(longest), fmt(per_row), f"{per_row / first_per_row:.2f}"])
    return rows


def render(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def sizes(text: str) -> list[int]:
    return [int(s) for s in text.split(",") if s]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", choices=["lookup", "select", "catchup"], action="append")
    parser.add_argument("--sizes-lookup", type=sizes, default=[1, 10, 1000])
    parser.add_argument("--sizes-select", type=sizes, default=[1000, 10_000, 100_000, 1_000_000])
    parser.add_argument("--sizes-catchup", type=sizes, default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--pure-max", type=int, default=100_000, help="largest select size run on the pure twin")
    args = parser.parse_args(argv)
    only = set(args.only or ["lookup", "select", "catchup"])
    names = impls()
    if "lookup" in only:
        print(render([["figure", *names, "dict"], *lookup_rows(args.sizes_lookup)]))
        print()
    if "select" in only:
        print(render([["figure", *names, "dict", "ours/dict", "ours per row", "per-row growth"],
                      *select_rows(args.sizes_select, args.pure_max)]))
        print()
    if "catchup" in only:
        print(render([["figure", "total", "decode", "check", "apply", "longest part", "per row",
                       "per-row growth"], *catchup_rows(args.sizes_catchup)]))
        print()
    print("per-row growth: the cost per row at this size over the cost per row at the smallest "
          "(1.0 = linear total); 'ours' is the " + names[0] + " table.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
