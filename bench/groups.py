"""Group picks: what `Registry.pick` costs on one group, beside `random.choice` on a list.

    .venv/bin/python bench/groups.py                     # 1 000 entries, both tables
    .venv/bin/python bench/groups.py --entries 100000 --table cython

One node runs a duplicate registry; the group is `--entries` entries under one key,
half of them this node's processes and half another node's (two nodes in this
process, connected), so the local/remote modes have both kinds to choose from. Every
line is the best of `--rounds` timings of `--calls` calls, per call:

* baseline: ``random.choice(members)`` on a list of the group's pids (what a pick
  costs at the least in CPython: one random draw and one list index);
* pick(how) for every ``how``; random, oldest, newest and round_robin read one place
  of the table's per-key index (O(1)); local, remote, closest and furthest draw a few
  entries at random before they walk the group, so with half the entries of each kind
  they rarely walk.
* pick(how, exclude=[one pid]): the filtered path.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import random
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import pgregistry._table as _table  # noqa: E402
from pgregistry.node import Node  # noqa: E402
from pgregistry.process import receive  # noqa: E402
from pgregistry.registry import PICK_MODES, Registry  # noqa: E402

TABLES = {"cython": "pgregistry._core", "python": "pgregistry._core_py"}


def best_per_call(fn: Callable[[], Any], calls: int, rounds: int) -> float:
    """The best of `rounds` timings of `calls` calls of `fn`, in seconds per call."""
    best = float("inf")
    for _ in range(rounds):
        started = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - started) / calls)
    return best


async def _member() -> None:
    await receive()


async def run(table: str, entries: int, calls: int, rounds: int) -> list[tuple[str, float]]:
    import importlib

    module = importlib.import_module(TABLES[table])
    _table.Table, _table.Matcher = module.Table, module.Matcher  # type: ignore[misc]
    async with Node("bench-a", cookie="groups") as a, Node("bench-b", cookie="groups") as b:
        ra = await Registry.start(a, "g")
        rb = await Registry.start(b, "g")
        await b.connect(a.id)
        pa = [a.spawn(_member) for _ in range(entries // 2)]
        pb = [b.spawn(_member) for _ in range(entries - entries // 2)]
        ra.join("group", pa)
        rb.join("group", pb)
        await rb.sync()
        await ra.sync()
        assert ra.count() == entries, (ra.count(), entries)
        members = [pid for pid, _value in ra.lookup("group")]
        lines = [("baseline: random.choice(list)", best_per_call(lambda: random.choice(members), calls, rounds))]
        for how in PICK_MODES:
            lines.append((f"pick {how}", best_per_call(lambda how=how: ra.pick("group", how), calls, rounds)))
        excluded = [members[0]]
        for how in ("random", "oldest", "round_robin"):
            lines.append((f"pick {how}, exclude 1",
                          best_per_call(lambda how=how: ra.pick("group", how, excluded), calls, rounds)))
        return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--entries", type=int, default=1000)
    parser.add_argument("--calls", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--table", choices=["both", *TABLES], default="both")
    args = parser.parse_args()
    logging.disable(logging.WARNING)  # the timed loops hold the event loop on purpose: no stall warnings
    for table in (TABLES if args.table == "both" else [args.table]):
        lines = asyncio.run(run(table, args.entries, args.calls, args.rounds))
        print(f"{table} table, a group of {args.entries} entries (half local), best of {args.rounds} x {args.calls}:")
        for label, seconds in lines:
            print(f"  {label:34} {seconds * 1e6:8.3f} us")


if __name__ == "__main__":
    main()
