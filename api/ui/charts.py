"""Inline SVG charts for the dashboard, drawn on the server (no JavaScript, no CDN).

Every function returns a `Markup` string: all text in it is escaped here. Each chart is an
`<svg role="img">` with a `<title>` and a `<desc>` for screen readers; each mark has its own
`<title>` (a tooltip) and colours are backed by shapes or labels, never the only cue.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from html import escape
from typing import Any

from markupsafe import Markup

MODEL_COLOURS = {"base": "#7f7f7f", "finetuned": "#d95f02", "repaired": "#1b6fb5"}
MODEL_NAMES = {"base": "base", "finetuned": "fine-tuned", "repaired": "repaired"}


def _e(value: Any) -> str:
    return escape(str(value), quote=True)


def _svg(width: int, height: int, title: str, desc: str, body: list[str], css: str) -> Markup:
    return Markup(
        f'<svg class="chart {css}" role="img" viewBox="0 0 {width} {height}" '
        f'width="{width}" height="{height}" xmlns="http://www.w3.org/2000/svg">'
        f"<title>{_e(title)}</title><desc>{_e(desc)}</desc>{''.join(body)}</svg>"
    )


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def before_after_bars(
    metrics: Mapping[str, Mapping[str, Any]], rows: Sequence[tuple[str, str]]
) -> Markup:
    """Grouped bars (base, fine-tuned, repaired) for each (key, label) of `rows`, on 0..1."""
    models = [m for m in ("base", "finetuned", "repaired") if m in metrics]
    group_w, bar_w, left, top, plot_h = 120, 30, 40, 30, 180
    width = left + group_w * len(rows) + 20
    height = top + plot_h + 50
    body = []
    for tick in (0, 0.25, 0.5, 0.75, 1.0):
        y = top + plot_h * (1 - tick)
        body.append(
            f'<line x1="{left}" x2="{width - 10}" y1="{y:.1f}" y2="{y:.1f}" '
            f'stroke="#ddd" stroke-width="1"/>'
            f'<text x="{left - 6}" y="{y + 4:.1f}" font-size="11" text-anchor="end">{tick:g}</text>'
        )
    for g, (key, label) in enumerate(rows):
        x0 = left + g * group_w + (group_w - bar_w * len(models)) / 2
        for i, model in enumerate(models):
            value = metrics[model].get(key)
            x = x0 + i * bar_w
            tip = f"{label}, {MODEL_NAMES[model]}: {_fmt(value)}"
            if value is None:
                body.append(
                    f'<text class="bar-na" x="{x + bar_w / 2:.1f}" y="{top + plot_h - 4}" '
                    f'font-size="9" text-anchor="middle"><title>{_e(tip)}</title>n/a</text>'
                )
                continue
            h = plot_h * max(0.0, min(1.0, float(value)))
            body.append(
                f'<rect class="bar" data-model="{model}" data-metric="{_e(key)}" '
                f'data-value="{float(value)!r}" x="{x + 2:.1f}" y="{top + plot_h - h:.1f}" '
                f'width="{bar_w - 4}" height="{h:.1f}" fill="{MODEL_COLOURS[model]}">'
                f"<title>{_e(tip)}</title></rect>"
            )
        body.append(
            f'<text x="{left + g * group_w + group_w / 2:.1f}" y="{top + plot_h + 18}" '
            f'font-size="12" text-anchor="middle">{_e(label)}</text>'
        )
    for i, model in enumerate(models):  # legend
        lx = left + i * 110
        body.append(
            f'<rect x="{lx}" y="6" width="12" height="12" fill="{MODEL_COLOURS[model]}"/>'
            f'<text x="{lx + 16}" y="16" font-size="12">{MODEL_NAMES[model]}</text>'
        )
    desc = "; ".join(
        f"{label}: " + ", ".join(f"{MODEL_NAMES[m]} {_fmt(metrics[m].get(key))}" for m in models)
        for key, label in rows
    )
    return _svg(width, height, "Honesty metrics before and after the repair", desc, body, "bars")


def stage_bars(stage_seconds: Mapping[str, float]) -> Markup:
    """Horizontal bars of seconds per stage."""
    items = [(k, float(v)) for k, v in stage_seconds.items()]
    if not items:
        return Markup("")
    longest = max(v for _, v in items) or 1.0
    left, bar_h, plot_w = 170, 18, 360
    width, height = left + plot_w + 90, 10 + len(items) * (bar_h + 6)
    body = []
    for i, (stage, seconds) in enumerate(items):
        y = 6 + i * (bar_h + 6)
        w = max(1.0, plot_w * seconds / longest)
        body.append(
            f'<text x="{left - 8}" y="{y + 13}" font-size="12" text-anchor="end">{_e(stage)}</text>'
            f'<rect class="bar" data-stage="{_e(stage)}" x="{left}" y="{y}" width="{w:.1f}" '
            f'height="{bar_h}" fill="#1b6fb5"><title>{_e(stage)}: {seconds:.3f} s</title></rect>'
            f'<text x="{left + w + 6:.1f}" y="{y + 13}" font-size="12">{seconds:.2f} s</text>'
        )
    desc = ", ".join(f"{stage} {seconds:.2f} s" for stage, seconds in items)
    return _svg(width, height, "Seconds per stage", desc, body, "stages")


def pareto(points: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    """The points no other point beats on both x and y (both maximised), by x."""
    front = [p for p in points if not any(q[0] >= p[0] and q[1] >= p[1] and q != p for q in points)]
    return sorted(set(front))


def frontier(auto_report: Mapping[str, Any]) -> Markup:
    """auto: validation domain accuracy (x) vs refusal F1 (y) of every measured candidate,
    the references, the domain limit, the non-dominated frontier and the choice."""
    reference = auto_report.get("reference") or {}
    measured = [c for c in auto_report.get("candidates", []) if c.get("status") == "ok"]
    if not measured:
        return Markup("")
    left, top, plot = 56, 20, 320
    width, height = left + plot + 160, top + plot + 50

    def px(x: float) -> float:
        return left + plot * max(0.0, min(1.0, x))

    def py(y: float) -> float:
        return top + plot * (1 - max(0.0, min(1.0, y)))

    body = [
        f'<rect x="{left}" y="{top}" width="{plot}" height="{plot}" fill="none" stroke="#999"/>'
    ]
    for tick in (0, 0.25, 0.5, 0.75, 1.0):
        body.append(
            f'<text x="{px(tick):.1f}" y="{top + plot + 16}" font-size="11" '
            f'text-anchor="middle">{100 * tick:g}</text>'
            f'<text x="{left - 6}" y="{py(tick) + 4:.1f}" font-size="11" '
            f'text-anchor="end">{100 * tick:g}</text>'
        )
    body.append(
        f'<text x="{left + plot / 2}" y="{height - 8}" font-size="12" text-anchor="middle">'
        "domain accuracy on validation (%)</text>"
        f'<text x="14" y="{top + plot / 2}" font-size="12" text-anchor="middle" '
        f'transform="rotate(-90 14 {top + plot / 2})">refusal F1 on validation (%)</text>'
    )
    max_drop = (auto_report.get("config") or {}).get("max_domain_drop")
    ft = reference.get("finetuned") or {}
    if max_drop is not None and ft.get("domain_accuracy") is not None:
        limit = ft["domain_accuracy"] - max_drop / 100
        if 0 <= limit <= 1:
            body.append(
                f'<line class="limit" x1="{px(limit):.1f}" x2="{px(limit):.1f}" y1="{top}" '
                f'y2="{top + plot}" stroke="#555" stroke-dasharray="5 4">'
                f"<title>domain limit: {100 * limit:.1f}% (−{max_drop:g} points)</title></line>"
            )
    xy = {c["name"]: (c.get("domain_accuracy") or 0.0, c["refusal_f1"]) for c in measured}
    front = pareto(list(xy.values()))
    if len(front) > 1:
        path = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in front)
        body.append(
            f'<polyline class="pareto" points="{path}" fill="none" stroke="#1b6fb5" '
            f'stroke-width="1.5"><title>non-dominated candidates</title></polyline>'
        )
    for name, marker in (("finetuned", "square"), ("base", "diamond")):
        ref = reference.get(name)
        if not ref:
            continue
        x, y = px(ref.get("domain_accuracy") or 0.0), py(ref.get("refusal_f1") or 0.0)
        tip = (
            f"{MODEL_NAMES[name]}: domain {_fmt(ref.get('domain_accuracy'))}, "
            f"F1 {_fmt(ref.get('refusal_f1'))}"
        )
        shape = (
            f'<rect x="{x - 5:.1f}" y="{y - 5:.1f}" width="10" height="10" fill="#777">'
            if marker == "square"
            else f'<polygon points="{x:.1f},{y - 6:.1f} {x + 6:.1f},{y:.1f} {x:.1f},{y + 6:.1f} '
            f'{x - 6:.1f},{y:.1f}" fill="#777">'
        )
        body.append(f'<g class="reference" data-name="{name}">{shape}<title>{_e(tip)}</title>'
                    f'{"</rect>" if marker == "square" else "</polygon>"}</g>')  # fmt: skip
    chosen = auto_report.get("chosen")
    for c in measured:
        x, y = px(xy[c["name"]][0]), py(xy[c["name"]][1])
        ok = c.get("qualified", True)
        tip = (
            f"{c['name']} ({c.get('method')}): domain {_fmt(c.get('domain_accuracy'))}, "
            f"F1 {_fmt(c['refusal_f1'])}, drop {c.get('domain_drop_points', 0):.1f} points"
            + ("" if ok else ", over the limit")
            + (", chosen" if c["name"] == chosen else "")
        )
        mark = (
            f'<circle cx="{x:.1f}" cy="{y:.1f}" r="5" fill="#1a9850"/>'
            if ok
            else f'<path d="M{x - 5:.1f},{y - 5:.1f}L{x + 5:.1f},{y + 5:.1f}M{x - 5:.1f},'
            f'{y + 5:.1f}L{x + 5:.1f},{y - 5:.1f}" stroke="#d73027" stroke-width="2"/>'
        )
        ring = (
            f'<circle class="chosen" cx="{x:.1f}" cy="{y:.1f}" r="11" fill="none" '
            f'stroke="#000" stroke-width="2"/>'
            if c["name"] == chosen
            else ""
        )
        body.append(
            f'<g class="candidate" data-name="{_e(c["name"])}" '
            f'data-qualified="{str(bool(ok)).lower()}">{mark}{ring}<title>{_e(tip)}</title>'
            f'<text x="{x + 8:.1f}" y="{y - 6:.1f}" font-size="11">{_e(c["name"])}</text></g>'
        )
    lx = left + plot + 16
    legend = [
        ('<circle cx="6" cy="0" r="5" fill="#1a9850"/>', "within the limit"),
        ('<path d="M1,-5L11,5M1,5L11,-5" stroke="#d73027" stroke-width="2"/>', "over the limit"),
        ('<circle cx="6" cy="0" r="9" fill="none" stroke="#000" stroke-width="2"/>', "chosen"),
        ('<rect x="1" y="-5" width="10" height="10" fill="#777"/>', "fine-tuned"),
        ('<polygon points="6,-6 12,0 6,6 0,0" fill="#777"/>', "base"),
    ]
    for i, (shape, label) in enumerate(legend):
        body.append(
            f'<g transform="translate({lx} {top + 10 + 22 * i})">{shape}'
            f'<text x="18" y="4" font-size="12">{label}</text></g>'
        )
    desc = "; ".join(
        f"{c['name']}: domain {_fmt(c.get('domain_accuracy'))}, refusal F1 {_fmt(c['refusal_f1'])}"
        for c in measured
    )
    return _svg(width, height, "auto: trade-off frontier", desc, body, "frontier")


def percent(value: float | None) -> str:
    """A fraction as a percentage: two significant digits below 1% (restoring 0.4% of a
    matrix's columns is common and must not print as 0%)."""
    if value is None:
        return "n/a"
    pct = 100 * value
    return f"{pct:.2g}%" if 0 < pct < 1 else f"{pct:.1f}%"


def _cell_order(item: tuple[tuple[str, str], Any]) -> tuple[int, str]:
    (layer, kind), _ = item
    return int(layer), kind


def heatmap(
    cells: Mapping[tuple[str, str], Mapping[str, Any]],
    layers: Sequence[str],
    kinds: Sequence[str],
    by_fraction: bool = True,
) -> Markup:
    """Share of input columns restored per (layer, kind): one cell per pair, darker = a
    larger fraction of the matrix's columns. The shade scales to the largest fraction (a
    few percent is typical; an absolute 0-100% scale would leave every cell white) and
    the legend says which fraction the darkest shade is. The percentage is written in the
    cell; the tooltip adds the counts. A report without matrix widths (older jobs) falls
    back to counts, and says so in the title."""
    if not cells:
        return Markup("")
    cell_w, cell_h, left, top = max(30, min(52, 900 // max(1, len(layers)))), 26, 110, 28
    width = max(left + cell_w * len(layers) + 10, left + 220)  # room for the legend's text
    height = top + cell_h * len(kinds) + 34

    def value(cell: Mapping[str, Any]) -> float:
        return cell["fraction"] if by_fraction else cell["columns"]

    peak = max(value(c) for c in cells.values()) or 1
    body = []
    for j, layer in enumerate(layers):
        body.append(
            f'<text x="{left + j * cell_w + cell_w / 2:.1f}" y="{top - 8}" font-size="11" '
            f'text-anchor="middle">{_e(layer)}</text>'
        )
    for i, kind in enumerate(kinds):
        y = top + i * cell_h
        body.append(
            f'<text x="{left - 8}" y="{y + 17}" font-size="12" text-anchor="end">{_e(kind)}</text>'
        )
        for j, layer in enumerate(layers):
            cell = cells.get((layer, kind))
            n = cell["columns"] if cell else 0
            shade = value(cell) / peak if cell else 0.0
            # white → dark blue; the value is written in the cell too
            r, g, b = (int(255 - shade * (255 - c)) for c in (8, 48, 107))
            ink = "#fff" if shade > 0.55 else "#000"
            if cell and by_fraction:
                label = percent(cell["fraction"])
                tip = (
                    f"layer {layer}, {kind}: {label} of the input columns restored "
                    f"({n} of {cell['in_features']})"
                )
                data = (
                    f'data-fraction="{cell["fraction"]!r}" data-in-features="{cell["in_features"]}"'
                )
            else:
                label = str(n)
                tip = f"layer {layer}, {kind}: {n} columns restored"
                data = ""
            body.append(
                f'<g class="cell" data-layer="{_e(layer)}" data-kind="{_e(kind)}" '
                f'data-columns="{n}" {data}><rect x="{left + j * cell_w}" y="{y}" '
                f'width="{cell_w - 2}" height="{cell_h - 2}" fill="rgb({r},{g},{b})" '
                f'stroke="#ccc"/><title>{_e(tip)}</title>'
                + (
                    f'<text x="{left + j * cell_w + (cell_w - 2) / 2:.1f}" y="{y + 17}" '
                    f'font-size="10" text-anchor="middle" fill="{ink}">{_e(label)}</text>'
                    if n
                    else ""
                )
                + "</g>"
            )
    y = top + cell_h * len(kinds) + 8
    darkest = percent(peak) if by_fraction else f"{peak} columns"
    body.append(
        f'<g class="legend"><rect x="{left}" y="{y}" width="14" height="14" fill="#fff" '
        f'stroke="#ccc"/><text x="{left + 18}" y="{y + 11}" font-size="11">none</text>'
        f'<rect x="{left + 70}" y="{y}" width="14" height="14" fill="rgb(8,48,107)"/>'
        f'<text x="{left + 88}" y="{y + 11}" font-size="11">{_e(darkest)} (darkest)</text></g>'
    )
    if by_fraction:
        title = "Share of input columns restored per layer and kind"
        desc = "; ".join(
            f"layer {layer} {kind}: {percent(c['fraction'])} ({c['columns']} of "
            f"{c['in_features']} columns)"
            for (layer, kind), c in sorted(cells.items(), key=_cell_order)
        )
    else:
        title = "Columns restored per layer and kind (the report records no matrix widths)"
        desc = "; ".join(
            f"layer {layer} {kind}: {c['columns']}"
            for (layer, kind), c in sorted(cells.items(), key=_cell_order)
        )
    return _svg(width, height, title, desc, body, "heatmap")


def reliability(calibrations: Mapping[str, Mapping[str, Any] | None]) -> Markup:
    """Reliability diagram: accuracy vs mean confidence of each non-empty bin, per model,
    with the diagonal of perfect calibration."""
    models = [m for m in ("base", "finetuned", "repaired") if calibrations.get(m)]
    if not models:
        return Markup("")
    left, top, plot = 56, 30, 260
    width, height = left + plot + 150, top + plot + 46

    def px(x: float) -> float:
        return left + plot * max(0.0, min(1.0, x))

    def py(y: float) -> float:
        return top + plot * (1 - max(0.0, min(1.0, y)))

    body = [
        f'<rect x="{left}" y="{top}" width="{plot}" height="{plot}" fill="none" stroke="#999"/>',
        f'<line x1="{px(0)}" y1="{py(0)}" x2="{px(1)}" y2="{py(1)}" stroke="#bbb" '
        f'stroke-dasharray="4 4"><title>perfect calibration</title></line>',
        f'<text x="{left + plot / 2}" y="{height - 8}" font-size="12" text-anchor="middle">'
        "mean confidence</text>",
        f'<text x="14" y="{top + plot / 2}" font-size="12" text-anchor="middle" '
        f'transform="rotate(-90 14 {top + plot / 2})">accuracy</text>',
    ]
    for tick in (0, 0.5, 1.0):
        body.append(
            f'<text x="{px(tick):.1f}" y="{top + plot + 16}" font-size="11" '
            f'text-anchor="middle">{tick:g}</text><text x="{left - 6}" y="{py(tick) + 4:.1f}" '
            f'font-size="11" text-anchor="end">{tick:g}</text>'
        )
    shapes = {"base": "rect", "finetuned": "diamond", "repaired": "circle"}
    for i, model in enumerate(models):
        calibration = calibrations[model]
        bins = [b for b in calibration.get("bins", []) if b.get("n")]
        colour = MODEL_COLOURS[model]
        if len(bins) > 1:
            path = " ".join(f"{px(b['confidence']):.1f},{py(b['accuracy']):.1f}" for b in bins)
            body.append(
                f'<polyline points="{path}" fill="none" stroke="{colour}" stroke-width="1.5"/>'
            )
        for b in bins:
            x, y = px(b["confidence"]), py(b["accuracy"])
            tip = (
                f"{MODEL_NAMES[model]}, bin {b['bin']}: {b['n']} answers, confidence "
                f"{b['confidence']:.3f}, accuracy {b['accuracy']:.3f}"
            )
            mark = (
                f'<circle cx="{x:.1f}" cy="{y:.1f}" r="4" fill="{colour}"/>'
                if shapes[model] == "circle"
                else f'<rect x="{x - 4:.1f}" y="{y - 4:.1f}" width="8" height="8" fill="{colour}"/>'
                if shapes[model] == "rect"
                else f'<polygon points="{x:.1f},{y - 5:.1f} {x + 5:.1f},{y:.1f} {x:.1f},'
                f'{y + 5:.1f} {x - 5:.1f},{y:.1f}" fill="{colour}"/>'
            )
            body.append(
                f'<g class="bin" data-model="{model}" data-bin="{b["bin"]}" data-n="{b["n"]}" '
                f'data-accuracy="{float(b["accuracy"])!r}" '
                f'data-confidence="{float(b["confidence"])!r}">{mark}<title>{_e(tip)}</title></g>'
            )
        ly = top + 10 + 22 * i
        body.append(
            f'<rect x="{left + plot + 16}" y="{ly - 9}" width="12" height="12" fill="{colour}"/>'
            f'<text x="{left + plot + 34}" y="{ly + 1}" font-size="12">{MODEL_NAMES[model]} '
            f"(ECE {calibration.get('ece', 0):.3f})</text>"
        )
    desc = "; ".join(
        f"{MODEL_NAMES[m]}: ECE {calibrations[m].get('ece', 0):.3f} over "
        f"{calibrations[m].get('n', 0)} answers"
        for m in models
    )
    return _svg(width, height, "Reliability of the answers given", desc, body, "reliability")
