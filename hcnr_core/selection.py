"""Stage 1 of HCNR: priority, column candidates, matrix displacement and selection."""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

EPS = 1e-12


def round_half_up(x: float) -> int:
    """`round` with halves going up (Python's `round` sends 2.5 to 2)."""
    return math.floor(x + 0.5)


def priority(s_hon: torch.Tensor, s_task: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """r[k] = s_hon[k] · log((s_hon[k]+ε)/(s_task[k]+ε)): honest-critical, task-irrelevant."""
    s_hon, s_task = s_hon.double(), s_task.double()
    return s_hon * torch.log((s_hon + eps) / (s_task + eps))


def top_columns(scores: torch.Tensor, count: int) -> torch.Tensor:
    """Indices of the `count` largest scores, ties to the lower index, sorted ascending."""
    order = torch.sort(scores, descending=True, stable=True).indices
    return torch.sort(order[:count]).values


def mass_count(scores: torch.Tensor, mass: float) -> int:
    """Fewest top columns holding `mass` of the positive score mass:
    k = min{k : Σ_{i≤k} r⁺_(i) ≥ mass · Σ_i r⁺_i}, with r_(1) ≥ r_(2) ≥ … (0 if none is > 0).

    A matrix whose honesty priority sits in a few columns restores few; one where it is
    spread restores many — instead of the same fraction everywhere.
    """
    positive = torch.sort(scores.double().clamp(min=0.0), descending=True).values
    total = positive.sum()
    if total <= 0:
        return 0
    reached = torch.cumsum(positive, 0) >= mass * total
    return int(torch.nonzero(reached)[0]) + 1


def select_columns(
    mode: str,
    s_hon: torch.Tensor,
    s_task: torch.Tensor,
    r_iw: float,
    generator: torch.Generator | None = None,
    fisher_mass: float | None = None,
) -> torch.Tensor:
    """Candidate mask M of one matrix as sorted column indices: `round(r_iw·in)` of them,
    or with `fisher_mass` the `mass_count` of the priority r, capped at `round(r_iw·in)`
    (the ablations take the same number of columns as "hcnr" would)."""
    n_in = s_hon.numel()
    count = round_half_up(r_iw * n_in)
    scores = priority(s_hon, s_task)
    if fisher_mass is not None:
        count = min(count, mass_count(scores, fisher_mass))
    if mode == "hcnr":
        return top_columns(scores, count)
    if mode == "honesty_only":
        return top_columns(s_hon.double(), count)
    if mode == "random":
        return torch.sort(torch.randperm(n_in, generator=generator)[:count]).values
    raise ValueError(f"unknown selection mode {mode!r}")


def displacement(w_base: torch.Tensor, w_ft: torch.Tensor, columns: torch.Tensor) -> float:
    """d = ‖δ[:, M]‖_F / ‖W_o[:, M]‖_F, computed in float64 (inf if W_o[:, M] is zero)."""
    if columns.numel() == 0:
        return 0.0
    base = w_base[:, columns].double()
    delta = w_ft[:, columns].double() - base
    num, den = torch.linalg.norm(delta).item(), torch.linalg.norm(base).item()
    if num == 0.0:
        return 0.0
    return math.inf if den == 0.0 else num / den


def select_matrices(displacements: Mapping[str, float], r_cw: float) -> list[str]:
    """Top `round(r_cw·L)` matrices by displacement among those with d > 0.

    `displacements` is in model order; ties keep model order. L counts every target
    matrix, moved or not, so fewer may be kept when the fine-tune left some untouched.
    """
    count = round_half_up(r_cw * len(displacements))
    moved = [(name, d) for name, d in displacements.items() if d > 0]
    ranked = sorted(moved, key=lambda item: -item[1])  # sorted() is stable
    return [name for name, _ in ranked[:count]]
