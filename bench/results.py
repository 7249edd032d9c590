"""Run the single-node and cluster benchmarks at modest sizes and keep their figures as one JSON file.

Usage, from the repository root, with the test extras installed::

    .venv/bin/python bench/results.py                        # every section (about 5 minutes here)
    .venv/bin/python bench/results.py --only cluster,names   # registry memory placement cluster names workers
    .venv/bin/python bench/results.py --out /tmp/run.json    # default: bench/results/<date>.json
    .venv/bin/python bench/plots.py                          # then draw the newest file into docs/img/

Each section runs one of the existing benchmarks as a child process, with its ``--json``
option where it has one, and copies the raw figures into the output file unchanged:

``registry``   ``bench/report.py --no-memory --json-dir DIR`` (the pytest-benchmark suite,
               ``--passes`` times, each figure's lowest median kept, as report.py does)
``memory``     ``bench/memory.py --entries 1000000 --json FILE`` (every implementation,
               counter and shape, each in a fresh interpreter)
``placement``  ``bench/placement.py`` (it prints one line per key shape; they are parsed)
``cluster``    ``bench/cluster.py --loop both`` with shorter churn, fewer trials and five
               catch-up sizes from 10 000 to 1 000 000 entries (``--json``)
``names``      ``bench/names.py`` between ``--quick`` and the full sizes (``--json``)
``workers``    ``bench/workers.py`` at its full sizes (``--json``)

The sizes are in ``SECTIONS`` below. The file also records the machine: CPU model, the
cores Python sees, Python version and implementation, the load average before and after
every section, the date, the commit and whether the Cython table was built, and each
section's command line, wall time and printed table. The machine this project is
measured on is a shared 2-core one: read every figure beside the baseline measured in the
same run (the bare round trip, the dict registry), as ``docs/benchmarks.md`` explains.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

import report  # noqa: E402  (bench/report.py: the medians of its pytest-benchmark JSON)
from _support import cpu_model, extension_status, git_commit  # noqa: E402

CLUSTER_ARGS = ["--loop", "both", "--churn", "5", "--trials", "3000", "--tput-n", "100000",
                "--purge-n", "100000", "--catchup-sizes", "10000,30000,100000,300000,1000000"]
NAMES_ARGS = ["--trials", "2000", "--whereis-n", "200000", "--tput-n", "5000", "--lease-n", "20000",
              "--mem-n", "20000", "--exit-trials", "10", "--idle", "3", "--join-sizes", "1000,10000"]
SECTIONS = ("registry", "memory", "placement", "cluster", "names", "workers")


def machine_info() -> dict[str, Any]:
    """What the figures were measured on."""
    model, commit = cpu_model(), git_commit()
    problem = extension_status()
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "commit": commit,
        "table": "cython" if problem is None else f"pure-Python twin ({problem})",
        "load_average_start": list(os.getloadavg()),
    }


def run(cmd: list[str], timeout: float) -> tuple[str, float]:
    """Run a benchmark from the repository root; its stdout and wall time (stderr is shown as it goes)."""
    print("running:", " ".join(cmd), file=sys.stderr, flush=True)
    started = time.monotonic()
    proc = subprocess.run(cmd, cwd=REPO, stdout=subprocess.PIPE, text=True, timeout=timeout)
    seconds = time.monotonic() - started
    if proc.returncode != 0:
        print(proc.stdout[-4000:], file=sys.stderr)
        raise RuntimeError(f"{cmd[1]} exited with status {proc.returncode}")
    return proc.stdout, seconds


def section_registry(tmp: Path, passes: int) -> dict[str, Any]:
    out = tmp / "registry"
    cmd = [sys.executable, "bench/report.py", "--no-memory", "--passes", str(passes), "--json-dir", str(out)]
    table, seconds = run(cmd, 1200)
    times = report.medians(sorted(out.glob("bench-*.json")))
    medians: dict[str, dict[str, float]] = {}
    for (figure, impl), median in times.items():
        medians.setdefault(figure, {})[impl] = median
    return {"command": cmd[1:], "seconds": seconds, "table": table, "medians": medians,
            "labels": {row.figure: row.label for row in report.TIME_ROWS}}


def section_memory(tmp: Path, entries: int) -> dict[str, Any]:
    out = tmp / "memory.json"
    cmd = [sys.executable, "bench/memory.py", "--entries", str(entries), "--json", str(out)]
    table, seconds = run(cmd, 1200)
    return {"command": cmd[1:], "seconds": seconds, "table": table, "results": json.loads(out.read_text())}


def section_placement(_tmp: Path) -> dict[str, Any]:
    cmd = [sys.executable, "bench/placement.py"]
    table, seconds = run(cmd, 300)
    rows = {}
    for line in table.splitlines():
        fields = line.split()
        if len(fields) == 6 and fields[0] in ("str", "int", "tuple"):
            names = ("dict_get", "key_hash", "node_for", "node_for_hash", "nodes_for_3")
            rows[fields[0]] = {n: float(v) * 1e-9 for n, v in zip(names, fields[1:])}
    return {"command": cmd[1:], "seconds": seconds, "table": table, "seconds_per_call": rows}


def section_json_bench(tmp: Path, script: str, args: list[str]) -> dict[str, Any]:
    out = tmp / (Path(script).stem + ".json")
    cmd = [sys.executable, script, *args, "--json", str(out)]
    table, seconds = run(cmd, 1800)
    data = json.loads(out.read_text())
    return {"command": cmd[1:], "seconds": seconds, "table": table, **data}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated subset of {','.join(SECTIONS)}")
    p.add_argument("--out", type=Path, help="output file (default bench/results/<date>.json)")
    p.add_argument("--passes", type=int, default=2, help="passes of the registry suite (default 2)")
    p.add_argument("--memory-entries", type=int, default=1_000_000, help="entries of the memory probe")
    args = p.parse_args(argv)
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = set(only) - set(SECTIONS)
    if unknown:
        p.error(f"--only: unknown section(s) {', '.join(sorted(unknown))}")

    now = datetime.datetime.now(datetime.UTC)
    out = args.out or HERE / "results" / f"{now:%Y-%m-%d}.json"
    doc: dict[str, Any] = {"date": now.isoformat(timespec="seconds"), "machine": machine_info(),
                           "command": ["bench/results.py", *(argv if argv is not None else sys.argv[1:])],
                           "sections": {}}
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="pgregistry-results-") as tmpdir:
        tmp = Path(tmpdir)
        for name in SECTIONS:
            if name not in only:
                continue
            load_before = list(os.getloadavg())
            try:
                if name == "registry":
                    res = section_registry(tmp, args.passes)
                elif name == "memory":
                    res = section_memory(tmp, args.memory_entries)
                elif name == "placement":
                    res = section_placement(tmp)
                elif name == "cluster":
                    res = section_json_bench(tmp, "bench/cluster.py", CLUSTER_ARGS)
                elif name == "names":
                    res = section_json_bench(tmp, "bench/names.py", NAMES_ARGS)
                else:
                    res = section_json_bench(tmp, "bench/workers.py", [])
            except (RuntimeError, subprocess.TimeoutExpired, OSError, ValueError) as exc:
                res = {"failed": str(exc)}
                print(f"{name}: failed: {exc}", file=sys.stderr)
            res["load_average_before"] = load_before
            res["load_average_after"] = list(os.getloadavg())
            doc["sections"][name] = res
            print(f"{name}: done ({res.get('seconds', 0):.0f} s)", file=sys.stderr, flush=True)
    doc["seconds"] = time.monotonic() - started
    doc["machine"]["load_average_end"] = list(os.getloadavg())
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1, default=str) + "\n")
    print(f"wrote {out} ({doc['seconds']:.0f} s in all)")
    return 1 if any("failed" in s for s in doc["sections"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
