"""Terms as JSON that round-trips: what ``pgregistry ... --json`` prints (layer 1).

JSON has no tuples, bytes, pids, non-string map keys or non-finite numbers, so those are
tagged objects, each with one key starting with ``$``:

=====================  ===========================================
term                   JSON
=====================  ===========================================
``(1, "a")``           ``{"$tuple": [1, "a"]}``
``b"\\x00"``            ``{"$bytes": "AA=="}`` (base64)
`Pid`                  ``{"$pid": [node, serial, creation]}``
`Ref`                  ``{"$ref": [node, serial, creation]}``
``nan``, ``inf``        ``{"$float": "nan"}``, ``{"$float": "inf"}``, ``{"$float": "-inf"}``
an int of more than    ``{"$int": "<hex>"}`` (JSON readers choke on such numbers)
4 000 digits
a dict whose keys are  ``{"$dict": [[key, value], ...]}``
not all strings, or
one of which starts
with ``$``
=====================  ===========================================

Everything else (None, bools, ints, finite floats, strings, lists, dicts with plain
string keys) is itself. `to_json` never emits a bare NaN, and `from_json` of its output
gives back an equal term (a NaN a NaN).
"""

from __future__ import annotations

import base64
import math
from typing import Any

from .terms import Pid, Ref, short_repr

__all__ = ["from_json", "to_json"]

_MAX_PLAIN_INT_BITS = 13_000  # about 3 900 decimal digits: below Python's 4 300-digit str limit


def to_json(term: Any) -> Any:
    """`term` as a JSON-ready value (tagged where JSON lacks the type)."""
    kind = type(term)
    if term is None or kind is bool or kind is str:
        return term
    if kind is int:
        return term if term.bit_length() <= _MAX_PLAIN_INT_BITS else {"$int": hex(term)}
    if kind is float:
        return term if math.isfinite(term) else {"$float": repr(term)}
    if kind is Pid or kind is Ref:
        return {"$pid" if kind is Pid else "$ref": [term.node, term.serial, term.creation]}
    if kind is tuple:
        return {"$tuple": [to_json(x) for x in term]}
    if kind is list:
        return [to_json(x) for x in term]
    if kind is bytes:
        return {"$bytes": base64.b64encode(term).decode("ascii")}
    if kind is dict:
        if all(type(k) is str and not k.startswith("$") for k in term):
            return {k: to_json(v) for k, v in term.items()}
        return {"$dict": [[to_json(k), to_json(v)] for k, v in term.items()]}
    raise TypeError(f"not a term: {short_repr(term, 80)}")


def from_json(value: Any) -> Any:
    """The term `value` (from `to_json`, then ``json.loads``) stands for; `ValueError` for
    a tagged object that is malformed."""
    kind = type(value)
    if kind is list:
        return [from_json(x) for x in value]
    if kind is not dict:
        return value
    if len(value) == 1:
        (tag, inner), = value.items()
        if tag == "$tuple" and type(inner) is list:
            return tuple(from_json(x) for x in inner)
        if tag == "$bytes" and type(inner) is str:
            return base64.b64decode(inner, validate=True)
        if tag in ("$pid", "$ref") and type(inner) is list and len(inner) == 3:
            try:
                return (Pid if tag == "$pid" else Ref)(*inner)
            except (TypeError, ValueError):
                raise ValueError(f"malformed tagged term {short_repr(value, 80)}") from None
        if tag == "$float" and inner in ("nan", "inf", "-inf"):
            return float(inner)
        if tag == "$int" and type(inner) is str:
            try:
                return int(inner, 16)
            except ValueError:
                raise ValueError(f"malformed tagged term {short_repr(value, 80)}") from None
        if tag == "$dict" and type(inner) is list and all(type(p) is list and len(p) == 2 for p in inner):
            try:
                return {from_json(k): from_json(v) for k, v in inner}
            except TypeError:  # an unhashable key
                raise ValueError(f"malformed tagged term {short_repr(value, 80)}") from None
        if type(tag) is str and tag.startswith("$"):
            raise ValueError(f"malformed tagged term {short_repr(value, 80)}")
    return {k: from_json(v) for k, v in value.items()}
