"""Print the OpenAPI document (the API contract): `python -m api.openapi > api/openapi.json`.

The committed api/openapi.json is compared with the app's in the tests, so a change to the
contract is always a visible change to that file."""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path
from typing import Any


def openapi_document() -> dict[str, Any]:
    from api.app import create_app
    from store.settings import Settings

    with tempfile.TemporaryDirectory() as tmp:
        settings = Settings(env="test", data_dir=Path(tmp))
        return create_app(settings, enqueue=lambda _: None).openapi()


def main() -> None:
    json.dump(openapi_document(), sys.stdout, indent=2, sort_keys=True)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
