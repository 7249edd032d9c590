"""Consistent-hash placement of keys on nodes: the canonical key hash and `Ring`.

A `Ring` holds node ids and `points` virtual points per node. Point ``i`` of node ``n``
sits at ``blake2b(f"{n}#{i}".encode(), digest_size=8)`` read as a big-endian unsigned
64-bit int. A key's owner is the node of the first point at or after the key's hash,
wrapping past the largest point to the smallest; points at the same position are taken
in node id order. Adding or removing a node moves only the keys of the arcs it gains or
loses.

The key hash (`key_hash`) follows key equality, as a dict does: it is ``blake2b`` of
`encode_key`, a canonical encoding in which keys that are equal by Python's ``==`` (as
``1``, ``1.0`` and ``True`` are) have the same bytes, and keys that are not equal have
different bytes. That encoding is *placement v1* (`PLACEMENT_VERSION`); every node of a
cluster must use the same version, or they would disagree on owners. Each term is a tag
byte, the length of its payload as an unsigned LEB128 varint, then the payload:

========================================  ===  =============================================
term                                      tag  payload
========================================  ===  =============================================
``None``                                  N    nothing
``int``, ``bool``, integral ``float``      I    the int, two's complement big-endian, in
                                               ``(n.bit_length() + 8) // 8`` bytes
other ``float`` (inf, -inf, 1.5 ...)      F    IEEE 754 binary64, big-endian
``str``                                   S    UTF-8 (lone surrogates as 3 bytes each)
``bytes``                                 B    the bytes
``tuple``                                 T    element count as a varint, then each element
``Pid``                                   P    node, serial, creation (each encoded)
``Ref``                                   R    node, serial, creation (each encoded)
========================================  ===  =============================================

So ``True`` is ``I 01 01``, ``-0.0`` and ``0`` are ``I 01 00``, ``"1"``, ``1`` and ``b"1"``
differ by their tag, and a `Pid` never encodes like the plain tuple of its fields. Nothing
depends on ``PYTHONHASHSEED``: every interpreter computes the same owners from the same
node ids and `points`.

The ring caches nothing per key; a caller that places the same key often can keep its
`key_hash` and ask `Ring.node_for_hash`.
"""

from __future__ import annotations

import bisect
import struct
from collections.abc import Iterable
from hashlib import blake2b
from typing import Any, Final

from sortedcontainers import SortedList

from .terms import Pid, Ref, check_key, short_repr

__all__ = [
    "MAX_POINTS",
    "PLACEMENT_VERSION",
    "Ring",
    "encode_key",
    "key_hash",
    "point_hash",
]

PLACEMENT_VERSION: Final = 1
"""The version of the placement rules (key encoding, key hash, point positions, owner rule)."""

MAX_POINTS: Final = 4096
"""The largest number of virtual points per node `Ring` accepts."""

HASH_BITS: Final = 64
_HASH_LIMIT: Final = 1 << HASH_BITS

_pack_double = struct.Struct(">d").pack

# The tag, then the one-byte varint of every length below 128: the prefix of most terms.
_SHORT: Final = 128
_SHORT_VARINT: Final = [bytes((n,)) for n in range(_SHORT)]
_S_PREFIX: Final = [b"S" + bytes((n,)) for n in range(_SHORT)]
_I_PREFIX: Final = [b"I" + bytes((n,)) for n in range(_SHORT)]
_B_PREFIX: Final = [b"B" + bytes((n,)) for n in range(_SHORT)]
_T_PREFIX: Final = [b"T" + bytes((n,)) for n in range(_SHORT)]
_P_PREFIX: Final = [b"P" + bytes((n,)) for n in range(_SHORT)]
_R_PREFIX: Final = [b"R" + bytes((n,)) for n in range(_SHORT)]
_F_PREFIX: Final = b"F\x08"


def _uvarint(n: int) -> bytes:
    """`n` (at least 0) as an unsigned LEB128 varint: 7 bits a byte, low bits first."""
    if n < _SHORT:
        return bytes((n,))
    out = bytearray()
    while n >= _SHORT:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _int_payload(n: int) -> bytes:
    return n.to_bytes((n.bit_length() + 8) >> 3, "big", signed=True)


def _with_prefix(prefixes: list[bytes], tag: bytes, payload: bytes) -> bytes:
    size = len(payload)
    return (prefixes[size] if size < _SHORT else tag + _uvarint(size)) + payload


def _enc(x: Any) -> bytes:
    """The encoding of the key term `x` (already checked)."""
    t = type(x)
    if t is str:
        payload = x.encode("utf-8", "surrogatepass")
        size = len(payload)
        return (_S_PREFIX[size] if size < _SHORT else b"S" + _uvarint(size)) + payload
    if t is int or t is bool:
        return _with_prefix(_I_PREFIX, b"I", _int_payload(int(x)))
    if t is tuple:
        count = len(x)
        return _with_prefix(_T_PREFIX, b"T", (_SHORT_VARINT[count] if count < _SHORT else _uvarint(count))
                            + b"".join(map(_enc, x)))
    if t is float:
        if x.is_integer():  # False for inf and -inf; a key holds no NaN
            return _enc(int(x))
        return _F_PREFIX + _pack_double(x)
    if t is bytes:
        return _with_prefix(_B_PREFIX, b"B", x)
    if t is Pid or t is Ref:
        return _with_prefix(_P_PREFIX if t is Pid else _R_PREFIX, b"P" if t is Pid else b"R",
                            b"".join(map(_enc, tuple.__iter__(x))))
    if x is None:
        return b"N\x00"
    raise TypeError(f"{t.__name__} {short_repr(x, 60)} is not a key term")  # unreachable for a checked key


def encode_key(key: Any) -> bytes:
    """The canonical encoding of `key` under placement v1 (see the module docstring).

    Equal keys (by ``==``) give equal bytes and unequal keys different bytes. Raises
    `TypeError` for what is not a key term and `ValueError` for a key holding a NaN,
    as `pgregistry.terms.check_key` does.
    """
    check_key(key)
    return _enc(key)


def key_hash(key: Any) -> int:
    """The position of `key` on the ring: ``blake2b(encode_key(key), digest_size=8)``, big-endian.

    An int in ``0 .. 2**64 - 1``, the same for equal keys and in every interpreter.
    Raises as `encode_key` does for a non-key.
    """
    t = type(key)
    # The str and int cases of encode_key, inline: this is the cost of every node_for.
    if t is str:
        payload = key.encode("utf-8", "surrogatepass")
        size = len(payload)
        data = (_S_PREFIX[size] if size < _SHORT else b"S" + _uvarint(size)) + payload
    elif t is int:
        payload = _int_payload(key)
        size = len(payload)
        data = (_I_PREFIX[size] if size < _SHORT else b"I" + _uvarint(size)) + payload
    else:
        data = encode_key(key)
    return int.from_bytes(blake2b(data, digest_size=8).digest(), "big")


def point_hash(node_id: str, i: int) -> int:
    """The position of virtual point `i` of `node_id`: ``blake2b(f"{node_id}#{i}".encode(), digest_size=8)``."""
    return int.from_bytes(blake2b(f"{node_id}#{i}".encode(), digest_size=8).digest(), "big")


def _check_points(points: Any) -> int:
    if type(points) is not int:
        raise TypeError(f"points must be an int, got {short_repr(points, 60)}")
    if not 1 <= points <= MAX_POINTS:
        raise ValueError(f"points must be between 1 and {MAX_POINTS}, got {points}")
    return points


def _check_node_id(node_id: Any) -> str:
    if type(node_id) is not str:
        raise TypeError(f"node id must be a str, got {short_repr(node_id, 60)}")
    if not node_id:
        raise ValueError("node id must be a non-empty str")
    try:
        node_id.encode()
    except UnicodeEncodeError:
        raise ValueError(f"node id {short_repr(node_id, 60)} is not valid UTF-8 text (a lone surrogate)") from None
    return node_id


def _check_hash(h: Any) -> int:
    if type(h) is not int:
        raise TypeError(f"hash must be an int, got {short_repr(h, 60)}")
    if not 0 <= h < _HASH_LIMIT:
        raise ValueError(f"hash must be between 0 and 2**64 - 1, got {short_repr(h, 60)}")
    return h


class Ring:
    """Nodes on a consistent-hash ring, each with `points` virtual points.

    ``Ring(node_ids, points=128)``: `node_ids` is an iterable of distinct, non-empty str
    node ids (it may be empty); `points` an int from 1 to `MAX_POINTS`. A wrong type
    raises `TypeError`, a wrong value (a duplicate id, `points` out of range)
    `ValueError`; each message names the argument.

    `node_for` and `nodes_for` read a snapshot of the points, rebuilt at the first read
    after `add` or `remove` (which update the sorted points in place). The ring is not
    locked: change it from one thread.
    """

    __slots__ = ("_points", "_nodes", "_sorted", "_snapshot", "_digest")

    def __init__(self, node_ids: Iterable[str] = (), points: int = 128) -> None:
        self._points = _check_points(points)
        if isinstance(node_ids, str | bytes):
            raise TypeError(f"node_ids must be an iterable of node ids, not a {type(node_ids).__name__}")
        try:
            ids = list(node_ids)
        except TypeError:
            raise TypeError(f"node_ids must be an iterable of node ids, got {short_repr(node_ids, 60)}") from None
        self._nodes: set[str] = set()
        self._sorted = SortedList()  # (position, node id): ties at one position go by node id
        self._snapshot: tuple[list[int], list[str]] | None = None
        self._digest: bytes | None = None
        for node_id in ids:
            self.add(node_id)

    # -- membership -------------------------------------------------------------------

    def add(self, node_id: str) -> None:
        """Put `node_id`'s points on the ring; `ValueError` if it is already there."""
        _check_node_id(node_id)
        if node_id in self._nodes:
            raise ValueError(f"node {short_repr(node_id, 60)} is already in the ring")
        self._sorted.update([(point_hash(node_id, i), node_id) for i in range(self._points)])
        self._nodes.add(node_id)
        self._changed()

    def remove(self, node_id: str) -> None:
        """Take `node_id`'s points off the ring; `ValueError` if it is not there."""
        _check_node_id(node_id)
        if node_id not in self._nodes:
            raise ValueError(f"node {short_repr(node_id, 60)} is not in the ring")
        for i in range(self._points):
            self._sorted.remove((point_hash(node_id, i), node_id))
        self._nodes.discard(node_id)
        self._changed()

    def _changed(self) -> None:
        self._snapshot = None
        self._digest = None

    @property
    def nodes(self) -> tuple[str, ...]:
        """The node ids, sorted."""
        return tuple(sorted(self._nodes))

    @property
    def points(self) -> int:
        """The number of virtual points per node."""
        return self._points

    def digest(self) -> bytes:
        """16 bytes that identify the ring's placement: the version, `points` and the node ids.

        ``blake2b(encode_key(("pgregistry.ring", PLACEMENT_VERSION, points, sorted ids)),
        digest_size=16)``: two rings with the same digest place every key alike,
        whatever order their nodes were added in.
        """
        digest = self._digest
        if digest is None:
            term = ("pgregistry.ring", PLACEMENT_VERSION, self._points, tuple(sorted(self._nodes)))
            digest = self._digest = blake2b(encode_key(term), digest_size=16).digest()
        return digest

    def __len__(self) -> int:
        return len(self._nodes)

    def __contains__(self, node_id: object) -> bool:
        return node_id in self._nodes if type(node_id) is str else False

    def __repr__(self) -> str:
        return f"Ring({short_repr(list(self.nodes), 200)}, points={self._points})"

    # -- placement --------------------------------------------------------------------

    def _points_snapshot(self) -> tuple[list[int], list[str]]:
        snapshot = self._snapshot
        if snapshot is None:
            positions = [position for position, _ in self._sorted]
            owners = [node_id for _, node_id in self._sorted]
            snapshot = self._snapshot = (positions, owners)
        return snapshot

    def node_for(self, key: Any) -> str:
        """The node that owns `key`: the first point at or after `key_hash(key)`, wrapping.

        `TypeError` if `key` is not a key term, `ValueError` if it holds a NaN,
        `LookupError` if the ring has no nodes.
        """
        positions, owners = self._snapshot or self._points_snapshot()
        if not positions:
            check_key(key)
            raise LookupError(f"the ring has no nodes: no node owns {short_repr(key, 60)}")
        i = bisect.bisect_left(positions, key_hash(key))
        return owners[i] if i < len(owners) else owners[0]

    def node_for_hash(self, h: int) -> str:
        """`node_for` of a key whose `key_hash` is `h` (an int in ``0 .. 2**64 - 1``)."""
        _check_hash(h)
        positions, owners = self._snapshot or self._points_snapshot()
        if not positions:
            raise LookupError("the ring has no nodes: no node owns any hash")
        i = bisect.bisect_left(positions, h)
        return owners[i] if i < len(owners) else owners[0]

    def _owner_table(self) -> tuple[list[int], list[str]]:
        """Private fast path for a caller placing many hashes made by `key_hash` (a rescan).

        The sorted point positions and, at the same index, each point's node, with the
        first point's node once more at the end: ``owners[bisect_left(positions, h)]`` is
        ``node_for_hash(h)`` without the checks and the wrap test. `LookupError` if the
        ring has no nodes. The lists are the caller's until the ring changes.
        """
        positions, owners = self._snapshot or self._points_snapshot()
        if not positions:
            raise LookupError("the ring has no nodes: no node owns any hash")
        return positions, [*owners, owners[0]]

    def nodes_for(self, key: Any, n: int) -> list[str]:
        """The first `n` distinct nodes met walking clockwise from `key`'s hash.

        The first is `node_for(key)`. With `n` at least the number of nodes, every node,
        in that order; with no nodes, ``[]``. `n` is an int of at least 0.
        """
        return self.nodes_for_hash(key_hash(key), n)

    def nodes_for_hash(self, h: int, n: int) -> list[str]:
        """`nodes_for` of a key whose `key_hash` is `h`."""
        _check_hash(h)
        if type(n) is not int:
            raise TypeError(f"n must be an int, got {short_repr(n, 60)}")
        if n < 0:
            raise ValueError(f"n must be at least 0, got {n}")
        positions, owners = self._snapshot or self._points_snapshot()
        want = min(n, len(self._nodes))
        found: list[str] = []
        if not want:
            return found
        seen: set[str] = set()
        start = bisect.bisect_left(positions, h)
        count = len(owners)
        for step in range(count):
            owner = owners[(start + step) % count]
            if owner not in seen:
                seen.add(owner)
                found.append(owner)
                if len(found) == want:
                    break
        return found
