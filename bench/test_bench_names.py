"""Smoke test of ``bench/names.py``: its ``--quick`` run goes through every section.

Run with ``pytest bench/test_bench_names.py`` (a bare ``pytest`` never collects ``bench/``).
It checks that the benchmark runs and reports every figure, not the figures themselves:
a missed target is the benchmark's finding, not a failure here.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


@pytest.mark.timeout(600)
def test_names_bench_quick(tmp_path: Path) -> None:
    """``names.py --quick --json FILE`` exits 0, prints the table and measures every section."""
    out = tmp_path / "names.json"
    proc = subprocess.run([sys.executable, str(HERE / "names.py"), "--quick", "--json", str(out)],
                          cwd=HERE.parent, capture_output=True, text=True, timeout=540)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "register_name on A" in proc.stdout and "met?" in proc.stdout, proc.stdout[-4000:]
    results = json.loads(out.read_text())["results"]
    for section in ("rtt", "latency", "whereis", "tput1", "tput3", "lease", "memory", "exit", "kill", "join"):
        assert section in results, f"no {section} figures: {sorted(results)}"
    assert results["latency"]["n"] > 0 and results["rtt"]["n"] > 0
    assert all("seconds" in j for j in results["join"]), results["join"]
