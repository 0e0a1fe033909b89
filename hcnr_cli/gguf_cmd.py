"""`hcnr import-gguf`: a GGUF checkpoint becomes a Hugging Face model directory."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from hcnr_cli.common import ProgressPrinter, fail, quiet_libraries


def import_gguf_command(
    gguf_file: Annotated[Path, typer.Argument(help="The .gguf file to import")],
    out: Annotated[Path, typer.Option(help="Output directory (must not exist or be empty)")],
    dtype: Annotated[str, typer.Option(help="float32 | bfloat16")] = "float32",
    no_progress: Annotated[bool, typer.Option("--no-progress", help="No progress bar")] = False,
) -> None:
    """Dequantize a GGUF checkpoint into a Hugging Face directory (safetensors, tokenizer,
    chat template, generation config); prints a JSON summary."""
    quiet_libraries()
    from hcnr_core import HCNRError
    from hcnr_core.gguf_import import DTYPES, import_gguf, read_manifest

    if dtype not in DTYPES:
        fail(ValueError(f"--dtype must be one of {', '.join(DTYPES)}, not {dtype!r}"))
    try:
        with ProgressPrinter(enabled=not no_progress and sys.stderr.isatty()) as bar:
            published = import_gguf(gguf_file, out, dtype=dtype, progress=bar)
    except HCNRError as exc:
        fail(exc)
    manifest = read_manifest(published) or {}
    keys = ("architecture", "model_type", "parameters", "dtype", "tied", "pad_source")
    summary = {
        "out": str(published),
        **{key: manifest.get(key) for key in keys},
        "eos_token_id": manifest.get("eos_token_id"),
        "chat_template": manifest.get("chat_template"),
        "warnings": manifest.get("warnings", []),
        "seconds": manifest.get("seconds"),
        "files": manifest.get("files", []),
    }
    typer.echo(json.dumps(summary))


def register(app: typer.Typer) -> None:
    app.command("import-gguf")(import_gguf_command)
