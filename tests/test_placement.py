"""`pgregistry.placement`: the canonical key hash (placement v1) and the consistent-hash `Ring`.

What is pinned here is what nodes rely on to agree without talking: the exact bytes and
hashes of placement v1 (golden vectors), owners that do not depend on ``PYTHONHASHSEED``,
one owner for keys Python calls equal, and the ring's balance and movement when a node
comes or goes, checked against a brute-force reading of the rules.
"""

from __future__ import annotations

import collections
import json
import math
import os
import subprocess
import sys
from hashlib import blake2b
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import pgregistry as pgr
from pgregistry import placement
from pgregistry.placement import MAX_POINTS, PLACEMENT_VERSION, Ring, encode_key, key_hash, point_hash
from pgregistry.terms import Pid, Ref

NODES = [f"node{i}@10.0.0.{i}:4000" for i in range(10)]
NEW_NODE = "node10@10.0.0.10:4000"
STR_KEYS = [f"key:{i}" for i in range(100_000)]

# (key, encode_key(key).hex(), key_hash(key)) under placement v1: changing any of these
# changes where keys live, which needs a new PLACEMENT_VERSION.
GOLDEN: list[tuple[Any, str, int]] = [
    (None, "4e00", 15567499088582213607),
    (True, "490101", 10082833664664736872),
    (0, "490100", 7636331931609754988),
    (-1, "4901ff", 6967924836746371187),
    (255, "490200ff", 9569838639190125467),
    (-129, "4902ff7f", 10694180087469327736),
    (2**64, "4909010000000000000000", 7190385949320987501),
    (1.5, "46083ff8000000000000", 13595255815903553746),
    (-math.inf, "4608fff0000000000000", 5061298423838444988),
    ("", "5300", 18158458144442140046),
    ("a", "530161", 15337829644289835184),
    ("é\ud800", "5305c3a9eda080", 4439642806490610524),
    (b"", "4200", 5954698997084794475),
    (b"\x00\xff", "420200ff", 11947264402237067348),
    ((), "540100", 10709056959206891511),
    ((1, "a"), "540702490101530161", 1815319983803272528),
    (((),), "540401540100", 8716303598519471880),
    (Pid("a@h:1", 3, 2), "500d53056140683a31490103490102", 9024086665005689393),
    (Ref("a@h:1", 3, 2), "520d53056140683a31490103490102", 13193598849643206630),
]


def _reference_owner(node_ids: list[str], points: int, h: int) -> str:
    """The owner rule read literally: the smallest (position, node id) at or after `h`, else the smallest."""
    ring_points = sorted((point_hash(node_id, i), node_id) for node_id in node_ids for i in range(points))
    after = [p for p in ring_points if p[0] >= h]
    return (after or ring_points)[0][1]


def _reference_walk(node_ids: list[str], points: int, h: int, n: int) -> list[str]:
    ring_points = sorted((point_hash(node_id, i), node_id) for node_id in node_ids for i in range(points))
    start = next((i for i, p in enumerate(ring_points) if p[0] >= h), 0)
    found: list[str] = []
    for i in range(len(ring_points)):
        owner = ring_points[(start + i) % len(ring_points)][1]
        if owner not in found and len(found) < n:
            found.append(owner)
    return found


# -- placement v1: the encoding and the hash -------------------------------------------------


@pytest.mark.parametrize(("key", "encoded", "hashed"), GOLDEN, ids=[repr(g[0]) for g in GOLDEN])
def test_golden_vectors_pin_placement_v1(key: Any, encoded: str, hashed: int) -> None:
    assert PLACEMENT_VERSION == 1
    assert encode_key(key).hex() == encoded
    assert key_hash(key) == hashed
    assert hashed == int.from_bytes(blake2b(bytes.fromhex(encoded), digest_size=8).digest(), "big")


def test_points_sit_where_the_rule_says_and_a_fixed_ring_places_as_pinned() -> None:
    assert point_hash("a", 0) == int.from_bytes(blake2b(b"a#0", digest_size=8).digest(), "big")
    ring = Ring(["a", "b", "c"], points=16)
    assert [ring.node_for(k) for k in ["a", "b", "c", "d", "e", 1, 2, 3, (1, 2)]] == \
        ["b", "b", "b", "c", "b", "a", "a", "c", "b"]
    assert ring.nodes_for("a", 3) == ["b", "a", "c"]
    assert ring.digest().hex() == "fcb2edcbfe9b991c482f0adbfb5ed5d9"


def test_lengths_past_one_varint_byte_are_encoded_low_bits_first() -> None:
    assert encode_key("x" * 200)[:3] == b"S\xc8\x01"  # 200 = 0b1_1001000
    assert encode_key(b"y" * 16384)[:4] == b"B\x80\x80\x01"
    assert encode_key(2**1100)[:3] == b"I\x8a\x01"  # 1101 bits + sign: 138 bytes
    # 130 elements: payload of 394 bytes (its length, 0x8a 0x03) starting with the count 130 (0x82 0x01)
    assert encode_key(tuple(range(130)))[:5] == b"T\x8a\x03\x82\x01"


def test_equal_keys_have_one_encoding_and_distinct_types_do_not_collide() -> None:
    assert encode_key(1) == encode_key(1.0) == encode_key(True)
    assert encode_key(0) == encode_key(0.0) == encode_key(-0.0) == encode_key(False)
    assert encode_key(10**20) == encode_key(1e20)
    assert encode_key((1, (0.0, "x"))) == encode_key((True, (False, "x")))
    distinct = ["1", 1, b"1", 1.5, (1,), ((1,),), None, (), "", b"", ("a", "b"), ("ab",), ("a", ("b",)),
                Pid("n", 1, 0), Ref("n", 1, 0), ("n", 1, 0), math.inf, -math.inf, 2**63, -(2**63), 2**64 - 1]
    encodings = [encode_key(k) for k in distinct]
    assert len(set(encodings)) == len(distinct)


def test_owners_are_the_same_in_interpreters_with_different_hash_seeds() -> None:
    keys = ["a", "session:42", 7, -3, 2**70, 1.5, b"\x00", None, ("user", 9, "cart"), (1.0, (True, b"z"))]
    script = (
        "import json; from pgregistry import Ring; from pgregistry.terms import Pid\n"
        f"ring = Ring({NODES!r}, points=64)\n"
        f"keys = {keys!r} + [Pid('n@h:1', 5, 1)]\n"
        "print(json.dumps([[ring.node_for(k), ring.nodes_for(k, 3)] for k in keys]))\n"
        "print(ring.digest().hex())\n"
    )
    ring = Ring(NODES, points=64)
    expected = [[ring.node_for(k), ring.nodes_for(k, 3)] for k in [*keys, Pid("n@h:1", 5, 1)]]
    outputs = []
    for seed in ("1", "4242"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, env=env)
        assert done.returncode == 0, done.stderr
        lines = done.stdout.splitlines()
        assert json.loads(lines[0]) == expected
        outputs.append(lines)
    assert outputs[0] == outputs[1]
    assert outputs[0][1] == ring.digest().hex()


# -- equal keys, one owner (property) ------------------------------------------------------

_NUMBERS = st.one_of(
    st.booleans(),
    st.integers(),
    st.integers(-(2**60), 2**60).map(float),
    st.floats(allow_nan=False),
)
_SCALARS = st.one_of(
    st.none(), _NUMBERS, st.text(max_size=8), st.binary(max_size=8),
    st.builds(Pid, st.sampled_from(["a@h:1", "b@h:2"]), st.integers(0, 5), st.integers(0, 2)),
    st.builds(Ref, st.sampled_from(["a@h:1"]), st.integers(0, 5), st.integers(0, 2)),
)
KEYS = st.recursive(_SCALARS, lambda inner: st.lists(inner, max_size=4).map(tuple), max_leaves=12)


def _equal_variant(draw: st.DrawFn, key: Any) -> Any:
    """A key equal to `key` by ``==``, with numbers swapped for equal ones of other types."""
    t = type(key)
    if t is tuple:
        return tuple(_equal_variant(draw, item) for item in key)
    if t is bool or t is int or (t is float and key.is_integer()):
        n = int(key)
        choices: list[Any] = [n]
        if float(n) == n:
            choices.append(float(n))
            if n == 0:
                choices.append(-0.0)
        if n in (0, 1):
            choices.append(bool(n))
        return draw(st.sampled_from(choices))
    return key


@st.composite
def _equal_pairs(draw: st.DrawFn) -> tuple[Any, Any]:
    key = draw(KEYS)
    return key, _equal_variant(draw, key)


_RING = Ring(NODES, points=32)


@settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck))
@given(_equal_pairs())
def test_keys_equal_by_python_equality_have_one_owner(pair: tuple[Any, Any]) -> None:
    k1, k2 = pair
    assert k1 == k2 and hash(k1) == hash(k2)
    assert encode_key(k1) == encode_key(k2)
    assert key_hash(k1) == key_hash(k2)
    assert _RING.node_for(k1) == _RING.node_for(k2)
    assert _RING.nodes_for(k1, 4) == _RING.nodes_for(k2, 4)


@settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck))
@given(KEYS, KEYS)
def test_keys_that_are_not_equal_have_different_encodings(k1: Any, k2: Any) -> None:
    assert (encode_key(k1) == encode_key(k2)) == (k1 == k2)


@settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))
@given(KEYS)
def test_owner_and_walk_follow_the_rule_read_literally(key: Any) -> None:
    h = key_hash(key)
    assert 0 <= h < 2**64
    assert _RING.node_for(key) == _RING.node_for_hash(h) == _reference_owner(NODES, 32, h)
    for n in (1, 3, 10, 11):
        assert _RING.nodes_for(key, n) == _RING.nodes_for_hash(h, n) == _reference_walk(NODES, 32, h, n)


# -- balance and movement -------------------------------------------------------------------


def _owners(ring: Ring, keys: list[Any]) -> list[str]:
    return [ring.node_for(k) for k in keys]


def test_the_busiest_of_10_nodes_owns_at_most_1_35_times_the_mean_of_100000_keys() -> None:
    ring = Ring(NODES, points=128)
    for keys in (STR_KEYS, list(range(100_000))):
        counts = collections.Counter(_owners(ring, keys))
        assert set(counts) == set(NODES)
        assert max(counts.values()) <= 1.35 * len(keys) / len(NODES), counts


def test_an_11th_node_takes_about_one_eleventh_of_the_keys_all_from_the_others() -> None:
    ring = Ring(NODES, points=128)
    before = _owners(ring, STR_KEYS)
    ring.add(NEW_NODE)
    after = _owners(ring, STR_KEYS)
    moved = [i for i, (b, a) in enumerate(zip(before, after)) if b != a]
    assert 0.065 <= len(moved) / len(STR_KEYS) <= 0.12
    assert all(after[i] == NEW_NODE for i in moved)
    assert after == _owners(Ring([*NODES, NEW_NODE], points=128), STR_KEYS)  # as if built with it


def test_removing_a_node_moves_only_its_keys_to_the_others() -> None:
    ring = Ring(NODES, points=128)
    before = _owners(ring, STR_KEYS)
    gone = NODES[3]
    ring.remove(gone)
    after = _owners(ring, STR_KEYS)
    for b, a in zip(before, after):
        assert a == b if b != gone else a != gone
    assert before.count(gone) > 0
    rest = [n for n in NODES if n != gone]
    assert after == _owners(Ring(rest, points=128), STR_KEYS)
    ring.add(gone)
    assert _owners(ring, STR_KEYS) == before


def test_nodes_for_gives_distinct_nodes_starting_with_the_owner() -> None:
    ring = Ring(NODES, points=16)
    for key in STR_KEYS[:300]:
        walk = ring.nodes_for(key, 4)
        assert len(walk) == 4 == len(set(walk))
        assert walk[0] == ring.node_for(key)
        assert ring.nodes_for(key, 1) == walk[:1]
        every = ring.nodes_for(key, 50)
        assert every[:4] == walk and sorted(every) == sorted(NODES)
        assert ring.nodes_for(key, 0) == []


def test_points_at_one_position_are_taken_in_node_id_order(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(placement, "point_hash", lambda node_id, i: (i + 1) << 40)
    ring = Ring(["c", "a", "b"], points=3)
    assert ring.node_for_hash(0) == "a"
    assert ring.node_for_hash(3 << 40) == "a"
    assert ring.node_for_hash((3 << 40) + 1) == "a"  # wraps to the first point
    assert ring.nodes_for_hash(1 << 40, 3) == ["a", "b", "c"]
    ring.remove("a")
    assert ring.node_for_hash(0) == "b"


# -- the ring's own API --------------------------------------------------------------------


def test_membership_accessors_and_digest() -> None:
    ring = Ring(["b", "a"], points=8)
    assert ring.nodes == ("a", "b") and ring.points == 8 and len(ring) == 2
    assert "a" in ring and "z" not in ring and 1 not in ring
    assert repr(ring) == "Ring(['a', 'b'], points=8)"
    first = ring.digest()
    assert isinstance(first, bytes) and len(first) == 16
    assert Ring(["a", "b"], points=8).digest() == first
    assert Ring(["a", "b"], points=9).digest() != first
    ring.add("c")
    assert ring.digest() != first and ring.digest() == Ring(["c", "b", "a"], points=8).digest()
    ring.remove("c")
    assert ring.digest() == first
    assert Ring([]).digest() != Ring(["a"]).digest()
    assert pgr.Ring is Ring and "Ring" in pgr.__all__


def test_an_empty_ring_owns_nothing_and_says_so() -> None:
    ring = Ring([], points=4)
    assert len(ring) == 0 and ring.nodes == () and repr(ring) == "Ring([], points=4)"
    with pytest.raises(LookupError, match="no nodes"):
        ring.node_for("k")
    with pytest.raises(LookupError, match="no nodes"):
        ring.node_for_hash(5)
    with pytest.raises(TypeError, match="list"):
        ring.node_for([1])  # a non-key is still a TypeError
    assert ring.nodes_for("k", 3) == []
    ring.add("a")
    assert ring.node_for("k") == "a" and ring.nodes_for("k", 3) == ["a"]
    ring.remove("a")
    with pytest.raises(LookupError):
        ring.node_for("k")


@pytest.mark.parametrize("points", [1.0, True, "128", None, 128.5])
def test_points_of_the_wrong_type_are_refused(points: Any) -> None:
    with pytest.raises(TypeError, match="^points must be an int"):
        Ring(NODES, points=points)


@pytest.mark.parametrize("points", [0, -1, MAX_POINTS + 1, 10**9])
def test_points_out_of_range_are_refused(points: int) -> None:
    with pytest.raises(ValueError, match="^points must be between 1 and 4096"):
        Ring(NODES, points=points)


def test_points_at_the_bounds_are_accepted() -> None:
    assert Ring(["a"], points=1).node_for("k") == "a"
    assert len(Ring(["a", "b"], points=MAX_POINTS)) == 2


@pytest.mark.parametrize(("node_ids", "error", "match"), [
    (["a", "a"], ValueError, "already in the ring"),
    (["a", ""], ValueError, "non-empty"),
    (["a", 1], TypeError, "node id must be a str"),
    ([None], TypeError, "node id must be a str"),
    ([b"a"], TypeError, "node id must be a str"),
    (["\ud800"], ValueError, "UTF-8"),
    ("abc", TypeError, "node_ids must be an iterable of node ids, not a str"),
    (b"abc", TypeError, "not a bytes"),
    (5, TypeError, "node_ids must be an iterable"),
])
def test_bad_node_ids_are_refused(node_ids: Any, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        Ring(node_ids)


def test_add_and_remove_refuse_what_they_cannot_do_and_change_nothing() -> None:
    ring = Ring(["a", "b"], points=8)
    digest = ring.digest()
    with pytest.raises(ValueError, match="'a' is already in the ring"):
        ring.add("a")
    with pytest.raises(ValueError, match="'z' is not in the ring"):
        ring.remove("z")
    with pytest.raises(TypeError, match="node id"):
        ring.add(3)  # type: ignore[arg-type]
    assert ring.digest() == digest and ring.nodes == ("a", "b")
    assert [ring.node_for(k) for k in range(50)] == [Ring(["a", "b"], points=8).node_for(k) for k in range(50)]


@pytest.mark.parametrize("key", [[1], {"a": 1}, object(), (1, [2]), {1}, bytearray(b"x"), 1j])
def test_node_for_a_non_key_is_a_type_error(key: Any) -> None:
    ring = Ring(["a"])
    with pytest.raises(TypeError, match="not a key term"):
        ring.node_for(key)
    with pytest.raises(TypeError):
        ring.nodes_for(key, 1)
    with pytest.raises(TypeError):
        key_hash(key)


@pytest.mark.parametrize("key", [math.nan, (1, math.nan), ("a", (float("-nan"),))])
def test_node_for_a_key_holding_nan_is_a_value_error(key: Any) -> None:
    with pytest.raises(ValueError, match="NaN"):
        Ring(["a"]).node_for(key)


def test_a_key_nested_too_deep_is_refused() -> None:
    key: Any = "x"
    for _ in range(100):
        key = (key,)
    with pytest.raises(TypeError, match="deeper than"):
        key_hash(key)


def test_bad_counts_and_hashes_are_refused() -> None:
    ring = Ring(["a", "b"])
    with pytest.raises(ValueError, match="^n must be at least 0"):
        ring.nodes_for("k", -1)
    for n in (1.0, True, "2", None):
        with pytest.raises(TypeError, match="^n must be an int"):
            ring.nodes_for("k", n)  # type: ignore[arg-type]
    for h in (-1, 2**64):
        with pytest.raises(ValueError, match="^hash must be between 0 and 2\\*\\*64 - 1"):
            ring.node_for_hash(h)
    with pytest.raises(TypeError, match="^hash must be an int"):
        ring.node_for_hash("1")  # type: ignore[arg-type]
    assert ring.node_for_hash(2**64 - 1) in ("a", "b") and ring.node_for_hash(0) in ("a", "b")
