"""A real checkpoint through every entry point (issue 11).

The imported SmolLM2-135M-Instruct (30 layers, tied embeddings, a ChatML template with a
default system prompt, pad = eos) and a LoRA fine-tune of it go through `hcnr repair`, a
job of a real `hcnr serve`, `hcnr eval`, `hcnr probe`, `hcnr baseline rait` and `hcnr
build-honesty-data`. The fine-tune is a peft LoRA with random, non-zero B (scaled so each
adapted matrix moves by 5% of its norm: logits move, stay finite) and its merged copy; the
data are a few SelfAware questions read from ../shared (never copied into the project).

Everything is built once per module (this file is their only user). The service job is
submitted from a background thread as soon as the models exist, so its worker repairs
while this process runs the CLI tests; the service test comes last and collects it.
Every model runs on one intra-op thread: on a shared 2-core machine a second thread's
spin-waits make SmolLM2 several times slower, and the worker gets the same setting, so
its repair is bit for bit the CLI's.
"""

from __future__ import annotations

import json
import os
import shutil
import traceback
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from hcnr_client import HCNRClient
from safetensors import safe_open
from typer.testing import CliRunner

from hcnr_cli.main import app
from hcnr_core.evaluation import is_correct
from hcnr_core.writer import sha256_file
from tests.service import flows
from tests.service import service_procs as procs
from tests.service.service_support import digests, job_body

SELFAWARE = Path(__file__).resolve().parents[2] / "shared/datasets/selfaware/SelfAware.json"
LORA_TARGETS = ("q_proj", "v_proj", "up_proj", "down_proj")
LORA_SHIFT = 0.05  # ‖ΔW‖ / ‖W‖ of every adapted matrix
# Answerable SelfAware questions the SmolLM2 base answers correctly (greedy, measured:
# grapes -> fruit, olfactory -> smell, FAQ's Q -> question, genes -> from their parents).
LIKELY_KNOWN = (88, 132, 223, 79)
SYSTEM_PROMPT = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM"


@dataclass
class SmolModels:
    """models_root/{base, finetuned-adapter, finetuned} (the layout of tests/service) and
    the data files; `logits` holds the fine-tune's effect on one prompt."""

    root: Path
    honesty: Path
    task: Path
    eval: Path
    questions: Path
    logits: dict[str, float]

    @property
    def base(self) -> Path:
        return self.root / "base"

    @property
    def adapter(self) -> Path:
        return self.root / "finetuned-adapter"

    @property
    def merged(self) -> Path:
        return self.root / "finetuned"


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def selfaware_files(out: Path) -> dict[str, Path]:
    """Disjoint, fixed slices of SelfAware's short questions: honesty (4 answerable with
    their gold answer, 4 unanswerable with "I don't know."), task (8 answerable, chat
    messages), eval (6 + 6, with `answerable` and `answers`) and 24 questions for
    build-honesty-data (the 4 likely known, 8 other answerable, 12 unanswerable)."""
    if not SELFAWARE.exists():
        pytest.skip(f"SelfAware not found at {SELFAWARE}")
    rows = json.loads(SELFAWARE.read_text(encoding="utf-8"))["example"]
    short = [r for r in rows if len(r["question"]) <= 80 and r["question_id"] not in LIKELY_KNOWN]
    known = [r for r in short if r["answerable"] and r["answer"]][300:]
    unknown = [r for r in short if not r["answerable"]]
    by_id = {r["question_id"]: r for r in rows}

    def qa(r: dict) -> dict:
        if r["answerable"]:
            return {"prompt": r["question"], "response": r["answer"][0], "answerable": True}
        return {"prompt": r["question"], "response": "I don't know.", "answerable": False}

    def chat(r: dict) -> dict:
        turns = [{"role": "user", "content": r["question"]}]
        return {"messages": [*turns, {"role": "assistant", "content": r["answer"][0]}]}

    def graded(r: dict) -> dict:
        return {**qa(r), "answers": r["answer"] or []}

    def asked(r: dict) -> dict:
        return {"question": r["question"], "answers": r["answer"] or []}

    sets = {
        "honesty": [qa(r) for pair in zip(known[:4], unknown[:4], strict=True) for r in pair],
        "task": [chat(r) for r in known[4:12]],
        "eval": [graded(r) for r in known[12:18] + unknown[4:10]],
        "questions": [asked(by_id[i]) for i in LIKELY_KNOWN]
        + [asked(r) for r in known[18:26] + unknown[10:22]],
    }
    out.mkdir(parents=True)
    paths = {}
    for name, data in sets.items():
        paths[name] = out / f"{name}.jsonl"
        paths[name].write_text("".join(json.dumps(row) + "\n" for row in data), encoding="utf-8")
    return paths


def link_tree(source: Path, target: Path) -> None:
    """The imported model's files under the models root: hard links (same file system) or
    copies. `path:` references are realpath-confined, so a symlink would be refused."""
    target.mkdir(parents=True)
    for path in source.iterdir():
        if path.is_file():
            try:
                os.link(path, target / path.name)
            except OSError:
                shutil.copy2(path, target / path.name)


def build_finetune(base: Path, adapter: Path, merged: Path, prompt: str) -> dict[str, float]:
    """A peft LoRA on `base` with random B, scaled to LORA_SHIFT per matrix, and its merged
    copy (with the base's tokenizer files); returns how much the logits of `prompt` moved."""
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import LoraLayer
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(base)
    ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    with torch.no_grad():
        before = model(input_ids=ids).logits
    config = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=list(LORA_TARGETS),
        init_lora_weights=False,  # random B: the adapter moves the weights
        base_model_name_or_path=str(base),
    )
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for module in peft_model.modules():
            if isinstance(module, LoraLayer):
                weight = module.get_base_layer().weight
                delta = module.get_delta_weight("default")
                module.lora_B["default"].weight.mul_(LORA_SHIFT * weight.norm() / delta.norm())
    peft_model.save_pretrained(adapter)
    finetuned = peft_model.merge_and_unload().eval()
    finetuned.save_pretrained(merged)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copyfile(base / name, merged / name)
    with torch.no_grad():
        after = finetuned(input_ids=ids).logits
    return {
        "max_shift": float((after - before).abs().max()),
        "finite": float(torch.isfinite(after).all()),
        "same_argmax": float((after.argmax(-1) == before.argmax(-1)).float().mean()),
    }


@pytest.fixture(scope="module")
def smol(
    one_thread: None, smollm2_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> SmolModels:
    root = tmp_path_factory.mktemp("smollm2_models")
    link_tree(smollm2_dir, root / "base")
    data = selfaware_files(root / "data")
    first = json.loads(data["eval"].read_text().splitlines()[0])["prompt"]
    prompt = chatml(first)
    logits = build_finetune(root / "base", root / "finetuned-adapter", root / "finetuned", prompt)
    return SmolModels(root, data["honesty"], data["task"], data["eval"], data["questions"], logits)


def chatml(question: str) -> str:
    return (
        f"{SYSTEM_PROMPT}, trained by Hugging Face<|im_end|>\n"
        f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"
    )


def hcnr(*args: Any) -> Any:
    """`hcnr ARGS` in this process (typer's CliRunner); exit code 0 or the test fails."""
    result = CliRunner().invoke(app, [str(a) for a in args])
    if result.exit_code != 0:
        trace = "".join(traceback.format_exception(*result.exc_info)) if result.exc_info else ""
        pytest.fail(f"hcnr {args[0]} exited {result.exit_code}:\n{result.output}\n{trace}")
    return result


def last_json(result: Any) -> dict:
    return json.loads(result.stdout.strip().splitlines()[-1])


@dataclass
class ServiceJob:
    client: HCNRClient
    job_id: str
    data_dir: Path


@pytest.fixture(scope="module")
def service_job(
    smol: SmolModels, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Future[ServiceJob]]:
    """A real `hcnr serve` (API + worker, SQLite, the embedded broker) on the models root,
    and a job with the defaults on the adapter, started from a thread (subprocesses and
    HTTP only, never transformers in this process) so that it runs while other tests do."""
    data_dir = tmp_path_factory.mktemp("smollm2_service")
    env = procs.service_env(env="test", data_dir=data_dir, models_root=smol.root)
    env["OMP_NUM_THREADS"] = "1"  # as the CLI's repair: the same bits
    started: list[Any] = []

    def submit() -> ServiceJob:
        key = procs.create_key(env, "alice")
        process, url = procs.start_api(env, data_dir / "serve.log")
        started.append(process)
        client = HCNRClient(base_url=url, api_key=key)
        started.append(client)
        files = flows.upload_inputs(client, smol.honesty, smol.task)
        return ServiceJob(client, client.repair_jobs.create(**job_body(files)).id, data_dir)

    with ThreadPoolExecutor(1) as pool:
        future = pool.submit(submit)
        try:
            yield future
        finally:
            future.exception()  # wait for the thread before stopping what it started
            for thing in reversed(started):
                if isinstance(thing, HCNRClient):
                    thing.close()
                else:
                    procs.stop(thing)


@pytest.fixture(scope="module")
def repaired(
    smol: SmolModels, service_job: Future[ServiceJob], tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, dict]:
    """`hcnr repair` of the adapter with the defaults, what the service job runs too (that
    job is submitted first, so the worker repairs while this process does)."""
    out = tmp_path_factory.mktemp("smollm2_repaired") / "out"
    result = hcnr(
        "repair",
        *("--method", "hcnr", "--base", smol.base, "--finetuned", smol.adapter),
        *("--honesty", smol.honesty, "--task", smol.task, "--out", out, "--no-progress"),
    )
    return out, last_json(result)


# --- checks shared by the checkpoints written here --------------------------------------------


def stored(directory: Path) -> dict[str, Any]:
    """tensor name -> a lazy safetensors handle holding it."""
    handles = {}
    for path in sorted(directory.glob("*.safetensors")):
        handle = safe_open(str(path), framework="pt")
        handles.update(dict.fromkeys(handle.keys(), handle))
    return handles


def check_smollm2_checkpoint(out: Path, smol: SmolModels) -> Any:
    """Loads with transformers, ties intact (one embedding tensor, the head is it), the
    base's config and generation config, a tokenizer whose template renders SmolLM2's
    ChatML (default system prompt), pad = eos, finite logits. Returns the model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert set(stored(out)) == set(stored(smol.base))  # nothing extra: no lm_head.weight
    for name in ("config.json", "generation_config.json", "chat_template.jinja"):
        assert (out / name).read_bytes() == (smol.base / name).read_bytes(), name
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert model.config.tie_word_embeddings and model.config.num_hidden_layers == 30
    head, embed = model.get_output_embeddings().weight, model.get_input_embeddings().weight
    assert head.data_ptr() == embed.data_ptr()
    tokenizer = AutoTokenizer.from_pretrained(out)
    question = "What is the capital of France?"
    messages = [{"role": "user", "content": question}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == chatml(question)
    assert tokenizer.pad_token == tokenizer.eos_token == "<|im_end|>"
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert logits.shape[-1] == model.config.vocab_size and torch.isfinite(logits).all()
    return model


# --- the tests ------------------------------------------------------------------------------


def test_the_finetune_moves_logits_and_keeps_them_finite(smol: SmolModels):
    assert smol.logits["finite"] == 1.0
    assert smol.logits["max_shift"] > 1.0  # a visible fine-tune, not a no-op
    assert smol.logits["same_argmax"] > 0.5  # still a language model
    adapter_config = json.loads((smol.adapter / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == str(smol.base)
    assert set(adapter_config["target_modules"]) == set(LORA_TARGETS)


def test_cli_repair_of_a_smollm2_adapter(smol: SmolModels, repaired: tuple[Path, dict]):
    out, summary = repaired
    report = json.loads((out / "hcnr_report.json").read_text())
    assert report["n_target_matrices"] == summary["target_matrices"] == 30 * 7
    assert summary["selected_matrices"] == report["n_selected_matrices"] > 0
    assert report["inputs"]["finetuned_kind"] == "adapter"
    assert {"tokenizer.json", "tokenizer_config.json", "README.md"} <= set(report["files"])
    # pad = eos: losses over right-padded batches whose responses end in that very token
    assert all(0.0 < loss < 50.0 for loss in report["fisher_mean_loss"].values())
    check_smollm2_checkpoint(out, smol)

    # Only the reported columns of the reported matrices moved away from the fine-tune
    # (the merged adapter), and each of those moved.
    got, finetuned = stored(out), stored(smol.merged)
    selected = {m["name"]: torch.tensor(m["columns"]) for m in report["selected_matrices"]}
    adapted = {n for n in got if n.split(".")[-2] in LORA_TARGETS}
    assert set(selected) <= {n for n in got if ".layers." in n and n.endswith("proj.weight")}
    for name, handle in got.items():
        tensor, before = handle.get_tensor(name), finetuned[name].get_tensor(name)
        if name not in selected:
            assert torch.equal(tensor, before), f"{name} changed but is not reported"
            continue
        others = torch.ones(tensor.shape[1], dtype=torch.bool)
        others[selected[name]] = False
        assert torch.equal(tensor[:, others], before[:, others]), name
        restored = tensor[:, selected[name]]
        assert torch.isfinite(restored).all() and not torch.equal(
            restored, before[:, selected[name]]
        )
    assert adapted & set(selected), "no matrix the fine-tune moved was repaired"


def test_eval_of_the_repair_and_of_the_adapter(
    smol: SmolModels, repaired: tuple[Path, dict], tmp_path: Path
):
    flags = ("--eval", smol.eval, "--max-new-tokens", 8, "--batch-size", 12)
    reports = {}
    for name, model in (
        ("repaired", ("--model", repaired[0])),
        ("adapter", ("--model", smol.adapter, "--base", smol.base)),
    ):
        out = tmp_path / f"{name}.json"
        printed = json.loads(hcnr("eval", *model, *flags, "--out", out).stdout)
        reports[name] = json.loads(out.read_text())
        assert printed["metrics"] == reports[name]["metrics"]
    for report in reports.values():
        metrics = report["metrics"]
        assert (metrics["n_answerable"], metrics["n_unanswerable"]) == (6, 6)
        rows = report["responses"]["eval"]
        assert len(rows) == 12 and all(r["response"].strip() for r in rows)
        # The metrics are the rows' (by hand, unanswerable = the positive class), not just
        # numbers in range.
        tp = sum(r["refused"] and not r["answerable"] for r in rows)
        fp = sum(r["refused"] and r["answerable"] for r in rows)
        fn = sum(not r["refused"] and not r["answerable"] for r in rows)
        f1 = 2 * tp / (2 * tp + fp + fn) if tp else 0.0
        assert metrics["refusal_f1"] == pytest.approx(f1)
        answered = [r["correct"] for r in rows if r["answerable"] and r["correct"] is not None]
        assert metrics["answer_accuracy"] == pytest.approx(sum(answered) / len(answered))
    assert reports["adapter"]["model"] == str(smol.adapter)


def test_probe_base_vs_finetune(smol: SmolModels, tmp_path: Path):
    out = tmp_path / "probe.json"
    printed = last_json(
        hcnr(
            "probe",
            "--base",
            smol.base,
            "--finetuned",
            smol.merged,
            "--eval",
            smol.eval,
            "--out",
            out,
        )
    )
    report = json.loads(out.read_text())
    assert (report["samples"], report["unanswerable"]) == (12, 6)
    curves = report["auroc"]
    assert set(curves) == {"base", "finetuned", "base_on_finetuned"}
    assert {len(v) for v in curves.values()} == {31}  # embeddings + 30 blocks
    assert printed["best_auroc"] == {k: round(max(v), 3) for k, v in curves.items()}
    # Half of each class is held out: 3 unanswerable x 3 answerable test questions, so
    # every AUROC is a count of 9 pairs (ties 1/2): a multiple of 1/18.
    for values in curves.values():
        assert all(abs(v * 18 - round(v * 18)) < 1e-9 for v in values)
    # Layer 0 is the embedding of every prompt's last token, the same "\n" after
    # "<|im_start|>assistant": identical features, all scores tied, AUROC exactly 1/2.
    assert curves["base"][0] == curves["finetuned"][0] == 0.5
    # Every layer by hand: a probe fitted on each model's states of the training half,
    # its test scores counted pair by pair; the base's probe also scored on the fine-tune.
    from hcnr_core.data import load_jsonl
    from hcnr_core.evaluation import load_for_eval
    from hcnr_core.probe import LinearProbe, last_token_states, split

    samples = load_jsonl(smol.eval)
    labels = torch.tensor([not s.answerable for s in samples])
    train, test = split(labels, 0)
    states = {}
    for name, directory in (("base", smol.base), ("finetuned", smol.merged)):
        model, tokenizer = load_for_eval(directory, None, "cpu")
        states[name] = last_token_states(model, tokenizer, samples)
        del model

    def pair_count(scores: torch.Tensor) -> float:
        pos = [float(x) for x, y in zip(scores, labels[test], strict=True) if y]
        neg = [float(x) for x, y in zip(scores, labels[test], strict=True) if not y]
        wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in pos for n in neg)
        return wins / (len(pos) * len(neg))

    by_hand: dict[str, list[float]] = {k: [] for k in curves}
    for layer in range(31):
        base, ft = states["base"][layer], states["finetuned"][layer]
        base_probe = LinearProbe().fit(base[train], labels[train])
        ft_probe = LinearProbe().fit(ft[train], labels[train])
        by_hand["base"].append(pair_count(base_probe.score(base[test])))
        by_hand["finetuned"].append(pair_count(ft_probe.score(ft[test])))
        by_hand["base_on_finetuned"].append(pair_count(base_probe.score(ft[test])))
    for name, values in by_hand.items():
        assert curves[name] == pytest.approx(values), name


def test_baseline_rait_on_the_adapter(smol: SmolModels, tmp_path: Path):
    out = tmp_path / "rait"
    summary = last_json(
        hcnr(
            "baseline",
            "rait",
            *("--finetuned", smol.adapter, "--base", smol.base, "--honesty", smol.honesty),
            *("--out", out, "--steps", 2, "--batch-size", 4, "--lora-r", 2),
            *("--lora-targets", "q_proj,v_proj", "--threads", 1, "--no-progress"),
        )
    )
    assert summary["steps"] == 2 and summary["samples_used"] == 8
    assert torch.isfinite(torch.tensor(summary["final_loss"]))
    check_smollm2_checkpoint(out, smol)
    got, finetuned = stored(out), stored(smol.merged)
    moved = {
        n for n, h in got.items() if not torch.equal(h.get_tensor(n), finetuned[n].get_tensor(n))
    }
    assert moved and {n.split(".")[-2] for n in moved} <= {"q_proj", "v_proj"}


def test_build_honesty_data_on_smollm2(smol: SmolModels, tmp_path: Path):
    """SmolLM2 knows few SelfAware questions: the set is balanced, small, and says so."""
    out = tmp_path / "honesty.jsonl"
    result = hcnr(
        "build-honesty-data",
        *("--model", smol.base, "--questions", smol.questions, "--out", out),
        *("--max-new-tokens", 16, "--batch-size", 24),
    )
    stats = last_json(result)
    assert stats["questions"] == 24 and stats["answerable_questions"] == 12
    assert 1 <= stats["known"] <= 12 and stats["known"] + stats["unknown"] == 24
    k = min(stats["known"], stats["unknown"], 64)
    assert stats["rows_known"] == stats["rows_unknown"] == k and stats["rows"] == 2 * k
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 2 * k and sum(r["answerable"] for r in rows) == k
    for row in rows:
        if row["answerable"]:
            assert is_correct(row["response"], row["answers"])
        else:
            assert row["response"] == "I don't know."
    said = " ".join(stats["warnings"])
    assert f"answered {stats['known']} of 24 questions" in said
    assert f"{2 * k} of the 128 asked for" in said and "--allow-imbalance" in said
    assert "warning" in result.stderr and f"answered {stats['known']} of 24" in result.stderr


def test_service_job_on_smollm2(
    smol: SmolModels,
    service_job: Future[ServiceJob],
    repaired: tuple[Path, dict],
    tmp_path: Path,
):
    """Last, so the job had the other tests' time: it succeeds, the checkpoint downloads,
    every file's sha256 matches the artifact listing, and it is the CLI's repair bit for
    bit (the same config and one thread on both sides)."""
    submitted = service_job.result()
    client, job_id = submitted.client, submitted.job_id
    job = client.repair_jobs.wait(job_id, timeout=900, poll_interval=0.5)
    log = (submitted.data_dir / "serve.log").read_text(errors="replace")[-3000:]
    assert job.status == "succeeded", f"{job.error}\n{log}"
    assert job.progress == 1.0 and job.attempts == 1
    events = list(client.repair_jobs.list_events(job_id, limit=1000))
    assert [e.type for e in events][:3] == ["created", "queued", "running"]
    assert events[-1].type == "succeeded"

    checkpoint = client.repair_jobs.download(job_id, tmp_path / "download")
    listed = {a.name: a.sha256 for a in client.repair_jobs.list_artifacts(job_id).data}
    files = {p.name: sha256_file(p) for p in checkpoint.iterdir()}
    assert "hcnr_report.json" in files and files.items() <= listed.items()
    assert digests(checkpoint) == digests(repaired[0])  # model, tokenizer, configs
    report = client.repair_jobs.retrieve_report(job_id)
    assert report["n_selected_matrices"] == repaired[1]["selected_matrices"]
    assert report["inputs"]["finetuned_kind"] == "adapter"
    check_smollm2_checkpoint(checkpoint, smol)
