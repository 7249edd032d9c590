"""Operating a running node from outside: ``pgregistry status | lookup | select | whereis |
drain`` against ``pgregistry node`` OS processes, the read-only inspection interface, and
the graceful stop (one ``bye`` per registry instead of a leave per entry; new connections
refused with ``"leaving"``)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from typing import Any

import pytest

import pgregistry as pgr
from pgregistry._control import control
from pgregistry.errors import NoProcess
from pgregistry.events import Leave, NodeUp
from pgregistry.inspection import InspectionClient, InspectionError
from pgregistry.jsonterms import from_json
from pgregistry.node import Node
from pgregistry.registry import Registry
from pgregistry.server import call

from .helpers import drain, eventually
from .test_cli import COOKIE, ROOT, _free_port, _read_line, _running

FAST = {"tick_interval": 0.2, "down_after": 1.0}


def tool(*args: str, cookie: str | None = COOKIE) -> subprocess.CompletedProcess[str]:
    """Run ``pgregistry *args`` as an operator would, the cookie in the environment."""
    env = {"PATH": "/usr/bin:/bin"}
    if cookie is not None:
        env["PGREGISTRY_COOKIE"] = cookie
    return subprocess.run([sys.executable, "-m", "pgregistry", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=30)


async def run_tool(*args: str, cookie: str | None = COOKIE) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(tool, *args, cookie=cookie)


def parsed(done: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["schema"] == 1
    return from_json(out)  # type: ignore[no-any-return]


@contextlib.asynccontextmanager
async def watched_node(*options: str) -> AsyncIterator[tuple[Node, Registry, str, subprocess.Popen[str]]]:
    """This process's node t (registry "jobs", monitoring nodes) and a ``pgregistry node``
    n1 connected to it, run without the test control server unless `options` ask."""
    async with Node("t", cookie=COOKIE, **FAST) as t:
        reg = await Registry.start(t, "jobs")
        t.monitor_nodes()
        proc = subprocess.Popen([sys.executable, "-m", "pgregistry", "node", "--name", "n1", "--scope", "jobs",
                                 "--tick-interval", "0.2", "--down-after", "1.0", "--connect", t.id, *options],
                                cwd=ROOT, env={"PATH": "/usr/bin:/bin", "PGREGISTRY_COOKIE": COOKIE},
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        with _running(proc):
            node_id = (await asyncio.to_thread(_read_line, proc)).split()[1]
            await eventually(lambda: t.peers() == [node_id], 10, "n1 connected")
            yield t, reg, node_id, proc


async def test_status_lookup_select_and_whereis_show_a_running_node_and_the_tool_is_no_peer() -> None:
    async with watched_node("--names", "--workers") as (t, reg, node_id, proc):
        address = node_id.rpartition("@")[2]
        value = {"b": b"\x00\xff", "inf": math.inf, "t": (1, "x"), 7: "int key"}
        me = reg.register(("user", 42), value)
        for i in range(25):
            reg.register("web", i)
        await reg.sync()

        status = parsed(await run_tool("status", address, "--json"))
        assert status["info"]["id"] == node_id and status["info"]["peers"] == [t.id]
        assert status["info"]["scopes"] == ["jobs"] and status["info"]["os_pid"] == proc.pid
        assert status["stat"]["scopes"]["jobs"]["rows"] == 26
        assert status["version"]["pgregistry"] == pgr.__version__ and status["version"]["inspection"] == 1
        assert status["stat"]["workers"]["workers"]["nodes"] == 1
        human = await run_tool("status", node_id)
        assert human.returncode == 0 and "registry jobs: 26 entries, 1 peers" in human.stdout, human.stdout

        found = parsed(await run_tool("lookup", address, "jobs", "('user', 42)", "--json"))
        assert found["entries"] == [[me, value]]  # bytes, inf, tuples and int keys round-trip
        raw = (await run_tool("lookup", address, "jobs", "('user', 42)", "--json")).stdout
        assert "NaN" not in raw and "Infinity" not in raw
        web = parsed(await run_tool("lookup", address, "jobs", "web", "--json"))
        assert sorted(v for _pid, v in web["entries"]) == list(range(25))

        first = parsed(await run_tool("select", address, "jobs", "--limit", "10", "--json"))
        assert len(first["rows"]) == 10 and first["next"] == 10 and first["total"] == 26
        rest = parsed(await run_tool("select", address, "jobs", "--cursor", "10", "--limit", "100", "--json"))
        assert rest["next"] is None and len(rest["rows"]) == 16
        rows = first["rows"] + rest["rows"]
        assert sorted(map(repr, rows)) == sorted(repr(list(r)) for r in reg.select([((pgr.spec.V1, pgr.spec.V2,
                                                                                      pgr.spec.V3), [],
                                                                                     [(pgr.spec.V1, pgr.spec.V2,
                                                                                       pgr.spec.V3)])]))

        # Not found: 1; bad usage: 2; unreachable or a wrong cookie: 3.
        assert (await run_tool("lookup", address, "jobs", "nothing")).returncode == 1
        assert (await run_tool("lookup", address, "nojobs", "web")).returncode == 1
        assert (await run_tool("whereis", address, "leader")).returncode == 1
        bad = await run_tool("lookup", address, "jobs", "(1,")
        assert bad.returncode == 2 and "Python literal" in bad.stderr
        assert (await run_tool("status", address, cookie=None)).returncode == 2
        wrong = await run_tool("status", address, cookie="not-the-cookie")
        assert wrong.returncode == 3 and "AuthenticationError" in wrong.stderr
        assert (await run_tool("status", "127.0.0.1:1")).returncode == 3
        version = await run_tool("--version")
        assert version.stdout.strip() == f"pgregistry {pgr.__version__}"

        # The tool was never a peer: t saw n1 come up and nothing else; n1 lists t alone.
        ups = [m.node for m in await drain() if type(m) is NodeUp]
        assert ups == [node_id]
        assert parsed(await run_tool("status", address, "--json"))["info"]["peers"] == [t.id]


async def test_the_inspection_interface_is_read_only_and_no_control_server_runs_by_default() -> None:
    async with watched_node() as (t, _reg, node_id, _proc):
        async with await InspectionClient.connect(node_id, COOKIE) as client:
            assert (await client.request("info"))["id"] == node_id
            for command, args in (("register", ["jobs", "k", 1, 1]), ("add_route", [t.id, "x:1"]),
                                  ("connect", ["127.0.0.1:1"]), ("stop_workers", ["jobs", "k"])):
                with pytest.raises(InspectionError, match="unknown command"):
                    await client.request(command, *args)
            with pytest.raises(InspectionError, match="limit"):
                await client.request("select", "jobs", 0, 10**9)
        with pytest.raises(NoProcess):
            await call(("pgregistry_control", node_id), ("info",), 2.0)
        assert t.peers() == [node_id]


async def test_sigterm_purges_a_node_from_its_peers_with_one_bye_not_a_leave_per_entry() -> None:
    async with watched_node("--test-control") as (t, reg, node_id, proc):
        ref, _snapshot = reg.monitor_scope()
        pids = await control(node_id, ("register", "jobs", "k", {"v": 1}, 40))
        await eventually(lambda: len(reg.lookup("k")) == 40, 5, "n1's entries at t")
        await drain()
        proc.terminate()
        assert await asyncio.to_thread(proc.wait, 15) == 0
        await eventually(lambda: reg.lookup("k") == [], 5, "n1's entries gone at t")
        leaves = [m for m in await drain() if type(m) is Leave and m.ref == ref]
        assert sorted(p for m in leaves for p, _v in m.entries) == sorted(pids)
        assert {m.reason for m in leaves} == {"scope_stopped"}  # the bye, not 40 exits or a node-down


async def test_pgregistry_drain_stops_a_node_gracefully() -> None:
    async with watched_node() as (t, _reg, node_id, proc):
        done = await run_tool("drain", node_id)
        assert done.returncode == 0 and "draining" in done.stdout
        assert await asyncio.to_thread(proc.wait, 15) == 0
        await eventually(lambda: t.peers() == [], 5, "n1 gone")


class _SlowDrain:
    """A service whose drain waits for `release`."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.draining = asyncio.Event()

    async def drain(self, timeout: float) -> None:
        self.draining.set()
        await asyncio.wait_for(self.release.wait(), timeout)

    def close(self) -> None:
        self.release.set()


async def test_a_stopping_node_refuses_new_connections_with_leaving() -> None:
    async with Node("x", cookie=COOKIE, **FAST) as x, Node("y", cookie=COOKIE, **FAST) as y:
        slow = _SlowDrain()
        x.attach_service("slow", slow)
        stopping = asyncio.ensure_future(x.stop(drain_timeout=5.0))
        await asyncio.wait_for(slow.draining.wait(), 5)
        with pytest.raises(ConnectionError, match="leaving"):
            await y.connect(x.id)
        slow.release.set()
        await asyncio.wait_for(stopping, 10)


def _get(url: str) -> tuple[int, str]:
    """GET `url`: its status and body (a status >= 400 too)."""
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


async def test_a_node_that_discovers_its_peer_serves_metrics_probes_and_json_logs() -> None:
    port = _free_port()
    async with Node("t", cookie=COOKIE, **FAST) as t:
        t.monitor_nodes()
        address = t.id.rpartition("@")[2]
        proc = subprocess.Popen([sys.executable, "-m", "pgregistry", "node", "--name", "n1", "--scope", "jobs",
                                 "--tick-interval", "0.2", "--down-after", "1.0", "--discover", f"static:{address}",
                                 "--metrics-port", str(port), "--log-format", "json", "--log-level", "info"],
                                cwd=ROOT, env={"PATH": "/usr/bin:/bin", "PGREGISTRY_COOKIE": COOKIE},
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        with _running(proc):
            node_id = (await asyncio.to_thread(_read_line, proc)).split()[1]
            await eventually(lambda: t.peers() == [node_id], 10, "n1 found t by discovery")
            assert (await asyncio.to_thread(_get, f"http://127.0.0.1:{port}/livez"))[0] == 200

            async def ready() -> bool:
                return (await asyncio.to_thread(_get, f"http://127.0.0.1:{port}/readyz"))[0] == 200

            await eventually(ready, 10, "n1 ready")
            status, body = await asyncio.to_thread(_get, f"http://127.0.0.1:{port}/metrics")
            assert status == 200 and "pgregistry_peers 1.0" in body and 'pgregistry_build_info{' in body
            proc.terminate()
            _out, err = await asyncio.to_thread(proc.communicate, timeout=15)
            assert proc.returncode == 0
        lines = [json.loads(line) for line in err.splitlines() if line.strip()]
        assert all({"time", "level", "logger", "node", "event", "peer", "message"} <= set(r) for r in lines)
        assert any(r["event"] == "peer_up" and r["peer"] == t.id and r["node"] == node_id for r in lines), lines
        assert COOKIE not in err


async def test_after_a_drain_a_signal_is_still_the_first_and_a_bad_shutdown_timeout_is_refused() -> None:
    async with watched_node("--shutdown-timeout", "5") as (_t, _reg, node_id, proc):
        done = await run_tool("drain", node_id)
        assert done.returncode == 0
        proc.terminate()  # a process manager's routine SIGTERM during the drain: no sudden exit
        assert await asyncio.to_thread(proc.wait, 15) == 0
    bad = await asyncio.to_thread(subprocess.run, [sys.executable, "-m", "pgregistry", "node", "--name", "n",
                                                   "--shutdown-timeout", "0"],
                                  cwd=ROOT, env={"PATH": "/usr/bin:/bin", "PGREGISTRY_COOKIE": COOKIE},
                                  capture_output=True, text=True, timeout=30)
    assert bad.returncode == 2 and "--shutdown-timeout must be a positive number" in bad.stderr


async def test_operator_commands_refuse_a_non_key_literal_and_report_a_refusal_as_unreachable() -> None:
    async with watched_node() as (_t, _reg, node_id, _proc):
        bad = await run_tool("lookup", node_id, "jobs", "{1, 2}")
        assert bad.returncode == 2 and "is not a key" in bad.stderr
    async with Node("plain", cookie=COOKIE, **FAST) as plain:  # serves no tools
        refused = await run_tool("status", plain.id)
        assert refused.returncode == 3 and "serves no tools" in refused.stderr
