"""Fault injection for tests: a TCP proxy per link, and partitions built from such proxies.

This module sits on top of the house, beside the CLI (docs/architecture.md). It uses only the
standard library and knows nothing about nodes: it moves bytes, so the faults it injects
are real TCP events that the node layer sees exactly as it would on a bad network.

`LinkProxy`
    A loopback TCP proxy placed between two nodes. The dialling node connects to the
    proxy's `~LinkProxy.address`; the proxy connects onward to its *target*
    (``host:port``) and copies bytes both ways. At any moment, for every current and
    future connection through it, the link can be switched to:

    * `~LinkProxy.pass_` / `~LinkProxy.restore`: forward bytes untouched (the default);
    * `~LinkProxy.delay`: forward every chunk ``seconds`` later, in order, in each
      direction;
    * `~LinkProxy.blackhole`: a silent partition. New connections are still accepted and
      existing sockets stay open, but every byte is dropped in both directions, so the
      nodes only notice through missing ticks;
    * `~LinkProxy.cut`: every connection through the proxy is closed (both ends see EOF,
      or a reset if they had unread data in flight) and new ones are closed as soon as
      they are accepted, so a connect attempt fails fast.

`Partition`
    One proxy per directed link of a small cluster, and the one-liners
    ``partition.split({"A"}, {"B", "C"})`` and ``partition.heal()``.

Semantics in the corners, chosen to behave like a real network:

* A half-close (EOF) is forwarded as a half-close, in order with the data before it, so
  each direction of a connection ends independently, as in TCP.
* While a link is blackholed, an EOF or close from one end is *held* (not delivered) and
  reaches the other end when the link is restored, like a FIN retransmitted after a
  partition heals. Bytes that were still queued under a delay when `blackhole` is called
  are dropped with the rest.
* A connection closed by `cut` stays closed; `restore` affects the connections still
  open (blackholed ones resume forwarding) and the ones opened afterwards.
* `restore` after `delay` keeps the delay already promised to chunks in flight, so a byte
  sent after `restore` never overtakes one sent before it.

Everything runs on the event loop that called `LinkProxy.start`. The control methods
(`pass_`, `restore`, `delay`, `blackhole`, `cut`, `set_mode`, `Partition.split`,
`Partition.heal`) are plain synchronous calls that take effect at once; call them from
that loop's thread.
"""

from __future__ import annotations

import asyncio
import collections
import enum
import logging
import math
import time
import types
from collections.abc import Callable, Iterable, Mapping
from typing import cast

from .checks import parse_address

__all__ = ["DirectedLink", "LinkMode", "LinkProxy", "Partition", "parse_address"]

logger = logging.getLogger("pgregistry.testing")

#: Bytes queued (delayed) in one direction of one connection before the proxy stops
#: reading from the sender; reading resumes once the queue is down to `_LOW_WATER`.
_HIGH_WATER = 4 * 1024 * 1024
_LOW_WATER = _HIGH_WATER // 4

#: How long `LinkProxy.close` waits for aborted connections to report their end.
_CLOSE_GRACE = 5.0

_CLIENT = 0
_TARGET = 1
_SIDE_NAMES = ("client", "target")


class LinkMode(enum.StrEnum):
    """What a `LinkProxy` does with the connections through it."""

    PASS = "pass"
    DELAY = "delay"
    BLACKHOLE = "blackhole"
    CUT = "cut"


_DROPPING = frozenset({LinkMode.BLACKHOLE, LinkMode.CUT})


class _Signal(enum.Enum):
    """The end of one direction of a connection, queued in order behind its data."""

    EOF = "eof"  # half-close: the sender will send no more
    CLOSE = "close"  # the sender's socket is gone, cleanly
    RESET = "reset"  # the sender's socket is gone with an error


def _format_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class _Pipe:
    """One direction of a proxied connection: what `source` sends, written to the other side.

    Chunks are written straight through while nothing is queued, no delay applies and
    the sink is connected; otherwise they wait in `queue` as ``(due, chunk)`` and a
    single timer writes them in order (re-armed if it fires before ``due``). The end of
    the direction (EOF, close, reset) is queued behind the data.
    """

    __slots__ = ("link", "source", "sink", "queue", "queued_bytes", "timer", "sink_paused",
                 "stopped", "eof_delivered")

    def __init__(self, link: _Link, source: int) -> None:
        self.link = link
        self.source = source
        self.sink = 1 - source
        self.queue: collections.deque[tuple[float, bytes | _Signal]] = collections.deque()
        self.queued_bytes = 0
        self.timer: asyncio.TimerHandle | None = None
        self.sink_paused = False  # the sink's transport asked us to stop writing
        self.stopped = False  # nothing can be written to the sink any more
        self.eof_delivered = False

    def feed(self, data: bytes) -> None:
        """Take a chunk read from the source."""
        proxy = self.link.proxy
        if self.stopped or proxy._mode in _DROPPING:
            proxy.bytes_dropped += len(data)
            return
        if not self.queue and proxy._delay <= 0.0 and self.link.transports[self.sink] is not None:
            self._write(data)
            return
        was_empty = not self.queue
        self.queue.append((time.monotonic() + proxy._delay, data))
        self.queued_bytes += len(data)
        if was_empty:
            self.pump()
        else:  # the head's timer (or the hold) already covers this chunk
            self.link.update_reading(self.source)

    def feed_signal(self, signal: _Signal) -> None:
        """Queue the end of this direction behind the data already queued."""
        if self.stopped:
            return
        proxy = self.link.proxy
        self.queue.append((time.monotonic() + proxy._delay, signal))
        self.pump()

    def pump(self) -> None:
        """Write (or, while dropping, discard) everything that is due; re-arm the timer."""
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        proxy = self.link.proxy
        loop = self.link.loop
        dropping = proxy._mode in _DROPPING
        # Due times are on time.monotonic(), not loop.time(): uvloop's clock is cached per
        # iteration and truncated to the millisecond, which would release chunks early.
        now = time.monotonic()
        queue = self.queue
        held = self.link.transports[self.sink] is None  # the target is still being dialled
        while queue and not self.stopped:
            due, item = queue[0]
            if isinstance(item, _Signal):
                if dropping or held:
                    break  # held until the link is restored or the target connected
                if due > now:
                    self.timer = loop.call_later(due - now, self.pump)
                    break
                queue.popleft()
                self.link.deliver(self, item)
            elif dropping:
                queue.popleft()
                self.queued_bytes -= len(item)
                proxy.bytes_dropped += len(item)
            elif held:
                break  # written once the target's socket is up
            elif due > now:
                self.timer = loop.call_later(due - now, self.pump)
                break
            else:
                queue.popleft()
                self.queued_bytes -= len(item)
                self._write(item)
        self.link.update_reading(self.source)

    def stop(self) -> None:
        """Discard what is queued and accept nothing more (the sink is gone or closing)."""
        self.stopped = True
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.queued_bytes:
            self.link.proxy.bytes_dropped += self.queued_bytes
        self.queue.clear()
        self.queued_bytes = 0

    def _write(self, data: bytes) -> None:
        proxy = self.link.proxy
        transport = self.link.transports[self.sink]
        if transport is None or transport.is_closing():
            proxy.bytes_dropped += len(data)
            return
        transport.write(data)
        proxy.bytes_forwarded += len(data)


class _Leg(asyncio.Protocol):
    """The protocol of one socket of a proxied connection (the client's or the target's)."""

    def __init__(self, proxy: LinkProxy, side: int, link: _Link | None = None) -> None:
        self._proxy = proxy
        self._side = side
        self._link = link

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream transport; not always an asyncio.Transport subclass (uvloop's are not).
        stream = cast(asyncio.Transport, transport)
        if self._side == _CLIENT:
            self._link = self._proxy._accept(stream)
        elif self._link is not None:
            self._link.target_connected(stream)

    def data_received(self, data: bytes) -> None:
        if self._link is not None:
            self._link.pipes[self._side].feed(data)

    def eof_received(self) -> bool:
        if self._link is not None:
            self._link.pipes[self._side].feed_signal(_Signal.EOF)
        return True  # keep the socket open: the other direction may still carry data

    def connection_lost(self, exc: Exception | None) -> None:
        if self._link is not None:
            self._link.leg_lost(self._side, exc)

    def pause_writing(self) -> None:
        if self._link is not None:
            self._link.sink_paused(self._side, True)

    def resume_writing(self) -> None:
        if self._link is not None:
            self._link.sink_paused(self._side, False)


class _Link:
    """One connection through the proxy: the accepted client socket and its target socket."""

    __slots__ = ("proxy", "loop", "transports", "reading", "lost", "pipes", "connect_task",
                 "aborted", "finished")

    def __init__(self, proxy: LinkProxy, loop: asyncio.AbstractEventLoop,
                 client: asyncio.Transport) -> None:
        self.proxy = proxy
        self.loop = loop
        self.transports: list[asyncio.Transport | None] = [client, None]
        self.reading = [True, True]
        self.lost: set[int] = set()
        self.pipes = (_Pipe(self, _CLIENT), _Pipe(self, _TARGET))
        self.connect_task: asyncio.Task[None] | None = None
        self.aborted = False
        self.finished = False  # both sockets gone; the proxy has forgotten this link

    def start(self) -> None:
        """Dial the target; the client's bytes wait in their pipe until it answers.

        (Pausing the client's socket from ``connection_made`` would not do: asyncio
        and uvloop both start reading right after that callback, cpython gh-103607.)
        """
        proxy = self.proxy
        task = self.loop.create_task(self._connect(), name=f"{proxy!r} connect")
        self.connect_task = task
        proxy._tasks.add(task)
        task.add_done_callback(self._connect_done)

    async def _connect(self) -> None:
        host, port = self.proxy._target_host_port
        try:
            await self.loop.create_connection(
                lambda: _Leg(self.proxy, _TARGET, self), host, port)
        except Exception as exc:  # an unreachable target closes the client, nothing else
            self.proxy.connections_failed += 1
            logger.debug("%r: cannot reach target %s: %r", self.proxy, self.proxy.target, exc)

    def _connect_done(self, task: asyncio.Task[None]) -> None:
        self.proxy._tasks.discard(task)
        target = self.transports[_TARGET]
        if target is None:  # failed or cancelled before connecting
            client = self.transports[_CLIENT]
            if client is not None and _CLIENT not in self.lost:
                client.abort()
            self._maybe_finish()
        elif task.cancelled() and _TARGET not in self.lost:
            # Cancelled after the socket came up: the loop closes that socket itself and
            # may never report it to our protocol (uvloop does not), so retire it here.
            target.abort()
            self.leg_lost(_TARGET, ConnectionAbortedError("connect cancelled"))

    def target_connected(self, transport: asyncio.Transport) -> None:
        """The target's socket is up: start forwarding, unless the link died meanwhile."""
        self.transports[_TARGET] = transport
        proxy = self.proxy
        if self.aborted or _CLIENT in self.lost or proxy._mode is LinkMode.CUT or proxy._closing:
            transport.abort()
            return
        proxy._link_opened(self)
        self.pipes[_CLIENT].pump()  # what the client sent while we were dialling
        self.update_reading(_TARGET)

    def update_reading(self, side: int) -> None:
        """Pause or resume reading from `side` according to where its bytes can go."""
        transport = self.transports[side]
        if transport is None or side in self.lost or transport.is_closing():
            return
        pipe = self.pipes[side]
        if pipe.stopped or self.proxy._mode in _DROPPING:
            want = True  # whatever arrives is dropped, so never push back on the sender
        elif pipe.sink_paused:
            want = False
        else:
            want = pipe.queued_bytes <= (_HIGH_WATER if self.reading[side] else _LOW_WATER)
        if want != self.reading[side]:
            self.reading[side] = want
            if want:
                transport.resume_reading()
            else:
                transport.pause_reading()

    def sink_paused(self, side: int, paused: bool) -> None:
        """The socket of `side` crossed its write-buffer high (or low) water mark."""
        pipe = self.pipes[1 - side]
        pipe.sink_paused = paused
        self.update_reading(pipe.source)

    def deliver(self, pipe: _Pipe, signal: _Signal) -> None:
        """Pass the end of `pipe`'s direction on to its sink."""
        transport = self.transports[pipe.sink]
        usable = transport is not None and not transport.is_closing()
        if signal is _Signal.EOF:
            pipe.eof_delivered = True
            if usable and transport is not None:
                try:
                    if transport.can_write_eof():
                        transport.write_eof()
                    else:
                        transport.close()
                except OSError:  # the socket went meanwhile (ENOTCONN during a cut)
                    transport.abort()
            if all(p.eof_delivered for p in self.pipes):
                # Both directions ended: nothing more can cross, release the sockets.
                for other in self.transports:
                    if other is not None and not other.is_closing():
                        other.close()
            return
        pipe.stop()
        if usable and transport is not None:
            if signal is _Signal.CLOSE:
                transport.close()
            else:
                transport.abort()

    def leg_lost(self, side: int, exc: Exception | None) -> None:
        """The socket of `side` is gone: end its direction in order, stop writing to it."""
        if side in self.lost:
            return
        self.lost.add(side)
        self.proxy._link_closed(self)
        self.pipes[1 - side].stop()
        out = self.pipes[side]
        other = 1 - side
        if self.transports[other] is None:
            out.stop()
            if self.connect_task is not None and not self.connect_task.done():
                self.connect_task.cancel()
        elif other in self.lost:
            out.stop()
        else:
            out.feed_signal(_Signal.CLOSE if exc is None else _Signal.RESET)
        self._maybe_finish()

    def abort(self) -> None:
        """Close both sockets at once, discarding whatever is queued."""
        self.aborted = True
        self.proxy._link_closed(self)
        for pipe in self.pipes:
            pipe.stop()
        for side, transport in enumerate(self.transports):
            if transport is not None and side not in self.lost:
                transport.abort()
        # Only a connect still in progress is cancelled: once the target's socket is up,
        # aborting it above is what ends it (see `_connect_done`).
        if self.transports[_TARGET] is None and self.connect_task is not None \
                and not self.connect_task.done():
            self.connect_task.cancel()

    def _maybe_finish(self) -> None:
        if self.finished or _CLIENT not in self.lost:
            return
        target_gone = _TARGET in self.lost or (
            self.transports[_TARGET] is None
            and (self.connect_task is None or self.connect_task.done()))
        if target_gone:
            self.finished = True
            for pipe in self.pipes:
                pipe.stop()
            self.proxy._link_finished(self)

    def describe(self) -> str:
        """The two endpoints, for logs."""
        names = []
        for side, transport in enumerate(self.transports):
            peer = transport.get_extra_info("peername") if transport is not None else None
            names.append(f"{_SIDE_NAMES[side]}={peer}")
        return " ".join(names)


class LinkProxy:
    """A loopback TCP proxy between two nodes whose link can be delayed, blackholed or cut.

    ::

        async with LinkProxy(node_b_address) as proxy:
            await node_a.connect(proxy.address)     # A reaches B through the proxy
            proxy.blackhole()                       # silent partition: ticks stop
            ...
            proxy.restore()                         # the same sockets carry bytes again

    `target` is the ``"host:port"`` the proxy connects onward to for every connection it
    accepts. The proxy listens on `host` (``127.0.0.1``) at `port` (``0``: any free port);
    `start` returns the address to dial. `name` only labels logs and `repr`.

    Counters, for assertions: `connections_accepted` (every connection the listening
    socket accepted, refused ones included), `connections_refused` (closed at once because
    the link was cut or the proxy closing), `connections_failed` (closed because the
    target could not be reached), `bytes_forwarded` and `bytes_dropped` (both directions
    together). `connections` is the number of connections open through the proxy now.
    """

    def __init__(self, target: str, *, host: str = "127.0.0.1", port: int = 0,
                 name: str | None = None) -> None:
        self._target_host_port = parse_address(target)
        self._target = target
        self._host = host
        self._port = port
        self._name = name
        self._loop: asyncio.AbstractEventLoop | None = None  # bound by start()
        self._server: asyncio.Server | None = None
        self._address: str | None = None
        self._mode = LinkMode.PASS
        self._delay = 0.0
        self._links: set[_Link] = set()
        self._open: set[_Link] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._waiters: list[tuple[Callable[[int], bool], asyncio.Future[int]]] = []
        self._closing = False
        self._closed: asyncio.Future[None] | None = None
        self._all_finished: asyncio.Future[None] | None = None
        self.connections_accepted = 0
        self.connections_refused = 0
        self.connections_failed = 0
        self.bytes_forwarded = 0
        self.bytes_dropped = 0

    # -- lifecycle -------------------------------------------------------------------

    async def start(self) -> str:
        """Start listening; return the ``"host:port"`` that clients should dial."""
        if self._closing:
            raise RuntimeError(f"{self!r} is closed")
        if self._server is not None:
            raise RuntimeError(f"{self!r} is already started")
        self._loop = asyncio.get_running_loop()
        server = await self._loop.create_server(
            lambda: _Leg(self, _CLIENT), self._host, self._port)
        self._server = server
        host, port = server.sockets[0].getsockname()[:2]
        self._address = _format_address(host, port)
        logger.debug("%r: listening, forwarding to %s", self, self._target)
        return self._address

    async def close(self) -> None:
        """Stop listening and close every connection through the proxy. Idempotent.

        Returns once every socket the proxy opened is closed and no task of the proxy
        runs. A `wait_connections` or `wait_idle` still waiting raises `ConnectionError`.
        """
        if self._closed is not None:
            await self._closed
            return
        self._closing = True
        if self._server is None or self._loop is None:  # never started: nothing to release
            return
        loop = self._loop
        self._closed = loop.create_future()
        try:
            self._server.close()
            for link in list(self._links):
                link.abort()  # cancels the connects still in progress
            await asyncio.gather(*self._tasks, return_exceptions=True)
            if self._links:
                self._all_finished = loop.create_future()
                try:
                    await asyncio.wait_for(self._all_finished, _CLOSE_GRACE)
                except TimeoutError:
                    logger.warning("%r: %d connection(s) did not report closing within %.1fs",
                                   self, len(self._links), _CLOSE_GRACE)
            try:  # on Python >= 3.12 this also waits for every accepted socket to close
                await asyncio.wait_for(self._server.wait_closed(), _CLOSE_GRACE)
            except TimeoutError:
                logger.warning("%r: the listening server did not close within %.1fs",
                               self, _CLOSE_GRACE)
            for _predicate, waiter in self._waiters:
                if not waiter.done():
                    waiter.set_exception(ConnectionError(f"{self!r} closed"))
            self._waiters.clear()
        finally:
            self._closed.set_result(None)
        logger.debug("%r: closed", self)

    async def __aenter__(self) -> LinkProxy:
        if self._server is None:
            await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # -- properties ------------------------------------------------------------------

    @property
    def address(self) -> str:
        """The ``"host:port"`` the proxy listens on (clients dial this instead of the target)."""
        if self._address is None:
            raise RuntimeError(f"{self!r} is not started")
        return self._address

    @property
    def target(self) -> str:
        """The ``"host:port"`` every accepted connection is forwarded to.

        Setting it affects connections accepted afterwards only (for instance when the
        node behind the proxy restarted on another port).
        """
        return self._target

    @target.setter
    def target(self, address: str) -> None:
        self._target_host_port = parse_address(address)
        self._target = address

    @property
    def started(self) -> bool:
        """True once `start` has succeeded (it stays True after `close`)."""
        return self._server is not None

    @property
    def closed(self) -> bool:
        """True once `close` has been called."""
        return self._closing

    @property
    def mode(self) -> LinkMode:
        """What the proxy currently does with its connections."""
        return self._mode

    @property
    def delay_seconds(self) -> float:
        """The one-way delay added per chunk (0.0 unless the mode is `LinkMode.DELAY`)."""
        return self._delay

    @property
    def connections(self) -> int:
        """How many connections are open through the proxy (both sockets up)."""
        return len(self._open)

    # -- control ---------------------------------------------------------------------

    def pass_(self) -> None:
        """Forward bytes both ways untouched (the default). Same as `restore`."""
        self.set_mode(LinkMode.PASS)

    def restore(self) -> None:
        """Back to pass: accept new connections, resume forwarding on open ones.

        Blackholed connections carry bytes again (and deliver any close that was held);
        connections closed by `cut` stay closed.
        """
        self.set_mode(LinkMode.PASS)

    def delay(self, seconds: float) -> None:
        """Forward each chunk `seconds` later in each direction, preserving order.

        ``delay(0)`` is the same as `pass_`.
        """
        self.set_mode(LinkMode.DELAY, seconds)

    def blackhole(self) -> None:
        """Drop every byte both ways while keeping sockets open and accepting new ones."""
        self.set_mode(LinkMode.BLACKHOLE)

    def cut(self) -> None:
        """Close every connection and close new ones as soon as they are accepted."""
        self.set_mode(LinkMode.CUT)

    def set_mode(self, mode: LinkMode | str, delay: float = 0.0) -> None:
        """Switch to `mode`; `delay` (seconds) is only meaningful for `LinkMode.DELAY`.

        The change applies at once to every connection through the proxy and to the
        ones accepted later. ``set_mode("delay", 0)`` is the same as pass.
        """
        mode = LinkMode(mode)
        if isinstance(delay, bool) or not isinstance(delay, (int, float)) \
                or not math.isfinite(delay) or delay < 0:
            raise ValueError(f"delay must be a finite number of seconds >= 0, got {delay!r}")
        if mode is not LinkMode.DELAY and delay:
            raise ValueError(f"a delay only applies to mode 'delay', not {mode.value!r}")
        if mode is LinkMode.DELAY and delay == 0:
            mode = LinkMode.PASS
        previous = self._mode
        self._mode = mode
        self._delay = float(delay)
        if mode is not previous or mode is LinkMode.DELAY:
            logger.debug("%r: %s -> %s", self, previous.value, self.describe_mode())
        if mode is LinkMode.CUT:
            for link in list(self._links):
                link.abort()
            return
        for link in list(self._links):
            for pipe in link.pipes:
                if not pipe.stopped:
                    pipe.pump()
            for side in (_CLIENT, _TARGET):
                link.update_reading(side)

    def describe_mode(self) -> str:
        """The mode as text, with the delay when there is one: ``"delay 0.050s"``."""
        if self._mode is LinkMode.DELAY:
            return f"delay {self._delay:.3f}s"
        return self._mode.value

    # -- waiting ---------------------------------------------------------------------

    async def wait_connections(self, n: int = 1, timeout: float = 5.0) -> int:
        """Wait until at least `n` connections are open through the proxy; return the count.

        Raises `TimeoutError` after `timeout` seconds, `ConnectionError` if the proxy is
        closed meanwhile.
        """
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        return await self._wait(lambda count: count >= n, timeout)

    async def wait_idle(self, timeout: float = 5.0) -> None:
        """Wait until no connection is open through the proxy.

        Raises `TimeoutError` after `timeout` seconds.
        """
        await self._wait(lambda count: count == 0, timeout)

    async def _wait(self, predicate: Callable[[int], bool], timeout: float) -> int:
        if predicate(len(self._open)):
            return len(self._open)
        if self._closing:
            raise ConnectionError(f"{self!r} is closed")
        waiter: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        entry = (predicate, waiter)
        self._waiters.append(entry)
        try:
            return await asyncio.wait_for(waiter, timeout)
        finally:
            if entry in self._waiters:
                self._waiters.remove(entry)

    # -- callbacks from the connections ----------------------------------------------

    def _accept(self, transport: asyncio.Transport) -> _Link | None:
        self.connections_accepted += 1
        if self._mode is LinkMode.CUT or self._closing or self._loop is None:
            self.connections_refused += 1
            transport.abort()
            return None
        link = _Link(self, self._loop, transport)
        self._links.add(link)
        link.start()
        return link

    def _link_opened(self, link: _Link) -> None:
        self._open.add(link)
        logger.debug("%r: connection open: %s", self, link.describe())
        self._notify()

    def _link_closed(self, link: _Link) -> None:
        if link in self._open:
            self._open.discard(link)
            self._notify()

    def _link_finished(self, link: _Link) -> None:
        self._links.discard(link)
        self._link_closed(link)
        if not self._links and self._all_finished is not None and not self._all_finished.done():
            self._all_finished.set_result(None)

    def _notify(self) -> None:
        count = len(self._open)
        for predicate, waiter in self._waiters:
            if not waiter.done() and predicate(count):
                waiter.set_result(count)

    def __repr__(self) -> str:
        label = f" {self._name}" if self._name else ""
        where = self._address or "unstarted"
        return f"<LinkProxy{label} {where} -> {self._target} {self.describe_mode()}>"


DirectedLink = tuple[str, str]


class Partition:
    """Partition a small cluster into groups by switching the proxies between them.

    `proxies` maps each directed link ``(src, dst)`` to the `LinkProxy` through which
    node ``src`` dials node ``dst``. Both directions of a pair should be present when
    both nodes may dial (a full mesh), since either may own the TCP connection::

        async with Partition.for_targets({"A": a_addr, "B": b_addr, "C": c_addr}) as part:
            ...  # node X dials node Y at part.address(X, Y)
            part.split({"A"}, {"B", "C"})   # A is cut off from B and C, silently
            part.heal()                     # every link as it was before the split

    `mode` is what `split` does to the links between groups: ``"blackhole"`` (a silent
    partition, detected by missing ticks) or ``"cut"`` (connections closed, reconnects
    refused). `split` remembers the state of each link it severs and `heal` (or a later
    split that reunites the two nodes) puts it back, so a delay set on a link survives a
    partition. `start` starts any proxy not yet started; `close` closes them all.
    """

    def __init__(self, proxies: Mapping[DirectedLink, LinkProxy], *,
                 mode: LinkMode | str = LinkMode.BLACKHOLE) -> None:
        checked: dict[DirectedLink, LinkProxy] = {}
        for pair, proxy in proxies.items():
            if not (isinstance(pair, tuple) and len(pair) == 2
                    and all(isinstance(node, str) for node in pair)):
                raise TypeError(f"links are (src, dst) tuples of node names, got {pair!r}")
            if pair[0] == pair[1]:
                raise ValueError(f"a link joins two different nodes, got {pair!r}")
            if not isinstance(proxy, LinkProxy):
                raise TypeError(f"link {pair!r} maps to {proxy!r}, not a LinkProxy")
            checked[pair] = proxy
        self._proxies = checked
        self._nodes = frozenset(node for pair in checked for node in pair)
        self._mode = self._severing_mode(mode)
        self._saved: dict[DirectedLink, tuple[LinkMode, float]] = {}
        self._groups: tuple[frozenset[str], ...] | None = None

    @classmethod
    def for_targets(cls, targets: Mapping[str, str], *,
                    mode: LinkMode | str = LinkMode.BLACKHOLE) -> Partition:
        """A partition with a new (unstarted) proxy for every ordered pair of nodes.

        `targets` maps each node name to the ``"host:port"`` it listens on; the proxy of
        ``(src, dst)`` forwards to ``targets[dst]``. Start them with ``await
        part.start()`` or ``async with``.
        """
        proxies = {(src, dst): LinkProxy(targets[dst], name=f"{src}->{dst}")
                   for src in targets for dst in targets if src != dst}
        return cls(proxies, mode=mode)

    @staticmethod
    def _severing_mode(mode: LinkMode | str) -> LinkMode:
        mode = LinkMode(mode)
        if mode not in _DROPPING:
            raise ValueError(f"a partition blackholes or cuts links, not {mode.value!r}")
        return mode

    async def start(self) -> None:
        """Start every proxy that is not started yet; close them all if one fails."""
        try:
            for proxy in self._proxies.values():
                if not proxy.started:
                    await proxy.start()
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        """Close every proxy of the partition. Idempotent."""
        for proxy in self._proxies.values():
            await proxy.close()

    async def __aenter__(self) -> Partition:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    @property
    def nodes(self) -> frozenset[str]:
        """Every node named by a link."""
        return self._nodes

    @property
    def proxies(self) -> Mapping[DirectedLink, LinkProxy]:
        """The proxy of each directed link (read-only)."""
        return types.MappingProxyType(self._proxies)

    @property
    def groups(self) -> tuple[frozenset[str], ...] | None:
        """The groups of the current split, or None when healed."""
        return self._groups

    @property
    def severed(self) -> frozenset[DirectedLink]:
        """The directed links the current split has severed."""
        return frozenset(self._saved)

    def proxy(self, src: str, dst: str) -> LinkProxy:
        """The proxy through which `src` dials `dst`."""
        try:
            return self._proxies[(src, dst)]
        except KeyError:
            raise KeyError(f"no proxy for link {src!r} -> {dst!r}") from None

    def address(self, src: str, dst: str) -> str:
        """The address `src` should dial to reach `dst` through its proxy."""
        return self.proxy(src, dst).address

    def split(self, *groups: Iterable[str] | str, mode: LinkMode | str | None = None) -> None:
        """Partition the nodes into `groups`: sever every link between two groups.

        Each group is an iterable of node names (a bare string is one node). The groups
        must be disjoint and together name every node of the partition. Links inside a
        group that an earlier split severed are put back as they were. `mode` overrides
        the partition's severing mode for this call.
        """
        severing = self._mode if mode is None else self._severing_mode(mode)
        group_of: dict[str, int] = {}
        normalized: list[frozenset[str]] = []
        for group in groups:
            members = frozenset((group,) if isinstance(group, str) else group)
            if not members:
                continue
            unknown = members - self._nodes
            if unknown:
                raise ValueError(f"unknown node(s) {sorted(unknown)}; nodes are {sorted(self._nodes)}")
            overlap = members & group_of.keys()
            if overlap:
                raise ValueError(f"node(s) {sorted(overlap)} appear in more than one group")
            for node in members:
                group_of[node] = len(normalized)
            normalized.append(members)
        missing = self._nodes - group_of.keys()
        if missing:
            raise ValueError(f"node(s) {sorted(missing)} are in no group; every node must be placed")
        for pair, proxy in self._proxies.items():
            src, dst = pair
            if group_of[src] != group_of[dst]:
                if pair not in self._saved:
                    self._saved[pair] = (proxy.mode, proxy.delay_seconds)
                proxy.set_mode(severing)
            elif pair in self._saved:
                saved_mode, saved_delay = self._saved.pop(pair)
                proxy.set_mode(saved_mode, saved_delay)
        self._groups = tuple(normalized) if len(normalized) > 1 else None
        logger.info("partition: %s", " | ".join("{" + ", ".join(sorted(g)) + "}" for g in normalized))

    def isolate(self, *nodes: str, mode: LinkMode | str | None = None) -> None:
        """Split `nodes` from the rest of the cluster: ``split(nodes, others)``."""
        self.split(set(nodes), self._nodes - set(nodes), mode=mode)

    def heal(self) -> None:
        """Put back every link the split severed, as it was before."""
        for pair, (saved_mode, saved_delay) in self._saved.items():
            self._proxies[pair].set_mode(saved_mode, saved_delay)
        self._saved.clear()
        self._groups = None
        logger.info("partition healed")

    def __repr__(self) -> str:
        if self._groups is None:
            state = "healed"
        else:
            state = " | ".join("{" + ",".join(sorted(g)) + "}" for g in self._groups)
        return f"<Partition {sorted(self._nodes)} {state}>"
