"""``python -m pgregistry`` is the ``pgregistry`` command."""

from .cli import main

raise SystemExit(main())
