"""The algorithm's math against independent, brute-force computations."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from hcnr_core.checkpoint import inspect_checkpoint
from hcnr_core.compensation import (
    compensate_exact,
    compensate_paper,
    compensate_task_aware,
    damped_hessian,
    prepare_hessian,
    repair_matrix,
    repair_prepared,
    restore,
)
from hcnr_core.data import encode_samples, load_jsonl
from hcnr_core.pipeline import target_linears
from hcnr_core.scoring import ColumnFisher, InputHessians, column_grad_sq, pad_batch
from hcnr_core.selection import (
    displacement,
    priority,
    round_half_up,
    select_columns,
    select_matrices,
)


@pytest.fixture(scope="module")
def base_model_and_data(toy):
    model = AutoModelForCausalLM.from_pretrained(toy["base"], dtype=torch.float64).eval()
    tokenizer = AutoTokenizer.from_pretrained(toy["base"])
    samples = encode_samples(tokenizer, load_jsonl(toy["honesty"])[:6], 64)
    targets = target_linears(inspect_checkpoint(toy["base"]), r"(^|\.)layers\.\d+\..+")
    return model, tokenizer, samples, targets


def brute_force_loss(model, sample):
    """Mean NLL of the response tokens from the full logits, written out by hand."""
    ids = torch.tensor([sample.input_ids])
    logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), dim=-1)
    positions = range(sample.prompt_len - 1, len(sample.input_ids) - 1)
    picked = [logp[t, sample.input_ids[t + 1]] for t in positions]
    return -torch.stack(picked).mean()


@pytest.mark.parametrize("batch_size", [1, 4, 6])
def test_fisher_equals_per_sample_brute_force(base_model_and_data, batch_size):
    model, tokenizer, samples, targets = base_model_and_data
    fisher = ColumnFisher(model, targets, tokenizer.pad_token_id)
    losses = []
    for i in range(0, len(samples), batch_size):  # padded batches of unequal lengths
        losses += fisher.add_batch(samples[i : i + batch_size])
    scores = fisher.scores()
    for loss, sample in zip(losses, samples, strict=True):
        assert loss == pytest.approx(brute_force_loss(model, sample).item(), rel=1e-9)

    modules = dict(model.named_modules())
    weights = [modules[t].weight for t in targets]
    for w in weights:
        w.requires_grad_(True)
    expected = {
        t: torch.zeros(w.shape[1], dtype=torch.float64)
        for t, w in zip(targets, weights, strict=True)
    }
    for sample in samples:
        grads = torch.autograd.grad(brute_force_loss(model, sample), weights)
        for t, g in zip(targets, grads, strict=True):
            expected[t] += (g**2).sum(dim=0)  # square per sample, never the batch gradient
    for w in weights:
        w.requires_grad_(False)
    for t in targets:
        torch.testing.assert_close(
            scores[t].double(), expected[t] / len(samples), rtol=1e-5, atol=0
        )
        assert scores[t].dtype == torch.float32
        assert scores[t].sum() > 0


@pytest.mark.parametrize("shape", [(3, 5, 40, 30), (2, 50, 8, 6), (1, 1, 1, 1)])
def test_column_grad_sq_both_branches_equal_explicit_gradients(shape):
    batch, tokens, n_in, n_out = shape
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, tokens, n_in, generator=g, dtype=torch.float64)
    grads = torch.randn(batch, tokens, n_out, generator=g, dtype=torch.float64)
    explicit = sum((grads[b].T @ x[b]).pow(2).sum(dim=0) for b in range(batch))
    torch.testing.assert_close(column_grad_sq(x, grads), explicit)


def test_fisher_leaves_no_gradients_behind(base_model_and_data):
    model, _, samples, targets = base_model_and_data
    ColumnFisher(model, targets).add_sample(samples[0])
    assert all(p.grad is None and not p.requires_grad for p in model.parameters())


def test_hessians_match_captured_inputs_and_share_groups(base_model_and_data):
    model, tokenizer, samples, targets = base_model_and_data
    captured: dict[str, list[torch.Tensor]] = {t: [] for t in targets}
    modules = dict(model.named_modules())
    handles = [
        modules[t].register_forward_pre_hook(lambda _m, a, t=t: captured[t].append(a[0][0]))
        for t in targets
    ]
    with torch.no_grad():
        for sample in samples:  # one unpadded sample at a time: the reference
            model(input_ids=torch.tensor([sample.input_ids]))
    for h in handles:
        h.remove()

    hessians = InputHessians(model, targets)
    hessians.add_batch(*pad_batch(samples[:4], tokenizer.pad_token_id, torch.device("cpu")))
    hessians.add_batch(*pad_batch(samples[4:], tokenizer.pad_token_id, torch.device("cpu")))
    n_tokens = sum(len(s.input_ids) for s in samples)
    assert hessians.n_tokens == n_tokens  # padding excluded
    for t in targets:
        x = torch.cat(captured[t]).double()
        torch.testing.assert_close(
            hessians.hessian(t).double(), 2 * x.T @ x / n_tokens, rtol=1e-4, atol=1e-6
        )
    groups = {tuple(sorted(m.split(".")[-1] for m in g)) for g in hessians.groups().values()}
    assert groups == {
        ("k_proj", "q_proj", "v_proj"),
        ("o_proj",),
        ("gate_proj", "up_proj"),
        ("down_proj",),
    }
    assert len(hessians.sums) == 4 * 2  # one H per group per layer, not per matrix


def test_hessians_of_early_layers_stop_the_pass_early(base_model_and_data):
    model, tokenizer, samples, targets = base_model_and_data
    batch = pad_batch(samples, tokenizer.pad_token_id, torch.device("cpu"))
    every, first = InputHessians(model, targets), InputHessians(model, targets[:3])
    every.add_batch(*batch)
    calls = []
    handle = model.lm_head.register_forward_pre_hook(lambda *_: calls.append(1))
    first.add_batch(*batch)
    handle.remove()
    assert calls == []  # the pass ended before the head
    for name in targets[:3]:
        assert torch.equal(first.hessian(name), every.hessian(name))


def _problem(out=6, n_in=10, n_tok=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    w_base = torch.randn(out, n_in, generator=g, dtype=torch.float64)
    w_ft = w_base + 0.3 * torch.randn(out, n_in, generator=g, dtype=torch.float64)
    x = torch.randn(n_in, n_tok, generator=g, dtype=torch.float64)
    h = 2 * x @ x.T / n_tok
    columns = torch.tensor([1, 4, 5, 8])
    return w_base, w_ft, x, h, columns


def test_exact_equals_least_squares():
    w_base, w_ft, x, h, cols = _problem()
    others = torch.tensor([k for k in range(w_base.shape[1]) if k not in cols.tolist()])
    delta_t = (w_ft - w_base)[:, others]
    # min over D_F of ‖D_F X_F + δ_T X_T‖²: a least-squares problem in D_Fᵀ.
    d_f = torch.linalg.lstsq(x[cols].T, -(delta_t @ x[others]).T).solution.T
    got = compensate_exact(w_base, w_ft, cols, h)
    torch.testing.assert_close(got[:, cols], w_base[:, cols] + d_f, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(got[:, others], w_ft[:, others], rtol=0, atol=0)
    # It is the optimum: any perturbation of the free columns raises the objective.
    objective = lambda w: torch.linalg.norm((w - w_base) @ x)  # noqa: E731
    nudged = got.clone()
    nudged[:, cols] += 1e-3
    assert objective(got) < objective(nudged)
    assert objective(got) <= objective(restore(w_base, w_ft, cols))


@pytest.mark.parametrize("mu", [0.0, 0.5, 4.0])
def test_task_aware_equals_joint_least_squares(mu):
    """min over W[:, F] of ‖(W − W_o) X_hon‖² + μ ‖(W − W_s) X_task‖², W[:, T] = W_s[:, T]:
    stack both problems into one least-squares problem in D_F = W[:, F] − W_o[:, F]."""
    w_base, w_ft, x, h, cols = _problem(seed=6)
    x_task = torch.randn(x.shape[0], 30, generator=torch.Generator().manual_seed(7), dtype=x.dtype)
    h_task = 2 * x_task @ x_task.T / 30
    others = torch.tensor([k for k in range(w_base.shape[1]) if k not in cols.tolist()])
    delta = w_ft - w_base
    # per-token objectives, as H is a per-token mean: scale each block by 1/sqrt(n_tok)
    a = torch.cat([x[cols].T / x.shape[1] ** 0.5, (mu / 30) ** 0.5 * x_task[cols].T])
    b = torch.cat(
        [
            -(delta[:, others] @ x[others]).T / x.shape[1] ** 0.5,
            (mu / 30) ** 0.5 * (delta[:, cols] @ x_task[cols]).T,
        ]
    )
    d_f = torch.linalg.lstsq(a, b).solution.T
    got = compensate_task_aware(w_base, w_ft, cols, h, h_task, mu)
    torch.testing.assert_close(got[:, cols], w_base[:, cols] + d_f, rtol=1e-8, atol=1e-9)
    assert torch.equal(got[:, others], w_ft[:, others])
    if mu == 0:  # no task term: exactly the "exact" compensation
        torch.testing.assert_close(got, compensate_exact(w_base, w_ft, cols, h))


def test_task_aware_interpolates_between_exact_and_finetuned():
    w_base, w_ft, _, h, cols = _problem(seed=8)
    h_task = h.flip(0).flip(1) + torch.eye(h.shape[0], dtype=h.dtype)
    exact = compensate_exact(w_base, w_ft, cols, h)
    distances = [
        torch.linalg.norm(compensate_task_aware(w_base, w_ft, cols, h, h_task, mu) - w_ft)
        for mu in (0.0, 1.0, 10.0, 1e6)
    ]
    assert distances == sorted(distances, reverse=True)  # larger μ: closer to W_s
    assert distances[-1] < 1e-4 * distances[0]
    torch.testing.assert_close(compensate_task_aware(w_base, w_ft, cols, h, h_task, 0.0), exact)
    prepared = prepare_hessian("task_aware", h, 0.01, h_task, 2.0)
    expected = compensate_task_aware(w_base, w_ft, cols, damped_hessian(h, 0.01), h_task, 2.0)
    assert torch.equal(repair_prepared(prepared, w_base, w_ft, cols), expected)
    with pytest.raises(ValueError, match="task Hessian"):
        prepare_hessian("task_aware", h, 0.01)


def test_paper_equals_eq10_loop():
    w_base, w_ft, _, h, cols = _problem(seed=1)
    h = damped_hessian(h, 0.01)
    h_inv = torch.linalg.inv(h)
    expected = w_ft.clone()
    expected[:, cols] = w_base[:, cols]
    for k in range(w_base.shape[1]):
        if k in cols.tolist():
            continue
        for f in cols.tolist():
            expected[:, f] += (w_ft[:, k] - w_base[:, k]) / h_inv[k, k] * h_inv[k, f]
    torch.testing.assert_close(compensate_paper(w_base, w_ft, cols, h), expected)


def test_damping_and_dead_inputs():
    h = torch.diag(torch.tensor([2.0, 0.0, 4.0]))
    damped = damped_hessian(h, 0.1)
    # dead input -> 1, then + 0.1 * mean(2, 1, 4)
    torch.testing.assert_close(torch.diagonal(damped), torch.tensor([2.0, 1.0, 4.0]) + 7 / 30)
    assert h[1, 1] == 0  # input untouched


@pytest.mark.parametrize("mode", ["paper", "exact", "none"])
def test_repair_matrix_only_touches_restored_columns(mode):
    w_base, w_ft, _, h, cols = _problem(seed=2)
    out = repair_matrix(mode, w_base, w_ft, cols, h, 0.01)
    others = [k for k in range(w_base.shape[1]) if k not in cols.tolist()]
    assert torch.equal(out[:, others], w_ft[:, others])
    if mode == "none":
        assert torch.equal(out[:, cols], w_base[:, cols])
    else:
        assert not torch.equal(out[:, cols], w_base[:, cols])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("mode", ["paper", "exact", "none"])
def test_shared_input_group_prepared_once_is_bit_identical(mode, dtype):
    """q/k/v-like matrices (one input, one H, different shapes and columns): the H damped
    and inverted once per group gives exactly what `repair_matrix` gives per matrix."""
    _, _, _, h, _ = _problem(n_in=12, seed=4)
    h = h.to(dtype)
    g = torch.Generator().manual_seed(5)
    prepared = prepare_hessian(mode, h, 0.01)
    if mode == "paper":  # only H⁻¹ is kept, and it is H_damped⁻¹
        assert prepared.damped is None
        torch.testing.assert_close(
            prepared.inverse @ damped_hessian(h, 0.01).to(prepared.inverse.dtype),
            torch.eye(12, dtype=prepared.inverse.dtype),
            rtol=0,
            atol=1e-4 if dtype == torch.float32 else 1e-10,
        )
    for out, cols in ((12, [0, 3, 7]), (4, [1, 2, 10, 11]), (4, [5]), (6, [])):
        w_base = torch.randn(out, 12, generator=g, dtype=dtype)
        w_ft = w_base + 0.1 * torch.randn(out, 12, generator=g, dtype=dtype)
        cols = torch.tensor(cols, dtype=torch.long)
        expected = repair_matrix(mode, w_base, w_ft, cols, h, 0.01)
        assert torch.equal(repair_prepared(prepared, w_base, w_ft, cols), expected)


def test_prepare_hessian_rejects_bad_input():
    _, _, _, h, _ = _problem()
    with pytest.raises(ValueError, match="unknown compensation"):
        prepare_hessian("obs", h, 0.01)
    with pytest.raises(ValueError, match="needs a Hessian"):
        prepare_hessian("paper", None, 0.01)
    assert prepare_hessian("none", None, 0.01).inverse is None


@pytest.mark.parametrize("mode", ["paper", "exact"])
def test_full_restoration_needs_no_compensation(mode):
    w_base, w_ft, _, h, _ = _problem(seed=3)
    every = torch.arange(w_base.shape[1])
    torch.testing.assert_close(repair_matrix(mode, w_base, w_ft, every, h, 0.01), w_base)


@pytest.mark.parametrize("n_in", [1, 7, 10, 64, 101])
@pytest.mark.parametrize("r_iw", [0.0, 0.13, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("mode", ["hcnr", "honesty_only", "random"])
def test_selection_picks_round_riw_columns(n_in, r_iw, mode):
    g = torch.Generator().manual_seed(n_in)
    s_hon, s_task = torch.rand(n_in, generator=g), torch.rand(n_in, generator=g)
    cols = select_columns(mode, s_hon, s_task, r_iw, torch.Generator().manual_seed(0))
    assert cols.numel() == round_half_up(r_iw * n_in)
    assert cols.unique().numel() == cols.numel()
    assert torch.equal(cols, cols.sort().values)


def test_hcnr_selection_takes_top_priority_with_low_index_ties():
    s_hon = torch.tensor([1.0, 5.0, 5.0, 0.0, 5.0, 2.0])
    s_task = torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0, 9.0])
    # priorities: 0, 5ln5, 5ln5, 0, 5ln5, 2ln(2/9)<0 -> top 2 are the first two 5ln5 ties
    assert select_columns("hcnr", s_hon, s_task, 2 / 6).tolist() == [1, 2]
    r = priority(s_hon, s_task)
    assert r[5] < 0 and r[0] == 0
    assert select_columns("honesty_only", s_hon, s_task, 0.5).tolist() == [1, 2, 4]


@pytest.mark.parametrize("n_matrices", [1, 5, 14, 33])
@pytest.mark.parametrize("r_cw", [0.0, 0.25, 0.4, 1.0])
def test_select_matrices_picks_round_rcw(n_matrices, r_cw):
    d = {f"m{i}": float((i * 7) % 11 + 1) for i in range(n_matrices)}
    kept = select_matrices(d, r_cw)
    assert len(kept) == round_half_up(r_cw * n_matrices)
    ranked = sorted(d, key=lambda k: -d[k])
    assert kept == ranked[: len(kept)]


def test_select_matrices_skips_unmoved_and_keeps_order_on_ties():
    d = {"a": 0.0, "b": 2.0, "c": 2.0, "d": 1.0}
    assert select_matrices(d, 1.0) == ["b", "c", "d"]
    assert select_matrices(d, 0.5) == ["b", "c"]


def test_displacement():
    w_base = torch.tensor([[3.0, 0.0, 1.0], [4.0, 1.0, 1.0]])
    w_ft = w_base.clone()
    w_ft[:, 0] += torch.tensor([0.3, 0.4])
    assert displacement(w_base, w_ft, torch.tensor([0])) == pytest.approx(0.1)
    assert displacement(w_base, w_ft, torch.tensor([1, 2])) == 0.0
    assert displacement(torch.zeros(2, 1), torch.ones(2, 1), torch.tensor([0])) == float("inf")
