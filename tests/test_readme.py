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


def run_as_module(text: str, directory: pathlib.Path) -> list[str]:
    """Save `text` as ``sessions.py`` in `directory` and run its ``main()`` as the docs say
    (a worker function must live in a module, not in ``__main__``)."""
    (directory / "sessions.py").write_text(text)
    done = subprocess.run([sys.executable, "-c", "import asyncio, sessions; asyncio.run(sessions.main())"],
                          capture_output=True, text=True, timeout=60, cwd=directory)
    assert done.returncode == 0, done.stderr
    return done.stdout.splitlines()


def test_readme_workers_example_runs(tmp_path: pathlib.Path) -> None:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    lines = run_as_module(blocks[3], tmp_path)
    assert lines[0] == "True" and lines[1].startswith(("('a@127.0.0.1:", "('b@127.0.0.1:"))  # the key's owner
    assert lines[1].endswith("['book'])")


def test_placement_docs_quick_start_runs(tmp_path: pathlib.Path) -> None:
    page = README.parent / "docs" / "placement.md"
    blocks = re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.S)
    lines = run_as_module(blocks[0], tmp_path)
    assert lines[0] == "True" and lines[1].endswith("['book'])")
