"""Helpers here are imported as a package (`from bench import ...`), not via sys.path."""
