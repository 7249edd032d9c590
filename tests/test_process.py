"""The process layer: spawn, mailboxes, send, receive, monitors, exit signals, exit hooks."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest

from pgregistry.errors import NoProcess
from pgregistry.events import Down
from pgregistry.node import Node
from pgregistry.process import (
    Via,
    current_process,
    demonitor,
    exit,
    monitor,
    receive,
    send,
)
from pgregistry.process import (
    self as self_pid,
)
from pgregistry.terms import Pid, Ref

# Upper bound for anything that must arrive; never reached when the code is right.
T = 5.0


async def echo(parent: Pid) -> None:
    """Send every message back to `parent`, forever."""
    while True:
        send(parent, await receive())


async def idle() -> None:
    """Wait for messages forever, ignoring them."""
    while True:
        await receive()


async def run_once(parent: Pid) -> None:
    """Receive one callable, run it here, send its result (or exception) to `parent`."""
    fn = await receive()
    try:
        send(parent, ("ok", fn()))
    except Exception as exc:
        send(parent, ("error", exc))


async def expect_down(ref: Ref) -> Down:
    msg = await receive(T)
    assert type(msg) is Down, msg
    assert msg.ref == ref
    return msg


async def assert_mailbox_empty() -> None:
    with pytest.raises(TimeoutError):
        await receive(0)


class DictNames:
    """A minimal naming service for `Via`: a dict, entries removed when the holder exits."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self.names: dict[Any, Pid] = {}

    def whereis_name(self, key: Any) -> Pid | None:
        return self.names.get(key)

    def register_name(self, key: Any, pid: Pid, value: Any = None) -> bool:
        if key in self.names:
            return False
        proc = self.node.runtime.process(pid)
        assert proc is not None
        self.names[key] = pid
        proc.add_exit_hook(("dict-names", key), lambda _pid, _reason: self.names.pop(key, None))
        return True

    def unregister_name(self, key: Any) -> None:
        self.names.pop(key, None)


# -- spawn, send, receive ------------------------------------------------------------


async def test_spawn_returns_pid_at_once_and_keeps_early_messages_in_order() -> None:
    async with Node("a") as node:
        me = self_pid()
        pid = node.spawn(echo, me)
        assert type(pid) is Pid
        assert pid.node == node.id
        for i in range(200):
            send(pid, i)
        assert [await receive(T) for _ in range(200)] == list(range(200))


async def test_spawn_passes_args_and_kwargs() -> None:
    async def report(parent: Pid, a: int, *, b: str) -> None:
        send(parent, (a, b, self_pid()))

    async with Node("a") as node:
        pid = node.spawn(report, self_pid(), 1, b="two")
        assert await receive(T) == (1, "two", pid)


async def test_spawn_rejects_non_callables() -> None:
    async def work() -> None:
        await receive()

    async with Node("a") as node:
        with pytest.raises(TypeError, match="async callable"):
            node.spawn(42)  # type: ignore[arg-type]
        coro = work()
        with pytest.raises(TypeError, match="not a coroutine object"):
            node.spawn(coro)  # type: ignore[arg-type]
        coro.close()


async def test_spawn_of_a_sync_function_crashes_with_type_error() -> None:
    def not_async() -> int:
        return 1

    async with Node("a") as node:
        pid = node.spawn(not_async)  # type: ignore[arg-type]
        ref = monitor(pid)
        down = await expect_down(ref)
        assert isinstance(down.reason, TypeError)


async def test_main_task_is_a_process_of_the_node_it_entered_last() -> None:
    async with Node("a") as a:
        pa = self_pid()
        assert pa.node == a.id
        send(pa, "to myself")
        assert await receive(0) == "to myself"
        async with Node("b") as b:
            pb = self_pid()
            assert pb.node == b.id
            send(pb, "to b")
            assert await receive(0) == "to b"
        assert self_pid() == pa
        await assert_mailbox_empty()


async def test_a_spawned_process_entering_a_node_stays_itself() -> None:
    async def enter_other(parent: Pid) -> None:
        me = self_pid()
        async with Node("inner"):
            send(parent, self_pid() == me)

    async with Node("a") as a:
        a.spawn(enter_other, self_pid())
        assert await receive(T) is True


async def test_calls_from_a_task_that_is_no_process_raise_runtime_error() -> None:
    def check(fn: Any, *args: Any) -> None:
        with pytest.raises(RuntimeError, match=r"node\.spawn.*async with node"):
            fn(*args)

    pid = Pid("x@127.0.0.1:1", 1, 1)
    check(self_pid)
    check(send, pid, "m")
    check(monitor, pid)
    check(exit, pid)
    check(current_process)
    with pytest.raises(RuntimeError, match="node.spawn"):
        await receive(0)

    async def plain_task() -> str:
        try:
            self_pid()
        except RuntimeError as exc:
            return str(exc)
        return "no error"

    async with Node("a"):
        assert "node.spawn" in await asyncio.create_task(plain_task())


async def test_receive_times_out() -> None:
    async with Node("a"):
        with pytest.raises(TimeoutError):
            await receive(0)
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(TimeoutError):
            await receive(0.05)
        assert loop.time() - started >= 0.04
        send(self_pid(), "queued")
        assert await receive(0) == "queued"


async def test_receive_rejects_bad_timeouts() -> None:
    async with Node("a"):
        with pytest.raises(TypeError):
            await receive("1")  # type: ignore[arg-type]
        with pytest.raises(ValueError):
            await receive(-1)
        with pytest.raises(ValueError):
            await receive(float("nan"))


async def test_receive_wakes_a_waiting_process() -> None:
    async def wait_then_report(parent: Pid) -> None:
        send(parent, "waiting")
        send(parent, ("got", await receive(T)))

    async with Node("a") as node:
        pid = node.spawn(wait_then_report, self_pid())
        assert await receive(T) == "waiting"
        send(pid, "hello")
        assert await receive(T) == ("got", "hello")


async def test_cancelled_receive_loses_no_message() -> None:
    async def cancellable(parent: Pid) -> None:
        task = asyncio.current_task()
        assert task is not None
        send(parent, ("ready", task))
        try:
            await receive()
        except asyncio.CancelledError:
            task.uncancel()
            send(parent, "cancelled")
        send(parent, ("then got", await receive(T)))

    async with Node("a") as node:
        pid = node.spawn(cancellable, self_pid())
        tag, task = await receive(T)
        assert tag == "ready"
        # The message arrives and the receive is cancelled in the same loop step.
        send(pid, "precious")
        task.cancel()
        assert await receive(T) == "cancelled"
        assert await receive(T) == ("then got", "precious")


async def test_flush_removes_matching_messages() -> None:
    async with Node("a"):
        me = self_pid()
        for i in range(6):
            send(me, i)
        assert current_process().flush(lambda m: m % 2 == 0) == 3
        assert [await receive(0) for _ in range(3)] == [1, 3, 5]
        assert current_process().flush(lambda m: True) == 0


# -- destinations --------------------------------------------------------------------


async def test_send_to_a_dead_pid_is_dropped() -> None:
    async def quit_at_once() -> None:
        return None

    async with Node("a") as node:
        pid = node.spawn(quit_at_once)
        await expect_down(monitor(pid))
        send(pid, "lost")
        assert node.runtime.process(pid) is None


async def test_send_by_local_name_and_name_node_tuple() -> None:
    async with Node("a") as node:
        pid = node.spawn(echo, self_pid())
        node.register_name("echo", pid)
        send("echo", 1)
        send(("echo", node.id), 2)
        assert [await receive(T), await receive(T)] == [1, 2]
        with pytest.raises(NoProcess):
            send("nobody", 1)
        with pytest.raises(NoProcess):
            send(("nobody", node.id), 1)
        send(("echo", "other@127.0.0.1:9"), "dropped: no route to other nodes yet")


@pytest.mark.parametrize("dest", [42, None, ("a",), ("a", "b", "c"), ["a", "b"], (1, "n@h:1"), b"x"])
async def test_send_to_a_bad_destination_raises_type_error(dest: Any) -> None:
    async with Node("a"):
        with pytest.raises(TypeError):
            send(dest, "m")


async def test_send_via_a_naming_service() -> None:
    async with Node("a") as node:
        names = DictNames(node)
        pid = node.spawn(echo, self_pid())
        assert names.register_name("k", pid)
        send(Via(names, "k"), "hi")
        assert await receive(T) == "hi"
        with pytest.raises(NoProcess):
            send(Via(names, "missing"), "hi")


async def test_via_naming_service_errors_propagate() -> None:
    class Refusing:
        def whereis_name(self, key: Any) -> Pid | None:
            raise ValueError("duplicate registry")

        def register_name(self, key: Any, pid: Pid, value: Any = None) -> bool:
            return False

        def unregister_name(self, key: Any) -> None:
            return None

    async with Node("a"):
        with pytest.raises(ValueError, match="duplicate registry"):
            send(Via(Refusing(), "k"), "m")


def test_via_equality_hash_repr_and_immutability() -> None:
    class Service:
        def __repr__(self) -> str:
            return "Service()"

    s1, s2 = Service(), Service()
    assert Via(s1, "k") == Via(s1, "k", value=1)  # type: ignore[arg-type]
    assert hash(Via(s1, "k")) == hash(Via(s1, "k", 2))  # type: ignore[arg-type]
    assert Via(s1, "k") != Via(s2, "k")  # type: ignore[arg-type]
    assert Via(s1, "k") != Via(s1, "j")  # type: ignore[arg-type]
    assert Via(s1, "k") != ("k",)  # type: ignore[arg-type]
    assert len({Via(s1, "k"), Via(s1, "k"), Via(s2, "k")}) == 2  # type: ignore[arg-type]
    assert repr(Via(s1, "k")) == "Via(Service(), 'k')"  # type: ignore[arg-type]
    assert repr(Via(s1, "k", 3)) == "Via(Service(), 'k', value=3)"  # type: ignore[arg-type]
    via = Via(s1, "k")  # type: ignore[arg-type]
    with pytest.raises(AttributeError):
        via.key = "other"  # type: ignore[misc]
    assert (via.service, via.key, via.value) == (s1, "k", None)


# -- monitors and exit reasons -------------------------------------------------------


async def test_down_normal_on_return() -> None:
    async def finish_on_message() -> str:
        await receive()
        return "ignored return value"

    async with Node("a") as node:
        pid = node.spawn(finish_on_message)
        ref = monitor(pid)
        assert type(ref) is Ref
        send(pid, "go")
        assert await expect_down(ref) == Down(ref, pid, "normal")


async def test_down_carries_the_exception_object_and_the_crash_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    error = ValueError("boom")

    async def crash() -> None:
        await receive()
        raise error

    async with Node("a") as node:
        pid = node.spawn(crash)
        ref = monitor(pid)
        with caplog.at_level(logging.ERROR, logger="pgregistry.process"):
            send(pid, "go")
            down = await expect_down(ref)
        assert down.reason is error
        records = [r for r in caplog.records if r.name == "pgregistry.process"]
        assert records and records[0].exc_info is not None
        assert records[0].exc_info[1] is error
        assert repr(pid) in records[0].getMessage()


async def test_down_killed_by_exit_kill() -> None:
    async with Node("a") as node:
        pid = node.spawn(idle)
        ref = monitor(pid)
        exit(pid, "kill")
        assert await expect_down(ref) == Down(ref, pid, "killed")


async def test_exit_kill_is_immediate() -> None:
    async with Node("a") as node:
        pid = node.spawn(idle)
        node.register_name("victim", pid)
        ref = monitor(pid)
        exit(pid)  # the default reason is "kill"
        assert node.whereis("victim") is None
        assert node.runtime.process(pid) is None
        assert await receive(0) == Down(ref, pid, "killed")


async def test_down_killed_by_task_cancellation() -> None:
    async def give_task(parent: Pid) -> None:
        send(parent, asyncio.current_task())
        await receive()

    async with Node("a") as node:
        pid = node.spawn(give_task, self_pid())
        task = await receive(T)
        ref = monitor(pid)
        task.cancel()
        assert await expect_down(ref) == Down(ref, pid, "killed")


async def test_down_killed_when_cancelled_before_first_run() -> None:
    async with Node("a") as node:
        pid = node.spawn(idle)
        ref = monitor(pid)
        proc = node.runtime.process(pid)
        assert proc is not None and proc.task is not None
        proc.task.cancel()
        assert await expect_down(ref) == Down(ref, pid, "killed")


@pytest.mark.parametrize("reason", ["shutdown", ("shutdown", 1), {"why": "test"}, 7])
async def test_down_with_a_custom_reason(reason: Any) -> None:
    async with Node("a") as node:
        pid = node.spawn(idle)
        ref = monitor(pid)
        exit(pid, reason)
        assert await expect_down(ref) == Down(ref, pid, reason)


async def test_custom_exit_reason_lets_the_process_clean_up() -> None:
    async def cleanup_on_exit(parent: Pid) -> None:
        send(parent, "running")
        try:
            await receive()
        finally:
            send(parent, "cleaned up")

    async with Node("a") as node:
        pid = node.spawn(cleanup_on_exit, self_pid())
        assert await receive(T) == "running"
        ref = monitor(pid)
        exit(pid, "shutdown")
        assert await receive(T) == "cleaned up"
        assert await expect_down(ref) == Down(ref, pid, "shutdown")


async def test_custom_exit_before_the_first_run() -> None:
    async with Node("a") as node:
        pid = node.spawn(idle)
        ref = monitor(pid)
        exit(pid, "shutdown")
        assert await expect_down(ref) == Down(ref, pid, "shutdown")


async def test_monitor_of_a_dead_pid_gives_noproc_at_once() -> None:
    async with Node("a") as node:
        pid = node.spawn(idle)
        exit(pid, "kill")
        ref = monitor(pid)
        assert await receive(0) == Down(ref, pid, "noproc")
        never = Pid(node.id, 10**9, node.runtime.creation)
        ref2 = monitor(never)
        assert await receive(0) == Down(ref2, never, "noproc")


async def test_every_monitor_gets_its_own_down() -> None:
    async def watch(parent: Pid, target: Pid) -> None:
        ref = monitor(target)
        send(parent, "watching")
        send(parent, (await receive(T), ref))

    async with Node("a") as node:
        target = node.spawn(idle)
        for _ in range(3):
            node.spawn(watch, self_pid(), target)
        for _ in range(3):
            assert await receive(T) == "watching"
        mine = monitor(target)
        exit(target, "bye")
        downs = [await receive(T) for _ in range(4)]
        assert Down(mine, target, "bye") in downs
        reported = [m for m in downs if type(m) is tuple]
        assert len(reported) == 3
        assert all(down == Down(ref, target, "bye") for down, ref in reported)


async def test_monitor_and_exit_reject_non_pids() -> None:
    async with Node("a"):
        for bad in ("name", ("a@h:1", 1, 1), 1, None):
            with pytest.raises(TypeError):
                monitor(bad)  # type: ignore[arg-type]
            with pytest.raises(TypeError):
                exit(bad)  # type: ignore[arg-type]
        with pytest.raises(TypeError):
            demonitor(("a@h:1", 1, 1))  # type: ignore[arg-type]


async def test_demonitor_of_an_active_monitor() -> None:
    async with Node("a") as node:
        pid = node.spawn(idle)
        ref = monitor(pid)
        other = monitor(pid)
        assert demonitor(ref) is True
        assert demonitor(ref) is False
        exit(pid, "kill")
        assert await receive(0) == Down(other, pid, "killed")
        await assert_mailbox_empty()


async def test_demonitor_flushes_a_queued_down() -> None:
    async with Node("a") as node:
        me = self_pid()
        pid = node.spawn(idle)
        ref = monitor(pid)
        send(me, "before")
        exit(pid, "kill")
        send(me, "after")
        assert demonitor(ref) is False
        assert await receive(0) == "before"
        assert await receive(0) == "after"
        await assert_mailbox_empty()


async def test_a_plain_down_message_is_an_ordinary_message() -> None:
    async with Node("a") as node:
        fake = Down(node.runtime.new_ref(), self_pid(), "made up")
        send(self_pid(), fake)
        assert await receive(0) == fake


async def test_watchers_exit_drops_its_monitors() -> None:
    async def watch_then_quit(parent: Pid, target: Pid) -> None:
        monitor(target)
        send(parent, "watching")

    async with Node("a") as node:
        target = node.spawn(idle)
        watcher = node.spawn(watch_then_quit, self_pid(), target)
        wref = monitor(watcher)
        assert await receive(T) == "watching"
        await expect_down(wref)
        exit(target, "kill")  # its Down would go to a dead watcher: must not fail
        tref = monitor(target)
        assert await receive(0) == Down(tref, target, "noproc")


# -- exit signals --------------------------------------------------------------------


async def test_exit_normal_from_another_process_is_ignored() -> None:
    async with Node("a") as node:
        pid = node.spawn(echo, self_pid())
        exit(pid, "normal")
        send(pid, "still alive?")
        assert await receive(T) == "still alive?"
        assert node.runtime.process(pid) is not None


async def test_exit_normal_from_the_process_itself_ends_it_normally() -> None:
    async def quit_normally() -> None:
        exit(self_pid(), "normal")
        await receive()

    async with Node("a") as node:
        pid = node.spawn(quit_normally)
        ref = monitor(pid)
        assert await expect_down(ref) == Down(ref, pid, "normal")


async def test_a_process_can_kill_itself() -> None:
    async def suicide(parent: Pid) -> None:
        exit(self_pid(), "kill")
        send(parent, "unreachable")  # pragma: no cover - the process is already gone

    async with Node("a") as node:
        pid = node.spawn(suicide, self_pid())
        ref = monitor(pid)
        assert await expect_down(ref) == Down(ref, pid, "killed")
        await assert_mailbox_empty()


async def test_exit_of_a_dead_or_foreign_pid_does_nothing() -> None:
    async with Node("a") as node:
        pid = node.spawn(idle)
        exit(pid, "kill")
        exit(pid, "kill")
        exit(Pid("elsewhere@127.0.0.1:1", 1, 1), "kill")


async def test_exit_of_the_main_process_leaves_its_task_running() -> None:
    async def kill(target: Pid) -> None:
        exit(target, "kill")

    async with Node("a") as node:
        main = self_pid()
        node.spawn(kill, main)
        with pytest.raises(RuntimeError, match="exited"):
            await receive(T)
        assert node.runtime.process(main) is None
        with pytest.raises(RuntimeError, match="node.spawn"):
            self_pid()


# -- exit hooks ----------------------------------------------------------------------


async def test_exit_hooks_run_once_in_order_before_down(caplog: pytest.LogCaptureFixture) -> None:
    calls: list[tuple[str, Pid, Any]] = []

    async with Node("a") as node:
        pid = node.spawn(idle)
        node.register_name("hooked", pid)
        proc = node.runtime.process(pid)
        assert proc is not None

        def hook(tag: str) -> Any:
            def run(p: Pid, reason: Any) -> None:
                assert node.whereis("hooked") is None  # the name is released first
                calls.append((tag, p, reason))

            return run

        def broken(p: Pid, reason: Any) -> None:
            raise RuntimeError("hook failure")

        proc.add_exit_hook("first", hook("first"))
        proc.add_exit_hook("broken", broken)
        proc.add_exit_hook("second", hook("second"))
        proc.add_exit_hook("removed", hook("removed"))
        proc.remove_exit_hook("removed")
        proc.remove_exit_hook("never added")
        proc.add_exit_hook("first", hook("first, replaced"))

        ref = monitor(pid)
        with caplog.at_level(logging.ERROR, logger="pgregistry.process"):
            exit(pid, "bye")
            # The Down is delivered only after every hook has run.
            assert await expect_down(ref) == Down(ref, pid, "bye")
        assert calls == [("first, replaced", pid, "bye"), ("second", pid, "bye")]
        assert any("hook failure" in str(r.exc_info[1]) for r in caplog.records if r.exc_info)

        exit(pid, "kill")
        with pytest.raises(NoProcess):
            proc.add_exit_hook("late", hook("late"))
    assert len(calls) == 2  # the node's stop did not run them again


async def test_exit_hooks_of_a_crash_and_of_a_return() -> None:
    seen: list[Any] = []
    error = KeyError("x")

    async def crash() -> None:
        await receive()
        raise error

    async def ret() -> None:
        await receive()

    async with Node("a") as node:
        for fn in (crash, ret):
            pid = node.spawn(fn)
            proc = node.runtime.process(pid)
            assert proc is not None
            proc.add_exit_hook("h", lambda p, reason: seen.append(reason))
            ref = monitor(pid)
            send(pid, "go")
            await expect_down(ref)
    assert seen == [error, "normal"]
