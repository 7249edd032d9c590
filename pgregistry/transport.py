"""Authenticated, framed, batched connections between nodes (layer 3).

An `Endpoint` (one per node) listens and dials; every stream it accepts or opens (TCP,
or TLS when given an `ssl.SSLContext`) is a `Connection` carrying the frames of
`pgregistry.wire`. The transport moves terms between nodes that share a cookie and knows
nothing of processes or registries. Everything runs on the loop that started the
endpoint. On each connection:

 * first the handshake of `pgregistry.handshake` (hello, challenge, response, accept, or
   refuse); then `on_connection(conn)`, on both sides
 * then every non-empty frame is one message: `send` writes the first of a loop
   iteration at once and queues the rest for one write at the next iteration (what
   ``on_message`` sends back leaves at the end of the read); the peer's
   `on_message(conn, term)` gets them in order
 * a side that wrote nothing for ``tick_interval`` sends a tick (an empty frame)

What closes a connection (then `on_close(conn, reason)`, once, from a fresh callback):
 * nothing heard for ``down_after`` ("timeout"); output the peer does not take piling
   up over ``send_buffer_limit`` ("overloaded"); the peer ("closed by peer"); `close`
 * a broken stream (bad length, oversized or truncated frame), a failed or slow
   handshake, an exception from ``on_message`` or ``on_connection``. A well-framed
   message that does not decode is dropped alone and counted: the connection stays up

The full protocol is in docs/protocol.md.
"""

from __future__ import annotations

import asyncio
import logging
import ssl as _ssl
import struct
from collections.abc import Callable
from typing import Any, Final, cast

from .checks import check_int, check_liveness, check_max_frame, check_seconds, parse_address
from .errors import AuthenticationError
from .handshake import (
    HANDSHAKE_MAX_FRAME,
    MAX_NODE_ID_LEN,
    MIN_MAX_FRAME,
    PROTOCOL_VERSION,
    Handshake,
    HandshakeError,
    certificate_names,
    certificate_proves,
    failure_kind,
    set_nodelay,
)
from .logbudget import LogBudget
from .terms import short_repr
from .wire import MAX_FRAME, FrameDecoder, Limits, WireError, decode, encode

__all__ = [
    "HANDSHAKE_MAX_FRAME",
    "MIN_MAX_FRAME",
    "PROTOCOL_VERSION",
    "REASON_ENDPOINT_CLOSED",
    "REASON_OVERLOADED",
    "REASON_PEER_CLOSED",
    "REASON_TIMEOUT",
    "Connection",
    "Endpoint",
    "HandshakeError",
    "certificate_names",
    "certificate_proves",
    "check_int",
    "check_max_frame",
    "check_seconds",
    "parse_address",
]

logger = logging.getLogger("pgregistry.transport")

REASON_TIMEOUT: Final = "timeout"
REASON_OVERLOADED: Final = "overloaded"
REASON_PEER_CLOSED: Final = "closed by peer"
REASON_ENDPOINT_CLOSED: Final = "endpoint closed"

_TICK: Final = b"\0\0\0\0"
_HEADER: Final = struct.Struct(">I")
_pack_header: Final = _HEADER.pack

# Connection states.
_NEW: Final = 0  # no socket yet
_HANDSHAKING: Final = 1
_OPEN: Final = 2
_CLOSED: Final = 3


def _ignore(*args: Any) -> None:
    """The default ``on_connection``, ``on_message`` and ``on_close``: ignore (drop)."""


class Connection(asyncio.Protocol):
    """One connection to a peer node; created by an `Endpoint`, never directly.

    Public, read-only attributes: ``peer_id`` and ``peer_creation`` (the peer's node id
    and creation, valid once established), ``peer_max_frame``, ``peer_address`` (the
    socket's peer address), ``initiated`` (True if this node connected),
    ``close_reason`` (None while open), and the counters ``bytes_sent``,
    ``bytes_received``, ``messages_sent``, ``messages_received`` (ticks and the
    handshake count as bytes, not messages; bytes are counted when handed to, or
    received from, the socket) and ``messages_dropped`` (well-framed messages that did
    not decode: each is dropped alone, with a rate-limited warning, and the connection
    stays up).
    """

    __slots__ = (
        "_decoder",
        "_drain_waiters",
        "_endpoint",
        "_flush_scheduled",
        "_handshake",
        "_heard",
        "_hs_future",
        "_hs_timer",
        "_idle_checks",
        "_last_heard",
        "_limits",
        "_linger",
        "_loop",
        "_lost",
        "_on_message",
        "_out",
        "_out_size",
        "_paused",
        "_send_limit",
        "_state",
        "_transport",
        "_wrote",
        "bytes_received",
        "bytes_sent",
        "close_reason",
        "initiated",
        "messages_dropped",
        "messages_received",
        "messages_sent",
        "peer_address",
        "peer_creation",
        "peer_id",
        "peer_max_frame",
    )

    def __init__(self, endpoint: Endpoint, initiated: bool) -> None:
        self._endpoint = endpoint
        loop = endpoint._require_loop()
        self._loop = loop
        self.initiated = initiated
        self.peer_id = ""
        self.peer_creation = 0
        self.peer_max_frame = 0
        self.peer_address: Any = None
        self.close_reason: str | None = None
        self.bytes_sent = 0
        self.bytes_received = 0
        self.messages_sent = 0
        self.messages_received = 0
        self.messages_dropped = 0
        self._transport: asyncio.Transport | None = None
        self._state = _NEW
        self._handshake: Handshake | None = None  # while handshaking
        self._decoder: FrameDecoder | None = None
        self._limits = endpoint._limits
        self._on_message = endpoint._on_message
        self._out: list[bytes] = []
        self._out_size = 0
        self._flush_scheduled = False
        self._send_limit = endpoint.send_buffer_limit
        self._paused = False
        self._drain_waiters: list[asyncio.Future[None]] = []
        self._heard = False
        self._last_heard = 0.0
        self._wrote = False
        self._idle_checks = 0
        self._hs_timer: asyncio.TimerHandle | None = None
        self._hs_future: asyncio.Future[None] | None = loop.create_future() if initiated else None
        self._linger: asyncio.TimerHandle | None = None
        self._lost: asyncio.Future[None] = loop.create_future()

    def __repr__(self) -> str:
        direction = "to" if self.initiated else "from"
        state = "closed" if self._state == _CLOSED else "open" if self._state == _OPEN else "handshaking"
        address = self.peer_address
        where = f"{address[0]}:{address[1]}" if isinstance(address, tuple) and len(address) >= 2 else address
        peer = f"{self.peer_id!r} at {where}" if self.peer_id else f"{where}"
        return f"<Connection {direction} {peer} {state}>"

    # -- public API -------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        """True once the connection is closed (by either side, for any reason)."""
        return self._state == _CLOSED

    @property
    def established(self) -> bool:
        """True between the end of the handshake and the close."""
        return self._state == _OPEN

    def send(self, term: Any) -> None:
        """Send `term` to the peer: at once if it is the first this loop iteration, else queued.

        Never awaits, never calls a callback. `TypeError` if `term` is not a term,
        `ValueError` if its encoding exceeds the peer's ``max_frame``, `RuntimeError` on a
        connection still in its handshake. On a closed connection the term is dropped
        silently (``on_close`` tells the owner). If the unwritten output exceeds
        ``send_buffer_limit``, the connection is closed with reason ``"overloaded"``.
        """
        self._enqueue(encode(term))

    def send_encoded(self, payload: bytes) -> None:
        """Like `send` for a payload already made by ``wire.encode`` (encode once, send to many).

        The payload is not checked: it must be exactly the output of ``wire.encode``.
        """
        if type(payload) is not bytes:
            raise TypeError(f"send_encoded needs bytes, got {type(payload).__name__}")
        self._enqueue(payload)

    def _enqueue(self, payload: bytes) -> None:
        """Write the frame of one encoded term, or queue it for the next iteration's flush."""
        size = len(payload)
        if self._state != _OPEN:
            self._not_open()
            return
        if not size:
            raise ValueError("an empty payload is not an encoded term")
        if size > self.peer_max_frame:
            raise ValueError(f"message of {size} bytes exceeds the peer's frame limit of {self.peer_max_frame}")
        self.messages_sent += 1
        if not self._flush_scheduled:
            # The first message of a loop iteration goes at once (no loop turn of delay);
            # the rest wait for the one flush at the start of the next iteration.
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)
            if not self._paused:
                self._write_out(_pack_header(size) + payload, size + 4)
                return
        out = self._out
        out.append(_pack_header(size))
        out.append(payload)
        self._out_size += size + 4
        if self._out_size > self._send_limit:
            self._overloaded()

    async def drain(self) -> None:
        """Write the queued output now, then wait until the transport is below its low-water mark.

        For bulk senders (a sync of many entries): ``send`` a batch, ``await drain()``.
        Raises `ConnectionError` if the connection is or becomes closed. There is no
        timeout here: a peer that stops reading is cut off by ``send_buffer_limit`` or
        ``down_after``, which ends the wait. Cancelling the wait loses nothing: the output
        stays queued.
        """
        if self._state == _OPEN:
            self._flush()
        while self._state == _OPEN and self._paused:
            waiter: asyncio.Future[None] = self._loop.create_future()
            self._drain_waiters.append(waiter)
            await waiter
        if self._state != _OPEN:
            raise ConnectionError(f"connection {self!r} is closed: {self.close_reason}")

    def close(self, reason: str = "closed") -> None:
        """Close the connection: queued output is still written, then the socket is closed.

        ``on_close(self, reason)`` follows from a later loop callback. Idempotent. The
        socket is aborted if the peer has not taken the output within ``down_after``.
        """
        if type(reason) is not str:
            raise TypeError(f"reason must be a str, got {short_repr(reason)}")
        self._close(reason)

    async def wait_closed(self) -> None:
        """Wait until the socket is closed (after `close`, or after the peer went away).

        Cancelling the wait does not touch the connection.
        """
        await asyncio.shield(self._lost)

    # -- asyncio.Protocol ----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses but have its interface.
        transport = cast(asyncio.Transport, transport)
        self._transport = transport
        self.peer_address = transport.get_extra_info("peername")
        endpoint = self._endpoint
        if self._state == _CLOSED:  # `connect` gave up before the socket was ready
            transport.abort()
            return
        if endpoint._closing:
            self._close(REASON_ENDPOINT_CLOSED, abort=True, log=False)
            return
        set_nodelay(transport)
        self._hs_timer = self._loop.call_later(endpoint.handshake_timeout, self._handshake_timed_out)
        handshake = Handshake(
            endpoint,
            endpoint._key,
            initiated=self.initiated,
            write=self._write_raw,
            ssl_object=transport.get_extra_info("ssl_object"),
        )
        self._handshake = handshake
        self._state = _HANDSHAKING
        handshake.begin()
        if not self.initiated:
            endpoint._admit(self)

    def data_received(self, data: bytes) -> None:
        self.bytes_received += len(data)
        self._heard = True
        if self._state == _OPEN:
            self._receive(data)
        elif self._state != _CLOSED:
            self._handshake_data(data)

    def eof_received(self) -> bool | None:
        if self._state == _OPEN:
            decoder = self._decoder
            if decoder is not None and decoder.pending:
                self._endpoint._count(self._endpoint._frames_rejected, "truncated")
                self._fail(f"truncated frame at end of stream ({decoder.pending} bytes of a frame)")
            else:
                self._close(REASON_PEER_CLOSED)
        elif self._state != _CLOSED:
            if self._handshake is not None and self._handshake.pending:
                self._fail_handshake(HandshakeError("closed", "truncated handshake frame at end of stream"))
            else:
                self._fail_handshake(HandshakeError("closed", "the peer closed the connection during the handshake"))
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if self._linger is not None:
            self._linger.cancel()
            self._linger = None
        self._transport = None  # gone: `_close` must not write to it
        if self._state == _OPEN:
            self._close(REASON_PEER_CLOSED if exc is None else f"connection lost: {exc}")
        elif self._state != _CLOSED:
            detail = "the peer closed the connection during the handshake" if exc is None else f"connection lost: {exc}"
            self._fail_handshake(HandshakeError("closed", detail))
        self._state = _CLOSED
        self._out = []
        self._out_size = 0
        if not self._lost.done():
            self._lost.set_result(None)
        self._wake_drainers()

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        self._wake_drainers()

    # -- data path ----------------------------------------------------------------------

    def _receive(self, data: bytes) -> None:
        """Decode the frames in `data` and deliver their messages (established state)."""
        decoder = self._decoder
        assert decoder is not None
        try:
            frames = decoder.feed(data)
        except WireError as exc:
            self._endpoint._count(self._endpoint._frames_rejected, "malformed")
            self._fail(f"malformed frame: {exc}")
            return
        # What the messages make us send back goes in one write at the end of this callback.
        held = self._flush_scheduled
        self._flush_scheduled = True
        limits = self._limits
        on_message = self._on_message
        try:
            for payload in frames:
                if not payload:
                    continue  # tick
                try:
                    term = decode(payload, limits)
                except WireError as exc:
                    # The framing is intact, so the stream is still usable: this message
                    # alone is dropped. Closing instead would cost the peer every entry it
                    # holds here, and its next sync round would resend the same payload.
                    self.messages_dropped += 1
                    self._endpoint._count(self._endpoint._frames_rejected, "undecodable")
                    self._endpoint._input_log.warning("connection %r: dropped a malformed message: %s", self, exc)
                    continue
                self.messages_received += 1
                try:
                    on_message(self, term)
                except Exception:
                    logger.exception("connection %r: on_message raised; closing the connection", self)
                    self._close("on_message raised")
                    return
                if self._state != _OPEN:
                    return
        finally:
            if not held:
                self._flush_scheduled = False
            self._write_out()

    def _flush(self) -> None:
        self._flush_scheduled = False
        self._write_out()

    def _write_out(self, data: bytes = b"", size: int = 0) -> None:
        """Write `data` (a frame) or else the queued output, now (established state)."""
        if not data:
            out = self._out
            if not out or self._state != _OPEN:
                return
            self._out = []
            size = self._out_size
            self._out_size = 0
            data = b"".join(out)
        self.bytes_sent += size
        self._wrote = True
        transport = self._transport
        assert transport is not None
        transport.write(data)
        if transport.get_write_buffer_size() > self._send_limit:
            self._overloaded()

    def _write_raw(self, data: bytes) -> None:
        transport = self._transport
        if transport is not None and not transport.is_closing():
            self.bytes_sent += len(data)
            transport.write(data)

    def _not_open(self) -> None:
        if self._state != _CLOSED:
            raise RuntimeError(f"connection {self!r} is still in its handshake")

    def _overloaded(self) -> None:
        logger.warning(
            "connection %r: %d bytes of output not taken by the peer (limit %d); closing it",
            self,
            self._out_size + (self._transport.get_write_buffer_size() if self._transport else 0),
            self._send_limit,
        )
        self._close(REASON_OVERLOADED, abort=True, log=False)

    def _tick(self, now: float, down_after: float, late: bool) -> None:
        """One run of the endpoint's liveness timer over this (established) connection.

        `late` means this run started late because the loop was blocked: the silence may
        be ours, not the peer's (input that arrived meanwhile may not even be read yet:
        uvloop runs due timers before polling), so nobody is declared down in this run,
        and the peer gets a tick at once, lest it declare this node down.
        """
        if self._heard:
            self._heard = False
            self._last_heard = now
        elif not late and now - self._last_heard >= down_after:
            logger.warning("connection %r: nothing received for %.3g s; closing it", self, now - self._last_heard)
            self._close(REASON_TIMEOUT, abort=True, log=False)
            return
        if late:
            self._wrote = False
            self._idle_checks = 0
            if not self._out:
                self._write_raw(_TICK)
        elif self._wrote:
            self._wrote = False
            self._idle_checks = 0
        elif not self._out:  # (otherwise a flush is already scheduled)
            self._idle_checks += 1
            if self._idle_checks >= 2:
                self._idle_checks = 0
                self._write_raw(_TICK)

    def _wake_drainers(self) -> None:
        waiters = self._drain_waiters
        if waiters:
            self._drain_waiters = []
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(None)

    # -- handshake ----------------------------------------------------------------------

    def _handshake_data(self, data: bytes) -> None:
        handshake = self._handshake
        assert handshake is not None
        rest: bytes | None = None
        failure: Exception | None = None
        try:
            rest = handshake.receive(data)
        except (AuthenticationError, HandshakeError) as exc:
            failure = exc
        # From the peer's hello or challenge on, logs and callbacks name the peer.
        self.peer_id, self.peer_creation, self.peer_max_frame = (
            handshake.peer_id,
            handshake.peer_creation,
            handshake.peer_max_frame,
        )
        if failure is not None:
            self._fail_handshake(failure)
        elif rest is not None:
            self._establish()
            if rest and self._state == _OPEN:
                self._receive(rest)  # messages that came in the same read as the last handshake frame

    def _fail_handshake(self, exc: Exception) -> None:
        if self._state in (_CLOSED, _OPEN):
            return
        endpoint = self._endpoint
        endpoint._count(endpoint._handshake_failures, failure_kind(exc))
        if self.initiated:
            logger.info("connection %r: handshake failed: %s", self, exc)
        else:
            endpoint._log_unauthenticated("connection %r: handshake failed: %s", self, exc)
        self._close(str(exc), exc=exc, log=False)

    def _handshake_timed_out(self) -> None:
        self._hs_timer = None
        if self._state not in (_CLOSED, _OPEN):
            timeout = self._endpoint.handshake_timeout
            self._fail_handshake(TimeoutError(f"handshake not finished within {timeout:g} s"))

    def _establish(self) -> None:
        endpoint = self._endpoint
        if self._hs_timer is not None:
            self._hs_timer.cancel()
            self._hs_timer = None
        endpoint._pending_inbound.pop(self, None)
        endpoint._connecting.discard(self)
        self._state = _OPEN
        self._handshake = None
        self._decoder = FrameDecoder(endpoint.max_frame)
        self._last_heard = self._loop.time()
        transport = self._transport
        assert transport is not None
        transport.set_write_buffer_limits(high=endpoint._high_water, low=endpoint._low_water)
        endpoint._established[self] = None
        logger.info("connection %r: established (creation %d)", self, self.peer_creation)
        try:
            endpoint._on_connection(self)
        except Exception:
            logger.exception("connection %r: on_connection raised; closing the connection", self)
            self._close("on_connection raised")
        future = self._hs_future
        if future is not None and not future.done():
            future.set_result(None)

    # -- closing ------------------------------------------------------------------------

    def _fail(self, reason: str) -> None:
        """Close an established connection because of bad input from the peer."""
        logger.warning("connection %r: %s; closing it", self, reason)
        self._close(reason, abort=True, log=False)

    def _close(self, reason: str, *, abort: bool = False, exc: Exception | None = None, log: bool = True) -> None:
        state = self._state
        if state == _CLOSED:
            return
        was_open = state == _OPEN
        self._state = _CLOSED
        self._handshake = None
        self.close_reason = reason
        endpoint = self._endpoint
        endpoint._pending_inbound.pop(self, None)
        endpoint._connecting.discard(self)
        endpoint._established.pop(self, None)
        if self._hs_timer is not None:
            self._hs_timer.cancel()
            self._hs_timer = None
        future = self._hs_future
        if future is not None and not future.done():
            future.set_exception(exc if exc is not None else ConnectionError(f"connection closed: {reason}"))
        if log and was_open:
            logger.info("connection %r: closed: %s", self, reason)
        transport = self._transport
        if transport is not None:
            if abort:
                transport.abort()
            elif was_open:
                out = self._out
                if out:
                    self.bytes_sent += self._out_size
                    transport.write(b"".join(out))
                transport.close()
                if transport.get_write_buffer_size():
                    self._linger_abort(transport, endpoint.down_after)
            else:
                transport.close()  # lets a refuse message reach the peer
                self._linger_abort(transport, endpoint.handshake_timeout)
        elif not self._lost.done():
            self._lost.set_result(None)  # never had a socket
        self._out = []
        self._out_size = 0
        self._wake_drainers()
        if was_open:
            self._loop.call_soon(endpoint._notify_close, self, reason)

    def _linger_abort(self, transport: asyncio.Transport, delay: float) -> None:
        if self._linger is None and not self._lost.done():
            self._linger = self._loop.call_later(delay, transport.abort)


OnConnection = Callable[[Connection], None]
OnMessage = Callable[[Connection, Any], None]
OnClose = Callable[[Connection, str], None]


class Endpoint:
    """A node's listener and its connections to peers.

    ``Endpoint(name, cookie, *, creation=0, host="127.0.0.1", advertise_host=None, port=0, ssl=None,
    client_ssl=None, tick_interval=1.0, down_after=5.0, max_frame=wire.MAX_FRAME,
    handshake_timeout=5.0, max_pending_handshakes=64, send_buffer_limit=64 MiB,
    on_connection=None, on_message=None, on_close=None)``; every argument is checked
    here (`TypeError`/`ValueError`). ``ssl`` is used to listen and, unless
    ``client_ssl`` is given, to connect (so it must then be usable on both sides, e.g.
    ``ssl.SSLContext(ssl.PROTOCOL_TLS)`` with a certificate and CA loaded).

    ``node_id`` defaults to ``"name@advertise_host:port"`` (``advertise_host`` defaults to
    ``host``, the address bound) once `start` knows the port; the caller
    may set ``node_id`` and ``creation`` after `start`, before the first handshake.
    """

    def __init__(
        self,
        name: str,
        cookie: str,
        *,
        creation: int = 0,
        host: str = "127.0.0.1",
        advertise_host: str | None = None,
        port: int = 0,
        ssl: _ssl.SSLContext | None = None,
        client_ssl: _ssl.SSLContext | None = None,
        tick_interval: float = 1.0,
        down_after: float = 5.0,
        max_frame: int = MAX_FRAME,
        handshake_timeout: float = 5.0,
        max_pending_handshakes: int = 64,
        send_buffer_limit: int = 64 * 1024 * 1024,
        on_connection: OnConnection | None = None,
        on_message: OnMessage | None = None,
        on_close: OnClose | None = None,
    ) -> None:
        if type(name) is not str or not name:
            raise TypeError(f"name must be a non-empty str, got {short_repr(name)}")
        if type(cookie) is not str:
            raise TypeError(f"cookie must be a str, got {type(cookie).__name__}")
        if not cookie:
            raise ValueError("cookie must not be empty")
        if type(host) is not str or not host:
            raise TypeError(f"host must be a non-empty str, got {short_repr(host)}")
        if advertise_host is not None and (type(advertise_host) is not str or not advertise_host):
            raise TypeError(f"advertise_host must be a non-empty str or None, got {short_repr(advertise_host)}")
        for what, context in (("ssl", ssl), ("client_ssl", client_ssl)):
            if context is not None and not isinstance(context, _ssl.SSLContext):
                raise TypeError(f"{what} must be an ssl.SSLContext or None, got {short_repr(context)}")
        self.name = name
        self._key = cookie.encode("utf-8", "surrogatepass")
        self.host = host
        self.advertise_host = host if advertise_host is None else advertise_host
        self.port = check_int("port", port, 0, 65535)
        self.ssl = ssl
        self.client_ssl = client_ssl if client_ssl is not None else ssl
        if ssl is not None and ssl.protocol == _ssl.PROTOCOL_TLS_CLIENT:
            raise ValueError("ssl is a client-only context (PROTOCOL_TLS_CLIENT); the endpoint listens with it")
        if self.client_ssl is not None and self.client_ssl.protocol == _ssl.PROTOCOL_TLS_SERVER:
            raise ValueError(
                "the context used to connect is server-only (PROTOCOL_TLS_SERVER): give client_ssl, "
                "or one ssl.SSLContext(ssl.PROTOCOL_TLS) usable on both sides"
            )
        self.tick_interval, self.down_after = check_liveness(tick_interval, down_after)
        self.max_frame = check_max_frame(max_frame)
        self.handshake_timeout = check_seconds("handshake_timeout", handshake_timeout)
        self.max_pending_handshakes = check_int("max_pending_handshakes", max_pending_handshakes, 1, 1_000_000)
        self.send_buffer_limit = check_int("send_buffer_limit", send_buffer_limit, 1, 2**62)
        for what, callback in (("on_connection", on_connection), ("on_message", on_message), ("on_close", on_close)):
            if callback is not None and not callable(callback):
                raise TypeError(f"{what} must be callable or None, got {short_repr(callback)}")
        self._on_connection: OnConnection = on_connection or _ignore
        self._on_message: OnMessage = on_message or _ignore
        self._on_close: OnClose = on_close or _ignore
        self._node_id: str | None = None
        self._input_log = LogBudget(logger, f"endpoint {name}")
        self._creation = 0
        self.creation = creation
        # The transport's write buffer pauses the producer (drain) above this; the
        # overload limit stays well above it.
        self._high_water = max(1, min(1024 * 1024, self.send_buffer_limit // 2))
        self._low_water = self._high_water // 4
        self._limits = Limits(
            max_size=self.max_frame,
            max_str_len=self.max_frame,
            max_bin_len=self.max_frame,
            max_array_len=self.max_frame,
            max_map_len=self.max_frame // 2,
            max_ext_len=self.max_frame,
        )
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.Server | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_due = 0.0
        self._was_late = False
        self._closing = False
        self._closed = asyncio.Event()
        self._pending_inbound: dict[Connection, None] = {}  # insertion order = age
        self._connecting: set[Connection] = set()
        self._established: dict[Connection, None] = {}
        self._unauthenticated_log = LogBudget(logger, f"endpoint {name} (unauthenticated connections)")
        # Counts of rare failures by reason, for metrics (see the properties below).
        self._handshake_failures: dict[str, int] = {}
        self._frames_rejected: dict[str, int] = {}

    def __repr__(self) -> str:
        return f"<Endpoint {self._node_id or self.name} {len(self._established)} connections>"

    # -- identity -----------------------------------------------------------------------

    @property
    def node_id(self) -> str:
        """This node's id as sent in handshakes (``"name@host:port"`` unless set)."""
        if self._node_id is None:
            raise RuntimeError("the endpoint has no node id before start()")
        return self._node_id

    @node_id.setter
    def node_id(self, value: str) -> None:
        if type(value) is not str or not 0 < len(value) <= MAX_NODE_ID_LEN or not value.isprintable():
            raise ValueError(f"node_id must be a printable str of 1..{MAX_NODE_ID_LEN} characters, "
                             f"got {short_repr(value, 80)}")
        self._node_id = value

    @property
    def creation(self) -> int:
        """This node's incarnation as sent in handshakes."""
        return self._creation

    @creation.setter
    def creation(self, value: int) -> None:
        self._creation = check_int("creation", value, 0, 2**64 - 1)

    @property
    def connections(self) -> list[Connection]:
        """The established connections, oldest first."""
        return list(self._established)

    @property
    def handshake_failures(self) -> dict[str, int]:
        """Handshakes that failed since start, by reason: ``"cookie"``, a `HandshakeError`
        kind (``"version"``, ``"protocol"``, ``"self"``, ``"identity"``, ``"closed"``),
        ``"timeout"``, ``"evicted"`` (too many pending handshakes), or an exception's type."""
        return dict(self._handshake_failures)

    @property
    def frames_rejected(self) -> dict[str, int]:
        """Frames from established peers rejected since start, by reason: ``"malformed"``
        (bad length or oversized: the connection closes), ``"truncated"`` (at end of
        stream) and ``"undecodable"`` (well framed but not a term: dropped alone)."""
        return dict(self._frames_rejected)

    @staticmethod
    def _count(counts: dict[str, int], reason: str) -> None:
        counts[reason] = counts.get(reason, 0) + 1

    @property
    def pending_handshakes(self) -> int:
        """Inbound connections still in their handshake."""
        return len(self._pending_inbound)

    # -- lifecycle ----------------------------------------------------------------------

    def _require_loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            raise RuntimeError("the endpoint is not started")
        return self._loop

    async def start(self) -> tuple[str, int]:
        """Listen on ``host:port``; return ``(host, port)`` with the real port (when 0 was asked).

        `OSError` if the address cannot be bound; `RuntimeError` if already started. An
        endpoint whose start failed or was cancelled stays closed: make a new one.
        """
        if self._loop is not None:
            raise RuntimeError("the endpoint was already started")
        loop = asyncio.get_running_loop()
        self._loop = loop
        try:
            server = await self._bind(loop)
        except BaseException:
            self._closing = True
            self._closed.set()
            raise
        self._server = server
        if self._node_id is None:
            self._node_id = f"{self.name}@{self.advertise_host}:{self.port}"
        self._timer_due = loop.time() + self.tick_interval / 2
        self._timer = loop.call_at(self._timer_due, self._on_timer)
        logger.info("endpoint %s listening on %s:%d%s", self._node_id, self.host, self.port,
                    " (TLS)" if self.ssl else "")
        return self.host, self.port

    async def _bind(self, loop: asyncio.AbstractEventLoop) -> asyncio.Server:
        port = self.port
        for _attempt in range(5):
            server = await loop.create_server(
                self._accepted,
                self.host,
                port,
                ssl=self.ssl,
                ssl_handshake_timeout=self.handshake_timeout if self.ssl is not None else None,
                backlog=1024,
            )
            ports = {sock.getsockname()[1] for sock in server.sockets}
            if len(ports) == 1:
                self.port = ports.pop()
                return server
            # Port 0 on a host with several addresses: give them all the port of the first.
            port = server.sockets[0].getsockname()[1]
            server.close()
        raise OSError(f"could not bind every address of {self.host!r} to one port")

    def _accepted(self) -> Connection:
        return Connection(self, initiated=False)

    async def connect(self, address: str) -> Connection:
        """Connect to ``"host:port"`` (or a node id) and complete the handshake.

        Returns the established connection (already reported to ``on_connection``).
        Raises `AuthenticationError` if either side fails the cookie challenge,
        `HandshakeError` for a version mismatch or a malformed handshake, `TimeoutError`
        if connecting, TLS and the handshake together take longer than
        ``handshake_timeout``, `OSError`/`ConnectionError` when the peer cannot be reached
        or goes away (or ``on_connection`` closed the connection), and `RuntimeError` if
        the endpoint is not started or is closed. On a timeout, an error or cancellation
        the connection is aborted (``on_close`` follows only if it was established).
        """
        loop = self._require_loop()
        if self._closing:
            raise RuntimeError("the endpoint is closed")
        host, port = parse_address(address)
        conn = Connection(self, initiated=True)
        self._connecting.add(conn)
        future = conn._hs_future
        assert future is not None
        try:
            async with asyncio.timeout(self.handshake_timeout):
                await loop.create_connection(
                    lambda: conn,
                    host,
                    port,
                    ssl=self.client_ssl,
                    ssl_handshake_timeout=self.handshake_timeout if self.client_ssl is not None else None,
                )
                await future
        except BaseException as exc:
            if isinstance(exc, TimeoutError):
                conn._close(f"connect to {address} timed out", abort=True, log=False)
            else:
                conn._close(f"connect to {address} failed: {exc!r}", abort=True, log=False)
            if future.done() and not future.cancelled():
                future.exception()  # retrieved: it is the exception being raised, or moot
            raise
        finally:
            self._connecting.discard(conn)
        if conn._state != _OPEN:
            raise ConnectionError(f"connection to {address} closed right after the handshake: {conn.close_reason}")
        return conn

    async def close(self) -> None:
        """Stop listening and close every connection; idempotent, concurrent calls wait.

        Queued output is written first where the peer takes it; a socket still open after
        ``min(1 s, down_after)`` is aborted. ``on_close`` is called (reason ``"endpoint
        closed"``) for every established connection before this returns. If this call is
        cancelled, the endpoint still counts as closed and every connection was told to
        close (``on_close`` still follows), but a socket slow to go is then left to its
        connection's own linger timer (``down_after``; ``handshake_timeout`` in a handshake).
        """
        if self._closing:
            await self._closed.wait()
            return
        self._closing = True
        try:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            server = self._server
            if server is not None:
                server.close()
            conns = [*self._pending_inbound, *self._connecting, *self._established]
            for conn in conns:
                conn._close(REASON_ENDPOINT_CLOSED)
            lost = [conn._lost for conn in conns if not conn._lost.done()]
            if lost:
                _done, stragglers = await asyncio.wait(lost, timeout=min(1.0, self.down_after))
                if stragglers:
                    for conn in conns:
                        if conn._transport is not None and not conn._lost.done():
                            conn._transport.abort()
            if server is not None:
                await server.wait_closed()
            await asyncio.sleep(0)  # the deferred on_close callbacks
        finally:
            self._closed.set()
        logger.info("endpoint %s closed", self._node_id or self.name)

    # -- internals ----------------------------------------------------------------------

    def _admit(self, conn: Connection) -> None:
        """Track a new inbound connection; evict the oldest pending one when full."""
        pending = self._pending_inbound
        while len(pending) >= self.max_pending_handshakes:
            oldest = next(iter(pending))
            self._log_unauthenticated(
                "too many pending handshakes (%d); dropping the oldest, from %r",
                len(pending),
                oldest.peer_address,
            )
            self._count(self._handshake_failures, "evicted")
            oldest._close("dropped: too many pending handshakes", abort=True, log=False)
        pending[conn] = None

    def _notify_close(self, conn: Connection, reason: str) -> None:
        try:
            self._on_close(conn, reason)
        except Exception:
            logger.exception("connection %r: on_close raised", conn)

    def _on_timer(self) -> None:
        loop = self._loop
        assert loop is not None
        now = loop.time()
        period = self.tick_interval / 2
        # Ran late: the loop was blocked, and some event loops (uvloop) run due timers
        # before reading the input that arrived meanwhile.
        late = now - self._timer_due >= period
        if late:
            logger.warning(
                "endpoint %s: the event loop was blocked for about %.3g s",
                self._node_id, now - self._timer_due + period,
            )
        # Spare the peers one run after a stall, not two in a row: a loop that is always
        # late must still detect dead peers.
        spare = late and not self._was_late
        self._was_late = late
        self._timer_due = now + period
        self._timer = loop.call_at(self._timer_due, self._on_timer)
        if not self._established:
            return
        down_after = self.down_after
        for conn in list(self._established):
            conn._tick(now, down_after, spare)

    def _log_unauthenticated(self, msg: str, *args: Any) -> None:
        """A warning about an unauthenticated peer, within its own budget (floods are cheap)."""
        self._unauthenticated_log.warning("endpoint %s: " + msg, self._node_id, *args)
