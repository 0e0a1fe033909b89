"""Helpers here are imported as a package (`from tests.security import ...`), not via sys.path."""
