"""Node micro-benchmark: calls, sends and a stream between two nodes in two OS processes.

    .venv/bin/python bench/node.py              # the standard loop, then uvloop (about 1 minute)
    .venv/bin/python bench/node.py --asyncio    # one loop only (or --uvloop)

The script starts a second copy of itself (``--serve COOKIE``) as the remote node, which
runs a `Server` named ``echo``, a ``pong`` process and a ``sink`` process, and exits when
its stdin closes. Both nodes use the same loop. On loopback, from the local node:

* a call to the echo server by pid, then by ``(name, node)``: p50/p99/mean;
* a send to ``pong`` and the answer it sends back: one way (both processes read the same
  host's ``perf_counter_ns``) and the round trip;
* 200 000 sends to ``sink`` in batches of 1 000, paced by the connection's drain, until
  the sink counted them all: messages per second and bytes per message on the wire.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

# Run against the working tree (in-place build of the extension included).
REPO_ROOT: Final = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from _support import loop_factories  # noqa: E402  (bench/ is on the path: scripts run from there)

from pgregistry.node import Node  # noqa: E402  (needs the path above)
from pgregistry.process import current_process, receive, send  # noqa: E402
from pgregistry.server import Server, call  # noqa: E402
from pgregistry.terms import Pid  # noqa: E402


async def _pong() -> None:
    """Answer ``(reply_to, t_sent)`` with ``(t_sent, t_received)`` (perf_counter_ns)."""
    while True:
        reply_to, t_sent = await receive()
        send(reply_to, (t_sent, time.perf_counter_ns()))


async def _sink() -> None:
    """Count messages; answer ``("count", reply_to, n)`` once n have arrived."""
    seen = 0
    while True:
        msg = await receive()
        if type(msg) is tuple and msg[0] == "count":
            _, reply_to, expected = msg
            while seen < expected:
                await receive()
                seen += 1
            send(reply_to, seen)
            seen = 0
        else:
            seen += 1


class _Echo(Server):
    async def handle_call(self, request: Any, caller: Pid) -> Any:
        return current_process().pid if request == "whoami" else request


async def _serve(cookie: str) -> None:
    """The remote node of the benchmark (run in a child process): echo, pong and sink."""
    done = asyncio.Event()

    class StdinClosed(asyncio.Protocol):
        def connection_lost(self, exc: Exception | None) -> None:
            done.set()

    await asyncio.get_running_loop().connect_read_pipe(StdinClosed, os.fdopen(0, "rb", buffering=0))
    async with Node("bench-b", cookie=cookie) as node:
        await _Echo.start(node, name="echo")
        node.register_name("pong", node.spawn(_pong))
        node.register_name("sink", node.spawn(_sink))
        print(f"READY {node.id}", flush=True)
        await done.wait()


def _percentiles(samples_ns: list[int]) -> str:
    samples_ns.sort()
    n = len(samples_ns)
    p50, p99, mean = samples_ns[n // 2] / 1e3, samples_ns[n * 99 // 100] / 1e3, sum(samples_ns) / n / 1e3
    return f"p50 {p50:6.1f} us  p99 {p99:6.1f} us  mean {mean:6.1f} us"


async def _run(peer: str, cookie: str, rounds: int, stream: int) -> None:
    """Call, send and stream figures against the node `peer` (another OS process)."""
    clock = time.perf_counter_ns
    async with Node("bench-a", cookie=cookie) as node:
        await node.connect(peer)
        me = current_process().pid
        echo = await call(("echo", peer), "whoami")
        for i in range(2000):
            await call(echo, i)
        samples: list[int] = []
        for i in range(rounds):
            start = clock()
            await call(echo, i)
            samples.append(clock() - start)
        print(f"  call to a Server there, by pid ({rounds}):     {_percentiles(samples)}")
        samples = []
        for i in range(rounds // 4):
            start = clock()
            await call(("echo", peer), i)
            samples.append(clock() - start)
        print(f"  call by (name, node) ({rounds // 4}):            {_percentiles(samples)}")
        pong = ("pong", peer)
        for _ in range(1000):
            send(pong, (me, clock()))
            await receive()
        one_way: list[int] = []
        samples = []
        for _ in range(rounds):
            t_sent = clock()
            send(pong, (me, t_sent))
            _, t_received = await receive()
            one_way.append(t_received - t_sent)
            samples.append(clock() - t_sent)
        print(f"  send, one way (same-host monotonic clock):  {_percentiles(one_way)}")
        print(f"  send, then a send back (round trip):        {_percentiles(samples)}")
        sink = ("sink", peer)
        conn = node._peers[peer].conn  # the connection itself, for its byte counter and drain
        assert conn is not None
        start_bytes = conn.bytes_sent
        start_time = time.perf_counter()
        batch = 1000
        for i in range(0, stream, batch):
            for j in range(i, i + batch):
                send(sink, ("job", j))
            await conn.drain()
        send(sink, ("count", me, stream))
        assert await receive(60) == stream
        elapsed = time.perf_counter() - start_time
        print(
            f"  {stream} sends, received and counted there:  {stream / elapsed:,.0f} messages/s, "
            f"{(conn.bytes_sent - start_bytes) / stream:.0f} bytes each on the wire"
        )


def main() -> None:
    if "--serve" in sys.argv:
        cookie = sys.argv[sys.argv.index("--serve") + 1]
        serve_factory: Callable[[], asyncio.AbstractEventLoop] = asyncio.new_event_loop
        if "--uvloop" in sys.argv:
            import uvloop

            serve_factory = uvloop.new_event_loop
        with asyncio.Runner(loop_factory=serve_factory) as runner:
            runner.run(_serve(cookie))
        return
    only = "uvloop" if "--uvloop" in sys.argv[1:] else "asyncio" if "--asyncio" in sys.argv[1:] else None
    factories = loop_factories(only)
    rounds, stream = 20_000, 200_000
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    for name, factory in factories:
        cookie = secrets.token_urlsafe(16)
        args = [sys.executable, str(Path(__file__).resolve()), "--serve", cookie]
        if name == "uvloop":
            args.append("--uvloop")
        child = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, cwd=REPO_ROOT)
        try:
            assert child.stdout is not None
            line = child.stdout.readline().decode().split()
            if len(line) != 2 or line[0] != "READY":
                raise RuntimeError(f"the benchmark's remote node did not start: {line!r}")
            print(f"{name} loop (both nodes), two nodes in two OS processes on loopback:")
            with asyncio.Runner(loop_factory=factory) as runner:
                runner.run(_run(line[1], cookie, rounds, stream))
        finally:
            child.kill()
            child.wait()


if __name__ == "__main__":
    main()
