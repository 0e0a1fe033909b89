"""Helpers here are imported as a package (`from tests import ...`), not via sys.path."""
