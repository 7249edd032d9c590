"""Run the registry benchmarks and the memory probe; print one table against the targets in docs/performance.md.

Usage, from the repository root::

    .venv/bin/python bench/report.py                 # everything (a few minutes)
    .venv/bin/python bench/report.py --no-memory     # timings only (under a minute)

It runs ``pytest bench/test_bench_registry.py --benchmark-json=...`` in a child process
(Cython table, pure twin and dict baselines in that one process, figure by figure),
then ``bench/memory.py`` (one fresh interpreter per implementation and counter), and
prints one table: figure | cython median | pure median | baseline | cython/pure |
us/baseline | target | met?, then the machine. The suite runs ``--passes``
times (default 2) and each (figure, implementation) keeps its lowest median, so a burst
of load from other processes during one pass does not decide a ratio. "us" is the Cython table
(the pure twin, marked ``*``, when the extension is not built). Batch figures
(register) are per operation: the round's median divided by the operations per round.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

import memory  # noqa: E402  (bench/memory.py)
from _support import cpu_model, extension_status, git_commit  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Target:
    """A target of docs/performance.md: an upper bound on the Cython median and/or a minimum speed-up
    of the Cython table over the pure twin."""

    text: str
    max_value: float | None = None  # seconds, or bytes for memory rows
    min_speedup: float | None = None  # pure median / cython median

    def verdict(self, ours: float | None, speedup: float | None) -> str:
        """``yes``, or ``NO`` with by how much, or ``n/a`` when there is no figure."""
        if ours is None:
            return "n/a"
        misses = []
        if self.max_value is not None and ours > self.max_value:
            misses.append(f"{ours / self.max_value:.1f}x over")
        if self.min_speedup is not None:
            if speedup is None:
                misses.append("speed-up n/a")
            elif speedup < self.min_speedup:
                misses.append(f"only {speedup:.1f}x pure")
        return "yes" if not misses else "NO: " + ", ".join(misses)


@dataclasses.dataclass(frozen=True)
class Row:
    """One line of the table: a benchmark figure (``extra_info["figure"]``)."""

    figure: str
    label: str
    target: Target | None = None


TIME_ROWS = [
    Row("lookup_1", "lookup, key with 1 entry", Target("<= 0.3 us", max_value=0.3e-6)),
    Row("lookup_10", "lookup, key with 10 entries"),
    Row("lookup_1000", "lookup, key with 1000 entries"),
    Row("register", "register, no subscribers (per op)", Target("<= 1 us", max_value=1e-6)),
    Row("register_unregister", "register + unregister pair (per pair)"),
    Row("match_10k", "match + guard, 1 key of 10 000 entries", Target("<= 0.7 ms, >= 5x pure", 0.7e-3, 5.0)),
    Row("select_100k_int", "select + guard, 100 000 rows (int values)", Target("<= 5 ms, >= 5x pure", 5e-3, 5.0)),
    Row("select_100k_dict", "select + guard, 100 000 rows (dict values)", Target("<= 5 ms, >= 5x pure", 5e-3, 5.0)),
    Row("exit_1k", "exit of a process holding 1 000 entries"),
    Row("exit_100k", "exit of a process holding 100 000 entries", Target("<= 50 ms", max_value=50e-3)),
]
MEMORY_TARGET = Target("<= 200 B", max_value=200.0)


def fmt_time(seconds: float | None) -> str:
    """A duration with a unit that keeps 3 significant digits."""
    if seconds is None:
        return "-"
    for scale, unit in ((1.0, "s"), (1e-3, "ms"), (1e-6, "us")):
        if seconds >= scale:
            return f"{seconds / scale:.3g} {unit}"
    return f"{seconds / 1e-9:.3g} ns"


def fmt_bytes(n: float | None) -> str:
    """Bytes per entry, rounded."""
    return "-" if n is None else f"{n:.0f} B"


def fmt_ratio(a: float | None, b: float | None) -> str:
    """``a / b`` as ``0.12`` (and how many times faster when below 1)."""
    if a is None or b is None or b == 0:
        return "-"
    r = a / b
    return f"{r:.2f} ({b / a:.1f}x faster)" if r < 1 else f"{r:.2f}"


def run_benchmarks(json_path: Path, max_time: float, extra: list[str]) -> None:
    """Run the pytest-benchmark suite once, writing its JSON to `json_path`."""
    cmd = [
        sys.executable, "-m", "pytest", str(HERE / "test_bench_registry.py"), "-q",
        f"--benchmark-json={json_path}", f"--benchmark-max-time={max_time}",
        "--benchmark-min-time=0.00005",  # >= 50 us per round: timer overhead < 0.2 %
        "--benchmark-min-rounds=5", "--benchmark-columns=median,iqr,rounds", *extra,
    ]
    print("running:", " ".join(cmd[1:]), file=sys.stderr, flush=True)
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0 or not json_path.exists():
        sys.stderr.write(proc.stdout[-6000:] + proc.stderr[-3000:])
        raise SystemExit(f"the benchmarks failed (pytest exit code {proc.returncode})")


def medians(json_paths: list[Path]) -> dict[tuple[str, str], float]:
    """``{(figure, impl): median seconds per operation}`` from pytest-benchmark JSONs.

    With several passes, each (figure, impl) keeps its lowest median: the pass that
    other processes on the machine disturbed least.
    """
    out: dict[tuple[str, str], float] = {}
    for json_path in json_paths:
        for bench in json.loads(json_path.read_text())["benchmarks"]:
            info = bench["extra_info"]
            key = (info["figure"], info["impl"])
            median = bench["stats"]["median"] / info.get("ops", 1)
            out[key] = min(median, out.get(key, median))
    return out


def machine() -> str:
    """CPU model and count, Python version, commit: the line under the table."""
    model, commit = cpu_model(), git_commit()
    built = sorted((REPO / "pgregistry").glob("_core*.so"))
    extension = (f"extension built {datetime.datetime.fromtimestamp(built[0].stat().st_mtime):%Y-%m-%d %H:%M:%S}"
                 if built else "extension not built")
    return (f"machine: {model}, {os.cpu_count()} cpus; Python {platform.python_version()} "
            f"({platform.python_implementation()}), asyncio default loop, GC enabled; "
            f"commit {commit} + working tree, {extension}; {datetime.datetime.now():%Y-%m-%d %H:%M}")


def build_table(times: dict[tuple[str, str], float], mem: list[dict[str, Any]], ours_impl: str) -> list[list[str]]:
    """The rows of the report, header first."""
    star = "" if ours_impl == "cython" else "*"
    rows = [["figure", "cython median", "pure median", "baseline (dict)", "cython/pure",
             f"us{star}/baseline", "target", "met?"]]
    for row in TIME_ROWS:
        cy, py = times.get((row.figure, "cython")), times.get((row.figure, "python"))
        base, locked = times.get((row.figure, "dict")), times.get((row.figure, "dict_lock"))
        ours = cy if ours_impl == "cython" else py
        baseline = fmt_time(base) + (f" (+lock {fmt_time(locked)})" if locked is not None else "")
        speedup = py / cy if cy and py else None
        rows.append([
            row.label, fmt_time(cy), fmt_time(py), baseline if base is not None else "-",
            fmt_ratio(cy, py), fmt_ratio(ours, base),
            row.target.text if row.target else "-",
            row.target.verdict(ours, speedup) if row.target else "-",
        ])
    by = {(m["shape"], m["impl"], m["counter"]): m for m in mem}
    for shape, label in (("distinct", "1M entries, distinct keys"), ("groups", "1M entries, 1000 keys x 1000")):
        for field, what, target in (("table_bytes_per_entry", "table only", MEMORY_TARGET),
                                    ("total_bytes_per_entry", "incl. key/value/pid", None)):
            if not any(s == shape for s, _i, _c in by):
                continue

            def cell(impl: str, shape: str = shape, field: str = field) -> tuple[float | None, str]:
                rss, tm = by.get((shape, impl, "rss")), by.get((shape, impl, "tracemalloc"))
                value = rss[field] if rss else None
                text = fmt_bytes(value) + (f" (tm {tm[field]:.0f})" if tm else "")
                return value, text if rss or tm else "-"

            (cy, cy_text), (py, py_text), (base, base_text) = cell("cython"), cell("python"), cell("dict")
            ours = cy if ours_impl == "cython" else py
            rows.append([
                f"memory/entry, {label}: {what} (RSS; tm = tracemalloc)", cy_text, py_text, base_text,
                fmt_ratio(cy, py).split(" ")[0], fmt_ratio(ours, base).split(" ")[0],
                target.text if target else "-",
                target.verdict(ours, None) if target else "-",
            ])
    return rows


def render(rows: list[list[str]]) -> str:
    """A pipe table (readable as text and as Markdown)."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def extension_mtime() -> float | None:
    """Modification time of the built extension, or None (to detect a rebuild mid-run)."""
    built = sorted((REPO / "pgregistry").glob("_core*.so"))
    return built[0].stat().st_mtime if built else None


def main(argv: list[str] | None = None) -> int:
    """Command line: run, then print the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--no-memory", action="store_true", help="skip the memory probe")
    parser.add_argument("--memory-entries", type=int, default=1_000_000, help="entries for the memory probe")
    parser.add_argument("--max-time", type=float, default=0.5, help="seconds per benchmark (pytest-benchmark max-time)")
    parser.add_argument("--passes", type=int, default=2,
                        help="run the suite this many times and keep each figure's lowest median (default 2)")
    parser.add_argument("--json-dir", type=Path, help="keep bench-N.json and memory.json in this directory")
    parser.add_argument("pytest_args", nargs="*", help="extra arguments for pytest (after --)")
    args = parser.parse_args(argv)

    problem = extension_status()
    ours_impl = "cython" if problem is None else "python"
    workdir = args.json_dir or Path(tempfile.mkdtemp(prefix="pgregistry-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()[0]
    mtime_before = extension_mtime()
    bench_jsons = [workdir / f"bench-{n + 1}.json" for n in range(max(1, args.passes))]
    for bench_json in bench_jsons:
        run_benchmarks(bench_json, args.max_time, args.pytest_args)
    times = medians(bench_jsons)

    mem: list[dict[str, Any]] = []
    if not args.no_memory:
        impls = [i for i in memory.IMPLS if i != "cython" or problem is None]
        mem = memory.measure(impls, list(memory.COUNTERS), list(memory.SHAPES), args.memory_entries,
                             progress=lambda s: print(s, file=sys.stderr, flush=True))
        (workdir / "memory.json").write_text(json.dumps(mem, indent=1))

    print(render(build_table(times, mem, ours_impl)))
    if problem is not None:
        print(f"* the Cython table was not measured ({problem}); 'us' is the pure twin")
    print("cython/pure < 1: the Cython table is faster; us/baseline > 1: slower than the dict registry.")
    if extension_mtime() != mtime_before:
        print("WARNING: the extension was rebuilt during this run; the Cython figures mix two builds")
    print(machine() + f"; load average {load_before:.2f} before, {os.getloadavg()[0]:.2f} after; "
          f"lowest median of {len(bench_jsons)} pass(es)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
