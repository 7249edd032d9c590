"""How the multi-process benchmarks run: the parent's main, and a child's first steps.

`run_main` runs a parent's async main under a time limit, turns SIGTERM and Ctrl-C into
a clean stop, and always kills the child nodes left over; `run_children` is the body of
such a main (a cookie, a log directory, the figures kept when a section fails, the JSON
dump, the report); `choose_sections` checks ``--only``; `die_with_parent` makes a child
node process exit with its parent (even while its loop is blocked) and dump its Python
stack on SIGUSR2.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import secrets
import signal
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any


def run_main(label: str, main: Callable[[], Awaitable[int]], timeout: float,
             cleanup: Callable[[], None]) -> int:
    """Run ``main()`` for at most `timeout` s; exit status 2 on timeout, 130 on Ctrl-C;
    `cleanup` (kill the leftover children) runs in every case."""

    def terminated(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)  # unwinds through asyncio.run, then the finally below

    signal.signal(signal.SIGTERM, terminated)
    try:
        return asyncio.run(asyncio.wait_for(main(), timeout))  # type: ignore[arg-type]
    except TimeoutError:
        print(f"{label}: gave up after {timeout:g} s (--timeout)", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{label}: interrupted; every child node stopped", file=sys.stderr)
        return 130
    finally:
        cleanup()


def die_with_parent() -> None:
    """Exit when the parent dies (Linux's PR_SET_PDEATHSIG; at once if it is gone already),
    and print this process's Python stack on SIGUSR2, even with its loop blocked."""
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        if os.getppid() == 1:
            raise SystemExit(1)
    import faulthandler

    faulthandler.register(signal.SIGUSR2)


def log(label: str, text: str) -> None:
    """A progress line on stderr: ``[label HH:MM:SS] text``."""
    print(f"[{label} {time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def choose_sections(parser: argparse.ArgumentParser, only: str, sections: Sequence[str]) -> list[str]:
    """The sections of a comma-separated ``--only``; a usage error naming any unknown one."""
    chosen = [x.strip() for x in only.split(",") if x.strip()]
    unknown = set(chosen) - set(sections)
    if unknown:
        parser.error(f"--only: unknown section(s) {', '.join(sorted(unknown))}; choose from {', '.join(sections)}")
    return chosen


async def run_children(kind: str, opts: argparse.Namespace,
                       run: Callable[[argparse.Namespace, Path, dict[str, Any]], Awaitable[None]],
                       report: Callable[[dict[str, Any]], None]) -> int:
    """A parent's main: ``run(opts, logdir, res)`` with a fresh cookie for the children,
    then ``report(res)``; the figures measured before a failure are kept and reported
    (exit status 1), and written to ``--json`` when given."""
    os.environ["PGREGISTRY_COOKIE"] = secrets.token_urlsafe(24)
    logdir = Path(tempfile.mkdtemp(prefix=f"pgregistry-{kind}-bench-"))
    res: dict[str, Any] = {}
    started = time.monotonic()
    failed = False
    try:
        await run(opts, logdir, res)
    except Exception as exc:  # noqa: BLE001 - report, keep the figures measured so far
        failed = True
        res.setdefault("errors", {})["run"] = str(exc)[-2000:]
        print(f"\nthe run failed: {exc!r}\n(children's logs in {logdir})", file=sys.stderr)
    log(kind, f"done in {time.monotonic() - started:.0f} s; children's logs in {logdir}")
    if opts.json:
        Path(opts.json).write_text(json.dumps({"options": vars(opts), "results": res}, indent=1, default=str))
    print()
    report(res)
    return 1 if failed else 0


def reply(answer: dict[str, Any]) -> None:
    """A child's answer to its parent: one JSON line on stdout."""
    sys.stdout.write(json.dumps(answer) + "\n")
    sys.stdout.flush()


async def serve_commands(reader: asyncio.StreamReader,
                         handle: Callable[[dict[str, Any]], Awaitable[None]]) -> None:
    """A child's command loop: ``handle`` each JSON line of `reader` in a task of its own,
    until end of input; then cancel what is still running."""
    tasks: set[asyncio.Future[None]] = set()
    while True:
        line = await reader.readline()
        if not line:
            break
        task = asyncio.ensure_future(handle(json.loads(line)))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    for task in list(tasks):
        task.cancel()


class Profiling:
    """The ``prof_on`` / ``prof_off`` commands of a child: cProfile between the two, dumped
    to the path the parent names (``--profile``)."""

    profiler: Any = None

    async def cmd_prof_on(self) -> None:
        import cProfile

        self.profiler = cProfile.Profile()
        self.profiler.enable()

    async def cmd_prof_off(self, path: str) -> None:
        if self.profiler is not None:
            self.profiler.disable()
            self.profiler.dump_stats(path)
            self.profiler = None
