"""Every method by name: the ones that repair by themselves (`methods.METHODS`) and `auto`,
which runs them. Apart from `methods` so that `auto` (which imports `methods`) and the
lookup form no import cycle; `auto` is imported when asked for, so that services that only
look methods up (the API) do not import torch."""

from __future__ import annotations

from hcnr_core.errors import HCNRError
from hcnr_core.methods import METHODS, Method

METHOD_NAMES = (*METHODS, "auto")


def get_method(name: str) -> Method:
    """The method called `name` (`hcnr`, `rait`, `dpo`, `auto`)."""
    if name == "auto":
        from hcnr_core.auto import AutoMethod

        return AutoMethod()
    try:
        return METHODS[name]
    except KeyError:
        raise HCNRError(f"unknown method {name!r}; one of {', '.join(METHOD_NAMES)}") from None
