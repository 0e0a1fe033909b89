"""Command-line options generated from a config model's fields (mergekit's way).

One spec — `hcnr_core.config.RepairConfig` — states every field's type, default, bounds and
description; the library takes it as is, the API's hyper-parameters are generated from it
(`api.schemas`), and so are the `hcnr repair` flags here. A field added to the config is a
flag without touching the CLI; a default changed there shows in `--help`.

    @app.command()
    @config_flags(RunOptions, main="Run options")     # how it runs
    @config_flags(RepairConfig, main="HCNR options")  # what it computes
    def repair(base: ..., **flags): ...   # flags: the fields given on the command line

Every generated flag defaults to None ("not given"), so a `--config` file and `--set`
keep their precedence; validation stays with the config model.
"""

from __future__ import annotations

import inspect
import types
import typing
from collections.abc import Callable, Collection, Mapping
from typing import Annotated, Any, Literal, TypeVar

import typer
from pydantic import BaseModel
from pydantic.fields import FieldInfo
from rich.markup import escape

F = TypeVar("F", bound=Callable[..., Any])


def _flag_type(annotation: Any) -> tuple[type, str]:
    """The click-friendly type of a field, and its choices for the help text."""
    if typing.get_origin(annotation) is Literal:
        return str, " | ".join(str(choice) for choice in typing.get_args(annotation))
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        kinds = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(kinds) == 1:
            return _flag_type(kinds[0])
        return str, ""
    if annotation in (bool, int, float, str):
        return annotation, ""
    return str, ""


def _default_text(info: FieldInfo) -> str:
    if info.default_factory is not None:
        return ""
    default = info.default
    if isinstance(default, str) and len(default) > 24:
        return " [see docs]"
    return f" [{default}]"


def config_options(
    config: type[BaseModel], panels: Mapping[str, Collection[str]] | None = None, main: str = ""
) -> list[inspect.Parameter]:
    """One keyword parameter per field of `config`, typed and documented for typer."""
    panel_of = {name: panel for panel, names in (panels or {}).items() for name in names}
    params = []
    for name, info in config.model_fields.items():
        kind, choices = _flag_type(info.annotation)
        flag = "--" + name.replace("_", "-")
        words = [info.description or name.replace("_", " ")]
        if choices:
            words.append(f"({choices})")
        text = escape(" ".join(words) + _default_text(info))  # "[paper]" is no markup tag
        decls = [f"{flag}/--no-{flag[2:]}"] if kind is bool else [flag]
        option = typer.Option(
            *decls, help=text, rich_help_panel=panel_of.get(name, main) or None, show_default=False
        )
        params.append(
            inspect.Parameter(
                name,
                inspect.Parameter.KEYWORD_ONLY,
                default=None,
                annotation=Annotated[kind | None, option],
            )
        )
    return params


def config_flags(
    config: type[BaseModel],
    panels: Mapping[str, Collection[str]] | None = None,
    main: str = "",
) -> Callable[[F], F]:
    """Give a command taking `**flags` one option per field of `config` (see the module)."""

    def decorate(func: F) -> F:
        signature = inspect.signature(func, eval_str=True)
        fixed = [
            p for p in signature.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD
        ]
        taken = {p.name for p in fixed}
        generated = [p for p in config_options(config, panels, main) if p.name not in taken]
        func.__signature__ = signature.replace(parameters=[*fixed, *generated])  # type: ignore[attr-defined]
        func.__annotations__ = {
            **{p.name: p.annotation for p in fixed},
            **{p.name: p.annotation for p in generated},
            "return": signature.return_annotation,
        }
        return func

    return decorate
