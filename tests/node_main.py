"""One pgregistry node in its own OS process, for the multi-process tests and benchmarks.

    python tests/node_main.py --name k1 [--port 0] [--cookie C] [--connect ADDR ...]
                              [--tick 0.1] [--down-after 1.0] [--uvloop]

Prints ``READY <node id> <creation>`` on stdout once listening (and connected to every
``--connect`` address), then serves until its stdin closes (the parent went away),
SIGTERM or SIGINT. The cookie defaults to ``PGREGISTRY_COOKIE``.

It runs two named processes:

* ``"worker"``: does nothing but stay alive (something to monitor);
* ``"control"``: a `Server` answering calls, from any node:
  ``"info"`` -> ``{"id", "creation", "peers", "worker"}``; ``("echo", x)`` -> ``x``;
  ``("watch", pid, report_to, label)`` -> spawns a process that monitors ``pid`` and
  the nodes, sends ``(label, "watching")`` to ``report_to``, then each ``Down`` /
  ``NodeUp`` / ``NodeDown`` it gets as ``(label, type_name, fields)``;
  ``("stop_watch", label)`` ends that watcher.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pgregistry.node import Node  # noqa: E402
from pgregistry.process import exit as exit_process  # noqa: E402
from pgregistry.process import monitor, receive, send  # noqa: E402
from pgregistry.server import Server  # noqa: E402
from pgregistry.terms import Pid  # noqa: E402


async def _worker() -> None:
    while True:
        await receive()


async def _watcher(node: Node, pid: Pid, report_to: Pid, label: str) -> None:
    node.monitor_nodes()
    monitor(pid)
    send(report_to, (label, "watching"))
    while True:
        event = await receive()
        # A named tuple nested in a tuple is not a term: send its type name and fields.
        send(report_to, (label, type(event).__name__, tuple(event)))


class Control(Server):
    """Answers the test's calls; see the module docstring."""

    node: Node
    watchers: dict[str, Pid]

    async def init(self, node: Node) -> None:
        self.node = node
        self.watchers = {}

    async def handle_call(self, request: Any, caller: Pid) -> Any:
        node = self.node
        match request:
            case "info":
                return {"id": node.id, "creation": node.creation, "peers": node.peers(),
                        "worker": node.whereis("worker")}
            case ("echo", value):
                return value
            case ("watch", Pid() as pid, Pid() as report_to, str(label)):
                self.watchers[label] = node.spawn(_watcher, node, pid, report_to, label)
                return True
            case ("stop_watch", str(label)):
                watcher = self.watchers.pop(label, None)
                if watcher is not None:
                    exit_process(watcher, "kill")
                return watcher is not None
        raise ValueError(f"unknown request {request!r}")


class _StdinClosed(asyncio.Protocol):
    def __init__(self, done: asyncio.Event) -> None:
        self.done = done

    def connection_lost(self, exc: Exception | None) -> None:
        self.done.set()


async def serve(args: argparse.Namespace) -> None:
    done = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, done.set)
    await loop.connect_read_pipe(lambda: _StdinClosed(done), sys.stdin)
    node = Node(args.name, host=args.host, port=args.port, cookie=args.cookie,
                tick_interval=args.tick, down_after=args.down_after)
    async with node:
        node.register_name("worker", node.spawn(_worker))
        await Control.start(node, node, name="control")
        for address in args.connect:
            await node.connect(address)
        print(f"READY {node.id} {node.creation}", flush=True)
        await done.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--name", required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--cookie", default=os.environ.get("PGREGISTRY_COOKIE"))
    parser.add_argument("--connect", action="append", default=[])
    parser.add_argument("--tick", type=float, default=0.1)
    parser.add_argument("--down-after", type=float, default=1.0)
    parser.add_argument("--uvloop", action="store_true")
    args = parser.parse_args()
    if args.uvloop:
        import uvloop

        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(serve(args))
    else:
        asyncio.run(serve(args))


if __name__ == "__main__":
    main()
