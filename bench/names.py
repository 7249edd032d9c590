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
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import _names_child  # noqa: E402  (the node side: what each child process runs)
import cluster  # noqa: E402  (bench/cluster.py: child plumbing, statistics and the table)
from _names_child import now_ns  # noqa: E402
from _runner import choose_sections, run_children, run_main  # noqa: E402  (bench/_runner.py)
from cluster import Line, fmt_time, log, machine, verdict  # noqa: E402

SECTIONS = ("rtt", "latency", "whereis", "tput", "lease", "memory", "exit", "kill", "join")


# =========================================================================== parent side


class NamesChild(cluster.ChildNode):
    """A child node running this script (`cluster.ChildNode` starts cluster.py)."""

    def child_args(self) -> list[str]:
        return [sys.executable, str(Path(__file__).resolve()), "--child", "--name", self.name,
                "--tick", str(self.tick), "--down-after", str(self.down_after), "--lease", str(self.opts.lease)]


async def start_nodes(nodes: list[NamesChild], *names: str, opts: argparse.Namespace,
                      logdir: Path) -> list[NamesChild]:
    new = [NamesChild(name, "asyncio", opts, logdir) for name in names]
    nodes.extend(new)
    await asyncio.gather(*(n.start() for n in new))
    return new


def profiled(opts: argparse.Namespace, section: str, nodes: list[NamesChild]) -> Any:
    """cProfile of `section` on `nodes` into ``--profile`` (cluster.py's, files ``names-<section>-<node>``)."""
    return cluster.profiled(opts, "names", section, list(nodes))


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
    cluster.print_rows(headers, [[ln.label, ln.values.get("", "-"), ln.target, ln.values.get("baseline", ""),
                                  ln.met.get("", "")] for ln in lines])


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
    opts.only = choose_sections(p, opts.only, SECTIONS)
    return opts


async def main_async(opts: argparse.Namespace) -> int:
    def report(res: dict[str, Any]) -> None:
        print(f"pgregistry names bench: 3 nodes (separate OS processes) on loopback, one names cluster, "
              f"lease {opts.lease:g} s; the standard asyncio loop")
        print_table(build_lines(res, opts))
        print(machine())

    return await run_children("names", opts, run, report)


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    if opts.child:
        _names_child.child_main(opts)
        return 0

    return run_main("names bench", lambda: main_async(opts), opts.timeout, cluster._kill_leftovers)


if __name__ == "__main__":
    sys.exit(main())
