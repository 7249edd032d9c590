"""Pick the table implementation: the Cython extension, or its pure-Python twin.

The extension is used unless ``PGREGISTRY_PURE_PYTHON=1`` is set or it was not built
(no compiler at install time); in that case one `RuntimeWarning` says so. Both modules
implement the contract in ``_core.pyi`` and pass the same tests.
"""

from __future__ import annotations

import os
import warnings
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    # Both implementations honour _core.pyi; the checker follows the twin.
    from ._core_py import Matcher, Table

    IMPLEMENTATION: str
elif os.environ.get("PGREGISTRY_PURE_PYTHON") == "1":
    from ._core_py import Matcher, Table
    IMPLEMENTATION = "python"
else:
    try:
        from ._core import Matcher, Table
        IMPLEMENTATION = "cython"
    except ImportError as exc:
        warnings.warn(
            f"pgregistry: the compiled table is unavailable ({exc}); using the pure-Python "
            "table, which is several times slower. Reinstall with a C compiler to fix this.",
            RuntimeWarning,
            stacklevel=2,
        )
        from ._core_py import Matcher, Table
        IMPLEMENTATION = "python"

__all__ = ["Table", "Matcher", "IMPLEMENTATION"]
