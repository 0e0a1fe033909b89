"""The progress event every repair method reports (torch-free)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ProgressEvent:
    """`done` of `total` steps of `stage`; `fraction` is the whole run's, 0-1."""

    stage: str
    done: int
    total: int
    fraction: float
    message: str = ""
    record: dict[str, Any] | None = None  # a result worth its own job event (auto's candidates)
