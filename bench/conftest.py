"""pytest configuration of the benchmarks (``pytest bench/``; never collected by ``pytest``).

The repository's ``pyproject.toml`` limits a bare ``pytest`` to ``tests/``; these
benchmarks only run when ``bench/`` is named. ``_support`` puts the repository root on
``sys.path`` so the working tree's package (and its in-place built extension) is the one
measured, and this file orders the collected benchmarks so that, for each figure, the
Cython table, the pure twin and the baselines run one right after the other.
"""

from __future__ import annotations

import _support  # noqa: F401  (puts the repository root on sys.path)
import pytest

#: Order of implementations inside one figure.
IMPL_ORDER = {"cython": 0, "python": 1, "dict": 2, "dict_lock": 3}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Keep each figure's implementations adjacent (stable sort on figure, then impl).

    pytest generates parametrized items in decorator order; this makes the order
    independent of it: items of one test function and one size stay together, with
    the implementations in `IMPL_ORDER`, so their runs are as close in time as the
    runner allows (the machine's noise drifts over minutes, not milliseconds).
    """
    def key(item: pytest.Item) -> tuple:
        callspec = getattr(item, "callspec", None)
        params = dict(callspec.params) if callspec is not None else {}
        impl = params.pop("impl", None)
        rest = tuple(sorted((k, repr(v)) for k, v in params.items()))
        return (item.fspath.strpath, getattr(item, "originalname", item.name), rest, IMPL_ORDER.get(impl, 9))

    positions = {id(item): n for n, item in enumerate(items)}
    first_seen: dict[tuple, int] = {}
    for item in items:
        k = key(item)[:3]
        first_seen.setdefault(k, positions[id(item)])
    items.sort(key=lambda item: (first_seen[key(item)[:3]], key(item)[3]))
