"""`Server`, `call` and `cast`: callbacks, stop paths and terminate, timeouts, names."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest

from pgregistry.errors import AlreadyStarted, CallTimeout, NoProcess
from pgregistry.events import Down
from pgregistry.node import Node
from pgregistry.process import Via, exit, monitor, receive, send
from pgregistry.process import self as self_pid
from pgregistry.server import Server, call, cast
from pgregistry.terms import Pid, Ref

T = 5.0


async def expect_down(ref: Ref) -> Down:
    msg = await receive(T)
    assert type(msg) is Down, msg
    assert msg.ref == ref
    return msg


async def assert_mailbox_empty() -> None:
    with pytest.raises(TimeoutError):
        await receive(0)


class Recorder(Server):
    """Counts; records its callbacks in the list given to `init`."""

    log: list[Any]
    count: int

    async def init(self, log: list[Any], start: int = 0) -> None:
        await asyncio.sleep(0)  # init may await; start must wait for it
        self.log = log
        self.count = start
        log.append(("init", self_pid()))

    async def handle_call(self, request: Any, caller: Pid) -> Any:
        self.log.append(("call", request, caller))
        match request:
            case "get":
                return self.count
            case ("crash", error):
                raise error
            case ("wait", event):
                await event.wait()
                return "waited"
            case ("wait", event, notify):
                send(notify, "waiting")
                await event.wait()
                return "waited"
            case ("monitor", pid):
                return monitor(pid)
        return ("echo", request)

    async def handle_cast(self, msg: Any) -> None:
        self.log.append(("cast", msg))
        match msg:
            case ("add", n):
                self.count += n
            case "stop":
                exit(self_pid(), "normal")
            case ("crash", error):
                raise error

    async def handle_info(self, msg: Any) -> None:
        self.log.append(("info", msg))

    async def terminate(self, reason: Any) -> None:
        self.log.append(("terminate", reason))


class DictNames:
    """A minimal naming service for `Via`; records which process registered."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self.names: dict[Any, Pid] = {}
        self.registered_from: list[tuple[Pid, Pid, Any]] = []

    def whereis_name(self, key: Any) -> Pid | None:
        return self.names.get(key)

    def register_name(self, key: Any, pid: Pid, value: Any = None) -> bool:
        self.registered_from.append((self_pid(), pid, value))
        if key in self.names:
            return False
        proc = self.node.runtime.process(pid)
        assert proc is not None
        self.names[key] = pid
        proc.add_exit_hook(("dict-names", key), lambda _pid, _reason: self.names.pop(key, None))
        return True

    def unregister_name(self, key: Any) -> None:
        self.names.pop(key, None)


# -- callbacks -----------------------------------------------------------------------


async def test_start_call_cast_info() -> None:
    log: list[Any] = []
    async with Node("a") as node:
        pid = await Recorder.start(node, log, 10)
        assert log == [("init", pid)]  # start returned after init finished
        me = self_pid()
        assert await call(pid, "get") == 10
        cast(pid, ("add", 5))
        send(pid, "plain message")
        assert await call(pid, "get") == 15
        assert log[1:] == [
            ("call", "get", me),
            ("cast", ("add", 5)),
            ("info", "plain message"),
            ("call", "get", me),
        ]
        await assert_mailbox_empty()  # replies never enter the caller's mailbox


async def test_server_receives_down_of_its_monitors_as_info() -> None:
    log: list[Any] = []

    async def idle() -> None:
        await receive()

    async with Node("a") as node:
        server = await Recorder.start(node, log)
        target = node.spawn(idle)
        ref = await call(server, ("monitor", target))
        exit(target, "gone")
        await call(server, "sync")  # the Down was delivered before this call
        assert ("info", Down(ref, target, "gone")) in log


async def test_call_by_name_tuple_and_via() -> None:
    async with Node("a") as node:
        names = DictNames(node)
        by_name = await Recorder.start(node, [], 1, name="counter")
        assert node.whereis("counter") == by_name
        assert await call("counter", "get") == 1
        assert await call(("counter", node.id), "get") == 1
        by_via = await Recorder.start(node, [], 2, name=Via(names, "k", "v"))
        assert names.names == {"k": by_via}
        # register_name ran inside the new process, with the Via's value
        assert names.registered_from == [(by_via, by_via, "v")]
        assert await call(Via(names, "k"), "get") == 2
        cast(Via(names, "k"), ("add", 1))
        assert await call(by_via, "get") == 3


async def test_default_handle_info_logs_and_continues(caplog: pytest.LogCaptureFixture) -> None:
    class Quiet(Server):
        async def handle_call(self, request: Any, caller: Pid) -> Any:
            return request

    async with Node("a") as node:
        pid = await Quiet.start(node)
        with caplog.at_level(logging.WARNING, logger="pgregistry.server"):
            send(pid, "unexpected")
            assert await call(pid, "ok") == "ok"
        assert any("unexpected" in r.getMessage() for r in caplog.records)


async def test_default_handle_call_crashes_the_server() -> None:
    async with Node("a") as node:
        pid = await Server.start(node)
        ref = monitor(pid)
        with pytest.raises(NoProcess) as info:
            await call(pid, "anything")
        assert isinstance(info.value.__cause__, RuntimeError)
        down = await expect_down(ref)
        assert down.reason is info.value.__cause__


# -- stopping and terminate ----------------------------------------------------------


async def test_terminate_runs_on_an_exit_signal() -> None:
    log: list[Any] = []
    async with Node("a") as node:
        pid = await Recorder.start(node, log)
        ref = monitor(pid)
        exit(pid, "shutdown")
        assert await expect_down(ref) == Down(ref, pid, "shutdown")
        assert log[-1] == ("terminate", "shutdown")


async def test_terminate_runs_when_the_server_exits_itself_normally() -> None:
    log: list[Any] = []
    async with Node("a") as node:
        pid = await Recorder.start(node, log)
        ref = monitor(pid)
        cast(pid, "stop")
        assert await expect_down(ref) == Down(ref, pid, "normal")
        assert log[-1] == ("terminate", "normal")


async def test_terminate_runs_on_a_crash_in_handle_call(caplog: pytest.LogCaptureFixture) -> None:
    log: list[Any] = []
    error = ValueError("bad request")
    async with Node("a") as node:
        pid = await Recorder.start(node, log)
        ref = monitor(pid)
        with caplog.at_level(logging.ERROR, logger="pgregistry.process"):
            with pytest.raises(NoProcess) as info:
                await call(pid, ("crash", error))
            assert info.value.__cause__ is error
            assert "bad request" in str(info.value)
            assert (await expect_down(ref)).reason is error
        assert log[-1] == ("terminate", error)
        assert any(r.exc_info and r.exc_info[1] is error for r in caplog.records)


async def test_terminate_runs_on_a_crash_in_handle_cast() -> None:
    log: list[Any] = []
    error = KeyError("k")
    async with Node("a") as node:
        pid = await Recorder.start(node, log)
        ref = monitor(pid)
        cast(pid, ("crash", error))
        assert (await expect_down(ref)).reason is error
        assert log[-1] == ("terminate", error)


async def test_terminate_does_not_run_on_kill() -> None:
    log: list[Any] = []
    async with Node("a") as node:
        pid = await Recorder.start(node, log)
        ref = monitor(pid)
        exit(pid, "kill")
        assert await expect_down(ref) == Down(ref, pid, "killed")
        assert not any(entry[0] == "terminate" for entry in log)


async def test_terminate_does_not_run_when_the_node_stops() -> None:
    log: list[Any] = []
    async with Node("a") as node:
        pid = await Recorder.start(node, log)
        proc = node.runtime.process(pid)
        assert proc is not None and proc.task is not None
        task = proc.task
    assert task.done()
    assert not any(entry[0] == "terminate" for entry in log)


# -- calls ---------------------------------------------------------------------------


async def test_call_timeout_and_the_late_reply_is_dropped() -> None:
    log: list[Any] = []
    release = asyncio.Event()
    async with Node("a") as node:
        pid = await Recorder.start(node, log)
        with pytest.raises(CallTimeout) as info:
            await call(pid, ("wait", release), timeout=0.05)
        assert isinstance(info.value, TimeoutError)
        release.set()
        # The server answers the first call (too late) before this one.
        assert await call(pid, "get") == 0
        await assert_mailbox_empty()


async def test_a_cancelled_call_drops_the_late_reply() -> None:
    release = asyncio.Event()
    async with Node("a") as node:
        pid = await Recorder.start(node, [])
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.05):
                await call(pid, ("wait", release), timeout=None)
        release.set()
        assert await call(pid, "get") == 0
        await assert_mailbox_empty()


async def test_call_to_a_dead_or_unknown_server_raises_no_process() -> None:
    async with Node("a") as node:
        names = DictNames(node)
        pid = await Recorder.start(node, [])
        exit(pid, "kill")
        with pytest.raises(NoProcess, match="noproc"):
            await call(pid, "get")
        with pytest.raises(NoProcess):
            await call("nobody", "get")
        with pytest.raises(NoProcess):
            await call(("nobody", node.id), "get")
        with pytest.raises(NoProcess):
            await call(Via(names, "nobody"), "get")
        with pytest.raises(NoProcess, match="noconnection"):
            await call(("somebody", "other@127.0.0.1:1"), "get")
        with pytest.raises(NoProcess, match="noconnection"):
            await call(Pid("other@127.0.0.1:1", 1, 1), "get")
        await assert_mailbox_empty()


async def call_while_the_server_exits(node: Node, server: Pid, reason: Any) -> BaseException:
    """What a `call` to `server` raises when the server exits with `reason` while handling it.

    A caller process calls ``("wait", ...)``, which the server answers only when
    released; once the server is inside `handle_call`, it is exited with `reason`.
    """
    release = asyncio.Event()
    outcome: asyncio.Future[BaseException] = asyncio.get_running_loop().create_future()

    async def waiting_caller(notify: Pid) -> None:
        try:
            await call(server, ("wait", release, notify))
        except BaseException as exc:
            outcome.set_result(exc)

    node.spawn(waiting_caller, self_pid())
    assert await receive(T) == "waiting"  # the server is inside handle_call
    exit(server, reason)
    exc = await asyncio.wait_for(outcome, T)
    assert not release.is_set()
    return exc


async def test_call_to_a_server_that_exits_while_handling() -> None:
    async with Node("a") as node:
        log: list[Any] = []
        pid = await Recorder.start(node, log)
        ref = monitor(pid)
        exc = await call_while_the_server_exits(node, pid, "shutdown")
        assert type(exc) is NoProcess and "shutdown" in str(exc)
        assert exc.__cause__ is None
        assert await expect_down(ref) == Down(ref, pid, "shutdown")
        assert log[-1] == ("terminate", "shutdown")


async def test_a_huge_int_exit_reason_gives_a_short_no_process_message() -> None:
    big = 10**10000  # beyond Python's int-to-str limit (4300 digits)
    async with Node("a") as node:
        pid = await Recorder.start(node, [])
        ref = monitor(pid)
        exc = await call_while_the_server_exits(node, pid, big)
        assert type(exc) is NoProcess
        assert "int of 33220 bits" in str(exc) and len(str(exc)) < 300
        assert await expect_down(ref) == Down(ref, pid, big)


async def test_call_argument_errors() -> None:
    async with Node("a") as node:
        pid = await Recorder.start(node, [])
        with pytest.raises(ValueError):
            await call(pid, "get", timeout=-1)
        with pytest.raises(TypeError):
            await call(pid, "get", timeout="1")  # type: ignore[arg-type]
        with pytest.raises(TypeError):
            await call(42, "get")
        with pytest.raises(RuntimeError, match="itself"):
            await call(self_pid(), "get")


async def test_call_and_cast_need_a_process() -> None:
    pid = Pid("x@127.0.0.1:1", 1, 1)
    with pytest.raises(RuntimeError, match="node.spawn"):
        await call(pid, "get")
    with pytest.raises(RuntimeError, match="node.spawn"):
        cast(pid, "msg")


async def test_cast_never_fails_on_a_missing_destination() -> None:
    async with Node("a") as node:
        names = DictNames(node)
        pid = await Recorder.start(node, [])
        exit(pid, "kill")
        cast(pid, "dropped")
        cast("nobody", "dropped")
        cast(Via(names, "nobody"), "dropped")
        cast(("x", "other@127.0.0.1:1"), "dropped")
        with pytest.raises(TypeError):
            cast(42, "m")


# -- start ---------------------------------------------------------------------------


async def test_init_failure_is_raised_by_start() -> None:
    error = ValueError("bad args")

    class Failing(Server):
        async def init(self, *args: Any) -> None:
            send(args[0], ("my pid", self_pid()))
            raise error

    async with Node("a") as node:
        with pytest.raises(ValueError) as info:
            await Failing.start(node, self_pid(), name="failing")
        assert info.value is error
        tag, pid = await receive(T)
        assert tag == "my pid"
        assert node.runtime.process(pid) is None
        assert node.whereis("failing") is None
        ok = await Recorder.start(node, [], name="failing")
        assert node.whereis("failing") == ok


async def test_start_with_a_taken_local_name() -> None:
    async with Node("a") as node:
        first = await Recorder.start(node, [], name="single")
        with pytest.raises(AlreadyStarted) as info:
            await Recorder.start(node, [], name="single")
        assert info.value.pid == first
        other = node.spawn(receive)
        node.register_name("taken", other)
        with pytest.raises(AlreadyStarted) as info:
            await Recorder.start(node, [], name="taken")
        assert info.value.pid == other


async def test_start_with_a_taken_via_name() -> None:
    async with Node("a") as node:
        names = DictNames(node)
        first = await Recorder.start(node, [], name=Via(names, "k"))
        with pytest.raises(AlreadyStarted) as info:
            await Recorder.start(node, [], name=Via(names, "k"))
        assert info.value.pid == first
        assert len(names.registered_from) == 1  # refused by the whereis pre-check


async def test_start_when_the_via_registration_is_refused() -> None:
    log: list[Any] = []

    class Racy(DictNames):
        """whereis finds nobody, but registration loses to `holder`."""

        holder: Pid | None = None

        def whereis_name(self, key: Any) -> Pid | None:
            return self.holder if self.registered_from else None

        def register_name(self, key: Any, pid: Pid, value: Any = None) -> bool:
            self.registered_from.append((self_pid(), pid, value))
            return False

    async with Node("a") as node:
        names = Racy(node)
        names.holder = node.spawn(receive)
        with pytest.raises(AlreadyStarted) as info:
            await Recorder.start(node, log, name=Via(names, "k"))
        assert info.value.pid == names.holder
        assert log == []  # init never ran
        (registrar, new_pid, _), = names.registered_from
        assert registrar == new_pid
        assert node.runtime.process(new_pid) is None


async def test_naming_service_errors_propagate() -> None:
    class Duplicate(DictNames):
        def whereis_name(self, key: Any) -> Pid | None:
            raise ValueError("duplicate registry")

    async with Node("a") as node:
        names = Duplicate(node)
        with pytest.raises(ValueError, match="duplicate registry"):
            await Recorder.start(node, [], name=Via(names, "k"))
        with pytest.raises(ValueError, match="duplicate registry"):
            await call(Via(names, "k"), "get")
        with pytest.raises(ValueError, match="duplicate registry"):
            cast(Via(names, "k"), "m")


async def test_start_argument_errors() -> None:
    async with Node("a") as node:
        with pytest.raises(TypeError):
            await Recorder.start(node, [], name=42)  # type: ignore[arg-type]
        with pytest.raises(ValueError):
            await Recorder.start(node, [], name="")
        with pytest.raises(TypeError):
            await Recorder.start("not a node", [])  # type: ignore[arg-type]


async def test_cancelled_start_kills_the_new_server() -> None:
    class SlowInit(Server):
        async def init(self, parent: Pid) -> None:
            send(parent, ("starting", self_pid()))
            await asyncio.Event().wait()

    async with Node("a") as node:
        starter = asyncio.create_task(SlowInit.start(node, self_pid()))
        tag, pid = await receive(T)
        assert tag == "starting"
        ref = monitor(pid)
        starter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await starter
        assert await expect_down(ref) == Down(ref, pid, "killed")


async def test_start_fails_if_the_server_is_killed_during_init() -> None:
    class SlowInit(Server):
        async def init(self, parent: Pid) -> None:
            send(parent, ("starting", self_pid()))
            await asyncio.Event().wait()

    async def start_and_report(parent: Pid) -> None:
        try:
            await SlowInit.start(node, parent)
        except NoProcess as exc:
            send(parent, ("start failed", str(exc)))

    async with Node("a") as node:
        node.spawn(start_and_report, self_pid())
        tag, pid = await receive(T)
        assert tag == "starting"
        exit(pid, "kill")
        tag, text = await receive(T)
        assert tag == "start failed" and "killed" in text
