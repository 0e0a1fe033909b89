"""The first lines of a subprocess script that makes packages unimportable, as if they were
not installed: what a machine with only some extras has (`tests/test_packaging.py`,
`tests/test_one_house.py`). The script then sees them as `BLOCKED`."""

from __future__ import annotations

from collections.abc import Iterable


def blocking_preamble(blocked: Iterable[str]) -> str:
    """Python source: `BLOCKED`, and a meta-path finder (first in line) that refuses any
    module whose top-level package is in it."""
    return f"""import sys

BLOCKED = {sorted(set(blocked))!r}


class Blocker:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {{name!r}} (blocked)", name=name)
        return None


sys.meta_path.insert(0, Blocker())
"""
