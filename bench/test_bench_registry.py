"""Registry benchmarks (pytest-benchmark): the single-node figures of docs/performance.md.

Run with ``pytest bench/`` (``bench/report.py`` runs them and prints the table). Every
figure runs on the Cython table (``impl=cython``) and on the pure-Python twin
(``impl=python``) in the same pytest process, one right after the other (see
``conftest.py``); most have a plain-dict baseline too (``impl=dict`` and, for lookup,
``impl=dict_lock``, the same dict behind a ``threading.Lock``).

All registry calls run inside a pgregistry process: each benchmark is an async test
that enters ``async with Node(...)`` (its task becomes the node's main process) and
then calls the synchronous ``benchmark(...)`` from that coroutine; the event loop does
not run while a figure is being measured, exactly as during a burst of synchronous
registry calls in real code. The cyclic GC stays enabled (pytest-benchmark's default):
its cost is part of what users pay.

Each benchmark stores in ``benchmark.extra_info``: ``figure`` (the row of the report),
``impl`` and ``ops`` (operations per measured round: batch figures divide by it).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest
from _support import DictRegistry, LockedDictRegistry, extension_status, make_registry, pure_python_forced

from pgregistry.node import Node
from pgregistry.process import exit as exit_process
from pgregistry.process import receive, send
from pgregistry.process import self as self_pid
from pgregistry.registry import Registry
from pgregistry.spec import V1, V2, V3
from pgregistry.terms import Pid

_EXTENSION_PROBLEM = extension_status()
#: A missing extension skips the Cython cases ("extension not built"); one that exists
#: but fails to import is not skipped, so every Cython case errors and the broken build shows.
CYTHON = pytest.param("cython", id="cython", marks=pytest.mark.skipif(
    pure_python_forced() or _EXTENSION_PROBLEM == "extension not built",
    reason="PGREGISTRY_PURE_PYTHON=1" if pure_python_forced() else "extension not built",
))
PYTHON = pytest.param("python", id="python")
DICT = pytest.param("dict", id="dict")
DICT_LOCK = pytest.param("dict_lock", id="dict_lock")
TABLES = ("cython", "python")

#: Keys registered per measured round of the batch figures (register, pairs).
BATCH = 10_000
#: Rounds of the batch figures (each round is `BATCH` operations).
BATCH_ROUNDS = 12
#: Entries under the key of the match figure and rows of the select figure.
MATCH_ENTRIES = 10_000
SELECT_ROWS = 100_000
#: Rounds of the exit figure, per size of the exiting process.
EXIT_ROUNDS = {1_000: 40, 100_000: 6}


def _info(benchmark: Any, figure: str, impl: str, ops: int = 1) -> None:
    """Record the figure, implementation and operations per round for the report."""
    benchmark.group = figure
    benchmark.extra_info.update(figure=figure, impl=impl, ops=ops)


def _registry(node: Node, impl: str) -> Registry:
    """A fresh duplicate registry on `impl` (``cython``/``python``)."""
    return make_registry(node, "bench", impl)


async def _idle(parent: Pid) -> None:
    """Body of an idle process: say "ready" to `parent`, then wait until told to stop."""
    send(parent, "ready")
    while await receive() != "stop":
        pass


# -- 1. lookup ---------------------------------------------------------------------------

@pytest.mark.parametrize("entries", [1, 10, 1000])
@pytest.mark.parametrize("impl", [CYTHON, PYTHON, DICT, DICT_LOCK])
async def test_lookup(benchmark: Any, impl: str, entries: int) -> None:
    """`Registry.lookup` of a key holding `entries` entries (a list of ``(pid, value)``).

    Baselines: `DictRegistry.lookup` (a copy of the key's list) and the same behind a
    lock. The entries belong to the calling process, values are small ints.
    """
    async with Node("bench") as node:
        me = self_pid()
        lookup: Callable[[Any], list]
        if impl in TABLES:
            reg = _registry(node, impl)
            for i in range(entries):
                reg.register("group", i)
            lookup = reg.lookup
        else:
            d = DictRegistry() if impl == "dict" else LockedDictRegistry()
            for i in range(entries):
                d.register("group", me, i)
            lookup = d.lookup
        _info(benchmark, f"lookup_{entries}", impl)
        result = benchmark(lookup, "group")
        assert len(result) == entries and result[-1] == (me, entries - 1)


# -- 2. register -------------------------------------------------------------------------

def _batch_keys() -> list[tuple[str, int]]:
    """`BATCH` distinct ``(key, value)`` pairs, made before measuring."""
    return [(f"key-{i}", i) for i in range(BATCH)]


@pytest.mark.parametrize("impl", [CYTHON, PYTHON, DICT])
async def test_register(benchmark: Any, impl: str) -> None:
    """`Registry.register` of a new key, no subscribers, no listeners: one round
    registers `BATCH` distinct keys (report divides by `BATCH`); teardown removes them.

    Baseline: `DictRegistry.register` with the caller's pid at hand.
    """
    pairs = _batch_keys()
    async with Node("bench") as node:
        me = self_pid()
        run: Callable[[], None]
        cleanup: Callable[[], None]
        count: Callable[[], int]
        if impl in TABLES:
            reg = _registry(node, impl)
            register, unregister = reg.register, reg.unregister

            def run() -> None:
                for key, value in pairs:
                    register(key, value)

            def cleanup() -> None:
                for key, _value in pairs:
                    unregister(key)

            count = reg.count
        else:
            d = DictRegistry()
            dict_register = d.register

            def run() -> None:
                for key, value in pairs:
                    dict_register(key, me, value)

            cleanup = d.clear

            def count() -> int:
                return sum(map(len, d.entries.values()))

        def check_and_clean() -> None:
            assert count() == BATCH
            cleanup()
            assert count() == 0

        _info(benchmark, "register", impl, BATCH)
        benchmark.pedantic(run, teardown=check_and_clean, rounds=BATCH_ROUNDS, warmup_rounds=1)


@pytest.mark.parametrize("impl", [CYTHON, PYTHON, DICT])
async def test_register_unregister(benchmark: Any, impl: str) -> None:
    """A `register` immediately followed by `unregister` of the same new key, `BATCH`
    pairs per round (the table is empty again after each round).

    Baseline: `DictRegistry.register` + `DictRegistry.unregister`.
    """
    pairs = _batch_keys()
    async with Node("bench") as node:
        me = self_pid()
        run: Callable[[], None]
        count: Callable[[], int]
        if impl in TABLES:
            reg = _registry(node, impl)
            register, unregister = reg.register, reg.unregister

            def run() -> None:
                for key, value in pairs:
                    register(key, value)
                    unregister(key)

            count = reg.count
        else:
            d = DictRegistry()
            dict_register, dict_unregister = d.register, d.unregister

            def run() -> None:
                for key, value in pairs:
                    dict_register(key, me, value)
                    dict_unregister(key, me)

            def count() -> int:
                return len(d.entries)

        _info(benchmark, "register_unregister", impl, BATCH)
        benchmark.pedantic(run, rounds=BATCH_ROUNDS, warmup_rounds=1)
        assert count() == 0


# -- 3. match ----------------------------------------------------------------------------

@pytest.mark.parametrize("impl", [CYTHON, PYTHON, DICT])
async def test_match(benchmark: Any, impl: str) -> None:
    """``match("group", {"n": V1}, [V1 > 9000])`` on a key of `MATCH_ENTRIES` entries
    with values ``{"n": i}``: 999 hits. The call includes the spec-cache lookup.

    Baseline: a list comprehension over the dict registry's list with the same test.
    """
    async with Node("bench") as node:
        me = self_pid()
        run: Callable[[], list]
        if impl in TABLES:
            reg = _registry(node, impl)
            for i in range(MATCH_ENTRIES):
                reg.register("group", {"n": i})

            def run() -> list:
                return reg.match("group", {"n": V1}, [V1 > 9000])
        else:
            d = DictRegistry()
            for i in range(MATCH_ENTRIES):
                d.register("group", me, {"n": i})
            entries = d.entries

            def run() -> list:
                return [(p, v) for p, v in entries.get("group", ()) if v["n"] > 9000]

        _info(benchmark, "match_10k", impl)
        result = benchmark(run)
        assert len(result) == MATCH_ENTRIES - 9001 and result[0] == (me, {"n": 9001})


# -- 4. select ---------------------------------------------------------------------------

@pytest.mark.parametrize("values", ["int", "dict"])
@pytest.mark.parametrize("impl", [CYTHON, PYTHON, DICT])
async def test_select(benchmark: Any, impl: str, values: str) -> None:
    """`select` with a guard over `SELECT_ROWS` rows (distinct keys ``0..N-1``), 9 999 hits.

    ``values="int"``: value ``i``, spec ``[((V1, V2, V3), [V3 > 90000], [V1])]``.
    ``values="dict"``: value ``{"n": i}``, spec ``[((V1, V2, {"n": V3}), [V3 > 90000], [V1])]``.
    Baseline: a comprehension over every key's list of the dict registry.
    """
    async with Node("bench") as node:
        me = self_pid()
        make_value: Callable[[int], Any] = (lambda i: i) if values == "int" else (lambda i: {"n": i})
        run: Callable[[], list]
        if impl in TABLES:
            reg = _registry(node, impl)
            for i in range(SELECT_ROWS):
                reg.register(i, make_value(i))
            spec = ([((V1, V2, V3), [V3 > 90000], [V1])] if values == "int"
                    else [((V1, V2, {"n": V3}), [V3 > 90000], [V1])])

            def run() -> list:
                return reg.select(spec)
        else:
            d = DictRegistry()
            for i in range(SELECT_ROWS):
                d.register(i, me, make_value(i))
            entries = d.entries
            if values == "int":
                def run() -> list:
                    return [k for k, es in entries.items() for _p, v in es if v > 90000]
            else:
                def run() -> list:
                    return [k for k, es in entries.items() for _p, v in es if v["n"] > 90000]

        _info(benchmark, f"select_100k_{values}", impl)
        result = benchmark(run)
        assert len(result) == SELECT_ROWS - 90001 and result[0] == 90001


# -- 5. exit cleanup ---------------------------------------------------------------------

@pytest.mark.parametrize("held", [1_000, 100_000])
@pytest.mark.parametrize("impl", [CYTHON, PYTHON])
async def test_exit(benchmark: Any, impl: str, held: int) -> None:
    """``exit(pid, "kill")`` of a running process holding `held` entries (distinct keys),
    no subscribers: the measured call returns once the exit hooks have removed every
    entry (they run synchronously inside the exit).

    Each round's victim is a process already started and blocked in `receive`; the
    untimed setup gives it `held` entries with `register_name` (the same rows its own
    `register` calls would make), so the table holds only the victim's entries.
    """
    rounds, warmup = EXIT_ROUNDS[held], 1
    keys = [f"key-{i}" for i in range(held)]
    async with Node("bench") as node:
        reg = _registry(node, impl)
        victims: list[Pid] = []
        me = self_pid()
        for _ in range(rounds + warmup + 1):  # one spare for --benchmark-cprofile
            victims.append(node.spawn(_idle, me))
        for _ in victims:  # every victim has started and waits in receive()
            assert await receive(5.0) == "ready"
        register_name = reg.register_name

        def setup() -> tuple[tuple[Pid], dict]:
            assert reg.count() == 0
            pid = victims.pop()
            for i, key in enumerate(keys):
                register_name(key, pid, i)
            assert reg.count() == held
            return (pid,), {}

        def kill(pid: Pid) -> None:
            exit_process(pid, "kill")

        def check(pid: Pid) -> None:
            assert reg.count() == 0 and node.runtime.process(pid) is None

        _info(benchmark, f"exit_{held // 1000}k", impl)
        benchmark.pedantic(kill, setup=setup, teardown=check, rounds=rounds, warmup_rounds=warmup)
        for pid in victims:
            send(pid, "stop")
        await asyncio.sleep(0)
