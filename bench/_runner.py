"""How the multi-process benchmarks run: the parent's main, and a child's first steps.

`run_main` runs a parent's async main under a time limit, turns SIGTERM and Ctrl-C into
a clean stop, and always kills the child nodes left over; `die_with_parent` makes a
child node process exit with its parent (even while its loop is blocked) and dump its
Python stack on SIGUSR2.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import Awaitable, Callable
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
