"""Property: snapshot + events reproduce the registry, whatever processes do.

Random sequences of register / unregister / update / unregister_match / register_name /
unregister_name / process exits run against one registry while a subscriber watches
with `monitor_scope`. Applying the snapshot and then every event must give exactly the
registry's view (entries per key as a multiset: two entries of one pid with one value
are indistinguishable), and a per-key subscriber must agree on its key.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from types import ModuleType
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pgregistry.events import Join, Leave, Update
from pgregistry.node import Node
from pgregistry.registry import Registry

from .helpers import apply_event, drain, run_as, spawn_agent, stop_agent

KEYS = st.sampled_from(["a", "b", 1, 1.0, ("t", 1)])
VALUES = st.sampled_from([None, 0, 1, "x", (1, 2), {"n": 1}])
AGENTS = st.integers(min_value=0, max_value=2)

OPS = st.one_of(
    st.tuples(st.just("register"), AGENTS, KEYS, VALUES),
    st.tuples(st.just("register_name"), AGENTS, KEYS, VALUES),
    st.tuples(st.just("unregister"), AGENTS, KEYS),
    st.tuples(st.just("update"), AGENTS, KEYS, VALUES),
    st.tuples(st.just("unregister_match"), AGENTS, KEYS, VALUES),
    st.tuples(st.just("unregister_name"), KEYS),
    st.tuples(st.just("exit"), AGENTS, st.sampled_from(["stop", "crash"])),
)


def as_multisets(view: dict[Any, list[tuple[Any, Any]]]) -> dict[Any, Counter]:
    return {key: Counter(repr(e) for e in entries) for key, entries in view.items() if entries}


async def scenario(keys_mode: str, ops: list[tuple]) -> None:
    async with Node("model") as node:
        reg = await Registry.start(node, "reg", keys=keys_mode)
        agents = [spawn_agent(node) for _ in range(3)]
        await run_as(agents[0], lambda: reg.register("a", "seed"))
        ref, snapshot = reg.monitor_scope()
        key_ref, key_entries = reg.monitor("a")
        view = {k: list(v) for k, v in snapshot.items()}
        key_view = {"a": list(key_entries)} if key_entries else {}
        for op in ops:
            kind = op[0]
            if kind == "exit":
                await stop_agent(agents[op[1]], op[2])
                agents[op[1]] = spawn_agent(node)
            elif kind == "unregister_name":
                reg.unregister_name(op[1])
            elif kind == "register_name":
                reg.register_name(op[2], agents[op[1]], op[3])
            else:
                agent, key = agents[op[1]], op[2]
                action = {
                    "register": lambda: reg.register(key, op[3]),
                    "unregister": lambda: reg.unregister(key),
                    "update": lambda: reg.update_value(key, op[3]),
                    "unregister_match": lambda: reg.unregister_match(key, op[3]),
                }[kind]
                try:
                    await run_as(agent, action)
                except Exception as exc:  # only a unique collision may fail
                    assert keys_mode == "unique" and type(exc).__name__ == "AlreadyRegistered"
        for event in await drain():
            if isinstance(event, (Join, Leave, Update)):
                apply_event(view if event.ref == ref else key_view, event)
        truth = {key: reg.lookup(key) for key in reg.which_groups()}
        assert as_multisets(view) == as_multisets(truth)
        assert as_multisets(key_view) == as_multisets({"a": reg.lookup("a")})
        if keys_mode == "unique":
            assert all(len(entries) == 1 for entries in truth.values())
        assert reg.count() == sum(len(entries) for entries in truth.values())


# The fixture only selects the table implementation; it holds no per-example state.
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(keys_mode=st.sampled_from(["duplicate", "unique"]), ops=st.lists(OPS, max_size=40))
def test_snapshot_plus_events_equals_the_registry(registry_table: ModuleType, keys_mode: str,
                                                  ops: list[tuple]) -> None:
    asyncio.run(asyncio.wait_for(scenario(keys_mode, ops), 30))
