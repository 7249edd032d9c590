"""The wire format: terms as msgpack, and the length-prefixed frames that carry them (layer 1).

A term is one msgpack object: None, bool, int, float, str, bytes, list and dict (keys
str or int) as msgpack's own; a tuple as an array led by the tuple marker (ext 3); a
`Pid` or `Ref` as ext 1 or 2 (``[node, serial, creation]``); an int beyond 64 bits as
ext 4. A frame is a 4-byte big-endian length, then that many bytes: one encoded term.

 * `encode` checks the term, then packs it (`TypeError` names the part that is not a
   term); `encode_trusted` packs a term built from checked ones without that walk
 * `decode` returns a value term, or raises `WireError` and nothing else when the input
   is not exactly one term within its `Limits` (sizes, ext shapes, 64 levels of nesting)
 * `frame`/`frame_many` prefix payloads; `FrameDecoder.feed` cuts a stream into them and
   raises `WireError` for a length over its ``max_frame`` as soon as the 4 bytes arrive,
   after which the stream is unusable: close the connection

Nothing here executes code from the network: there is no pickle.

The full protocol is in docs/protocol.md.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Final, TypeVar

import msgpack
from msgpack import ExtType

from .errors import RegistryError
from .terms import Pid, Ref, check_message

__all__ = [
    "DEFAULT_LIMITS",
    "EXT_BIGINT",
    "EXT_PID",
    "EXT_REF",
    "EXT_TUPLE",
    "MAX_FRAME",
    "FrameDecoder",
    "Limits",
    "WireError",
    "decode",
    "encode",
    "encode_trusted",
    "frame",
    "frame_many",
]

MAX_FRAME: Final = 64 * 1024 * 1024
"""Default largest frame payload (and largest encoded term) accepted, in bytes."""

EXT_PID: Final = 1
EXT_REF: Final = 2
EXT_TUPLE: Final = 3
EXT_BIGINT: Final = 4

_U32_MAX: Final = 0xFFFFFFFF
_HEADER: Final = struct.Struct(">I")

# Ids whose encoded payload is at most this long are cached (both directions); a scope
# sync sends the same few pids thousands of times.
_ID_CACHE_SIZE: Final = 4096
_ID_CACHE_MAX_PAYLOAD: Final = 256

# A packer whose last output was larger than this is dropped instead of pooled, so the
# pool does not keep a huge internal buffer alive.
_POOL_MAX_OUTPUT: Final = 1024 * 1024

# A FrameDecoder keeps pieces of a partial frame at least this long as views of the
# chunk they arrived in (no copy); shorter pieces are copied together, so a frame that
# trickles in byte by byte costs bytes, not an object per byte, and a small piece never
# pins a large chunk.
_KEEP_VIEW_MIN: Final = 64 * 1024


class WireError(RegistryError, ValueError):
    """Input that is not a well-formed frame or term: the connection it came from is unusable."""


class _TupleMarker:
    """What ext 3 decodes to until `_list_hook` turns its array into a tuple.

    It is not a term, so a marker left anywhere else fails validation.
    """

    __slots__ = ()

    def __repr__(self) -> str:
        return "<tuple marker>"


_TUPLE_MARK: Final = _TupleMarker()
_TUPLE_EXT: Final = ExtType(EXT_TUPLE, b"")


# --------------------------------------------------------------------------- encoding

def _bigint_ext(n: int) -> ExtType:
    return ExtType(EXT_BIGINT, n.to_bytes((n.bit_length() + 8) // 8, "big", signed=True))


_id_ext_cache: dict[Pid | Ref, ExtType] = {}


_id_ext_cached: Final = _id_ext_cache.get


def _id_ext(ident: Pid | Ref) -> ExtType:
    payload = _pack(list(ident))
    ext = ExtType(EXT_PID if type(ident) is Pid else EXT_REF, payload)
    if len(payload) <= _ID_CACHE_MAX_PAYLOAD:
        if len(_id_ext_cache) >= _ID_CACHE_SIZE:
            _id_ext_cache.clear()
        _id_ext_cache[ident] = ext
    return ext


def _default(obj: Any) -> Any:
    """The packer's hook for what msgpack cannot pack natively under ``strict_types``."""
    t = type(obj)
    if t is Pid or t is Ref:
        return _id_ext_cached(obj) or _id_ext(obj)
    if t is tuple:
        return [_TUPLE_EXT, *obj]
    if t is int:  # outside msgpack's 64-bit range
        return _bigint_ext(obj)
    # `encode` validates first, so this only fires if a caller bypassed it.
    raise TypeError(f"{t.__name__} {obj!r:.60} is not a term")


def _new_packer(unicode_errors: str | None = None) -> msgpack.Packer:
    return msgpack.Packer(
        default=_default,
        use_bin_type=True,
        strict_types=True,  # so tuple, Pid and Ref reach _default instead of becoming arrays
        use_single_float=False,
        autoreset=True,
        datetime=False,
        unicode_errors=unicode_errors,
    )


# Packers are stateful and `_default` re-enters packing (a Pid's payload), so each use
# takes its own packer from this pool; list.pop/append are atomic, so threads are safe.
_packer_pool: list[msgpack.Packer] = []


def _pack(obj: Any) -> bytes:
    """msgpack-encode a term already known to be valid."""
    try:
        packer = _packer_pool.pop()
    except IndexError:
        packer = _new_packer()
    try:
        out: bytes = packer.pack(obj)
    except UnicodeEncodeError:
        # A str with lone surrogates; the surrogatepass packer is slower for every str,
        # so it is used only when needed.
        _packer_pool.append(packer)
        out = _new_packer("surrogatepass").pack(obj)
        return out
    except BaseException:
        _packer_pool.append(packer)  # pack() resets the packer's buffer when it raises
        raise
    if len(out) <= _POOL_MAX_OUTPUT:
        _packer_pool.append(packer)
    return out


def encode(term: Any) -> bytes:
    """Encode one term as msgpack bytes (the format is in docs/protocol.md).

    Raises `TypeError`, naming the offending part, if `term` is not a value term.
    """
    check_message(term, "cannot encode term")
    return _pack(term)


def encode_trusted(term: Any) -> bytes:
    """`encode` without walking `term` to check it first: for terms built from checked terms.

    The registry checks every key and value when it is registered; messages it then
    builds from its rows (a sync of 100 000 rows) need not be walked again. A type that
    is not a term still raises `TypeError` from the packer, but a dict key of another
    type than str or int, or nesting deeper than `terms.MAX_DEPTH`, is not caught:
    never pass data a caller supplied.
    """
    return _pack(term)


# --------------------------------------------------------------------------- decoding

def _bigint_from(data: bytes) -> int:
    if not data:
        raise WireError("big int (ext 4) with an empty payload")
    return int.from_bytes(data, "big", signed=True)


def _id_field_hook(code: int, data: bytes) -> int:
    if code == EXT_BIGINT:
        return _bigint_from(data)
    raise WireError(f"ext {code} inside a pid/ref payload")


# What both unpackers share: arrays as lists, str as str (not bytes), and lone
# surrogates read back the way `_pack` writes them.
_unpackb: Final = partial(msgpack.unpackb, use_list=True, raw=False, unicode_errors="surrogatepass")

_unpack_id_fields: Final = partial(_unpackb, ext_hook=_id_field_hook, strict_map_key=True)

_pid_cache: dict[bytes, Pid] = {}
_ref_cache: dict[bytes, Ref] = {}


_pid_cached: Final = _pid_cache.get
_ref_cached: Final = _ref_cache.get


_PidOrRef = TypeVar("_PidOrRef", Pid, Ref)


def _id_from(cls: type[_PidOrRef], cache: dict[bytes, _PidOrRef], data: bytes) -> _PidOrRef:
    """Decode a pid or ref payload (not found in `cache`) and remember it there."""
    fields = _unpack_id_fields(data)
    if type(fields) is not list or len(fields) != 3:
        raise WireError(f"{cls.__name__} payload is not an array of [node, serial, creation]")
    try:
        ident: _PidOrRef = cls(*fields)  # annotated: terms._Id.__new__ is declared to return Any
    except TypeError as exc:
        raise WireError(f"bad {cls.__name__} payload: {exc}") from None
    if len(data) <= _ID_CACHE_MAX_PAYLOAD:
        if len(cache) >= _ID_CACHE_SIZE:
            cache.clear()
        cache[data] = ident
    return ident


def _ext_hook(code: int, data: bytes) -> Any:
    if code == EXT_PID:
        return _pid_cached(data) or _id_from(Pid, _pid_cache, data)
    if code == EXT_TUPLE:
        if data:
            raise WireError("tuple marker (ext 3) with a non-empty payload")
        return _TUPLE_MARK
    if code == EXT_REF:
        return _ref_cached(data) or _id_from(Ref, _ref_cache, data)
    if code == EXT_BIGINT:
        return _bigint_from(data)
    raise WireError(f"unknown ext type code {code}")


def _list_hook(items: list[Any]) -> Any:
    if items and items[0] is _TUPLE_MARK:
        return tuple(items[1:])
    return items


# msgpack's own per-object limits default to the input's length, which bounds every
# preallocation by the bytes actually received.
_unpack_term: Final = partial(
    _unpackb,
    ext_hook=_ext_hook,
    list_hook=_list_hook,
    strict_map_key=False,  # int keys are allowed; validation refuses the other types
)


def _positive_int(name: str, value: Any) -> None:
    if type(value) is not int or value < 1:
        raise ValueError(f"Limits.{name} must be a positive int, got {value!r}")


@dataclass(frozen=True, slots=True)
class Limits:
    """Size limits `decode` enforces; anything larger raises `WireError`."""

    max_size: int = MAX_FRAME
    """Bytes of the whole encoded term."""
    max_str_len: int = MAX_FRAME
    """UTF-8 bytes of one str."""
    max_bin_len: int = MAX_FRAME
    """Bytes of one bytes object."""
    max_array_len: int = MAX_FRAME
    """Items of one list or tuple (a tuple's marker counts as one)."""
    max_map_len: int = MAX_FRAME // 2
    """Pairs of one dict."""
    max_ext_len: int = MAX_FRAME
    """Bytes of one ext payload (a pid, a ref, a big int)."""
    _floor: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        for name in ("max_size", "max_str_len", "max_bin_len", "max_array_len", "max_map_len", "max_ext_len"):
            _positive_int(name, getattr(self, name))
        # Input no longer than this cannot exceed any limit under msgpack's defaults
        # (every per-object limit equal to the input length, maps to half of it).
        object.__setattr__(
            self,
            "_floor",
            min(self.max_str_len, self.max_bin_len, self.max_array_len, 2 * self.max_map_len, self.max_ext_len),
        )

    def _unpack(self, data: bytes | bytearray | memoryview, size: int) -> Any:
        if size <= self._floor:
            return _unpack_term(data)
        return _unpack_term(
            data,
            max_str_len=min(size, self.max_str_len),
            max_bin_len=min(size, self.max_bin_len),
            max_array_len=min(size, self.max_array_len),
            max_map_len=min(size // 2, self.max_map_len),
            max_ext_len=min(size, self.max_ext_len),
        )


DEFAULT_LIMITS: Final = Limits()


def decode(data: bytes | bytearray | memoryview, limits: Limits = DEFAULT_LIMITS) -> Any:
    """Decode exactly one term from `data`.

    Raises `WireError`, and nothing else, when `data` is not the encoding of one valid
    term within `limits`; the result is always a value term (see `terms.check_message`).
    A `TypeError` means `data` is not a bytes-like object at all.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"decode() needs bytes, got {type(data).__name__}")
    size = data.nbytes if type(data) is memoryview else len(data)
    if size > limits.max_size:
        raise WireError(f"term of {size} bytes exceeds the limit of {limits.max_size}")
    try:
        term = limits._unpack(data, size)
    except WireError:
        raise
    except Exception as exc:  # msgpack raises ValueError, TypeError, UnicodeDecodeError, ...
        raise WireError(f"malformed term: {type(exc).__name__}: {exc}"[:300]) from exc
    try:
        check_message(term, "decoded term")
    except TypeError as exc:
        raise WireError(f"invalid term: {exc}"[:300]) from None
    except RecursionError as exc:  # repr of a hostile key in the message; not expected
        raise WireError("invalid term: too deeply nested") from exc
    return term


# --------------------------------------------------------------------------- framing

def _check_max_frame(max_frame: Any) -> int:
    if type(max_frame) is not int:
        raise TypeError(f"max_frame must be an int, got {type(max_frame).__name__}")
    if not 0 <= max_frame <= _U32_MAX:
        raise ValueError(f"max_frame must be within 0..{_U32_MAX}, got {max_frame}")
    return max_frame


def frame(payload: bytes | bytearray | memoryview, max_frame: int = MAX_FRAME) -> bytes:
    """Prefix `payload` with its 4-byte big-endian length.

    Raises `ValueError` if the payload is longer than `max_frame` (a peer would refuse it).
    """
    size = len(payload) if type(payload) is not memoryview else payload.nbytes
    if size > max_frame or size > _U32_MAX:
        raise ValueError(f"payload of {size} bytes exceeds the frame limit of {min(max_frame, _U32_MAX)}")
    return _HEADER.pack(size) + payload


def frame_many(payloads: Iterable[bytes], max_frame: int = MAX_FRAME) -> bytes:
    """The frames of several payloads, concatenated, built with a single copy of each."""
    parts: list[Any] = []
    pack = _HEADER.pack
    limit = min(max_frame, _U32_MAX)
    for payload in payloads:
        size = len(payload)
        if size > limit:
            raise ValueError(f"payload of {size} bytes exceeds the frame limit of {limit}")
        parts.append(pack(size))
        parts.append(payload)
    return b"".join(parts)


class FrameDecoder:
    """Splits a byte stream into frame payloads.

    `feed` takes whatever the transport read and returns the payloads it completed. At
    most one partial frame is held: its length prefix, then its body as a list of
    pieces joined once when complete (large pieces are views of the chunks they came in,
    small ones are gathered in a bytearray), so a large frame in many chunks costs about
    one copy, and many small frames in one chunk are cut straight out of it. A length prefix above
    `max_frame` raises `WireError` as soon as its 4 bytes arrive; after any error every
    later `feed` raises too.
    """

    __slots__ = ("_error", "_have", "_head", "_parts", "_size", "max_frame")

    def __init__(self, max_frame: int = MAX_FRAME) -> None:
        self.max_frame: int = _check_max_frame(max_frame)
        self._head = bytearray()  # a partial length prefix (< 4 bytes)
        self._size = -1  # body length of the pending frame, -1 while its prefix is incomplete
        self._parts: list[memoryview | bytearray] = []  # the pending frame's body so far
        self._have = 0  # bytes in _parts
        self._error: str | None = None

    @property
    def pending(self) -> int:
        """Bytes held for the incomplete frame (prefix included)."""
        return len(self._head) if self._size < 0 else 4 + self._have

    def _fail(self, message: str) -> None:
        self._error = message
        self._head.clear()
        self._parts = []
        self._size = -1
        self._have = 0
        raise WireError(message)

    def _too_big(self, size: int) -> None:
        self._fail(f"frame of {size} bytes exceeds the limit of {self.max_frame}")

    def feed(self, data: bytes | bytearray | memoryview) -> list[bytes]:
        """Add `data` to the stream; return the payloads of the frames it completed."""
        if self._error is not None:
            raise WireError(f"stream already failed: {self._error}")
        if type(data) is not bytes:
            data = bytes(data)  # the caller may reuse its buffer; the pending frame keeps slices
        view = memoryview(data)
        end = len(data)
        frames: list[bytes] = []
        pos = 0
        if self._size >= 0 or self._head:
            pos = self._resume(view, end, frames)
            if pos == end:
                return frames
        max_frame = self.max_frame
        unpack_from = _HEADER.unpack_from
        while end - pos >= 4:
            size = unpack_from(data, pos)[0]
            if size > max_frame:
                self._too_big(size)
            start = pos + 4
            pos = start + size
            if pos > end:
                self._size = size
                self._parts = []
                self._have = 0
                self._add(view[start:])
                return frames
            frames.append(data[start:pos])
        if pos < end:
            self._head += view[pos:]
        return frames

    def _add(self, piece: memoryview) -> None:
        """Append `piece` to the pending frame's body."""
        size = len(piece)
        if not size:
            return
        self._have += size
        parts = self._parts
        if size >= _KEEP_VIEW_MIN:
            parts.append(piece)
        elif parts and type(parts[-1]) is bytearray:
            parts[-1] += piece
        else:
            parts.append(bytearray(piece))

    def _resume(self, view: memoryview, end: int, frames: list[bytes]) -> int:
        """Continue the pending frame with `view`; return how many bytes of it were used."""
        pos = 0
        if self._size < 0:
            head = self._head
            pos = min(4 - len(head), end)
            head += view[:pos]
            if len(head) < 4:
                return end
            size = _HEADER.unpack(head)[0]
            head.clear()
            if size > self.max_frame:
                self._too_big(size)
            self._size = size
            self._parts = []
            self._have = 0
        missing = self._size - self._have
        if end - pos < missing:
            self._add(view[pos:])
            return end
        self._add(view[pos : pos + missing])
        frames.append(b"".join(self._parts))
        self._parts = []
        self._size = -1
        self._have = 0
        return pos + missing
