"""Wire format throughput: encode and decode one typical scope-sync message.

    .venv/bin/python bench/wire.py
    .venv/bin/python bench/wire.py --rows 10000 --rounds 50

One message is a list of ``--rows`` rows ``[key, pid, {"role": ..., "shard": ...}, tag]``
with 50 distinct pids, once with str keys (``"user:<i>"``) and once with tuple keys
(``("user", i)``). Each line is the best of 5 runs of ``--rounds // 5`` calls of
`pgregistry.wire.encode` (which checks the term, then packs it) or
`pgregistry.wire.decode` (default limits), per message; rows/s and MB/s follow from it
and the message's encoded size.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pgregistry.terms import Pid
from pgregistry.wire import decode, encode


def best_of_5(fn: Callable[[Any], Any], arg: Any, rounds: int) -> float:
    """The lowest mean time of one ``fn(arg)`` over 5 runs of ``rounds // 5`` calls, in seconds."""
    calls = rounds // 5
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(calls):
            fn(arg)
        best = min(best, (time.perf_counter() - start) / calls)
    return best


def run(rows: int, rounds: int) -> None:
    """Print encode/decode throughput of one typical scope-sync message."""
    pids = [Pid("node1@127.0.0.1:4369", serial, 1) for serial in range(1, 51)]
    messages = {
        "str keys": [[f"user:{i}", pids[i % 50], {"role": "worker", "shard": i % 16}, i] for i in range(rows)],
        "tuple keys": [[("user", i), pids[i % 50], {"role": "worker", "shard": i % 16}, i] for i in range(rows)],
    }
    print(f"one message = a list of {rows} [key, pid, {{role, shard}}, tag] rows, 50 distinct pids")
    for label, message in messages.items():
        data = encode(message)
        assert decode(data) == message
        for name, fn, arg in (("encode", encode, message), ("decode", decode, data)):
            best = best_of_5(fn, arg, rounds)
            print(
                f"  {label:10s} {name}: {best * 1e6:8.1f} us/message  "
                f"{rows / best / 1e6:5.2f} M rows/s  {len(data) / best / 1e6:6.1f} MB/s  ({len(data)} bytes)"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1000, help="rows in the message (1000)")
    parser.add_argument("--rounds", type=int, default=200, help="calls per figure, in 5 runs (200)")
    args = parser.parse_args()
    if args.rows < 1 or args.rounds < 5:
        parser.error("--rows must be at least 1 and --rounds at least 5")
    run(args.rows, args.rounds)


if __name__ == "__main__":
    main()
