"""One node running a `Names` service in its own OS process, for ``tests/test_names_processes.py``.

    python tests/names_node_main.py --name a --history FILE [--port 0] [--lease 0.8]
                                    [--names n0,n1,n2] [--seed 1]

Prints ``READY <node id> <creation>`` on stdout once listening, then ``STAT <json>`` every
`STAT_EVERY` seconds (a part of `Names.stat`, the node's peers, its `Names.whereis_name` of
each name, what the contenders' attempts found and what they raised). It appends every
trace event of the names service to `--history` as a JSON line ``{"c": clock, "e":
[kind, ...]}`` (pids as strings), one ``write`` per event so that a SIGKILL loses none
that was traced. The cookie comes from ``PGREGISTRY_COOKIE``.

Commands, one JSON list per line on stdin (replies ``OK <command>`` / ``ERR <command>
<message>`` on stdout):

* ``["route", peer_id, address]``: `Node.add_route`;
* ``["join", peer_id]``: `Names.join`;
* ``["contend"]``: start contending for every name of ``--names`` (idempotent): each
  name has a task that takes it (`Names.get_or_start` or `Names.register_name`, short
  timeouts), holds it a while, then releases it (unregister, holder exit), hands it to a
  new local process (`Names.update` with its token) or keeps it.

It serves until its stdin closes (the parent went away), SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import sys
import traceback
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pgregistry.errors import NoProcess, NoQuorum  # noqa: E402
from pgregistry.names import Names, lease_clock  # noqa: E402
from pgregistry.node import Node  # noqa: E402
from pgregistry.process import receive  # noqa: E402
from pgregistry.terms import Pid  # noqa: E402

STAT_EVERY = 0.1
TIMEOUT = 1.0  # of each names call: a fault must not stall a contender for long
EXPECTED_ERRORS = (NoQuorum, NoProcess)  # what a fault may make a call raise


def plain(term: Any) -> Any:
    """A trace event's field as JSON: pids as strings."""
    if type(term) is Pid:
        return str(term)
    if term is None or type(term) in (str, int, float, bool):
        return term
    if isinstance(term, (tuple, list)):
        return [plain(x) for x in term]
    return repr(term)


class History:
    """The trace function: one JSON line per event, written with a single ``os.write``."""

    def __init__(self, path: Path) -> None:
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    def write(self, clock: float, event: tuple[Any, ...] | list[Any]) -> None:
        line = json.dumps({"c": clock, "e": plain(event)}) + "\n"
        os.write(self.fd, line.encode())

    def __call__(self, clock: float, event: tuple[Any, ...]) -> None:
        self.write(clock, event)


async def _holder() -> None:
    """A name's holder: does nothing until it is killed."""
    while True:
        await receive()


def say(line: str) -> None:
    print(line, flush=True)


class Contender:
    """Keeps taking, holding and letting go of the names; counts what the calls raised."""

    def __init__(self, node: Node, names: Names, wanted: list[str], seed: int) -> None:
        self.node = node
        self.names = names
        self.wanted = wanted
        self.rng = random.Random(seed)
        self.errors: Counter[str] = Counter()
        self.tries: Counter[str] = Counter()  # what the attempts to take a name found
        self.unexpected: list[str] = []
        self.tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        if not self.tasks:
            self.tasks = [asyncio.create_task(self._loop(name)) for name in self.wanted]

    async def _loop(self, name: str) -> None:
        while True:
            try:
                await self._round(name)
            except EXPECTED_ERRORS as exc:
                self.errors[type(exc).__name__] += 1
                await asyncio.sleep(self.rng.uniform(0.02, 0.1))
            except Exception as exc:  # reported to the test through STAT, which fails on it
                self.errors[type(exc).__name__] += 1
                self.unexpected.append(f"{name}: {type(exc).__name__}: {exc}"[:300])
                print(f"contender {name}: {exc!r}", file=sys.stderr, flush=True)
                await asyncio.sleep(0.1)

    async def _take(self, name: str) -> Pid | None:
        """The holder of `name` after one attempt to take it (None: not known)."""
        if self.rng.random() < 0.5:
            return await self.names.get_or_start(name, _holder, timeout=TIMEOUT)
        pid = self.node.spawn(_holder)
        try:
            won = await self.names.register_name(name, pid, timeout=TIMEOUT)
        except BaseException:
            self.node.runtime.exit(pid, "kill")
            raise
        if won:
            return pid
        self.node.runtime.exit(pid, "kill")
        return None

    async def _round(self, name: str) -> None:
        pid = await self._take(name)
        self.tries["none" if pid is None else "local" if pid.node == self.node.id else "remote"] += 1
        if pid is None or pid.node != self.node.id:
            await asyncio.sleep(self.rng.uniform(0.05, 0.2))
            return
        await asyncio.sleep(self.rng.uniform(0.2, 1.2))
        roll = self.rng.random()
        if roll < 0.6:
            if roll < 0.3:
                await self.names.unregister_name(name, timeout=TIMEOUT)
            else:
                self.node.runtime.exit(pid, "kill")  # its names are released by the service
            # Let the other nodes try first: the one that let go would win again at once.
            await asyncio.sleep(self.rng.uniform(0.3, 0.6))
        elif roll < 0.75:
            token = self.names.token(name)
            if token is not None and self.names.whereis_name(name) == pid:
                heir = self.node.spawn(_holder)
                if await self.names.update(name, heir, token, timeout=TIMEOUT):
                    self.node.runtime.exit(pid, "kill")
                else:
                    self.node.runtime.exit(heir, "kill")
        # else: keep it; the next round finds it held here and holds it again


async def serve(args: argparse.Namespace) -> None:
    done = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, done.set)
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    history = History(args.history)
    node = Node(args.name, host="127.0.0.1", port=args.port, cookie=os.environ.get("PGREGISTRY_COOKIE"),
                tick_interval=args.tick, down_after=args.down_after)
    node.reconnect_max = args.reconnect_max
    async with node:
        history.write(lease_clock(), ["start", node.id, node.creation, os.getpid()])
        names = await Names.start(node, "names", lease=args.lease, trace=history)
        contender = Contender(node, names, args.names.split(","), args.seed)
        say(f"READY {node.id} {node.creation}")
        stats = asyncio.create_task(_report(node, names, contender))
        commands = asyncio.create_task(_commands(reader, node, names, contender))
        waits = [asyncio.create_task(done.wait()), commands]
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        for task in [stats, *waits, *contender.tasks]:
            task.cancel()


async def _commands(reader: asyncio.StreamReader, node: Node, names: Names, contender: Contender) -> None:
    while line := await reader.readline():
        command = json.loads(line)
        try:
            match command:
                case ["route", str(peer), str(address)]:
                    node.add_route(peer, address)
                case ["join", str(peer)]:
                    await names.join(peer, timeout=10.0)
                case ["contend"]:
                    contender.start()
                case _:
                    raise ValueError(f"unknown command {command!r}")
        except Exception as exc:
            say(f"ERR {command[0]} {type(exc).__name__}: {exc}")
        else:
            say(f"OK {command[0]}")


async def _report(node: Node, names: Names, contender: Contender) -> None:
    while True:
        try:
            stat = names.stat()
            say("STAT " + json.dumps({
                "clock": lease_clock(), "members": stat["members"], "live_members": stat["live_members"],
                "is_member": stat["is_member"], "serving": stat["serving"], "lease_valid": stat["lease_valid"],
                "lgen": stat["lgen"], "held_here": stat["held_here"], "peers": node.peers(),
                "errors": dict(contender.errors), "unexpected": contender.unexpected[:5],
                "where": {name: plain(names.whereis_name(name)) for name in contender.wanted},
                "tries": dict(contender.tries),
            }))
        except Exception:  # the test sees the traceback in this node's log
            traceback.print_exc()
            raise
        await asyncio.sleep(STAT_EVERY)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--name", required=True)
    parser.add_argument("--history", type=Path, required=True)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--lease", type=float, default=0.8)
    parser.add_argument("--names", default="n0,n1,n2")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--tick", type=float, default=0.1)
    parser.add_argument("--down-after", type=float, default=1.0)
    parser.add_argument("--reconnect-max", type=float, default=0.5)
    asyncio.run(serve(parser.parse_args()))


if __name__ == "__main__":
    main()
