"""The node side of ``bench/names.py``: what each child process runs.

A child starts one node with a names service and answers one JSON command per line on
stdin with one JSON line on stdout (``cmd_*`` methods of `_NamesChild`). The parent in
``bench/names.py`` drives three or four of them.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import os
import signal
import sys
import time
import traceback
import tracemalloc
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from _runner import die_with_parent, reply, serve_commands  # noqa: E402  (bench/_runner.py)
from cluster import echo_round_trips, serve_echo, summarize  # noqa: E402  (bench/cluster.py: the statistics, the echo)

SERVICE = "names"


def now_ns() -> int:
    """One clock for every process of the machine, in ns."""
    return time.monotonic_ns()


def child_main(args: argparse.Namespace) -> None:
    """Run one node until its parent closes stdin (or dies)."""
    die_with_parent()  # and kill -USR2 <child>: its Python stack now, even with the loop blocked
    sys.path.insert(0, str(REPO))
    with asyncio.Runner() as runner:
        runner.run(_NamesChild(args).serve())


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _dump_tasks() -> None:
    """Print every task's stack and the names service's state to stderr (the child's log)."""
    for task in asyncio.all_tasks():
        task.print_stack(limit=8, file=sys.stderr)
    sys.stderr.flush()


async def _hold_forever() -> None:
    """A holder process: it runs until it is sent "stop"."""
    from pgregistry import receive

    msg = None
    while msg != "stop":
        msg = await receive()


class _NamesChild:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.holders: list[Any] = []
        self.mem: dict[str, Any] = {}

    async def serve(self) -> None:
        from pgregistry import Names, Node

        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=1 << 24)
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        node = Node(self.args.name, cookie=os.environ["PGREGISTRY_COOKIE"],
                    tick_interval=self.args.tick, down_after=self.args.down_after)
        loop.add_signal_handler(signal.SIGUSR1, _dump_tasks)  # kill -USR1 <child>: where is it waiting?
        async with node:
            self.node = node
            self.names = await Names.start(node, SERVICE, lease=self.args.lease)
            self._reply({"id": 0, "ok": True, "result": {"id": node.id, "pid": os.getpid()}})
            await serve_commands(reader, self._handle)

    def _reply(self, answer: dict[str, Any]) -> None:
        reply(answer)

    async def _handle(self, request: dict[str, Any]) -> None:
        t0 = time.monotonic()
        print(f"{time.strftime('%H:%M:%S')} {request['cmd']} ...", file=sys.stderr, flush=True)
        try:
            result = await getattr(self, "cmd_" + request["cmd"])(**request.get("args", {}))
            answer = {"id": request["id"], "ok": True, "result": result}
            print(f"{time.strftime('%H:%M:%S')} {request['cmd']} done in {time.monotonic() - t0:.3f} s",
                  file=sys.stderr, flush=True)
        except BaseException as exc:  # noqa: BLE001 - every failure goes back to the parent
            answer = {"id": request["id"], "ok": False, "error": "".join(traceback.format_exception(exc))[-4000:]}
            print(f"{time.strftime('%H:%M:%S')} {request['cmd']} failed: {answer['error']}", file=sys.stderr,
                  flush=True)
            if isinstance(exc, asyncio.CancelledError):
                self._reply(answer)
                raise
        self._reply(answer)

    def _holder(self) -> Any:
        """A new idle process of this node (a holder of names), kept until `cmd_release`."""
        pid = self.node.spawn(_hold_forever)
        self.holders.append(pid)
        return pid

    # -- plumbing ---------------------------------------------------------------------------

    async def cmd_connect(self, address: str) -> str:
        return await self.node.connect(address)

    async def cmd_join(self, peer: str, limit: float = 600.0) -> float:
        t0 = time.monotonic()
        await self.names.join(peer, timeout=limit)
        return time.monotonic() - t0

    async def cmd_wait_members(self, n: int, timeout: float = 30.0) -> list[str]:
        deadline = time.monotonic() + timeout
        while len(self.names.live_nodes()) < n or not self.names.core.serving or \
                not self.names.stat()["lease_valid"]:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.node.id}: names members {self.names.live_nodes()}, want {n}")
            await asyncio.sleep(0.01)
        return self.names.live_nodes()

    async def cmd_stat(self) -> dict[str, Any]:
        out = self.names.stat()
        core = self.names.core
        out["known"] = len(core._known)
        out["slots"] = sum(len(t) for t in core._tables)
        return out

    async def cmd_release(self, paced: bool = False) -> int:
        """Every holder of this node returns (its names are released); with `paced`, one
        holder at a time, the next once the previous one's releases are decided."""
        holders, self.holders = self.holders, []
        for pid in holders:
            self.node.runtime.send(pid, "stop")
            while paced and (self.names.core.busy() or self.node.runtime.process(pid) is not None):
                await asyncio.sleep(0.005)
        while self.names.core.grants or self.names.core.busy():
            await asyncio.sleep(0.01)
        return len(holders)

    async def cmd_wait_known(self, prefix: str, n: int, held: bool, limit: float = 120.0,
                             strict: bool = True) -> dict[str, Any]:
        """Until this node has learned `n` decided values of names starting with `prefix`,
        all held (`held`) or all free. After `limit` s: an error, or (not `strict`) how many."""
        t0 = time.monotonic()
        while True:
            known = self.names.core._known
            got = sum(1 for name, (_b, v) in known.items()
                      if type(name) is str and name.startswith(prefix) and (v[0] is not None) == held)
            if got >= n or (not strict and time.monotonic() - t0 > limit):
                return {"seconds": time.monotonic() - t0, "got": got, "n": n}
            if time.monotonic() - t0 > limit:
                raise TimeoutError(f"{self.node.id}: {got} of {n} {prefix!r} names learned after {limit} s")
            await asyncio.sleep(0.05)

    async def cmd_prof_on(self) -> None:
        import cProfile

        self.profiler = cProfile.Profile()
        self.profiler.enable()

    async def cmd_prof_off(self, path: str) -> None:
        self.profiler.disable()
        self.profiler.dump_stats(path)

    # -- rtt --------------------------------------------------------------------------------

    async def cmd_echo_serve(self) -> int:
        self.echo_server = await serve_echo()
        return int(self.echo_server.sockets[0].getsockname()[1])

    async def cmd_rtt_run(self, port: int, n: int, warmup: int) -> dict[str, Any]:
        return await echo_round_trips(port, n, warmup)

    # -- latency, whereis -------------------------------------------------------------------

    async def cmd_latency(self, n: int, warmup: int, prefix: str) -> dict[str, Any]:
        names, pid = self.names, self._holder()
        register = names.register_name
        samples = []
        for i in range(warmup + n):
            t0 = time.monotonic_ns()
            if not await register(f"{prefix}{i}", pid):
                raise RuntimeError(f"{prefix}{i} was not free")
            if i >= warmup:
                samples.append(time.monotonic_ns() - t0)
        out = summarize(samples)
        out["retries"] = names.core.retries
        return out

    async def cmd_take(self, name: str) -> str:
        pid = self._holder()
        if not await self.names.register_name(name, pid):
            raise RuntimeError(f"{name} was not free")
        return repr(pid)

    async def cmd_whereis(self, name: str, n: int, timeout: float = 10.0) -> dict[str, Any]:
        """ns per `whereis_name(name)` (best of 5 runs of `n` calls), once it answers a pid."""
        names = self.names
        deadline = time.monotonic() + timeout
        while names.whereis_name(name) is None:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.node.id}: whereis_name({name!r}) still None after {timeout} s")
            await asyncio.sleep(0.01)
        whereis = names.whereis_name
        runs = []
        chunk = 20_000  # then the loop runs: a node blocked for seconds would lose its lease
        for _ in range(5):
            spent = 0
            for start in range(0, n, chunk):
                t0 = time.perf_counter_ns()
                for _ in range(min(chunk, n - start)):
                    whereis(name)
                spent += time.perf_counter_ns() - t0
                await asyncio.sleep(0)
            runs.append(spent / n)
        return {"ns": min(runs), "runs": runs, "holder": repr(whereis(name))}

    # -- throughput -------------------------------------------------------------------------

    async def cmd_tput(self, n: int, concurrency: int, prefix: str, start_at: int = 0,
                       limit: float = 600.0) -> dict[str, Any]:
        """`n` register_name calls, `concurrency` in flight; after `limit` s no new one starts."""
        from pgregistry.errors import NoQuorum

        names = self.names
        keys = [f"{prefix}{i}" for i in range(n)]
        holders = [self._holder() for _ in range(max(1, n // 1000))]
        register = names.register_name
        it = iter(range(n))
        failed: list[str] = []
        done = [0, 0]  # registered, NoQuorum
        stat0 = names.stat()
        stop_at = [0.0]

        async def worker() -> None:
            for i in it:
                if time.monotonic() > stop_at[0]:
                    return
                try:
                    if not await register(keys[i], holders[i % len(holders)]):
                        failed.append(keys[i])
                    done[0] += 1
                except NoQuorum:
                    done[1] += 1

        if start_at:
            await asyncio.sleep(max(0.0, (start_at - time.monotonic_ns()) / 1e9))
        t0 = time.monotonic_ns()
        stop_at[0] = time.monotonic() + limit
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        t1 = time.monotonic_ns()
        stat1 = names.stat()
        if failed:
            raise RuntimeError(f"{len(failed)} names were not free, e.g. {failed[:3]}")
        return {"t0": t0, "t1": t1, "n": done[0], "asked": n, "no_quorum": done[1],
                "retries": stat1["retries"] - stat0["retries"],
                "messages": stat1["messages_sent"] - stat0["messages_sent"],
                "payloads": stat1["payloads_sent"] - stat0["payloads_sent"]}

    async def cmd_fill(self, n: int, prefix: str, concurrency: int = 500) -> dict[str, Any]:
        return await self.cmd_tput(n, concurrency, prefix)

    # -- lease traffic ----------------------------------------------------------------------

    async def cmd_idle_bytes(self, duration: float) -> dict[str, Any]:
        node, names = self.node, self.names

        def counters() -> tuple[int, int, int]:
            sent = sum((node.connection_stats(p) or {}).get("bytes_sent", 0) for p in node.peers())
            received = sum((node.connection_stats(p) or {}).get("bytes_received", 0) for p in node.peers())
            return sent, received, names.link.messages_out

        s0, r0, m0 = counters()
        t0 = time.monotonic()
        await asyncio.sleep(duration)
        s1, r1, m1 = counters()
        dt = time.monotonic() - t0
        return {"sent_per_s": (s1 - s0) / dt, "received_per_s": (r1 - r0) / dt, "names_msgs_per_s": (m1 - m0) / dt,
                "peers": len(node.peers()), "held": len(names.core.grants)}

    # -- memory -----------------------------------------------------------------------------

    async def cmd_mem_mark(self, label: str, trace: bool) -> dict[str, Any]:
        """Record RSS (and start tracemalloc, or read it) after a full collection."""
        gc.collect()
        rec: dict[str, Any] = {"rss": _rss(), "slots": sum(len(t) for t in self.names.core._tables),
                               "known": len(self.names.core._known), "piggy": len(self.names.core._piggy),
                               "grants": len(self.names.core.grants)}
        if trace:
            if tracemalloc.is_tracing():
                rec["traced"] = tracemalloc.get_traced_memory()[0]
            else:
                tracemalloc.start()
                rec["traced"] = 0
        self.mem[label] = rec
        return rec

    async def cmd_mem_get(self, label: str) -> dict[str, Any]:
        return dict(self.mem[label])

    async def cmd_leave(self, node_id: str, limit: float = 600.0) -> None:
        await self.names.leave(node_id, timeout=limit)

    async def cmd_mem_stop(self) -> None:
        tracemalloc.stop()

    # -- exit failover ----------------------------------------------------------------------

    async def cmd_exit_holder(self, name: str) -> int:
        """The holder of `name` (a process of this node, see `cmd_take`) returns; the time
        just before it is told to (it exits within this loop iteration)."""
        pid = self.names.whereis_name(name)
        if pid is None:
            raise RuntimeError(f"{name} is not held here")
        t = time.monotonic_ns()
        self.node.runtime.send(pid, "stop")
        return t

    async def cmd_poll_get_or_start(self, name: str, limit: float = 30.0) -> dict[str, Any]:
        """Poll ``get_or_start(name, ...)`` until it returns a process of this node."""
        names, node = self.names, self.node
        self.polling = asyncio.Event()
        polls = 0
        deadline = time.monotonic() + limit
        armed = False
        while True:
            pid = await names.get_or_start(name, _hold_forever, timeout=limit)
            polls += 1
            if not armed:
                armed = True
                self.polling.set()
            if node.runtime.is_local(pid):
                t = time.monotonic_ns()
                self.holders.append(pid)
                return {"t_won": t, "polls": polls}
            if time.monotonic() > deadline:
                raise TimeoutError(f"{node.id}: get_or_start({name!r}) still answers {pid} after {limit} s")
            await asyncio.sleep(0)

    async def cmd_contend(self, name: str, limit: float = 60.0) -> dict[str, Any]:
        """Loop ``register_name(name)`` until this node holds it (`cmd_kill` section)."""
        from pgregistry.errors import NoQuorum

        names = self.names
        pid = self._holder()
        deadline = time.monotonic() + limit
        tries = 0
        first_true_at = None
        while time.monotonic() < deadline:
            tries += 1
            try:
                won = await names.register_name(name, pid, timeout=1.0)
            except NoQuorum:
                won = False
            if won:
                first_true_at = time.monotonic_ns()
                break
            await asyncio.sleep(0.001)
        if first_true_at is None:
            raise TimeoutError(f"{self.node.id}: {name!r} not won within {limit} s")
        return {"t_won": first_true_at, "tries": tries, "step_downs": names.stat()["step_downs"]}

    # -- join -------------------------------------------------------------------------------

    async def cmd_writer_start(self, prefix: str) -> None:
        """Register fresh names one after the other until `cmd_writer_stop`; record each end."""
        names, pid = self.names, self._holder()
        self.writes: list[int] = []
        self.write_errors = 0
        self.holders_killed = 0
        self.writing = True

        async def write() -> None:
            from pgregistry.errors import NoQuorum

            nonlocal pid
            i = 0
            while self.writing:
                if self.node.runtime.process(pid) is None:  # killed: its name was lost (on_lost="kill")
                    self.holders_killed += 1
                    pid = self._holder()
                try:
                    await names.register_name(f"{prefix}{i}", pid, timeout=600.0)
                except NoQuorum:
                    self.write_errors += 1
                self.writes.append(time.monotonic_ns())
                i += 1

        self.writer = asyncio.ensure_future(write())
        while len(self.writes) < 20:
            await asyncio.sleep(0.005)

    async def cmd_writer_stop(self, t0: int, t1: int, limit: float = 30.0) -> dict[str, Any]:
        """Stop the writer; the longest gap between two writes ending in [t0, t1] (or after).
        A write still paused `limit` s after t1 counts as a gap ending now ("still_paused")."""
        deadline = time.monotonic() + limit
        while not [w for w in self.writes if w > t1] and time.monotonic() < deadline:
            await asyncio.sleep(0.005)
        self.writing = False
        still_paused = not [w for w in self.writes if w > t1]
        if still_paused:
            self.writer.cancel()
            self.writes.append(time.monotonic_ns())
        with contextlib.suppress(asyncio.CancelledError):
            await self.writer
        ws = [w for w in self.writes if w >= t0]
        before = [w for w in self.writes if w < t0]
        if before:
            ws.insert(0, before[-1])
        gaps = [(b - a, a) for a, b in zip(ws, ws[1:])]
        gap, at = max(gaps) if gaps else (0, t0)
        return {"max_gap": gap / 1e9, "gap_start": at, "writes": len(ws), "errors": self.write_errors,
                "holders_killed": self.holders_killed, "still_paused": still_paused,
                "steady_p50": summarize([b - a for a, b in zip(before, before[1:])]).get("p50")}

    async def cmd_peer_bytes(self) -> dict[str, int]:
        return {p: (self.node.connection_stats(p) or {}).get("bytes_received", 0) for p in self.node.peers()}


