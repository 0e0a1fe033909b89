"""CPU of the API process per request, route by route (issue 16's profile of the API).

    .venv/bin/python -m bench.api_cost                      # 400 requests x 2 per route
    .venv/bin/python -m bench.api_cost --requests 400 --concurrency 8 --repeats 2

Starts the load section's service (tests/reliability/reliability_cluster.py: PostgreSQL,
Redis, `hcnr serve --no-worker`) on the tiny organism, creates one job, then sends each
route `--requests` times, `--concurrency` at a time, and prints the API process's CPU
seconds (user + system, from /proc) divided by the requests: unlike latency, that hardly
depends on what else the machine runs. A/B against an older commit, back to back:

    mkdir /tmp/old && git archive <commit> | tar -x -C /tmp/old
    PYTHONPATH=/tmp/old .venv/bin/python bench/api_cost.py    # the old API, this script
    .venv/bin/python bench/api_cost.py

(PYTHONPATH wins over the editable install, in this process and in `hcnr serve`; the old
tree needs tests/reliability/reliability_cluster.py, as since 2026-11.)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.append(str(ROOT))  # after PYTHONPATH: an older tree given there comes first
os.environ.setdefault("HF_HUB_OFFLINE", "1")


async def _measure(url: str, key: str, inputs: Any, pid: int, args: argparse.Namespace) -> dict:
    import aiohttp
    import psutil

    process = psutil.Process(pid)

    def cpu() -> float:
        times = process.cpu_times()
        return times.user + times.system

    auth = {"Authorization": f"Bearer {key}"}
    connector = aiohttp.TCPConnector(limit=args.concurrency + 2)
    async with aiohttp.ClientSession(connector=connector) as http:
        files = {}
        for purpose, path in (("honesty", inputs.honesty), ("task", inputs.task)):
            form = aiohttp.FormData()
            form.add_field("purpose", purpose)
            form.add_field(
                "file", path.read_bytes(), filename=path.name, content_type="application/jsonl"
            )
            async with http.post(f"{url}/v1/files", data=form, headers=auth) as response:
                files[purpose] = (await response.json())["id"]
        body = {
            "base": inputs.base,
            "finetuned": inputs.finetuned,
            "honesty_file": files["honesty"],
            "task_file": files["task"],
            "metadata": {"load": "yes"},
        }
        async with http.post(f"{url}/v1/repair-jobs", json=body, headers=auth) as response:
            job = (await response.json())["id"]

        def post() -> Any:
            headers = {**auth, "Idempotency-Key": str(uuid.uuid4())}
            return http.post(f"{url}/v1/repair-jobs", json=body, headers=headers)

        routes = {
            "POST /v1/repair-jobs": post,
            "GET /v1/repair-jobs/{id}": lambda: http.get(
                f"{url}/v1/repair-jobs/{job}", headers=auth
            ),
            "GET /v1/repair-jobs?limit=10": lambda: http.get(
                f"{url}/v1/repair-jobs?limit=10", headers=auth
            ),
            "GET /v1/repair-jobs/{id}/events": lambda: http.get(
                f"{url}/v1/repair-jobs/{job}/events", headers=auth
            ),
            "GET /healthz": lambda: http.get(f"{url}/healthz"),
        }
        out: dict[str, list[float]] = {route: [] for route in routes}
        for _ in range(args.repeats):
            for route, send in routes.items():
                gate = asyncio.Semaphore(args.concurrency)

                async def one(route: str = route, send: Any = send, gate: Any = gate) -> None:
                    async with gate, send() as response:
                        await response.read()
                        if response.status >= 400:
                            raise RuntimeError(f"{route}: {response.status}")

                before = cpu()
                await asyncio.gather(*(one() for _ in range(args.requests)))
                out[route].append(round(1000 * (cpu() - before) / args.requests, 2))
        return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--workdir", default=str(ROOT / ".hcnr" / "bench" / "api_cost"))
    parser.add_argument(
        "--organism-cache",
        default=os.environ.get("HCNR_ORGANISM_CACHE", str(ROOT / ".hcnr" / "bench" / "organism")),
    )
    args = parser.parse_args(argv)
    from tests.reliability.reliability_cluster import cluster, organism_inputs

    inputs = organism_inputs(Path(args.organism_cache))
    workdir = Path(args.workdir) / time.strftime("%Y%m%d-%H%M%S")
    with cluster(workdir, inputs) as running:
        key = running.create_key("api-cost")
        out = asyncio.run(_measure(running.api.url, key, inputs, running.api.process.pid, args))
    print(json.dumps({"load_average_1min": round(os.getloadavg()[0], 1)}))
    for route, values in out.items():
        print(f"{route:34s} API CPU ms per request: {values}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
