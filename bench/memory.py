"""Memory per registry entry at 1 000 000 entries: Cython table, pure twin, dict baseline.

Run ``.venv/bin/python bench/memory.py`` from the repository root (``--help`` for
options). Every measurement runs in a fresh interpreter (a child of this script), so
nothing allocated by one implementation, or by an earlier run, skews another.

What one child measures, for one implementation and one counter:

1. It starts a node (``async with Node(...)``; the main task is a process) and the
   registry (``impl=cython``/``python``, via ``_support.make_registry``) or a
   `DictRegistry` (``impl=dict``), then takes reading **r0**.
2. It makes every object the entries will refer to: ``P`` processes (their pids), the
   keys (``str``) and the ``N`` values (``int`` objects, one per entry), and takes
   reading **r1**.
3. It inserts the ``N`` entries (``register_name(key, pid, value)``, or
   ``DictRegistry.register``), drops its own lists of keys and values, and takes
   reading **r2**.

The lists that hold the keys and values until they are inserted are freed before r2
(their exact size, ``sys.getsizeof``, is taken off r1). ``objects = r1 - lists - r0``
is what the keys, values, pids and processes themselves cost; ``total B/entry =
(r2 - r0) / N`` is everything the entries cost (objects included) and ``table B/entry =
(r2 - r0 - objects) / N`` what the registry's own structures cost (rows, indexes,
per-row tags, containers). Readings are taken after ``gc.collect()``.

The two counters (each in its own child, since tracing memory costs memory):

* ``rss``: resident set size from ``/proc/self/statm``. Sees every allocation,
  C ``malloc`` of an extension included, plus allocator slack (pymalloc arenas, malloc
  fragmentation, dict/list over-allocation).
* ``tracemalloc``: bytes currently traced by `tracemalloc`. Sees allocations through
  CPython's allocators (``PyMem_*``/``PyObject_*``, including ``PyMem_RawMalloc``)
  without allocator slack; it does **not** see plain C ``malloc``/``calloc`` calls, so
  for the Cython table it is a lower bound unless the table allocates through
  ``PyMem_*`` (the RSS figure is the one to trust there).

Two shapes of 1 000 000 entries, both held by ``P = 1000`` processes (1000 entries each):
``distinct`` (1 000 000 keys, one entry each, like unique names) and ``groups`` (1000 keys
of 1000 entries each, one per process, like process groups). The child also reports the
time the inserts took (GC included) and how many GC-tracked objects each entry added.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import resource
import subprocess
import sys
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _support import DictRegistry, extension_status, make_registry  # noqa: E402

from pgregistry.node import Node  # noqa: E402
from pgregistry.process import receive  # noqa: E402

IMPLS = ("cython", "python", "dict")
COUNTERS = ("rss", "tracemalloc")
SHAPES = ("distinct", "groups")
PROCESSES = 1000
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


def rss_bytes() -> int:
    """The current resident set size of this process, in bytes."""
    with open("/proc/self/statm", encoding="ascii") as f:
        return int(f.read().split()[1]) * PAGE_SIZE


def _reading(counter: str) -> int:
    """Collect garbage, then read `counter` (``rss`` or ``tracemalloc``), in bytes."""
    gc.collect()
    if counter == "tracemalloc":
        return tracemalloc.get_traced_memory()[0]
    return rss_bytes()


def _gc_tracked() -> int:
    """How many objects the cyclic GC tracks now."""
    return len(gc.get_objects())


async def _idle() -> None:
    """Body of a process that holds entries: it only waits."""
    await receive()


async def _child(impl: str, counter: str, shape: str, entries: int) -> None:
    """Measure one implementation with one counter, print the result as one JSON line
    and end the interpreter at once (tearing down a million entries would only cost
    time); see the module docstring."""
    async with Node("mem") as node:
        insert: Callable[[Any, Any, Any], Any]
        if impl == "dict":
            registry = DictRegistry()
            insert = registry.register
            count: Callable[[], int] = lambda: sum(map(len, registry.entries.values()))  # noqa: E731
        else:
            reg = make_registry(node, "mem", impl)
            insert = reg.register_name
            count = reg.count
        r0 = _reading(counter)

        pids = [node.spawn(_idle) for _ in range(PROCESSES)]
        per_process = entries // PROCESSES
        n = per_process * PROCESSES
        distinct = shape == "distinct"
        # Entry j: process j // per_process (its rows are inserted together), value j, key
        # ``key-j`` (distinct) or ``group-(j % per_process)`` (groups).
        values = list(range(n))  # n int objects (0..256 are shared singletons)
        keys = [f"key-{i}" for i in range(n)] if distinct else [f"group-{i}" for i in range(per_process)]
        # The lists that keep the objects alive until they are inserted are freed before
        # r2 (big list arrays go back to the OS); their exact size corrects r1.
        holders = sys.getsizeof(values) + (sys.getsizeof(keys) if distinct else 0)
        r1 = _reading(counter)
        tracked1 = _gc_tracked()

        start = time.perf_counter()
        for p, pid in enumerate(pids):
            lo = p * per_process
            for key, value in zip(keys[lo:lo + per_process] if distinct else keys, values[lo:lo + per_process]):
                insert(key, pid, value)
        elapsed = time.perf_counter() - start
        assert count() == n
        del values
        if distinct:
            del keys

        r2 = _reading(counter)
        tracked2 = _gc_tracked()
        objects = r1 - holders - r0  # keys, values, pids and processes themselves
        result = {
            "impl": impl, "counter": counter, "shape": shape, "entries": n,
            "table_bytes_per_entry": (r2 - r0 - objects) / n,
            "total_bytes_per_entry": (r2 - r0) / n,
            "objects_bytes_per_entry": objects / n,
            "insert_seconds": elapsed,
            "gc_tracked_per_entry": (tracked2 - tracked1) / n,
            "max_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        }
        print(json.dumps(result), flush=True)
        os._exit(0)


def run_child(impl: str, counter: str, shape: str, entries: int) -> dict[str, Any]:
    """Run one measurement in a fresh interpreter and return its result."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", impl, counter, shape, "--entries", str(entries)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"memory child {impl}/{counter}/{shape} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def measure(impls: list[str], counters: list[str], shapes: list[str], entries: int,
            progress: Callable[[str], None] = lambda _s: None) -> list[dict[str, Any]]:
    """Every requested (shape, impl, counter) combination, each in its own child."""
    results = []
    for shape in shapes:
        for impl in impls:
            for counter in counters:
                progress(f"memory: {shape} {impl} {counter}")
                results.append(run_child(impl, counter, shape, entries))
    return results


def format_table(results: list[dict[str, Any]]) -> str:
    """The results as a plain-text table."""
    head = ("shape", "impl", "counter", "table B/entry", "total B/entry", "objects B/entry",
            "GC objs/entry", "insert 1M s")
    rows = [head]
    for r in results:
        rows.append((r["shape"], r["impl"], r["counter"], f"{r['table_bytes_per_entry']:.0f}",
                     f"{r['total_bytes_per_entry']:.0f}", f"{r['objects_bytes_per_entry']:.0f}",
                     f"{r['gc_tracked_per_entry']:.2f}", f"{r['insert_seconds']:.2f}"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = [" | ".join(cell.ljust(w) for cell, w in zip(row, widths)) for row in rows]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Command line: measure, print the table, optionally write JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--entries", type=int, default=1_000_000, help="entries to insert (default 1 000 000)")
    parser.add_argument("--impl", action="append", choices=IMPLS, help="implementation (repeatable; default all)")
    parser.add_argument("--counter", action="append", choices=COUNTERS, help="counter (repeatable; default both)")
    parser.add_argument("--shape", action="append", choices=SHAPES, help="shape (repeatable; default both)")
    parser.add_argument("--json", type=Path, help="also write the results to this JSON file")
    parser.add_argument("--child", nargs=3, metavar=("IMPL", "COUNTER", "SHAPE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child:
        impl, counter, shape = args.child
        if counter == "tracemalloc":
            tracemalloc.start()
        asyncio.run(_child(impl, counter, shape, args.entries))
        return 1  # not reached: the child exits once it has printed its result

    impls = args.impl or list(IMPLS)
    if "cython" in impls and extension_status() is not None:
        print(f"skipping the Cython table: {extension_status()}", file=sys.stderr)
        impls.remove("cython")
    results = measure(impls, args.counter or list(COUNTERS), args.shape or list(SHAPES), args.entries,
                      progress=lambda s: print(s, file=sys.stderr, flush=True))
    print(format_table(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
