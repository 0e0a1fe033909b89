"""Stage 2 of HCNR: restoration and OBS-style compensation of one matrix (DESIGN.md §2).

Notation: `w_base` = W_o, `w_ft` = W_s (both `out × in`), `columns` = F (restored input
columns), T = the other columns, `hessian` = H = (2/N) Σ x xᵀ over the matrix's inputs.
All math runs in float32 or wider; callers cast the result back to the stored dtype.

Matrices that read the same input (q/k/v; gate/up) share one H: `prepare_hessian` damps it
(and, for "paper", inverts it) once per group, and `repair_prepared` repairs each member
with it — the same operations as `repair_matrix` on each matrix, so bit-identical results.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def complement(columns: torch.Tensor, n_in: int) -> torch.Tensor:
    keep = torch.ones(n_in, dtype=torch.bool, device=columns.device)
    keep[columns] = False
    return torch.nonzero(keep).flatten()


def damped_hessian(hessian: torch.Tensor, damping: float) -> torch.Tensor:
    """Dead inputs (zero diagonal) get diagonal 1, then H += λ·mean(diag H)·I."""
    h = hessian.clone()
    diag = torch.diagonal(h)
    diag[diag == 0] = 1.0
    diag += damping * diag.mean()
    return h


def restore(w_base: torch.Tensor, w_ft: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    """`compensation="none"`: W[:, F] = W_o[:, F], all other columns stay W_s."""
    out = w_ft.clone()
    out[:, columns] = w_base[:, columns].to(out.dtype)
    return out


def _cholesky(matrix: torch.Tensor) -> torch.Tensor:
    factor, info = torch.linalg.cholesky_ex(matrix)
    if int(info) != 0:
        raise torch.linalg.LinAlgError(
            "Hessian is not positive definite even after damping; increase damping"
        )
    return factor


def inverse_hessian(hessian: torch.Tensor) -> torch.Tensor:
    """H⁻¹ through its Cholesky factor, in float32 or wider."""
    compute = torch.promote_types(hessian.dtype, torch.float32)
    return torch.cholesky_inverse(_cholesky(hessian.to(compute)))


def compensate_paper(
    w_base: torch.Tensor,
    w_ft: torch.Tensor,
    columns: torch.Tensor,
    hessian: torch.Tensor | None,
    h_inv: torch.Tensor | None = None,
) -> torch.Tensor:
    """Eq. 9-10: W[:, F] = W_o[:, F] + Σ_{k∈T} (δ[:, k] / H⁻¹[k,k]) · H⁻¹[k, F].

    `h_inv` = `inverse_hessian(hessian)` when the caller already has it (shared input).
    """
    if h_inv is None:
        if hessian is None:
            raise ValueError("compensate_paper needs the Hessian or its inverse")
        h_inv = inverse_hessian(hessian)
    compute = h_inv.dtype
    w_base, w_ft = w_base.to(compute), w_ft.to(compute)
    others = complement(columns, w_ft.shape[1])
    delta_t = w_ft[:, others] - w_base[:, others]
    scaled = delta_t / torch.diagonal(h_inv)[others]
    out = w_ft.clone()
    out[:, columns] = w_base[:, columns] + scaled @ h_inv[others[:, None], columns]
    return out


def compensate_exact(
    w_base: torch.Tensor, w_ft: torch.Tensor, columns: torch.Tensor, hessian: torch.Tensor
) -> torch.Tensor:
    """Joint least squares of ‖(W − W_o) X‖² with W[:, T] = W_s[:, T] fixed:
    W[:, F] = W_o[:, F] − δ[:, T] · H[T,F] · H[F,F]⁻¹ (Cholesky solve)."""
    compute = torch.promote_types(hessian.dtype, torch.float32)
    w_base, w_ft, h = w_base.to(compute), w_ft.to(compute), hessian.to(compute)
    others = complement(columns, w_ft.shape[1])
    delta_t = w_ft[:, others] - w_base[:, others]
    h_ff = h[columns[:, None], columns]  # direct sub-block gathers, no row-slab copies
    h_ft = h[columns[:, None], others]
    # H[F,F]⁻¹ H[F,T] δ_Tᵀ, transposed back: (out × |F|)
    solved = torch.cholesky_solve(h_ft @ delta_t.T, _cholesky(h_ff))
    out = w_ft.clone()
    out[:, columns] = w_base[:, columns] - solved.T
    return out


def compensate_task_aware(
    w_base: torch.Tensor,
    w_ft: torch.Tensor,
    columns: torch.Tensor,
    hessian: torch.Tensor,
    task_hessian: torch.Tensor,
    task_weight: float,
) -> torch.Tensor:
    """Ours: the least squares of ‖(W − W_o) X_hon‖² + μ‖(W − W_s) X_task‖² over W[:, F]
    with W[:, T] = W_s[:, T] fixed — "exact" plus a term that keeps the fine-tuned
    model's outputs on the task inputs (X_task: the matrix's inputs when the fine-tuned
    model runs on D_task; H_task = 2 X_task X_taskᵀ / N_tok). Setting the gradient to 0:
    W[:, F] = W_o[:, F] + (μ δ[:, F] H_task[F,F] − δ[:, T] H[T,F]) (H[F,F] + μ H_task[F,F])⁻¹.
    μ = 0 is "exact"; μ → ∞ keeps W_s. `hessian` is damped, `task_hessian` need not be.
    """
    compute = torch.promote_types(hessian.dtype, torch.float32)
    w_base, w_ft = w_base.to(compute), w_ft.to(compute)
    h, h_task = hessian.to(compute), task_hessian.to(compute)
    others = complement(columns, w_ft.shape[1])
    delta = w_ft - w_base
    h_task_ff = h_task[columns[:, None], columns]
    system = h[columns[:, None], columns] + task_weight * h_task_ff
    rhs = (
        task_weight * h_task_ff @ delta[:, columns].T
        - h[columns[:, None], others] @ delta[:, others].T
    )
    solved = torch.cholesky_solve(rhs, _cholesky(system))  # system is symmetric
    out = w_ft.clone()
    out[:, columns] = w_base[:, columns] + solved.T
    return out


def compensate_asymmetric(
    w_base: torch.Tensor,
    w_ft: torch.Tensor,
    columns: torch.Tensor,
    hessian: torch.Tensor,
    cross: torch.Tensor,
    task_hessian: torch.Tensor | None = None,
    task_weight: float = 0.0,
) -> torch.Tensor:
    """Asymmetric calibration (GPTAQ-style): the repaired matrix sees inputs X of the model
    being repaired but aims at the base's outputs on the base's own inputs X°,
    min ‖W X − W_o X°‖² (+ μ‖(W − W_s) X_task‖²) over W[:, F], W[:, T] = W_s[:, T] fixed.
    With H = 2XXᵀ/N, C = 2X°Xᵀ/N and H_task, setting the gradient to 0:
    W[:, F] = (W_o C[:, F] − W_s[:, T] H[T,F] + μ W_s[:, F] H_task[F,F]) (H[F,F] + μ H_task[F,F])⁻¹.
    With X° = X (C = H) this is `exact` (μ = 0) or `task_aware`. `hessian` and `cross`
    carry the same damping on their diagonals, so that limit holds with damping too.
    """
    compute = torch.promote_types(hessian.dtype, torch.float32)
    w_base, w_ft = w_base.to(compute), w_ft.to(compute)
    h, c = hessian.to(compute), cross.to(compute)
    others = complement(columns, w_ft.shape[1])
    system = h[columns[:, None], columns]
    rhs = w_base @ c[:, columns] - w_ft[:, others] @ h[others[:, None], columns]
    if task_hessian is not None and task_weight:
        h_task_ff = task_hessian.to(compute)[columns[:, None], columns]
        system = system + task_weight * h_task_ff
        rhs = rhs + task_weight * w_ft[:, columns] @ h_task_ff
    solved = torch.cholesky_solve(rhs.T, _cholesky(system))  # system is symmetric
    out = w_ft.clone()
    out[:, columns] = solved.T
    return out


MODES = ("paper", "exact", "task_aware", "none")


@dataclass(frozen=True)
class PreparedHessian:
    """What every matrix of one shared-input group needs: damped H, and H⁻¹ for "paper"."""

    mode: str
    damped: torch.Tensor | None = None
    inverse: torch.Tensor | None = None
    task: torch.Tensor | None = None  # "task_aware": H_task of the fine-tuned model
    task_weight: float = 0.0
    cross: torch.Tensor | None = None  # asymmetric calibration: C, damped like H


RESTORE_ONLY = PreparedHessian("none")


def prepare_hessian(
    mode: str,
    hessian: torch.Tensor | None,
    damping: float,
    task_hessian: torch.Tensor | None = None,
    task_weight: float = 1.0,
    cross: torch.Tensor | None = None,
) -> PreparedHessian:
    """Damp (and for "paper" invert) a group's H once, for `repair_prepared`. With `cross`
    (asymmetric calibration; "exact" or "task_aware") C gets the same diagonal increment."""
    if mode not in MODES:
        raise ValueError(f"unknown compensation mode {mode!r}")
    if mode == "none":
        return PreparedHessian(mode)
    if hessian is None:
        raise ValueError(f"compensation={mode!r} needs a Hessian")
    damped = damped_hessian(hessian, damping)
    if cross is not None:
        if mode == "paper":
            raise ValueError("asymmetric calibration needs compensation 'exact' or 'task_aware'")
        increment = torch.diagonal(damped) - torch.diagonal(hessian)
        cross = cross + torch.diag(increment.to(cross.dtype))
        if mode == "task_aware" and task_hessian is None:
            raise ValueError("compensation='task_aware' needs the task Hessian")
        weight = task_weight if mode == "task_aware" else 0.0
        return PreparedHessian(mode, damped, None, task_hessian, weight, cross)
    if mode == "paper":  # only H⁻¹ is used: the damped H is not kept
        return PreparedHessian(mode, inverse=inverse_hessian(damped))
    if mode == "task_aware":
        if task_hessian is None:
            raise ValueError("compensation='task_aware' needs the task Hessian")
        return PreparedHessian(mode, damped=damped, task=task_hessian, task_weight=task_weight)
    return PreparedHessian(mode, damped=damped)


def repair_prepared(
    prepared: PreparedHessian, w_base: torch.Tensor, w_ft: torch.Tensor, columns: torch.Tensor
) -> torch.Tensor:
    """Restore `columns` and compensate with a group's `prepare_hessian` result."""
    if prepared.mode == "none" or columns.numel() == 0:
        return restore(w_base, w_ft, columns)
    if prepared.mode == "paper":
        return compensate_paper(w_base, w_ft, columns, None, h_inv=prepared.inverse)
    assert prepared.damped is not None
    if prepared.cross is not None:
        return compensate_asymmetric(
            w_base,
            w_ft,
            columns,
            prepared.damped,
            prepared.cross,
            prepared.task,
            prepared.task_weight,
        )
    if prepared.mode == "task_aware":
        assert prepared.task is not None
        return compensate_task_aware(
            w_base, w_ft, columns, prepared.damped, prepared.task, prepared.task_weight
        )
    return compensate_exact(w_base, w_ft, columns, prepared.damped)


def repair_matrix(
    mode: str,
    w_base: torch.Tensor,
    w_ft: torch.Tensor,
    columns: torch.Tensor,
    hessian: torch.Tensor | None,
    damping: float,
) -> torch.Tensor:
    """Restore `columns` and compensate per `mode` ("paper", "exact" or "none")."""
    if mode not in MODES:
        raise ValueError(f"unknown compensation mode {mode!r}")
    if mode == "none" or columns.numel() == 0:
        return restore(w_base, w_ft, columns)
    return repair_prepared(prepare_hessian(mode, hessian, damping), w_base, w_ft, columns)
