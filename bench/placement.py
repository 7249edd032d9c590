"""What placing one key on a `Ring` costs, beside a dict lookup in the same run.

    .venv/bin/python bench/placement.py                    # 10 nodes, 128 points each (a few seconds)
    .venv/bin/python bench/placement.py --nodes 50 --points 256 --rounds 9

Every line is nanoseconds per call: the best of `--rounds` rounds, each a plain ``for``
loop over `--keys` distinct keys calling one bound method, divided by the number of keys
(the loop's own cost included). The keys are made before timing; nothing is cached per
key, so every `node_for` encodes and hashes its key afresh.

* ``dict.get``: the baseline, a lookup of each key in a dict holding them all;
* ``key_hash``: the canonical encoding and the blake2b of a key, alone;
* ``node_for``: the hash plus the bisect over the ring's points;
* ``node_for_hash``: the bisect alone, from a precomputed hash (what a caller that keeps
  hashes pays);
* ``nodes_for(key, 3)``: the owner and the next two distinct nodes.

Key shapes: ``str`` (``"session:<n>"``), ``int`` (up to 2**40), ``tuple``
(``("user", <n>, "cart")``). The last line gives the ring's size, the CPU and the load average.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from cluster import machine  # noqa: E402  (bench/cluster.py: the machine line of every figure)

from pgregistry.placement import Ring, key_hash  # noqa: E402


def _per_call(fn: Callable[[Any], Any], keys: Sequence[Any], rounds: int) -> float:
    """Best-of-`rounds` nanoseconds per ``fn(key)``, looping over `keys`."""
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter_ns()
        for key in keys:
            fn(key)
        best = min(best, time.perf_counter_ns() - start)
    return best / len(keys)


def _keys(shape: str, count: int) -> list[Any]:
    if shape == "str":
        return [f"session:{n}" for n in range(count)]
    if shape == "int":
        step = (1 << 40) // count
        return [n * step + 7 for n in range(count)]
    return [("user", n, "cart") for n in range(count)]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=10)
    parser.add_argument("--points", type=int, default=128)
    parser.add_argument("--keys", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args(argv)

    ring = Ring([f"node{i}@10.0.0.{i}:4000" for i in range(args.nodes)], points=args.points)
    print(f"{'key':<6} {'dict.get':>9} {'key_hash':>9} {'node_for':>9} {'for_hash':>9} {'nodes_for3':>11}  (ns/call)")
    gc.disable()  # a collection landing in one round would only add noise
    try:
        for shape in ("str", "int", "tuple"):
            keys = _keys(shape, args.keys)
            table = dict.fromkeys(keys, 1)
            hashes = [key_hash(key) for key in keys]
            base = _per_call(table.get, keys, args.rounds)
            hashing = _per_call(key_hash, keys, args.rounds)
            owner = _per_call(ring.node_for, keys, args.rounds)
            from_hash = _per_call(ring.node_for_hash, hashes, args.rounds)
            three = _per_call(lambda key: ring.nodes_for(key, 3), keys, args.rounds)
            print(f"{shape:<6} {base:>9.0f} {hashing:>9.0f} {owner:>9.0f} {from_hash:>9.0f} {three:>11.0f}")
    finally:
        gc.enable()
    print(f"# a ring of {len(ring)} nodes, {ring.points} points each; {args.keys} keys, best of {args.rounds}; "
          f"{machine()}")


if __name__ == "__main__":
    main()
