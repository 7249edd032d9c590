"""Shared fixtures.

`registry_table` runs a test once per table implementation: the Cython extension and
the pure-Python twin (only the twin when ``PGREGISTRY_PURE_PYTHON=1``). Registries
created during the test use that implementation, because the scope server takes
``_table.Table``/``_table.Matcher`` when it is built.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

import pytest

import pgregistry._table as _table

TABLE_IMPLEMENTATIONS = ["python"] if os.environ.get("PGREGISTRY_PURE_PYTHON") == "1" else ["cython", "python"]
TABLE_MODULES = {"cython": "pgregistry._core", "python": "pgregistry._core_py"}


@pytest.fixture(params=TABLE_IMPLEMENTATIONS)
def registry_table(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    # A failed import is an error, not a skip: a broken build must be visible.
    module = importlib.import_module(TABLE_MODULES[request.param])
    monkeypatch.setattr(_table, "Table", module.Table)
    monkeypatch.setattr(_table, "Matcher", module.Matcher)
    return module
