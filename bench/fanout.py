"""Subscriber fan-out: what one registry event costs per subscriber, against its floor.

    .venv/bin/python bench/fanout.py                  # 200 000 subscribers (about 1 minute)
    .venv/bin/python bench/fanout.py --subscribers 50000 --rounds 5

One node (or two for the remote line), `--subscribers` processes that each called
`monitor_scope`, then timed writes. Every line is the median over `--rounds` of one
write's wall time, divided by the number of subscribers:

* floor: a plain Python loop that builds one `Join` per subscriber (``tuple.__new__``)
  and appends it to a deque per subscriber, with the cyclic GC paused as the scope
  pauses it during a large fan-out: what any fan-out to mailboxes costs in CPython at
  the least;
* register, subscribers parked: the subscribers wait on something else, so delivery is
  a mailbox append;
* register, subscribers in `receive`: every subscriber waits in `receive`, so each
  delivery also wakes its task (resolves a future, schedules a callback);
* remote register: a process on node B registers; on node A, the time its scope takes
  to apply the op and fan the `Join` out to A's subscribers (the loop stall the peer's
  write causes on A).

The cyclic GC stays on outside the fan-outs (a collection can land in any round: the
median hides it).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import gc
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import pgregistry as pgr  # noqa: E402
from pgregistry.events import Join  # noqa: E402


class _Ready:
    """Counts subscribers that called `monitor_scope`; `wait` returns once all `n` did."""

    def __init__(self, n: int) -> None:
        self.left = n
        self.all = asyncio.Event()

    def arrived(self) -> None:
        self.left -= 1
        if self.left == 0:
            self.all.set()

    async def wait(self, timeout: float = 120.0) -> None:
        await asyncio.wait_for(self.all.wait(), timeout)


async def _parked(reg: pgr.Registry, ready: _Ready, stop: asyncio.Event) -> None:
    reg.monitor_scope()
    ready.arrived()
    await stop.wait()


async def _receiving(reg: pgr.Registry, ready: _Ready) -> None:
    reg.monitor_scope()
    ready.arrived()
    while True:
        if await pgr.receive() == "stop":
            return


def floor(n: int, rounds: int) -> float:
    boxes = [collections.deque() for _ in range(n)]
    refs = [object() for _ in range(n)]
    new = tuple.__new__
    times = []
    for i in range(rounds):
        payload = [(None, i)]
        start = time.perf_counter()
        gc.disable()  # as the scope does during a large fan-out
        for ref, box in zip(refs, boxes):
            box.append(new(Join, (ref, "k", payload)))
        gc.enable()
        times.append(time.perf_counter() - start)
        for box in boxes:
            box.clear()
    return statistics.median(times) / n


async def local(n: int, rounds: int, receiving: bool) -> float:
    async with pgr.Node("fan") as node:
        reg = await pgr.Registry.start(node, "fan")
        ready = _Ready(n)
        stop = asyncio.Event()
        pids = [node.spawn(_receiving, reg, ready) if receiving else node.spawn(_parked, reg, ready, stop)
                for _ in range(n)]
        await ready.wait()
        times = []
        for i in range(rounds):
            start = time.perf_counter()
            reg.register(("k", i), i)
            times.append(time.perf_counter() - start)
            await asyncio.sleep(0.05)  # let the woken subscribers take their message
        stop.set()
        for pid in pids:
            pgr.send(pid, "stop")
        return statistics.median(times) / n


async def remote(n: int, rounds: int) -> float:
    async with pgr.Node("a", cookie="fanout") as a, pgr.Node("b", cookie="fanout") as b:
        ra = await pgr.Registry.start(a, "fan")
        rb = await pgr.Registry.start(b, "fan")
        await b.connect(a.id)
        ready = _Ready(n)
        stop = asyncio.Event()
        for _ in range(n):
            a.spawn(_parked, ra, ready, stop)
        await ready.wait()
        scope = ra._scope
        applying = scope.peer_message
        times: list[float] = []

        def timed(peer: str, payload: Any) -> None:
            start = time.perf_counter()
            applying(peer, payload)
            if type(payload) is list and payload and payload[0] == "ops":
                times.append(time.perf_counter() - start)

        scope.peer_message = timed  # type: ignore[method-assign]
        await rb.sync()
        for i in range(rounds):
            rb.register(("k", i), i)  # this task is a process of b (entered last)
            await rb.sync()
        stop.set()
        return statistics.median(times) / n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--subscribers", type=int, default=200_000)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    n, rounds = args.subscribers, args.rounds
    base = floor(n, rounds)
    lines = [
        ("floor: build a Join and append it to a deque, per subscriber", base),
        ("register, subscribers parked", asyncio.run(local(n, rounds, receiving=False))),
        ("register, subscribers waiting in receive", asyncio.run(local(n, rounds, receiving=True))),
        ("remote register: apply + fan-out on the receiving node", asyncio.run(remote(n, rounds))),
    ]
    gc.collect()
    print(f"{n} subscribers, median of {rounds} rounds, per subscriber (and one event's total):")
    for label, per in lines:
        print(f"  {label:<58} {per * 1e9:7.0f} ns  ({per * n * 1e3:6.1f} ms)  {per / base:4.1f}x the floor")


if __name__ == "__main__":
    main()
