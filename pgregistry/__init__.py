"""pgregistry: a distributed process registry for Python."""
