"""Registry behaviour on one node: the PgRegistry semantics, with the differences docs/contract.md lists."""

from __future__ import annotations

import math
import threading
from typing import Any

import pytest

from pgregistry.errors import AlreadyRegistered, AlreadyStarted, NoProcess, NotLocal
from pgregistry.events import Join, Leave, Registered, Unregistered, Update
from pgregistry.node import Node
from pgregistry.process import self as self_pid
from pgregistry.process import send
from pgregistry.registry import Registry
from pgregistry.server import Server, call, cast
from pgregistry.spec import BINDINGS, V1, V2, V3, WHOLE, _, is_int, is_str, var
from pgregistry.terms import Pid, same_term

from .helpers import drain, run_as, spawn_agent, started_registry, stop_agent

V4, V5 = var(4), var(5)

pytestmark = pytest.mark.usefixtures("registry_table")


# -- starting ---------------------------------------------------------------------------

async def test_start_defaults_to_duplicate_and_validates_options() -> None:
    async with Node("n") as node:
        reg = await Registry.start(node, "r")
        assert reg.keys_mode == "duplicate"
        with pytest.raises(ValueError, match="keys"):
            await Registry.start(node, "r2", keys="dup")
        with pytest.raises(ValueError, match="partitions=4"):
            await Registry.start(node, "r2", partitions=4)
        for bad in (0, -1, 1.0, True, "1"):
            with pytest.raises(ValueError, match="partitions"):
                await Registry.start(node, "r2", partitions=bad)
        with pytest.raises(TypeError):
            await Registry.start(node, "r2", meta={})  # type: ignore[call-arg]
        with pytest.raises(ValueError, match="listeners"):
            await Registry.start(node, "r2", listeners="audit")
        with pytest.raises(AlreadyStarted):
            await Registry.start(node, "r")
        assert node.service("r2") is None  # nothing half-started by the failures


async def test_same_scope_name_on_two_nodes_is_two_scopes() -> None:
    async with Node("a") as a, Node("b") as b:
        ra = await Registry.start(a, "r")
        rb = await Registry.start(b, "r")
        assert ra is not rb and ra.count() == rb.count() == 0


# -- register / unregister ---------------------------------------------------------------

async def test_register_returns_caller_and_lookup_keeps_insertion_order() -> None:
    async with started_registry() as (node, reg):
        me = self_pid()
        other = spawn_agent(node)
        assert reg.register("k", 1) == me
        await run_as(other, lambda: reg.register("k", 2))
        reg.register("k", 3)
        assert reg.lookup("k") == [(me, 1), (other, 2), (me, 3)]
        assert reg.lookup("missing") == []
        assert reg.count() == 3
        assert reg.values("k", me) == [1, 3]
        assert reg.keys(me) == ["k"]
        assert sorted(reg.which_groups()) == ["k"]


async def test_unregister_removes_most_recent_entry_only() -> None:
    async with started_registry() as (node, reg):
        me = self_pid()
        ref, _snapshot = reg.monitor_scope()
        reg.register("g", "first")
        reg.register("other", 0)
        reg.register("g", "second")
        await drain()
        reg.unregister("g")
        assert reg.lookup("g") == [(me, "first")]
        assert await drain() == [Leave(ref, "g", [(me, "second")])]
        reg.unregister("g")
        reg.unregister("g")  # nothing left: no error, no event
        assert reg.lookup("g") == []
        assert await drain() == [Leave(ref, "g", [(me, "first")])]


async def test_unique_mode_is_per_node_and_frees_on_exit() -> None:
    async with started_registry(keys="unique") as (node, reg):
        me = self_pid()
        reg.register("k", 1)
        with pytest.raises(AlreadyRegistered) as info:
            reg.register("k", 2)
        assert info.value.holder == me
        agent = spawn_agent(node)
        with pytest.raises(AlreadyRegistered):
            await run_as(agent, lambda: reg.register("k", 3))
        reg.unregister("k")
        assert await run_as(agent, lambda: reg.register("k", 3)) == agent
        await stop_agent(agent)
        assert reg.lookup("k") == []
        assert reg.register("k", 4) == me


async def test_register_name_any_local_pid() -> None:
    async with started_registry() as (node, reg):
        agent = spawn_agent(node)
        assert reg.register_name("k", agent, "v") is True
        assert reg.register_name("k", agent, "v") is True  # duplicate mode: a second entry
        assert reg.lookup("k") == [(agent, "v"), (agent, "v")]
        with pytest.raises(TypeError):
            reg.register_name("k", "not a pid")  # type: ignore[arg-type]
        with pytest.raises(NotLocal):
            reg.register_name("k", Pid("elsewhere@h:1", 1, 1))
        await stop_agent(agent)
        with pytest.raises(NoProcess):
            reg.register_name("k", agent)
        assert reg.lookup("k") == []


async def test_register_name_unique_collision_returns_false() -> None:
    async with started_registry(keys="unique") as (node, reg):
        agent = spawn_agent(node)
        assert reg.register_name("k", agent) is True
        assert reg.register_name("k", agent) is False
        assert reg.register_name("k", self_pid()) is False
        assert reg.whereis_name("k") == agent


async def test_unregister_name_removes_every_local_entry_with_one_leave() -> None:
    async with started_registry(listeners=("audit",)) as (node, reg):
        me = self_pid()
        node.register_name("audit", me)
        agent = spawn_agent(node)
        ref, _initial = reg.monitor("k")
        reg.register("k", 1)
        await run_as(agent, lambda: reg.register("k", 2))
        reg.register("other", 3)
        await drain()
        reg.unregister_name("k")
        assert reg.lookup("k") == []
        assert reg.lookup("other") == [(me, 3)]
        assert await drain() == [
            Leave(ref, "k", [(me, 1), (agent, 2)]),
            Unregistered("reg", "k", me),
            Unregistered("reg", "k", agent),
        ]
        reg.unregister_name("k")  # nothing there: no events
        assert await drain() == []


# -- via-style reads ---------------------------------------------------------------------

async def test_whereis_and_send_need_unique_mode() -> None:
    async with started_registry() as (node, reg):
        reg.register("k")
        with pytest.raises(ValueError, match="unique"):
            reg.whereis_name("k")
        with pytest.raises(ValueError, match="unique"):
            reg.send("k", "hi")


async def test_whereis_and_send_in_unique_mode() -> None:
    async with started_registry(keys="unique") as (node, reg):
        me = self_pid()
        assert reg.whereis_name("k") is None
        with pytest.raises(NoProcess):
            reg.send("k", "hi")
        reg.register("k")
        assert reg.whereis_name("k") == me
        assert reg.send("k", "hi") == me
        assert await drain() == ["hi"]


# -- update_value ------------------------------------------------------------------------

async def test_update_value_moves_entries_to_the_end_and_notifies_subscribers_only() -> None:
    async with started_registry(listeners=("audit",)) as (node, reg):
        me = self_pid()
        node.register_name("audit", me)
        agent = spawn_agent(node)
        reg.register("k", "a")
        reg.register("k", "b")
        await run_as(agent, lambda: reg.register("k", "w"))
        ref, _initial = reg.monitor_scope()
        await drain()
        assert reg.update_value("k", "z") is True
        assert reg.lookup("k") == [(agent, "w"), (me, "z"), (me, "z")]
        assert await drain() == [Update(ref, "k", [(me, "a", "z"), (me, "b", "z")])]
        assert reg.update_value("nothing", 1) is False
        assert await drain() == []
        assert reg.update_value("k", "q", pid=agent) is True
        assert reg.lookup("k") == [(me, "z"), (me, "z"), (agent, "q")]
        with pytest.raises(NotLocal):
            reg.update_value("k", 1, pid=Pid("elsewhere@h:1", 1, 1))
        with pytest.raises(TypeError):
            reg.update_value("k", 1, pid="x")  # type: ignore[arg-type]


# -- match / select -----------------------------------------------------------------------

async def test_match_examples() -> None:
    async with started_registry() as (node, reg):
        me = self_pid()
        v1, v2 = (1, "atom", 1), (2, "atom", 2)
        reg.register("hello", v1)
        reg.register("hello", v2)
        assert reg.match("hello", (1, _, _)) == [(me, v1)]
        assert reg.match("hello", (2, _, _)) == [(me, v2)]
        assert reg.match("hello", (_, "atom", _)) == [(me, v1), (me, v2)]
        assert reg.match("hello", (V1, _, V1)) == [(me, v1), (me, v2)]
        assert reg.match("hello", (_, _, V1), [V1 > 1]) == [(me, v2)]
        assert reg.match("hello", (_, V1, _), [is_str(V1)]) == [(me, v1), (me, v2)]
        assert reg.match("hello", (V1, _, _), [V1 < 2]) == [(me, v1)]
        assert reg.match("hello", (V1, _, _), [V1 > 3]) == []
        assert reg.match("hello", _) == [(me, v1), (me, v2)]
        assert reg.match("hello", [1, _, _]) == []  # a list pattern never matches a tuple
        assert reg.count_match("hello", (_, "atom", _)) == 2
        assert reg.count_match("hello", (_, _, V1), [V1 > 1]) == 1
        assert reg.match(_KEY_NOT_WILDCARD, _) == []


_KEY_NOT_WILDCARD = ("_",)


async def test_match_dicts_and_guards_that_raise() -> None:
    async with started_registry() as (node, reg):
        me = self_pid()
        for n in (1, 5, 10):
            reg.register("worker", {"n": n, "role": "primary" if n == 1 else "replica"})
        reg.register("worker", {"role": "x"})
        assert [v["n"] for _p, v in reg.match("worker", {"n": V1}, [V1 > 3])] == [5, 10]
        assert reg.match("worker", {"role": "primary"}) == [(me, {"n": 1, "role": "primary"})]
        # "x" > 3 raises TypeError inside the guard: the guard is false, nothing raises
        assert reg.count_match("worker", {"role": V1}, [V1 > 3]) == 0
        assert reg.count_match("worker", {"n": V1}, [is_int(V1)]) == 3


async def test_unregister_match_removes_only_callers_matching_entries() -> None:
    async with started_registry(listeners=("audit",)) as (node, reg):
        me = self_pid()
        node.register_name("audit", me)
        agent = spawn_agent(node)
        ref, _initial = reg.monitor("hello")
        v1, v2 = (1, "atom", 1), (2, "atom", 2)
        reg.register("hello", v1)
        reg.register("hello", v2)
        await run_as(agent, lambda: reg.register("hello", v1))
        await drain()
        # V1 in the pattern works (the upstream S2 bug is fixed)
        assert reg.unregister_match("hello", (V1, _, _), [V1 < 2]) == 1
        assert reg.lookup("hello") == [(me, v2), (agent, v1)]
        assert await drain() == [Leave(ref, "hello", [(me, v1)]), Unregistered("reg", "hello", me)]
        assert reg.unregister_match("hello", (2.5, _, _)) == 0
        assert await drain() == []
        assert reg.unregister_match("hello", _) == 1
        assert reg.lookup("hello") == [(agent, v1)]


async def test_select_examples() -> None:
    async with started_registry() as (node, reg):
        me = self_pid()
        value = (1, "atom", 1)
        reg.register("hello", value)
        assert reg.select([(("hello", V2, V3), [], [("hello", V2, V3)])]) == [("hello", me, value)]
        assert reg.select([((V1, me, V3), [], [(V1, me, V3)])]) == [("hello", me, value)]
        assert reg.select([(("world", V2, V3), [], [(V2, V3)])]) == []
        assert reg.select([((V1, V2, (1.5, _, _)), [], [WHOLE])]) == []
        assert reg.select([((V1, V2, (V3, "atom", V4)), [], [(V1, V2, (V3, "atom", V4))])]) == [
            ("hello", me, value)]
        assert reg.select([((V1, _, _), [], [WHOLE])]) == [("hello", me, value)]
        assert reg.select([((V1, V2, V3), [], [BINDINGS])]) == [["hello", me, value]]
        reg.register("world", {"a": "a", "b": "b"})
        assert reg.select([(("world", me, {"b": "b"}), [], ["match"])]) == ["match"]
        assert sorted(reg.select([((V1, _, _), [], [V1])])) == ["hello", "world"]
        two_clauses = [(("hello", _, _), [], [WHOLE[0]]), (("world", _, _), [], [WHOLE[0]])]
        assert sorted(reg.select(two_clauses)) == ["hello", "world"]
        assert reg.count_select([((_, _, value), [], [True])]) == 1
        assert reg.count_select([(("hello", _, None), [], [True])]) == 0
        assert reg.count_select([((_, _, _), [], [False])]) == 0
        assert reg.count_select([((_, _, _), [], [(1, 2)])]) == 0
        assert reg.count_select(two_clauses + [((_, _, _), [], [True])]) == 0
        assert reg.count_select([(("hello", _, _), [], [True]), (("world", _, _), [], [True])]) == 2



async def test_select_with_guards() -> None:
    async with started_registry() as (node, reg):
        me = self_pid()
        reg.register("hello", (1, "atom", 2))
        spec = [((V1, V2, (V3, V4, V5)), [V5 > 1], [(V1, V2, (V3, V4, V5))])]
        assert reg.select(spec) == [("hello", me, (1, "atom", 2))]
        assert reg.select([((_, _, (_, _, V1)), [V1 > 2], [WHOLE])]) == []
        assert reg.select([((V1, _, (_, V2, _)), [is_str(V2)], [V1])]) == ["hello"]
        reg.register("a", {"important": True})
        assert reg.select([((_, _, {"important": V1}), [V1 == True], [WHOLE])]) == [  # noqa: E712
            ("a", me, {"important": True})]



async def test_invalid_specs_raise_value_error_and_change_nothing() -> None:
    async with started_registry() as (node, reg):
        reg.register("k", 1)
        before = reg.select([((V1, V2, V3), [], [WHOLE])])
        for bad in (
            [((V1, _), [], [V1])],
            [(V1, [], [V1])],
            [((V1, _, _), [], [V2])],
            [((V1, _, _), [V2 > 1], [V1])],
            [((V1, _, _), [], [])],
            [((V1, _, _), [])],
            "not a spec",
        ):
            with pytest.raises(ValueError):
                reg.select(bad)
            with pytest.raises(ValueError):
                reg.count_select(bad)
        with pytest.raises(ValueError):
            reg.match("k", (V1, _), [V2 > 1])
        with pytest.raises(ValueError):
            reg.unregister_match("k", V1, [V2 > 1])
        assert reg.select([((V1, V2, V3), [], [WHOLE])]) == before


async def test_specs_that_differ_only_in_the_sign_of_a_zero_give_their_own_results() -> None:
    # 0.0 == -0.0, yet a body returning one is not a body returning the other (compiled
    # specs are cached by what they mean).
    async with started_registry() as (node, reg):
        reg.register("k", 1)
        for body in ([0.0], [-0.0], [(0.0, V1)], [(-0.0, V1)], [{"z": -0.0}], [{"z": 0.0}]):
            [result] = reg.select([(("k", _, V1), [], body)])
            assert same_term(result, body[0] if type(body[0]) is not tuple else (body[0][0], 1)), (body, result)
        assert [math.copysign(1, x) for x in (reg.select([(("k", _, _), [], [z])])[0] for z in (0.0, -0.0))] == [1, -1]


# -- dispatch / meta -----------------------------------------------------------------------

async def test_dispatch_passes_one_pid_per_entry() -> None:
    async with started_registry() as (node, reg):
        me = self_pid()
        agent = spawn_agent(node)
        reg.register("k", 1)
        reg.register("k", 2)
        await run_as(agent, lambda: reg.register("k", 3))
        calls = []
        reg.dispatch("k", calls.append)
        assert calls == [[me, me, agent]]
        reg.dispatch("empty", calls.append)
        assert calls == [[me, me, agent]]
        with pytest.raises(TypeError):
            reg.dispatch("k", "not callable")  # type: ignore[arg-type]

        def boom(_pids: list) -> None:
            raise KeyError("from the callback")

        with pytest.raises(KeyError):
            reg.dispatch("k", boom)


async def test_meta_is_node_local_key_value() -> None:
    async with started_registry() as (node, reg):
        with pytest.raises(KeyError):
            reg.meta("custom")
        assert reg.meta("custom", None) is None
        reg.put_meta("custom", {"a": 1})
        reg.put_meta(("tuple", 1), "v")
        assert reg.meta("custom") == {"a": 1}
        assert reg.meta(("tuple", 1)) == "v"
        reg.delete_meta("custom")
        reg.delete_meta("never there")
        with pytest.raises(KeyError):
            reg.meta("custom")
        with pytest.raises(TypeError):
            reg.put_meta([1], "unhashable")


# -- subscriptions ---------------------------------------------------------------------------

async def test_monitor_scope_snapshot_then_events() -> None:
    async with started_registry() as (node, reg):
        me = self_pid()
        agent = spawn_agent(node)
        reg.register("a", 1)
        await run_as(agent, lambda: reg.register("a", 2))
        ref, snapshot = reg.monitor_scope()
        assert snapshot == {"a": [(me, 1), (agent, 2)]}
        await run_as(agent, lambda: reg.register("b", 3))
        reg.update_value("a", 9)
        await run_as(agent, lambda: reg.unregister("a"))
        assert await drain() == [
            Join(ref, "b", [(agent, 3)]),
            Update(ref, "a", [(me, 1, 9)]),
            Leave(ref, "a", [(agent, 2)]),
        ]


async def test_monitor_key_only_sees_that_key_and_each_subscription_gets_a_copy() -> None:
    async with started_registry() as (node, reg):
        me = self_pid()
        scope_ref, _initial = reg.monitor_scope()
        key_ref, entries = reg.monitor("k")
        assert entries == []
        reg.register("other", 0)
        reg.register("k", 1)
        assert await drain() == [
            Join(scope_ref, "other", [(me, 0)]),
            Join(scope_ref, "k", [(me, 1)]),
            Join(key_ref, "k", [(me, 1)]),
        ]


async def test_demonitor_flushes_pending_events() -> None:
    async with started_registry() as (node, reg):
        ref, _initial = reg.monitor_scope()
        reg.register("k", 1)
        reg.update_value("k", 2)
        reg.unregister("k")
        reg.register("kept", 0)
        keep_ref, _initial = reg.monitor("k2")
        reg.register("k2", 0)
        assert reg.demonitor(ref) is True
        assert reg.demonitor(ref) is False
        assert reg.demonitor("not a ref") is False  # type: ignore[arg-type]
        assert await drain() == [Join(keep_ref, "k2", [(self_pid(), 0)])]
        reg.register("k", 1)
        assert await drain() == []


async def test_dead_subscriber_is_dropped() -> None:
    async with started_registry() as (node, reg):
        agent = spawn_agent(node)
        await run_as(agent, lambda: reg.monitor_scope())
        await stop_agent(agent)
        reg.register("k", 1)  # delivering to the dead subscriber would fail; it is gone
        assert reg.lookup("k") == [(self_pid(), 1)]


# -- listeners ----------------------------------------------------------------------------

async def test_listeners_get_one_message_per_entry_and_missing_ones_are_skipped() -> None:
    async with started_registry(listeners=("audit", "absent")) as (node, reg):
        me = self_pid()
        node.register_name("audit", me)
        agent = spawn_agent(node)
        await run_as(agent, lambda: (reg.register("k", 1), reg.register("k", 2), reg.register("j", 3)))
        assert await drain() == [
            Registered("reg", "k", agent, 1),
            Registered("reg", "k", agent, 2),
            Registered("reg", "j", agent, 3),
        ]
        await run_as(agent, lambda: reg.update_value("k", 5))
        assert await drain() == []  # listeners never see updates
        await stop_agent(agent, "crash")
        assert await drain() == [
            Unregistered("reg", "k", agent),
            Unregistered("reg", "k", agent),
            Unregistered("reg", "j", agent),
        ]


# -- process exit ---------------------------------------------------------------------------

@pytest.mark.parametrize("how", ["stop", "crash", "kill"])
async def test_exit_removes_every_entry_with_one_leave_per_key(how: str) -> None:
    async with started_registry() as (node, reg):
        agent = spawn_agent(node)
        me = self_pid()
        reg.register("a", "mine")
        await run_as(agent, lambda: [reg.register(k, v) for k, v in
                                     (("a", 1), ("b", 2), ("a", 3), ("c", 4))])
        ref, _initial = reg.monitor_scope()
        reason = await stop_agent(agent, how)
        assert reason == {"stop": "normal", "kill": "killed"}.get(how, reason)
        events = [e for e in await drain() if isinstance(e, Leave)]
        assert events == [Leave(ref, "a", [(agent, 1), (agent, 3)]),
                          Leave(ref, "b", [(agent, 2)]),
                          Leave(ref, "c", [(agent, 4)])]
        assert reg.keys(agent) == []
        assert reg.lookup("a") == [(me, "mine")]
        assert sorted(reg.which_groups()) == ["a"]
        assert reg.count() == 1


async def test_exit_of_a_process_with_many_entries() -> None:
    async with started_registry() as (node, reg):
        agent = spawn_agent(node)
        await run_as(agent, lambda: [reg.register(i % 100, i) for i in range(5000)])
        assert reg.count() == 5000
        await stop_agent(agent)
        assert reg.count() == 0 and reg.which_groups() == []


# -- bad input -----------------------------------------------------------------------------

async def test_bad_keys_and_values_raise_type_error_and_change_nothing() -> None:
    async with started_registry() as (node, reg):
        reg.register("k", 1)
        before = reg.select([((V1, V2, V3), [], [WHOLE])])
        for key in ([1], {"a": 1}, {1}, object(), _, V1, WHOLE, ("ok", [1])):
            with pytest.raises(TypeError):
                reg.register(key, 1)
            with pytest.raises(TypeError):
                reg.lookup(key)
            with pytest.raises(TypeError):
                reg.match(key, _)
            with pytest.raises(TypeError):
                reg.register_name(key, self_pid())
        for value in (object(), {1.5: 1}, {"a": {2}}, lambda: 1, V1):
            with pytest.raises(TypeError):
                reg.register("k", value)
            with pytest.raises(TypeError):
                reg.update_value("k", value)
        assert reg.select([((V1, V2, V3), [], [WHOLE])]) == before


NAN = float("nan")


@pytest.mark.parametrize("keys", ["duplicate", "unique"])
async def test_nan_keys_are_refused_by_every_call_that_takes_a_key(keys: str) -> None:
    # A NaN is not equal to itself: an entry under a NaN key could never be found,
    # unregistered or removed on a peer (which decodes a new NaN object).
    async with started_registry(keys=keys) as (node, reg):
        me = self_pid()
        reg.register("k", 1)
        reg.put_meta("m", 1)
        before = reg.select([((V1, V2, V3), [], [WHOLE])])
        for key in (NAN, (1, NAN), ("a", (float("nan"),))):
            calls: list[Any] = [
                lambda: reg.register(key, 1), lambda: reg.register_name(key, me), lambda: reg.unregister(key),
                lambda: reg.unregister_name(key), lambda: reg.update_value(key, 2),
                lambda: reg.update_value(key, 2, me), lambda: reg.unregister_match(key, _),
                lambda: reg.lookup(key), lambda: reg.lookup_local(key), lambda: reg.values(key, me),
                lambda: reg.match(key, _), lambda: reg.count_match(key, _), lambda: reg.dispatch(key, print),
                lambda: reg.monitor(key), lambda: reg.put_meta(key, 1), lambda: reg.meta(key, None),
                lambda: reg.delete_meta(key), lambda: reg.via(key),
                lambda: reg.select([((key, _, _), [], [WHOLE])]),
                lambda: reg.count_select([((key, V1, _), [], [True])]),
                lambda: reg.select([(((V1, key), _, _), [], [WHOLE])]),
            ]
            if keys == "unique":
                calls += [lambda: reg.whereis_name(key), lambda: reg.send(key, "msg")]
            for call_with_key in calls:
                with pytest.raises(ValueError, match="not equal to itself"):
                    call_with_key()
        assert reg.select([((V1, V2, V3), [], [WHOLE])]) == before
        assert reg.meta("m") == 1
        assert await drain() == []  # no monitor was set up, nothing was sent


async def test_values_may_hold_nan() -> None:
    async with started_registry() as (node, reg):
        me = self_pid()
        value = {"load": NAN, "history": [1.0, NAN, (NAN,)]}
        reg.register("k", value)
        assert reg.lookup("k") == [(me, value)]
        assert reg.update_value("k", [NAN]) is True
        [(pid, got)] = reg.lookup("k")
        assert pid == me and type(got) is list and math.isnan(got[0])
        assert reg.count_match("k", [V1], [V1 != V1]) == 1  # how to find a NaN: it differs from itself
        reg.unregister("k")
        assert reg.lookup("k") == [] and reg.count() == 0


async def test_a_nan_in_a_match_pattern_is_refused() -> None:
    # A literal NaN would match only the very float object it is: a local entry
    # registered with math.nan, never a peer's decoded copy of it.
    async with started_registry() as (node, reg):
        reg.register("k", math.nan)
        reg.register("k", [math.nan])
        for call_with_pattern in (
            lambda: reg.match("k", math.nan), lambda: reg.count_match("k", [math.nan]),
            lambda: reg.unregister_match("k", {"x": (V1, math.nan)}),
            lambda: reg.select([((_, _, math.nan), [], [WHOLE])]),
            lambda: reg.count_select([((_, V1, [math.nan]), [], [True])]),
        ):
            with pytest.raises(ValueError, match="NaN cannot be matched.*V1 != V1"):
                call_with_pattern()
        assert reg.count() == 2
        assert reg.select([(("k", _, V1), [V1 != V1], [True])]) == [True]


BIG = 10**10000  # beyond Python's int-to-str limit (4300 digits)


async def test_errors_about_huge_int_keys_have_short_messages() -> None:
    async with started_registry(keys="unique") as (node, reg):
        me = self_pid()
        assert reg.register(BIG, BIG) == me
        assert reg.lookup(BIG) == [(me, BIG)]
        with pytest.raises(AlreadyRegistered) as taken:
            reg.register(BIG)
        assert taken.value.key == BIG and taken.value.holder == me
        with pytest.raises(NoProcess) as missing:
            reg.send(BIG + 1, "msg")
        with pytest.raises(NoProcess) as missing_via:
            send(reg.via(BIG + 1), "msg")
        with pytest.raises(TypeError) as not_a_key:
            reg.register([BIG])
        with pytest.raises(TypeError) as not_a_value:
            reg.register("k", {"x": {(BIG,): 1}})  # dict keys are str or int
        with pytest.raises(ValueError) as nan_key:
            reg.register((BIG, NAN))
        await Counter.start(node, 0, name=reg.via((BIG, "counter")))
        with pytest.raises(AlreadyStarted) as started:
            await Counter.start(node, 0, name=reg.via((BIG, "counter")))
        for exc in (taken, missing, missing_via, not_a_key, not_a_value, nan_key, started):
            message = str(exc.value)
            assert len(message) < 400, message
            assert "int of 33220 bits" in message, message


async def test_writes_from_another_thread_raise_and_reads_work() -> None:
    async with started_registry() as (node, reg):
        reg.register("k", 1)
        outcome: dict[str, object] = {}

        def other_thread() -> None:
            try:
                reg.register_name("k", self_pid_value, 2)
            except RuntimeError as exc:
                outcome["write"] = exc
            try:
                reg.put_meta("m", 1)
            except RuntimeError as exc:
                outcome["meta"] = exc
            outcome["read"] = reg.lookup("k")

        self_pid_value = self_pid()
        thread = threading.Thread(target=other_thread)
        thread.start()
        thread.join(10)
        assert isinstance(outcome["write"], RuntimeError)
        assert isinstance(outcome["meta"], RuntimeError)
        assert outcome["read"] == [(self_pid_value, 1)]
        assert reg.lookup("k") == [(self_pid_value, 1)]


async def test_send_from_another_thread_raises() -> None:
    async with started_registry(keys="unique") as (node, reg):
        reg.register("k", 1)
        outcome: dict[str, object] = {}

        def other_thread() -> None:
            try:
                reg.send("k", "hello")
            except RuntimeError as exc:
                outcome["send"] = exc

        thread = threading.Thread(target=other_thread)
        thread.start()
        thread.join(10)
        assert isinstance(outcome["send"], RuntimeError) and "loop thread" in str(outcome["send"])
        assert reg.send("k", "hello") == self_pid()  # on the loop thread it works


async def test_a_task_that_is_no_process_cannot_register() -> None:
    import asyncio

    async with started_registry() as (node, reg):
        async def plain_task() -> None:
            reg.register("k")

        with pytest.raises(RuntimeError, match="spawn"):
            await asyncio.create_task(plain_task())


async def test_registry_of_another_node_refuses_the_caller() -> None:
    async with Node("a") as a:
        ra = await Registry.start(a, "r")
        async with Node("b") as b:
            await Registry.start(b, "r")
            with pytest.raises(NotLocal):
                ra.register("k")  # this task is now a process of b
            assert ra.count() == 0


async def test_stopped_registry_refuses_writes() -> None:
    async with started_registry() as (node, reg):
        reg.register("k")
        await reg.stop()
        with pytest.raises(RuntimeError, match="stopped"):
            reg.register("k")
        assert node.service("reg") is None
        reg2 = await Registry.start(node, "reg")
        assert reg2.lookup("k") == []


async def test_sync_without_peers_returns_and_validates_timeout() -> None:
    async with started_registry() as (node, reg):
        await reg.sync()
        with pytest.raises(ValueError):
            await reg.sync(timeout=-1)


# -- via names -------------------------------------------------------------------------------

class Counter(Server):
    async def init(self, start: int) -> None:
        self.n = start

    async def handle_call(self, request: Any, caller: Pid) -> Any:
        if request == "get":
            return self.n
        self.n += request
        return self.n

    async def handle_cast(self, msg: Any) -> None:
        self.n += msg


async def test_server_started_with_a_via_name() -> None:
    async with started_registry(keys="unique") as (node, reg):
        pid = await Counter.start(node, 10, name=reg.via("counter", {"kind": "counter"}))
        assert reg.lookup("counter") == [(pid, {"kind": "counter"})]
        assert reg.whereis_name("counter") == pid
        assert await call(reg.via("counter"), 5) == 15
        cast(reg.via("counter"), 1)
        send(reg.via("counter"), "an info message")
        assert await call(reg.via("counter"), "get") == 16
        with pytest.raises(AlreadyStarted) as info:
            await Counter.start(node, 0, name=reg.via("counter"))
        assert info.value.pid == pid
        await stop_agent(pid, "kill")
        assert reg.lookup("counter") == []
        with pytest.raises(NoProcess):
            await call(reg.via("counter"), "get")
        with pytest.raises(NoProcess):
            send(reg.via("counter"), "lost")


async def test_via_in_a_duplicate_registry_registers_but_cannot_resolve() -> None:
    async with started_registry() as (node, reg):
        with pytest.raises(ValueError, match="unique"):
            await Counter.start(node, 0, name=reg.via("counter"))
        assert reg.register_name("counter", self_pid()) is True
        with pytest.raises(ValueError, match="unique"):
            await call(reg.via("counter"), "get")


async def test_via_names_validate_their_key() -> None:
    async with started_registry(keys="unique") as (node, reg):
        with pytest.raises(TypeError):
            reg.via([1])
        with pytest.raises(TypeError):
            reg.via("k", object())


async def test_lookup_of_an_unhashable_key_names_the_rule_it_breaks() -> None:
    async with Node("a") as node:
        reg = await Registry.start(node, "r")
        for key in ([1], {"a": 1}, _):
            with pytest.raises(TypeError, match="is not a key term"):
                reg.lookup(key)
