"""Runs `hcnr` commands one after the other in this process (torch imported once) and
prints, as JSON, each one's exit code, stderr and seconds. Used by
test_security_bounded.py: argv lists come as JSON in argv[1]; limits come from HCNR_*."""

from __future__ import annotations

import json
import sys
import time

from typer.testing import CliRunner

from hcnr_cli.main import app


def main() -> None:
    runner, results = CliRunner(), []
    for case in json.loads(sys.argv[1]):
        started = time.monotonic()
        result = runner.invoke(app, case["argv"])
        results.append(
            {
                "name": case["name"],
                "exit_code": result.exit_code,
                "stderr": result.stderr[-2000:],
                "seconds": round(time.monotonic() - started, 3),
            }
        )
    print(json.dumps(results))


if __name__ == "__main__":
    main()
