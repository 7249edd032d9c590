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
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from pgregistry._control import CONTROL_NAME, Control, ControlError, control
from pgregistry.names import Names
from pgregistry.node import Node
from pgregistry.process import receive
from pgregistry.process import self as self_pid
from pgregistry.registry import Registry
from pgregistry.server import call
from pgregistry.terms import Pid

from .helpers import eventually

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
    # Names: a server under a name decided by a majority, called from another node.
    assert "b and c joined a's names cluster: members a, b, c" in out
    assert re.search(r"b started a server under names\.via\('singleton'\): b\.\d+, fencing token 1 ", out), out
    assert re.search(r"a called names\.via\('singleton'\): answered by b\.\d+ on b, token 1\n", out), out
    # The holder in the minority steps down; the majority side takes the name, with a larger token.
    assert "split {b} | {a, c}" in out
    assert re.search(r"b stepped down, its holder b\.\d+ was killed with reason 'lost_quorum' [\d.]+ m?s after the "
                     r"split\n", out), out
    assert "whereis_name('singleton') on b now: no valid holder" in out
    assert re.search(r"the majority side took it: c's server c\.\d+ holds the name [\d.]+ m?s after the split "
                     r"\(after b's holder was gone: True\), fencing token 2 > 1: True", out), out
    assert re.search(r"heal: [\d.]+ s later b sees the holder the majority chose, c\.\d+ with token 2", out), out
    # After the holder's node is killed, a survivor takes the name over within about a lease.
    taken = re.search(r"\n  ([ab]) took it over ([\d.]+) (m?s) after the kill \(lease 1\.0 s\): \1\.\d+, "
                      r"fencing token (\d+) > 2: True\n", out)  # 3, or more if an attempt was let go
    assert taken, out
    seconds = float(taken[2]) / (1000 if taken[3] == "ms" else 1)
    assert 0.5 < seconds < 3.0, out  # not before the lease could have ended, not much after
    other = "b" if taken[1] == "a" else "a"
    assert re.search(rf"{other} called names\.via\('singleton'\): answered by {taken[1]}\.\d+ on {taken[1]}, "
                     rf"token {taken[4]}", out), out
    # Workers: spread over the three nodes by key hash, found alike from another node.
    spread = re.search(r"a asked for 30 session workers \(get_or_start\): each started on the node its key hashes "
                       r"to, in [\d.]+ m?s: a (\d+), b (\d+), c (\d+)\n", out)
    assert spread and sum(map(int, spread.groups())) == 30 and min(map(int, spread.groups())) > 0, out
    assert "finds the same pids: True" in out and "c's ring: a, b, c;" in out
    # ... and c's move to the survivors when c is killed; the others keep running.
    moved = re.search(r"c's (\d+) session workers died with it; a asked for all 30 again: (\d+) were still running, "
                      r"c's started anew on their new owners \(.*\); now a (\d+), b (\d+)\n", out)
    assert moved and moved[1] == spread[3] and int(moved[2]) == 30 - int(moved[1]), out
    assert int(moved[3]) + int(moved[4]) == 30 and int(moved[3]) >= int(spread[1]), out
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
    return subprocess.Popen([sys.executable, "-m", "pgregistry", "node", "--test-control", *args], cwd=ROOT, env=env,
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
            await eventually(lambda: t.peers() == [node_id], T, "the node to join t")
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
    (["--name", "n", "--join", "127.0.0.1:1"], 2, "--join needs --names"),
    (["--name", "n", "--lease", "1", "--join", "127.0.0.1:1"], 2, "--lease and --join need --names"),
    (["--name", "n", "--names", "--lease", "0.001"], 2, "--names: lease must be"),
    (["--name", "n", "--names", "--join", "127.0.0.1:1", "--join-timeout", "0.5"], 1,
     "cannot join the names cluster of 127.0.0.1:1: nothing answered there within 0.5 s"),
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


def _free_port() -> int:
    """A port nothing listens on right now (the OS's choice)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def _listening(port: int) -> bool:
    """Whether something accepts TCP connections on 127.0.0.1:`port`."""
    try:
        _reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        return False
    writer.close()
    return True


@pytest.mark.timeout(60)
async def test_nodes_with_names_and_join_form_one_names_cluster() -> None:
    port, b_port = _free_port(), _free_port()
    names = ["--names", "--lease", "1", "--tick-interval", "0.2", "--down-after", "1"]
    # b starts first and listens before it joins: nothing listens at a's address yet, so it keeps trying.
    b = _start_node("--name", "b", "--port", str(b_port), *names, "--join", f"127.0.0.1:{port}")
    with _running(b):
        await eventually(lambda: _listening(b_port), 10.0, "b to listen")
        assert b.poll() is None
        a = _start_node("--name", "a", "--port", str(port), *names)
        with _running(a):
            a_id = (await asyncio.to_thread(_read_line, a)).split()[1]
            assert a_id == f"a@127.0.0.1:{port}"
            b_id = (await asyncio.to_thread(_read_line, b)).split()[1]  # printed once a member
            c = _start_node("--name", "c", *names, "--join", a_id)
            with _running(c):
                c_id = (await asyncio.to_thread(_read_line, c)).split()[1]
                everyone = sorted([a_id, b_id, c_id])
                async with Node("t", cookie=COOKIE) as t:
                    await t.connect(a_id)
                    await eventually(lambda: sorted(t.peers()) == everyone, T, "t to meet every node")

                    async def one_cluster() -> bool:
                        stats = [await control(node, ("names_stat", "names")) for node in everyone]
                        return all(sorted(stat["members"]) == everyone and sorted(stat["live_members"]) == everyone
                                   and stat["lease_valid"] for stat in stats) \
                            and len({stat["cluster_id"] for stat in stats}) == 1

                    await eventually(one_cluster, 10.0, "one names cluster of a, b and c")
                    info = await control(c_id, ("info",))
                    assert info["names"] == ["names"]
                    # A name decided by the cluster: held on b, seen and called from a and c.
                    pid, token, won = await control(b_id, ("names_serve", "names", "job"), 15.0)
                    assert won and pid.node == b_id and token == 1
                    assert await control(c_id, ("names_lookup", "names", "job"), 15.0) == (pid, token)
                    assert await control(a_id, ("names_call", "names", "job", "hi"), 15.0) == (b_id, pid, 1, "hi")
                    assert await control(c_id, ("names_serve", "names", "job"), 15.0) == (pid, token, False)
                for proc in (a, b, c):
                    proc.terminate()
                for proc in (a, b, c):
                    _out, err = await asyncio.to_thread(proc.communicate, timeout=10)
                    assert proc.returncode == 0, err


@pytest.mark.timeout(60)
async def test_a_refused_join_is_one_readable_line() -> None:
    a = _start_node("--name", "a", "--names", "--lease", "1")
    with _running(a):
        a_id = (await asyncio.to_thread(_read_line, a)).split()[1]
        d = _start_node("--name", "d", "--names", "--lease", "2", "--join", a_id)
        with _running(d):
            out, err = await asyncio.to_thread(d.communicate, timeout=20)
            assert d.returncode == 1 and out == "", err
            assert err.startswith(f"pgregistry node: error: cannot join the names cluster of {a_id}: "
                                  "JoinRefused: "), err
            assert "lease=1.0, this node lease=2.0" in err and "Traceback" not in err
            assert len(err.strip().splitlines()) == 1, err
        plain = _start_node("--name", "p")  # a node without a names service
        with _running(plain):
            p_id = (await asyncio.to_thread(_read_line, plain)).split()[1]
            e = _start_node("--name", "e", "--names", "--join", p_id, "--join-timeout", "1")
            with _running(e):
                _out, err = await asyncio.to_thread(e.communicate, timeout=20)
                assert e.returncode == 1 and "Traceback" not in err, err
                assert f"cannot join the names cluster of {p_id}: TimeoutError: {p_id} runs no names service" in err


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
        await eventually(lambda: node_n.runtime.process(subscriber) is None, T, "the subscriber to end")


async def test_control_names_requests_serve_call_and_look_up_a_name() -> None:
    async with Node("n", cookie=COOKIE) as n:
        names = await Names.start(n, "names", lease=1.0)
        await Control.start(n, n, {}, {"names": names}, name=CONTROL_NAME)
        async with Node("t", cookie=COOKIE) as t:
            await t.connect(n.id)
            stat = await control(n.id, ("names_stat", "names"))
            assert stat["members"] == [n.id] and stat["lease"] == 1.0
            assert await control(n.id, ("names_whereis", "names", "job")) is None
            assert await control(n.id, ("names_lookup", "names", "job")) is None
            pid, token, won = await control(n.id, ("names_serve", "names", "job"))
            assert won and pid.node == n.id and names.whereis_name("job") == pid and names.token("job") == token
            assert await control(n.id, ("names_serve", "names", "job")) == (pid, token, False)
            assert await control(n.id, ("names_whereis", "names", "job")) == (pid, token)
            assert await control(n.id, ("names_lookup", "names", "job")) == (pid, token)
            assert await control(n.id, ("names_call", "names", "job", [1, 2])) == (n.id, pid, token, [1, 2])
            assert (await control(n.id, ("info",)))["names"] == ["names"]
            for request, reason in [
                (("names_stat", "nope"), "no names service 'nope'"),
                (("names_serve", "names", ["not", "a", "key"]), "TypeError"),
                (("names_join", "names", 5), "TypeError: address must be a str"),
                (("names_call", "names", "nobody", 1), "NoProcess"),
            ]:
                with pytest.raises(ControlError) as caught:
                    await control(n.id, request)
                assert reason in caught.value.reason
            assert await control(n.id, ("names_whereis", "names", "job")) == (pid, token)  # still serving


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
    (("names_stat", "names"), "no names service 'names'"),
    (("names_serve", "names"), "'names_serve' takes ('names_serve', service, name), got 1"),
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
