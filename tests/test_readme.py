"""The README's example is real code: extract it and run it."""

from __future__ import annotations

import pathlib
import re
import subprocess
import sys

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"


def _run_block(index: int) -> list[str]:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert len(blocks) > index, "the README lost a python example"
    done = subprocess.run([sys.executable, "-c", blocks[index]], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout.splitlines()


def test_readme_cluster_example_runs() -> None:
    lines = _run_block(1)
    assert len(lines) == 1 and lines[0].startswith("[(<b@127.0.0.1:") and "{'load': 0}" in lines[0]


def test_readme_example_runs() -> None:
    lines = _run_block(0)
    assert len(lines) == 7
    assert all(line.startswith("Join(") for line in lines[:3])
    assert lines[6].startswith("Leave(") and "'load': 3" in lines[6]


def test_readme_names_example_runs() -> None:
    lines = _run_block(2)
    assert len(lines) == 2 and lines[0].startswith("hello from b@127.0.0.1:") and lines[1] == "True"
