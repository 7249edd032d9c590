"""Build the Cython table; fall back to the pure-Python twin when that is impossible.

`pip install .` tries to compile ``pgregistry/_core.pyx``. If Cython or a C compiler is
missing the package still installs: ``pgregistry._table`` then picks ``_core_py`` and
warns once at import.
"""

from __future__ import annotations

import os
import sys

from setuptools import setup
from setuptools.command.build_ext import build_ext


class OptionalBuildExt(build_ext):
    """A build_ext whose failure leaves a working pure-Python package behind."""

    def run(self) -> None:
        try:
            super().run()
        except Exception as exc:  # the compiler itself is missing: setuptools raises several types
            print(f"pgregistry: C extension not built ({exc}); using the pure-Python table", file=sys.stderr)

    def build_extension(self, ext) -> None:  # type: ignore[no-untyped-def]
        try:
            super().build_extension(ext)
        except Exception as exc:
            print(f"pgregistry: {ext.name} not built ({exc}); using the pure-Python table", file=sys.stderr)


def extensions() -> list:
    if os.environ.get("PGREGISTRY_PURE_PYTHON") == "1":
        return []
    try:
        from Cython.Build import cythonize
    except ImportError:
        print("pgregistry: Cython is not installed; using the pure-Python table", file=sys.stderr)
        return []
    return cythonize(
        ["pgregistry/_core.pyx"],
        compiler_directives={
            "language_level": "3",
            "boundscheck": False,
            "wraparound": False,
            "cdivision": True,
            "embedsignature": True,
        },
        quiet=True,
    )


setup(ext_modules=extensions(), cmdclass={"build_ext": OptionalBuildExt})
