"""The ``pgregistry`` command: run a node, or watch a real cluster at work.

``pgregistry node --name N [--config FILE] [--host H] [--port P] [--advertise-host A]
[--cookie-file PATH | --cookie C] [--tls-cert FILE --tls-key FILE --tls-ca FILE]
[--scope S ...] [--keys unique|duplicate] [--connect ADDR ...] [--connect-timeout SECONDS]
[--names [SERVICE]] [--lease SECONDS] [--join ADDR] [--join-timeout SECONDS]
[--workers [SERVICE]] [--tick-interval T] [--down-after D] [--exit-with-stdin]
[--log-level L]`` runs one node in the foreground: it starts the registries named by
``--scope`` (duplicate keys unless ``--keys unique``), with ``--names`` a names service
(`pgregistry.names.Names`, default name ``"names"``, ``--lease`` default 3 s), with
``--workers`` a workers service (`pgregistry.workers.Workers`, default name ``"workers"``,
whose only function is the demo's session worker), connects to every ``--connect`` address
(``host:port`` or a node id; one member is enough to join a whole cluster; trying again
while nothing answers there, up to ``--connect-timeout``, default 30 s), joins the names
cluster of ``--join`` (trying again while nothing answers there, up to ``--join-timeout``),
prints exactly one line ``NODE <node id>`` on stdout once ready, and serves until SIGTERM or SIGINT (then it
stops cleanly and exits 0). ``--exit-with-stdin`` also stops it when stdin reaches end of
file (so a parent holding a pipe takes its nodes with it when it dies). Logs go to stderr.

Made to run under a process manager (systemd, Kubernetes; see `pgregistry.node_options`):
the cookie comes from ``--cookie-file`` (a file only its owner may read; its trailing
newline dropped), else ``--cookie``, else ``PGREGISTRY_COOKIE``, and never appears in a
log line. ``--advertise-host`` is the host in the node id when the node listens on
another address (``--host 0.0.0.0`` needs it). ``--tls-cert/--tls-key/--tls-ca`` make
every connection mutual TLS against one CA (`pgregistry.tls`; docs/deployment.md shows
how to make the certificates). ``--config FILE`` (TOML) sets any of these options under
its name with underscores (``down_after = 2.0``, ``scope = ["jobs"]``); the command line
wins; ``cookie`` is refused there.

The node hosts a control server under the local name ``"pgregistry_control"`` that peers
drive with ``call(("pgregistry_control", node_id), request)``; its requests are listed in
`pgregistry._control`. Exit status 2 for bad options and every start-up error (one line
on stderr ``pgregistry node: error: ...`` naming the option and the cause: a port in use,
an address not of this machine, an unknown host, a bad cookie file, a bad config, ...), 1
when a ``--connect`` or the ``--join`` fails (one line on stderr says why: a refusal,
nothing answering, no names service there).

``pgregistry demo`` starts a 3-node cluster as three ``pgregistry node`` OS processes on
loopback, plus a narrator node in its own process that drives them through their control
servers, and narrates: a registration seen on every node (with timings), a ``select``
over the cluster, a subscription receiving remote ``Join``/``Leave``/``Update`` events,
a partition through real TCP proxies and its healing, a name decided by a majority, and
a node killed with SIGKILL. The names scene (each node runs ``--names --lease 1.0``): b
and c join a's names cluster, b starts a server under ``names.via("singleton")`` that a
calls; a partition leaves b alone, so its lease lapses and its holder is killed
(``"lost_quorum"``) while c, on the majority side, takes the name with a larger fencing
token. The partition comes before the kill: with one of three nodes dead, no side of a
partition of the other two would be a majority. The workers scene (each node runs
``--workers sessions``): a asks for 30 session workers, which start on the nodes their
keys hash to, and b finds each one by asking its owner. When c, the names holder, is then
killed, a survivor takes the name over after about one lease, and c's session workers
start again on their new owners when a asks for them. It stops every process it started,
also on Ctrl-C or an error.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, Final

from . import _table, inspect_cli, node_options
from ._control import CONTROL_NAME, NAMES_TIMEOUT, SELECT_ALL, Control, NodeProcess, control, session
from ._version import __version__
from .discovery import Discovery, parse_strategy
from .errors import RegistryError
from .events import Down, Join, Leave, NodeDown, NodeUp, Update
from .inspection import Inspection
from .logformat import FORMATS, configure
from .metrics import MetricsServer
from .names import Names
from .node import Node
from .process import monitor, receive
from .process import self as self_pid
from .registry import Registry
from .spec import V1, V2, V3
from .terms import Pid
from .testing import Partition
from .workers import Workers

__all__ = ["main"]


# --------------------------------------------------------------------------- pgregistry node

class _EndOfInput(asyncio.Protocol):
    """Sets `done` when standard input reaches end of file (``--exit-with-stdin``)."""

    def __init__(self, done: asyncio.Event) -> None:
        self.done = done

    def connection_lost(self, exc: Exception | None) -> None:
        self.done.set()


#: The lease of ``--names`` without ``--lease`` (`Names.start`'s default).
DEFAULT_LEASE: Final = 3.0


def _unique(items: Sequence[str] | None) -> list[str]:
    """`items` without repeats, in order (an option given twice counts once)."""
    return list(dict.fromkeys(items or ()))


async def run_node(args: argparse.Namespace) -> int:
    """The ``node`` command: serve one node until SIGTERM/SIGINT; return the exit status.

    `args` as completed by `node_options.prepare` (the cookie read, ``args.ssl`` made).
    """
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    signals = 0

    def on_signal(sig: int) -> None:
        """The first SIGTERM/SIGINT stops the node gracefully; the next ends the process."""
        nonlocal signals
        signals += 1
        if signals > 1:
            os._exit(128 + sig)
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)
    if args.exit_with_stdin:
        try:
            await loop.connect_read_pipe(lambda: _EndOfInput(stop), sys.stdin)
        except ValueError as exc:
            return _fail(f"--exit-with-stdin needs stdin to be a pipe or terminal: {exc}", 2)
    if args.cookie is None and not os.environ.get("PGREGISTRY_COOKIE"):
        print("pgregistry node: no --cookie-file, no --cookie and no PGREGISTRY_COOKIE: using a random cookie, "
              "so no other node can connect", file=sys.stderr)
    try:
        node = Node(args.name, host=args.host, port=args.port, advertise_host=args.advertise_host,
                    cookie=args.cookie, ssl=args.ssl, tick_interval=args.tick_interval, down_after=args.down_after)
    except (TypeError, ValueError) as exc:
        return _fail(str(exc), 2)
    try:
        await node.start()
    except OSError as exc:  # a port in use, an address not of this machine, an unknown host
        return _fail(node_options.startup_error(exc, args.host, args.port), 2)
    try:
        registries: dict[str, Registry] = {}
        try:
            for scope in _unique(args.scope):
                registries[scope] = await Registry.start(node, scope, keys=args.keys)
        except (TypeError, ValueError) as exc:
            return _fail(f"--scope: {exc}", 2)
        names: dict[str, Names] = {}
        if args.names is not None:
            try:
                lease = DEFAULT_LEASE if args.lease is None else args.lease
                names[args.names] = await Names.start(node, args.names, lease=lease)
            except (TypeError, ValueError, RegistryError) as exc:
                return _fail(f"--names: {exc}", 2)
        placements: dict[str, Workers] = {}
        if args.workers is not None:
            try:
                placements[args.workers] = await Workers.start(node, args.workers, functions=(session,))
            except (TypeError, ValueError, RegistryError) as exc:
                return _fail(f"--workers: {exc}", 2)
        discovery: Discovery | None = None
        if args.discover:
            try:
                discovery = await Discovery.start(node, [parse_strategy(spec) for spec in _unique(args.discover)])
            except (TypeError, ValueError) as exc:
                return _fail(f"--discover: {exc}", 2)
        metrics: MetricsServer | None = None
        if args.metrics_port is not None:
            try:
                metrics = await MetricsServer.start(node, host=args.metrics_host, port=args.metrics_port)
            except ImportError as exc:
                return _fail(f"--metrics-port: {exc}", 2)
            except OSError as exc:
                return _fail(f"--metrics-port {args.metrics_port}: cannot listen on {args.metrics_host}: "
                             f"{exc.strerror or exc}", 2)
            if discovery is not None:
                settled = discovery.settled
                metrics.add_ready_check(settled.is_set, name="discovery settled")
        Inspection.serve(node, registries=registries, names=names, workers=placements, on_drain=stop.set)
        if args.test_control:
            await Control.start(node, node, registries, names, placements, name=CONTROL_NAME)
        # SIGTERM while --connect or --join still waits for its target stops the node at
        # once: a process manager stopping a starting node must not wait out the timeouts.
        starting = asyncio.current_task()
        assert starting is not None

        async def cancel_on_stop() -> None:
            await stop.wait()
            starting.cancel()

        watcher = loop.create_task(cancel_on_stop())
        try:
            for address in _unique(args.connect):
                failure = await node_options.connect_until(node, address, args.connect_timeout)
                if failure is not None:
                    return _fail(f"cannot connect to {address}: {failure}", 1)
            if args.join is not None:
                failure = await _join(names[args.names], args.join, args.join_timeout)
                if failure is not None:
                    return _fail(f"cannot join the names cluster of {args.join}: {failure}", 1)
        except asyncio.CancelledError:
            if not stop.is_set():
                raise
            starting.uncancel()
            return 0  # stopped before it was ready: no NODE line
        finally:
            watcher.cancel()
        print(f"NODE {node.id}", flush=True)
        await stop.wait()  # a signal, or `pgregistry drain` (after which a signal is still the first)
        if discovery is not None:
            await discovery.stop()  # first: no new peer while the node leaves
        await node.stop(drain_timeout=args.shutdown_timeout)
        if metrics is not None:
            await metrics.stop()
    finally:
        await node.stop()
        for sig in (signal.SIGTERM, signal.SIGINT):  # stopped: a late signal must not kill the exit
            loop.remove_signal_handler(sig)
            signal.signal(sig, signal.SIG_IGN)
    return 0


async def _join(names: Names, address: str, timeout: float) -> str | None:
    """``--join``: make `names` a member of the names cluster of the node at `address`.

    Tries again while nothing answers there (a node not up yet), for `timeout` seconds in
    all; returns None once a member, else why not, as one readable line.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    pause = 0.05
    while True:
        try:
            await names.join(address, timeout=max(0.1, deadline - loop.time()))
            return None
        except TimeoutError as exc:  # before OSError: a TimeoutError is one (NoQuorum, no names service there)
            return f"{type(exc).__name__}: {exc}"
        except OSError as exc:  # refused, unreachable: maybe not up yet
            if loop.time() + pause >= deadline:
                return f"nothing answered there within {timeout:g} s (last: {type(exc).__name__}: {exc})"
            await asyncio.sleep(pause)
            pause = min(2 * pause, 1.0)
        except (RegistryError, ValueError, TypeError) as exc:  # JoinRefused, AuthenticationError, a bad address
            return f"{type(exc).__name__}: {exc}"


def _fail(message: str, status: int) -> int:
    """Report a ``node`` command error on stderr; return `status` to exit with."""
    print(f"pgregistry node: error: {message}", file=sys.stderr)
    return status


# --------------------------------------------------------------------------- pgregistry demo

TICK: Final = 0.2
DOWN_AFTER: Final = 1.0
SCOPE: Final = "services"
CHILDREN: Final = ("a", "b", "c")
NAMES: Final = "names"
LEASE: Final = 1.0
SINGLETON: Final = "singleton"
WORKERS: Final = "sessions"
SESSIONS: Final = [("user", i) for i in range(30)]
WAIT: Final = 10.0  # seconds any one step of the demo may take before it gives up


def _say(text: str = "") -> None:
    print(text, flush=True)


def _name(node_id: str) -> str:
    return node_id.partition("@")[0]


def _short(pid: Pid) -> str:
    """``a.12``: the node's name and the process serial."""
    return f"{_name(pid.node)}.{pid.serial}"


def _ms(ns: int) -> str:
    return f"{ns / 1e6:.1f} ms" if ns < 1e9 else f"{ns / 1e9:.2f} s"


def _view(rows: list[Any]) -> list[Any]:
    """Rows in a canonical order, to compare two nodes' views."""
    return sorted(rows, key=repr)


def _show(kind: str, key: Any, items: list[Any]) -> str:
    if kind == "Update":
        shown = ", ".join(f"{_short(pid)}: {old} -> {new}" for pid, old, new in items)
    else:
        shown = ", ".join(f"{_short(pid)} {value}" for pid, value in items)
    return f"    event  {kind:<6} {key!r:<7} {shown}"


class _Observer:
    """The narrator's mailbox, sorted as it arrives.

    Holds every registry event seen anywhere, as ``(node, kind, key, items, t_ns)``:
    the narrator's own subscription (node ``"narrator"``, printed as it arrives) and the
    reports of the subscribers the narrator started on a, b and c. Node events are kept
    in `node_events`.
    """

    def __init__(self, ref: Any) -> None:
        self.ref = ref
        self.events: list[tuple[str, str, Any, list[Any], int]] = []
        self.node_events: list[NodeUp | NodeDown] = []
        self.downs: dict[Pid, tuple[Any, int]] = {}

    def _take(self, msg: Any) -> None:
        now = time.monotonic_ns()
        kind = type(msg)
        if kind in (Join, Leave, Update) and msg.ref == self.ref:
            self.events.append(("narrator", kind.__name__, msg.key, msg[2], now))
            _say(_show(kind.__name__, msg.key, msg[2]))
        elif kind is tuple and len(msg) == 6 and msg[0] == "event":
            _tag, node_id, name, key, items, t_ns = msg
            self.events.append((_name(node_id), name, key, items, t_ns))
        elif kind in (NodeUp, NodeDown):
            self.node_events.append(msg)
        elif kind is Down:
            self.downs.setdefault(msg.pid, (msg.reason, now))

    async def until(self, done: Callable[[], bool], what: str, timeout: float = WAIT) -> None:
        """Take messages until `done()` is true; `TimeoutError` naming `what` after `timeout`."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                while True:
                    self._take(await receive(0))
            except TimeoutError:
                pass
            if done():
                return
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"demo: gave up after {timeout} s waiting for {what}")
            try:
                self._take(await receive(remaining))
            except TimeoutError:
                continue

    def seen(self, node: str, kind: str, pids: Sequence[Pid], since: int = 0) -> int | None:
        """When `node` had seen a `kind` event for every pid of `pids` (after `since`), or None."""
        first: dict[Pid, int] = {}
        for where, name, _key, items, t_ns in self.events:
            if where == node and name == kind and t_ns >= since:
                for item in items:
                    first.setdefault(item[0], t_ns)
        times = [first.get(pid) for pid in pids]
        return None if None in times else max(times)  # type: ignore[type-var]

    def everywhere(self, kind: str, pids: Sequence[Pid], nodes: Sequence[str], since: int = 0) -> Callable[[], bool]:
        """A condition for `until`: every one of `nodes` saw `kind` for all of `pids`."""
        return lambda: all(self.seen(node, kind, pids, since) is not None for node in nodes)

    def after(self, node: str, kind: str, pids: Sequence[Pid], since: int) -> str:
        """How long after `since` `node` had seen `kind` for every pid, as text."""
        t_ns = self.seen(node, kind, pids, since)
        return _ms(t_ns - since) if t_ns is not None else "not yet"

    def timings(self, kind: str, pids: Sequence[Pid], nodes: Sequence[str], since: int) -> str:
        """``"a 0.4 ms, b 0.5 ms, ..."``: `after` for each of `nodes`."""
        return ", ".join(f"{node} {self.after(node, kind, pids, since)}" for node in nodes)


async def _eventually(check: Callable[[], Awaitable[bool]], what: str, timeout: float = WAIT) -> float:
    """Poll `check` until it returns True; return the seconds it took."""
    start = time.monotonic()
    while not await check():
        if time.monotonic() - start > timeout:
            raise TimeoutError(f"demo: gave up after {timeout} s waiting for {what}")
        await asyncio.sleep(0.01)
    return time.monotonic() - start


def _in_background(narrator: Node, node_id: str, request: tuple[Any, ...],
                   again: Callable[[Any], bool] = lambda _outcome: False) -> asyncio.Future[tuple[Any, int]]:
    """`control` run by a new process of `narrator` (a call needs a process), sent again
    while `again(result)` (for `NAMES_TIMEOUT` at most): later, the last result and
    ``time.monotonic_ns()`` when it came."""
    result: asyncio.Future[tuple[Any, int]] = asyncio.get_running_loop().create_future()

    async def run() -> None:
        deadline = time.monotonic() + NAMES_TIMEOUT
        try:
            while again(outcome := await control(node_id, request, NAMES_TIMEOUT + 1)):
                if time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.01)
        except Exception as exc:
            if not result.done():
                result.set_exception(exc)
        else:
            if not result.done():
                result.set_result((outcome, time.monotonic_ns()))

    narrator.spawn(run)
    return result


def _blocked_by(holder: Pid) -> Callable[[Any], bool]:
    """For `_in_background`: ask again while a ``names_serve`` finds `holder` (or nobody it
    knows) in the way: that holder stays valid on the asking node until its node's lease
    ends or its connection drops."""
    return lambda outcome: not outcome[2] and outcome[0] in (holder, None)


async def _names(node_id: str, *request: Any) -> Any:
    """A names command to the control server of `node_id`, given the time a majority may take."""
    return await control(node_id, (request[0], NAMES, *request[1:]), NAMES_TIMEOUT + 1)


async def _start_children(cookie: str, logs: Path, children: list[NodeProcess]) -> list[NodeProcess]:
    """Start a, b and c at once; each one goes into `children` as soon as it runs."""
    results = await asyncio.gather(
        *(NodeProcess.start(name, cookie=cookie, scopes=[SCOPE], tick_interval=TICK, down_after=DOWN_AFTER,
                            names=NAMES, lease=LEASE, workers=WORKERS, log=logs / f"{name}.log")
          for name in CHILDREN),
        return_exceptions=True,
    )
    started = [result for result in results if isinstance(result, NodeProcess)]
    children.extend(started)
    for result in results:
        if isinstance(result, BaseException):
            raise result
    return started


async def _route_through(part: Partition, nodes: list[NodeProcess], cookie: str) -> None:
    """Tell each node to dial each peer through the proxy of that link.

    A node that learns of a peer (``members`` gossip) dials it at once, so its routes
    must be in place before it meets any other member: each node is configured by a
    short-lived setup node that knows only that one node and leaves afterwards.
    """
    for child in nodes:
        async with Node(f"setup-{child.name}", cookie=cookie, tick_interval=TICK, down_after=DOWN_AFTER) as setup:
            await setup.connect(child.id)
            for peer in nodes:
                if peer is not child:
                    await control(child.id, ("add_route", peer.id, part.address(child.name, peer.name)))


async def demo(children: list[NodeProcess]) -> int:
    """The narrated cluster tour; every node process started goes into `children`."""
    began = time.monotonic()
    cookie = secrets.token_urlsafe(24)
    _say(f"pgregistry demo: a 3-node cluster, each node its own OS process on loopback "
         f"(table: {_table.IMPLEMENTATION})")
    _say(f"cookie generated for this run; ticks every {TICK} s, a silent peer is down after {DOWN_AFTER} s")
    _say()
    with tempfile.TemporaryDirectory(prefix="pgregistry-demo-") as logs:
        try:
            await _cluster_tour(cookie, Path(logs), children)
        except Exception:
            for child in children:  # the logs go with the temporary directory
                print(f"--- log of node {child.name} ({child.state}) ---\n{child.log_tail()}", file=sys.stderr)
            raise
    alive = [child.name for child in children if child.popen.poll() is None]
    _say(f"  every node process the demo started has exited: {not alive}")
    _say(f"done in {time.monotonic() - began:.1f} s.")
    return 0


async def _cluster_tour(cookie: str, logs: Path, children: list[NodeProcess]) -> None:
    """Start the nodes, the proxies and the narrator; tell the story; stop the nodes."""
    _say(f"starting: pgregistry node --name {{a,b,c}} --scope {SCOPE} "
         f"--tick-interval {TICK} --down-after {DOWN_AFTER} --names --lease {LEASE} --workers {WORKERS}")
    nodes = await _start_children(cookie, logs, children)
    a, b, c = nodes
    for child in nodes:
        _say(f"  node {child.name}: {child.id}  OS pid {child.pid}")
    async with Partition.for_targets({child.name: child.address for child in nodes}) as part:
        await _route_through(part, nodes, cookie)
        _say("  6 TCP proxies (one per direction between two nodes) run in this process; each node "
             "dials its peers through them")
        async with Node("narrator", cookie=cookie, tick_interval=TICK, down_after=DOWN_AFTER) as narrator:
            reg = await Registry.start(narrator, SCOPE)
            ref, _snapshot = reg.monitor_scope()
            narrator.monitor_nodes()
            await _story(narrator, reg, _Observer(ref), part, nodes)
            _say()
            _say("shutting down:")
            for child in (a, b):
                child.terminate()
            for child in (a, b):
                # In a thread: the narrator's loop keeps ticking while a node stops gracefully.
                status = await asyncio.to_thread(child.stop, 5.0)
                _say(f"  node {child.name} stopped by SIGTERM: exit status {status}")
            _say(f"  node {c.name} was killed: exit status {await asyncio.to_thread(c.stop, 5.0)}")


async def _story(narrator: Node, reg: Registry, obs: _Observer, part: Partition, nodes: list[NodeProcess]) -> None:
    """Connect the narrator to a, b and c, then play the six scenes, narrating each."""
    a, b, c = nodes
    everyone = ["a", "b", "c", "narrator"]
    others = {child.name: {n.id for n in nodes if n is not child} | {narrator.id} for child in nodes}

    for child in nodes:
        await narrator.connect(child.id)

    async def meshed() -> bool:
        for child in nodes:
            if set(await control(child.id, ("peers",))) != others[child.name]:
                return False
        return sum(proxy.connections for proxy in part.proxies.values()) == 3

    took = await _eventually(meshed, "the full mesh")
    _say(f"the narrator node {narrator.id} (this process) connected to a, b and c; full mesh after "
         f"{took * 1000:.0f} ms:")
    _say("  each node has 3 peers, and the 3 links between a, b and c all run through the proxies")
    for child in nodes:
        await control(child.id, ("subscribe", SCOPE, self_pid()))
    _say(f"the narrator subscribed to the whole {SCOPE!r} registry (monitor_scope), and so did one "
         "process on each node, reporting to the narrator")
    _say()

    _say("1. a registration on one node is seen on all the others")
    since = time.monotonic_ns()
    web_a = await control(a.id, ("register", SCOPE, "web", {"node": "a", "load": 3}, 2))
    await obs.until(obs.everywhere("Join", web_a, everyone), "a's entries everywhere")
    _say(f"  a registered 2 workers under 'web'; after the request was sent, visible on: "
         f"{obs.timings('Join', web_a, everyone, since)}")
    since = time.monotonic_ns()
    web_b = await control(b.id, ("register", SCOPE, "web", {"node": "b", "load": 8}, 1))
    db_b = await control(b.id, ("register", SCOPE, "db", {"node": "b", "role": "primary"}, 1))
    web_c = await control(c.id, ("register", SCOPE, "web", {"node": "c", "load": 1}, 1))
    await obs.until(obs.everywhere("Join", web_b + db_b + web_c, everyone), "b's and c's entries everywhere")
    last = max(t for node in everyone if (t := obs.seen(node, "Join", web_b + db_b + web_c, since)) is not None)
    _say(f"  b and c registered theirs (3 requests): all visible everywhere {_ms(last - since)} after the first")
    _say("  lookup('web') on the narrator:")
    for pid, value in reg.lookup("web"):
        _say(f"    {_short(pid):<6} {value}")
    counts = [await control(child.id, ("count", SCOPE)) for child in nodes] + [reg.count()]
    _say(f"  count() on a, b, c, narrator: {', '.join(map(str, counts))}")
    _say()

    _say("2. a select over the whole cluster, on any node")
    spec = [(("web", V1, {"node": V2, "load": V3}), [V3 > 2], [(V2, V3)])]
    _say("  select([(('web', V1, {'node': V2, 'load': V3}), [V3 > 2], [(V2, V3)])])")
    _say(f"    -> {sorted(reg.select(spec))}")
    view = _view(reg.select(SELECT_ALL))
    same = [_view(await control(child.id, ("select_all", SCOPE))) == view for child in nodes]
    _say(f"  every entry (select_all) on a, b and c equals the narrator's view: {all(same)}")
    _say()

    _say("3. the narrator's subscription receives remote updates and leaves")
    since = time.monotonic_ns()
    await control(c.id, ("update", SCOPE, "web", {"node": "c", "load": 6}))
    await obs.until(obs.everywhere("Update", web_c, everyone), "c's update everywhere")
    _say(f"  c updated its 'web' value; seen on: {obs.timings('Update', web_c, everyone, since)}")
    since = time.monotonic_ns()
    await control(b.id, ("unregister", SCOPE, "db"))
    await obs.until(obs.everywhere("Leave", db_b, everyone), "b's unregister everywhere")
    _say(f"  b unregistered 'db'; seen on: {obs.timings('Leave', db_b, everyone, since)}")
    _say()

    _say("4. a partition heals")
    since = time.monotonic_ns()
    part.split({"a"}, {"b", "c"})
    _say("  split {a} | {b, c}: the proxies between them now drop every byte (a silent partition)")
    await obs.until(lambda: obs.seen("b", "Leave", web_a, since) is not None
                    and obs.seen("c", "Leave", web_a, since) is not None
                    and obs.seen("a", "Leave", web_b + web_c, since) is not None,
                    "both sides to drop each other", timeout=WAIT + DOWN_AFTER)
    _say(f"  after down_after, b and c dropped a's entries ({obs.timings('Leave', web_a, ['b', 'c'], since)}), "
         f"a dropped b's and c's ({obs.timings('Leave', web_b + web_c, ['a'], since)})")
    _say(f"  b's peers now: {sorted(_name(p) for p in await control(b.id, ('peers',)))}; the narrator, "
         "linked to both sides, still sees every entry")
    split_a = await control(a.id, ("register", SCOPE, "web", {"node": "a", "load": 9}, 1))
    split_b = await control(b.id, ("register", SCOPE, "web", {"node": "b", "load": 4}, 1))
    await obs.until(lambda: obs.seen("narrator", "Join", split_a + split_b) is not None
                    and obs.seen("a", "Join", split_a) is not None
                    and obs.seen("c", "Join", split_b) is not None, "the registrations during the split")
    counts = [await control(child.id, ("count", SCOPE)) for child in nodes] + [reg.count()]
    _say(f"  a and b each registered one more 'web' worker on their side; count() on a, b, c, narrator: "
         f"{', '.join(map(str, counts))}")
    since = time.monotonic_ns()
    part.heal()
    _say("  heal: the proxies forward again; the nodes redial each other and exchange their entries")
    await obs.until(lambda: obs.seen("a", "Join", web_b + split_b + web_c, since) is not None
                    and obs.seen("b", "Join", web_a + split_a, since) is not None
                    and obs.seen("c", "Join", web_a + split_a, since) is not None,
                    "the heal", timeout=WAIT + 4 * DOWN_AFTER)
    _say(f"  the other side's entries were back on a after {obs.after('a', 'Join', web_b + split_b + web_c, since)}"
         f", on b after {obs.after('b', 'Join', web_a + split_a, since)}"
         f", on c after {obs.after('c', 'Join', web_a + split_a, since)}")
    view = _view(reg.select(SELECT_ALL))

    async def converged() -> bool:
        return all([_view(await control(child.id, ("select_all", SCOPE))) == view for child in nodes])

    await _eventually(converged, "the same view on every node")
    _say(f"  converged: select_all on a, b and c equals the narrator's {len(view)} entries")
    _say()

    _say()

    held = await _names_scene(narrator, obs, part, nodes, converged)
    _say()
    sessions = await _workers_scene(nodes)
    _say()

    _say("7. a node killed with SIGKILL")
    on_c = [pid for pid, _value in reg.lookup("web") if pid.node == c.id]
    since = time.monotonic_ns()
    c.kill()
    takeovers = [_in_background(narrator, child.id, ("names_serve", NAMES, SINGLETON), again=_blocked_by(held[0]))
                 for child in (a, b)]
    _say(f"  node c (OS pid {c.pid}) killed with SIGKILL; its entries leave everywhere:")
    await obs.until(obs.everywhere("Leave", on_c, ["a", "b", "narrator"], since), "c's entries to leave")
    _say(f"  gone on: {obs.timings('Leave', on_c, ['a', 'b', 'narrator'], since)} (the kernel closed c's "
         f"sockets, so its peers knew at once; a node that just goes silent is dropped after {DOWN_AFTER} s, "
         "as in the partition)")
    await obs.until(lambda: any(type(e) is NodeDown and e.node == c.id for e in obs.node_events), "NodeDown c")
    down = next(e for e in obs.node_events if type(e) is NodeDown and e.node == c.id)
    _say(f"  the narrator's monitor_nodes: NodeDown({_name(down.node)!r}, {down.reason!r})")
    counts = [await control(child.id, ("count", SCOPE)) for child in (a, b)] + [reg.count()]
    _say(f"  count() on a, b, narrator: {', '.join(map(str, counts))}")
    await _takeover([a, b], held, takeovers, since)
    await _workers_move([a, b], c, sessions)


async def _names_scene(narrator: Node, obs: _Observer, part: Partition, nodes: list[NodeProcess],
                       converged: Callable[[], Awaitable[bool]]) -> tuple[Pid, int]:
    """Scene 5: a server under a name decided by a majority, called from another node; a
    partition leaves its holder in the minority. Returns the holder c ends with, and its token."""
    a, b, c = nodes
    _say(f"5. a name unique in the whole cluster, decided by a majority (names service, lease {LEASE} s)")
    members: list[str] = []
    for child in (b, c):
        members = await _names(child.id, "names_join", a.id)
    _say(f"  b and c joined a's names cluster: members {', '.join(sorted(_name(m) for m in members))}")
    began = time.monotonic_ns()
    pid, token, _won = await _names(b.id, "names_serve", SINGLETON)
    monitor(pid)
    _say(f"  b started a server under names.via({SINGLETON!r}): {_short(pid)}, fencing token {token} "
         f"(a majority agreed in {_ms(time.monotonic_ns() - began)})")

    async def known_on(child: NodeProcess, holder: tuple[Pid, int]) -> bool:
        return bool(await _names(child.id, "names_whereis", SINGLETON) == holder)

    await _eventually(lambda: known_on(a, (pid, token)), "a to learn the holder")
    node_id, answered_by, answered_token, _request = await _names(a.id, "names_call", SINGLETON, "ping")
    _say(f"  a called names.via({SINGLETON!r}): answered by {_short(answered_by)} on {_name(node_id)}, "
         f"token {answered_token}")

    since = time.monotonic_ns()
    part.split({"b"}, {"a", "c"})
    _say("  split {b} | {a, c}: b holds the name but is alone, 1 member of 3; c asks for the name "
         "until it gets it")
    on_c = _in_background(narrator, c.id, ("names_serve", NAMES, SINGLETON), again=_blocked_by(pid))
    await obs.until(lambda: pid in obs.downs, "b's holder to step down", timeout=WAIT + 2 * LEASE)
    reason, stepped_down = obs.downs[pid]
    _say(f"  b's lease lapsed (no majority renewed it): b stepped down, its holder {_short(pid)} was killed "
         f"with reason {reason!r} {_ms(stepped_down - since)} after the split")
    on_b = await _names(b.id, "names_whereis", SINGLETON)
    _say(f"  whereis_name({SINGLETON!r}) on b now: {'no valid holder' if on_b is None else on_b}")
    (new_pid, new_token, won), taken = await asyncio.wait_for(on_c, NAMES_TIMEOUT + 2)
    if not won:
        raise RuntimeError(f"demo: the majority side could not take {SINGLETON!r}: it is held by {new_pid}")
    monitor(new_pid)
    _say(f"  the majority side took it: c's server {_short(new_pid)} holds the name {_ms(taken - since)} after "
         f"the split (after b's holder was gone: {taken > stepped_down}), fencing token {new_token} > {token}: "
         f"{new_token > token}")
    since = time.monotonic_ns()
    part.heal()
    took = await _eventually(lambda: known_on(b, (new_pid, new_token)), "b to learn c's holder",
                             timeout=WAIT + 4 * DOWN_AFTER)
    await _eventually(converged, "the same registry view on every node", timeout=WAIT + 4 * DOWN_AFTER)
    _say(f"  heal: {took:.2f} s later b sees the holder the majority chose, {_short(new_pid)} with token {new_token}")
    return new_pid, new_token


def _spread(placed: list[tuple[Any, Pid]]) -> str:
    """``"a 9, b 12, c 9"``: how many workers run on each node."""
    counts: dict[str, int] = {}
    for _key, pid in placed:
        counts[_name(pid.node)] = counts.get(_name(pid.node), 0) + 1
    return ", ".join(f"{node} {count}" for node, count in sorted(counts.items()))


async def _workers_scene(nodes: list[NodeProcess]) -> dict[Any, Pid]:
    """Scene 6: workers started from one node land on the nodes their keys hash to."""
    a, b, c = nodes
    _say(f"6. workers spread by consistent hashing (workers service {WORKERS!r} on a, b and c)")
    began = time.monotonic_ns()
    placed = await control(a.id, ("workers_start", WORKERS, SESSIONS), NAMES_TIMEOUT)
    _say(f"  a asked for {len(SESSIONS)} session workers (get_or_start): each started on the node its key "
         f"hashes to, in {_ms(time.monotonic_ns() - began)}: {_spread(placed)}")
    where_b = await control(b.id, ("workers_where", WORKERS, SESSIONS), NAMES_TIMEOUT)
    _say(f"  b's whereis of every key (asked of each key's owner) finds the same pids: {where_b == placed}")
    stat = await control(c.id, ("workers_stat", WORKERS))
    _say(f"  c's ring: {', '.join(sorted(_name(n) for n in stat['nodes']))}; c runs {stat['local']} of them; "
         "no node told the others about any worker")
    return dict(placed)


async def _workers_move(survivors: list[NodeProcess], dead: NodeProcess, sessions: dict[Any, Pid]) -> None:
    """Scene 7, workers: the sessions c ran start again on their new owners when asked for."""
    lost = [key for key, pid in sessions.items() if pid.node == dead.id]

    async def ring_without_dead() -> bool:
        for child in survivors:
            if dead.id in (await control(child.id, ("workers_stat", WORKERS)))["nodes"]:
                return False
        return True

    await _eventually(ring_without_dead, "the rings without c")
    placed = await control(survivors[0].id, ("workers_start", WORKERS, SESSIONS), NAMES_TIMEOUT)
    kept = sum(1 for key, pid in placed if sessions[key] == pid)
    moved = [(key, pid) for key, pid in placed if key in lost]
    _say(f"  c's {len(lost)} session workers died with it; a asked for all {len(SESSIONS)} again: {kept} were "
         f"still running, c's started anew on their new owners ({_spread(moved)}); now {_spread(placed)}")


async def _takeover(survivors: list[NodeProcess], held: tuple[Pid, int],
                    takeovers: list[asyncio.Future[tuple[Any, int]]], since: int) -> None:
    """Scene 6, names: the survivors asked for c's name when c was killed; one gets it once
    c's lease has ended."""
    old_pid, old_token = held
    results = [await asyncio.wait_for(attempt, NAMES_TIMEOUT + 2) for attempt in takeovers]
    winners = [(child, result) for child, result in zip(survivors, results) if result[0][2]]
    if len(winners) != 1:
        raise RuntimeError(f"demo: {len(winners)} survivors started {SINGLETON!r}: {results}")
    winner, ((pid, token, _won), taken) = winners[0]
    _say(f"  c's server {_short(old_pid)} held names.via({SINGLETON!r}) with token {old_token}; a and b both "
         "asked for the name when c was killed")
    _say(f"  {winner.name} took it over {_ms(taken - since)} after the kill (lease {LEASE} s): {_short(pid)}, "
         f"fencing token {token} > {old_token}: {token > old_token}")
    other = next(child for child in survivors if child is not winner)
    node_id, answered_by, answered_token, _request = await _names(other.id, "names_call", SINGLETON, "ping")
    _say(f"  {other.name} called names.via({SINGLETON!r}): answered by {_short(answered_by)} on {_name(node_id)}, "
         f"token {answered_token}")


def _run(coro: Any) -> Any:
    """Run `coro` on uvloop when it is installed, else on asyncio's loop.

    ``PGREGISTRY_LOOP=asyncio`` forces the standard loop (``uvloop`` requires uvloop).
    """
    choice = os.environ.get("PGREGISTRY_LOOP", "auto")
    if choice not in ("auto", "asyncio", "uvloop"):
        raise SystemExit(f"pgregistry: PGREGISTRY_LOOP must be auto, asyncio or uvloop, not {choice!r}")
    if choice != "asyncio":
        try:
            import uvloop
        except ImportError:
            if choice == "uvloop":
                raise SystemExit("pgregistry: PGREGISTRY_LOOP=uvloop but uvloop is not installed") from None
        else:
            return uvloop.run(coro)
    return asyncio.run(coro)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``pgregistry`` command; returns the exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "node":
        try:
            node_options.prepare(args, argv, _parser)
        except node_options.OptionError as exc:
            return _fail(str(exc), 2)
        configure(args.log_level, args.log_format)
        try:
            return _run(run_node(args))
        except KeyboardInterrupt:  # before the signal handlers were in place
            return 130
    if args.command in inspect_cli.COMMANDS:
        return inspect_cli.run(args)
    children: list[NodeProcess] = []
    try:
        return _run(demo(children))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception:
        traceback.print_exc()
        return 1
    finally:
        for child in children:
            child.stop(2.0)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pgregistry", description="Run a pgregistry node, or watch a real cluster "
                                     "at work (pgregistry demo).")
    parser.add_argument("--version", action="version", version=f"pgregistry {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("demo", help="start a 3-node cluster in 3 OS processes and narrate it at work")
    inspect_cli.add_commands(commands)
    node = commands.add_parser("node", help="run one node in the foreground until SIGTERM/SIGINT",
                               description="Run one node in the foreground; print 'NODE <id>' on stdout "
                                           "when ready; stop cleanly on SIGTERM/SIGINT. Peers drive it through "
                                           f"its control server, the local name {CONTROL_NAME!r} (requests: "
                                           "see pgregistry._control).")
    node.add_argument("--config", default=None, metavar="FILE",
                      help="read options from the TOML file FILE: each option's name with underscores as its key "
                           "(down_after = 2.0, scope = [\"jobs\"], cookie_file = \"...\", names = true); "
                           "options on the command line win; relative paths are taken from FILE's directory; "
                           "a cookie key is refused (use cookie_file)")
    node.add_argument("--name", default=None,
                      help="the node's name, required (its id is name@host:port)")
    node.add_argument("--host", default="127.0.0.1",
                      help="address to listen on (default 127.0.0.1); 0.0.0.0 or :: (every address) "
                           "needs --advertise-host")
    node.add_argument("--port", type=int, default=0, help="port to listen on (default 0: any free port)")
    node.add_argument("--advertise-host", default=None, metavar="HOST",
                      help="the host in the node id, which peers dial, when it is not --host (default: --host)")
    node.add_argument("--cookie-file", default=None, metavar="PATH",
                      help="read the shared secret of the cluster from PATH (one line; the file must not be "
                           "readable or writable by group or others); the way to give a cookie to a service")
    node.add_argument("--cookie", default=None,
                      help="shared secret of the cluster (not with --cookie-file; default: $PGREGISTRY_COOKIE); prefer "
                           "--cookie-file or the environment variable, a command line is visible to other local "
                           "users")
    node.add_argument("--tls-cert", default=None, metavar="FILE",
                      help="this node's certificate (PEM); with --tls-key and --tls-ca (all three or none) "
                           "every connection is mutual TLS: each peer must present a certificate signed by "
                           "the CA that names its node name (see docs/deployment.md)")
    node.add_argument("--tls-key", default=None, metavar="FILE", help="the private key of --tls-cert (PEM)")
    node.add_argument("--tls-ca", default=None, metavar="FILE",
                      help="the certificate(s) of the CA that peers' certificates must be signed by (PEM)")
    node.add_argument("--scope", action="extend", nargs="+", metavar="S", help="start registry S (see --keys)")
    node.add_argument("--keys", default="duplicate", choices=["unique", "duplicate"],
                      help="the keys of the --scope registries (default duplicate)")
    node.add_argument("--connect", action="extend", nargs="+", metavar="ADDR",
                      help="connect to the node at ADDR (host:port or a node id), trying again while nothing "
                           "answers there, for --connect-timeout seconds; a refusal (wrong cookie, untrusted "
                           "certificate) fails at once")
    node.add_argument("--connect-timeout", type=float, default=30.0, metavar="SECONDS",
                      help="seconds each --connect may take in all (30)")
    node.add_argument("--tick-interval", type=float, default=1.0, metavar="T", help="seconds between ticks (1.0)")
    node.add_argument("--down-after", type=float, default=5.0, metavar="D",
                      help="seconds of silence after which a peer is down (5.0)")
    node.add_argument("--names", nargs="?", const="names", default=None, metavar="SERVICE",
                      help="run a names service (cluster-unique names decided by a majority) called SERVICE "
                           "(default 'names'); it starts as a cluster of this node alone")
    node.add_argument("--lease", type=float, default=None, metavar="SECONDS",
                      help=f"lease of the names service, the same on every member (default {DEFAULT_LEASE}); a "
                           "name held on a node that stopped renewing can be taken over after it")
    node.add_argument("--join", default=None, metavar="ADDR",
                      help="join the names cluster of the node at ADDR (host:port or a node id; needs --names), "
                           "trying again while nothing answers there, for --join-timeout seconds; NODE is "
                           "printed once a member")
    node.add_argument("--join-timeout", type=float, default=30.0, metavar="SECONDS",
                      help="seconds --join may take in all (30)")
    node.add_argument("--workers", nargs="?", const="workers", default=None, metavar="SERVICE",
                      help="run a workers service called SERVICE (default 'workers') whose only function is the "
                           "demo session worker; nodes running it share workers by consistent hashing")
    node.add_argument("--discover", action="extend", nargs="+", metavar="SPEC",
                      help="find peers and connect to them: static:HOST:PORT[,HOST:PORT...], dns:NAME:PORT, "
                           "dns6:NAME:PORT, srv:NAME (a DNS spec may end with @NAMESERVER[:PORT]), or "
                           "multicast[:GROUP:PORT][@INTERFACE]")
    node.add_argument("--metrics-port", type=int, default=None, metavar="PORT",
                      help="serve /metrics (Prometheus; needs the 'metrics' extra), /livez and /readyz on PORT")
    node.add_argument("--metrics-host", default="127.0.0.1", metavar="HOST",
                      help="address of the metrics port (127.0.0.1)")
    node.add_argument("--log-format", default="plain", choices=FORMATS,
                      help="log lines on stderr: plain text, or one JSON object a line (plain)")
    node.add_argument("--shutdown-timeout", type=float, default=20.0, metavar="SECONDS",
                      help="on SIGTERM, SIGINT or 'pgregistry drain': seconds the services get to finish what is "
                           "under way before the node leaves (20); a second signal exits at once")
    node.add_argument("--test-control", action="store_true",
                      help="also serve the control server through which tests and the demo drive the node "
                           "(it can start processes and change entries: never in production)")
    node.add_argument("--exit-with-stdin", action="store_true",
                      help="also stop when stdin reaches end of file (for a parent holding a pipe)")
    node.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"],
                      help="log level on stderr (warning)")
    return parser
