"""scale.md and scale.png, regenerated from every result in scale.json."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from bench.scale.checkpoints import N_SAMPLES, PROMPT_TOKENS, RESPONSE_TOKENS, SIZES, param_count

# Where the measurements are kept and rendered (`measure` imports them from here: one way).
ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "bench" / "results"


def render(results: dict[str, Any]) -> None:
    repairs = [r for r in results.values() if "mode" in r and "method" not in r]
    rows = sorted(repairs, key=lambda r: (r["device"], r["params"], r.get("threads", 0)))
    lines = [
        "# Scaling benchmark (bench/scale.py)",
        "",
        "Random-weight Llama-shaped checkpoints, base + random LoRA adapter (r=16, every",
        f"linear), {N_SAMPLES} + {N_SAMPLES} samples of {PROMPT_TOKENS} + {RESPONSE_TOKENS} "
        "tokens, default config",
        "(R_IW 0.5, R_CW 0.4, paper compensation). `total` includes checkpoint inspection,",
        "tokenization, loading both models, the adapter merge and writing the output.",
        "Single-thread (`1 thr`) rows were measured while other jobs shared the two cores;",
        "compare rows of the same thread count, and prefer CPU seconds in the baselines table.",
        "",
        "| size | params | device | dtype | total s | load ft | Fisher task | load base "
        "| Fisher hon | select | Hessians | compensate | save | Fisher tok/s | peak RSS GiB "
        "| peak GPU GiB |",
        "|" + "---|" * 16,
    ]
    for r in rows:
        s = r["stage_seconds"]
        lines.append(
            f"| {r['size']} | {r['params'] / 1e6:.0f}M | {r['machine']} ({r['device']}, "
            f"{r.get('mode', 'whole')}, {_threads(r)}) "
            f"| {r['dtype']} | {r['total_s']} | {s['load_finetuned']:.2f} "
            f"| {s['fisher_task']:.2f} | {s['load_base']:.2f} | {s['fisher_honesty']:.2f} "
            f"| {s['select']:.2f} | {s['hessian']:.2f} | {s['compensate']:.2f} "
            f"| {s['save']:.2f} | {r['fisher_tokens_per_s']} | {r['peak_cpu_rss_gib']} "
            f"| {r['peak_gpu_gib'] if r['peak_gpu_gib'] is not None else '-'} |"
        )
    lines += ["", "Reproduce: `.venv/bin/python -m bench.scale --sizes SIZE... --device D`.", ""]
    lines += _render_replicas(repairs)
    lines += _render_extra(results)
    (RESULTS / "scale.md").write_text("\n".join(lines))
    _plot(rows)


def _threads(run: dict[str, Any]) -> str:
    """Runs before --threads existed used torch's default (one thread per core)."""
    return f"{run['threads']} thr" if run.get("threads") else "default thr"


def _stages(seconds: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.1f}" for k, v in seconds.items())


def _render_extra(results: dict[str, Any]) -> list[str]:
    return _render_baselines(results) + _render_compensate_ab(results) + _render_memory(results)


def _render_baselines(results: dict[str, Any]) -> list[str]:
    runs = [r for r in results.values() if "method" in r]
    if not runs:
        return []
    lines = [
        "## HCNR vs baselines (same checkpoints, same 128 honesty samples, same run)",
        "",
        "Each method in its own fresh process, one after the other in one invocation of",
        "`bench/scale.py --baselines`, on the same device, dtype and torch thread count",
        "(column `thr`). RAIT and DPO: a LoRA (r 8, alpha 16, all 7 decoder linears) trained on",
        "the merged fine-tune with AdamW, batch 16 (DPO: 16 pairs), then merged and written;",
        "`steps:60` = the `hcnr baseline` defaults (7.5 epochs of the 128 samples), `epochs:3`",
        "= 24 steps. HCNR: the default repair (R_IW 0.5, R_CW 0.4, paper compensation) on",
        "128 + 128 samples. Ratio = baseline / HCNR of the same invocation. `wall s` includes",
        "waiting for a CPU on a shared machine; `CPU s` (user + system of the process) does",
        "not, and is the steadier figure when the machine is busy. Both include checkpoint",
        "inspection, loading, the adapter merge and writing the output checkpoint.",
        "",
        "| size | machine | thr | method | schedule | samples seen | wall s | CPU s "
        "| wall ratio | CPU ratio | stages (wall s) | peak RSS GiB | params changed |",
        "|" + "---|" * 13,
    ]
    order = {"rait": 0, "dpo": 1}
    runs.sort(key=lambda r: (r["device"], r["params"], r["threads"], order[r["method"]]))
    shown: set[tuple] = set()
    for r in runs:
        group = (r["machine"], r["device"], r["dtype"], r["size"], r["threads"])
        where = f"{r['machine']} ({r['device']}, {r['dtype']})"
        if group not in shown:
            shown.add(group)
            h = r["hcnr"]
            changed = h.get("fraction_model_params_changed")
            lines.append(
                f"| {r['size']} | {where} | {r['threads']} | **HCNR** | - | 256 (Fisher) + 128 "
                f"(Hessians) | {h['total_s']} | {h['cpu_s']} | 1 | 1 "
                f"| {_stages(h['stage_seconds'])} | {h['peak_cpu_rss_gib']} "
                f"| {'-' if changed is None else f'{100 * changed:.1f}%'} |"
            )
        h = r["hcnr"]
        lines.append(
            f"| {r['size']} | {where} | {r['threads']} | {r['method'].upper()} "
            f"| {r['schedule']} ({r['steps']} x {r['batch_size']}) "
            f"| {r['steps'] * r['batch_size']} | {r['total_s']} | {r['cpu_s']} "
            f"| **{r['total_s'] / h['total_s']:.1f}x** | **{r['cpu_s'] / h['cpu_s']:.1f}x** "
            f"| {_stages(r['stage_seconds'])} | {r['peak_cpu_rss_gib']} "
            f"| {100 * r['fraction_model_params_changed']:.1f}% |"
        )
    notes = sorted({f"{r['size']}: {r['note']}" for r in runs if r.get("note")})
    lines += ["", *(f"- {note}" for note in notes)] if notes else []
    lines += [
        "",
        "Reproduce: `.venv/bin/python -m bench.scale --sizes llama-20m llama-64m --dtype "
        "float32 --threads 1 --baselines`.",
        "",
    ]
    return lines


def _render_compensate_ab(results: dict[str, Any]) -> list[str]:
    runs = sorted((r for r in results.values() if "per_matrix_s" in r), key=lambda r: r["params"])
    if not runs:
        return []
    lines = [
        "## Compensate stage: H⁻¹ per matrix vs once per shared input",
        "",
        '`compensation="paper"` needs H⁻¹ of each selected matrix\'s input; q/k/v share one H',
        "and gate/up another. Before, every matrix damped and inverted its group's H (Cholesky",
        "+ `cholesky_inverse`); now each group's H⁻¹ is computed once and reused by its",
        "members (bit-identical outputs: `tests/test_repair_e2e.py`). Measured in one process",
        "(`--compensate-ab R`): a real dry-run repair, then R more each way with its Fisher",
        "scores and Hessians replayed (a Fisher cache, runners that record their Hessian",
        "passes), alternating; the report's compensate stage, minimum of each, is shown.",
        "",
        "| size | machine | thr | dtype | matrices kept (by kind) | per matrix s | shared s "
        "| speed-up | all runs (per matrix / shared) |",
        "|" + "---|" * 9,
    ]
    for r in runs:
        kinds = ", ".join(f"{k.removesuffix('_proj')} {v}" for k, v in r["kept_by_kind"].items())
        lines.append(
            f"| {r['size']} | {r['machine']} | {r['threads']} | {r['dtype']} "
            f"| {r['selected_matrices']}: {kinds} | {r['per_matrix_min_s']:.2f} "
            f"| {r['shared_min_s']:.2f} | {r['per_matrix_min_s'] / r['shared_min_s']:.2f}x "
            f"| {r['per_matrix_s']} / {r['shared_s']} |"
        )
    lines += [
        "",
        "Reproduce: `.venv/bin/python -m bench.scale --sizes llama-64m llama-290m --dtype "
        "float32 --threads 1 --compensate-ab 3`.",
        "",
    ]
    return lines


def _layerwise_resident_bytes(spec: dict[str, Any], dtype_bytes: int) -> int:
    """What --layerwise keeps resident by design: embeddings + head, the largest block, and
    every block's input hidden states for one data set (DESIGN: N samples x tokens)."""
    h, i, n, v = spec["hidden"], spec["inter"], spec["layers"], spec["vocab"]
    kv = h // spec["heads"] * spec["kv"]
    block = 2 * h * h + 2 * h * kv + 3 * h * i + 2 * h
    hidden_states = (n + 1) * N_SAMPLES * (PROMPT_TOKENS + RESPONSE_TOKENS) * h
    return (2 * v * h + h + block + hidden_states) * dtype_bytes


def _fit(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least-squares y = a + b x."""
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True))
    b /= sum((x - mx) ** 2 for x in xs)
    return my - b * mx, b


def _render_replicas(repairs: list[dict[str, Any]]) -> list[str]:
    """Device lists against one device on the same size, mode and machine."""
    lines = []
    for r in repairs:
        if "," not in r["device"]:
            continue
        same = [
            o
            for o in repairs
            if "," not in o["device"]
            and (o["size"], o["mode"], o["machine"], o["dtype"])
            == (r["size"], r["mode"], r["machine"], r["dtype"])
            and o.get("threads") == len(r["device"].split(",")) * (r.get("threads") or 1)
        ]
        if not same:
            continue
        one, s, o = same[0], r["stage_seconds"], same[0]["stage_seconds"]
        lines.append(
            f"- {r['size']} {r['mode']}, `--device {r['device']}` x {r.get('threads')} thr: "
            f"{r['total_s']} s (Fisher {s['fisher_task']:.1f} + {s['fisher_honesty']:.1f} s, "
            f"RSS {r['peak_cpu_rss_gib']} GiB) vs `{one['device']}` x {one['threads']} thr: "
            f"{one['total_s']} s (Fisher {o['fisher_task']:.1f} + {o['fisher_honesty']:.1f} s, "
            f"RSS {one['peak_cpu_rss_gib']} GiB)."
        )
    if not lines:
        return []
    return [
        "## Several devices (`--device A,B`: a replica per device, batches shared out)",
        "",
        "Same total thread count on each side of the comparison:",
        "",
        *lines,
        "",
        "On one CPU, replicas only share out cores that one process's torch threads already",
        "keep busy, so no speed-up is expected; the rows show the placement costs (a second",
        "model in memory, its loading, summing the shares). Replicas with more threads than",
        "cores in all are slower (see the table). The speed-up is for GPUs, where each device",
        "adds its own compute: not measured, no GPU was lent to this project.",
        "",
    ]


def _render_memory(results: dict[str, Any]) -> list[str]:
    """Peak RSS of CPU float32 repairs vs size, fitted and extrapolated to 8B and 70B."""
    points: dict[str, dict[str, float]] = {"whole": {}, "layerwise": {}}
    for r in results.values():
        cpu_fp32 = r.get("device") == "cpu" and r.get("dtype") == "float32"
        if cpu_fp32 and "method" not in r and r.get("mode") in points:
            best = points[r["mode"]].get(r["size"], 0.0)  # the larger if measured twice
            points[r["mode"]][r["size"]] = max(best, r["peak_cpu_rss_gib"])
    if any(len(p) < 2 for p in points.values()):
        return []
    targets = ("llama-3.1-8b", "llama-3.1-70b")
    whole = sorted(points["whole"], key=lambda s: param_count(SIZES[s]))
    a_w, b_w = _fit([param_count(SIZES[s]) for s in whole], [points["whole"][s] for s in whole])
    layer = sorted(points["layerwise"], key=lambda s: param_count(SIZES[s]))
    xs = [_layerwise_resident_bytes(SIZES[s], 4) / 2**30 for s in layer]
    a_l, b_l = _fit(xs, [points["layerwise"][s] for s in layer])

    def measured(mode: str) -> str:
        return ", ".join(
            f"{s} {points[mode][s]}"
            for s in sorted(points[mode], key=whole.index if mode == "whole" else layer.index)
        )

    lines = [
        "## Memory model for 8B and 70B (an extrapolation from CPU runs, not a GPU measurement)",
        "",
        f"Measured peak RSS (GiB) of whole-model CPU float32 repairs: {measured('whole')}; "
        f"with `--layerwise`: {measured('layerwise')}.",
        "",
        f"- Whole model: RSS = {a_w:.2f} GiB + {b_w * 2**30:.1f} bytes x parameters "
        "(least squares over the sizes above; the intercept is the Python/torch process).",
        "  By design a repair of a LoRA fine-tune holds per parameter the fp32 model (4 B),",
        "  W_s in its stored bf16 for selection and saving (2 B) and the mmap-ed base pages",
        "  it has read (<= 2 B): 8 B. The measured slope is larger; the rest is not",
        "  attributed here (candidates: memory of the fine-tuned fp32 model that the",
        "  allocator keeps after it is freed and before the base is loaded, transformers'",
        "  loading buffers, the bf16 merge before the cast). The fit is what to plan with.",
        f"- Layer by layer: RSS = {a_l:.2f} GiB + {b_l:.2f} x R, where R is what the mode keeps",
        "  resident by design, in GiB: embeddings + head, the largest decoder block, and every",
        "  block's input hidden states for 128 samples x 64 tokens (README), in the compute",
        "  dtype. A slope near 1 means the design accounts for the memory.",
    ]
    for r in results.values():
        if r.get("stage_rss_gib") and r.get("device") == "cpu" and r.get("dtype") == "float32":
            stages = ", ".join(f"{k} {v}" for k, v in r["stage_rss_gib"].items())
            threads = f", {r['threads']} thr" if r.get("threads") else ""
            lines.append(
                f"- RSS by stage, {r['size']} {r['mode']}{threads} (sampled at ticks): {stages}."
            )
    lines += [
        *([""] if lines[-1] else []),
        "| run | what | params | whole model | layer by layer |",
        "|---|---|---|---|---|",
    ]
    for size in targets:
        spec, n = SIZES[size], param_count(SIZES[size])
        whole_gib = a_w + b_w * n
        layer_fp32 = a_l + b_l * _layerwise_resident_bytes(spec, 4) / 2**30
        lines.append(
            f"| {size} | CPU float32, peak RSS (fit) | {n / 1e9:.2f}B | {whole_gib:.0f} GiB "
            f"| {layer_fp32:.1f} GiB |"
        )
        device_whole = n * 2  # the bf16 model; W_s and the mmap-ed base stay on the CPU
        device_layer = _layerwise_resident_bytes(spec, 2)
        lines.append(
            f"| {size} | GPU bfloat16, device memory (model, assumptions below) | "
            f"{n / 1e9:.2f}B | ~{device_whole / 2**30:.0f} GiB + activations + Hessians | "
            f"~{device_layer / 2**30:.1f} GiB + Hessians |"
        )
    lines += [
        "",
        "Assumptions and limits:",
        "- Three sizes (20M-290M) with a 32k vocabulary are extrapolated 25-250x; 8B and 70B",
        "  use the real 128k vocabulary, which `param_count` and R include. The fits are",
        "  linear; the Hessians are not in them (at 290M they are < 0.1 GiB), so they are",
        "  added separately: whole model, at most `--hessian-budget-mb` (4 GiB) of H per",
        "  pass plus the damped copy, Cholesky factor and H⁻¹ of one group (3 x 0.77 GiB",
        "  for 8B's down_proj, 3 x 3.1 GiB for 70B's); layer by layer, one block's H",
        "  (8B: 1.0 GiB, 70B: 4.1 GiB) plus the same temporaries.",
        "- GPU rows are not measured, only derived: the device holds the bf16 model (2 B per",
        "  parameter; Fisher never materialises weight gradients, it reduces activations and",
        "  output gradients to column sums in hooks), the activations of one batch, and the",
        "  Hessians above; W_s and the base's mmap pages stay in CPU RSS (about 2 + 2 B per",
        "  parameter, the non-model part of the whole-model slope). Whole-model 8B is then",
        "  ~15 GiB + activations + up to ~6.3 GiB of Hessians, inside the DESIGN target of",
        "  32 GiB if the activations stay under ~10 GiB; 70B (~132 GiB of bf16 weights) needs",
        "  --layerwise on an 80 GB device. Both must be measured on the GPU.",
        "- Layer-by-layer CPU RSS also holds the hidden states of the data set being",
        "  processed; with more samples or longer sequences R grows linearly in both.",
        "",
    ]
    return lines


def _plot(rows: list[dict[str, Any]]) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot", file=sys.stderr)
        return
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for device in sorted({r["device"] for r in rows}):
        mine = [r for r in rows if r["device"] == device]
        params = [r["params"] for r in mine]
        left.plot(params, [r["total_s"] for r in mine], "o-", label=device)
        right.plot(params, [r["peak_cpu_rss_gib"] for r in mine], "o-", label=f"{device} RSS")
        if any(r["peak_gpu_gib"] for r in mine):
            right.plot(params, [r["peak_gpu_gib"] for r in mine], "s--", label=f"{device} GPU")
    for axis, label in ((left, "end-to-end seconds"), (right, "peak memory GiB")):
        axis.set_xscale("log")
        axis.set_yscale("log")
        axis.set_xlabel("parameters")
        axis.set_ylabel(label)
        axis.legend()
        axis.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(RESULTS / "scale.png", dpi=120)
