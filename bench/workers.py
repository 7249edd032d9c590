"""Workers benchmark: `pgregistry.workers.Workers` on nodes in separate OS processes, against its targets.

Usage, from the repository root::

    .venv/bin/python bench/workers.py                   # every section (about a minute, most of it the 100 000 spawns)
    .venv/bin/python bench/workers.py --quick           # small sizes (a smoke test, about 15 s)
    .venv/bin/python bench/workers.py --only latency --trials 20000
    .venv/bin/python bench/workers.py --n 200000        # the membership change with 200 000 workers
    .venv/bin/python bench/workers.py --only join --profile /tmp/prof   # a cProfile per section and node

Like ``bench/names.py``, the parent runs no node: each node is this script re-executed
with ``--child``, driven by one JSON command per line on stdin (`cluster.ChildNode`),
each starting the workers service ``"workers"`` with the functions of
``bench/_workers_fns.py`` (``bench/`` is first on every child's ``sys.path``, so every
node names them ``_workers_fns:<name>``). Every node uses the standard asyncio loop,
``tick_interval`` 0.2 s and ``down_after`` 1 s. Cross-process times are
``time.monotonic_ns()`` (one clock for the machine). Each figure is printed beside a
baseline measured in the same run, and their ratio: the machine is shared and noisy.

Sections (``--only``), in the order they run:

``rtt``      the baseline of the remote figures: B serves a bare asyncio echo protocol (no
             pgregistry), A sends 8 bytes and awaits the echo, one at a time
             (`cluster.echo_round_trips`, ``--trials``), p50 and p99.
``quiet``    messages (and bytes) A and B send each other over ``--quiet`` s (1) with no
             worker (the baseline: the mesh's ticks), measured again in ``join`` once the
             holder has ``--n`` workers (`Node.connection_stats(peer)["messages_sent"]`).
``local``    in a process of A, ``get_or_start`` of a running worker A holds (a plain loop
             of ``--local-calls`` calls, best of 5 runs, per call), beside the same loop
             awaiting ``async def f(name): return d.get(name)`` (the floor of any async
             lookup). Target <= 3 us.
``latency``  in a process of A, sequential calls about workers B owns and runs (an `Echo`
             server), ``--trials`` each after 10 % warm-up: ``get_or_start`` (one request
             to B), ``whereis`` (one request), ``call`` (``whereis``, then `pgregistry.call`
             of the pid: two round trips) and, for the breakdown, `pgregistry.call` of the
             pid alone. p50 over the RTT's p50, p99 over the RTT's p99. Target for
             ``get_or_start``: <= 1.5 RTT.
``join``     a fresh node H starts ``--n`` (100 000) ``idle`` workers (``spawn``; not timed),
             then a fresh node J connects. H's ``Workers._new_ring`` and J's
             ``Workers._on_adopt`` are wrapped on the instances: *ring change* is the
             moment H takes the ring with J, *rescan* its ``stat()["last_rescan_seconds"]``
             (rescan, ShouldRestart to every worker that moved, adopt sent), *adopted* the
             moment J's ``stat()["adopted"]`` reaches the count H computed beforehand
             (the workers J owns on the two-node ring). Target: ring change -> adopted
             <= 100 ms. The rescan's baseline: a bare ``bisect`` of every worker's hash
             over the new ring's points, in H's process right after. Then the quiet
             traffic between H and J over ``--quiet`` s, against the ``quiet`` baseline.

``--profile DIR`` dumps a cProfile of every node of a section (``DIR/workers-<section>-<node>.prof``);
the timings of such a run are not the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import gc
import os
import sys
import time
import traceback
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import cluster  # noqa: E402  (bench/cluster.py: child plumbing, the echo, statistics and the table)
from _runner import Profiling, choose_sections, die_with_parent, reply, run_children, run_main, serve_commands  # noqa: E402  (bench/_runner.py)
from cluster import echo_round_trips, fmt_time, log, machine, print_rows, serve_echo, summarize  # noqa: E402

SERVICE = "workers"
SECTIONS = ("rtt", "quiet", "local", "latency", "join")
LOCAL_TARGET = 3e-6  # s per local get_or_start
REMOTE_TARGET = 1.5  # remote get_or_start, in RTT
JOIN_TARGET = 0.1  # s from the ring change to the new node having adopted everything


def now_ns() -> int:
    """One clock for every process of the machine, in ns."""
    return time.monotonic_ns()


# =========================================================================== child side


def child_main(args: argparse.Namespace) -> None:
    """Run one node until its parent closes stdin (or dies)."""
    die_with_parent()
    sys.path.insert(0, str(REPO))
    with asyncio.Runner() as runner:
        runner.run(_WorkersChild(args).serve())


class _WorkersChild(Profiling):
    """One node with the workers service, answering the parent's commands (``cmd_*``)."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.ring_changes: list[dict[str, Any]] = []
        self.adopt: dict[str, Any] = {}

    async def serve(self) -> None:
        import _workers_fns

        from pgregistry import Node, Workers

        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=1 << 24)
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        self.fns = {"idle": _workers_fns.idle, "echo": _workers_fns.echo}
        node = Node(self.args.name, cookie=os.environ["PGREGISTRY_COOKIE"],
                    tick_interval=self.args.tick, down_after=self.args.down_after)
        async with node:
            self.node = node
            self.workers = await Workers.start(node, SERVICE, functions=self.fns.values())
            self._reply({"id": 0, "ok": True, "result": {"id": node.id, "pid": os.getpid()}})
            await serve_commands(reader, self._handle)

    def _reply(self, answer: dict[str, Any]) -> None:
        reply(answer)

    async def _handle(self, request: dict[str, Any]) -> None:
        try:
            result = await getattr(self, "cmd_" + request["cmd"])(**request.get("args", {}))
            answer = {"id": request["id"], "ok": True, "result": result}
        except BaseException as exc:  # noqa: BLE001 - every failure goes back to the parent
            answer = {"id": request["id"], "ok": False, "error": "".join(traceback.format_exception(exc))[-4000:]}
            if isinstance(exc, asyncio.CancelledError):
                self._reply(answer)
                raise
        self._reply(answer)

    async def _in_process(self, fn: Callable[[], Awaitable[Any]]) -> Any:
        """``await fn()`` run as a process of the node (`Workers.call` needs one); its result."""
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()

        async def body() -> None:
            try:
                fut.set_result(await fn())
            except Exception as exc:  # noqa: BLE001 - goes back to the parent
                fut.set_exception(exc)

        self.node.spawn(body)
        return await fut

    # -- plumbing ---------------------------------------------------------------------------

    async def cmd_connect(self, address: str) -> int:
        """Connect to `address`; the time just before, in ns."""
        t0 = now_ns()
        await self.node.connect(address)
        return t0

    async def cmd_wait_ring(self, n: int, timeout: float = 30.0) -> list[str]:
        deadline = time.monotonic() + timeout
        while len(self.workers.nodes()) != n:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.node.id}: ring {self.workers.nodes()} after {timeout} s, want {n} nodes")
            await asyncio.sleep(0.005)
        return list(self.workers.nodes())

    async def cmd_cpu(self) -> float:
        """This process's CPU seconds so far (user + system)."""
        return time.process_time()

    async def cmd_stat(self) -> dict[str, Any]:
        return self.workers.stat()

    # -- rtt and quiet --------------------------------------------------------------------------

    async def cmd_echo_serve(self) -> int:
        server = self.echo_server = await serve_echo()
        assert isinstance(server, asyncio.Server)  # what create_server returns
        return int(server.sockets[0].getsockname()[1])

    async def cmd_rtt_run(self, port: int, n: int, warmup: int) -> dict[str, Any]:
        return await echo_round_trips(port, n, warmup)

    async def cmd_quiet(self, peer: str, duration: float) -> dict[str, Any]:
        """Messages and bytes this node sent to `peer` over `duration` s, and its workers."""
        s0 = self.node.connection_stats(peer)
        await asyncio.sleep(duration)
        s1 = self.node.connection_stats(peer)
        if s0 is None or s1 is None or s0["creation"] != s1["creation"]:
            raise RuntimeError(f"{self.node.id}: the connection to {peer} changed during the quiet window")
        return {"messages": s1["messages_sent"] - s0["messages_sent"], "bytes": s1["bytes_sent"] - s0["bytes_sent"],
                "seconds": duration, "workers": len(self.workers.table)}

    # -- workers ----------------------------------------------------------------------------

    async def cmd_name_owned_by(self, owner: str, prefix: str) -> str:
        """The first name ``f"{prefix}{i}"`` this node's ring places on `owner`."""
        for i in range(100_000):
            if self.workers.node_for(f"{prefix}{i}") == owner:
                return f"{prefix}{i}"
        raise LookupError(f"no name of {prefix!r} falls to {owner}")

    async def cmd_start(self, name: str, fn: str) -> str:
        return repr(await self.workers.spawn(name, self.fns[fn]))

    async def cmd_fill(self, n: int, prefix: str, fn: str = "idle") -> dict[str, Any]:
        """Spawn `n` workers ``f"{prefix}{i}"`` (this node alone on its ring: all local)."""
        t0 = time.perf_counter()
        spawn, f = self.workers.spawn, self.fns[fn]
        for i in range(n):
            await spawn(f"{prefix}{i}", f)
            if i % 1000 == 999:
                await asyncio.sleep(0)  # let the new processes run to their first receive
        await asyncio.sleep(0)
        gc.collect()
        return {"seconds": time.perf_counter() - t0, "stat": self.workers.stat()}

    async def cmd_local(self, name: str, n: int, rounds: int) -> dict[str, float]:
        """Per-call seconds of ``get_or_start`` of the held `name`, and of the baseline."""
        wk, fn = self.workers, self.fns["idle"]
        table = {name: wk.processes()[name]}

        async def lookup(key: str) -> Any:
            return table.get(key)

        async def measure() -> dict[str, float]:
            best = {"get_or_start": float("inf"), "baseline": float("inf")}
            get_or_start = wk.get_or_start
            for _ in range(rounds):
                t0 = time.perf_counter_ns()
                for _ in range(n):
                    await get_or_start(name, fn)
                t1 = time.perf_counter_ns()
                for _ in range(n):
                    await lookup(name)
                t2 = time.perf_counter_ns()
                best["get_or_start"] = min(best["get_or_start"], (t1 - t0) / n / 1e9)
                best["baseline"] = min(best["baseline"], (t2 - t1) / n / 1e9)
            return best

        gc.disable()  # a collection landing in one run would only add noise
        try:
            return await self._in_process(measure)
        finally:
            gc.enable()

    async def cmd_remote(self, what: str, name: str, n: int, warmup: int) -> dict[str, Any]:
        """p50/p99 (`summarize`) of `n` sequential `what` calls about the worker `name`."""
        from pgregistry import call

        wk, fn = self.workers, self.fns["echo"]
        pid = await wk.whereis(name)
        ops: dict[str, Callable[[], Awaitable[Any]]] = {
            "get_or_start": lambda: wk.get_or_start(name, fn),
            "whereis": lambda: wk.whereis(name),
            "call": lambda: wk.call(name, "ping"),
            "call_pid": lambda: call(pid, "ping"),
        }
        op = ops[what]

        async def measure() -> list[int]:
            samples = []
            clock = time.monotonic_ns
            for i in range(warmup + n):
                t0 = clock()
                await op()
                if i >= warmup:
                    samples.append(clock() - t0)
            return samples

        stat0 = wk.stat()
        out = summarize(await self._in_process(measure))
        out["redirects"] = wk.stat()["redirects"] - stat0["redirects"]
        out["held_here"] = name in wk.processes()
        return out

    # -- join -------------------------------------------------------------------------------

    async def cmd_expect(self, peer: str) -> int:
        """How many of this node's workers `peer` owns once it is on the ring."""
        from pgregistry.placement import Ring

        ring = Ring([*self.workers.nodes(), peer], self.workers.points)
        return sum(1 for w in self.workers.table.held.values() if ring.node_for_hash(w.hash) == peer)

    async def cmd_arm_ring_change(self) -> None:
        """Time every ``_new_ring`` of this node's service (wrapped on the instance)."""
        wk = self.workers
        original = wk._new_ring

        def timed() -> None:
            t0 = now_ns()
            original()
            self.ring_changes.append({"t0": t0, "t1": now_ns(), "rescan": wk.last_rescan_seconds,
                                      "nodes": len(wk.ring), "should_restart": wk.counters["should_restart"]})

        setattr(wk, "_new_ring", timed)  # noqa: B010 - a method replaced on the instance

    async def cmd_arm_adopt(self, expected: int) -> None:
        """Note the first ``adopt`` and the one after which this node holds `expected` adopted workers."""
        wk = self.workers
        original = wk._on_adopt
        record = self.adopt = {"expected": expected, "messages": 0, "first": None, "done": None}

        def timed(peer: str, digest: bytes, pairs: list[Any], done: bool) -> None:
            t = now_ns()
            original(peer, digest, pairs, done)
            record["messages"] += 1
            if record["first"] is None:
                record["first"] = t
            if record["done"] is None and len(wk.table) - wk.table.local_count >= expected:
                record["done"] = now_ns()

        setattr(wk, "_on_adopt", timed)  # noqa: B010 - a method replaced on the instance

    async def cmd_ring_changes(self, n: int, timeout: float = 60.0) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while len(self.ring_changes) < n:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.node.id}: {len(self.ring_changes)} ring changes after {timeout} s")
            await asyncio.sleep(0.005)
        return self.ring_changes

    async def cmd_adopted(self, timeout: float = 60.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while self.adopt.get("done") is None:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.node.id}: adopted {self.workers.stat()['adopted']} after {timeout} s, "
                                   f"want {self.adopt.get('expected')}")
            await asyncio.sleep(0.005)
        return self.adopt

    async def cmd_bisect_baseline(self, rounds: int = 5) -> float:
        """Best-of-`rounds` seconds of a bare bisect of every held worker's hash over the ring's points."""
        from pgregistry.placement import point_hash

        wk = self.workers
        positions = sorted(point_hash(node, i) for node in wk.nodes() for i in range(wk.points))
        hashes = [w.hash for w in wk.table.held.values()]
        best = float("inf")
        for _ in range(rounds):
            t0 = time.perf_counter()
            find = bisect.bisect_left
            for h in hashes:
                find(positions, h)
            best = min(best, time.perf_counter() - t0)
        return best


# =========================================================================== parent side


class WorkersChild(cluster.ChildNode):
    """A child node running this script (`cluster.ChildNode` starts cluster.py)."""

    def child_args(self) -> list[str]:
        return [sys.executable, str(Path(__file__).resolve()), "--child", "--name", self.name,
                "--tick", str(self.tick), "--down-after", str(self.down_after)]


def profiled(opts: argparse.Namespace, section: str, nodes: list[WorkersChild]) -> Any:
    """cProfile of `section` on `nodes` into ``--profile`` (files ``workers-<section>-<node>.prof``)."""
    return cluster.profiled(opts, "workers", section, list(nodes))


async def start_nodes(nodes: list[WorkersChild], *names: str, opts: argparse.Namespace,
                      logdir: Path) -> list[WorkersChild]:
    new = [WorkersChild(name, "asyncio", opts, logdir) for name in names]
    nodes.extend(new)
    await asyncio.gather(*(n.start() for n in new))
    return new


async def quiet(x: WorkersChild, y: WorkersChild, duration: float) -> dict[str, Any]:
    """What `x` and `y` send each other over the same `duration` s."""
    sx, sy = await asyncio.gather(x.cmd("quiet", peer=y.id, duration=duration, timeout=duration + 30),
                                  y.cmd("quiet", peer=x.id, duration=duration, timeout=duration + 30))
    return {x.name: sx, y.name: sy}


async def with_cpu(nodes: list[WorkersChild], calls: int, measure: Awaitable[dict[str, Any]]) -> dict[str, Any]:
    """The figures of `measure`, with ``cpu``: each node's CPU seconds per call meanwhile
    (the whole process: its loop, the node, the commands that read the clock)."""
    before = await asyncio.gather(*(x.cmd("cpu") for x in nodes))
    out = await measure
    after = await asyncio.gather(*(x.cmd("cpu") for x in nodes))
    out["cpu"] = {x.name: (t1 - t0) / calls for x, t0, t1 in zip(nodes, before, after)}
    return out


async def run(opts: argparse.Namespace, logdir: Path, res: dict[str, Any]) -> None:
    only = opts.only
    nodes: list[WorkersChild] = []
    try:
        a, b = await start_nodes(nodes, "A", "B", opts=opts, logdir=logdir)
        await b.cmd("connect", address=a.id)
        await asyncio.gather(*(x.cmd("wait_ring", n=2) for x in (a, b)))
        log("workers", f"A and B up: {a.id} {b.id}")

        # The baselines always run: every ratio needs them.
        port = await b.cmd("echo_serve")
        res["rtt"] = await with_cpu([a, b], opts.trials + 500,
                                    a.cmd("rtt_run", port=port, n=opts.trials, warmup=500, timeout=300))
        await asyncio.sleep(opts.quiet / 2)  # the connect's traffic is over
        res["quiet0"] = await quiet(a, b, opts.quiet)

        if "local" in only:
            name = await a.cmd("name_owned_by", owner=a.id, prefix="local-")
            await a.cmd("start", name=name, fn="idle")
            log("workers", f"local: get_or_start on A of {name!r}, held on A ({opts.local_calls} calls, best of 5)")
            async with profiled(opts, "local", [a]):
                res["local"] = await a.cmd("local", name=name, n=opts.local_calls, rounds=5, timeout=600)

        if "latency" in only:
            name = await a.cmd("name_owned_by", owner=b.id, prefix="remote-")
            await a.cmd("start", name=name, fn="echo")  # started on B, its owner
            res["latency"] = {}
            for what in ("get_or_start", "whereis", "call", "call_pid"):
                log("workers", f"latency: {what} on A of {name!r}, held on B ({opts.trials} calls)")
                async with profiled(opts, f"latency-{what}", [a, b]):
                    res["latency"][what] = await with_cpu([a, b], opts.trials + opts.trials // 10, a.cmd(
                        "remote", what=what, name=name, n=opts.trials, warmup=opts.trials // 10, timeout=600))

        if "join" in only:
            h, j = await start_nodes(nodes, "H", "J", opts=opts, logdir=logdir)
            log("workers", f"join: H spawns {opts.n:,} idle workers (not timed)")
            fill = await h.cmd("fill", n=opts.n, prefix="w-", timeout=3600)
            log("workers", f"  {fill['seconds']:.1f} s; J connects")
            expected = await h.cmd("expect", peer=j.id)
            await h.cmd("arm_ring_change")
            await j.cmd("arm_adopt", expected=expected)
            await asyncio.sleep(0.3)
            async with profiled(opts, "join", [h, j]):
                t_connect = await j.cmd("connect", address=h.id)
                adopt = await j.cmd("adopted", timeout=120)
                changes = await h.cmd("ring_changes", n=1)
            res["join"] = {"n": opts.n, "fill": fill, "expected": expected, "t_connect": t_connect,
                           "ring": changes[0], "adopt": adopt, "h_stat": await h.cmd("stat"),
                           "j_stat": await j.cmd("stat"), "bisect": await h.cmd("bisect_baseline")}
            await asyncio.sleep(max(opts.quiet, opts.down_after))  # the join's traffic is over
            res["quiet1"] = await quiet(h, j, opts.quiet)
            res["quiet1_workers"] = {"H": res["quiet1"]["H"]["workers"], "J": res["quiet1"]["J"]["workers"]}
    finally:
        for node in nodes:
            await node.stop()


# =========================================================================== the table


def _us(v: float | None) -> str:
    return "-" if v is None else f"{v * 1e6:.2f} us"


def _ratio(v: float | None, base: float | None, unit: str = "x") -> str:
    return "-" if v is None or not base else f"{v / base:.2f} {unit}"


def _met(ok: bool | None) -> str:
    return "n/a" if ok is None else ("target met" if ok else "target MISSED")


def build_rows(res: dict[str, Any], opts: argparse.Namespace) -> list[list[str]]:
    """The table: figure, value, baseline, ratio, target, met."""
    rows: list[list[str]] = []
    rtt = res.get("rtt") or {}
    r50, r99 = rtt.get("p50"), rtt.get("p99")
    rows.append([f"bare asyncio TCP round trip A -> B (RTT), p50 / p99 ({opts.trials})",
                 f"{fmt_time(r50)} / {fmt_time(r99)}", "", "", "", ""])
    if "cpu" in rtt:
        rows.append(["  CPU per round trip on A / on B", f"{_us(rtt['cpu']['A'])} / {_us(rtt['cpu']['B'])}",
                     "", "", "", ""])

    loc = res.get("local")
    if loc:
        v = loc["get_or_start"]
        rows.append([f"get_or_start, local (A holds it), per call ({opts.local_calls:,} calls, best of 5)", _us(v),
                     f"{_us(loc['baseline'])} (await coroutine + dict.get)", _ratio(v, loc["baseline"]),
                     f"<= {LOCAL_TARGET * 1e6:g} us", _met(v <= LOCAL_TARGET)])

    lat = res.get("latency") or {}
    labels = {"get_or_start": "get_or_start, remote (B holds it)", "whereis": "whereis, remote",
              "call": "call, remote (whereis + call: 2 round trips)", "call_pid": "  pgregistry.call of the pid alone"}
    for what, label in labels.items():
        s = lat.get(what)
        if not s:
            continue
        for q, base in (("p50", r50), ("p99", r99)):
            v = s.get(q)
            ok = None
            target = ""
            if what == "get_or_start":
                target = f"<= {REMOTE_TARGET:g} RTT"
                ok = v is not None and bool(base) and v / base <= REMOTE_TARGET
            rows.append([f"{label}, {q}" if q == "p50" else f"  {q}", fmt_time(v), f"RTT {q} {fmt_time(base)}",
                         _ratio(v, base, "RTT"), target, _met(ok) if target else ""])
        if "cpu" in s and "cpu" in rtt:
            rows.append(["  CPU per call on A / on B", f"{_us(s['cpu']['A'])} / {_us(s['cpu']['B'])}",
                         f"per RTT {_us(rtt['cpu']['A'])} / {_us(rtt['cpu']['B'])}",
                         f"{_ratio(s['cpu']['A'], rtt['cpu']['A'])} / {_ratio(s['cpu']['B'], rtt['cpu']['B'])}",
                         "", ""])
        if s.get("redirects") or s.get("held_here"):
            rows.append(["  (redirects / held on A)", f"{s['redirects']} / {s['held_here']}", "", "", "", ""])

    jn = res.get("join")
    if jn:
        n, ring, adopt = jn["n"], jn["ring"], jn["adopt"]
        rescan = ring["rescan"]
        total = (adopt["done"] - ring["t0"]) / 1e9
        rows.append([f"membership change, {n:,} local workers on H, J joins: connect -> H's ring change",
                     fmt_time((ring["t0"] - jn["t_connect"]) / 1e9), "", "", "", ""])
        rows.append(["  H's rescan (last_rescan_seconds: rescan, ShouldRestart, adopt sent)", fmt_time(rescan),
                     f"{fmt_time(jn['bisect'])} (bare bisect of {n:,} hashes)", _ratio(rescan, jn["bisect"]),
                     "", ""])
        rows.append([f"  H's ring change -> J adopted all {jn['expected']:,} it owns", fmt_time(total),
                     f"rescan {fmt_time(rescan)}", _ratio(total, rescan), f"<= {fmt_time(JOIN_TARGET)}",
                     _met(total <= JOIN_TARGET)])
        rows.append(["  of which: ring change -> J's first adopt", fmt_time((adopt["first"] - ring["t0"]) / 1e9),
                     "", "", "", ""])
        rows.append(["  adopt messages to J / ShouldRestart sent on H / J's adopted",
                     f"{adopt['messages']} / {ring['should_restart']:,} / {jn['j_stat']['adopted']:,}", "", "", "",
                     ""])

    q0, q1 = res.get("quiet0"), res.get("quiet1")
    if q0:
        base = max(q0["A"]["messages"], q0["B"]["messages"]) / q0["A"]["seconds"]
        rows.append([f"quiet traffic, messages/s A <-> B, no worker ({opts.quiet:g} s)",
                     f"{q0['A']['messages'] / q0['A']['seconds']:g} / {q0['B']['messages'] / q0['B']['seconds']:g}",
                     "", "", "", ""])
        if q1:
            ws = res["quiet1_workers"]
            vals = [q1[x]["messages"] / q1[x]["seconds"] for x in ("H", "J")]
            worst = max(vals)
            rows.append([f"  H <-> J, {ws['H']:,} workers held on H, {ws['J']:,} on J",
                         f"{vals[0]:g} / {vals[1]:g} ({q1['H']['bytes']:,} / {q1['J']['bytes']:,} B)",
                         f"{base:g}/s (no worker)", _ratio(worst, base) if base else f"+{worst - base:g}/s",
                         "no per-worker traffic (<= baseline + 2/s)", _met(worst <= base + 2)])
    for section, error in (res.get("errors") or {}).items():
        rows.append([f"{section}: FAILED", error.strip().splitlines()[-1][-100:], "", "", "", "target MISSED"])
    return rows


# =========================================================================== main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small sizes everywhere (a smoke test)")
    p.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated subset of {','.join(SECTIONS)}")
    p.add_argument("--n", type=int, help="workers on H in the join section (default 100 000; 10 000 with --quick)")
    p.add_argument("--trials", type=int, help="round trips and remote calls of each kind (default 5000; 500)")
    p.add_argument("--local-calls", type=int, help="local get_or_start calls per run (default 200 000; 20 000)")
    p.add_argument("--quiet", type=float, default=1.0, help="seconds of quiet traffic measured (default 1)")
    p.add_argument("--tick", type=float, default=0.2, help="tick_interval of the nodes (default 0.2 s)")
    p.add_argument("--down-after", type=float, default=1.0, help="down_after of the nodes (default 1 s)")
    p.add_argument("--profile", metavar="DIR", help="dump a cProfile per section and node into DIR")
    p.add_argument("--json", metavar="FILE", help="also write the raw results as JSON")
    p.add_argument("--timeout", type=float, default=1800.0, help="give up after this many seconds (default 1800)")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--name", help=argparse.SUPPRESS)
    opts = p.parse_args(argv)
    if opts.child:
        return opts
    defaults = {"n": (100_000, 10_000), "trials": (5000, 500), "local_calls": (200_000, 20_000)}
    for key, (full, small) in defaults.items():
        if getattr(opts, key) is None:
            setattr(opts, key, small if opts.quick else full)
    opts.only = choose_sections(p, opts.only, SECTIONS)
    return opts


async def main_async(opts: argparse.Namespace) -> int:
    def report(res: dict[str, Any]) -> None:
        print(f"pgregistry workers bench: nodes in separate OS processes on loopback, the standard asyncio loop, "
              f"tick {opts.tick:g} s, down_after {opts.down_after:g} s")
        print(machine())
        print_rows(["figure", "value", "baseline", "ratio", "target", "met?"], build_rows(res, opts))
        if opts.profile:
            print(f"(a profiled run, cProfile in {opts.profile}: these timings are not the figures)")

    return await run_children("workers", opts, run, report)


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    if opts.child:
        child_main(opts)
        return 0
    return run_main("workers bench", lambda: main_async(opts), opts.timeout, cluster._kill_leftovers)


if __name__ == "__main__":
    sys.exit(main())
