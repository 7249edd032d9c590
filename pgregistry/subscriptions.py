"""Who of a scope's subscribers gets which event, and delivering it to them (layer 4).

A `Subscriptions` table belongs to one scope server. A subscription is to every key of
the scope (`EVERY_KEY`) or to one key; each has a `Ref` and a subscriber process. An
event goes to the scope-wide subscribers first, then to that key's (most recent
subscription first). Delivery is a mailbox append per subscriber with one shared
payload, so a fan-out costs one small tuple per subscriber; a fan-out to many
subscribers pauses the cyclic GC while it runs and is logged if it holds the loop for
more than `FAN_OUT_STALL` seconds.
"""

from __future__ import annotations

import gc
import logging
import time
from typing import Any, Final

from .logbudget import LogBudget
from .process import Process
from .terms import Pid, Ref

__all__ = ["EVERY_KEY", "FAN_OUT_STALL", "Subscription", "Subscriptions"]

FAN_OUT_STALL: Final = 0.05
"""Seconds a single event's fan-out may hold the loop before it is logged."""
FAN_OUT_TIMED: Final = 10_000  # fan-outs to fewer subscribers are not timed (they cannot stall)

EVERY_KEY: Final = object()  # the target of a scope-wide subscription


class Subscription:
    __slots__ = ("ref", "target", "process", "deliver")

    def __init__(self, ref: Ref, target: Any, process: Process) -> None:
        self.ref = ref
        self.target = target  # a key, or EVERY_KEY
        self.process = process
        self.deliver = process.deliver  # bound once: fan-out calls it per event


class Subscriptions:
    """The subscriptions of one scope, by ref, by target and by subscriber.

    ``scope`` (scope-wide, by ref) and ``by_key`` (key -> by ref) are the dicts the scope
    server reads on every write to know whether anyone listens; they are never replaced,
    only changed in place, so a reader may keep references to them.
    """

    __slots__ = ("scope", "by_key", "_by_ref", "_of_pid", "_stall_log", "_name")

    def __init__(self, scope_name: str, log: logging.Logger) -> None:
        self.scope: dict[Ref, Subscription] = {}
        self.by_key: dict[Any, dict[Ref, Subscription]] = {}
        self._by_ref: dict[Ref, Subscription] = {}
        self._of_pid: dict[Pid, set[Ref]] = {}
        self._name = scope_name
        self._stall_log = LogBudget(log, f"scope {scope_name!r}", budget=1, window=10.0)

    def __len__(self) -> int:
        return len(self._by_ref)

    def get(self, ref: Any) -> Subscription | None:
        return self._by_ref.get(ref) if type(ref) is Ref else None

    def subscriber_pids(self) -> set[Pid]:
        return set(self._of_pid)

    def add(self, ref: Ref, target: Any, process: Process) -> None:
        """Subscribe `process` to `target` (a key, or `EVERY_KEY`) under `ref`."""
        sub = Subscription(ref, target, process)
        self._by_ref[ref] = sub
        if target is EVERY_KEY:
            self.scope[ref] = sub
        else:
            self.by_key.setdefault(target, {})[ref] = sub
        self._of_pid.setdefault(process.pid, set()).add(ref)

    def remove(self, ref: Ref) -> Subscription | None:
        """End the subscription `ref`; the subscription, or None if there was none."""
        sub = self._by_ref.pop(ref, None)
        if sub is None:
            return None
        if sub.target is EVERY_KEY:
            del self.scope[ref]
        else:
            subs = self.by_key[sub.target]
            del subs[ref]
            if not subs:
                del self.by_key[sub.target]
        pid = sub.process.pid
        refs = self._of_pid.get(pid)
        if refs is not None:
            refs.discard(ref)
            if not refs:
                del self._of_pid[pid]
        return sub

    def remove_pid(self, pid: Pid) -> None:
        """End every subscription `pid` holds (it exited)."""
        for ref in list(self._of_pid.get(pid, ())):
            self.remove(ref)

    def clear(self) -> None:
        self.scope.clear()
        self.by_key.clear()
        self._by_ref.clear()
        self._of_pid.clear()

    def fan_out(self, event_type: type, key: Any, payload: list[Any], reason: Any = None) -> None:
        """One `event_type` event to every subscriber of `key`: scope-wide ones, then the key's.

        Every event shares `payload` (no copy per subscriber) and is built with
        ``tuple.__new__`` (the named tuple's own constructor is a Python-level call).
        A `reason` other than None is set as each event's ``reason`` attribute (`Leave`;
        None keeps the class default).
        """
        scope_subs = self.scope
        key_subs = self.by_key.get(key)
        count = len(scope_subs) + (len(key_subs) if key_subs else 0)
        if count < FAN_OUT_TIMED:
            _deliver_all(event_type, key, payload, scope_subs, key_subs, reason)
            return
        started = time.perf_counter()
        # Each delivery allocates (the event, and a wake-up for a process waiting in
        # `receive`): left on, the cyclic GC would run hundreds of collections over
        # every process of the node during one fan-out. Paused, it runs once after.
        collecting = gc.isenabled()
        gc.disable()
        try:
            _deliver_all(event_type, key, payload, scope_subs, key_subs, reason)
        finally:
            if collecting:
                gc.enable()
        took = time.perf_counter() - started
        if took > FAN_OUT_STALL:
            self._stall_log.warning("scope %r: a %s event to %d subscribers held the loop for %.0f ms",
                                    self._name, event_type.__name__, count, took * 1e3)


def _deliver_all(event_type: type, key: Any, payload: list[Any], scope_subs: dict[Ref, Subscription],
                 key_subs: dict[Ref, Subscription] | None, reason: Any) -> None:
    new = tuple.__new__
    if reason is not None:
        for sub in (*scope_subs.values(), *reversed((key_subs or {}).values())):
            event: Any = new(event_type, (sub.ref, key, payload))
            event.reason = reason
            sub.deliver(event)
        return
    for sub in scope_subs.values():
        sub.deliver(new(event_type, (sub.ref, key, payload)))
    if key_subs:
        for sub in reversed(key_subs.values()):
            sub.deliver(new(event_type, (sub.ref, key, payload)))
