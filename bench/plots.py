"""Draw the figures of one `bench/results.py` run into PNG files for docs/benchmarks.md.

Usage, from the repository root, with matplotlib installed (``pip install -e '.[bench]'``)::

    .venv/bin/python bench/plots.py                                  # the newest bench/results/*.json
    .venv/bin/python bench/plots.py bench/results/2026-12-08.json --out docs/img

Every figure is labelled with the machine and the date of the run it comes from, and
shows each measurement beside the baseline measured in the same run (the bare round trip
between the same two processes, the dict registry), because the machine is shared.

Files written (a figure whose section is missing from the run is skipped):

* ``bench-latency.png``: register → visible, ``call``, workers and names requests, p50
  and p99, in microseconds and as multiples of the bare round trip;
* ``bench-throughput.png``: registrations replicated per second, names registered per second;
* ``bench-catchup.png``: catch-up time and wire bytes per entry against the entries held;
* ``bench-memory.png``: bytes per entry at 1 000 000 entries, against the dict registry;
* ``bench-single.png``: single-node operations, Cython table, pure twin, dict registry;
* ``bench-failure.png``: failure detection and failover times against their bounds.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

HERE = Path(__file__).resolve().parent
REPO = HERE.parent

BLUE, ORANGE, GREEN, GREY, RED = "#1f77b4", "#ff7f0e", "#2ca02c", "#7f7f7f", "#d62728"
plt.rcParams.update({"font.size": 10, "axes.titlesize": 11, "figure.dpi": 110,
                     "axes.spines.top": False, "axes.spines.right": False})


def caption(doc: dict[str, Any]) -> str:
    """The machine line under every figure."""
    m = doc["machine"]
    date = datetime.datetime.fromisoformat(doc["date"]).strftime("%Y-%m-%d %H:%M UTC")
    load = m.get("load_average_start", [0.0])[0]
    return (f"{m['cpu']}, {m['cores']} cores, Python {m['python']}, {m['table']} table; "
            f"run of {date}, commit {m['commit']}, load average {load:.1f} at the start")


def finish(fig: Any, doc: dict[str, Any], path: Path) -> None:
    fig.text(0.5, 0.005, caption(doc), ha="center", va="bottom", fontsize=8, color=GREY)
    fig.tight_layout(rect=(0, 0.035, 1, 1))
    fig.savefig(path)
    plt.close(fig)
    print(f"wrote {path}")


def us(seconds: float) -> float:
    return seconds * 1e6


def label_bars(ax: Any, bars: Any, fmt: str, rotation: int = 0) -> None:
    for bar in bars:
        h = bar.get_height()
        if h > 0:
            ax.annotate(fmt.format(h), (bar.get_x() + bar.get_width() / 2, h), ha="center", va="bottom",
                        fontsize=7.5, xytext=(0, 2), textcoords="offset points", rotation=rotation)


# ------------------------------------------------------------------------------- latency


def latency_rows(doc: dict[str, Any]) -> list[tuple[str, dict[str, float], dict[str, float]]]:
    """(label, figure {p50, p99}, the round trip of the same run {p50, p99})."""
    rows = []
    sections = doc["sections"]
    cluster = sections.get("cluster", {}).get("results", {})
    for loop in ("asyncio", "uvloop"):
        res = cluster.get(loop, {})
        if "rtt" not in res:
            continue
        rtt = res["rtt"]
        rows.append((f"bare TCP round trip\n({loop})", rtt, rtt))
        if "latency" in res:
            rows.append((f"register on A →\nJoin at B ({loop})", res["latency"], rtt))
        if "call" in res:
            rows.append((f"call to a Server\non B ({loop})", res["call"], rtt))
    workers = sections.get("workers", {}).get("results", {})
    if "rtt" in workers and "latency" in workers:
        for kind, label in (("get_or_start", "workers\nget_or_start\n(asyncio)"),
                            ("call", "workers call\n(2 round trips,\nasyncio)")):
            if kind in workers["latency"]:
                rows.append((label, workers["latency"][kind], workers["rtt"]))
    names = sections.get("names", {}).get("results", {})
    if "rtt" in names and "latency" in names:
        rows.append(("names\nregister_name\n(asyncio)", names["latency"], names["rtt"]))
    return rows


def plot_latency(doc: dict[str, Any], out: Path) -> None:
    rows = latency_rows(doc)
    if not rows:
        return
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(12, 8.2))
    xs = range(len(rows))
    w = 0.38
    p50 = [us(r[1]["p50"]) for r in rows]
    p99 = [us(r[1]["p99"]) for r in rows]
    b1 = ax1.bar([x - w / 2 for x in xs], p50, w, label="p50", color=BLUE)
    b2 = ax1.bar([x + w / 2 for x in xs], p99, w, label="p99", color=ORANGE)
    label_bars(ax1, b1, "{:.0f}")
    label_bars(ax1, b2, "{:.0f}")
    ax1.set_yscale("log")
    ax1.set_ylabel("microseconds (log scale)")
    ax1.set_title("Latency between two node processes on loopback, one request at a time")
    ax1.set_xticks(list(xs), [r[0] for r in rows], fontsize=8)
    ax1.legend(loc="upper left")
    ax1.set_ylim(top=max(p99) * 4)

    r50 = [r[1]["p50"] / r[2]["p50"] for r in rows]
    b3 = ax2.bar(list(xs), r50, 0.55, color=BLUE)
    label_bars(ax2, b3, "{:.1f}×")
    ax2.axhline(1.0, color=GREY, lw=0.8, ls="--")
    ax2.set_ylabel("p50 / the round trip's p50")
    ax2.set_title("The medians as multiples of the bare echo between the same two processes, in the same run")
    ax2.set_xticks(list(xs), [r[0] for r in rows], fontsize=8)
    ax2.set_ylim(0, max(r50) * 1.2)
    finish(fig, doc, out / "bench-latency.png")


# ---------------------------------------------------------------------------- throughput


def plot_throughput(doc: dict[str, Any], out: Path) -> None:
    sections = doc["sections"]
    bars: list[tuple[str, float, str]] = []
    cluster = sections.get("cluster", {}).get("results", {})
    opts = sections.get("cluster", {}).get("options", {})
    n = int(opts.get("tput_n", 0))
    for loop in ("asyncio", "uvloop"):
        t = cluster.get(loop, {}).get("throughput")
        if t and n:
            rate = n / ((t["t_end"] - t["t0"]) / 1e9)
            bars.append((f"registry: register on A, replicated\nto B and C ({loop})", rate, BLUE))
    names = sections.get("names", {}).get("results", {})
    if "tput1" in names:
        t = names["tput1"]
        bars.append(("names: register_name on A\n(500 in flight)", t["n"] / ((t["t1"] - t["t0"]) / 1e9), GREEN))
    if "tput3" in names:
        ts = names["tput3"]
        total = sum(t["n"] for t in ts)
        span = (max(t["t1"] for t in ts) - min(t["t0"] for t in ts)) / 1e9
        bars.append(("names: register_name on\nA, B and C at once (total)", total / span, GREEN))
    if not bars:
        return
    fig, ax = plt.subplots(figsize=(10, 4.6))
    ys = list(range(len(bars)))[::-1]
    hb = ax.barh(ys, [b[1] for b in bars], color=[b[2] for b in bars])
    for bar, (_label, rate, _c) in zip(hb, bars):
        ax.annotate(f"{rate:,.0f}/s", (bar.get_width(), bar.get_y() + bar.get_height() / 2), va="center",
                    xytext=(4, 0), textcoords="offset points", fontsize=9)
    ax.set_yticks(ys, [b[0] for b in bars], fontsize=9)
    ax.set_xscale("log")
    ax.set_xlabel("operations per second (log scale)")
    ax.set_xlim(right=max(b[1] for b in bars) * 5)
    ax.axvline(200_000, color=RED, lw=0.8, ls="--")
    ax.annotate("registry target 200 000/s", (200_000, ys[0] + 0.45), color=RED, fontsize=8, ha="right",
                xytext=(-3, 0), textcoords="offset points")
    ax.set_title(f"Throughput: registry writes ({n:,} registrations, a yield every {opts.get('batch', '?')}),\n"
                 "names decided by a majority of 3 members")
    ax.set_xlim(left=1000)
    finish(fig, doc, out / "bench-throughput.png")


# ------------------------------------------------------------------------------ catch-up


def plot_catchup(doc: dict[str, Any], out: Path) -> None:
    cluster = doc["sections"].get("cluster", {}).get("results", {})
    series = {}
    for loop in ("asyncio", "uvloop"):
        pts = [(c["size"], (c["t_done"] - c["t0"]) / 1e9, c["bytes_received"] / c["size"])
               for c in cluster.get(loop, {}).get("catchup", []) if c.get("t_done")]
        if pts:
            series[loop] = sorted(pts)
    if not series:
        return
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.6), gridspec_kw={"width_ratios": [3, 2]})
    for loop, color in (("asyncio", BLUE), ("uvloop", ORANGE)):
        if loop not in series:
            continue
        xs = [p[0] for p in series[loop]]
        ax1.plot(xs, [p[1] * 1e3 for p in series[loop]], "o-", color=color, label=loop)
        for x, y in zip(xs, [p[1] * 1e3 for p in series[loop]]):
            ax1.annotate(f"{y:.0f} ms", (x, y), fontsize=7.5, xytext=(4, -11) if loop == "uvloop" else (-40, 6),
                         textcoords="offset points", color=color)
        ax2.plot(xs, [p[2] for p in series[loop]], "o-", color=color, label=loop)
    xs_all = sorted({p[0] for s in series.values() for p in s})
    ax1.plot(xs_all, [x / 500 for x in xs_all], ":", color=GREY, label="linear: 2 µs per entry")
    ax1.plot([100_000, 1_000_000], [200, 2000], "x", color=RED, ms=9, mew=2, label="targets (200 ms, 2 s)")
    ax1.set_xscale("log")
    ax1.set_yscale("log")
    ax1.set_xlabel("entries held by the node it connects to")
    ax1.set_ylabel("connect → all entries applied (ms, log)")
    ax1.set_title("Catch-up of a new node")
    ax1.legend(fontsize=8)
    ax2.set_xscale("log")
    ax2.set_ylim(0, 64)
    ax2.axhline(60, color=RED, lw=0.8, ls="--")
    ax2.annotate("target 60 B", (xs_all[0], 60), color=RED, fontsize=8, xytext=(2, -11), textcoords="offset points")
    ax2.set_xlabel("entries")
    ax2.set_ylabel("bytes received per entry (wire)")
    ax2.set_title("Wire cost of the catch-up")
    ax2.legend(fontsize=8, loc="lower right")
    finish(fig, doc, out / "bench-catchup.png")


# -------------------------------------------------------------------------------- memory


def plot_memory(doc: dict[str, Any], out: Path) -> None:
    mem = doc["sections"].get("memory", {}).get("results")
    if not mem:
        return
    by = {(m["shape"], m["impl"], m["counter"]): m for m in mem}
    entries = mem[0]["entries"]
    impls = [("cython", "Cython table", BLUE), ("python", "pure-Python twin", ORANGE), ("dict", "dict registry", GREY)]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.6), sharey=True)
    for ax, (shape, title) in zip(axes, (("distinct", f"{entries:,} distinct keys"),
                                          ("groups", "1 000 keys × 1 000 entries" if entries == 1_000_000
                                           else f"{entries:,} entries in 1 000 keys"))):
        groups = ("table_bytes_per_entry", "total_bytes_per_entry")
        w = 0.26
        for i, (impl, label, color) in enumerate(impls):
            vals = [by.get((shape, impl, "rss"), {}).get(g, 0) for g in groups]
            bars = ax.bar([j + (i - 1) * w for j in range(len(groups))], vals, w, label=label, color=color)
            label_bars(ax, bars, "{:.0f}")
        ax.set_xticks([0, 1], ["the registry's own structures", "with the key, value and pid objects"], fontsize=9)
        ax.set_title(title)
        if shape == "distinct":
            ax.axhline(200, color=RED, lw=0.8, ls="--")
            ax.annotate("target 200 B (table only)", (0.5, 200), color=RED, fontsize=8, xytext=(0, 4), ha="center",
                        textcoords="offset points", bbox={"facecolor": "white", "edgecolor": "none", "pad": 1},
                        zorder=5)
    axes[0].set_ylabel("bytes per entry (RSS)")
    axes[1].legend(fontsize=9, loc="upper right")
    fig.suptitle("Memory per registry entry, each implementation in a fresh interpreter", fontsize=11)
    finish(fig, doc, out / "bench-memory.png")


# --------------------------------------------------------------------------- single node


def plot_single(doc: dict[str, Any], out: Path) -> None:
    reg = doc["sections"].get("registry", {})
    med = reg.get("medians")
    if not med:
        return
    labels = reg.get("labels", {})
    figures = [f for f in ("lookup_1", "lookup_10", "lookup_1000", "register", "register_unregister", "match_10k",
                           "select_100k_int", "select_100k_dict", "exit_1k", "exit_100k") if f in med]
    fig, ax = plt.subplots(figsize=(12, 5.6))
    w = 0.27
    for i, (impl, label, color) in enumerate((("cython", "Cython table", BLUE), ("python", "pure-Python twin", ORANGE),
                                              ("dict", "dict registry (no lock)", GREY))):
        vals = [us(med[f].get(impl, 0.0)) for f in figures]
        bars = ax.bar([x + (i - 1) * w for x in range(len(figures))], vals, w, label=label, color=color)
        for bar, v in zip(bars, vals):
            if v > 0:
                text = f"{v:.2g}" if v < 10 else f"{v:,.0f}"
                ax.annotate(text, (bar.get_x() + bar.get_width() / 2, v), ha="center", va="bottom", fontsize=6.5,
                            xytext=(0, 2), textcoords="offset points", rotation=90)
    ax.set_yscale("log")
    ax.set_ylim(top=ax.get_ylim()[1] * 20)
    ax.set_ylabel("microseconds per operation (median, log)")
    names = {"lookup_1": "lookup\n1 entry", "lookup_10": "lookup\n10 entries", "lookup_1000": "lookup\n1000 entries",
             "register": "register\n(per op)", "register_unregister": "register +\nunregister",
             "match_10k": "match+guard\n1 key of\n10 000", "select_100k_int": "select+guard\n100 000 rows\nint values",
             "select_100k_dict": "select+guard\n100 000 rows\ndict values",
             "exit_1k": "exit of a\nprocess with\n1 000 entries",
             "exit_100k": "exit of a\nprocess with\n100 000 entries"}
    short = [names.get(f, labels.get(f, f)) for f in figures]
    ax.set_xticks(range(len(figures)), short, fontsize=7.5)
    ax.legend(fontsize=8, loc="upper left")
    ax.set_title("Single-node operations: each figure's three implementations measured one after the other")
    finish(fig, doc, out / "bench-single.png")


# ------------------------------------------------------------------------------- failure


def plot_failure(doc: dict[str, Any], out: Path) -> None:
    sections = doc["sections"]
    cluster = sections.get("cluster", {}).get("results", {}).get("asyncio", {})
    opts = sections.get("cluster", {}).get("options", {})
    rows: list[tuple[str, float, float | None, str]] = []  # label, seconds, bound, color
    kill = cluster.get("purge_kill")
    if kill:
        det = max(s["start"] for s in kill["survivors"]) - kill["t_signal"]
        purge = max(s["end"] - s["start"] for s in kill["survivors"])
        rows.append(("registry: SIGKILLed node declared down\n(sockets closed by the kernel)", det / 1e9, None, BLUE))
        rows.append((f"registry: its {opts.get('purge_n', 0):,} entries purged\nafter it was declared down",
                     purge / 1e9, 0.1, BLUE))
    stop = cluster.get("purge_stop")
    if stop:
        det = max(s["start"] for s in stop["survivors"]) - stop["t_signal"]
        da = stop.get("down_after", opts.get("down_after", 1.0))
        tick = opts.get("tick", 0.2)
        rows.append((f"registry: SIGSTOPped node declared down\n(silence; down_after {da:g} s, tick {tick:g} s)",
                     det / 1e9, da + tick, ORANGE))
    names = sections.get("names", {}).get("results", {})
    nopts = sections.get("names", {}).get("options", {})
    lease = nopts.get("lease", 3.0)
    if names.get("exit"):
        secs = sorted(e["seconds"] for e in names["exit"])
        rows.append(("names: holder process exits →\nanother node holds the name (median)", secs[len(secs) // 2],
                     None, GREEN))
    if names.get("kill"):
        rows.append((f"names: holder's node SIGKILLed →\nanother node holds the name (lease {lease:g} s)",
                     names["kill"]["seconds"], lease, GREEN))
    if not rows:
        return
    fig, ax = plt.subplots(figsize=(10.5, 4.8))
    ys = list(range(len(rows)))[::-1]
    hb = ax.barh(ys, [r[1] for r in rows], color=[r[3] for r in rows])
    for y, bar, (_l, secs, bound, _c) in zip(ys, hb, rows):
        text = f"{secs * 1e3:.1f} ms" if secs < 1 else f"{secs:.2f} s"
        ax.annotate(text, (max(bar.get_width(), bound or 0), y), va="center", xytext=(6, 0), textcoords="offset points",
                    fontsize=9)
        if bound is not None:
            ax.plot([bound, bound], [y - 0.4, y + 0.4], color=RED, lw=2)
    ax.plot([], [], color=RED, lw=2, label="bound: down_after + tick, the lease, or the 100 ms target")
    ax.set_yticks(ys, [r[0] for r in rows], fontsize=8.5)
    ax.set_xscale("log")
    ax.set_xlim(right=max(max(r[1] for r in rows), lease) * 4)
    ax.set_xlabel("seconds (log scale)")
    ax.legend(fontsize=8, loc="upper right")
    ax.set_title("Failure detection and failover (see docs/semantics.md for the formulas)")
    finish(fig, doc, out / "bench-failure.png")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("results", nargs="?", type=Path, help="a bench/results.py file (default: the newest)")
    p.add_argument("--out", type=Path, default=REPO / "docs" / "img", help="directory of the PNG files")
    args = p.parse_args(argv)
    path = args.results
    if path is None:
        files = sorted((HERE / "results").glob("*.json"))
        if not files:
            p.error("no bench/results/*.json: run bench/results.py first")
        path = files[-1]
    doc = json.loads(path.read_text())
    args.out.mkdir(parents=True, exist_ok=True)
    for plot in (plot_latency, plot_throughput, plot_catchup, plot_memory, plot_single, plot_failure):
        plot(doc, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
