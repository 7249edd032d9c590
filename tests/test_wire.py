"""Tests of pgregistry.wire: term encoding, hostile-input safety, framing."""

from __future__ import annotations

import datetime
import enum
import math
import struct
import time
from collections import namedtuple
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from msgpack import ExtType

from pgregistry import wire
from pgregistry.errors import RegistryError
from pgregistry.terms import MAX_DEPTH, Pid, Ref, check_message, is_value, same_term
from pgregistry.wire import (
    DEFAULT_LIMITS,
    EXT_BIGINT,
    EXT_PID,
    EXT_REF,
    EXT_TUPLE,
    MAX_FRAME,
    FrameDecoder,
    Limits,
    WireError,
    decode,
    encode,
    encode_trusted,
    frame,
    frame_many,
)

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
ROUNDTRIP = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# --------------------------------------------------------------------------- strategies

BOUNDARY_INTS = [
    0, -1, 2**31, 2**32, 2**63 - 1, 2**63, 2**64 - 1, 2**64, 2**64 + 1,
    -(2**31), -(2**32), -(2**63), -(2**63) - 1, -(2**64), 2**200, -(2**200), 255, 256, -255, -256,
]

ints = st.one_of(st.integers(), st.integers(-(2**300), 2**300), st.sampled_from(BOUNDARY_INTS))
texts = st.one_of(
    st.text(max_size=12),
    # lone surrogates are valid Python strs and so valid terms
    st.text(st.characters(categories=["Cs", "Ll", "Nd", "So"]), max_size=6),
)
id_fields = st.tuples(texts, st.integers(0, 2**70), st.integers(0, 2**70))
pids = id_fields.map(lambda f: Pid(*f))
refs = id_fields.map(lambda f: Ref(*f))
scalars = st.one_of(st.none(), st.booleans(), ints, st.floats(), texts, st.binary(max_size=16), pids, refs)
keys = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4).map(tuple), max_leaves=16)
dict_keys = st.one_of(texts, ints)
values = st.recursive(
    keys,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.lists(inner, max_size=4).map(tuple),
        st.dictionaries(dict_keys, inner, max_size=4),
    ),
    max_leaves=30,
)


class StrSub(str):
    """A subclass is not a term: the wire keeps exact types."""


class IntSub(int):
    """A subclass is not a term: the wire keeps exact types."""


class ListSub(list):  # type: ignore[type-arg]
    """A subclass is not a term: the wire keeps exact types."""


class DictSub(dict):  # type: ignore[type-arg]
    """A subclass is not a term: the wire keeps exact types."""


class TupleSub(tuple):  # type: ignore[type-arg]
    """A subclass is not a term: the wire keeps exact types."""


class Color(enum.IntEnum):
    RED = 1


Point = namedtuple("Point", "x y")

NON_TERM_LEAVES: list[Any] = [
    {1, 2}, frozenset(), object(), bytearray(b"x"), memoryview(b"x"), 1j, Decimal("1.5"),
    StrSub("s"), IntSub(3), ListSub([1]), DictSub(a=1), TupleSub((1,)), Color.RED, Point(1, 2),
    ExtType(1, b""), msgpack.Timestamp(0), datetime.datetime(2020, 1, 1), type, len, Ellipsis,
]
non_term_leaves = st.sampled_from(NON_TERM_LEAVES)
bad_dict_keys = st.one_of(
    st.floats(), st.none(), st.booleans(), st.binary(max_size=4), pids, st.tuples(st.integers())
)
maybe_terms = st.recursive(
    st.one_of(scalars, non_term_leaves),
    lambda inner: st.one_of(
        st.lists(inner, max_size=3),
        st.lists(inner, max_size=3).map(tuple),
        st.dictionaries(st.one_of(dict_keys, bad_dict_keys), inner, max_size=3),
    ),
    max_leaves=12,
)


def assert_same(a: Any, b: Any) -> None:
    """Equal, with exactly the same types, recursively; floats compared bit for bit."""
    assert type(a) is type(b), (a, b)
    if type(a) is float:
        assert struct.pack(">d", a) == struct.pack(">d", b) or (math.isnan(a) and math.isnan(b)), (a, b)
    elif type(a) in (list, tuple):
        assert len(a) == len(b), (a, b)
        for x, y in zip(a, b):
            assert_same(x, y)
    elif type(a) is dict:
        assert len(a) == len(b), (a, b)
        for (ka, va), (kb, vb) in zip(a.items(), b.items()):  # insertion order is kept
            assert_same(ka, kb)
            assert_same(va, vb)
    elif type(a) in (Pid, Ref):
        assert tuple(a) == tuple(b)
        for x, y in zip(tuple(a), tuple(b)):
            assert_same(x, y)
    else:
        assert a == b, (a, b)


def nested(levels: int, kind: str = "list") -> Any:
    term: Any = None
    for _ in range(levels):
        if kind == "list":
            term = [term]
        elif kind == "tuple":
            term = (term,)
        else:
            term = {"k": term}
    return term


def decodes_safely(data: bytes, limits: Limits = DEFAULT_LIMITS) -> None:
    """`decode` either refuses with WireError or returns a valid term."""
    try:
        term = decode(data, limits)
    except WireError:
        return
    assert is_value(term)


# --------------------------------------------------------------------------- round trip

@ROUNDTRIP
@given(values)
def test_a_term_is_the_same_term_as_its_round_trip(term: Any) -> None:
    assert same_term(term, decode(encode(term)))


@pytest.mark.parametrize(("a", "b"), [
    (1, True), (1, 1.0), (0, False), ([1], [True]), ((1, 2), [1, 2]), ({"a": 1}, {"a": 1.0}),
    (0.0, -0.0), ({"a": 1}, {"a": 1, "b": 2}), ([1, [2]], [1, [2.0]]), (Pid("n", 1, 1), Pid("n", 1, 2)),
    (Pid("n", 1, 1), Ref("n", 1, 1)), ("a", b"a"),
], ids=repr)
def test_equal_but_different_values_are_not_the_same_term(a: Any, b: Any) -> None:
    assert not same_term(a, b) and not same_term(b, a)


def test_same_term_accepts_equal_copies_and_nan() -> None:
    nan = float("nan")
    for a, b in [([1, {"x": (2, "y")}], [1, {"x": (2, "y")}]), (nan, float("nan")), ([nan], [nan]),
                 (Pid("n", 1, 1), Pid("n", 1, 1)), (None, None), (2**70, 2**70)]:
        assert same_term(a, b)


@ROUNDTRIP
@given(values)
def test_roundtrip_preserves_values_and_types(term: Any) -> None:
    data = encode(term)
    assert type(data) is bytes
    assert_same(decode(data), term)
    assert encode_trusted(term) == data  # the unchecked path writes the same bytes


@pytest.mark.parametrize("leaf", [object(), {1, 2}, 1j], ids=lambda x: type(x).__name__)
def test_encode_trusted_still_refuses_what_it_cannot_pack(leaf: Any) -> None:
    with pytest.raises(TypeError, match="not a term"):
        encode_trusted(["sync", [[1, ["k", leaf, 1]]], True])


@ROUNDTRIP
@given(keys)
def test_roundtrip_keys_stay_hashable_and_equal(key: Any) -> None:
    out = decode(encode(key))
    assert_same(out, key)
    if not _has_nan(key):
        assert hash(out) == hash(key)


def _has_nan(term: Any) -> bool:
    if type(term) is float:
        return math.isnan(term)
    if type(term) is tuple:
        return any(_has_nan(x) for x in term)
    return False


@pytest.mark.parametrize("n", BOUNDARY_INTS + [2**1000, -(2**1000) + 1])
def test_int_boundaries_roundtrip(n: int) -> None:
    assert_same(decode(encode(n)), n)
    assert_same(decode(encode({n: [n]})), {n: [n]})


def test_big_ints_use_ext_4_with_minimal_twos_complement() -> None:
    assert encode(2**64) == bytes([0xC7, 9, EXT_BIGINT]) + (2**64).to_bytes(9, "big", signed=True)
    assert encode(-(2**63) - 1) == msgpack.packb(ExtType(EXT_BIGINT, (-(2**63) - 1).to_bytes(9, "big", signed=True)))
    assert encode(2**64 - 1) == msgpack.packb(2**64 - 1)  # still a native msgpack int


def test_documented_encodings() -> None:
    assert encode(()) == bytes.fromhex("91c70003")
    assert encode((1, "a")) == bytes.fromhex("93c7000301a161")
    assert encode([1, "a"]) == bytes.fromhex("9201a161")
    pid = Pid("n@h:1", 7, 2)
    assert encode(pid) == msgpack.packb(ExtType(EXT_PID, msgpack.packb(["n@h:1", 7, 2])))
    ref = Ref("n@h:1", 7, 2)
    assert encode(ref) == msgpack.packb(ExtType(EXT_REF, msgpack.packb(["n@h:1", 7, 2])))
    assert encode(Pid("n", 2**64, 0)) == msgpack.packb(
        ExtType(EXT_PID, msgpack.packb(["n", ExtType(EXT_BIGINT, (2**64).to_bytes(9, "big", signed=True)), 0]))
    )
    assert encode({"a": b"\x00", 1: None}) == msgpack.packb({"a": b"\x00", 1: None}, use_bin_type=True)


def test_pid_and_ref_and_tuple_keep_their_types() -> None:
    pid = Pid("a@127.0.0.1:4000", 12, 1)
    ref = Ref("a@127.0.0.1:4000", 12, 1)
    term = [pid, ref, tuple(pid), list(pid), (pid, [ref, {"p": pid}])]
    out = decode(encode(term))
    assert_same(out, term)
    assert out[0] != out[2] and out[0] != out[1]


def test_lone_surrogates_roundtrip() -> None:
    term = {"\ud800x": ["\udfff", ("\ud83d",)], "ok": "é😀"}
    assert_same(decode(encode(term)), term)
    assert_same(decode(encode(Pid("\udc80node", 1, 1))), Pid("\udc80node", 1, 1))


def test_nan_and_signed_zero_roundtrip() -> None:
    out = decode(encode([math.nan, -0.0, math.inf, -math.inf]))
    assert math.isnan(out[0])
    assert math.copysign(1.0, out[1]) == -1.0
    assert out[2:] == [math.inf, -math.inf]


def test_repeated_pids_hit_the_cache_and_stay_correct() -> None:
    pid = Pid("node@host:1", 5, 1)
    message = [[f"k{i}", pid, {"i": i}, i] for i in range(500)]
    out = decode(encode(message))
    assert_same(out, message)
    assert all(row[1] is out[0][1] for row in out)  # one Pid object for one payload


def test_id_caches_stay_bounded() -> None:
    many = [Pid("n", i, 0) for i in range(wire._ID_CACHE_SIZE + 100)]
    assert_same(decode(encode(many)), many)
    assert len(wire._id_ext_cache) <= wire._ID_CACHE_SIZE
    assert len(wire._pid_cache) <= wire._ID_CACHE_SIZE
    long_node = Pid("x" * 1000, 1, 1)
    assert_same(decode(encode(long_node)), long_node)
    assert long_node not in wire._id_ext_cache


def test_large_message_roundtrip() -> None:
    pids = [Pid("n@h:1", i, 1) for i in range(50)]
    message = [[("user", i), pids[i % 50], {"role": "worker", "shard": i % 16}, i] for i in range(20_000)]
    assert_same(decode(encode(message)), message)


def test_concurrent_encoders_do_not_interfere() -> None:
    messages = [[(f"t{t}", i, Pid(f"n{t}", i, t)) for i in range(300)] for t in range(8)]
    expected = [encode(m) for m in messages]
    with ThreadPoolExecutor(max_workers=8) as pool:
        for _ in range(5):
            assert list(pool.map(encode, messages)) == expected
            assert [decode(e) for e in expected] == messages


# --------------------------------------------------------------------------- non-terms at encode

@pytest.mark.parametrize("leaf", NON_TERM_LEAVES, ids=lambda x: type(x).__name__)
def test_non_term_leaf_rejected_with_type_error(leaf: Any) -> None:
    for term in (leaf, [1, leaf], (1, (leaf,)), {"a": {"b": [leaf]}}):
        with pytest.raises(TypeError, match=type(leaf).__name__):
            encode(term)


@pytest.mark.parametrize("key", [1.5, None, True, b"k", (1,), Pid("n", 1, 1), frozenset()], ids=repr)
def test_bad_dict_key_rejected_with_type_error(key: Any) -> None:
    with pytest.raises(TypeError, match="dict key"):
        encode([{key: 1}])


def test_too_deep_rejected_at_encode() -> None:
    for kind in ("list", "tuple", "dict"):
        assert_same(decode(encode(nested(MAX_DEPTH, kind))), nested(MAX_DEPTH, kind))
        with pytest.raises(TypeError, match="deeper"):
            encode(nested(MAX_DEPTH + 1, kind))


@FUZZ
@given(maybe_terms)
def test_encode_accepts_exactly_the_terms(term: Any) -> None:
    try:
        check_message(term)
    except TypeError:
        with pytest.raises(TypeError):
            encode(term)
    else:
        assert_same(decode(encode(term)), term)


# --------------------------------------------------------------------------- hostile input

def test_wire_error_is_a_value_error_and_a_registry_error() -> None:
    assert issubclass(WireError, ValueError)
    assert issubclass(WireError, RegistryError)


@FUZZ
@given(st.binary(max_size=200))
def test_random_bytes_never_escape_wire_error(data: bytes) -> None:
    decodes_safely(data)


@FUZZ
@given(st.lists(st.sampled_from(
    [b"\x91", b"\x92", b"\x81", b"\xc7\x00\x03", b"\xd4\x01\x00", b"\xd4\x04\x00", b"\xd6\xff\x00\x00\x00\x00",
     b"\xc0", b"\xa1a", b"\x01", b"\xcb", b"\xdd\xff\xff\xff\xff", b"\xc4\x01", b"\xff", b"\xc1", b"\x93\xa1n\x01\x01"]
), max_size=40).map(b"".join))
def test_random_msgpack_token_soup_never_escapes_wire_error(data: bytes) -> None:
    decodes_safely(data)


mutation = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 10_000), st.integers(1, 255)),
    st.tuples(st.just("set"), st.integers(0, 10_000), st.integers(0, 255)),
    st.tuples(st.just("insert"), st.integers(0, 10_000), st.integers(0, 255)),
    st.tuples(st.just("delete"), st.integers(0, 10_000), st.integers(1, 8)),
)


def mutate(data: bytes, ops: list[tuple[str, int, int]]) -> bytes:
    buf = bytearray(data)
    for op, where, arg in ops:
        if not buf and op != "insert":
            continue
        i = where % (len(buf) + (op == "insert"))
        if op == "flip":
            buf[i] ^= arg
        elif op == "set":
            buf[i] = arg
        elif op == "insert":
            buf[i:i] = bytes([arg])
        else:
            del buf[i : i + arg]
    return bytes(buf)


@FUZZ
@given(values, st.lists(mutation, min_size=1, max_size=4))
def test_mutated_encodings_never_escape_wire_error(term: Any, ops: list[tuple[str, int, int]]) -> None:
    decodes_safely(mutate(encode(term), ops))


@FUZZ
@given(values, st.data())
def test_every_truncation_and_any_trailing_bytes_are_rejected(term: Any, data: st.DataObject) -> None:
    encoded = encode(term)
    cut = data.draw(st.integers(0, len(encoded) - 1))
    with pytest.raises(WireError):
        decode(encoded[:cut])
    extra = data.draw(st.binary(min_size=1, max_size=8))
    with pytest.raises(WireError):
        decode(encoded + extra)


def pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def ext(code: int, payload: bytes) -> ExtType:
    return ExtType(code, payload)


PID_PAYLOAD = pack(["n@h:1", 1, 1])
MARK = ext(EXT_TUPLE, b"")

MALFORMED: dict[str, bytes] = {
    "empty": b"",
    "reserved byte 0xc1": b"\xc1",
    "truncated array": b"\x92\x01",
    "truncated str": b"\xa5ab",
    "trailing byte": b"\x01\x01",
    "invalid utf-8": b"\xa2\xff\xfe",
    "unhashable map key": b"\x81\x91\x01\x01",
    "float map key": pack({1.5: 1}),
    "nil map key": pack({None: 1}),
    "bool map key": pack({True: 1}),
    "bin map key": pack({b"k": 1}),
    "pid map key": b"\x81" + pack(ext(EXT_PID, PID_PAYLOAD)) + b"\x01",
    "tuple map key": b"\x81" + pack([MARK, 1]) + b"\x01",
    "timestamp ext -1": pack(msgpack.Timestamp(1)),
    "unknown ext 0": pack(ext(0, b"x")),
    "unknown ext 5": pack(ext(5, b"")),
    "unknown ext 127": pack(ext(127, b"")),
    "unknown ext -128": b"\xd4\x80\x00",
    "unknown ext -2": b"\xd4\xfe\x00",
    "bare tuple marker": pack(MARK),
    "tuple marker not first": pack([1, MARK]),
    "two tuple markers": pack([MARK, MARK]),
    "tuple marker as map value": pack({"a": MARK}),
    "tuple marker with payload": pack([ext(EXT_TUPLE, b"\x01")]),
    "empty big int": pack(ext(EXT_BIGINT, b"")),
    "pid payload empty": pack(ext(EXT_PID, b"")),
    "pid payload not an array": pack(ext(EXT_PID, pack("n@h:1"))),
    "pid payload short": pack(ext(EXT_PID, pack(["n", 1]))),
    "pid payload long": pack(ext(EXT_PID, pack(["n", 1, 1, 1]))),
    "pid payload map": pack(ext(EXT_PID, pack({"n": 1}))),
    "pid node not str": pack(ext(EXT_PID, pack([b"n", 1, 1]))),
    "pid serial negative": pack(ext(EXT_PID, pack(["n", -1, 1]))),
    "pid serial bool": pack(ext(EXT_PID, pack(["n", True, 1]))),
    "pid creation float": pack(ext(EXT_PID, pack(["n", 1, 1.0]))),
    "pid payload trailing": pack(ext(EXT_PID, PID_PAYLOAD + b"\x00")),
    "pid payload truncated": pack(ext(EXT_PID, PID_PAYLOAD[:-1])),
    "pid payload nested pid": pack(ext(EXT_PID, pack([ext(EXT_PID, PID_PAYLOAD), 1, 1]))),
    "pid payload tuple marker": pack(ext(EXT_PID, pack([MARK, "n", 1, 1]))),
    "ref payload wrong": pack(ext(EXT_REF, pack(["n", "1", 1]))),
    "huge array header": b"\xdd\xff\xff\xff\xff",
    "huge map header": b"\xdf\xff\xff\xff\xff",
    "huge str header": b"\xdb\xff\xff\xff\xff",
    "huge bin header": b"\xc6\xff\xff\xff\xff",
    "huge ext header": b"\xc9\xff\xff\xff\xff\x01",
    "too deep lists": b"\x91" * (MAX_DEPTH + 1) + b"\xc0",
    "too deep tuples": b"\x92\xc7\x00\x03" * (MAX_DEPTH + 1) + b"\xc0",
    "too deep maps": b"\x81\xa1k" * (MAX_DEPTH + 1) + b"\xc0",
    "too deep for msgpack": b"\x91" * 5000 + b"\xc0",
    "too deep tuples for msgpack": b"\x92\xc7\x00\x03" * 100_000 + b"\xc0",
    "deep tuple as map key": b"\x81" + b"\x92\xc7\x00\x03" * 1000 + b"\xc0" + b"\x01",
}


@pytest.mark.parametrize("data", MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_input_raises_wire_error(data: bytes) -> None:
    with pytest.raises(WireError):
        decode(data)


def test_a_pid_with_a_huge_negative_serial_is_refused_naming_the_field() -> None:
    # 10**10000 is beyond Python's int-to-str limit: the refusal must still say what is wrong.
    serial = -(10**10000)
    payload = pack(["n@h:1", ext(EXT_BIGINT, serial.to_bytes((serial.bit_length() + 8) // 8, "big", signed=True)), 1])
    with pytest.raises(WireError, match="serial must be a non-negative int, got <negative int of 33220 bits>"):
        decode(pack(ext(EXT_PID, payload)))


def test_accepted_edge_encodings() -> None:
    assert decode(pack(ext(EXT_BIGINT, b"\x05"))) == 5  # non-minimal big int is still an int
    assert decode(b"\xca\x3f\xc0\x00\x00") == 1.5  # float 32
    assert decode(b"\xa4\xed\xa0\x80x") == "\ud800x"  # surrogatepass form
    assert decode(pack({"a": 1, "b": 2, "a2": 3})) == {"a": 1, "b": 2, "a2": 3}
    assert decode(b"\x82\xa1a\x01\xa1a\x02") == {"a": 2}  # a repeated key: the last wins
    assert_same(decode(pack(ext(EXT_PID, pack(["n", ext(EXT_BIGINT, b"\x01" + bytes(9)), 0])))), Pid("n", 2**72, 0))
    assert_same(decode(pack([MARK, [MARK]])), ((),))


def test_nesting_limit_is_exact() -> None:
    prefixes = {"list": b"\x91", "tuple": b"\x92\xc7\x00\x03", "dict": b"\x81\xa1k"}
    for kind, prefix in prefixes.items():
        ok = nested(MAX_DEPTH, kind)
        check_message(ok)
        assert encode(ok) == prefix * MAX_DEPTH + b"\xc0"
        assert_same(decode(prefix * MAX_DEPTH + b"\xc0"), ok)
        with pytest.raises(WireError, match="deeper"):
            decode(prefix * (MAX_DEPTH + 1) + b"\xc0")


def test_non_bytes_argument_is_a_type_error() -> None:
    with pytest.raises(TypeError):
        decode("\x90")  # type: ignore[arg-type]


def test_bytearray_and_memoryview_input() -> None:
    data = encode({"a": (1, Pid("n", 1, 1))})
    assert decode(bytearray(data)) == decode(memoryview(data)) == decode(data)


def test_limits_are_enforced() -> None:
    assert decode(encode("abc"), Limits(max_str_len=3)) == "abc"
    cases: list[tuple[Limits, Any]] = [
        (Limits(max_str_len=3), ["ok", "abcd"]),
        (Limits(max_str_len=3), {"abcd": 1}),
        (Limits(max_bin_len=3), b"abcd"),
        (Limits(max_array_len=3), [1, 2, 3, 4]),
        (Limits(max_array_len=3), (1, 2, 3)),  # the tuple marker counts as an item
        (Limits(max_map_len=1), {"a": 1, "b": 2}),
        (Limits(max_ext_len=8), Pid("a-long-node-name", 1, 1)),
        (Limits(max_ext_len=8), 2**100),
        (Limits(max_size=10), "a" * 10),
    ]
    for limits, term in cases:
        data = encode(term)
        decode(data)  # fine with the defaults
        with pytest.raises(WireError):
            decode(data, limits)


def test_small_limits_and_large_input_use_the_smaller_bound() -> None:
    limits = Limits(max_array_len=2**31, max_str_len=5)
    data = encode(["x" * 6] + [0] * 1000)
    with pytest.raises(WireError):
        decode(data, limits)
    assert decode(encode(["x" * 5] + [0] * 1000), limits)[0] == "x" * 5
    with pytest.raises(WireError):  # declared length bounded by the input, not by the limit
        decode(b"\xdd\x7f\xff\xff\xff" + b"\x00" * 100, limits)


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "10", None])
def test_limits_validate_their_fields(bad: Any) -> None:
    with pytest.raises(ValueError):
        Limits(max_str_len=bad)


@FUZZ
@given(st.binary(max_size=120), st.integers(1, 40), st.integers(1, 40))
def test_random_bytes_with_tight_limits_never_escape_wire_error(data: bytes, a: int, b: int) -> None:
    decodes_safely(data, Limits(max_size=a * 3, max_str_len=a, max_bin_len=b, max_array_len=a, max_map_len=b,
                                max_ext_len=b))


# --------------------------------------------------------------------------- framing

def test_frame_format() -> None:
    assert frame(b"abc") == b"\x00\x00\x00\x03abc"
    assert frame(b"") == b"\x00\x00\x00\x00"
    assert frame(memoryview(b"xy")) == b"\x00\x00\x00\x02xy"
    assert frame_many([b"a", b"", b"bc"]) == frame(b"a") + frame(b"") + frame(b"bc")
    assert MAX_FRAME == 64 * 1024 * 1024


def test_frame_refuses_oversized_payload() -> None:
    assert frame(b"x" * 10, max_frame=10) == b"\x00\x00\x00\x0a" + b"x" * 10
    with pytest.raises(ValueError):
        frame(b"x" * 11, max_frame=10)
    with pytest.raises(ValueError):
        frame_many([b"ok", b"x" * 11], max_frame=10)


payload_lists = st.lists(st.binary(max_size=300), max_size=25)


@FUZZ
@given(payload_lists, st.data())
def test_frame_decoder_with_random_chunk_splits(payloads: list[bytes], data: st.DataObject) -> None:
    stream = frame_many(payloads)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=30)))
    kind = data.draw(st.sampled_from([bytes, bytearray, memoryview]))
    decoder = FrameDecoder(max_frame=300)
    out: list[bytes] = []
    start = 0
    for cut in cuts + [len(stream)]:
        got = decoder.feed(kind(stream[start:cut]))
        assert all(type(p) is bytes for p in got)
        out.extend(got)
        start = cut
    assert out == payloads
    assert decoder.pending == 0


@FUZZ
@given(payload_lists)
def test_frame_decoder_byte_by_byte(payloads: list[bytes]) -> None:
    stream = frame_many(payloads)
    decoder = FrameDecoder()
    out: list[bytes] = []
    for i in range(len(stream)):
        out.extend(decoder.feed(stream[i : i + 1]))
        assert decoder.pending <= 4 + max((len(p) for p in payloads), default=0)
    assert out == payloads


def test_frame_decoder_pending_counts_partial_frame() -> None:
    decoder = FrameDecoder()
    assert decoder.feed(b"\x00\x00") == [] and decoder.pending == 2
    assert decoder.feed(b"\x00\x05ab") == [] and decoder.pending == 6
    assert decoder.feed(b"cde\x00") == [b"abcde"] and decoder.pending == 1
    assert decoder.feed(b"\x00\x00\x00") == [b""] and decoder.pending == 0


def test_oversized_frame_rejected_from_its_header_alone() -> None:
    decoder = FrameDecoder(max_frame=10)
    assert decoder.feed(frame(b"x" * 10)) == [b"x" * 10]
    with pytest.raises(WireError, match="exceeds"):
        decoder.feed(b"\x00\x00\x00\x0b")  # no body byte has arrived yet
    with pytest.raises(WireError):  # the stream stays failed
        decoder.feed(b"")


def test_oversized_frame_rejected_when_header_is_split() -> None:
    decoder = FrameDecoder(max_frame=1000)
    assert decoder.feed(frame(b"ok") + b"\xff") == [b"ok"]
    assert decoder.feed(b"\xff") == []
    with pytest.raises(WireError):
        decoder.feed(b"\xff\x00")
    huge = FrameDecoder()
    with pytest.raises(WireError):
        huge.feed(b"\xff\xff\xff\xff")


def test_oversized_frame_after_good_frames_in_one_chunk() -> None:
    decoder = FrameDecoder(max_frame=4)
    with pytest.raises(WireError):
        decoder.feed(frame(b"ab") + b"\x00\x00\x00\x05")


@pytest.mark.parametrize("bad", [-1, 2**32, 1.0, True, "10"])
def test_frame_decoder_validates_max_frame(bad: Any) -> None:
    with pytest.raises((TypeError, ValueError)):
        FrameDecoder(bad)


@pytest.mark.timeout(30)
def test_one_huge_frame_in_many_small_chunks_is_linear() -> None:
    payload = bytes(range(256)) * (64 * 1024)  # 16 MiB
    stream = frame(payload) + frame(b"tail")
    decoder = FrameDecoder()
    out: list[bytes] = []
    started = time.perf_counter()
    for i in range(0, len(stream), 4096):
        out.extend(decoder.feed(stream[i : i + 4096]))
    elapsed = time.perf_counter() - started
    assert out == [payload, b"tail"]
    assert elapsed < 10  # a quadratic buffer would copy ~32 GB here


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(1, 200_000), min_size=1, max_size=12))
def test_large_frames_with_chunks_around_the_view_threshold(sizes: list[int]) -> None:
    payloads = [bytes([i % 251]) * (100_000 + 37 * i) for i in range(3)]
    stream = frame_many(payloads)
    decoder = FrameDecoder()
    out: list[bytes] = []
    pos = 0
    i = 0
    while pos < len(stream):
        step = sizes[i % len(sizes)]
        out.extend(decoder.feed(stream[pos : pos + step]))
        pos += step
        i += 1
    assert out == payloads


def test_trickling_frame_is_gathered_not_kept_as_one_object_per_byte() -> None:
    payload = bytes(range(256)) * 40
    stream = frame(payload)
    decoder = FrameDecoder()
    for i in range(len(stream) - 1):
        assert decoder.feed(stream[i : i + 1]) == []
    assert len(decoder._parts) == 1 and decoder.pending == len(stream) - 1
    assert decoder.feed(stream[-1:]) == [payload]


@pytest.mark.timeout(30)
def test_many_small_frames_in_one_chunk() -> None:
    payloads = [encode(["k", i]) for i in range(100_000)]
    decoder = FrameDecoder()
    assert decoder.feed(frame_many(payloads)) == payloads
    stream = frame_many(payloads)
    half = len(stream) // 2 + 3
    assert decoder.feed(stream[:half]) + decoder.feed(stream[half:]) == payloads


def test_frames_carry_terms_end_to_end() -> None:
    terms = [("join", "k", Pid("n", 1, 1), {"v": [1, 2]}, 7), [], {}, 2**90]
    decoder = FrameDecoder()
    received = [decode(p) for p in decoder.feed(frame_many(encode(t) for t in terms))]
    for got, want in zip(received, terms, strict=True):
        assert_same(got, want)
