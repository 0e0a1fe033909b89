"""Helpers here are imported as a package (`from tests.reliability import ...`)."""
