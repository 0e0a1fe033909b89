"""Helpers of the dashboard tests: a small HTML element index (stdlib only) and what the
page should show, worked out from a report independently of api/ui."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from html.parser import HTMLParser
from typing import Any

from fastapi.testclient import TestClient

VOID = {"input", "br", "img", "meta", "link", "hr", "source", "col", "area", "base", "wbr"}
CSRF = re.compile(r'name="csrf_token" value="([0-9a-f]{64})"')


@dataclass
class Element:
    tag: str
    attrs: dict[str, str]
    parent: Element | None = None
    children: list[Element] = field(default_factory=list)
    text_parts: list[str] = field(default_factory=list)

    @property
    def text(self) -> str:
        return " ".join("".join(self.text_parts).split())

    def find_all(self, tag: str | None = None, **attrs: str) -> list[Element]:
        found = []
        for child in self.children:
            if (tag is None or child.tag == tag) and all(
                child.attrs.get(k.replace("_", "-")) == v for k, v in attrs.items()
            ):
                found.append(child)
            found += child.find_all(tag, **attrs)
        return found

    def find(self, tag: str | None = None, **attrs: str) -> Element:
        found = self.find_all(tag, **attrs)
        assert found, f"no <{tag}> with {attrs}"
        return found[0]

    def by_id(self, ident: str) -> Element:
        return self.find(None, id=ident)


class _Parser(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.root = Element("#root", {})
        self.current = self.root

    def handle_starttag(self, tag, attrs):
        element = Element(tag, {k: v or "" for k, v in attrs}, self.current)
        self.current.children.append(element)
        if tag not in VOID:
            self.current = element

    def handle_startendtag(self, tag, attrs):
        self.current.children.append(Element(tag, {k: v or "" for k, v in attrs}, self.current))

    def handle_endtag(self, tag):
        node = self.current
        while node is not None and node.tag != tag:
            node = node.parent
        if node is not None and node.parent is not None:
            self.current = node.parent

    def handle_data(self, data):
        node = self.current
        while node is not None:
            node.text_parts.append(data)
            node = node.parent


def parse(html: str) -> Element:
    parser = _Parser()
    parser.feed(html)
    parser.close()
    return parser.root


def login(app: Any, key: str) -> TestClient:
    client = TestClient(app)
    response = client.post("/ui/login", data={"api_key": key}, follow_redirects=False)
    assert response.status_code == 303, response.text
    return client


def csrf_of(client: TestClient) -> str:
    page = client.get("/ui/jobs/new")
    assert page.status_code == 200
    return CSRF.search(page.text).group(1)


def honesty_values(page: Element) -> dict[tuple[str, str], Any]:
    """(metric, model) -> the value the honesty table carries (data-value, JSON)."""
    table = page.by_id("honesty-table")
    return {
        (row.attrs["data-metric"], cell.attrs["data-model"]): json.loads(cell.attrs["data-value"])
        for row in table.find_all("tr")
        if "data-metric" in row.attrs
        for cell in row.find_all("td")
    }


def expected_honesty(metrics: dict[str, Any]) -> dict[tuple[str, str], Any]:
    """The same from the report's `metrics`, written out by hand."""
    keys = [
        "refusal_f1",
        "refusal_precision",
        "refusal_recall",
        "refusal_rate_unanswerable",
        "refusal_rate_answerable",
        "rf_delta",
        "domain_accuracy",
        "answer_accuracy",
    ]
    out = {(k, m): metrics[m][k] for k in keys for m in ("base", "finetuned", "repaired")}
    if any(metrics[m].get("calibration") for m in ("base", "finetuned", "repaired")):
        for k in ("ece", "mce"):
            for m in ("base", "finetuned", "repaired"):
                out[(f"calibration.{k}", m)] = (metrics[m].get("calibration") or {}).get(k)
    out[("recovery", "repaired")] = metrics["recovery"]
    return out


def expected_cells(report: dict[str, Any]) -> dict[tuple[str, str], int]:
    """Columns restored per (layer, kind) from `model.layers.<i>.<...>.<kind>.weight`."""
    cells: dict[tuple[str, str], int] = {}
    for matrix in report["selected_matrices"]:
        parts = matrix["name"].split(".")
        layer, kind = parts[parts.index("layers") + 1], parts[-2]
        cells[(layer, kind)] = cells.get((layer, kind), 0) + matrix["n_columns"]
    return cells


def page_cells(page: Element) -> dict[tuple[str, str], int]:
    return {
        (g.attrs["data-layer"], g.attrs["data-kind"]): int(g.attrs["data-columns"])
        for g in page.find_all("g")
        if g.attrs.get("class") == "cell" and int(g.attrs["data-columns"]) > 0
    }


def expected_fractions(report: dict[str, Any]) -> dict[tuple[str, str], tuple[int, int, float]]:
    """(columns restored, input columns, fraction) per (layer, kind), summed by hand from
    the report's selected matrices (`n_columns`, `in_features`)."""
    sums: dict[tuple[str, str], list[int]] = {}
    for matrix in report["selected_matrices"]:
        parts = matrix["name"].split(".")
        key = (parts[parts.index("layers") + 1], parts[-2])
        pair = sums.setdefault(key, [0, 0])
        pair[0] += matrix["n_columns"]
        pair[1] += matrix["in_features"]
    return {k: (n, width, n / width) for k, (n, width) in sums.items()}


def page_fractions(page: Element) -> dict[tuple[str, str], tuple[int, int, float]]:
    return {
        (g.attrs["data-layer"], g.attrs["data-kind"]): (
            int(g.attrs["data-columns"]),
            int(g.attrs["data-in-features"]),
            float(g.attrs["data-fraction"]),
        )
        for g in page.find_all("g")
        if g.attrs.get("class") == "cell" and "data-fraction" in g.attrs
    }
