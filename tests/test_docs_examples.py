"""Every ```python block of every page in docs/ is real code: each one runs, as written.

A block is a whole program by default: it is run with ``python -c`` in a subprocess of
its own and must exit 0 within its timeout (a block that needs a cluster starts its own
nodes on loopback). An HTML comment on the line just above the fence, which the site
does not show, says otherwise:

* ``<!-- example: module NAME -->``: the block is a module (worker functions must live in
  an importable module, not in ``__main__``): it is saved as ``NAME.py`` and run as
  ``asyncio.run(NAME.main())``.
* ``<!-- example: fragment -->``: the block is deliberately not a whole program (a piece
  of a class, a few lines of an ``async def main()``). It is only compiled (``await`` at
  the top level allowed), so a syntax error still fails. Fragments are kept few: `MAX_FRAGMENTS`.

Pure API listings are ```text blocks, not python ones. README.md's blocks are run by
tests/test_readme.py. The blocks run in parallel threads, each in its own subprocess,
so the whole file takes about as long as the slowest block.
"""

from __future__ import annotations

import ast
import concurrent.futures
import os
import pathlib
import re
import subprocess
import sys
import tempfile
import textwrap
from dataclasses import dataclass

import pytest

DOCS = pathlib.Path(__file__).resolve().parent.parent / "docs"
TIMEOUT = 45.0  # seconds, per block
MAX_FRAGMENTS = 8

_FENCE = re.compile(r"^(?P<indent>[ \t]*)```python[ \t]*$")
_MARK = re.compile(r"^\s*<!--\s*example:\s*(?P<kind>module|fragment)\s*(?P<arg>[A-Za-z_][A-Za-z0-9_]*)?\s*-->\s*$")


@dataclass(frozen=True)
class Block:
    page: str  # relative to docs/
    line: int  # of the opening fence, 1-based
    kind: str  # "program", "module" or "fragment"
    module: str | None
    code: str

    @property
    def label(self) -> str:
        return f"{self.page}:{self.line}"


def collect(root: pathlib.Path = DOCS) -> list[Block]:
    """Every ```python block under `root`, with the kind its marker gives it."""
    blocks: list[Block] = []
    for path in sorted(root.rglob("*.md")):
        lines = path.read_text(encoding="utf-8").splitlines()
        i = 0
        while i < len(lines):
            fence = _FENCE.match(lines[i])
            if fence is None:
                i += 1
                continue
            indent = fence["indent"]
            start = i
            body: list[str] = []
            i += 1
            while i < len(lines) and lines[i].strip() != "```":
                body.append(lines[i])
                i += 1
            assert i < len(lines), f"{path.name}:{start + 1}: a python block is never closed"
            i += 1
            kind, module = "program", None
            above = start - 1
            while above >= 0 and not lines[above].strip():
                above -= 1
            mark = _MARK.match(lines[above]) if above >= 0 else None
            if mark is not None:
                kind, module = mark["kind"], mark["arg"]
                assert (kind == "module") == (module is not None), \
                    f"{path.name}:{start + 1}: 'module' takes a module name, 'fragment' takes none"
            code = "\n".join(line[len(indent):] if line.startswith(indent) else line.lstrip() for line in body)
            blocks.append(Block(str(path.relative_to(root)), start + 1, kind, module, textwrap.dedent(code) + "\n"))
    return blocks


def _run(block: Block) -> str | None:
    """None when `block` ran as it should, else why not."""
    if block.kind == "fragment":
        try:
            compile(block.code, block.label, "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
        except SyntaxError as exc:
            return f"does not compile: {exc}"
        return None
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
    env.pop("PYTHONPATH", None)
    with tempfile.TemporaryDirectory() as directory:
        if block.kind == "module":
            assert block.module is not None
            pathlib.Path(directory, f"{block.module}.py").write_text(block.code)
            argv = [sys.executable, "-c", f"import asyncio, {block.module}; asyncio.run({block.module}.main())"]
        else:
            argv = [sys.executable, "-c", block.code]
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=TIMEOUT, cwd=directory, env=env)
        except subprocess.TimeoutExpired:
            return f"did not end within {TIMEOUT} s"
    if done.returncode != 0:
        return f"exited {done.returncode}:\n{done.stderr[-4000:]}"
    return None


BLOCKS = collect()


def test_the_docs_have_examples_and_few_fragments() -> None:
    assert len(BLOCKS) >= 10, "the docs lost their python examples"
    fragments = [block.label for block in BLOCKS if block.kind == "fragment"]
    assert len(fragments) <= MAX_FRAGMENTS, f"too many fragments (make them programs): {fragments}"


def test_the_collector_reads_the_markers(tmp_path: pathlib.Path) -> None:
    (tmp_path / "page.md").write_text(
        "text\n\n```python\nprint(1)\n```\n\n<!-- example: fragment -->\n```python\nself.x = 1\n```\n"
        "<!-- example: module sessions -->\n\n```python\nasync def main(): pass\n```\n"
        "* a list item:\n\n  ```python\n  print(2)\n  ```\n")
    blocks = collect(tmp_path)
    assert [(b.kind, b.module, b.code) for b in blocks] == [
        ("program", None, "print(1)\n"), ("fragment", None, "self.x = 1\n"),
        ("module", "sessions", "async def main(): pass\n"), ("program", None, "print(2)\n")]


def test_every_docs_example_runs() -> None:
    workers = min(len(BLOCKS), max(4, (os.cpu_count() or 1) * 2))
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        outcomes = list(pool.map(_run, BLOCKS))
    failures = [f"{block.label} ({block.kind}) {why}" for block, why in zip(BLOCKS, outcomes) if why is not None]
    if failures:
        pytest.fail("\n\n".join(failures), pytrace=False)
