"""Nodes in separate OS processes (``tests/node_main.py``) with the test's node in this one.

The children are started with `subprocess.Popen`, report ``READY <id> <creation>`` on
stdout, and are always SIGKILLed in a ``finally``. Their stdin is a pipe from this
process, so they also exit if the test process dies. Every wait is bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from pgregistry.events import Down, NodeDown, NodeUp
from pgregistry.node import Node
from pgregistry.process import monitor, receive
from pgregistry.process import self as self_pid
from pgregistry.server import call

pytestmark = pytest.mark.multiprocess

ROOT = Path(__file__).resolve().parent.parent
NODE_MAIN = ROOT / "tests" / "node_main.py"
COOKIE = "multiprocess-test-cookie"
TICK = 0.1
DOWN = 1.0
START_TIMEOUT = 20.0  # a cold interpreter start on a loaded machine
T = 8.0


class Child:
    """A node running in a child process."""

    def __init__(self, name: str, proc: subprocess.Popen[bytes], log: Path) -> None:
        self.name = name
        self.proc = proc
        self.log = log
        self.id = ""
        self.creation = 0

    @property
    def port(self) -> int:
        return int(self.id.rpartition(":")[2])

    def kill(self) -> None:
        """SIGKILL (no goodbye to its peers: they see the TCP connection die)."""
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)

    def logs(self) -> str:
        return self.log.read_text(errors="replace")[-4000:] if self.log.exists() else ""


class Children:
    """Starts children and kills every one of them on exit."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.all: list[Child] = []

    async def start(self, name: str, *, port: int = 0, connect: tuple[str, ...] = ()) -> Child:
        log = self.tmp / f"{name}-{len(self.all)}.log"
        args = [sys.executable, str(NODE_MAIN), "--name", name, "--port", str(port), "--cookie", COOKIE,
                "--tick", str(TICK), "--down-after", str(DOWN)]
        for address in connect:
            args += ["--connect", address]
        with log.open("wb") as stderr:
            proc = subprocess.Popen(args, cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr)
        child = Child(name, proc, log)
        self.all.append(child)
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        assert proc.stdout is not None
        transport, _ = await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), proc.stdout)
        try:
            line = await asyncio.wait_for(reader.readline(), START_TIMEOUT)
        finally:
            transport.close()
        words = line.decode().split()
        if len(words) != 3 or words[0] != "READY":
            raise AssertionError(f"child {name} did not start: {line!r}\n{child.logs()}")
        child.id, child.creation = words[1], int(words[2])
        return child

    def kill_all(self) -> None:
        for child in self.all:
            child.kill()
        for child in self.all:
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.proc.wait(timeout=5)
            for pipe in (child.proc.stdin, child.proc.stdout):
                if pipe is not None:
                    pipe.close()


@contextlib.asynccontextmanager
async def children(tmp: Path) -> AsyncIterator[Children]:
    started = Children(tmp)
    try:
        yield started
    except BaseException:
        for child in started.all:
            print(f"--- log of child {child.name} (pid {child.proc.pid}) ---\n{child.logs()}")
        raise
    finally:
        started.kill_all()


async def eventually(predicate: Callable[[], bool], what: str, timeout: float = T) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.01)


async def collect(expected: list[Callable[[Any], bool]], timeout: float = T) -> list[Any]:
    """Receive until every predicate matched one message (in any order); return the matches."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    found: list[Any] = [None] * len(expected)
    missing = set(range(len(expected)))
    while missing:
        remaining = deadline - loop.time()
        try:
            msg = await receive(max(0.0, remaining))
        except TimeoutError:
            raise AssertionError(f"still missing {sorted(missing)} after {timeout} s") from None
        for index in sorted(missing):
            if expected[index](msg):
                found[index] = msg
                missing.discard(index)
                break
    return found


def test_node_main_is_not_collected_as_a_test() -> None:
    assert NODE_MAIN.exists() and not NODE_MAIN.name.startswith("test_")


async def test_nodes_in_separate_processes_form_a_full_mesh(tmp_path: Path) -> None:
    async with Node("t", cookie=COOKIE, tick_interval=TICK, down_after=DOWN) as t, children(tmp_path) as kids:
        k1 = await kids.start("k1")
        k2 = await kids.start("k2", connect=(k1.id,))
        k3 = await kids.start("k3", connect=(k2.id,))  # learns k1 from k2
        assert await t.connect(k3.id) == k3.id  # t learns k1 and k2 from k3
        ids = {t.id, k1.id, k2.id, k3.id}
        await eventually(lambda: set(t.peers()) == ids - {t.id}, "t to join every child")
        for child in (k1, k2, k3):
            loop = asyncio.get_running_loop()
            deadline = loop.time() + T
            while True:
                info = await call(("control", child.id), "info")
                if set(info["peers"]) == ids - {child.id}:
                    break
                assert loop.time() < deadline, f"{child.name} peers: {info['peers']}"
                await asyncio.sleep(0.02)
            assert info["id"] == child.id and info["creation"] == child.creation
            assert await call(("control", child.id), ("echo", (1, [2], {"three": b"3"}))) == (1, [2], {"three": b"3"})


async def test_sigkill_is_seen_by_the_survivors_and_a_restart_rejoins(tmp_path: Path) -> None:
    async with Node("t", cookie=COOKIE, tick_interval=TICK, down_after=DOWN) as t, children(tmp_path) as kids:
        k1 = await kids.start("k1")
        k2 = await kids.start("k2", connect=(k1.id,))
        t.monitor_nodes()
        assert await t.connect(k1.id) == k1.id
        await eventually(lambda: set(t.peers()) == {k1.id, k2.id}, "t to join k1 and k2")
        await collect([lambda m: m == NodeUp(k1.id), lambda m: m == NodeUp(k2.id)])

        worker = (await call(("control", k1.id), "info"))["worker"]
        assert worker.node == k1.id and worker.creation == k1.creation
        ref = monitor(worker)
        # k2, a survivor in its own process, watches k1 too and reports to us.
        assert await call(("control", k2.id), ("watch", worker, self_pid(), "k2")) is True
        assert await receive(T) == ("k2", "watching")

        loop = asyncio.get_running_loop()
        killed_at = loop.time()
        k1.kill()
        down, node_down, k2_down, k2_node_down = await collect([
            lambda m: type(m) is Down and m.ref == ref,
            lambda m: type(m) is NodeDown and m.node == k1.id,
            lambda m: type(m) is tuple and m[:2] == ("k2", "Down"),
            lambda m: type(m) is tuple and m[:2] == ("k2", "NodeDown") and m[2][0] == k1.id,
        ])
        detected = loop.time() - killed_at
        assert down == Down(ref, worker, "noconnection")
        assert Down(*k2_down[2]).pid == worker and Down(*k2_down[2]).reason == "noconnection"
        assert NodeDown(*k2_node_down[2]).node == k1.id
        assert detected < DOWN + 2.0, detected  # the kernel closes the sockets: usually at once
        assert t.peers() == [k2.id]

        # Restart under the same name and port: a new creation; the survivors redial it.
        k1b = await kids.start("k1", port=k1.port)
        assert k1b.id == k1.id and k1b.creation != k1.creation
        await collect([
            lambda m: m == NodeUp(k1.id),
            lambda m: m == ("k2", "NodeUp", (k1.id,)),
        ], timeout=T + 2 * t.reconnect_max)
        assert t.connection_stats(k1.id)["creation"] == k1b.creation  # type: ignore[index]
        info = await call(("control", k1.id), "info")
        assert info["creation"] == k1b.creation
        await eventually(lambda: set(t.peers()) == {k1.id, k2.id}, "the mesh to heal")
        # A pid of the killed incarnation never matches a process of the new one.
        assert info["worker"].serial == worker.serial and info["worker"] != worker
        ref = monitor(worker)
        assert await receive(T) == Down(ref, worker, "noproc")
        ref = monitor(info["worker"])
        k1b.kill()
        down, _ = await collect([
            lambda m: type(m) is Down and m.ref == ref,
            lambda m: type(m) is NodeDown and m.node == k1.id,
        ])
        assert down.reason == "noconnection"
