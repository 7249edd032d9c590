"""The opening of a connection (protocol version 1): both sides prove the cookie and say who they are.

A state machine without I/O: a `Connection` feeds `Handshake.receive` what it reads and
gives it the function that writes; the connection keeps the socket, the timeout and the
close. Every handshake frame carries one tuple ``("pgregistry", 1, kind, ...)``; C is
the side that connects, S the side that accepts:

  C -> S  hello      id, creation, max_frame, nonce
  S -> C  challenge  id, creation, max_frame, nonce
  C -> S  response   HMAC-SHA256(cookie, client label + hello frame + challenge frame)
  S -> C  accept     HMAC-SHA256(cookie, server label + hello frame + challenge frame)

Either side may answer any of them with ``refuse`` (kind, detail) and close: "version",
"auth" (`AuthenticationError`), "protocol" (malformed, unexpected, oversized), "self"
(a node dialled itself), "identity" (with TLS that verifies the peer, its certificate
does not prove the id it sent); every kind but "auth" raises `HandshakeError`. The
cookie never crosses the wire, and S proves it only after C did. S is done when it
sends accept, C when it has checked it; messages may follow in the same read.

The full protocol is in docs/protocol.md.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import secrets
import socket
import ssl as _ssl
import struct
from collections.abc import Callable
from typing import Any, Final, NoReturn, Protocol

from .errors import AuthenticationError
from .terms import short_repr
from .wire import Limits, WireError, decode, encode, frame

__all__ = [
    "HANDSHAKE_MAX_FRAME",
    "MAX_NODE_ID_LEN",
    "MIN_MAX_FRAME",
    "PROTOCOL_VERSION",
    "Handshake",
    "HandshakeError",
    "LocalNode",
    "certificate_names",
    "certificate_proves",
    "hkdf_sha256",
]

# 2: the node-level confirm step renamed its messages (propose, confirm, refuse);
# 3: a scope's leave op may carry the exit reason (a version-2 peer would drop it as malformed).
PROTOCOL_VERSION: Final = 3
MAGIC: Final = "pgregistry"
HANDSHAKE_MAX_FRAME: Final = 4096
"""Largest handshake frame payload accepted, in bytes: what an unauthenticated peer can make a node buffer."""
NONCE_SIZE: Final = 32
MAC_SIZE: Final = 32
MAX_NODE_ID_LEN: Final = 1024
MIN_MAX_FRAME: Final = 64 * 1024
"""The smallest frame limit a peer may announce, or an endpoint be configured with.

Below it, ordinary messages (a member list, a registry sync part) would have to be split
into ever smaller pieces, or could not be sent at all; a node id (at most
`MAX_NODE_ID_LEN` characters) always fits many times over.
"""

_CLIENT_LABEL: Final = b"pgregistry/1 client proof\0"
_SERVER_LABEL: Final = b"pgregistry/1 server proof\0"
_HEADER: Final = struct.Struct(">I")
_LIMITS: Final = Limits(
    max_size=HANDSHAKE_MAX_FRAME,
    max_str_len=HANDSHAKE_MAX_FRAME,
    max_bin_len=HANDSHAKE_MAX_FRAME,
    max_array_len=16,
    max_map_len=16,
    max_ext_len=64,
)
_REFUSAL_KINDS: Final = frozenset({"version", "auth", "protocol", "self", "identity"})
_MAX_DETAIL: Final = 300  # characters of a refusal's detail sent, or taken from a peer

# Handshake states, named by what this side waits for.
_AWAIT_HELLO: Final = 1  # accepting side, before the client's hello
_AWAIT_CHALLENGE: Final = 2  # connecting side, hello sent
_AWAIT_RESPONSE: Final = 3  # accepting side, challenge sent
_AWAIT_ACCEPT: Final = 4  # connecting side, response sent
_DONE: Final = 5


class HandshakeError(ConnectionError):
    """The handshake failed for a reason other than the cookie.

    ``kind`` is ``"version"``, ``"protocol"``, ``"self"``, ``"identity"`` (with TLS, a
    node id its certificate does not prove: see `certificate_proves`), or ``"closed"``
    (the peer closed the connection during the handshake without saying why).
    """

    def __init__(self, kind: str, detail: str) -> None:
        self.kind = kind
        self.detail = detail
        super().__init__(f"handshake failed ({kind}): {detail}")


def set_nodelay(transport: Any) -> None:
    """Turn Nagle's algorithm off on a TCP connection's socket (before its handshake)."""
    sock = transport.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6) and sock.type == socket.SOCK_STREAM:
        with contextlib.suppress(OSError):  # the socket may already be closing
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def failure_kind(exc: Exception) -> str:
    """The reason a failed handshake is counted under (a few fixed words)."""
    if isinstance(exc, AuthenticationError):
        return "cookie"
    if isinstance(exc, HandshakeError):
        return exc.kind
    if isinstance(exc, TimeoutError):
        return "timeout"
    return type(exc).__name__


class _Refusal(Exception):
    """Raised inside the handshake: refuse the peer with `kind` and `detail`."""

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(detail)
        self.kind = kind
        self.detail = detail


class LocalNode(Protocol):
    """What the handshake reads of this node when it speaks (an `Endpoint` is one)."""

    @property
    def node_id(self) -> str: ...

    @property
    def creation(self) -> int: ...

    @property
    def max_frame(self) -> int: ...


def certificate_names(cert: dict[str, Any]) -> list[str]:
    """The names a peer certificate (as `ssl.SSLSocket.getpeercert` gives it) vouches for.

    Its subjectAltName DNS entries, then its subject commonName attributes.
    """
    names = [value for kind, value in cert.get("subjectAltName", ()) if kind == "DNS"]
    for rdn in cert.get("subject", ()):
        names.extend(value for key, value in rdn if key == "commonName")
    return names


def certificate_proves(cert: dict[str, Any], node_id: str) -> bool:
    """True if `cert` names `node_id` whole, or its name part.

    The name part of ``name@host:port`` is what comes before the last ``"@"`` (as in
    `checks.parse_address`; a node's name has no ``"@"``), the whole id if it has none.
    Names are compared exactly: case-sensitive, no wildcards.
    """
    names = certificate_names(cert)
    name, at, _address = node_id.rpartition("@")
    return node_id in names or (name if at else node_id) in names


def hkdf_sha256(ikm: bytes, *, info: bytes, salt: bytes = b"", length: int = 32) -> bytes:
    """HKDF-SHA256 (RFC 5869): a key of `length` bytes from the secret `ikm`, for `info`.

    For keys derived from the cookie for other purposes than the handshake (a different
    `info` each), so that no such purpose uses the cookie itself as its key. An empty
    `salt` means the RFC's default, 32 zero bytes. `ValueError` for a length over 8160.
    """
    if not 0 < length <= 255 * hashlib.sha256().digest_size:
        raise ValueError(f"hkdf_sha256: length must be in 1..8160, got {length}")
    prk = hmac.new(salt or bytes(hashlib.sha256().digest_size), ikm, hashlib.sha256).digest()
    okm = b""
    block = b""
    counter = 1
    while len(okm) < length:
        block = hmac.new(prk, block + info + bytes([counter]), hashlib.sha256).digest()
        okm += block
        counter += 1
    return okm[:length]


def _mac(key: bytes, label: bytes, hello_frame: bytes, challenge_frame: bytes) -> bytes:
    return hmac.new(key, label + hello_frame + challenge_frame, hashlib.sha256).digest()


def _frame(kind: str, *fields: Any) -> bytes:
    return frame(encode((MAGIC, PROTOCOL_VERSION, kind, *fields)))


def _check_identity(msg: tuple[Any, ...], kind: str) -> tuple[str, int, int, bytes]:
    """The ``(id, creation, max_frame, nonce)`` of a hello or challenge, checked."""
    if len(msg) != 7:
        raise _Refusal("protocol", f"{kind} with {len(msg)} items instead of 7")
    _, _, _, node_id, creation, max_frame, nonce = msg
    if type(node_id) is not str or not 0 < len(node_id) <= MAX_NODE_ID_LEN or not node_id.isprintable():
        raise _Refusal("protocol", f"{kind}: bad node id {short_repr(node_id, 80)}")
    if type(creation) is not int or not 0 <= creation < 2**64:
        raise _Refusal("protocol", f"{kind}: bad creation {short_repr(creation, 40)}")
    if type(max_frame) is not int or not 0 <= max_frame <= 0xFFFFFFFF:
        raise _Refusal("protocol", f"{kind}: bad max_frame {short_repr(max_frame, 40)}")
    if max_frame < MIN_MAX_FRAME:
        raise _Refusal(
            "protocol",
            f"{kind}: the peer announces a frame limit of {max_frame} bytes, below the floor of {MIN_MAX_FRAME}",
        )
    if type(nonce) is not bytes or len(nonce) != NONCE_SIZE:
        raise _Refusal("protocol", f"{kind}: the nonce is not {NONCE_SIZE} bytes")
    return node_id, creation, max_frame, nonce


def _check_mac(msg: tuple[Any, ...], kind: str, expected: bytes, peer_id: str) -> None:
    """The MAC of a response or accept must be `expected`, or the peer does not know the cookie."""
    if len(msg) != 4 or type(msg[3]) is not bytes or len(msg[3]) != MAC_SIZE:
        raise _Refusal("protocol", f"malformed {kind} message")
    if not hmac.compare_digest(msg[3], expected):
        raise _Refusal("auth", f"{peer_id!r} did not prove the cookie (a different cookie?)")


class Handshake:
    """One side of one connection's handshake.

    ``Handshake(local, key, initiated=..., write=..., ssl_object=...)``: `local` is this
    node (read when a hello or challenge is made, so an id set after the connection
    opened is the one sent), `key` the cookie's bytes, `write` how frames reach the peer
    (called from `begin` and `receive` only), `ssl_object` the TLS session, whose peer
    certificate must prove the peer's id when its context verifies the peer.

    ``peer_id``, ``peer_creation`` and ``peer_max_frame`` are set once the peer's hello
    or challenge passed its checks, before the cookie is proven. No timer runs here: the
    caller gives up after its own timeout by closing, and then drops this object.
    """

    __slots__ = (
        "_buf",
        "_challenge",
        "_hello",
        "_key",
        "_local",
        "_ssl_object",
        "_state",
        "_write",
        "initiated",
        "peer_creation",
        "peer_id",
        "peer_max_frame",
    )

    def __init__(
        self,
        local: LocalNode,
        key: bytes,
        *,
        initiated: bool,
        write: Callable[[bytes], None],
        ssl_object: _ssl.SSLObject | None,
    ) -> None:
        self.initiated = initiated
        self.peer_id = ""
        self.peer_creation = 0
        self.peer_max_frame = 0
        self._local = local
        self._key = key
        self._write = write
        self._ssl_object = ssl_object
        self._state = _AWAIT_CHALLENGE if initiated else _AWAIT_HELLO
        self._buf = bytearray()  # input not yet parsed
        self._hello = b""  # the hello frame as sent, kept for the MACs
        self._challenge = b""  # the challenge frame as sent

    @property
    def pending(self) -> int:
        """Bytes received and held for an incomplete handshake frame."""
        return len(self._buf)

    def begin(self) -> None:
        """Send the hello if this side connected; the accepting side waits for one."""
        if self.initiated:
            local = self._local
            nonce = secrets.token_bytes(NONCE_SIZE)
            self._hello = _frame("hello", local.node_id, local.creation, local.max_frame, nonce)
            self._write(self._hello)

    def receive(self, data: bytes) -> bytes | None:
        """Take bytes from the peer and answer each complete frame through `write`.

        Returns None while the handshake goes on; once it is complete, the bytes that
        followed its last frame (the first messages, often ``b""``). Raises
        `AuthenticationError` or `HandshakeError` when it failed, after telling the peer
        why unless the peer refused first; the caller then closes the connection. Not to
        be called again once it returned bytes or raised.
        """
        buf = self._buf
        buf += data
        try:
            while len(buf) >= 4:
                size = _HEADER.unpack_from(buf)[0]
                if size > HANDSHAKE_MAX_FRAME:
                    raise _Refusal("protocol", f"handshake frame of {size} bytes exceeds {HANDSHAKE_MAX_FRAME}")
                end = 4 + size
                if len(buf) < end:
                    break
                frame_bytes = bytes(buf[:end])
                del buf[:end]
                self._step(frame_bytes)
                if self._state == _DONE:
                    rest = bytes(buf)
                    self._buf = bytearray()
                    return rest
        except _Refusal as refusal:
            self._write(_frame("refuse", refusal.kind, refusal.detail[:_MAX_DETAIL]))
            if refusal.kind == "auth":
                raise AuthenticationError(f"authentication failed: {refusal.detail}") from None
            raise HandshakeError(refusal.kind, refusal.detail) from None
        return None

    def _step(self, frame_bytes: bytes) -> None:
        """Act on one complete handshake frame (length prefix included)."""
        try:
            msg = decode(memoryview(frame_bytes)[4:], _LIMITS)
        except WireError as exc:
            raise _Refusal("protocol", f"undecodable handshake message: {exc}") from None
        if (
            type(msg) is not tuple
            or len(msg) < 3
            or type(msg[0]) is not str
            or msg[0] != MAGIC
            or type(msg[1]) is not int
            or type(msg[2]) is not str
        ):
            raise _Refusal("protocol", f"not a pgregistry handshake message: {short_repr(msg, 80)}")
        kind: str = msg[2]
        if kind == "refuse":
            self._peer_refused(msg)
        # Checked on every message, so that any later version can be told apart and refused cleanly.
        if msg[1] != PROTOCOL_VERSION:
            raise _Refusal("version", f"this node speaks protocol {PROTOCOL_VERSION}, the peer {msg[1]}")
        state = self._state
        local = self._local
        if state == _AWAIT_HELLO and kind == "hello":
            peer_id, creation, max_frame, _client_nonce = _check_identity(msg, kind)
            if peer_id == local.node_id and creation == local.creation:
                raise _Refusal("self", f"node {short_repr(peer_id)} connected to itself")
            self._take_identity(peer_id, creation, max_frame, kind)
            self._hello = frame_bytes
            self._challenge = _frame(
                "challenge", local.node_id, local.creation, local.max_frame, secrets.token_bytes(NONCE_SIZE)
            )
            self._state = _AWAIT_RESPONSE
            self._write(self._challenge)
        elif state == _AWAIT_CHALLENGE and kind == "challenge":
            peer_id, creation, max_frame, _server_nonce = _check_identity(msg, kind)
            self._take_identity(peer_id, creation, max_frame, kind)
            self._challenge = frame_bytes
            self._state = _AWAIT_ACCEPT
            self._write(_frame("response", _mac(self._key, _CLIENT_LABEL, self._hello, frame_bytes)))
        elif state == _AWAIT_RESPONSE and kind == "response":
            _check_mac(msg, kind, _mac(self._key, _CLIENT_LABEL, self._hello, self._challenge), self.peer_id)
            self._write(_frame("accept", _mac(self._key, _SERVER_LABEL, self._hello, self._challenge)))
            self._done()
        elif state == _AWAIT_ACCEPT and kind == "accept":
            _check_mac(msg, kind, _mac(self._key, _SERVER_LABEL, self._hello, self._challenge), self.peer_id)
            self._done()
        else:
            raise _Refusal("protocol", f"unexpected handshake message {short_repr(kind, 40)}")

    def _take_identity(self, peer_id: str, creation: int, max_frame: int, kind: str) -> None:
        """Record who the peer says it is, once its certificate (if verified) proves it."""
        self._check_certificate(peer_id, kind)
        self.peer_id, self.peer_creation, self.peer_max_frame = peer_id, creation, max_frame

    def _check_certificate(self, peer_id: str, kind: str) -> None:
        """With TLS that verifies the peer, `peer_id` must be proven by its certificate."""
        ssl_object = self._ssl_object
        if ssl_object is None or ssl_object.context.verify_mode == _ssl.CERT_NONE:
            return  # nothing verified the peer: its id is asserted, as with the cookie alone
        cert = ssl_object.getpeercert()
        if not cert:
            raise _Refusal("identity",
                           f"{kind}: node {short_repr(peer_id, 100)} presented no certificate to prove its id")
        if not certificate_proves(cert, peer_id):
            raise _Refusal(
                "identity",
                f"{kind}: the peer's certificate names {certificate_names(cert)!r:.200}, "
                f"which does not prove node id {short_repr(peer_id, 100)}",
            )

    def _peer_refused(self, msg: tuple[Any, ...]) -> NoReturn:
        """The peer refused us: raise what the connecting side's `connect` will raise."""
        if len(msg) != 5 or type(msg[3]) is not str or type(msg[4]) is not str:
            raise _Refusal("protocol", "malformed refuse message")
        kind, detail = msg[3], msg[4][:_MAX_DETAIL]
        text = f"the peer refused the handshake ({short_repr(kind, 40)}): {short_repr(detail, _MAX_DETAIL)}"
        if kind == "auth":
            raise AuthenticationError(text)
        raise HandshakeError(kind if kind in _REFUSAL_KINDS else "protocol", text)

    def _done(self) -> None:
        self._state = _DONE
        self._hello = self._challenge = b""
