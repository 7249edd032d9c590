"""Cluster benchmark: nodes in separate OS processes on loopback; one table against the targets in docs/performance.md.

Usage, from the repository root::

    .venv/bin/python bench/cluster.py                  # both loops, full run (about 5 minutes)
    .venv/bin/python bench/cluster.py --quick          # churn for 10 s instead of 60 s
    .venv/bin/python bench/cluster.py --loop uvloop    # one loop only (asyncio | uvloop | both)
    .venv/bin/python bench/cluster.py --only latency,call --profile /tmp/prof

The parent process runs no node: it starts every node as a child OS process (this same
script re-executed with ``--child``), drives it with one JSON command per line on its
stdin and reads one JSON answer per line from its stdout. Cross-process times are
``time.monotonic_ns()`` (CLOCK_MONOTONIC, one clock for the whole machine on Linux), so
a time taken on node A and one taken on node B subtract. A child exits when its stdin
closes (the parent is gone) and gets SIGKILL if the parent dies (PR_SET_PDEATHSIG); the
parent kills every child it started, by pid, in a ``finally``.

Per loop (both nodes' loops are the same; the parent's own loop plays no part), with
three nodes A, B, C in a full mesh, each running the registry scope ``"bench"``:

1. ``latency``: a process on B subscribes with ``monitor_scope``; a process on A
   registers key ``("lat", i)``, taking ``t0`` just before ``register``; B's subscriber
   takes ``t1`` as soon as ``receive`` hands it the ``Join`` and sends ``t1`` back to A,
   whose next trial starts when that answer arrives. p50/p99 of ``t1 - t0``.
2. ``throughput``: a process on A registers N (200 000) entries under distinct
   str keys (made beforehand), yielding to the loop every ``--batch`` (1 000)
   registrations, then awaits ``reg.sync()`` (every peer acknowledged everything sent
   before it). Rate = N / (first register -> sync returned); B's and C's counts are
   checked afterwards.
3. ``catchup``: a fresh holder H (no peers) fills 100 000 local entries (100
   processes x 1 000), a fresh node N1 (registry already started) connects to it; time
   from ``connect`` until N1's count matches, and N1's ``bytes_received`` on that
   connection (handshake and ticks included) per entry. N1 stops, H grows to 1 000 000
   entries, a fresh N2 connects. Keys ``"key-<i>"``, values ``i`` (int).
4. ``purge``: C fills 100 000 entries (replicated to A and B), then gets SIGKILL.
   On A and B the scope's ``peer_down`` is timed (wrapped on the instance; this is the
   moment the node declares C down, and it is where the rows go): purge = its duration,
   detection = its start - the SIGKILL. A ``monitor_nodes`` process also records the
   ``NodeDown`` arrival. Then a fourth node D with 100 000 entries is frozen with SIGSTOP
   (a hung peer: its sockets stay open), so detection is by silence (``down_after``).
5. ``call``: ``call`` from a process on A to a `Server` on B, by pid, p50/p99.
6. ``churn``: on A, 1 000 registrations and 1 000 process exits per second (every 10 ms
   ten new processes register one new key each; the ten oldest exit, half normally,
   half by ``exit(pid, "kill")``) for ``--churn`` seconds, while every node samples its
   RSS, ``len(gc.get_objects())``, table count and process count every
   ``--sample-every`` seconds, each after a ``gc.collect()`` (live objects, not garbage
   awaiting collection); "before" and "after" (once the churn's processes are gone) are
   such samples too, and the types of the objects kept between them are printed under
   the table. A node "GREW" when the least-squares trend of the samples after the first
   quarter, extrapolated over the window, exceeds 5 % of their mean and the peak of the
   last third of the samples exceeds the middle third's by 1 % of the mean (a bounded
   saw-tooth, e.g. a cache cleared when full, moves the trend but not the peaks). A
   one-off warm-up (bounded caches filling) shows in "after - before", a leak in both.

``--profile DIR`` dumps a cProfile of every node taking part in each phase
(``DIR/<loop>-<phase>-<node>.prof``); the timings of such a run are not the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import contextlib
import dataclasses
import gc
import json
import os
import platform
import secrets
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

from _runner import Profiling, die_with_parent, log, run_main  # bench/_runner.py (this directory is on sys.path)

HERE = Path(__file__).resolve().parent
REPO = HERE.parent

REGISTRY = "bench"
PHASES = ("rtt", "call", "latency", "churn", "throughput", "purge", "catchup")


def now_ns() -> int:
    return time.monotonic_ns()


# =========================================================================== child node


def _child_main(args: argparse.Namespace) -> None:
    """A node in this OS process, driven over stdin/stdout (see `ChildNode`)."""
    die_with_parent()
    sys.path.insert(0, str(REPO))
    factory: Callable[[], asyncio.AbstractEventLoop] = asyncio.new_event_loop
    if args.loop == "uvloop":
        import uvloop

        factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(_ChildServer(args).serve())


class _Echo(asyncio.Protocol):
    """Writes back what it reads: the bare round trip every figure is set beside."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)


async def echo_round_trips(port: int, n: int, warmup: int) -> dict[str, Any]:
    """Round trips of 8 bytes to the echo server at `port`, one at a time (a future per
    reply), after `warmup` unmeasured ones: `summarize` of their ns."""
    loop = asyncio.get_running_loop()
    waiting: list[asyncio.Future[None]] = []

    class Client(asyncio.Protocol):
        def data_received(self, data: bytes) -> None:
            if waiting and not waiting[0].done():
                waiting[0].set_result(None)

    transport, _protocol = await loop.create_connection(Client, "127.0.0.1", port)
    samples = []
    clock = time.monotonic_ns
    try:
        for i in range(warmup + n):
            waiting[:] = [loop.create_future()]
            t0 = clock()
            transport.write(b"01234567")
            await asyncio.wait_for(waiting[0], 5.0)
            if i >= warmup:
                samples.append(clock() - t0)
    finally:
        transport.close()
    return summarize(samples)


async def serve_echo() -> asyncio.AbstractServer:
    """A bare asyncio echo server (no pgregistry) on a free loopback port."""
    return await asyncio.get_running_loop().create_server(_Echo, "127.0.0.1", 0)


class _ChildServer(Profiling):
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.holders: list[Any] = []
        self.subscriber: Any = None
        self.purge: dict[str, Any] = {}
        self.sync_timing: dict[str, Any] = {}

    def _track_gc(self) -> None:
        """Count the cyclic GC's pauses (time and collections per generation)."""
        stats = self.gc_pauses = {"seconds": 0.0, "collections": [0, 0, 0], "max": 0.0}
        started = [0.0]

        def callback(phase: str, info: dict) -> None:
            if phase == "start":
                started[0] = time.perf_counter()
            else:
                pause = time.perf_counter() - started[0]
                stats["seconds"] += pause
                stats["max"] = max(stats["max"], pause)
                stats["collections"][info["generation"]] += 1

        gc.callbacks.append(callback)

    async def cmd_gc_pauses(self, reset: bool = False) -> dict:
        out = {"seconds": self.gc_pauses["seconds"], "collections": list(self.gc_pauses["collections"]),
               "max": self.gc_pauses["max"]}
        if reset:
            self.gc_pauses.update({"seconds": 0.0, "collections": [0, 0, 0], "max": 0.0})
        return out

    async def serve(self) -> None:
        self._track_gc()
        from pgregistry import TABLE_IMPLEMENTATION, Node, Registry, Server
        from pgregistry import self as self_pid

        class Echo(Server):
            async def handle_call(self, request: Any, caller: Any) -> Any:
                return self_pid() if request == "whoami" else request

        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=1 << 24)
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        node = Node(self.args.name, cookie=os.environ["PGREGISTRY_COOKIE"],
                    tick_interval=self.args.tick, down_after=self.args.down_after)
        async with node:
            self.node = node
            self.reg = await Registry.start(node, REGISTRY)
            self.scope = node.service(REGISTRY)
            self.echo = await Echo.start(node, name="echo")
            self._reply({"id": 0, "ok": True, "result": {
                "id": node.id, "pid": os.getpid(), "table": TABLE_IMPLEMENTATION, "loop": type(loop).__module__}})
            tasks = set()
            while True:
                line = await reader.readline()
                if not line:
                    break
                request = json.loads(line)
                task = asyncio.ensure_future(self._handle(request))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            for task in list(tasks):
                task.cancel()

    def _reply(self, answer: dict) -> None:
        sys.stdout.write(json.dumps(answer) + "\n")
        sys.stdout.flush()

    async def _handle(self, request: dict) -> None:
        try:
            handler = getattr(self, "cmd_" + request["cmd"])
            result = await handler(**request.get("args", {}))
            answer = {"id": request["id"], "ok": True, "result": result}
        except BaseException as exc:  # noqa: BLE001 - every failure goes back to the parent
            answer = {"id": request["id"], "ok": False,
                      "error": "".join(traceback.format_exception(exc))[-4000:]}
            if isinstance(exc, asyncio.CancelledError):
                self._reply(answer)
                raise
        self._reply(answer)

    async def _in_process(self, fn: Callable[..., Any], *args: Any, keep: bool = False) -> Any:
        """Run ``await fn(*args)`` as a new process of the node; its result.

        With ``keep`` the process stays alive afterwards (holding its entries) until
        `cmd_release` sends it "stop"."""
        from pgregistry import receive

        fut: asyncio.Future = asyncio.get_running_loop().create_future()

        async def body() -> None:
            try:
                result = await fn(*args)
            except Exception as exc:  # noqa: BLE001
                if not fut.done():
                    fut.set_exception(exc)
                return
            if not fut.done():
                fut.set_result(result)
            message = None
            while keep and message != "stop":  # other messages are not for this holder
                message = await receive()

        pid = self.node.spawn(body)
        if keep:
            self.holders.append(pid)
        return await fut

    # -- plumbing -------------------------------------------------------------------------

    async def cmd_connect(self, address: str) -> str:
        return await self.node.connect(address)

    async def cmd_wait_peers(self, n: int, timeout: float = 20.0) -> list[str]:
        deadline = time.monotonic() + timeout
        while len(self.node.peers()) < n:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.node.id}: {len(self.node.peers())} peers after {timeout} s, want {n}")
            await asyncio.sleep(0.01)
        return self.node.peers()

    async def cmd_sync(self, timeout: float = 60.0) -> None:
        await self.reg.sync(timeout)

    async def cmd_count(self) -> int:
        return self.reg.count()

    async def cmd_wait_count(self, n: int, timeout: float = 60.0) -> float:
        t0 = time.monotonic()
        while self.reg.count() != n:
            if time.monotonic() - t0 > timeout:
                raise TimeoutError(f"{self.node.id}: count {self.reg.count()} after {timeout} s, want {n}")
            await asyncio.sleep(0.002)
        return time.monotonic() - t0

    async def cmd_release(self) -> int:
        holders, self.holders = self.holders, []
        for pid in holders:
            self.node.runtime.send(pid, "stop")
        return len(holders)

    async def cmd_gc_collect(self) -> int:
        return gc.collect()

    # -- 1. latency -------------------------------------------------------------------------

    async def cmd_lat_sub(self, reply_node: str) -> None:
        from pgregistry import Join, receive, send

        reg = self.reg
        ready: asyncio.Future = asyncio.get_running_loop().create_future()

        async def subscriber() -> None:
            reg.monitor_scope()
            ready.set_result(None)
            dest = ("lat_driver", reply_node)
            while True:
                msg = await receive()
                t1 = time.monotonic_ns()
                if type(msg) is Join:
                    key = msg.key
                    if type(key) is tuple and key[0] == "lat":
                        send(dest, ("ack", key[1], t1))
                elif msg == "stop":
                    return

        self.subscriber = self.node.spawn(subscriber)
        await ready

    async def cmd_lat_sub_stop(self) -> None:
        if self.subscriber is not None:
            self.node.runtime.exit(self.subscriber, "kill")
            self.subscriber = None

    async def cmd_lat_run(self, n: int, warmup: int) -> dict:
        from pgregistry import receive
        from pgregistry import self as self_pid

        reg, node = self.reg, self.node

        async def driver() -> list[int]:
            node.register_name("lat_driver", self_pid())
            samples = []
            register = reg.register
            for i in range(warmup + n):
                key = ("lat", i)
                t0 = time.monotonic_ns()
                register(key, i)
                while True:
                    msg = await receive(5.0)
                    if type(msg) is tuple and msg[0] == "ack" and msg[1] == i:
                        break
                if i >= warmup:
                    samples.append(msg[2] - t0)
            return samples

        samples = await self._in_process(driver)
        return summarize(samples)

    # -- 0. baseline: a raw TCP round trip between two of these processes -------------------

    async def cmd_echo_serve(self) -> int:
        """Serve a bare asyncio echo protocol (no pgregistry) on loopback; return its port."""
        self.echo_server = await serve_echo()
        return int(self.echo_server.sockets[0].getsockname()[1])

    async def cmd_rtt_run(self, port: int, n: int, warmup: int) -> dict:
        return await echo_round_trips(port, n, warmup)

    # -- 5. call ----------------------------------------------------------------------------

    async def cmd_call_run(self, peer: str, n: int, warmup: int) -> dict:
        from pgregistry import call

        async def caller() -> list[int]:
            target = await call(("echo", peer), "whoami")  # the server's pid: the calls go by pid
            samples = []
            clock = time.monotonic_ns
            for i in range(warmup + n):
                t0 = clock()
                await call(target, i)
                if i >= warmup:
                    samples.append(clock() - t0)
            return samples

        return summarize(await self._in_process(caller))

    # -- 2. throughput ----------------------------------------------------------------------

    async def cmd_tput(self, n: int, batch: int, timeout: float = 120.0) -> dict:
        reg = self.reg
        keys = [f"tput-{i}" for i in range(n)]

        async def writer() -> dict:
            register = reg.register
            t0 = time.monotonic_ns()
            for start in range(0, n, batch):
                for i in range(start, min(n, start + batch)):
                    register(keys[i], i)
                await asyncio.sleep(0)
            t_local = time.monotonic_ns()
            await reg.sync(timeout)
            t_end = time.monotonic_ns()
            return {"t0": t0, "t_local": t_local, "t_end": t_end}

        return await self._in_process(writer, keep=True)

    # -- 3. catch-up ------------------------------------------------------------------------

    async def cmd_hold(self, n: int, per_proc: int, prefix: str = "key-") -> dict:
        """Fill `n` local entries, `per_proc` per holder process; they stay until release."""
        reg = self.reg
        base = len(self.holders) * per_proc  # keys continue where an earlier fill stopped
        t0 = time.perf_counter()
        waits = []
        for p in range(0, n, per_proc):
            first = base + p

            async def fill(first: int = first, count: int = min(per_proc, n - p)) -> None:
                register = reg.register
                for i in range(first, first + count):
                    register(f"{prefix}{i}", i)

            waits.append(self._in_process(fill, keep=True))
        await asyncio.gather(*waits)
        return {"seconds": time.perf_counter() - t0, "count": reg.count()}

    async def cmd_arm_sync_timing(self) -> None:
        """Time the sync rounds this node sends (holder side): parts, bytes, busy time."""
        from pgregistry.wire import encode_trusted

        timing = self.sync_timing
        timing["rounds"] = []  # one record per round of non-empty parts this node sends
        if "armed" in timing:
            return
        timing["armed"] = True
        node = self.node
        send_service = node.send_service

        def timed_send(peer: str, name: str, payload: Any, **kw: Any) -> bool:
            if not (type(payload) is list and payload and payload[0] == "sync" and len(payload) == 3):
                return send_service(peer, name, payload, **kw)
            t0 = time.monotonic_ns()
            ok = send_service(peer, name, payload, **kw)
            busy = time.monotonic_ns() - t0
            rounds = timing["rounds"]
            if not rounds or rounds[-1]["closed"]:
                rounds.append({"first_at": t0, "parts": 0, "rows": 0, "bytes": 0, "busy_ns": 0, "closed": False})
            record = rounds[-1]
            record["parts"] += 1
            record["rows"] += sum(len(flat) // 3 for _pid, flat in payload[1])
            record["bytes"] += len(encode_trusted(["svc", name, payload]))
            record["busy_ns"] += busy  # encode + queue (the part's rows were read just before)
            if payload[2]:
                record["closed"] = True
                record["last_at"] = time.monotonic_ns()
            return ok

        node.send_service = timed_send

    async def cmd_sync_timing(self) -> dict:
        return {"rounds": [r for r in self.sync_timing.get("rounds", []) if r["rows"]]}

    async def cmd_catchup(self, address: str, expect: int, limit: float = 60.0, settle: float = 20.0) -> dict:
        scope, reg, node = self.scope, self.reg, self.node
        applied: list[tuple[int, int]] = []  # (start, end) of applying each non-empty sync part received
        peer_message = scope.peer_message

        done_at: list[int] = []
        done = asyncio.Event()

        def timed(peer: str, payload: Any) -> None:
            if type(payload) is list and payload and payload[0] == "sync" and len(payload) == 3 and payload[1]:
                t0 = time.monotonic_ns()
                peer_message(peer, payload)
                applied.append((t0, time.monotonic_ns()))
            else:
                peer_message(peer, payload)
            if not done_at and reg.count() >= expect:
                done_at.append(time.monotonic_ns())
                done.set()

        scope.peer_message = timed
        try:
            t0 = time.monotonic_ns()
            peer = await node.connect(address)
            t_conn = time.monotonic_ns()
            # The count can only change in a peer message (timed above), so no polling.
            try:
                await asyncio.wait_for(done.wait(), limit)
            except TimeoutError:
                raise TimeoutError(f"catch-up: count {reg.count()} after {limit} s, want {expect}; "
                                   f"connected to {node.peers()}") from None
            t_done = done_at[0]
            stats_done = node.connection_stats(peer) or {}
            # Whatever else the holder sends for the catch-up: wait until the bytes
            # received stop growing (ticks aside) for 0.3 s, at most `settle` s.
            last = stats_done.get("bytes_received", 0)
            quiet_since, give_up = time.monotonic(), time.monotonic() + settle
            while time.monotonic() < give_up and time.monotonic() - quiet_since < 0.3:
                await asyncio.sleep(0.05)
                got = (node.connection_stats(peer) or {}).get("bytes_received", 0)
                if got - last > 64:
                    quiet_since = time.monotonic()
                last = got
        finally:
            scope.peer_message = peer_message
        stats = node.connection_stats(peer) or {}
        return {"t0": t0, "t_conn": t_conn, "t_done": t_done, "count": reg.count(), "applied": applied,
                "bytes_at_done": stats_done.get("bytes_received"), **stats}

    # -- 4. purge ---------------------------------------------------------------------------

    async def cmd_arm_purge(self, victim: str) -> None:
        from pgregistry import NodeDown, receive

        scope, reg, node = self.scope, self.reg, self.node
        record: dict[str, Any] = {}
        noticed = asyncio.Event()  # set at the NodeDown, which follows the purge
        self.purge[victim] = (record, noticed)
        peer_down = scope.peer_down

        def timed(peer: str, reason: str) -> None:
            if peer != victim or "start" in record:
                peer_down(peer, reason)
                return
            record["count_before"] = reg.count()
            record["start"] = time.monotonic_ns()
            peer_down(peer, reason)
            record["end"] = time.monotonic_ns()
            record["count_after"] = reg.count()
            record["reason"] = reason

        scope.peer_down = timed
        ready: asyncio.Future = asyncio.get_running_loop().create_future()

        async def watcher() -> None:
            node.monitor_nodes()
            ready.set_result(None)
            while True:
                msg = await receive()
                if type(msg) is NodeDown and msg.node == victim:
                    record["nodedown"] = time.monotonic_ns()
                    record["count_at_nodedown"] = reg.count()
                    noticed.set()
                    return

        node.spawn(watcher)
        await ready

    async def cmd_purge_result(self, victim: str, timeout: float = 30.0) -> dict:
        record, noticed = self.purge[victim]
        try:
            await asyncio.wait_for(noticed.wait(), timeout)
        except TimeoutError:
            raise TimeoutError(f"{self.node.id}: {victim} not declared down within {timeout} s: {record}") from None
        if "end" not in record:
            raise ChildError(f"{self.node.id}: NodeDown for {victim} came without the scope's purge: {record}")
        return record

    # -- 6. churn ---------------------------------------------------------------------------

    def _snapshot(self, types: bool = False) -> dict:
        """RSS, GC-tracked objects (after a full collection), table count, processes."""
        gc.collect()
        with open("/proc/self/statm") as f:
            rss = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        objects = gc.get_objects()
        out = {"t": time.monotonic(), "rss": rss, "objects": len(objects),
               "count": self.reg.count(), "procs": len(self.node.runtime)}
        if types:
            by_type: dict[str, int] = {}
            for o in objects:
                name = type(o).__qualname__
                by_type[name] = by_type.get(name, 0) + 1
            out["types"] = by_type
        del objects
        return out

    async def cmd_snapshot(self) -> dict:
        return self._snapshot(types=True)

    async def cmd_sample(self, duration: float, interval: float) -> list[dict]:
        out = []
        t_end = time.monotonic() + duration
        while True:
            out.append(self._snapshot())
            left = t_end - time.monotonic()
            if left <= 0:
                return out
            await asyncio.sleep(min(interval, left))

    async def cmd_churn(self, duration: float, rate: int) -> dict:
        from pgregistry import exit as exit_process
        from pgregistry import receive, send

        reg, node = self.reg, self.node
        tick = 0.01
        per_tick = max(1, round(rate * tick))
        done = {"registered": 0}

        async def member(key: str) -> None:
            reg.register(key, None)
            done["registered"] += 1
            await receive()

        async def driver() -> dict:
            from collections import deque

            loop = asyncio.get_running_loop()
            live: deque = deque()
            exits = late = 0
            first_exit = None
            i = 0
            start = loop.time()
            next_at = start
            while loop.time() - start < duration:
                for _ in range(per_tick):
                    live.append(node.spawn(member, f"churn-{i}"))
                    i += 1
                while len(live) > rate:  # about one second of lifetime each
                    if first_exit is None:
                        first_exit = loop.time()
                    pid = live.popleft()
                    if exits & 1:
                        exit_process(pid, "kill")
                    else:
                        send(pid, "stop")
                    exits += 1
                next_at += tick
                delay = next_at - loop.time()
                if delay < 0:
                    late += 1
                await asyncio.sleep(max(0.0, delay))
            end = loop.time()
            while live:
                send(live.popleft(), "stop")
            return {"seconds": end - start, "exit_seconds": end - (first_exit or end), "spawned": i,
                    "registered": done["registered"], "exits": exits, "late_ticks": late}

        return await self._in_process(driver)


# =========================================================================== statistics


def summarize(samples_ns: list[int]) -> dict:
    s = sorted(samples_ns)
    n = len(s)
    if not n:
        return {"n": 0}
    return {"n": n, "p50": s[n // 2] / 1e9, "p99": s[min(n - 1, n * 99 // 100)] / 1e9,
            "mean": sum(s) / n / 1e9, "max": s[-1] / 1e9, "min": s[0] / 1e9}


def slope_verdict(points: list[tuple[float, float]]) -> tuple[float, bool]:
    """(growth extrapolated over the window, grew?) from a least-squares fit.

    The fit skips the first quarter of the window (warm-up). "Grew" when the fitted line
    rises by more than 5 % of the mean over the window *and* the peak of the last third
    of the samples exceeds the peak of the middle third by more than 1 % of the mean: a
    bounded saw-tooth (a cache cleared when full) has a trend that depends on where the
    window cuts it, but its peaks do not rise; a leak raises both.
    """
    if len(points) < 6:
        return 0.0, False
    t_first, t_last = points[0][0], points[-1][0]
    pts = [p for p in points if p[0] >= t_first + (t_last - t_first) / 4]
    if len(pts) < 6:
        pts = points
    n = len(pts)
    mx = sum(t for t, _ in pts) / n
    my = sum(v for _, v in pts) / n
    sxx = sum((t - mx) ** 2 for t, _ in pts)
    if sxx == 0:
        return 0.0, False
    slope = sum((t - mx) * (v - my) for t, v in pts) / sxx
    growth = slope * (t_last - t_first)
    third = len(points) // 3
    peak_mid = max(v for _, v in points[third:2 * third])
    peak_last = max(v for _, v in points[2 * third:])
    mean = max(my, 1.0)
    return growth, growth > 0.05 * mean and peak_last - peak_mid > 0.01 * mean


# =========================================================================== parent side


_LIVE_CHILDREN: set[int] = set()


@atexit.register
def _kill_leftovers() -> None:
    for pid in list(_LIVE_CHILDREN):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)
        _LIVE_CHILDREN.discard(pid)


class ChildError(RuntimeError):
    """A child node failed a command, did not answer in time, or is gone."""


class ChildNode:
    """One child OS process running a node; `cmd` sends it a command and awaits the answer."""

    def __init__(self, name: str, loop: str, opts: argparse.Namespace, logdir: Path,
                 tick: float | None = None, down_after: float | None = None) -> None:
        self.name = name
        self.loop = loop
        self.opts = opts
        self.tick = opts.tick if tick is None else tick
        self.down_after = opts.down_after if down_after is None else down_after
        self.log_path = logdir / f"{loop}-{name}.log"
        self.proc: asyncio.subprocess.Process | None = None
        self.id = ""
        self.pid = 0
        self._next = 1
        self._waiting: dict[int, asyncio.Future] = {}
        self._reader: asyncio.Task | None = None

    def __repr__(self) -> str:
        return f"<node {self.name} ({self.loop}) pid {self.pid}>"

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def child_args(self) -> list[str]:
        """The command line of the child (a subclass runs its own script with its options)."""
        return [sys.executable, str(Path(__file__).resolve()), "--child", "--name", self.name, "--loop", self.loop,
                "--tick", str(self.tick), "--down-after", str(self.down_after)]

    async def start(self, timeout: float = 30.0) -> ChildNode:
        args = self.child_args()
        with open(self.log_path, "ab") as log:
            self.proc = await asyncio.create_subprocess_exec(
                *args, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=log,
                cwd=REPO, limit=1 << 24)
        self.pid = self.proc.pid
        _LIVE_CHILDREN.add(self.pid)
        ready: asyncio.Future = asyncio.get_running_loop().create_future()
        self._waiting[0] = ready
        self._reader = asyncio.ensure_future(self._read())
        try:
            info = await asyncio.wait_for(ready, timeout)
        except TimeoutError:
            raise ChildError(f"node {self.name} ({self.loop}) did not start within {timeout} s; "
                             f"log:\n{self.log_tail()}") from None
        self.id = info["id"]
        self.info = info
        return self

    async def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        why = "its stdout closed"
        try:
            while True:
                line = await self.proc.stdout.readline()
                if not line:
                    break
                try:
                    answer = json.loads(line)
                except ValueError:
                    sys.stderr.write(f"[{self.name}] {line.decode(errors='replace')}")
                    continue
                fut = self._waiting.pop(answer.get("id"), None)
                if fut is None or fut.done():
                    continue
                if answer.get("ok"):
                    fut.set_result(answer.get("result"))
                else:
                    fut.set_exception(ChildError(f"node {self.name} ({self.loop}): {answer.get('error')}"))
        except Exception as exc:  # noqa: BLE001
            why = repr(exc)
        rc = await self.proc.wait()
        _LIVE_CHILDREN.discard(self.pid)
        for fut in self._waiting.values():
            if not fut.done():
                fut.set_exception(ChildError(
                    f"node {self.name} ({self.loop}) went away ({why}, exit code {rc}); log:\n{self.log_tail()}"))
        self._waiting.clear()

    async def cmd(self, cmd: str, timeout: float = 60.0, **args: Any) -> Any:
        if self.proc is None or self.proc.returncode is not None or self.proc.stdin is None:
            raise ChildError(f"node {self.name} ({self.loop}) is not running; log:\n{self.log_tail()}")
        n = self._next
        self._next += 1
        fut: asyncio.Future = asyncio.get_running_loop().create_future()
        self._waiting[n] = fut
        self.proc.stdin.write((json.dumps({"id": n, "cmd": cmd, "args": args}) + "\n").encode())
        try:
            return await asyncio.wait_for(fut, timeout)
        except TimeoutError:
            raise ChildError(f"node {self.name} ({self.loop}): {cmd} took more than {timeout} s") from None
        finally:
            self._waiting.pop(n, None)

    def signal(self, sig: int) -> None:
        if self.proc is not None and self.proc.returncode is None:
            os.kill(self.pid, sig)

    async def stop(self, grace: float = 5.0) -> None:
        """Close its stdin (the node stops and says leave), SIGKILL after `grace` s."""
        if self.proc is None:
            return
        if self.proc.returncode is None:
            with contextlib.suppress(Exception):
                assert self.proc.stdin is not None
                self.proc.stdin.close()
            try:
                await asyncio.wait_for(self.proc.wait(), grace)
            except TimeoutError:
                self.signal(signal.SIGKILL)
                await self.proc.wait()
        if self._reader is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._reader, 5)
        _LIVE_CHILDREN.discard(self.pid)


class Cluster:
    """The child nodes of one loop's run; every one is stopped (or killed) in `close`."""

    def __init__(self, loop: str, opts: argparse.Namespace, logdir: Path) -> None:
        self.loop = loop
        self.opts = opts
        self.logdir = logdir
        self.nodes: list[ChildNode] = []

    async def start(self, *names: str, **kw: Any) -> list[ChildNode]:
        nodes = [ChildNode(name, self.loop, self.opts, self.logdir, **kw) for name in names]
        self.nodes.extend(nodes)
        await asyncio.gather(*(n.start() for n in nodes))
        return nodes

    async def close(self) -> None:
        for node in self.nodes:  # SIGKILL anything stopped with SIGSTOP first
            if node.proc is not None and node.proc.returncode is None and _is_stopped(node.pid):
                node.signal(signal.SIGKILL)
        await asyncio.gather(*(n.stop() for n in self.nodes), return_exceptions=True)


def _is_stopped(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] in ("T", "t")
    except OSError:
        return False


@contextlib.asynccontextmanager
async def profiled(opts: argparse.Namespace, loop: str, phase: str, nodes: list[ChildNode]):
    if not opts.profile:
        yield
        return
    Path(opts.profile).mkdir(parents=True, exist_ok=True)
    await asyncio.gather(*(n.cmd("prof_on") for n in nodes))
    try:
        yield
    finally:
        await asyncio.gather(*(n.cmd("prof_off", path=str(Path(opts.profile) / f"{loop}-{phase}-{n.name}.prof"))
                               for n in nodes if n.proc is not None and n.proc.returncode is None
                               and not _is_stopped(n.pid)), return_exceptions=True)


async def settle(nodes: list[ChildNode], n: int, timeout: float = 120.0) -> None:
    """Every node's registry holds exactly `n` entries (after a sync barrier everywhere)."""
    await asyncio.gather(*(node.cmd("sync") for node in nodes))
    await asyncio.gather(*(node.cmd("wait_count", n=n, timeout=timeout) for node in nodes))


async def run_loop(loop: str, opts: argparse.Namespace, logdir: Path, res: dict[str, Any]) -> None:
    """Every phase with `loop` in every node; the figures go into `res` as they come."""
    phases = opts.only
    cluster = Cluster(loop, opts, logdir)
    try:
        if any(p in phases for p in ("rtt", "call", "latency", "churn", "throughput", "purge")):
            a, b, c = await cluster.start("A", "B", "C")
            log(loop, f"nodes up: {a.id} {b.id} {c.id} (pids {a.pid} {b.pid} {c.pid}; table {a.info['table']}, "
                      f"loop {a.info['loop']})")
            await b.cmd("connect", address=a.id)
            await c.cmd("connect", address=a.id)
            await asyncio.gather(*(x.cmd("wait_peers", n=2) for x in (a, b, c)))
            await settle([a, b, c], 0)
            abc = [a, b, c]

            if "rtt" in phases:
                log(loop, f"baseline: {opts.trials} bare TCP round trips A -> B")
                port = await b.cmd("echo_serve")
                res["rtt"] = await a.cmd("rtt_run", port=port, n=opts.trials, warmup=1000, timeout=120)

            if "call" in phases:
                log(loop, f"call: {opts.trials} calls A -> B")
                async with profiled(opts, loop, "call", [a, b]):
                    res["call"] = await a.cmd("call_run", peer=b.id, n=opts.trials, warmup=1000, timeout=120)

            if "latency" in phases:
                log(loop, f"latency: {opts.trials} registrations on A seen on B")
                await b.cmd("lat_sub", reply_node=a.id)
                try:
                    async with profiled(opts, loop, "latency", [a, b]):
                        res["latency"] = await a.cmd("lat_run", n=opts.trials, warmup=500, timeout=180)
                finally:
                    await b.cmd("lat_sub_stop")
                await settle(abc, 0)

            if "churn" in phases:
                log(loop, f"churn: {opts.churn_rate}/s registrations and exits on A for {opts.churn:g} s")
                before = await asyncio.gather(*(x.cmd("snapshot") for x in abc))
                async with profiled(opts, loop, "churn", abc):
                    sampling = [x.cmd("sample", duration=opts.churn, interval=opts.sample_every,
                                      timeout=opts.churn + 60) for x in abc]
                    driving = a.cmd("churn", duration=opts.churn, rate=opts.churn_rate, timeout=opts.churn + 60)
                    *samples, churn = await asyncio.gather(*sampling, driving)
                await settle(abc, 0)
                after = await asyncio.gather(*(x.cmd("snapshot") for x in abc))
                res["churn"] = {"driver": churn, "samples": dict(zip("ABC", samples)),
                                "before": dict(zip("ABC", before)), "after": dict(zip("ABC", after))}

            if "throughput" in phases:
                log(loop, f"throughput: {opts.tput_n} registrations on A, replicated to B and C")
                async with profiled(opts, loop, "throughput", abc):
                    t = await a.cmd("tput", n=opts.tput_n, batch=opts.batch, timeout=180)
                counts = await asyncio.gather(b.cmd("count"), c.cmd("count"))
                if counts != [opts.tput_n, opts.tput_n]:
                    raise ChildError(f"throughput: after sync B and C hold {counts}, want {opts.tput_n}")
                t["counts"] = counts
                res["throughput"] = t
                await a.cmd("release")
                await settle(abc, 0)

            if "purge" in phases:
                n = opts.purge_n
                log(loop, f"purge: C fills {n} entries, then SIGKILL")
                await c.cmd("hold", n=n, per_proc=1000, timeout=120)
                await c.cmd("sync", timeout=120)
                await asyncio.gather(*(x.cmd("wait_count", n=n, timeout=120) for x in (a, b)))
                await asyncio.gather(*(x.cmd("arm_purge", victim=c.id) for x in (a, b)))
                async with profiled(opts, loop, "purge", [a, b]):
                    t_kill = now_ns()
                    c.signal(signal.SIGKILL)
                    recs = await asyncio.gather(*(x.cmd("purge_result", victim=c.id) for x in (a, b)))
                res["purge_kill"] = {"t_signal": t_kill, "survivors": recs}

                log(loop, f"purge: D joins, fills {n} entries, then SIGSTOP (hung: detection by silence)")
                (d,) = await cluster.start("D")
                await d.cmd("connect", address=a.id)
                await asyncio.gather(*(x.cmd("wait_peers", n=2) for x in (a, b, d)))
                await d.cmd("hold", n=n, per_proc=1000, timeout=120)
                await d.cmd("sync", timeout=120)
                await asyncio.gather(*(x.cmd("wait_count", n=n, timeout=120) for x in (a, b)))
                await asyncio.gather(*(x.cmd("arm_purge", victim=d.id) for x in (a, b)))
                t_stop = now_ns()
                d.signal(signal.SIGSTOP)
                try:
                    recs = await asyncio.gather(*(x.cmd("purge_result", victim=d.id,
                                                        timeout=4 * opts.down_after + 10,
                                                        ) for x in (a, b)))
                finally:
                    d.signal(signal.SIGKILL)
                res["purge_stop"] = {"t_signal": t_stop, "survivors": recs, "down_after": opts.down_after}

        if "catchup" in phases:
            await cluster.close()
            cluster.nodes.clear()
            res["catchup"] = []
            # The same short tick/down_after as the other phases unless told otherwise: a
            # sync round streams in parts and blocks neither loop for long.
            (h,) = await cluster.start("H", tick=opts.catchup_tick, down_after=opts.catchup_down_after)
            held = 0
            for i, size in enumerate(opts.catchup_sizes):
                log(loop, f"catch-up: H fills to {size} entries; a new node connects")
                fill = await h.cmd("hold", n=size - held, per_proc=1000, timeout=300)
                held = size
                await h.cmd("gc_collect")
                await h.cmd("arm_sync_timing")
                (newcomer,) = await cluster.start(f"N{i + 1}", tick=opts.catchup_tick,
                                                  down_after=opts.catchup_down_after)
                await asyncio.gather(*(x.cmd("gc_pauses", reset=True) for x in (h, newcomer)))
                async with profiled(opts, loop, f"catchup{size}", [h, newcomer]):
                    limit = max(30.0, 30 * size / 1_000_000)
                    got = await newcomer.cmd("catchup", address=h.id, expect=size, timeout=limit + 30,
                                             limit=limit)
                got["holder"] = await h.cmd("sync_timing")
                got["gc_holder"], got["gc_new"] = await asyncio.gather(*(x.cmd("gc_pauses") for x in (h, newcomer)))
                got["size"] = size
                got["fill_seconds"] = fill["seconds"]
                res["catchup"].append(got)
                await newcomer.stop()
    finally:
        await cluster.close()


# =========================================================================== the table


def fmt_time(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    for scale, unit in ((1.0, "s"), (1e-3, "ms"), (1e-6, "us")):
        if abs(seconds) >= scale:
            return f"{seconds / scale:.3g} {unit}"
    return f"{seconds / 1e-9:.3g} ns"


def verdict(value: float | None, max_value: float | None = None, min_value: float | None = None) -> str:
    if value is None:
        return "n/a"
    if max_value is not None and value > max_value:
        return f"NO {value / max_value:.1f}x over"
    if min_value is not None and value < min_value:
        return f"NO {min_value / value:.1f}x under"
    return "yes"


@dataclasses.dataclass
class Line:
    label: str
    values: dict[str, str]
    target: str = ""
    met: dict[str, str] = dataclasses.field(default_factory=dict)


def build_lines(results: dict[str, dict], opts: argparse.Namespace) -> list[Line]:
    loops = list(results)
    lines: list[Line] = []

    def add(label: str, get: Callable[[dict], float | None], fmt: Callable[[float | None], str],
            target: str = "", max_value: float | None = None, min_value: float | None = None) -> None:
        values, met = {}, {}
        for loop in loops:
            try:
                v = get(results[loop])
            except (KeyError, IndexError, TypeError, ZeroDivisionError):
                v = None
            values[loop] = fmt(v)
            if target and (max_value is not None or min_value is not None):
                met[loop] = verdict(v, max_value, min_value)
        lines.append(Line(label, values, target, met))

    add(f"0 baseline: bare asyncio TCP round trip between two of these processes, p50 ({opts.trials})",
        lambda r: r["rtt"]["p50"], fmt_time)
    add("  p99", lambda r: r["rtt"]["p99"], fmt_time)
    add(f"1 register on A -> Join at B's subscriber, p50 ({opts.trials} trials)",
        lambda r: r["latency"]["p50"], fmt_time, "<= 100 us", 100e-6)
    add("  p99", lambda r: r["latency"]["p99"], fmt_time, "<= 500 us", 500e-6)
    add("  p50 / half the baseline round trip (a one-way trip)",
        lambda r: r["latency"]["p50"] / (r["rtt"]["p50"] / 2), lambda v: "-" if v is None else f"{v:.2f}x")
    add("  mean / max", lambda r: r["latency"]["mean"], fmt_time)
    lines[-1].values = {loop: _pair(results[loop], "latency", "mean", "max") for loop in loops}

    def rate(r: dict) -> float:
        t = r["throughput"]
        return opts.tput_n / ((t["t_end"] - t["t0"]) / 1e9)

    add(f"2 registrations/s replicated to 2 peers (N={opts.tput_n:,}, batch {opts.batch})", rate,
        lambda v: "-" if v is None else f"{v:,.0f}/s", ">= 200 000/s", min_value=200_000)
    add("  of which A registering locally", lambda r: (r["throughput"]["t_local"] - r["throughput"]["t0"]) / 1e9,
        fmt_time)
    add("  then until sync (B and C applied all)",
        lambda r: (r["throughput"]["t_end"] - r["throughput"]["t_local"]) / 1e9,
        fmt_time)

    for i, size in enumerate(opts.catchup_sizes):
        target_s = 0.2 if size <= 100_000 else 2.0 * size / 1_000_000
        add(f"3 catch-up, new node, {size:,} entries: connect -> count matches",
            lambda r, i=i: (r["catchup"][i]["t_done"] - r["catchup"][i]["t0"]) / 1e9, fmt_time,
            f"<= {fmt_time(target_s)}", target_s)
        add("  wire bytes per entry, all the new node received from it",
            lambda r, i=i: r["catchup"][i]["bytes_received"] / r["catchup"][i]["size"],
            lambda v: "-" if v is None else f"{v:.1f} B", "<= 60 B", 60)
        add("  wire bytes per entry when the count matched",
            lambda r, i=i: r["catchup"][i]["bytes_at_done"] / r["catchup"][i]["size"],
            lambda v: "-" if v is None else f"{v:.1f} B")
        add("  cyclic GC pauses during it: holder / new node",
            lambda r, i=i: 0, lambda v: "")
        lines[-1].values = {loop: _gc_pair(results[loop], i) for loop in loops}
        add("  holder: sync rounds sent: rows, parts, bytes, first -> last part (encode + queue)",
            lambda r, i=i: 0, lambda v: "")
        lines[-1].values = {loop: _catchup_holder(results[loop], i) for loop in loops}
        add("  new node: connected at; sync parts applied from -> to (time applying them)",
            lambda r, i=i: 0, lambda v: "")
        lines[-1].values = {loop: _catchup_new(results[loop], i) for loop in loops}

    add(f"4 purge: a SIGKILLed node's {opts.purge_n:,} entries gone after it is declared down (worst survivor)",
        lambda r: max(s["end"] - s["start"] for s in r["purge_kill"]["survivors"]) / 1e9, fmt_time,
        "<= 100 ms", 0.1)
    add("  detection: SIGKILL -> declared down (socket closed by the kernel)",
        lambda r: max(s["start"] - r["purge_kill"]["t_signal"] for s in r["purge_kill"]["survivors"]) / 1e9, fmt_time)
    add("  SIGKILL -> NodeDown at a monitor_nodes process",
        lambda r: max(s["nodedown"] - r["purge_kill"]["t_signal"] for s in r["purge_kill"]["survivors"]) / 1e9,
        fmt_time)
    add(f"  hung node (SIGSTOP): detection by silence (down_after {opts.down_after:g} s)",
        lambda r: max(s["start"] - r["purge_stop"]["t_signal"] for s in r["purge_stop"]["survivors"]) / 1e9,
        fmt_time, f"~ {opts.down_after:g} s")
    add("  hung node: purge after declared down",
        lambda r: max(s["end"] - s["start"] for s in r["purge_stop"]["survivors"]) / 1e9, fmt_time,
        "<= 100 ms", 0.1)

    add(f"5 call to a Server on another node, p50 ({opts.trials} calls)", lambda r: r["call"]["p50"], fmt_time,
        "<= 150 us", 150e-6)
    add("  p99", lambda r: r["call"]["p99"], fmt_time)
    add("  p50 / the baseline round trip", lambda r: r["call"]["p50"] / r["rtt"]["p50"],
        lambda v: "-" if v is None else f"{v:.2f}x")

    add(f"6 churn on A: {opts.churn_rate}/s registrations + exits for {opts.churn:g} s, achieved",
        lambda r: 0, lambda v: "")
    lines[-1].values = {loop: _churn_rate(results[loop]) for loop in loops}
    for node in "ABC":
        for metric, label, fmt in (("rss", "RSS MB", lambda v: f"{v / 1e6:.1f}"),
                                   ("objects", "gc objects", lambda v: f"{v / 1e3:.1f}k")):
            values, met = {}, {}
            for loop in loops:
                try:
                    churn = results[loop]["churn"]
                    samples = churn["samples"][node]
                    v0, v1 = churn["before"][node][metric], churn["after"][node][metric]
                except (KeyError, TypeError):
                    values[loop], met[loop] = "-", "n/a"
                    continue
                vals = [x[metric] for x in samples]
                growth, grew = slope_verdict([(x["t"], x[metric]) for x in samples])
                values[loop] = (f"{fmt(v0)} -> {fmt(v1)}; during {fmt(min(vals))}..{fmt(max(vals))}, "
                                f"trend {'+' if growth >= 0 else '-'}{fmt(abs(growth))}")
                met[loop] = "GREW" if grew else "flat"
            lines.append(Line(f"  {node}: {label} before -> after; during min..max, trend", values, "flat", met))
        values = {}
        for loop in loops:
            try:
                churn = results[loop]["churn"]
                counts = [x["count"] for x in churn["samples"][node]]
                procs = [x["procs"] for x in churn["samples"][node]]
                values[loop] = (f"{min(counts)}..{max(counts)} entries, {min(procs)}..{max(procs)} processes; "
                                f"after {churn['after'][node]['count']}")
            except (KeyError, TypeError, ValueError):
                values[loop] = "-"
        lines.append(Line(f"  {node}: table count and processes during the churn", values))
    return lines


def _pair(r: dict, phase: str, k1: str, k2: str) -> str:
    try:
        return f"{fmt_time(r[phase][k1])} / {fmt_time(r[phase][k2])}"
    except (KeyError, TypeError):
        return "-"


def _catchup_holder(r: dict, i: int) -> str:
    try:
        rounds = r["catchup"][i]["holder"]["rounds"]
        return "; ".join(
            f"{x['rows']:,} rows in {x['parts']} parts, {x['bytes'] / 1e6:.2f} MB, "
            f"over {fmt_time((x['last_at'] - x['first_at']) / 1e9)} (busy {fmt_time(x['busy_ns'] / 1e9)})"
            for x in rounds)
    except (KeyError, IndexError, TypeError):
        return "-"


def _catchup_new(r: dict, i: int) -> str:
    try:
        c = r["catchup"][i]
        t0 = c["t0"]
        parts = c["applied"]
        busy = sum(b - a for a, b in parts)
        return (f"{fmt_time((c['t_conn'] - t0) / 1e9)}; {len(parts)} parts applied from "
                f"+{fmt_time((parts[0][0] - t0) / 1e9)} to +{fmt_time((parts[-1][1] - t0) / 1e9)}, "
                f"busy {fmt_time(busy / 1e9)}")
    except (KeyError, IndexError, TypeError):
        return "-"


def _gc_pair(r: dict, i: int) -> str:
    try:
        c = r["catchup"][i]
        return " / ".join(f"{fmt_time(g['seconds'])} ({sum(g['collections'])} runs, {g['collections'][2]} full)"
                          for g in (c["gc_holder"], c["gc_new"]))
    except (KeyError, IndexError, TypeError):
        return "-"


def _churn_rate(r: dict) -> str:
    try:
        d = r["churn"]["driver"]
        return (f"{d['registered'] / d['seconds']:,.0f} reg/s, {d['exits'] / d['exit_seconds']:,.0f} exits/s "
                f"({d['late_ticks']} late 10 ms ticks)")
    except (KeyError, TypeError, ZeroDivisionError):
        return "-"


def print_table(lines: list[Line], loops: list[str]) -> None:
    headers = ["figure", *loops, "target", "met? (" + " / ".join(loops) + ")"]
    rows = [[ln.label, *(ln.values.get(loop, "-") for loop in loops), ln.target,
             " / ".join(ln.met[loop] for loop in loops) if ln.met else ""] for ln in lines]
    print_rows(headers, rows)


def print_rows(headers: list[str], rows: list[list[Any]]) -> None:
    """`rows` under `headers`, in columns as wide as their widest cell."""
    widths = [max(len(str(row[i])) for row in [headers, *rows]) for i in range(len(headers))]

    def fmt_row(row: list[str]) -> str:
        return " | ".join(str(cell).ljust(w) for cell, w in zip(row, widths)).rstrip()

    print(fmt_row(headers))
    print("-+-".join("-" * w for w in widths))
    for row in rows:
        print(fmt_row(row))


def machine() -> str:
    model = "unknown cpu"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    return f"{model}, {os.cpu_count()} cpus, Python {platform.python_version()}, load average {load}"


# =========================================================================== main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--loop", choices=("asyncio", "uvloop", "both"), default="both")
    p.add_argument("--quick", action="store_true", help="churn for 10 s (unless --churn is given)")
    p.add_argument("--churn", type=float, default=None, help="churn duration in seconds (default 60; 10 with --quick)")
    p.add_argument("--churn-rate", type=int, default=1000, help="registrations and exits per second (default 1000)")
    p.add_argument("--sample-every", type=float, default=None, help="seconds between memory samples (default 1)")
    p.add_argument("--trials", type=int, default=10_000, help="latency trials and calls (default 10 000)")
    p.add_argument("--tput-n", type=int, default=200_000, help="registrations in the throughput figure")
    p.add_argument("--batch", type=int, default=1000, help="registrations between yields to the loop (throughput)")
    p.add_argument("--purge-n", type=int, default=100_000)
    p.add_argument("--catchup-sizes", default="100000,1000000", help="comma-separated, increasing")
    p.add_argument("--tick", type=float, default=0.2, help="tick_interval of the nodes (default 0.2 s)")
    p.add_argument("--down-after", type=float, default=1.0, help="down_after of the nodes (default 1 s)")
    p.add_argument("--catchup-tick", type=float, help="tick_interval of the catch-up nodes (default: --tick)")
    p.add_argument("--catchup-down-after", type=float, help="down_after of the catch-up nodes (default: --down-after)")
    p.add_argument("--only", default=",".join(PHASES), help=f"comma-separated subset of {','.join(PHASES)}")
    p.add_argument("--profile", metavar="DIR", help="dump a cProfile per phase and node into DIR")
    p.add_argument("--json", metavar="FILE", help="also write the raw results as JSON")
    p.add_argument("--timeout", type=float, default=900.0, help="give up after this many seconds (default 900)")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--name", help=argparse.SUPPRESS)
    opts = p.parse_args(argv)
    if opts.child:
        return opts
    if opts.churn is None:
        opts.churn = 10.0 if opts.quick else 60.0
    if opts.sample_every is None:
        opts.sample_every = 1.0
    opts.only = [x.strip() for x in opts.only.split(",") if x.strip()]
    unknown = set(opts.only) - set(PHASES)
    if unknown:
        p.error(f"--only: unknown phase(s) {', '.join(sorted(unknown))}; choose from {', '.join(PHASES)}")
    if opts.catchup_tick is None:
        opts.catchup_tick = opts.tick
    if opts.catchup_down_after is None:
        opts.catchup_down_after = opts.down_after
    opts.catchup_sizes = sorted(int(x) for x in opts.catchup_sizes.split(",") if x.strip())
    return opts


async def main_async(opts: argparse.Namespace) -> int:
    loops = ["asyncio", "uvloop"] if opts.loop == "both" else [opts.loop]
    if "uvloop" in loops:
        try:
            import uvloop  # noqa: F401
        except ImportError:
            if opts.loop == "uvloop":
                raise SystemExit("uvloop is not installed (pip install -e '.[uvloop]')") from None
            print("uvloop is not installed: the standard loop only", file=sys.stderr)
            loops = ["asyncio"]
    os.environ["PGREGISTRY_COOKIE"] = secrets.token_urlsafe(24)
    logdir = Path(tempfile.mkdtemp(prefix="pgregistry-cluster-bench-"))
    results: dict[str, dict] = {}
    started = time.monotonic()
    failed = False
    for loop in loops:
        results[loop] = {}
        try:
            await run_loop(loop, opts, logdir, results[loop])
        except Exception as exc:  # noqa: BLE001 - report, keep the figures measured so far
            failed = True
            print(f"\n{loop}: the run failed: {exc}\n(children's logs in {logdir})", file=sys.stderr)
    log("all", f"done in {time.monotonic() - started:.0f} s; children's logs in {logdir}")
    if opts.json:
        Path(opts.json).write_text(json.dumps({"options": {k: v for k, v in vars(opts).items()}, "results": results},
                                              indent=1, default=str))
    print()
    print(f"pgregistry cluster bench: 3 nodes (separate OS processes) on loopback; tick {opts.tick:g} s, "
          f"down_after {opts.down_after:g} s")
    print_table(build_lines(results, opts), loops)
    for loop in loops:
        churn = results[loop].get("churn")
        if not churn:
            continue
        for node in "ABC":
            try:
                t0, t1 = churn["before"][node]["types"], churn["after"][node]["types"]
            except KeyError:
                continue
            diff = sorted(((t1.get(k, 0) - t0.get(k, 0), k) for k in set(t0) | set(t1)), reverse=True)
            top = ", ".join(f"{k} {d:+d}" for d, k in diff[:5] if d > 0)
            print(f"churn, {loop}, {node}: GC-tracked objects kept after the churn, by type: {top or 'none'}")
    print(machine())
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    if opts.child:
        _child_main(opts)
        return 0
    return run_main("cluster bench", lambda: main_async(opts), opts.timeout, _kill_leftovers)


if __name__ == "__main__":
    sys.exit(main())
