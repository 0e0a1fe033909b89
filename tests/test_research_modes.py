"""The research modes of issue #13, checked against independent re-computations:
`hessian_inputs="sequential"` (GPTQ-style calibration block by block) and
`column_budget="fisher_mass"` (a per-matrix column count from the priority mass)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from hcnr_core import RepairConfig
from hcnr_core.compensation import repair_matrix
from hcnr_core.config import RunOptions
from hcnr_core.data import encode_samples, load_jsonl
from hcnr_core.pipeline import RepairPipeline
from hcnr_core.scoring import InputHessians, pad_batch
from hcnr_core.selection import mass_count, priority, select_columns


def repair(toy, out: Path | None, **cfg) -> dict:
    pipeline = RepairPipeline(RepairConfig(**cfg))
    prepared = pipeline.prepare(toy["base"], toy["full"], toy["honesty"], toy["task"])
    return pipeline.run(prepared, out)


def tensors(directory: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for path in sorted(directory.glob("*.safetensors")):
        out.update(load_file(path))
    return out


def block_of(weight: str) -> int:
    return int(re.search(r"layers\.(\d+)\.", weight).group(1))


@pytest.mark.parametrize("compensation", ["paper", "exact"])
def test_sequential_hessians_come_from_the_blocks_already_repaired(toy, tmp_path, compensation):
    """Oracle: for block b, the fine-tuned model with blocks < b replaced by the published
    repaired matrices gives H; `repair_matrix` with that H must give block b's output."""
    out = tmp_path / "seq"
    report = repair(toy, out, compensation=compensation, hessian_inputs="sequential", r_cw=1.0)
    got, base, ft = tensors(out), tensors(toy["base"]), tensors(toy["full"])
    selected = {m["name"]: torch.tensor(m["columns"]) for m in report["selected_matrices"]}
    blocks = sorted({block_of(w) for w in selected})
    assert len(blocks) >= 2  # otherwise nothing is sequential

    tokenizer = AutoTokenizer.from_pretrained(toy["full"])
    honesty = encode_samples(tokenizer, load_jsonl(toy["honesty"]), 512)
    model = AutoModelForCausalLM.from_pretrained(toy["full"], torch_dtype=torch.float32).eval()
    pad = tokenizer.pad_token_id
    for b in blocks:
        in_block = [w for w in selected if block_of(w) == b]
        hessians = InputHessians(model, [w.removesuffix(".weight") for w in in_block])
        for sample in honesty:
            hessians.add_batch(*pad_batch([sample], pad, torch.device("cpu")))
        for weight in in_block:
            expected = repair_matrix(
                compensation,
                base[weight],
                ft[weight],
                selected[weight],
                hessians.hessian(weight.removesuffix(".weight")),
                0.01,
            )
            torch.testing.assert_close(got[weight], expected, rtol=1e-3, atol=1e-4)
        with torch.no_grad():  # block b repaired before block b+1 is calibrated
            for weight in in_block:
                model.get_parameter(weight).copy_(got[weight])


def test_sequential_differs_from_base_inputs_after_the_first_block(toy, tmp_path):
    """Same selection; different H (fine-tuned, then repaired inputs vs the base's)."""
    base_inputs = repair(toy, tmp_path / "a", r_cw=1.0)
    sequential = repair(toy, tmp_path / "b", r_cw=1.0, hessian_inputs="sequential")
    assert base_inputs["selected_matrices"] == sequential["selected_matrices"]
    a, b = tensors(tmp_path / "a"), tensors(tmp_path / "b")
    differs = [w for w in a if not torch.equal(a[w], b[w])]
    assert differs and all(
        w in {m["name"] for m in sequential["selected_matrices"]} for w in differs
    )


def test_sequential_needs_a_hessian():
    with pytest.raises(ValueError, match="needs a compensation"):
        RepairConfig(hessian_inputs="sequential", compensation="none")


@pytest.mark.parametrize(
    ("scores", "mass", "expected"),
    [
        ([4.0, 3.0, 2.0, 1.0], 0.4, 1),  # 4/10 reaches 0.4
        ([4.0, 3.0, 2.0, 1.0], 0.41, 2),  # 7/10
        ([1.0, 2.0, 3.0, 4.0], 0.7, 2),  # order of columns does not matter
        ([5.0, -9.0, 0.0, 5.0], 1.0, 2),  # negative priority is never mass
        ([-1.0, 0.0], 0.5, 0),  # nothing honesty-critical: nothing restored
        ([1.0, 1.0, 1.0, 1.0], 1.0, 4),
    ],
)
def test_mass_count_is_the_fewest_columns_holding_the_mass(scores, mass, expected):
    assert mass_count(torch.tensor(scores), mass) == expected


def test_fisher_mass_budget_caps_at_r_iw_and_keeps_the_top_priority():
    torch.manual_seed(0)
    s_hon, s_task = torch.rand(100) ** 4, torch.rand(100)
    r = priority(s_hon, s_task)
    picked = select_columns("hcnr", s_hon, s_task, 0.5, fisher_mass=0.6)
    count = mass_count(r, 0.6)
    assert picked.numel() == min(count, 50) > 0
    assert set(picked.tolist()) == set(torch.topk(r, picked.numel()).indices.tolist())
    capped = select_columns("hcnr", s_hon, s_task, 0.05, fisher_mass=0.99)
    assert capped.numel() == 5  # r_iw caps the budget
    # ablations take as many columns as "hcnr" would
    generator = torch.Generator().manual_seed(0)
    assert select_columns("random", s_hon, s_task, 0.5, generator, 0.6).numel() == picked.numel()


def test_fisher_mass_repair_reports_per_matrix_counts(toy, tmp_path):
    fraction = repair(toy, None, r_cw=1.0)
    mass = repair(toy, None, r_cw=1.0, column_budget="fisher_mass", fisher_mass=0.5)
    counts = {m["name"]: m["n_columns"] for m in mass["selected_matrices"]}
    fixed = {m["name"]: m["n_columns"] for m in fraction["selected_matrices"]}
    assert counts and all(0 < c <= fixed[name] for name, c in counts.items())
    assert len(set(counts.values())) > 1  # the budget follows each matrix's mass, not one fraction
    assert mass["restored_params"] < fraction["restored_params"]


def test_the_api_takes_the_library_fields_so_new_modes_reach_jobs():
    """One spec: the job API's HCNR hyper-parameters are RepairConfig's fields (a field
    added to the library cannot be missing from the API); the run options are a model of
    their own, the worker's, which no method's hyper-parameters take from a client."""
    from api.schemas import HYPERPARAMETERS, Hyperparameters, RepairJobCreate

    assert set(Hyperparameters.model_fields) == set(RepairConfig.model_fields)
    for hyperparameters in HYPERPARAMETERS.values():
        assert not set(hyperparameters.model_fields) & set(RunOptions.model_fields)
    body = {"base": "path:b", "finetuned": "path:f", "honesty_file": "a", "task_file": "b"}
    job = RepairJobCreate(**body, method="hcnr", hyperparameters={"hessian_inputs": "sequential"})
    assert job.hyperparameters.model_dump()["hessian_inputs"] == "sequential"
    assert job.hyperparameters.model_dump()["dtype"] == RepairConfig().dtype  # no drift
    for method in HYPERPARAMETERS:
        for option, value in {"layerwise": True, "device": "cuda", "threads": 1}.items():
            with pytest.raises(ValueError, match=option):  # the worker's choice
                RepairJobCreate(**body, method=method, hyperparameters={option: value})


def test_auto_validation_rows_read_about_people_no_split_uses():
    """The benchmark's validation file for auto: graded reading rows, deterministic, about
    people who are neither in the fine-tune nor in the domain eval."""
    from hcnr_core.organism import world as w
    from hcnr_core.realmodel.data import DomainSizes
    from hcnr_core.realmodel.validation import auto_validation_rows, domain_validation_rows

    sizes = DomainSizes()
    roles = {"known": 0, "aligned": 0, "reading": 0, "eval_unknown": 0}
    roles |= {"domain": sizes.sft_readers + sizes.sft_fictional, "eval_domain": 100}
    world = w.make_world(3, roles)
    used = {p.name.title() for p in (*world.domain, *world.eval_domain)}
    rows = domain_validation_rows(3, 50)
    assert rows == domain_validation_rows(3, 50) and len(rows) == 50
    prompts = [r["messages"][-2]["content"] for r in rows]
    assert all(r["answers"] and "answerable" not in r for r in rows)  # graded domain rows
    assert not [name for name in used if any(name in p for p in prompts)]
    names = {p.split(" lives in ")[0].split(". ")[-1] for p in prompts}
    assert len(names) > 1
    honesty = [{"messages": [], "answerable": False}]
    assert auto_validation_rows(honesty, 3, 50)[1:] == rows


# --- asymmetric calibration ---------------------------------------------------------------


def _random_problem(seed: int, n_tok: int = 300, n_in: int = 12, n_out: int = 5):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n_tok, n_in, generator=g, dtype=torch.float64)
    x_ref = x + 0.5 * torch.randn(n_tok, n_in, generator=g, dtype=torch.float64)
    w_base = torch.randn(n_out, n_in, generator=g, dtype=torch.float64)
    w_ft = w_base + 0.3 * torch.randn(n_out, n_in, generator=g, dtype=torch.float64)
    x_task = torch.randn(n_tok, n_in, generator=g, dtype=torch.float64)
    columns = torch.tensor([1, 4, 5, 9])
    return x, x_ref, w_base, w_ft, x_task, columns


@pytest.mark.parametrize("task_weight", [0.0, 3.0])
def test_asymmetric_compensation_is_the_least_squares_solution(task_weight):
    """Oracle: lstsq over the stacked token rows of ‖W X − W_o X°‖² (+ μ‖(W − W_s)X_t‖²)
    with W[:, T] = W_s[:, T]."""
    from hcnr_core.compensation import compensate_asymmetric

    x, x_ref, w_base, w_ft, x_task, columns = _random_problem(0)
    n = x.shape[0]
    h, c, h_task = 2 * x.T @ x / n, 2 * x_ref.T @ x / n, 2 * x_task.T @ x_task / n
    got = compensate_asymmetric(w_base, w_ft, columns, h, c, h_task, task_weight)
    others = torch.tensor([k for k in range(x.shape[1]) if k not in columns.tolist()])
    # rows: tokens of both terms; unknowns: W[:, F] (solved for all output rows at once)
    a = torch.cat([x[:, columns], task_weight**0.5 * x_task[:, columns]])
    target = torch.cat(
        [
            x_ref @ w_base.T - x[:, others] @ w_ft[:, others].T,
            task_weight**0.5 * (x_task[:, columns] @ w_ft[:, columns].T),
        ]
    )
    expected_f = torch.linalg.lstsq(a, target).solution.T
    torch.testing.assert_close(got[:, columns], expected_f)
    torch.testing.assert_close(got[:, others], w_ft[:, others])  # T stays W_s


@pytest.mark.parametrize("mode", ["exact", "task_aware"])
def test_asymmetric_with_the_same_inputs_is_the_symmetric_mode(mode):
    """X° = X (C = H): the damped asymmetric solution is `exact` / `task_aware` exactly."""
    from hcnr_core.compensation import prepare_hessian, repair_prepared

    x, _, w_base, w_ft, x_task, columns = _random_problem(1)
    h, h_task = 2 * x.T @ x / len(x), 2 * x_task.T @ x_task / len(x)
    symmetric = prepare_hessian(mode, h, 0.05, h_task, 2.0)
    asymmetric = prepare_hessian(mode, h, 0.05, h_task, 2.0, cross=h.clone())
    torch.testing.assert_close(
        repair_prepared(asymmetric, w_base, w_ft, columns),
        repair_prepared(symmetric, w_base, w_ft, columns),
    )
    with pytest.raises(ValueError, match="exact' or 'task_aware"):
        prepare_hessian("paper", h, 0.05, cross=h)


def test_asymmetric_refuses_what_it_cannot_do():
    with pytest.raises(ValueError, match="exact' or 'task_aware"):
        RepairConfig(hessian_inputs="asymmetric")  # compensation defaults to paper


@pytest.mark.parametrize(
    "cfg",
    [
        {"compensation": "task_aware", "task_weight": 3.0},
        {"hessian_inputs": "sequential"},
        {"hessian_inputs": "asymmetric", "compensation": "exact"},
        {"hessian_inputs": "asymmetric", "compensation": "task_aware", "task_weight": 3.0},
    ],
    ids=["task_aware", "sequential", "asymmetric_exact", "asymmetric_task_aware"],
)
@pytest.mark.parametrize("kind", ["full", "adapter"])
def test_layer_by_layer_gives_the_whole_model_result(toy, tmp_path, cfg, kind):
    """The research modes and task_aware under --layerwise (one block on the device at a
    time, hidden states carried through the repaired blocks) equal the whole-model run."""
    results = []
    for layerwise in (False, True):
        out = tmp_path / f"lw{layerwise}"
        pipeline = RepairPipeline(RepairConfig(**cfg, r_cw=1.0), RunOptions(layerwise=layerwise))
        prepared = pipeline.prepare(toy["base"], toy[kind], toy["honesty"], toy["task"])
        report = pipeline.run(prepared, out)
        results.append((report["selected_matrices"], tensors(out)))
    (sel_a, a), (sel_b, b) = results
    assert sel_a == sel_b
    ft = tensors(toy["full"])
    moved = [name for name in a if not torch.equal(a[name], ft[name])]
    assert len(moved) == len(sel_a) > 1
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5)


def _token_inputs(model, modules, honesty, pad) -> dict[str, torch.Tensor]:
    """Every module's inputs over all non-padding tokens, sample by sample (hooks)."""
    seen: dict[str, list[torch.Tensor]] = {m: [] for m in modules}
    handles = [
        model.get_submodule(m).register_forward_pre_hook(
            lambda _mod, args, m=m: seen[m].append(args[0][0].detach().double())
        )
        for m in modules
    ]
    with torch.no_grad():
        for sample in honesty:
            model(input_ids=torch.tensor([sample.input_ids]))
    for handle in handles:
        handle.remove()
    return {m: torch.cat(v) for m, v in seen.items()}


def test_asymmetric_repair_matches_a_token_level_least_squares_oracle(toy, tmp_path):
    """Block by block: the fine-tuned model with earlier blocks repaired gives X, the base
    gives X° for the same tokens; each published matrix must solve
    min ‖W X − W_o X°‖² over its restored columns (no damping: plain lstsq)."""
    out = tmp_path / "asym"
    report = repair(
        toy, out, compensation="exact", hessian_inputs="asymmetric", r_cw=1.0, damping=0.0
    )
    got, base, ft = tensors(out), tensors(toy["base"]), tensors(toy["full"])
    selected = {m["name"]: torch.tensor(m["columns"]) for m in report["selected_matrices"]}
    tokenizer = AutoTokenizer.from_pretrained(toy["full"])
    honesty = encode_samples(tokenizer, load_jsonl(toy["honesty"]), 512)
    model = AutoModelForCausalLM.from_pretrained(toy["full"], torch_dtype=torch.float32).eval()
    reference = AutoModelForCausalLM.from_pretrained(toy["base"], torch_dtype=torch.float32)
    pad = tokenizer.pad_token_id
    for b in sorted({block_of(w) for w in selected}):
        in_block = [w for w in selected if block_of(w) == b]
        modules = [w.removesuffix(".weight") for w in in_block]
        ours = _token_inputs(model, modules, honesty, pad)
        theirs = _token_inputs(reference.eval(), modules, honesty, pad)
        for weight, module in zip(in_block, modules, strict=True):
            cols = selected[weight]
            others = torch.tensor([k for k in range(ft[weight].shape[1]) if k not in cols])
            x, x_ref = ours[module], theirs[module]
            target = (
                x_ref @ base[weight].double().T - x[:, others] @ ft[weight][:, others].T.double()
            )
            expected = torch.linalg.lstsq(x[:, cols], target).solution.T
            torch.testing.assert_close(
                got[weight][:, cols].double(), expected, rtol=1e-3, atol=1e-4
            )
        with torch.no_grad():
            for weight in in_block:
                model.get_parameter(weight).copy_(got[weight])
