"""The ``pgregistry`` command.

``pgregistry demo`` runs a narrated tour of the registry on one node: processes
registering, lookups, a match-spec select, a subscription receiving events, and a
process exit removing its entries.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import Any, Callable, Sequence

from . import _table
from .events import Join, Leave, Update
from .node import Node
from .process import exit as exit_process
from .process import monitor, receive, send, self as self_pid
from .registry import Registry
from .spec import V1, V2, V3, _

__all__ = ["main"]


def _say(text: str = "") -> None:
    print(text, flush=True)


async def _worker(reg: Registry, role: str, load: int) -> None:
    """A demo process: joins the "workers" group, then serves until told to stop."""
    reg.register("workers", {"role": role, "load": load})
    reg.register(("shard", load % 2), role)
    while True:
        msg = await receive()
        if msg == "stop":
            return
        if isinstance(msg, tuple) and msg[0] == "load":
            reg.update_value("workers", {"role": role, "load": msg[1]})


async def _expect(ref: Any, count: int) -> list[Any]:
    events = []
    while len(events) < count:
        msg = await receive(5)
        if isinstance(msg, (Join, Leave, Update)) and msg.ref == ref:
            events.append(msg)
    return events


def _show_event(event: Any, names: dict[Any, str]) -> str:
    kind = type(event).__name__
    if isinstance(event, Update):
        items = ", ".join(f"{names.get(p, p)}: {old} -> {new}" for p, old, new in event.changes)
    else:
        items = ", ".join(f"{names.get(p, p)}={v}" for p, v in event.entries)
    return f"  event  {kind:<5} key={event.key!r:<14} {items}"


async def demo() -> int:
    _say(f"pgregistry demo — one node, table implementation: {_table.IMPLEMENTATION}")
    _say()
    async with Node("demo") as node:
        reg = await Registry.start(node, "services", keys="duplicate")
        _say(f"started node {node.id} and registry {reg.name!r} (duplicate keys)")
        ref, snapshot = reg.monitor_scope()
        _say(f"this task subscribed to every change; snapshot: {snapshot}")
        _say()

        roles = [("alpha", 3), ("beta", 8), ("gamma", 1)]
        pids = [node.spawn(_worker, reg, role, load) for role, load in roles]
        names = {pid: role for pid, (role, _load) in zip(pids, roles)}
        _say("spawned three worker processes; each registers itself:")
        for event in await _expect(ref, 6):
            _say(_show_event(event, names))
        _say()

        _say("lookup('workers'):")
        for pid, value in reg.lookup("workers"):
            _say(f"  {names[pid]:<6} {pid!r:<28} {value}")
        _say(f"count() = {reg.count()}, which_groups() = {sorted(map(repr, reg.which_groups()))}")
        _say()

        busy = reg.select([(("workers", V1, {"role": V2, "load": V3}), [V3 > 2], [(V2, V3)])])
        _say(f"select workers with load > 2 -> {sorted(busy)}")
        light = reg.match("workers", {"load": V1}, [V1 <= 2])
        _say(f"match('workers', {{'load': V1}}, [V1 <= 2]) -> {[names[p] for p, _v in light]}")
        _say(f"count_match(('shard', 1), _) -> {reg.count_match(('shard', 1), _)}")
        _say()

        _say("beta reports a new load; the subscription sees an Update:")
        send(pids[1], ("load", 0))
        for event in await _expect(ref, 1):
            _say(_show_event(event, names))
        _say(f"  lookup now lists beta last: {[names[p] for p, _v in reg.lookup('workers')]}")
        _say()

        _say("gamma is sent an exit signal; its entries leave with the process:")
        down = monitor(pids[2])
        exit_process(pids[2], "shutdown")
        for event in await _expect(ref, 2):
            _say(_show_event(event, names))
        while True:
            msg = await receive(5)
            if getattr(msg, "ref", None) == down:
                _say(f"  monitor: gamma is down, reason {msg.reason!r}")
                break
        _say(f"  lookup('workers') -> {[names[p] for p, _v in reg.lookup('workers')]}")
        _say()

        for pid in pids[:2]:
            send(pid, "stop")
        await _expect(ref, 4)
        _say(f"alpha and beta stopped; count() = {reg.count()}")
        _say(f"this process is {self_pid()!r}; stopping the node.")
    _say("done.")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pgregistry", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("demo", help="run a narrated tour of the registry")
    args = parser.parse_args(argv)
    handlers: dict[str, Callable[[], Any]] = {"demo": demo}
    try:
        return asyncio.run(handlers[args.command]())
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
