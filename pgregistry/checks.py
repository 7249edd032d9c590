"""Argument checks the node and its endpoint share: durations, bounded ints, frame limits, addresses.

Each returns the value it accepted (a duration as a float) or raises `TypeError` for a
value of the wrong type and `ValueError` for one out of range, naming the argument and
showing the value with `terms.short_repr` (never a repr of unbounded size).
"""

from __future__ import annotations

import math
from typing import Any

from .handshake import MIN_MAX_FRAME
from .terms import short_repr

__all__ = ["check_int", "check_liveness", "check_max_frame", "check_seconds", "parse_address"]


def check_seconds(what: str, value: Any) -> float:
    """`value` as a positive, finite number of seconds; `TypeError`/`ValueError` naming `what`."""
    if type(value) is bool or not isinstance(value, (int, float)):
        raise TypeError(f"{what} must be a number of seconds, got {short_repr(value)}")
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"{what} must be a positive finite number of seconds, got {short_repr(value)}")
    return float(value)


def check_liveness(tick_interval: Any, down_after: Any) -> tuple[float, float]:
    """``(tick_interval, down_after)`` as seconds, with `down_after` at least two ticks.

    A peer is declared down after `down_after` seconds without a word; ticks keep idle
    peers talking, so fewer than two per `down_after` would declare healthy ones down.
    """
    tick = check_seconds("tick_interval", tick_interval)
    down = check_seconds("down_after", down_after)
    if down < 2 * tick:
        raise ValueError(f"down_after ({short_repr(down_after)}) must be at least twice tick_interval "
                         f"({short_repr(tick_interval)}), or idle but healthy peers would be declared down")
    return tick, down


def check_int(what: str, value: Any, low: int, high: int) -> int:
    """`value` as an int within `low`..`high`; `TypeError`/`ValueError` naming `what`."""
    if type(value) is not int:
        raise TypeError(f"{what} must be an int, got {short_repr(value)}")
    if not low <= value <= high:
        raise ValueError(f"{what} must be within {low}..{high}, got {short_repr(value)}")
    return value


def check_max_frame(value: Any) -> int:
    """`value` as a frame limit an endpoint may announce: an int within `MIN_MAX_FRAME`..2**32-1."""
    if type(value) is not int:
        raise TypeError(f"max_frame must be an int, got {short_repr(value)}")
    if not MIN_MAX_FRAME <= value <= 0xFFFFFFFF:
        raise ValueError(
            f"max_frame must be within {MIN_MAX_FRAME} (64 KiB, the floor peers accept) and {0xFFFFFFFF} bytes, "
            f"got {short_repr(value)}"
        )
    return value


def parse_address(address: str) -> tuple[str, int]:
    """``"host:port"``, ``"[v6addr]:port"`` or a node id ``"name@host:port"`` -> ``(host, port)``.

    Raises `ValueError` for anything else (`TypeError` for a non-str).
    """
    if type(address) is not str:
        raise TypeError(f"address must be a str, got {short_repr(address)}")
    text = address.rpartition("@")[2]
    host, sep, port_text = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not port_text.isdigit() or not port_text.isascii():
        raise ValueError(f"address must be 'host:port' or 'name@host:port', got {short_repr(address)}")
    port = int(port_text)
    if not 0 < port <= 65535:
        raise ValueError(f"port must be in 1..65535, got {port} in {short_repr(address)}")
    return host, port
