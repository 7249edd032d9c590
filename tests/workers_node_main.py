"""One node running a `Workers` service in its own OS process, for ``tests/test_workers_processes.py``.

    python tests/workers_node_main.py --name a [--port 0] [--tick 0.1] [--down-after 0.5]

Runs ``Workers.start(node, "w", functions=(counter, other))`` with the functions of
``tests.workers_fns``, imported under that module path (the repository root is put on
``sys.path``), so every node names them alike. Prints ``READY <node id> <creation>`` on
stdout once listening. The cookie comes from ``PGREGISTRY_COOKIE``.

Commands, one JSON list per line on stdin; each is answered by one line on stdout,
``OK <command> <json result>`` or ``ERR <command> <message>``. Pids travel as their
``repr`` (``<node.serial.creation>``), names as JSON strings:

* ``["route", peer_id, address]``: `Node.add_route` (result null);
* ``["connect", peer_id]``: `Node.connect` (result: the peer's id);
* ``["spawn", names]`` / ``["get_or_start", names]``: `Workers.spawn` / `Workers.get_or_start`
  of `counter` under each name, all at once (result: ``{name: pid}``);
* ``["whereis", names]``: `Workers.whereis` of each (result: ``{name: pid or null}``);
* ``["call", names, request]``: `Workers.call` of each, from a new process of this node
  (result: ``{name: reply}``, or ``{name: {"error": "Type: message"}}``);
* ``["node_for", names]``: `Workers.node_for` of each (result: ``{name: node id}``);
* ``["processes"]``: `Workers.processes` (result: ``{name: pid}``);
* ``["stat"]``: `Workers.stat` with the ring (``"ring"``) and the connected peers (``"peers"``);
* ``["exits"]``: the exit reason of every worker of this node that a spawn, get_or_start,
  whereis or processes of this node returned and that has exited (result: ``{pid: reason}``).

Each request to the service is bounded by `TIMEOUT`. It serves until its stdin closes
(the parent went away), SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pgregistry.events import Down  # noqa: E402
from pgregistry.node import Node  # noqa: E402
from pgregistry.process import monitor, receive  # noqa: E402
from pgregistry.terms import Pid  # noqa: E402
from pgregistry.workers import Workers  # noqa: E402
from tests.workers_fns import counter, other  # noqa: E402

TIMEOUT = 5.0  # of each request to the service


def plain(term: Any) -> Any:
    """A result as JSON: pids as their repr."""
    if type(term) is Pid:
        return repr(term)
    if term is None or type(term) in (str, int, float, bool):
        return term
    if isinstance(term, (tuple, list)):
        return [plain(x) for x in term]
    if isinstance(term, dict):
        return {str(k): plain(v) for k, v in term.items()}
    return repr(term)


def say(line: str) -> None:
    print(line, flush=True)


class Watcher:
    """A process of the node that monitors this node's workers and keeps their exit reasons."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self.watched: set[Pid] = set()
        self.exits: dict[str, Any] = {}
        self.pid = node.spawn(self._run)

    def watch(self, pids: list[Any]) -> None:
        for pid in pids:
            if type(pid) is Pid and pid.node == self.node.id and pid not in self.watched:
                self.watched.add(pid)
                self.node.runtime.send(self.pid, ("watch", pid))

    async def _run(self) -> None:
        while True:
            msg = await receive()
            if type(msg) is tuple and msg[0] == "watch":
                monitor(msg[1])
            elif isinstance(msg, Down):
                self.exits[repr(msg.pid)] = plain(msg.reason)


async def in_process(node: Node, fn: Callable[[], Awaitable[Any]]) -> Any:
    """Await `fn()` inside a new process of `node` (what `Workers.call` needs); its result."""
    result: asyncio.Future[Any] = asyncio.get_running_loop().create_future()

    async def body() -> None:
        try:
            result.set_result(await fn())
        except Exception as exc:  # handed back to the command
            result.set_exception(exc)

    node.spawn(body)
    return await result


async def each(names: list[str], fn: Callable[[str], Awaitable[Any]]) -> dict[str, Any]:
    """``{name: await fn(name)}``, all at once; an exception as ``{"error": ...}``."""
    results = await asyncio.gather(*(fn(name) for name in names), return_exceptions=True)
    return {name: {"error": f"{type(r).__name__}: {r}"} if isinstance(r, BaseException) else r
            for name, r in zip(names, results, strict=True)}


async def serve(args: argparse.Namespace) -> None:
    done = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, done.set)
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    node = Node(args.name, host="127.0.0.1", port=args.port, cookie=os.environ.get("PGREGISTRY_COOKIE"),
                tick_interval=args.tick, down_after=args.down_after)
    node.reconnect_max = args.reconnect_max
    async with node:
        workers = await Workers.start(node, "w", functions=(counter, other))
        watcher = Watcher(node)
        say(f"READY {node.id} {node.creation}")
        commands = asyncio.create_task(_commands(reader, node, workers, watcher))
        waits = [asyncio.create_task(done.wait()), commands]
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        for task in waits:
            task.cancel()


async def _run(command: Any, node: Node, workers: Workers, watcher: Watcher) -> Any:
    match command:
        case ["route", str(peer), str(address)]:
            node.add_route(peer, address)
            return None
        case ["connect", str(peer)]:
            return await node.connect(peer)
        case ["spawn", list(names)]:
            found = await each(names, lambda n: workers.spawn(n, counter, timeout=TIMEOUT))
        case ["get_or_start", list(names)]:
            found = await each(names, lambda n: workers.get_or_start(n, counter, timeout=TIMEOUT))
        case ["whereis", list(names)]:
            found = await each(names, lambda n: workers.whereis(n, timeout=TIMEOUT))
        case ["call", list(names), request]:
            return await each(names, lambda n: in_process(node, lambda: workers.call(n, request, timeout=TIMEOUT)))
        case ["node_for", list(names)]:
            return {name: workers.node_for(name) for name in names}
        case ["processes"]:
            found = workers.processes()
        case ["stat"]:
            return {**workers.stat(), "ring": list(workers.nodes()), "peers": node.peers()}
        case ["exits"]:
            return dict(watcher.exits)
        case _:
            raise ValueError(f"unknown command {command!r}")
    watcher.watch(list(found.values()))
    return found


async def _commands(reader: asyncio.StreamReader, node: Node, workers: Workers, watcher: Watcher) -> None:
    while line := await reader.readline():
        command = json.loads(line)
        try:
            result = await _run(command, node, workers, watcher)
        except Exception as exc:
            say(f"ERR {command[0]} {type(exc).__name__}: {exc}")
        else:
            say(f"OK {command[0]} {json.dumps(plain(result))}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--name", required=True)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--tick", type=float, default=0.1)
    parser.add_argument("--down-after", type=float, default=0.5)
    parser.add_argument("--reconnect-max", type=float, default=0.5)
    asyncio.run(serve(parser.parse_args()))


if __name__ == "__main__":
    main()
