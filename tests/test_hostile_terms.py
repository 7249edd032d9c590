"""Arbitrary terms, valid and not, driven through a two-node cluster.

`HostileTermsMachine` is a hypothesis state machine over two nodes connected over
loopback TCP. Its rules register, unregister and update with keys and values drawn
from everything a careless or hostile caller could pass: NaN (alone and nested), values
at and past the depth limit, ints far past 64 bits and past Python's int-to-str limit,
non-terms (objects, sets, dicts with bad keys), and values mutated after they were
registered. After every step both nodes' tables must equal a model of what each should
hold, and the connection between them must still be up. A reconnect rule makes the
nodes exchange whole sync rounds, so mutated values go through a round too.

The model: every accepted entry is held by its node as registered (mutations show
there, the table keeps the object); the other node holds it as last replicated.
A call the model calls invalid must raise `TypeError` or `ValueError` and change
nothing.
"""

from __future__ import annotations

import asyncio
import math
from collections import Counter
from typing import Any

from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from pgregistry.errors import NotReplicated
from pgregistry.node import Node
from pgregistry.registry import Registry
from pgregistry.spec import V1, V2, V3
from pgregistry.terms import MAX_TERM_DEPTH, Pid, is_key, is_value, short_repr

from .helpers import eventually, run_as, spawn_agent, stop_agent

COOKIE = "hostile-terms"
NODES = ("a", "b")
AGENTS = 2
WAIT = 5.0
BIG = 2**200


class Huge:
    """Stands for ±10**5000 (past the int-to-str limit) in what hypothesis draws and prints.

    Hypothesis reprs the arguments of every step; an int that large has no repr. The
    rules swap each `Huge` for the real int (`materialize`) before using it.
    """

    def __init__(self, sign: int) -> None:
        self.sign = sign

    def __repr__(self) -> str:
        return f"{'-' if self.sign < 0 else ''}10**5000"


HUGE = Huge(1)


def materialize(x: Any) -> Any:
    t = type(x)
    if t is Huge:
        return x.sign * 10**5000
    if t is tuple or t is list:
        return t(materialize(item) for item in x)
    if t is dict:
        return {k: materialize(v) for k, v in x.items()}
    return x

NAN = float("nan")


def nested(levels: int, leaf: Any = 0) -> Any:
    for _ in range(levels):
        leaf = [leaf]
    return leaf


def nested_tuple(levels: int, leaf: Any = 0) -> Any:
    for _ in range(levels):
        leaf = (leaf,)
    return leaf


def holds_nan(x: Any) -> bool:
    if type(x) is float:
        return math.isnan(x)
    if type(x) is tuple or type(x) is list:
        return any(holds_nan(item) for item in x)
    if type(x) is dict:
        return any(holds_nan(item) for item in x.values())
    return False


# Keys: no two distinct keys here are equal (1, 1.0 and True would be one key, which
# the model's view by repr could not tell apart).
SCALAR_KEYS = st.one_of(
    st.sampled_from(["k", "", "ключ", b"\x00bytes", 0, 7, -(2**63), 2**64, BIG, HUGE, 0.5, -2.25, math.inf,
                     None]),
    st.text(max_size=4),
)
VALID_KEYS = st.one_of(
    SCALAR_KEYS,
    st.tuples(SCALAR_KEYS, SCALAR_KEYS),
    st.just(nested_tuple(MAX_TERM_DEPTH, "deep")),
)
INVALID_KEYS = st.sampled_from([
    NAN, (1, NAN), ("x", (NAN,)), [1], {"a": 1}, object(), {1, 2}, nested_tuple(MAX_TERM_DEPTH + 1),
    (1, [2]),
])
KEYS = st.one_of(VALID_KEYS, VALID_KEYS, INVALID_KEYS)

SCALAR_VALUES = st.one_of(
    st.sampled_from([None, True, False, 0, 1, 1.0, -0.0, NAN, math.inf, BIG, Huge(-1), "", "v", b"b"]),
    st.integers(), st.floats(allow_nan=True), st.text(max_size=4),
)
VALID_VALUES = st.one_of(
    SCALAR_VALUES,
    st.lists(SCALAR_VALUES, max_size=3),
    st.dictionaries(st.one_of(st.text(max_size=3), st.integers(-5, 5)), SCALAR_VALUES, max_size=3),
    st.tuples(SCALAR_VALUES, st.lists(SCALAR_VALUES, max_size=2)),
    st.builds(nested, st.sampled_from([MAX_TERM_DEPTH, MAX_TERM_DEPTH - 1]), SCALAR_VALUES),
)
INVALID_VALUES = st.sampled_from([
    object(), {1, 2}, {(1, 2): "tuple key"}, {1.5: "float key"}, nested(MAX_TERM_DEPTH + 1), [object()],
    {"ok": [1, {2, 3}]},
])
VALUES = st.one_of(VALID_VALUES, VALID_VALUES, INVALID_VALUES)

NODE = st.sampled_from(NODES)
AGENT = st.integers(0, AGENTS - 1)


class Entry:
    """One accepted registration: the value as its node holds it, and as the peer does."""

    __slots__ = ("key", "pid", "value", "remote")

    def __init__(self, key: Any, pid: Pid, value: Any) -> None:
        self.key = key
        self.pid = pid
        self.value = value  # the object the owner's table holds (mutations show)
        self.remote: Any = canon(value)  # the peer's copy (see `canon`); None: not held


def canon(x: Any) -> Any:
    """A hashable stand-in for a term that tells apart what `terms.same_term` tells apart.

    ``repr`` would not do: it fails on ints past the int-to-str limit, and NaN is not
    equal to itself. Non-terms (what a mutation put in a value) compare by identity.
    """
    t = type(x)
    if t is float:
        return ("float", "nan" if x != x else x.hex())
    if t is int:
        return ("int", hex(x))
    if t in (bool, str, bytes, type(None), Pid):
        return (t.__name__, x)
    if t is tuple or t is list:
        return (t.__name__, tuple(canon(item) for item in x))
    if t is dict:
        return ("dict", tuple(sorted(((canon(k), canon(v)) for k, v in x.items()), key=repr)))
    return ("object", id(x))


def row_view(reg: Registry) -> Counter:
    """Every row of a table, as ``(canon(key), pid, canon(value))``."""
    rows = reg.select([((V1, V2, V3), [], [(V1, V2, V3)])])
    return Counter((canon(key), pid, canon(value)) for key, pid, value in rows)


class HostileTermsMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.nodes: dict[str, Node] = {}
        self.regs: dict[str, Registry] = {}
        self.agents: dict[str, list[Pid]] = {}
        self.entries: list[Entry] = []  # in registration order
        self.poisoned: list[Entry] = []  # mutated into non-terms, not yet reported
        try:
            self.run(self.start())
        except BaseException:
            self.close()
            raise

    def run(self, coro: Any) -> Any:
        return self.loop.run_until_complete(asyncio.wait_for(coro, WAIT + 2))

    async def start(self) -> None:
        for name in NODES:
            node = Node(name, cookie=COOKIE, tick_interval=0.05, down_after=1.0)
            await node.start()
            self.nodes[name] = node
            self.regs[name] = await Registry.start(node, "r")
            self.agents[name] = [spawn_agent(node) for _ in range(AGENTS)]
        await self.nodes["b"].connect(self.nodes["a"].id)
        await self.wait_connected()

    async def wait_connected(self) -> None:
        a, b = self.nodes["a"], self.nodes["b"]
        await eventually(lambda: a.peers() == [b.id] and b.peers() == [a.id], WAIT, "a and b connected")

    def close(self) -> None:
        async def stop() -> None:
            for node in self.nodes.values():
                await node.stop()
        try:
            self.loop.run_until_complete(asyncio.wait_for(stop(), WAIT))
        finally:
            self.loop.close()

    def teardown(self) -> None:
        self.close()

    # -- helpers -------------------------------------------------------------------

    def node_of(self, pid: Pid) -> str:
        return next(name for name, node in self.nodes.items() if node.id == pid.node)

    def call(self, name: str, agent: int, fn: Any, valid: bool) -> Any:
        """Run `fn` as the agent; an invalid call must raise TypeError or ValueError."""
        pid = self.agents[name][agent]
        try:
            result = self.run(run_as(pid, fn))
        except (TypeError, ValueError) as exc:
            assert not valid, f"a valid call raised {exc!r}"
            return None
        assert valid, "an invalid call was accepted"
        return result

    # -- rules ---------------------------------------------------------------------

    @rule(name=NODE, agent=AGENT, key=KEYS, value=VALUES)
    def register(self, name: str, agent: int, key: Any, value: Any) -> None:
        key, value = materialize(key), materialize(value)
        valid = is_key(key) and not holds_nan(key) and is_value(value)
        reg = self.regs[name]
        self.call(name, agent, lambda: reg.register(key, value), valid)
        if valid:
            self.entries.append(Entry(key, self.agents[name][agent], value))

    @rule(name=NODE, agent=AGENT, key=KEYS)
    def unregister(self, name: str, agent: int, key: Any) -> None:
        key = materialize(key)
        valid = is_key(key) and not holds_nan(key)
        reg = self.regs[name]
        self.call(name, agent, lambda: reg.unregister(key), valid)
        if valid:
            pid = self.agents[name][agent]
            mine = [e for e in self.entries if e.pid == pid and e.key == key]
            if mine:
                self.entries.remove(mine[-1])
                if mine[-1] in self.poisoned:
                    self.poisoned.remove(mine[-1])

    @precondition(lambda self: self.entries)
    @rule(data=st.data(), value=VALUES)
    def update_value(self, data: st.DataObject, value: Any) -> None:
        value = materialize(value)
        entry = data.draw(st.sampled_from(self.entries))
        name = self.node_of(entry.pid)
        agent = self.agents[name].index(entry.pid)
        valid = is_value(value)
        reg = self.regs[name]
        key = entry.key
        self.call(name, agent, lambda: reg.update_value(key, value), valid)
        if valid:
            for e in self.entries:
                if e.pid == entry.pid and e.key == key:
                    e.value = value
                    e.remote = canon(value)
                    if e in self.poisoned:
                        self.poisoned.remove(e)

    @precondition(lambda self: any(type(e.value) in (list, dict) for e in self.entries))
    @rule(data=st.data(), how=st.sampled_from(["object", "deep", "set"]))
    def mutate(self, data: st.DataObject, how: str) -> None:
        """Mutate a registered value in place, as a careless caller would."""
        entry = data.draw(st.sampled_from([e for e in self.entries if type(e.value) in (list, dict)]))
        bad = {"object": object(), "deep": nested(MAX_TERM_DEPTH + 10), "set": {1, 2}}[how]
        if type(entry.value) is list:
            entry.value.append(bad)
        else:
            entry.value["mutated"] = bad
        # Every entry sharing this object is poisoned; the peer keeps what it was sent.
        for e in self.entries:
            if e.value is entry.value and e not in self.poisoned:
                self.poisoned.append(e)

    @rule(name=NODE, agent=AGENT)
    def exit(self, name: str, agent: int) -> None:
        pid = self.agents[name][agent]
        self.run(stop_agent(pid))
        self.entries = [e for e in self.entries if e.pid != pid]
        self.poisoned = [e for e in self.poisoned if e.pid != pid]
        self.agents[name][agent] = spawn_agent(self.nodes[name])

    @rule()
    def reconnect(self) -> None:
        """Cut the link and connect again: each side gets the other's whole sync round."""
        a, b = self.nodes["a"], self.nodes["b"]

        async def cycle() -> None:
            await a.disconnect(b.id)
            await eventually(lambda: not a.peers() and not b.peers(), WAIT, "a and b apart")
            await a.connect(b.id)
            await self.wait_connected()

        self.run(cycle())
        # Each node sent the other a whole round, its values as they are now: the
        # poisoned ones were left out, and the next sync names every one of them.
        for name, reg in self.regs.items():
            poisoned = {(canon(e.key), e.pid) for e in self.poisoned if self.node_of(e.pid) == name}
            try:
                self.run(reg.sync(WAIT))
                named: set[tuple[Any, Pid]] = set()
            except NotReplicated as exc:
                named = {(canon(key), pid) for key, pid, _why in exc.entries}
            assert named == poisoned, (name, named, poisoned)
        for e in self.poisoned:
            e.remote = None

    # -- checks --------------------------------------------------------------------

    def sync(self) -> None:
        """Both nodes' barriers. `NotReplicated` may name poisoned entries only.

        A sync round can start without a reconnect (an `update_value` of an entry a
        peer lacks starts one to heal it); whatever poisoned entry such a round left
        out, the peer no longer holds.
        """
        for name, reg in self.regs.items():
            try:
                self.run(reg.sync(WAIT))
            except NotReplicated as exc:
                named = {(canon(key), pid) for key, pid, _why in exc.entries}
                poisoned = {(canon(e.key), e.pid) for e in self.poisoned}
                assert named <= poisoned, f"{name} left out entries that are terms: {named - poisoned}"
                for e in self.poisoned:
                    if (canon(e.key), e.pid) in named:
                        e.remote = None

    @invariant()
    def tables_match_the_model_and_the_link_is_up(self) -> None:
        self.sync()
        a, b = self.nodes["a"], self.nodes["b"]
        assert a.peers() == [b.id] and b.peers() == [a.id], "the connection went down"
        for name in NODES:
            expected: Counter = Counter()
            for e in self.entries:
                own = self.node_of(e.pid) == name
                if own:
                    expected[(canon(e.key), e.pid, canon(e.value))] += 1
                elif e.remote is not None:
                    expected[(canon(e.key), e.pid, e.remote)] += 1
            actual = row_view(self.regs[name])
            assert actual == expected, (
                f"node {name}: missing {[short_repr(row, 300) for row in expected - actual]}, "
                f"unexpected {[short_repr(row, 300) for row in actual - expected]}")


HostileTermsMachine.TestCase.settings = settings(
    max_examples=60, stateful_step_count=30, deadline=None,
    phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.target],
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
TestHostileTerms = HostileTermsMachine.TestCase
