"""What the dashboard shows, computed from a job and its report (pure functions)."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import urlsplit

from markupsafe import Markup

from api.ui import charts

# (metric key, label) of the before/after honesty table, in its order.
HONESTY_ROWS: list[tuple[str, str]] = [
    ("refusal_f1", "Refusal F1"),
    ("refusal_precision", "Refusal precision"),
    ("refusal_recall", "Refusal recall"),
    ("refusal_rate_unanswerable", "Refusal rate, unanswerable"),
    ("refusal_rate_answerable", "Refusal rate, answerable"),
    ("rf_delta", "RFΔ (unanswerable − answerable)"),
    ("domain_accuracy", "Domain accuracy"),
    ("answer_accuracy", "Answer accuracy"),
]
CALIBRATION_ROWS: list[tuple[str, str]] = [("ece", "Calibration ECE"), ("mce", "Calibration MCE")]
BAR_ROWS: list[tuple[str, str]] = [
    ("refusal_f1", "refusal F1"),
    ("refusal_rate_unanswerable", "refusal unans."),
    ("refusal_rate_answerable", "refusal ans."),
    ("domain_accuracy", "domain acc."),
    ("answer_accuracy", "answer acc."),
]
MODELS = ("base", "finetuned", "repaired")
LAYER_NAME = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer)\.(\d+)\.(?:.*\.)?([^.]+)\.weight$")


def fmt(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int | float):
        return f"{value:.3f}"
    return str(value)


def honesty_table(metrics: Mapping[str, Any] | None) -> list[dict[str, Any]] | None:
    """Rows {key, label, values: {model: value}} of the before/after table; calibration
    rows only when some model has calibration. None without metrics."""
    if not metrics or not all(isinstance(metrics.get(m), Mapping) for m in MODELS):
        return None
    rows = [
        {"key": key, "label": label, "values": {m: metrics[m].get(key) for m in MODELS}}
        for key, label in HONESTY_ROWS
    ]
    calibrations = {m: metrics[m].get("calibration") for m in MODELS}
    if any(calibrations.values()):
        rows += [
            {
                "key": f"calibration.{key}",
                "label": label,
                "values": {m: (calibrations[m] or {}).get(key) for m in MODELS},
            }
            for key, label in CALIBRATION_ROWS
        ]
    return rows


def honesty_bars(metrics: Mapping[str, Any] | None) -> Markup:
    if not metrics or not all(isinstance(metrics.get(m), Mapping) for m in MODELS):
        return Markup("")
    return charts.before_after_bars({m: metrics[m] for m in MODELS}, BAR_ROWS)


def reliability(metrics: Mapping[str, Any] | None) -> Markup:
    """The reliability diagram of the models' answer calibration, when there is any."""
    if not metrics:
        return Markup("")
    return charts.reliability({m: (metrics.get(m) or {}).get("calibration") for m in MODELS})


def selected_cells(report: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """Columns restored per (layer, kind) from an HCNR report's selected_matrices, as a
    fraction of the input columns of the cell's matrices (a count alone misleads across
    kinds of different widths); None when the report has none (RAIT, DPO).

    Each cell: {columns, in_features, fraction}; `in_features` and `fraction` are None
    when a matrix of the cell has no recorded width (reports older than the field)."""
    if not report or "selected_matrices" not in report:
        return None
    cells: dict[tuple[str, str], dict[str, Any]] = {}
    layers: set[int] = set()
    kinds: list[str] = []
    other: list[dict[str, Any]] = []
    for matrix in report["selected_matrices"]:
        match = LAYER_NAME.search(matrix["name"])
        if match is None:
            other.append(matrix)
            continue
        layer, kind = int(match.group(1)), match.group(2)
        layers.add(layer)
        if kind not in kinds:
            kinds.append(kind)
        cell = cells.setdefault((str(layer), kind), {"columns": 0, "in_features": 0})
        cell["columns"] += int(matrix.get("n_columns", 0))
        width = matrix.get("in_features")
        if cell["in_features"] is not None and isinstance(width, int) and width > 0:
            cell["in_features"] += width
        else:
            cell["in_features"] = None
    for cell in cells.values():
        width = cell["in_features"]
        cell["fraction"] = cell["columns"] / width if width else None
    order = [str(n) for n in range(min(layers), max(layers) + 1)] if layers else []
    by_fraction = bool(cells) and all(c["fraction"] is not None for c in cells.values())
    return {
        "cells": cells,
        "by_fraction": by_fraction,
        "layers": order,
        "kinds": kinds,
        "svg": charts.heatmap(cells, order, kinds, by_fraction),
        "matrices": [
            {
                **m,
                "fraction": m["n_columns"] / m["in_features"] if m.get("in_features") else None,
            }
            for m in report["selected_matrices"]
        ],
        "unplaced": other,
        "n_selected": report.get("n_selected_matrices"),
        "n_target": report.get("n_target_matrices"),
    }


percent = charts.percent


def frontier(auto_report: Mapping[str, Any] | None) -> dict[str, Any] | None:
    if not auto_report or "candidates" not in auto_report:
        return None
    return {
        "svg": charts.frontier(auto_report),
        "candidates": auto_report["candidates"],
        "chosen": auto_report.get("chosen"),
        "reason": auto_report.get("reason"),
        "reference": auto_report.get("reference") or {},
        "validation": auto_report.get("validation") or {},
        "max_domain_drop": (auto_report.get("config") or {}).get("max_domain_drop"),
    }


def candidate_seconds(auto_report: Mapping[str, Any] | None) -> dict[str, float]:
    """auto records seconds per candidate, not per stage: those are its timings."""
    rows = (auto_report or {}).get("candidates") or []
    return {f"candidate {r['name']}": r["seconds"] for r in rows if r.get("seconds") is not None}


def safe_url(url: Any) -> str | None:
    """`url` when it is an http(s) address, else None: a tracker's run URL is written by
    the worker from the tracker's answer, and a `javascript:` one must never be a link."""
    if not isinstance(url, str) or len(url) > 2000:
        return None
    try:
        parts = urlsplit(url)
    except ValueError:
        return None
    return url if parts.scheme in ("http", "https") and parts.netloc else None


def tracking_runs(
    report: Mapping[str, Any] | None, events: Sequence[Any]
) -> list[dict[str, Any]] | None:
    """Each tracker run of the job (type, project, status, run, link, offline artifact,
    errors): the report's `tracking` summary, else the `tracking` event's (the event is
    there before the report is read, and for jobs whose report is not shown). None when
    the job recorded no tracking."""
    summary = (report or {}).get("tracking")
    if summary is None:
        for event in events:
            if event.type == "tracking" and isinstance(event.data, Mapping):
                summary = event.data.get("tracking")
    if not isinstance(summary, list):
        return None
    return [
        {**entry, "link": safe_url(entry.get("url"))}
        for entry in summary
        if isinstance(entry, Mapping)
    ]


def human_bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"  # pragma: no cover


def parse_labels(text: str) -> list[str]:
    """`k=v` pairs separated by commas or new lines -> ["k=v", ...] (blank ones dropped)."""
    return [part.strip() for part in re.split(r"[,\n]", text or "") if part.strip()]
