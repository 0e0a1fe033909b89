"""Helpers here are imported as a package (`from tests.service import ...`), not via sys.path."""
