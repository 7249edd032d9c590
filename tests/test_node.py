"""`Node` on its own: arguments, lifecycle, local names, services, threads, isolation."""

from __future__ import annotations

import asyncio
import logging
import ssl
from typing import Any

import pytest

from pgregistry.errors import AlreadyStarted, NoProcess, NotLocal
from pgregistry.events import Down
from pgregistry.node import Node
from pgregistry.process import exit, monitor, receive, send
from pgregistry.process import self as self_pid
from pgregistry.terms import Pid, Ref

T = 5.0


async def idle() -> None:
    while True:
        await receive()


async def expect_down(ref: Ref) -> Down:
    msg = await receive(T)
    assert type(msg) is Down, msg
    assert msg.ref == ref
    return msg


# -- construction --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "error", "argument"),
    [
        ({"name": 1}, TypeError, "name"),
        ({"name": ""}, ValueError, "name"),
        ({"name": "a@b"}, ValueError, "name"),
        ({"name": "a b"}, ValueError, "name"),
        ({"host": None}, TypeError, "host"),
        ({"host": ""}, ValueError, "host"),
        ({"port": "4000"}, TypeError, "port"),
        ({"port": True}, TypeError, "port"),
        ({"port": 4000.0}, TypeError, "port"),
        ({"port": -1}, ValueError, "port"),
        ({"port": 65536}, ValueError, "port"),
        ({"cookie": b"secret"}, TypeError, "cookie"),
        ({"cookie": ""}, ValueError, "cookie"),
        ({"ssl": "tls"}, TypeError, "ssl"),
        ({"tick_interval": "1"}, TypeError, "tick_interval"),
        ({"tick_interval": 0}, ValueError, "tick_interval"),
        ({"tick_interval": float("nan")}, ValueError, "tick_interval"),
        ({"down_after": -1.0}, ValueError, "down_after"),
        ({"down_after": float("inf")}, ValueError, "down_after"),
        ({"down_after": None}, TypeError, "down_after"),
    ],
)
def test_constructor_validates_every_argument(kwargs: dict[str, Any], error: type[Exception], argument: str) -> None:
    args = {"name": "a", **kwargs}
    name = args.pop("name")
    with pytest.raises(error, match=argument):
        Node(name, **args)


def test_constructor_accepts_good_arguments() -> None:
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    client = ssl.create_default_context()
    node = Node("n1", host="::1", port=4000, cookie="c", ssl=server, client_ssl=client, tick_interval=0.2, down_after=1)
    assert node.id == "n1@::1:4000"
    assert Node("a").id == "a@127.0.0.1:0"
    assert node.peers() == []


# -- lifecycle -----------------------------------------------------------------------


async def test_async_with_starts_and_stops() -> None:
    node = Node("a")
    assert not node.running
    with pytest.raises(RuntimeError, match="not been started"):
        node.spawn(idle)
    async with node as entered:
        assert entered is node
        assert node.running
        pid = node.spawn(idle)
        assert pid.node == node.id
    assert not node.running
    with pytest.raises(RuntimeError, match="stopped"):
        node.spawn(idle)
    with pytest.raises(RuntimeError, match="stopped"):
        node.register_name("x", pid)
    await node.stop()  # idempotent


async def test_start_twice_and_restart_are_refused() -> None:
    node = Node("a")
    await node.start()
    with pytest.raises(RuntimeError, match="already started"):
        await node.start()
    await node.stop()
    with pytest.raises(RuntimeError, match="already started"):
        await node.start()


async def test_stop_of_a_node_never_started() -> None:
    node = Node("a")
    await node.stop()
    await node.stop()
    assert node.peers() == []


async def test_concurrent_stops_both_return_after_the_stop() -> None:
    closed = asyncio.Event()

    class SlowClose:
        async def close(self) -> None:
            await asyncio.sleep(0)
            closed.set()

    node = Node("a")
    await node.start()
    node.attach_service("slow", SlowClose())
    await asyncio.gather(node.stop(), node.stop())
    assert closed.is_set()


async def test_each_incarnation_gets_new_pids() -> None:
    async with Node("a") as first:
        old = self_pid()
        assert old.creation == first.runtime.creation != 0
    # The same id (name and port) again: only the creation tells the incarnations apart.
    async with Node("a", port=first.port) as second:
        assert second.id == first.id
        new = self_pid()
        assert new != old
        send(old, "to the old incarnation")  # dropped, not delivered to `new`
        with pytest.raises(TimeoutError):
            await receive(0)
        ref = monitor(old)
        assert await receive(0) == Down(ref, old, "noproc")
        assert second.runtime.is_local(new) and not second.runtime.is_local(old)


async def test_stop_kills_every_process_and_runs_exit_hooks_once() -> None:
    reasons: list[tuple[Pid, Any]] = []
    node = Node("a")
    await node.start()
    main = self_pid()
    pids = [node.spawn(idle) for _ in range(3)]
    node.register_name("worker", pids[0])
    tasks = []
    for pid in [*pids, main]:
        proc = node.runtime.process(pid)
        assert proc is not None and proc.task is not None
        tasks.append(proc.task)
        proc.add_exit_hook("test", lambda p, reason: reasons.append((p, reason)))
    await node.stop()
    assert sorted(reasons) == sorted((pid, "killed") for pid in [*pids, main])
    assert all(task.done() for task in tasks[:3])
    assert node.whereis("worker") is None
    assert all(node.runtime.process(pid) is None for pid in pids)
    with pytest.raises(RuntimeError, match="node.spawn"):
        self_pid()  # the main task is no process any more
    await node.stop()
    assert len(reasons) == 4


async def test_stop_from_a_process_of_the_node() -> None:
    done: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    async def stopper(node: Node) -> None:
        await node.stop()
        done.set_result("stopped")

    node = Node("a")
    await node.start()
    other = node.spawn(idle)
    node.spawn(stopper, node)
    assert await asyncio.wait_for(done, T) == "stopped"
    assert not node.running
    assert node.runtime.process(other) is None


# -- local names ---------------------------------------------------------------------


async def test_register_whereis_unregister() -> None:
    async with Node("a") as node:
        pid = node.spawn(idle)
        assert node.whereis("w") is None
        node.register_name("w", pid)
        assert node.whereis("w") == pid
        node.unregister_name("w")
        assert node.whereis("w") is None
        node.unregister_name("w")  # releasing a free name does nothing
        node.register_name("w2", pid)  # the pid may take a name again
        assert node.whereis("w2") == pid


async def test_name_is_released_when_the_process_exits() -> None:
    async with Node("a") as node:
        pid = node.spawn(idle)
        node.register_name("w", pid)
        ref = monitor(pid)
        exit(pid, "shutdown")
        await expect_down(ref)
        assert node.whereis("w") is None
        node.register_name("w", node.spawn(idle))


async def test_register_name_errors() -> None:
    async with Node("a") as node:
        pid = node.spawn(idle)
        other = node.spawn(idle)
        node.register_name("taken", pid)
        with pytest.raises(AlreadyStarted) as info:
            node.register_name("taken", other)
        assert info.value.pid == pid
        with pytest.raises(AlreadyStarted):
            node.register_name("taken", pid)
        with pytest.raises(ValueError, match="already registered"):
            node.register_name("second", pid)
        with pytest.raises(TypeError):
            node.register_name(1, other)  # type: ignore[arg-type]
        with pytest.raises(ValueError):
            node.register_name("", other)
        with pytest.raises(ValueError):
            node.register_name("x" * 256, other)
        with pytest.raises(TypeError):
            node.register_name("n", ("a", 1, 1))  # type: ignore[arg-type]
        remote = Pid("b@127.0.0.1:1", 1, 1)
        with pytest.raises(NotLocal) as not_local:
            node.register_name("n", remote)
        assert not_local.value.pid == remote
        assert isinstance(not_local.value, ValueError)
        exit(other, "kill")
        with pytest.raises(NoProcess):
            node.register_name("n", other)
        with pytest.raises(TypeError):
            node.whereis(1)  # type: ignore[arg-type]
        with pytest.raises(TypeError):
            node.unregister_name(None)  # type: ignore[arg-type]
        assert node.whereis("n") is None


async def test_the_main_task_can_hold_a_name() -> None:
    async with Node("a") as node:
        node.register_name("main", self_pid())
        send("main", "by name")
        assert await receive(0) == "by name"
    assert node.whereis("main") is None


# -- services ------------------------------------------------------------------------


class Service:
    def __init__(self, closes: list[str], name: str, fail: bool = False) -> None:
        self.closes = closes
        self.name = name
        self.fail = fail

    def close(self) -> None:
        self.closes.append(self.name)
        if self.fail:
            raise RuntimeError(f"{self.name} failed to close")


class AsyncService(Service):
    async def close(self) -> None:  # type: ignore[override]
        await asyncio.sleep(0)
        super().close()


async def test_services_are_attached_and_closed_once_on_stop(caplog: pytest.LogCaptureFixture) -> None:
    closes: list[str] = []
    node = Node("a")
    await node.start()
    first = Service(closes, "first", fail=True)
    node.attach_service("first", first)
    node.attach_service("second", AsyncService(closes, "second"))
    node.attach_service("detached", Service(closes, "detached"))
    node.detach_service("detached")
    node.detach_service("never attached")
    assert node.service("first") is first
    assert node.service("detached") is None
    with pytest.raises(AlreadyStarted) as info:
        node.attach_service("first", Service(closes, "dup"))
    assert info.value.pid is first
    with pytest.raises(TypeError):
        node.attach_service(1, first)  # type: ignore[arg-type]
    with caplog.at_level(logging.ERROR, logger="pgregistry.node"):
        await node.stop()
    assert closes == ["first", "second"]
    assert any("first" in r.getMessage() for r in caplog.records)
    assert node.service("first") is None
    await node.stop()
    assert closes == ["first", "second"]
    with pytest.raises(RuntimeError):
        node.attach_service("late", first)


async def test_a_service_may_detach_itself_while_closing() -> None:
    node = Node("a")

    class SelfDetaching:
        def close(self) -> None:
            node.detach_service("me")

    await node.start()
    node.attach_service("me", SelfDetaching())
    await node.stop()


# -- threads -------------------------------------------------------------------------


async def test_writes_from_another_thread_raise_runtime_error() -> None:
    async with Node("a") as node:
        pid = node.spawn(idle)
        node.register_name("w", pid)

        def from_thread() -> list[str]:
            errors = []
            for attempt in (
                lambda: node.spawn(idle),
                lambda: node.register_name("x", pid),
                lambda: node.unregister_name("w"),
                lambda: node.attach_service("s", object()),
                lambda: node.detach_service("s"),
                lambda: node.require_loop_thread("a write"),
            ):
                try:
                    attempt()
                except RuntimeError as exc:
                    errors.append(str(exc))
            assert node.whereis("w") == pid  # reads work from any thread
            return errors

        errors = await asyncio.to_thread(from_thread)
        assert len(errors) == 6
        assert all("loop thread" in e for e in errors)
        assert node.loop_thread is not None
        assert node.whereis("w") == pid
        node.require_loop_thread("a write")  # on the loop thread: fine
    with pytest.raises(RuntimeError, match="not running"):
        node.require_loop_thread("a write")


# -- two nodes in one loop -----------------------------------------------------------


async def test_two_nodes_in_one_loop_do_not_shortcut() -> None:
    first_message: asyncio.Future[Any] = asyncio.get_running_loop().create_future()

    async def collector() -> None:
        first_message.set_result(await receive())

    async def send_marker(dest: Pid) -> None:
        send(dest, "marker from b")

    async with Node("a") as a, Node("b") as b:
        assert self_pid().node == b.id
        async with Node("c") as c:
            on_b = b.spawn(collector)
            on_c = c.spawn(idle)
            # The main task is a process of c now: its send to b's pid has no route.
            send(on_b, "from c, must not arrive")
            b.spawn(send_marker, on_b)
            assert await asyncio.wait_for(first_message, T) == "marker from b"

            ref = monitor(on_b)
            assert await receive(0) == Down(ref, on_b, "noconnection")
            exit(on_b, "kill")  # no route: nothing happens
            assert b.runtime.process(on_b) is None  # it ended on its own after one message
            assert c.runtime.process(on_c) is not None

            # Names are per node.
            c.register_name("same", on_c)
            a.register_name("same", a.spawn(idle))
            assert c.whereis("same") == on_c
            assert a.whereis("same") != on_c
            assert a.runtime.process(on_c) is None
            with pytest.raises(NotLocal):
                a.register_name("other", on_c)


async def test_exit_to_another_nodes_pid_does_not_reach_it() -> None:
    async with Node("a") as a, Node("b") as b:
        on_a = a.spawn(idle)
        exit(on_a, "kill")  # the main task is b's process: no route to a
        assert a.runtime.process(on_a) is not None
        assert b.runtime.process(on_a) is None


@pytest.mark.parametrize("bad", [0, 256, 64 * 1024 - 1, 2**32])
def test_a_frame_limit_outside_its_range_is_refused_naming_the_option(bad: int) -> None:
    with pytest.raises(ValueError, match="max_frame"):
        Node("a", max_frame=bad)
    with pytest.raises(TypeError, match="max_frame"):
        Node("a", max_frame=65536.0)  # type: ignore[arg-type]
    assert Node("a", max_frame=64 * 1024).max_frame == 64 * 1024


@pytest.mark.parametrize(
    ("option", "bad", "error"),
    [
        ("max_members_per_message", "1024", TypeError),
        ("max_members_per_message", True, TypeError),
        ("max_members_per_message", 255, ValueError),  # below what one peer lists in a message
        ("max_members_per_message", 10**7, ValueError),
        ("max_gossip_peers", 1.5, TypeError),
        ("max_gossip_peers", 0, ValueError),
        ("max_gossip_peers", -1, ValueError),
        ("max_gossip_dials", None, TypeError),
        ("max_gossip_dials", 0, ValueError),
        ("max_gossip_dials", 10**6, ValueError),
    ],
)
def test_gossip_caps_are_checked_naming_the_option(option: str, bad: Any, error: type[Exception]) -> None:
    with pytest.raises(error, match=f"{option} must be"):
        Node("a", **{option: bad})


def test_gossip_caps_have_defaults_and_take_good_values() -> None:
    node = Node("a")
    assert (node.max_members_per_message, node.max_gossip_peers, node.max_gossip_dials) == (1024, 1024, 32)
    node = Node("a", max_members_per_message=256, max_gossip_peers=1, max_gossip_dials=1)
    assert (node.max_members_per_message, node.max_gossip_peers, node.max_gossip_dials) == (256, 1, 1)
