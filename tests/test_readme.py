"""The README's example is real code: extract it and run it."""

from __future__ import annotations

import os
import pathlib
import re
import shlex
import subprocess
import sys
import time

from .test_cli import _read_line

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


def test_readme_three_terminal_walk_through_works_as_written(tmp_path: pathlib.Path) -> None:
    """The shell block, run as written: the cookie line, three nodes (each a terminal of
    its own: here a background process), then ``status`` on the first."""
    [block] = re.findall(r"```sh\n(.*?)```", README.read_text(), flags=re.S)
    cookie_line, *node_lines, status_line = block.strip().splitlines()
    env = {"PATH": f"{pathlib.Path(sys.executable).parent}{os.pathsep}/usr/bin:/bin"}
    subprocess.run(cookie_line, shell=True, check=True, cwd=tmp_path, env=env, timeout=30)
    assert (tmp_path / "cookie").stat().st_mode & 0o077 == 0
    nodes: list[subprocess.Popen[str]] = []
    try:
        for line in node_lines:
            proc = subprocess.Popen(shlex.split(line), cwd=tmp_path, env=env, text=True,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            nodes.append(proc)
            assert _read_line(proc).startswith("NODE "), line
        deadline = 20.0
        start = time.monotonic()
        while True:
            done = subprocess.run(shlex.split(status_line), cwd=tmp_path, env=env, capture_output=True, text=True,
                                  timeout=30)
            assert done.returncode == 0, done.stderr
            if "peers: 2" in done.stdout:
                break
            assert time.monotonic() - start < deadline, done.stdout
            time.sleep(0.1)  # polling a cluster of OS processes for its mesh, with a deadline
        out = done.stdout
        assert out.startswith("node a@127.0.0.1:4370") and "b@127.0.0.1:" in out and "c@127.0.0.1:" in out
        assert "registry jobs: 0 entries, 2 peers" in out, out
    finally:
        for proc in nodes:
            proc.terminate()
        for proc in nodes:
            try:
                assert proc.wait(15) == 0
            finally:
                if proc.poll() is None:
                    proc.kill()
