"""Names benchmark: `pgregistry.names.Names` on three nodes in separate OS processes, against its targets.

Usage, from the repository root::

    .venv/bin/python bench/names.py                    # every section (a few minutes)
    .venv/bin/python bench/names.py --quick            # small sizes (a smoke test, well under a minute)
    .venv/bin/python bench/names.py --only latency,whereis --trials 5000
    .venv/bin/python bench/names.py --big              # the join section with 1 000 000 names too
    .venv/bin/python bench/names.py --json out.json    # the raw figures too

Like ``bench/cluster.py`` (whose child plumbing and table helpers it reuses), the parent
runs no node: each node is this script re-executed with ``--child``, driven by one JSON
command per line on stdin, answering one JSON line on stdout. Nodes A, B, C (full mesh)
each start a names service ``"names"`` with ``--lease`` (3 s) and B and C join A's
cluster. Cross-process times are ``time.monotonic_ns()`` (one clock for the machine).

Sections (``--only``), in the order they run:

``rtt``       bare asyncio echo round trip A -> B (no pgregistry), the baseline.
``latency``   sequential ``register_name`` of fresh names on A, p50/p99.
``whereis``   ``whereis_name`` on A of a name held on A, and of one held on B.
``tput``      registrations/s on A with ``--concurrency`` calls in flight, then on A, B
              and C at once (each its own names).
``lease``     bytes/s A sends to B and C while idle, with no names held, then with
              ``--lease-n`` names held on A.
``memory``    RSS and tracemalloc growth on A, B and C while A takes ``--mem-n`` names,
              and what is left once they are released (the tombstones).
``exit``      a holder process on C exits; a contender on A polling ``get_or_start``
              gets the name: time from the exit, in baseline round trips.
``kill``      a holder on C, C gets SIGKILL while a contender on A loops ``register_name``:
              time from the kill until the contender holds the name.
``join``      per ``--join-sizes`` (10 000 and 100 000; ``--big`` adds 1 000 000), on a
              fresh cluster A, B, C: A holds that many names, a writer on B registers
              fresh names one after the other, a fresh node D joins: the join's
              duration, the longest gap between two writes, bytes D received per name,
              step-downs anywhere (``names.stat()["step_downs"]``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import os
import secrets
import signal
import sys
import tempfile
import time
import traceback
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import cluster  # noqa: E402  (bench/cluster.py: child plumbing, statistics and the table)
from cluster import Line, fmt_time, log, machine, summarize, verdict  # noqa: E402

SERVICE = "names"
SECTIONS = ("rtt", "latency", "whereis", "tput", "lease", "memory", "exit", "kill", "join")


def now_ns() -> int:
    return time.monotonic_ns()


# =========================================================================== child node


def _child_main(args: argparse.Namespace) -> None:
    with contextlib.suppress(Exception):  # die with the parent, even while busy
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        if os.getppid() == 1:
            raise SystemExit(1)
    sys.path.insert(0, str(REPO))
    import faulthandler

    faulthandler.register(signal.SIGUSR2)  # kill -USR2 <child>: its Python stack now, even with the loop blocked
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
    from pgregistry import receive

    while await receive() != "stop":
        pass


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
            tasks = set()
            while True:
                line = await reader.readline()
                if not line:
                    break
                task = asyncio.ensure_future(self._handle(json.loads(line)))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            for task in list(tasks):
                task.cancel()

    def _reply(self, answer: dict[str, Any]) -> None:
        sys.stdout.write(json.dumps(answer) + "\n")
        sys.stdout.flush()

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
        loop = asyncio.get_running_loop()

        class Echo(asyncio.Protocol):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                self.transport = cast(asyncio.Transport, transport)

            def data_received(self, data: bytes) -> None:
                self.transport.write(data)

        self.echo_server = await loop.create_server(Echo, "127.0.0.1", 0)
        return int(self.echo_server.sockets[0].getsockname()[1])

    async def cmd_rtt_run(self, port: int, n: int, warmup: int) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        waiting: list[asyncio.Future[None]] = []

        class Client(asyncio.Protocol):
            def data_received(self, data: bytes) -> None:
                if waiting and not waiting[0].done():
                    waiting[0].set_result(None)

        transport, _protocol = await loop.create_connection(Client, "127.0.0.1", port)
        samples = []
        try:
            for i in range(warmup + n):
                waiting[:] = [loop.create_future()]
                t0 = time.monotonic_ns()
                transport.write(b"01234567")
                await asyncio.wait_for(waiting[0], 5.0)
                if i >= warmup:
                    samples.append(time.monotonic_ns() - t0)
        finally:
            transport.close()
        return summarize(samples)

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
        for _ in range(5):
            t0 = time.perf_counter_ns()
            for _ in range(n):
                whereis(name)
            runs.append((time.perf_counter_ns() - t0) / n)
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
        return {"t_won": first_true_at, "tries": tries, "step_downs": names.counters["step_downs"]}

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


# =========================================================================== parent side


class NamesChild(cluster.ChildNode):
    """A child node running this script (`cluster.ChildNode` starts cluster.py)."""

    async def start(self, timeout: float = 30.0) -> NamesChild:
        args = [sys.executable, str(Path(__file__).resolve()), "--child", "--name", self.name,
                "--tick", str(self.tick), "--down-after", str(self.down_after), "--lease", str(self.opts.lease)]
        with open(self.log_path, "ab") as logf:
            self.proc = await asyncio.create_subprocess_exec(
                *args, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=logf,
                cwd=REPO, limit=1 << 24)
        self.pid = self.proc.pid
        cluster._LIVE_CHILDREN.add(self.pid)
        ready: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._waiting[0] = ready
        self._reader = asyncio.ensure_future(self._read())
        try:
            info = await asyncio.wait_for(ready, timeout)
        except TimeoutError:
            raise cluster.ChildError(f"node {self.name} did not start within {timeout} s; "
                                     f"log:\n{self.log_tail()}") from None
        self.id = info["id"]
        self.info = info
        return self


async def start_nodes(nodes: list[NamesChild], *names: str, opts: argparse.Namespace,
                      logdir: Path) -> list[NamesChild]:
    new = [NamesChild(name, "asyncio", opts, logdir) for name in names]
    nodes.extend(new)
    await asyncio.gather(*(n.start() for n in new))
    return new


@contextlib.asynccontextmanager
async def profiled(opts: argparse.Namespace, section: str, nodes: list[NamesChild]) -> Any:
    if not opts.profile:
        yield
        return
    Path(opts.profile).mkdir(parents=True, exist_ok=True)
    await asyncio.gather(*(n.cmd("prof_on") for n in nodes))
    try:
        yield
    finally:
        await asyncio.gather(*(n.cmd("prof_off", path=str(Path(opts.profile) / f"{section}-{n.name}.prof"))
                               for n in nodes if n.proc is not None and n.proc.returncode is None),
                             return_exceptions=True)


async def learned(nodes: list[NamesChild], prefix: str, n: int, held: bool, limit: float = 1200.0,
                  strict: bool = True) -> list[dict[str, Any]]:
    """Every node of `nodes` learned `n` names of `prefix` held (or all free); with `strict`
    False, how many each had learned after `limit` s."""
    return list(await asyncio.gather(*(
        x.cmd("wait_known", prefix=prefix, n=n, held=held, limit=limit, strict=strict, timeout=limit + 60)
        for x in nodes)))


async def start_cluster(nodes: list[NamesChild], opts: argparse.Namespace, logdir: Path,
                        suffix: str = "") -> list[NamesChild]:
    """Nodes A, B, C (names with `suffix`): one names cluster of three members."""
    a, b, c = await start_nodes(nodes, *(x + suffix for x in "ABC"), opts=opts, logdir=logdir)
    for x in (b, c):
        await x.cmd("connect", address=a.id)
        await x.cmd("join", peer=a.id, limit=30.0)
    await asyncio.gather(*(x.cmd("wait_members", n=3) for x in (a, b, c)))
    log("names", f"cluster up: {a.id} {b.id} {c.id} (lease {opts.lease:g} s)")
    return [a, b, c]


async def stop_all(nodes: list[NamesChild]) -> None:
    """Stop every node started so far (SIGKILL for a stopped one) and forget them."""
    for node in nodes:
        if node.proc is not None and node.proc.returncode is None and cluster._is_stopped(node.pid):
            node.signal(signal.SIGKILL)
    await asyncio.gather(*(n.stop() for n in nodes), return_exceptions=True)
    nodes.clear()


async def replace_cluster(nodes: list[NamesChild], opts: argparse.Namespace, logdir: Path,
                          suffix: str) -> list[NamesChild]:
    """Stop every node and start a fresh cluster A, B, C (node names with `suffix`)."""
    await stop_all(nodes)
    return await start_cluster(nodes, opts, logdir, suffix)


async def section_failed(res: dict[str, Any], section: str, exc: BaseException, nodes: list[NamesChild],
                         opts: argparse.Namespace, logdir: Path) -> list[NamesChild]:
    """Record why `section` failed, then start a fresh cluster for the sections after it."""
    log("names", f"{section} FAILED: {str(exc)[-400:]}")
    res.setdefault("errors", {})[section] = str(exc)[-2000:]
    await stop_all(nodes)
    return await start_cluster(nodes, opts, logdir, f"-{section}")


async def run(opts: argparse.Namespace, logdir: Path, res: dict[str, Any]) -> None:
    only = opts.only
    nodes: list[NamesChild] = []
    try:
        a, b, c = await start_cluster(nodes, opts, logdir)
        abc = [a, b, c]

        # The baseline always runs: every ratio needs it.
        port = await b.cmd("echo_serve")
        res["rtt"] = await a.cmd("rtt_run", port=port, n=opts.trials, warmup=500, timeout=120)

        if "latency" in only:
            try:
                log("names", f"latency: {opts.trials} sequential register_name on A")
                async with profiled(opts, "latency", abc):
                    res["latency"] = await a.cmd("latency", n=opts.trials, warmup=200, prefix="lat-", timeout=600)
            except (cluster.ChildError, TimeoutError) as exc:
                a, b, c = abc = await section_failed(res, "latency", exc, nodes, opts, logdir)

        if "whereis" in only:
            try:
                log("names", "whereis_name on A: a name held on A, one held on B")
                await a.cmd("take", name="where-local")
                await b.cmd("take", name="where-remote")
                res["whereis"] = {
                    "local": await a.cmd("whereis", name="where-local", n=opts.whereis_n),
                    "remote": await a.cmd("whereis", name="where-remote", n=opts.whereis_n),
                }
            except (cluster.ChildError, TimeoutError) as exc:
                a, b, c = abc = await section_failed(res, "whereis", exc, nodes, opts, logdir)

        if "tput" in only:
            try:
                n = opts.tput_n
                log("names", f"throughput: {n} register_name on A, {opts.concurrency} in flight")
                async with profiled(opts, "tput1", abc):
                    res["tput1"] = await a.cmd("tput", n=n, concurrency=opts.concurrency, prefix="t1-", timeout=600)
                log("names", f"throughput: {n} register_name on each of A, B, C at once")
                start_at = now_ns() + 200_000_000
                async with profiled(opts, "tput3", abc):
                    res["tput3"] = await asyncio.gather(*(
                        x.cmd("tput", n=n, concurrency=opts.concurrency, prefix=f"t3{x.name}-", start_at=start_at,
                              limit=opts.tput_limit, timeout=opts.tput_limit + 120) for x in abc))
            except (cluster.ChildError, TimeoutError) as exc:
                a, b, c = abc = await section_failed(res, "tput", exc, nodes, opts, logdir)
            else:
                # Releasing every holder at once launches tens of thousands of release rounds
                # together (see the report): the next sections start from a fresh cluster.
                a, b, c = abc = await replace_cluster(nodes, opts, logdir, "-lease")

        if "lease" in only:
            try:
                log("names", f"lease traffic: idle {opts.idle:g} s with 0 names, then with {opts.lease_n}")
                await asyncio.sleep(opts.lease)  # the joins' traffic is over
                idle0 = await asyncio.gather(*(x.cmd("idle_bytes", duration=opts.idle, timeout=opts.idle + 30)
                                               for x in abc))
                await a.cmd("fill", n=opts.lease_n, prefix="lease-", timeout=1200)
                await learned([b, c], "lease-", opts.lease_n, True)
                await asyncio.sleep(opts.lease)
                idle1 = await asyncio.gather(*(x.cmd("idle_bytes", duration=opts.idle, timeout=opts.idle + 30)
                                               for x in abc))
                res["lease"] = {"n": opts.lease_n, "empty": dict(zip("ABC", idle0)), "held": dict(zip("ABC", idle1))}
            except (cluster.ChildError, TimeoutError) as exc:
                a, b, c = abc = await section_failed(res, "lease", exc, nodes, opts, logdir)
            else:
                a, b, c = abc = await replace_cluster(nodes, opts, logdir, "-memory")

        if "memory" in only:
            try:
                n = opts.mem_n
                log("names", f"memory: A takes {n} names; A, B, C measure")
                await asyncio.sleep(0.5)
                await asyncio.gather(*(x.cmd("mem_mark", label="before", trace=True) for x in abc))
                await a.cmd("fill", n=n, prefix="mem-", timeout=1200)
                await learned([b, c], "mem-", n, True)
                held = await asyncio.gather(*(x.cmd("mem_mark", label="held", trace=True) for x in abc))
                await a.cmd("release", paced=True, timeout=1200)
                # Every release must become a free value everywhere; a name still shown held by its
                # dead holder after 3 leases is counted (see README: a release decided by a read).
                free = await learned(abc, "mem-", n, False, limit=3 * opts.lease, strict=False)
                await asyncio.sleep(0.5)
                freed = await asyncio.gather(*(x.cmd("mem_mark", label="freed", trace=True) for x in abc))
                await asyncio.gather(*(x.cmd("mem_stop") for x in abc))
                before = await asyncio.gather(*(x.cmd("mem_get", label="before") for x in abc))
                res["memory"] = {"n": n, "before": dict(zip("ABC", before)), "held": dict(zip("ABC", held)),
                                 "freed": dict(zip("ABC", freed)), "free_learned": dict(zip("ABC", free))}
            except (cluster.ChildError, TimeoutError) as exc:
                a, b, c = abc = await section_failed(res, "memory", exc, nodes, opts, logdir)

        if "exit" in only:
            try:
                log("names", f"exit failover: a holder on C exits, A polls get_or_start ({opts.exit_trials} trials)")
                trials = []
                for i in range(opts.exit_trials):
                    name = f"exit-{i}"
                    await c.cmd("take", name=name)
                    poll = asyncio.ensure_future(a.cmd("poll_get_or_start", name=name, limit=30.0, timeout=40))
                    await asyncio.sleep(0.05)  # A polls, sees C's holder
                    t_exit = await c.cmd("exit_holder", name=name)
                    got = await poll
                    trials.append({"seconds": (got["t_won"] - t_exit) / 1e9, "polls": got["polls"]})
                res["exit"] = trials
            except (cluster.ChildError, TimeoutError) as exc:
                a, b, c = abc = await section_failed(res, "exit", exc, nodes, opts, logdir)

        if "kill" in only:
            try:
                log("names", f"kill failover: C holds a name, gets SIGKILL; A loops register_name "
                             f"({opts.lease:g} s lease)")
                await c.cmd("take", name="kill-me")
                await a.cmd("whereis", name="kill-me", n=1)
                contend = asyncio.ensure_future(a.cmd("contend", name="kill-me", limit=60.0, timeout=90))
                await asyncio.sleep(0.3)
                t_kill = now_ns()
                c.signal(signal.SIGKILL)
                got = await contend
                res["kill"] = {"seconds": (got["t_won"] - t_kill) / 1e9, "tries": got["tries"]}
            except (cluster.ChildError, TimeoutError) as exc:
                a, b, c = abc = await section_failed(res, "kill", exc, nodes, opts, logdir)

        if "join" in only:
            try:
                # On a fresh cluster per size: the tables then hold the join's names only.
                await stop_all(nodes)
                for n in opts.join_sizes:
                    log("names", f"join: a fresh cluster, A holds {n} names, B writes, D joins")
                    a, b, c = await start_cluster(nodes, opts, logdir, f"{n}")
                    abc = [a, b, c]
                    await a.cmd("fill", n=n, prefix=f"join{n}-", timeout=3600)
                    await learned([b, c], f"join{n}-", n, True)
                    (d,) = await start_nodes(nodes, f"D{n}", opts=opts, logdir=logdir)
                    await d.cmd("connect", address=a.id)
                    await asyncio.sleep(0.3)
                    stat0 = await asyncio.gather(*(x.cmd("stat") for x in abc))
                    bytes0 = await d.cmd("peer_bytes")
                    await b.cmd("writer_start", prefix=f"jw{n}-")
                    record: dict[str, Any] = {"n": n}
                    res.setdefault("join", []).append(record)
                    async with profiled(opts, f"join{n}", [*abc, d]):
                        t0 = now_ns()
                        try:
                            await d.cmd("join", peer=a.id, limit=opts.join_limit, timeout=opts.join_limit + 60)
                            record["seconds"] = (now_ns() - t0) / 1e9
                        except cluster.ChildError as exc:
                            record["unfinished"] = f"{(now_ns() - t0) / 1e9:.0f} s"
                            record["error"] = str(exc)[-1000:]
                        t1 = now_ns()
                    record["d_stat"] = await d.cmd("stat")
                    bytes1 = await d.cmd("peer_bytes")
                    record["bytes"] = sum(bytes1.get(p, 0) - bytes0.get(p, 0) for p in bytes1)
                    record["writer"] = await b.cmd("writer_stop", t0=t0, t1=t1, limit=30.0, timeout=90)
                    await asyncio.sleep(opts.lease)  # a lapse caused by the join would show by now
                    stat1 = await asyncio.gather(*(x.cmd("stat") for x in [*abc, d]))
                    record["step_downs"] = {x.name: s1["step_downs"] - (stat0[i]["step_downs"] if i < 3 else 0)
                                            for i, (x, s1) in enumerate(zip([*abc, d], stat1))}
                    record["members"] = stat1[0]["members"]
                    await stop_all(nodes)
            except (cluster.ChildError, TimeoutError) as exc:
                a, b, c = abc = await section_failed(res, "join", exc, nodes, opts, logdir)
    finally:
        await stop_all(nodes)


# =========================================================================== the table


def _get(res: dict[str, Any], fn: Callable[[dict[str, Any]], Any]) -> Any:
    try:
        return fn(res)
    except (KeyError, IndexError, TypeError, ZeroDivisionError, ValueError):
        return None


def _dig(obj: Any, *path: str) -> Any:
    """``obj[p0][p1]...``, or None where a part is missing."""
    for p in path:
        if not isinstance(obj, dict) or p not in obj:
            return None
        obj = obj[p]
    return obj


def _per(mem: dict[str, Any], label: str, who: str, counter: str, n: int) -> float | None:
    """Bytes per name of `counter` on node `who`: mark `label` minus the mark "before"."""
    after, before = _dig(mem, label, who, counter), _dig(mem, "before", who, counter)
    return None if after is None or before is None else (after - before) / n


def _x(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f} RTT"


def _bytes(v: float | None) -> str:
    return "-" if v is None else f"{v:,.0f} B"


def _rate(v: float | None) -> str:
    return "-" if v is None else f"{v:,.0f}/s"


def build_lines(res: dict[str, Any], opts: argparse.Namespace) -> list[Line]:
    """One `Line` per figure: value, target (with the baseline it is relative to), met?"""
    lines: list[Line] = []
    rtt = _get(res, lambda r: r["rtt"]["p50"])
    rtt_s = f"RTT = {fmt_time(rtt)}" if rtt else ""

    def add(label: str, value: Any, fmt: Callable[[Any], str], target: str = "", max_value: float | None = None,
            min_value: float | None = None, baseline: str = "", text: str | None = None) -> None:
        """A line; `text` (if given) is shown instead of ``fmt(value)``."""
        met = {"": verdict(value, max_value, min_value)} if (max_value is not None or min_value is not None) else {}
        lines.append(Line(label, {"": fmt(value) if text is None else text, "baseline": baseline}, target, met))

    add(f"0 bare asyncio TCP round trip A -> B (RTT), p50 ({opts.trials})", rtt, fmt_time)
    add("  p99", _get(res, lambda r: r["rtt"]["p99"]), fmt_time)

    lat = res.get("latency")
    if lat:
        p50, p99 = lat.get("p50"), lat.get("p99")
        t50 = 2 * rtt + 100e-6 if rtt else None
        t99 = 5 * rtt if rtt else None
        add(f"1 register_name on A, fresh names, sequential, p50 ({opts.trials})", p50, fmt_time,
            "<= 2 RTT + 100 us" + (f" = {fmt_time(t50)}" if t50 else ""), t50, baseline=rtt_s)
        add("  p50 in RTT", p50 / rtt if rtt and p50 else None, _x)
        add("  p99", p99, fmt_time, "<= 5 RTT" + (f" = {fmt_time(t99)}" if t99 else ""), t99, baseline=rtt_s)
        add("  p99 in RTT", p99 / rtt if rtt and p99 else None, _x)
        add("  mean / max", None, str, text=f"{fmt_time(lat.get('mean'))} / {fmt_time(lat.get('max'))}")
        add("  rounds retried (whole run on A)", lat.get("retries"), lambda v: "-" if v is None else str(v))

    w = res.get("whereis")
    if w:
        add(f"2 whereis_name on A, holder on A ({opts.whereis_n:,} calls, best of 5)",
            _get(w, lambda r: r["local"]["ns"] / 1e9), fmt_time, "<= 0.5 us", 0.5e-6)
        add("  holder on B", _get(w, lambda r: r["remote"]["ns"] / 1e9), fmt_time, "<= 0.5 us", 0.5e-6)

    if "tput1" in res:
        one = _get(res, lambda r: r["tput1"]["n"] / ((r["tput1"]["t1"] - r["tput1"]["t0"]) / 1e9))
        add(f"3 register_name/s from A, {opts.tput_n:,} names, {opts.concurrency} in flight", one, _rate,
            ">= 10 000/s", min_value=10_000)
        add("  core messages sent by A per registration",
            _get(res, lambda r: r["tput1"]["messages"] / r["tput1"]["n"]),
            lambda v: "-" if v is None else f"{v:.2f} (in {res['tput1']['payloads']:,} payloads)")
        add("  rounds retried", _get(res, lambda r: r["tput1"]["retries"]), lambda v: "-" if v is None else str(v))
        three = _get(res, lambda r: sum(x["n"] for x in r["tput3"])
                     / ((max(x["t1"] for x in r["tput3"]) - min(x["t0"] for x in r["tput3"])) / 1e9))
        add("  from A, B and C at once (total)", three, _rate,
            ">= 1.5x one node" + (f" = {1.5 * one:,.0f}/s" if one else ""),
            min_value=1.5 * one if one else None, baseline=f"one node {_rate(one)}")
        add("  three nodes / one node", three / one if three and one else None,
            lambda v: "-" if v is None else f"{v:.2f}x")
        add("  done / asked / NoQuorum (A, B, C)", None, str,
            text="-" if "tput3" not in res else "; ".join(
                f"{x['n']:,}/{x['asked']:,}/{x['no_quorum']:,}" for x in res["tput3"]),
            target=f"all within {opts.tput_limit:g} s")
        if "tput3" in res:
            lines[-1].met = {"": "yes" if all(x["n"] == x["asked"] for x in res["tput3"]) else "NO"}
        add("  rounds retried (A, B, C)", None, str,
            text="-" if "tput3" not in res else ", ".join(str(x["retries"]) for x in res["tput3"]))

    le = res.get("lease")
    if le:
        for who in "ABC":
            e = _dig(le, "empty", who, "sent_per_s")
            h = _dig(le, "held", who, "sent_per_s")
            label = (f"4 idle bytes/s sent by {who} to its peers, 0 names" if who == "A"
                     else f"  by {who}, 0 names")
            add(label, e, _bytes)
            add(f"  by {who}, {le['n']:,} names held on A", h, _bytes, "independent of N",
                max_value=(e * 1.1 + 100) if e else None, baseline=f"0 names: {_bytes(e)}")
        add("  names messages/s sent by A, 0 / N names", None, str,
            text=f"{le['empty']['A']['names_msgs_per_s']:.1f} / {le['held']['A']['names_msgs_per_s']:.1f}")

    mem = res.get("memory")
    if mem:
        n = mem["n"]
        for i, who in enumerate("ABC"):
            role = "holder, member" if who == "A" else "member"
            rss = _per(mem, "held", who, "rss", n)
            tm = _per(mem, "held", who, "traced", n)
            add(f"6 memory per held name on {who} ({role}), {n:,} names: tracemalloc" if i == 0
                else f"  on {who} ({role}): tracemalloc", tm, _bytes, "<= 300 B", 300)
            add("    RSS", rss, _bytes, "<= 300 B", 300)
            ttm = _per(mem, "freed", who, "traced", n)
            trss = _per(mem, "freed", who, "rss", n)
            add("    left per released name (tombstone): tracemalloc / RSS", None, str,
                text=f"{_bytes(ttm)} / {_bytes(trss)}")
        stuck = {}
        for who in "ABC":
            got = _dig(mem, "free_learned", who)
            stuck[who] = None if got is None else got["n"] - got["got"]
        add(f"  released names still known as held by their dead holder {3 * opts.lease:g} s later (A, B, C)",
            None, str, "0", text=", ".join(str(x) for x in stuck.values()))
        lines[-1].met = {"": "yes" if not any(stuck.values()) else "NO"}

    ex = res.get("exit")
    if ex:
        secs = sorted(t["seconds"] for t in ex)
        med = secs[len(secs) // 2]
        add(f"5b holder process on C exits -> A's get_or_start holds it, median of {len(secs)}", med, fmt_time)
        add("  in RTT (median / worst)", med / rtt if rtt else None,
            lambda v: "-" if v is None else f"{v:.2f} / {secs[-1] / rtt:.2f} RTT", "<= 4 RTT", 4.0,
            baseline=rtt_s)

    k = res.get("kill")
    if k:
        add(f"5a SIGKILL the holder's node C -> A's register_name loop holds it (lease {opts.lease:g} s)",
            k["seconds"], fmt_time, f"<= lease + 0.5 s = {opts.lease + 0.5:g} s", opts.lease + 0.5)
    for j in res.get("join", []):
        n = j["n"]
        w = j.get("writer") or {}
        add(f"7 D joins while A holds {n:,} names (fresh cluster): join() duration", j.get("seconds"), fmt_time,
            text=None if "unfinished" in j else None)
        if "unfinished" in j:
            lines[-1].values[""] = f"unfinished after {j['unfinished']} (--join-limit)"
            lines[-1].met = {"": "NO"}
        add("  writes on B paused (longest gap between two register_name)", w.get("max_gap"), fmt_time,
            baseline=f"a write otherwise {fmt_time(w.get('steady_p50'))}")
        if w.get("still_paused"):
            lines[-1].values[""] += " (still paused at the end)"
        add("  bytes D received per name", j["bytes"] / n if "bytes" in j else None,
            lambda v: "-" if v is None else f"{v:,.1f} B")
        steps = j.get("step_downs") or {}
        add("  step-downs (A, B, C, D)", None, str, "0", text=", ".join(str(x) for x in steps.values()))
        lines[-1].met = {"": "yes" if steps and not any(steps.values()) else "NO"}
        add("  B's writer: holders killed / writes failing with NoQuorum", None, str,
            text=f"{w.get('holders_killed')} / {w.get('errors')}")

    for section, error in (res.get("errors") or {}).items():
        first = [ln for ln in error.splitlines() if ln.strip()][-1:] or ["?"]
        add(f"{section}: FAILED (the section's cluster was replaced)", None, str, text=first[0][-100:])
        lines[-1].met = {"": "NO"}
    return lines


def print_table(lines: list[Line]) -> None:
    headers = ["figure", "value", "target", "baseline", "met?"]
    rows = [[ln.label, ln.values.get("", "-"), ln.target, ln.values.get("baseline", ""), ln.met.get("", "")]
            for ln in lines]
    widths = [max(len(str(row[i])) for row in [headers, *rows]) for i in range(len(headers))]

    def fmt_row(row: list[str]) -> str:
        return " | ".join(str(cell).ljust(w) for cell, w in zip(row, widths)).rstrip()

    print(fmt_row(headers))
    print("-+-".join("-" * w for w in widths))
    for row in rows:
        print(fmt_row(row))


# =========================================================================== main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small sizes everywhere (a smoke test)")
    p.add_argument("--big", action="store_true", help="also a join with 1 000 000 names held")
    p.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated subset of {','.join(SECTIONS)}")
    p.add_argument("--lease", type=float, default=3.0, help="lease of the names service (default 3 s)")
    p.add_argument("--trials", type=int, help="round trips and sequential registrations (default 5000)")
    p.add_argument("--whereis-n", type=int, help="whereis_name calls per run (default 1 000 000)")
    p.add_argument("--tput-n", type=int, help="registrations per node in the throughput section (default 20 000)")
    p.add_argument("--tput-limit", type=float, default=60.0,
                   help="seconds after which the throughput section starts no new registration (default 60)")
    p.add_argument("--concurrency", type=int, default=500, help="register_name calls in flight (default 500)")
    p.add_argument("--idle", type=float, help="seconds of idle traffic measured (default 3 leases)")
    p.add_argument("--lease-n", type=int, help="names held in the second idle measurement (default 100 000)")
    p.add_argument("--mem-n", type=int, help="names held in the memory section (default 100 000)")
    p.add_argument("--exit-trials", type=int, help="exit failovers (default 20)")
    p.add_argument("--join-sizes", help="comma-separated names held during a join (default 100000; "
                                        "--big adds 1000000)")
    p.add_argument("--join-limit", type=float, default=600.0, help="give a join up after this many s (default 600)")
    p.add_argument("--tick", type=float, default=0.2, help="tick_interval of the nodes (default 0.2 s)")
    p.add_argument("--down-after", type=float, default=1.0, help="down_after of the nodes (default 1 s)")
    p.add_argument("--profile", metavar="DIR", help="dump a cProfile per section and node into DIR")
    p.add_argument("--json", metavar="FILE", help="also write the raw results as JSON")
    p.add_argument("--timeout", type=float, default=3600.0, help="give up after this many seconds (default 3600)")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--name", help=argparse.SUPPRESS)
    opts = p.parse_args(argv)
    if opts.child:
        return opts
    quick = opts.quick
    defaults = {"trials": (5000, 300), "whereis_n": (1_000_000, 20_000), "tput_n": (20_000, 2000),
                "lease_n": (100_000, 2000), "mem_n": (100_000, 2000), "exit_trials": (20, 3),
                "idle": (3 * opts.lease, 1.0)}
    for key, (full, small) in defaults.items():
        if getattr(opts, key) is None:
            setattr(opts, key, small if quick else full)
    if opts.join_sizes is None:
        opts.join_sizes = "1000" if quick else "10000,100000" + (",1000000" if opts.big else "")
    opts.join_sizes = [int(x) for x in opts.join_sizes.split(",") if x.strip()]
    opts.only = [x.strip() for x in opts.only.split(",") if x.strip()]
    unknown = set(opts.only) - set(SECTIONS)
    if unknown:
        p.error(f"--only: unknown section(s) {', '.join(sorted(unknown))}; choose from {', '.join(SECTIONS)}")
    return opts


async def main_async(opts: argparse.Namespace) -> int:
    os.environ["PGREGISTRY_COOKIE"] = secrets.token_urlsafe(24)
    logdir = Path(tempfile.mkdtemp(prefix="pgregistry-names-bench-"))
    res: dict[str, Any] = {}
    started = time.monotonic()
    failed = False
    try:
        await run(opts, logdir, res)
    except Exception as exc:  # noqa: BLE001 - report, keep the figures measured so far
        failed = True
        print(f"\nthe run failed: {exc!r}\n(children's logs in {logdir})", file=sys.stderr)
    log("names", f"done in {time.monotonic() - started:.0f} s; children's logs in {logdir}")
    if opts.json:
        Path(opts.json).write_text(json.dumps({"options": vars(opts), "results": res}, indent=1, default=str))
    print()
    print(f"pgregistry names bench: 3 nodes (separate OS processes) on loopback, one names cluster, "
          f"lease {opts.lease:g} s; the standard asyncio loop")
    print_table(build_lines(res, opts))
    print(machine())
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    if opts.child:
        _child_main(opts)
        return 0

    def terminated(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, terminated)
    try:
        return asyncio.run(asyncio.wait_for(main_async(opts), opts.timeout))
    except TimeoutError:
        print(f"names bench: gave up after {opts.timeout:g} s (--timeout)", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("names bench: interrupted; every child node stopped", file=sys.stderr)
        return 130
    finally:
        cluster._kill_leftovers()


if __name__ == "__main__":
    sys.exit(main())
