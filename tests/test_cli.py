"""The README's main command, `pgregistry demo`, runs to the end and narrates."""

from __future__ import annotations

import subprocess
import sys


def test_demo_runs_and_exits_cleanly() -> None:
    done = subprocess.run([sys.executable, "-m", "pgregistry", "demo"], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "select workers with load > 2 -> [('alpha', 3), ('beta', 8)]" in out
    assert "event  Update key='workers'" in out
    assert "monitor: gamma is down, reason 'shutdown'" in out
    assert "count() = 0" in out and out.rstrip().endswith("done.")
