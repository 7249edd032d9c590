"""The ``pgregistry`` command: the cluster demo, ``pgregistry node``, and its control server.

The demo and the node command run as real subprocesses (bounded in time, killed in a
``finally``). The control server's protocol is tested in-process, with two nodes in this
event loop talking over TCP.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import selectors
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from pgregistry._control import CONTROL_NAME, Control, ControlError, control
from pgregistry.node import Node
from pgregistry.process import receive
from pgregistry.process import self as self_pid
from pgregistry.registry import Registry
from pgregistry.server import call
from pgregistry.terms import Pid

ROOT = Path(__file__).resolve().parent.parent
COOKIE = "cli-test-cookie"
T = 5.0


def _node_alive(pid: int) -> bool:
    """Whether `pid` is still a running ``pgregistry node`` (not a reused pid, not a zombie)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except OSError:
        return False
    return b"pgregistry" in cmdline and b"node" in cmdline and state != "Z"


@pytest.mark.timeout(120)
def test_demo_runs_a_three_process_cluster_and_leaves_nothing_running() -> None:
    proc = subprocess.Popen([sys.executable, "-m", "pgregistry", "demo"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out = err = ""
    try:
        out, err = proc.communicate(timeout=90)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        raise AssertionError(f"the demo did not finish within 90 s\n{out}\n{err}") from None
    finally:
        children = [int(pid) for pid in re.findall(r"OS pid (\d+)", out)]
        for pid in children:  # a failed run must not leak processes into the test session
            if _node_alive(pid):
                os.kill(pid, signal.SIGKILL)
    assert proc.returncode == 0, f"{out}\n{err}"
    assert len(set(children)) == 3, out
    for name in "abc":
        assert re.search(rf"node {name}: {name}@127\.0\.0\.1:\d+  OS pid \d+", out), out
    assert "full mesh" in out and "the 3 links between a, b and c all run through the proxies" in out
    # A registration on one node, seen on every node, with timings.
    assert re.search(r"a registered 2 workers under 'web'; .*visible on: a [\d.]+ m?s, b [\d.]+ m?s, "
                     r"c [\d.]+ m?s, narrator [\d.]+ m?s", out), out
    assert "count() on a, b, c, narrator: 5, 5, 5, 5" in out
    # A select over the cluster.
    assert "-> [('a', 3), ('a', 3), ('b', 8)]" in out
    assert "equals the narrator's view: True" in out
    # The narrator's subscription gets remote events of every kind.
    assert re.search(r"event  Join   'web'   a\.\d+ \{'node': 'a', 'load': 3\}", out), out
    assert re.search(r"event  Update 'web'   c\.\d+: \{'node': 'c', 'load': 1\} -> \{'node': 'c', 'load': 6\}", out)
    assert re.search(r"event  Leave  'db'    b\.\d+ \{'node': 'b', 'role': 'primary'\}", out), out
    # The partition: both sides drop each other, then converge.
    assert "split {a} | {b, c}" in out
    assert "count() on a, b, c, narrator: 3, 3, 3, 6" in out
    assert "converged: select_all on a, b and c equals the narrator's 6 entries" in out
    # SIGKILL: c's entry leaves everywhere.
    assert re.search(r"event  Leave  'web'   c\.\d+ \{'node': 'c', 'load': 6\}", out), out
    assert "NodeDown('c'" in out and "count() on a, b, narrator: 5, 5, 5" in out
    assert "node a stopped by SIGTERM: exit status 0" in out and "node b stopped by SIGTERM: exit status 0" in out
    assert "node c was killed: exit status -9" in out
    assert "every node process the demo started has exited: True" in out
    assert re.search(r"done in [\d.]+ s\.\s*$", out), out
    assert not [pid for pid in children if _node_alive(pid)]


# --------------------------------------------------------------------------- pgregistry node

def _start_node(*args: str, cookie: str | None = COOKIE) -> subprocess.Popen[str]:
    env = {key: value for key, value in os.environ.items() if key != "PGREGISTRY_COOKIE"}
    if cookie is not None:
        env["PGREGISTRY_COOKIE"] = cookie
    return subprocess.Popen([sys.executable, "-m", "pgregistry", "node", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _read_line(proc: subprocess.Popen[str], timeout: float = 20.0) -> str:
    """The child's first stdout line, waiting at most `timeout` seconds."""
    assert proc.stdout is not None
    with selectors.DefaultSelector() as selector:
        selector.register(proc.stdout, selectors.EVENT_READ)
        if not selector.select(timeout):
            raise AssertionError(f"no line on stdout within {timeout} s")
    return proc.stdout.readline()


@contextlib.contextmanager
def _running(proc: subprocess.Popen[str]) -> Iterator[subprocess.Popen[str]]:
    """`proc`, killed and reaped on the way out."""
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
        for pipe in (proc.stdin, proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_node_prints_one_node_line_then_stops_cleanly_on_a_signal(sig: signal.Signals) -> None:
    with _running(_start_node("--name", "solo", "--scope", "jobs", "--tick-interval", "0.2")) as proc:
        line = _read_line(proc)
        assert re.fullmatch(r"NODE solo@127\.0\.0\.1:\d+\n", line), line
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=10)
        assert proc.returncode == 0, err
        assert out == "", "the NODE line is the only output on stdout"


async def test_node_joins_a_cluster_and_its_control_server_answers() -> None:
    async with Node("t", cookie=COOKIE) as t:
        peer = _start_node("--name", "n1", "--scope", "jobs", "--scope", "jobs", "events", "--connect", t.id)
        with _running(peer):
            line = await asyncio.to_thread(_read_line, peer)
            node_id = line.split()[1]
            await _until(lambda: t.peers() == [node_id], "the node to join t")
            info = await control(node_id, ("info",))
            assert info["id"] == node_id and info["scopes"] == ["events", "jobs"] and info["peers"] == [t.id]
            assert info["os_pid"] == peer.pid
            peer.terminate()
            await asyncio.to_thread(peer.wait, 10)
            assert peer.returncode == 0


@pytest.mark.parametrize(("args", "status", "message"), [
    (["--name", "bad name"], 2, "name must be"),
    (["--name", "n", "--tick-interval", "1", "--down-after", "1"], 2, "at least twice"),
    (["--name", "n", "--port", "70000"], 2, "port must be in"),
    (["--name", "n", "--connect", "not-an-address"], 1, "cannot connect to not-an-address"),
    (["--port", "0"], 2, "--name"),
])
def test_node_rejects_bad_options(args: list[str], status: int, message: str) -> None:
    with _running(_start_node(*args)) as proc:
        out, err = proc.communicate(timeout=20)
        assert proc.returncode == status, err
        assert message in err and out == ""


def test_node_warns_when_it_has_no_cookie() -> None:
    with _running(_start_node("--name", "lonely", cookie=None)) as proc:
        assert _read_line(proc).startswith("NODE lonely@")
        proc.terminate()
        _out, err = proc.communicate(timeout=10)
        assert proc.returncode == 0 and "no other node can connect" in err


def test_node_with_exit_with_stdin_stops_when_its_parent_goes_away() -> None:
    proc = subprocess.Popen([sys.executable, "-m", "pgregistry", "node", "--name", "child", "--exit-with-stdin"],
                            cwd=ROOT, env={**os.environ, "PGREGISTRY_COOKIE": COOKIE}, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    with _running(proc):
        assert _read_line(proc).startswith("NODE child@")
        assert proc.stdin is not None
        proc.stdin.close()
        proc.wait(10)
        assert proc.returncode == 0


# --------------------------------------------------------------------------- the control server

async def _idle() -> None:
    while True:
        await receive()


@contextlib.asynccontextmanager
async def _controlled() -> AsyncIterator[tuple[Node, Registry, str]]:
    """A node "n" with registry "jobs" and a control server; this task is a process of "t"."""
    async with Node("n", cookie=COOKIE) as n:
        jobs = await Registry.start(n, "jobs")
        await Control.start(n, n, {"jobs": jobs}, name=CONTROL_NAME)
        async with Node("t", cookie=COOKIE) as t:
            await t.connect(n.id)
            yield t, jobs, n.id


async def _until(predicate: Any, what: str) -> None:
    deadline = time.monotonic() + T
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.005)


async def test_control_requests_drive_the_registry_of_a_node() -> None:
    async with _controlled() as (t, jobs, n):
        pids = await control(n, ("register", "jobs", "web", {"load": 1}, 3))
        assert len(pids) == 3 and all(type(pid) is Pid and pid.node == n for pid in pids)
        assert jobs.lookup("web") == [(pid, {"load": 1}) for pid in pids]  # registered before the reply
        other = await control(n, ("register", "jobs", ("shard", 1), [1, 2], 1))
        assert await control(n, ("count", "jobs")) == 4
        assert await control(n, ("lookup", "jobs", "web")) == [(pid, {"load": 1}) for pid in pids]
        rows = await control(n, ("select_all", "jobs"))
        assert sorted(rows, key=repr) == sorted([("web", pid, {"load": 1}) for pid in pids]
                                                + [(("shard", 1), other[0], [1, 2])], key=repr)
        assert await control(n, ("update", "jobs", "web", {"load": 2})) == 3
        assert jobs.lookup("web") == [(pid, {"load": 2}) for pid in pids]
        assert await control(n, ("update", "jobs", "nobody", 0)) == 0
        assert await control(n, ("unregister", "jobs", "web")) == 3
        assert jobs.lookup("web") == [] and jobs.count() == 1
        assert await control(n, ("stop_workers", "jobs", "web")) == 3  # alive, without entries
        assert await control(n, ("stop_workers", "jobs", ("shard", 1))) == 1
        assert jobs.count() == 0  # entries leave with the killed workers, before the reply
        assert await control(n, ("stop_workers", "jobs", "web")) == 0
        assert await control(n, ("peers",)) == [t.id]
        assert await control(n, ("connect", t.id)) == t.id
        assert await control(n, ("add_route", "x@127.0.0.1:1", "127.0.0.1:2")) is None
        info = await control(n, ("info",))
        assert info["id"] == n and info["scopes"] == ["jobs"] and info["os_pid"] == os.getpid()


async def test_control_subscribe_forwards_events_with_timestamps() -> None:
    async with _controlled() as (t, jobs, n):
        before = time.monotonic_ns()
        subscriber = await control(n, ("subscribe", "jobs", self_pid()))
        assert subscriber.node == n
        [pid] = await control(n, ("register", "jobs", "web", "v1", 1))  # subscribed before the reply
        await control(n, ("update", "jobs", "web", "v2"))
        await control(n, ("unregister", "jobs", "web"))
        got = [await receive(T) for _ in range(3)]
        assert [msg[:5] for msg in got] == [
            ("event", n, "Join", "web", [(pid, "v1")]),
            ("event", n, "Update", "web", [(pid, "v1", "v2")]),
            ("event", n, "Leave", "web", [(pid, "v2")]),
        ]
        stamps = [msg[5] for msg in got]
        assert before <= stamps[0] <= stamps[1] <= stamps[2] <= time.monotonic_ns()


async def test_control_subscriber_ends_when_the_process_it_reports_to_exits() -> None:
    async with _controlled() as (t, jobs, n):
        reporter = t.spawn(_idle)
        subscriber = await control(n, ("subscribe", "jobs", reporter))
        node_n = jobs.node
        assert node_n.runtime.process(subscriber) is not None
        t.runtime.exit(reporter, "kill")
        await _until(lambda: node_n.runtime.process(subscriber) is None, "the subscriber to end")


@pytest.mark.parametrize(("request_", "reason"), [
    ("register", "a control request is a tuple"),
    ((), "a control request is a tuple"),
    ((1, 2), "a control request is a tuple"),
    (("frobnicate",), "unknown command 'frobnicate'"),
    (("register", "jobs", "k", 1), "'register' takes ('register', scope, key, value, n), got 3"),
    (("register", "nope", "k", 1, 1), "no registry 'nope'"),
    (("register", "jobs", "k", 1, 0), "n must be an int in 1..10000"),
    (("register", "jobs", "k", 1, True), "n must be an int"),
    (("count", 5), "no registry 5"),
    (("subscribe", "jobs", "not a pid"), "TypeError: report_to must be a Pid"),
    (("add_route", "no-at-sign", "127.0.0.1:1"), "TypeError"),
    (("connect", "127.0.0.1:notaport"), "ValueError"),
    (("peers", "extra"), "'peers' takes ('peers'), got 1"),
])
async def test_control_refuses_bad_requests_and_keeps_serving(request_: Any, reason: str) -> None:
    async with _controlled() as (t, jobs, n):
        with pytest.raises(ControlError) as caught:
            await control(n, request_)
        assert reason in caught.value.reason and caught.value.node == n
        assert reason in str(caught.value)
        reply = await call((CONTROL_NAME, n), request_)  # the raw reply is an error tuple
        assert reply[0] == "error" and reason in reply[1]
        assert jobs.count() == 0
        assert await control(n, ("peers",)) == [t.id]  # the server lives on
