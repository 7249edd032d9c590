"""Term rules of `pgregistry.terms`: NaN in keys and values, and `short_repr`."""

from __future__ import annotations

import math
import sys
from typing import Any

import pytest

from pgregistry import wire
from pgregistry.terms import Pid, Ref, check_key, check_value, is_key, key_problem, keys_problem, same_term, short_repr

NAN = float("nan")
BIG = 10**10000  # beyond Python's int-to-str limit (4300 digits)

NAN_KEYS: list[Any] = [NAN, float("-nan"), (1, NAN), ("a", ((NAN,),)), (Pid("n@h:1", 1), "x", (2, (3, math.nan)))]


@pytest.mark.parametrize("key", NAN_KEYS, ids=repr)
def test_a_nan_anywhere_in_a_key_is_refused_with_a_value_error_saying_why(key: Any) -> None:
    with pytest.raises(ValueError, match="not equal to itself") as info:
        check_key(key)
    assert "NaN" in str(info.value) and str(info.value).startswith("key: ")
    with pytest.raises(ValueError, match="^meta key: "):
        check_key(key, "meta key")
    assert is_key(key) is False
    reason = key_problem(key)
    assert reason is not None and "not equal to itself" in reason
    assert keys_problem(["ok", 1, key, 2.5]) == reason
    check_value(key)  # values may hold NaN
    check_value([{"x": key}])


def test_keys_without_nan_are_still_keys_and_other_problems_are_reported() -> None:
    for key in (1.5, math.inf, -math.inf, -0.0, (1.0, "a", (math.inf,)), BIG, (BIG, -BIG), True, None):
        assert check_key(key) is key
        assert is_key(key) is True
        assert key_problem(key) is None
    assert keys_problem(["a", 1, 2.5, (1, 2), BIG, Pid("n@h:1", 1)]) is None
    assert keys_problem([]) is None
    with pytest.raises(TypeError, match="list"):
        check_key([1])
    assert "list" in (key_problem(("ok", [1])) or "")
    assert "not a key term" in (keys_problem(["a", {"x": 1}]) or "")
    assert is_key([1]) is False


def test_same_term_takes_a_nan_for_itself_after_a_trip_over_the_wire() -> None:
    # A value holding NaN, compared with its decoded copy (new float objects), must not
    # look changed, or every sync would report a spurious Update for it.
    for value in (NAN, [NAN], (1, NAN), {"x": [NAN, (NAN, {"y": NAN})]}, [(NAN,), {"n": NAN}], ("a", [1.5, NAN])):
        copy = wire.decode(wire.encode(value))
        assert copy is not value
        assert same_term(value, copy), value
        assert same_term(copy, value), value
    assert not same_term(NAN, 0.0)
    assert not same_term(0.0, NAN)
    assert not same_term([NAN], [1.0])
    assert not same_term({"x": NAN}, {"x": None})
    assert not same_term((NAN,), [NAN])  # tuple vs list
    assert not same_term(0.0, -0.0)


def _deep(levels: int) -> list:
    x: list = []
    for _i in range(levels):
        x = [x]
    return x


class _BadRepr:
    def __repr__(self) -> str:
        raise RuntimeError("no repr for you")


def test_short_repr_never_raises_and_stays_within_its_limit() -> None:
    recursive: list = [1]
    recursive.append(recursive)
    huge_dict = {i: BIG for i in range(1000)}
    hostile: list[Any] = [
        BIG, -BIG, [BIG] * 100_000, (BIG, (BIG,)), {"k": BIG}, huge_dict, _deep(100_000),
        Pid("n@h:1", 1), Pid("n" * 1_000_000, BIG, BIG), "s" * 1_000_000, b"\x00" * 1_000_000,
        ValueError(BIG), KeyError((BIG, "k")),
        _BadRepr(), [_BadRepr()], recursive, {BIG, 1}, frozenset({(BIG,)}), range(10**30),
    ]
    for x in hostile:
        for limit in (80, 20, 5):
            text = short_repr(x, limit)
            assert type(text) is str and 0 < len(text) <= limit, (limit, text)
    assert short_repr(BIG) == "<int of 33220 bits>"
    assert short_repr(-BIG) == "<negative int of 33220 bits>"
    assert short_repr((BIG, "k"), 200) == "(<int of 33220 bits>, 'k')"
    assert short_repr(ValueError(BIG)) == "ValueError(<int of 33220 bits>)"
    assert short_repr("s" * 200, 20) == "'" + "s" * 16 + "..."
    assert short_repr(_BadRepr()) == "<_BadRepr object>"
    # a pid decoded from a peer may carry a huge serial: its own repr must not raise either
    assert repr(Pid("n@h:1", BIG, 2)) == short_repr(Pid("n@h:1", BIG, 2)) == "<n@h:1.<int of 33220 bits>.2>"
    assert repr(Ref("n@h:1", 1, BIG)) == "#Ref<n@h:1.1.<int of 33220 bits>>"


def test_short_repr_of_small_terms_is_their_repr() -> None:
    ints_near_the_edge = [2**200, -(2**200), sys.maxsize]
    for x in [None, True, 0, -5, 1.5, NAN, -0.0, "it's", b"\x00b", (), (1,), (1, "a"), [], [1, [2, (3,)]], {},
              {"a": [1, 2], 3: (None,)}, Pid("n@h:1", 2, 3), Ref("n@h:1", 4), ValueError("bad"),
              KeyError("k"), *ints_near_the_edge]:
        assert short_repr(x, 1000) == repr(x)
