"""Transport latency and throughput: two endpoints on one event loop, over loopback TCP.

    .venv/bin/python bench/transport.py              # the standard loop, then uvloop
    .venv/bin/python bench/transport.py --asyncio    # one loop only
    .venv/bin/python bench/transport.py --uvloop

Endpoint A connects to endpoint B (cookie handshake, no TLS, default limits); both run
in this process's one event loop, so every figure includes both sides' work.

* ping-pong: A sends ``("ping", i)``, B's ``on_message`` sends it back, A awaits it;
  one at a time, 1 000 warm-up round trips, then p50/p99 of 10 000
  (``time.perf_counter_ns``). One-way is half the round trip.
* stream: A sends 500 000 small messages (``("join", "reg", j, pid_like)``, 44 to 48
  bytes framed) in batches of 1 000, awaiting ``drain()`` and yielding to the loop once
  after each batch; the clock stops when B has received the last one. ``send`` encodes
  each message; ``send_encoded`` sends one payload encoded beforehand (the encode-once,
  send-to-many path). MB/s counts the framed bytes A handed to its socket.

On glibc the standard loop's ping-pong is bimodal (asyncio's 256 KiB read buffer comes
from the heap or from mmap, by the heap's state): see bench/README.md for the
environment that pins it when comparing two versions.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _support import loop_factories  # noqa: E402  (bench/ is on the path: scripts run from there)

from pgregistry.transport import Connection, Endpoint
from pgregistry.wire import encode

ROUND_TRIPS = 10_000
WARM_UP = 1_000
STREAM = 500_000  # a multiple of BATCH
BATCH = 1_000


async def run(round_trips: int, stream: int) -> None:
    """Two endpoints in this loop: ping-pong latency, then a one-way stream of small messages."""
    loop = asyncio.get_running_loop()
    waiter: list[asyncio.Future[Any]] = []
    received = 0
    stream_done = loop.create_future()

    def on_pong(conn: Connection, term: Any) -> None:
        waiter[0].set_result(term)

    def on_server_message(conn: Connection, term: Any) -> None:
        nonlocal received
        if type(term) is tuple and term[0] == "ping":
            conn.send(term)
            return
        received += 1
        if received == stream and not stream_done.done():
            stream_done.set_result(None)

    a = Endpoint("bench-a", "bench", on_message=on_pong)
    b = Endpoint("bench-b", "bench", on_message=on_server_message)
    await a.start()
    await b.start()
    try:
        conn = await a.connect(f"{b.host}:{b.port}")
        rtts: list[int] = []
        for i in range(WARM_UP + round_trips):
            waiter[:] = [loop.create_future()]
            start = time.perf_counter_ns()
            conn.send(("ping", i))
            await waiter[0]
            if i >= WARM_UP:
                rtts.append(time.perf_counter_ns() - start)
        rtts.sort()
        p50, p99 = rtts[len(rtts) // 2] / 1e3, rtts[len(rtts) * 99 // 100] / 1e3
        print(
            f"  ping-pong over {round_trips} round trips: one-way p50 {p50 / 2:6.1f} us, p99 {p99 / 2:6.1f} us"
            f"  (round trip p50 {p50:6.1f} us, p99 {p99:6.1f} us)"
        )
        pid_like = ("bench-a@127.0.0.1:1", 42, 1)
        encoded = encode(("join", "reg", 12345, pid_like))
        for label, pre_encoded in (("send", False), ("send_encoded", True)):
            received = 0
            stream_done = loop.create_future()
            bytes_before = conn.bytes_sent
            start_s = time.perf_counter()
            for i in range(0, stream, BATCH):
                if pre_encoded:
                    for _ in range(BATCH):
                        conn.send_encoded(encoded)
                else:
                    for j in range(i, i + BATCH):
                        conn.send(("join", "reg", j, pid_like))
                await conn.drain()
                await asyncio.sleep(0)
            await stream_done
            elapsed = time.perf_counter() - start_s
            print(
                f"  stream of {stream} small messages with {label} (sender and receiver on this one loop): "
                f"{stream / elapsed:,.0f} messages/s, {(conn.bytes_sent - bytes_before) / elapsed / 1e6:.1f} MB/s"
            )
    finally:
        await a.close()
        await b.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    loops = parser.add_mutually_exclusive_group()
    loops.add_argument("--asyncio", dest="only", action="store_const", const="asyncio", help="the standard loop only")
    loops.add_argument("--uvloop", dest="only", action="store_const", const="uvloop", help="uvloop only")
    args = parser.parse_args()
    for name, factory in loop_factories(args.only):
        print(f"{name} loop:")
        with asyncio.Runner(loop_factory=factory) as runner:
            runner.run(run(ROUND_TRIPS, STREAM))


if __name__ == "__main__":
    main()
