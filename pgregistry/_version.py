"""The package version (layer 0): one place, read by ``pgregistry --version`` and the inspection interface."""

__version__ = "0.1.0"
