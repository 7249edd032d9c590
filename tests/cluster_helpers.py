"""A proxied cluster for convergence tests: nodes in one event loop, every link through a proxy.

`ProxiedCluster` starts one node per name, each with registry ``"r"`` (duplicate keys)
and a *watcher* process that subscribed with ``monitor_scope`` and keeps every event it
receives. A `pgregistry.testing.Partition` holds one `LinkProxy` per directed link, and
every node routes every peer through its own proxies (`Node.add_route`) *before* the
mesh is formed, so that dials, redials and ``members`` gossip all go through them and a
split stays split.

The checks compare views as multisets: ``{key: Counter(repr((pid, value)))}``; two
entries of one pid with one value are indistinguishable, and the order of entries under a
key is not compared (it depends on the order in which peers were heard from).
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from pgregistry.events import Join, Leave, Update
from pgregistry.node import Node
from pgregistry.registry import Registry
from pgregistry.terms import Pid, Ref
from pgregistry.testing import LinkMode, Partition

from .helpers import apply_event, eventually, run_as, spawn_agent

COOKIE = "cluster-convergence-tests"
SCOPE = "r"

View = dict[Any, Counter]


def multiset(entries: Iterable[tuple[Pid, Any]]) -> Counter:
    return Counter(repr(entry) for entry in entries)


def clean(view: dict[Any, Counter]) -> View:
    return {key: counter for key, counter in view.items() if +counter}


def merge(*views: View) -> View:
    out: dict[Any, Counter] = {}
    for view in views:
        for key, counter in view.items():
            out[key] = out.get(key, Counter()) + counter
    return clean(out)


def full_view(reg: Registry) -> View:
    """The node's cluster view: every key it knows, all entries."""
    return clean({key: multiset(reg.lookup(key)) for key in reg.which_groups()})


def local_view(reg: Registry) -> View:
    """The node's own processes' entries."""
    return clean({key: multiset(reg.lookup_local(key)) for key in reg.which_groups()})


def describe(view: View) -> str:
    return "{" + ", ".join(f"{key!r}: {sorted(c.elements())}" for key, c in sorted(view.items(), key=repr)) + "}"


@dataclass
class Member:
    """One node of the cluster, its registry, its watcher and its worker agents."""

    name: str
    node: Node
    reg: Registry
    watcher: Pid
    ref: Ref
    snapshot: dict[Any, list[tuple[Pid, Any]]]
    inbox: list[Any] = field(default_factory=list)
    agents: list[Pid] = field(default_factory=list)

    def events(self, start: int = 0) -> list[Any]:
        """The watcher's registry events (for its subscription), from inbox index `start`."""
        return [m for m in self.inbox[start:] if isinstance(m, (Join, Leave, Update)) and m.ref == self.ref]

    def replay(self) -> View:
        """Snapshot + every event so far, as a view."""
        view = {key: list(entries) for key, entries in self.snapshot.items()}
        for event in self.events():
            apply_event(view, event)
        return clean({key: multiset(entries) for key, entries in view.items()})


class ProxiedCluster:
    """Nodes named `names` in this loop, full mesh, every link through a proxy.

    Use ``async with ProxiedCluster(...) as cluster``. `mode` is the partition's severing
    mode (``"blackhole"``: silent, detected after ``down_after``; ``"cut"``: connections
    closed). `node_options` go to every `Node` (tick_interval, down_after, ...);
    `attributes` are set on every node before it starts (handshake_timeout,
    confirm_timeout, reconnect_initial, reconnect_max).
    """

    def __init__(self, names: Iterable[str] = ("A", "B", "C"), *, mode: LinkMode | str = "blackhole",
                 agents_per_node: int = 2, attributes: dict[str, float] | None = None,
                 **node_options: Any) -> None:
        self.names = list(names)
        self.mode = LinkMode(mode)
        self.agents_per_node = agents_per_node
        self.attributes = attributes or {}
        self.node_options = {"cookie": COOKIE, **node_options}
        self.members: dict[str, Member] = {}
        self.nodes: dict[str, Node] = {}
        self.partition: Partition | None = None

    async def __aenter__(self) -> ProxiedCluster:
        try:
            await self.start()
        except BaseException:
            await self.close()
            raise
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        await self.close()

    def __getitem__(self, name: str) -> Member:
        return self.members[name]

    async def start(self) -> None:
        for name in self.names:
            node = Node(name, **self.node_options)
            for attribute, value in self.attributes.items():
                setattr(node, attribute, value)
            self.nodes[name] = node
            await node.start()
        self.partition = Partition.for_targets(
            {name: f"{node.host}:{node.port}" for name, node in self.nodes.items()}, mode=self.mode)
        await self.partition.start()
        # Every node reaches every peer through its own proxy, before any connection.
        for src, node in self.nodes.items():
            for dst, peer in self.nodes.items():
                if src != dst:
                    node.add_route(peer.id, self.partition.address(src, dst))
        for name, node in self.nodes.items():
            reg = await Registry.start(node, SCOPE)
            inbox: list[Any] = []
            watcher = spawn_agent(node, inbox)
            ref, snapshot = await run_as(watcher, reg.monitor_scope)
            member = Member(name, node, reg, watcher, ref, snapshot, inbox)
            member.agents = [spawn_agent(node) for _ in range(self.agents_per_node)]
            self.members[name] = member
        first = self.nodes[self.names[0]]
        for name in self.names[1:]:
            await first.connect(self.nodes[name].id)  # by id: dialled through the route
        await self.wait_mesh()
        await self.sync_all()

    async def close(self) -> None:
        for node in self.nodes.values():
            await node.stop()
        if self.partition is not None:
            await self.partition.close()

    # -- conditions ------------------------------------------------------------------

    def groups_connected(self, groups: Iterable[Iterable[str]]) -> bool:
        """Every node is connected exactly to the other members of its group."""
        for group in groups:
            group = set(group)
            for name in group:
                want = {self.nodes[other].id for other in group if other != name}
                if set(self.nodes[name].peers()) != want:
                    return False
        return True

    async def wait_mesh(self, timeout: float = 10.0) -> None:
        await eventually(lambda: self.groups_connected([self.names]), timeout, "a full mesh through the proxies")

    async def sync_all(self, timeout: float = 5.0) -> None:
        for member in self.members.values():
            await member.reg.sync(timeout)

    def locals_of(self, names: Iterable[str]) -> View:
        return merge(*(local_view(self.members[name].reg) for name in names))

    def groups_see_their_own(self, groups: Iterable[Iterable[str]]) -> bool:
        """Every node's view is exactly the union of its group's local entries."""
        for group in groups:
            expected = self.locals_of(group)
            if any(full_view(self.members[name].reg) != expected for name in group):
                return False
        return True

    async def wait_split(self, groups: list[set[str]], timeout: float = 10.0) -> None:
        """Wait until the split is observed: links down between groups, views per group."""
        await eventually(lambda: self.groups_connected(groups) and self.groups_see_their_own(groups),
                         timeout, f"the split {groups} to be detected", self.report)

    async def flush_watchers(self) -> None:
        """Return once every watcher has taken every message delivered to it so far."""
        for member in self.members.values():
            await run_as(member.watcher, lambda: None)

    async def wait_converged(self, timeout: float = 15.0) -> None:
        """Wait for the full mesh and identical views, then check views and replays exactly."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        await self.wait_mesh(timeout)
        await self.sync_all(max(0.5, deadline - loop.time()))
        await eventually(lambda: self.groups_see_their_own([self.names]), max(0.5, deadline - loop.time()),
                         "every view to equal the union of the local entries", self.report)
        await self.sync_all(max(0.5, deadline - loop.time()))
        await self.flush_watchers()
        self.check_views([self.names])
        self.check_replays()

    def check_views(self, groups: Iterable[Iterable[str]]) -> None:
        for group in groups:
            expected = self.locals_of(group)
            for name in group:
                actual = full_view(self.members[name].reg)
                assert actual == expected, (
                    f"node {name}'s view differs from the union of {sorted(group)}'s local entries:\n"
                    f"  view:     {describe(actual)}\n  expected: {describe(expected)}\n{self.report()}")

    def check_replays(self) -> None:
        """Each watcher's snapshot + events gives exactly its node's view (call after a flush)."""
        for name, member in self.members.items():
            actual = full_view(member.reg)
            replayed = member.replay()
            assert replayed == actual, (
                f"node {name}: snapshot + events != view\n  replayed: {describe(replayed)}\n"
                f"  view:     {describe(actual)}\n  events: {member.events()}")

    def report(self) -> str:
        lines = []
        for name, member in self.members.items():
            lines.append(f"  {name} ({member.node.id}) peers={member.node.peers()}")
            lines.append(f"    view:  {describe(full_view(member.reg))}")
            lines.append(f"    local: {describe(local_view(member.reg))}")
        return "\n".join(lines)
