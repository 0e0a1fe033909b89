"""Report helpers: the library versions every report records (the model card is
`hcnr_core.card`'s)."""

from __future__ import annotations

import platform
from importlib import metadata

from hcnr_core import __version__


def versions() -> dict[str, str]:
    out = {"hcnr": __version__, "python": platform.python_version()}
    for package in ("torch", "transformers", "peft", "safetensors", "tokenizers"):
        try:
            out[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            out[package] = "not installed"
    return out
