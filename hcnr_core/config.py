"""Validated, frozen configuration of every repair method: HCNR (DESIGN.md §2), RAIT, DPO,
auto — and, apart from them, the options of how a repair runs (`RunOptions`).

Torch-free, so that schemas and clients can import it without the compute stack.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from typing_extensions import Self

from hcnr_core.devices import parse_devices
from hcnr_core.errors import InvalidConfigError

Compensation = Literal["paper", "exact", "task_aware", "none"]
Selection = Literal["hcnr", "random", "honesty_only"]
ColumnBudget = Literal["fraction", "fisher_mass"]
HessianInputs = Literal["base", "sequential", "asymmetric"]
DType = Literal["auto", "float32", "bfloat16", "float16"]

# Every nn.Linear inside the decoder blocks (Llama: q,k,v,o,gate,up,down); never
# embeddings or lm_head, which live outside `layers.N`.
DEFAULT_TARGET_MODULES = r"(^|\.)layers\.\d+\..+"


class RunOptions(BaseModel):
    """How a repair runs, not what it computes (mergekit's `MergeOptions` beside its
    `MergeConfiguration`): every method takes these beside its spec (`RepairConfig`,
    `RaitConfig`, `DpoConfig`, `AutoConfig`). A service's worker decides them (the API
    never takes them from a client); the CLI shows them in their own panel.

    What stays in the specs although it looks like "how": `dtype` (bfloat16 and float32
    give different weights), `max_seq_len` (cuts prompts, so changes what the Fisher,
    the Hessians and the LoRA see) and `batch_size` (the baselines' optimizer step; HCNR's
    padding and summation order) change the numbers a repair publishes, so they are
    hyper-parameters a client chooses and a report must be reproducible from. The options
    here change only where the work runs and within what memory: the same spec gives the
    same checkpoint with any of them, up to float summation order."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    device: str = Field(
        "cpu",
        description="cpu, cuda, cuda:N or mps; HCNR also runs replicas on several GPUs: "
        "cuda:0,cuda:1",
    )
    threads: int | None = Field(
        None,
        ge=1,
        description="torch CPU threads during the run [torch's default] (RAIT and DPO); tiny "
        "models train fastest on one thread on a busy machine",
    )
    hessian_budget_mb: int = Field(
        4096,
        ge=1,
        description="Max memory of Hessians held at once; more means fewer passes (HCNR)",
    )
    layerwise: bool = Field(
        False, description="One decoder block on the device at a time (models > GPU memory; HCNR)"
    )

    @field_validator("device")
    @classmethod
    def _valid_device(cls, value: str) -> str:
        return ",".join(parse_devices(value))

    def check_for(self, spec: type[FileConfig]) -> Self:
        """These options, refused (InvalidConfigError) where the spec's method cannot run
        them: an option it does not honour set away from its default (silently ignoring
        `--layerwise` on RAIT would mislead), or several devices for a one-device method."""
        unused = [
            name
            for name, info in RunOptions.model_fields.items()
            if name not in spec.run_options and getattr(self, name) != info.default
        ]
        if unused:
            raise InvalidConfigError(
                f"run option {', '.join(unused)} does not apply to {spec.__name__} (its "
                f"method runs with {', '.join(spec.run_options)} only)"
            )
        if spec.one_device and "," in self.device:
            raise InvalidConfigError(
                "RAIT and DPO train on one device; name one (cpu, cuda:N, mps)"
            )
        return self

    def recorded(self, spec: FileConfig) -> dict[str, Any]:
        """What a report and a tracker record of a run: the spec's fields and the run
        options its method honours (the keys the configs held before the options moved
        out of them, so reports read the same)."""
        return {**spec.model_dump(), **self.model_dump(include=set(spec.run_options))}


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The mapping in a YAML or JSON config file (spec fields, and for the CLI run options
    under their own names: `split_run_options`)."""
    text = Path(path).read_text(encoding="utf-8")
    data = json.loads(text) if str(path).endswith(".json") else yaml.safe_load(text)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of config keys")
    return data


def split_run_options(values: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(spec values, run option values) of one mapping (a `--config` file, `--set` pairs)."""
    options = {k: v for k, v in values.items() if k in RunOptions.model_fields}
    return {k: v for k, v in values.items() if k not in options}, options


# What a job runs when it names no method. auto, because no fixed setting wins on every
# model: the paper's defaults cost 7 points of domain on SmolLM2 and 77 on the organism,
# and the settings that win differ (mu 7 with R_CW 1 on the organism, mu 30-50 with R_CW
# 0.4 on SmolLM2; README, "Why auto is the default"). auto measures on held-out rows and
# publishes nothing rather than a model that lost more domain or gained no honesty.
DEFAULT_METHOD = "auto"


class FileConfig(BaseModel):
    """A frozen spec of what a method computes that also loads from a YAML or JSON file."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    # The `RunOptions` fields the method runs with; the rest must keep their defaults.
    run_options: ClassVar[tuple[str, ...]] = ("device",)
    one_device: ClassVar[bool] = False

    @model_validator(mode="before")
    @classmethod
    def _no_run_options(cls, data: Any) -> Any:
        # The specs held device, threads, hessian_budget_mb and layerwise before
        # RunOptions; a caller still passing one learns where it went, not "extra inputs".
        if isinstance(data, dict):
            moved = [name for name in RunOptions.model_fields if name in data]
            if moved:
                raise ValueError(
                    f"{', '.join(moved)}: a run option, no longer part of {cls.__name__}; "
                    f"pass hcnr_core.config.RunOptions({moved[0]}=...) beside the config"
                )
        return data

    @classmethod
    def from_file(cls, path: str | Path, **overrides: Any) -> Self:
        """Load from YAML or JSON; `overrides` (e.g. CLI flags) win over the file."""
        return cls(**{**read_config_file(path), **overrides})


class RepairConfig(FileConfig):
    """Hyper-parameters of a repair. Immutable; unknown keys are rejected."""

    run_options: ClassVar[tuple[str, ...]] = ("device", "hessian_budget_mb", "layerwise")

    r_iw: float = Field(0.5, ge=0.0, le=1.0, description="Fraction of input columns per matrix")
    r_cw: float = Field(0.4, ge=0.0, le=1.0, description="Fraction of target matrices restored")
    compensation: Compensation = "paper"
    selection: Selection = Field(
        "hcnr", description="hcnr (priority r), random or honesty_only (ablations)"
    )
    column_budget: ColumnBudget = Field(
        "fraction",
        description="Columns per matrix: fraction = round(r_iw·in) (paper); fisher_mass = "
        "the fewest top-priority columns holding `fisher_mass` of the matrix's positive "
        "priority, at most round(r_iw·in)",
    )
    fisher_mass: float = Field(
        0.5, gt=0.0, le=1.0, description="Share of priority mass kept by column_budget=fisher_mass"
    )
    hessian_inputs: HessianInputs = Field(
        "base",
        description="Inputs of compensation's H: base = the base model on D_hon (paper); "
        "sequential = the model being repaired, block by block, each block seeing the "
        "blocks already repaired (GPTQ's sequential calibration); asymmetric = the same "
        "inputs, aiming at the base's outputs on the base's own inputs (GPTAQ-style; exact "
        "or task_aware; the base stays resident beside the model being repaired)",
    )
    damping: float = Field(0.01, ge=0.0, description="λ: H += λ·mean(diag H)·I")
    task_weight: float = Field(
        1.0,
        ge=0.0,
        le=1e6,
        description="μ of compensation=task_aware: weight of keeping the fine-tuned "
        "outputs on D_task against restoring the base outputs on D_hon",
    )
    seed: int = Field(0, ge=0, description="Seed of every random choice (selection=random)")
    dtype: DType = Field(
        "auto", description="Compute dtype of forward/backward passes; auto = the base's stored"
    )
    max_seq_len: int = Field(
        512,
        ge=8,
        le=131072,
        description="Max tokens per sample: prompts are cut from the left to fit; a longer "
        "response is refused",
    )
    batch_size: int = Field(8, ge=1, le=1024, description="Batch size of forward-only passes")
    target_modules: str = Field(
        DEFAULT_TARGET_MODULES, description="Regex searched in nn.Linear module names"
    )
    check_adapter_base_name: bool = Field(
        True, description="Require the adapter's base_model_name_or_path to name the base"
    )

    @field_validator("target_modules")
    @classmethod
    def _valid_regex(cls, value: str) -> str:
        try:
            re.compile(value)
        except re.error as exc:
            raise ValueError(f"target_modules is not a valid regex: {exc}") from exc
        return value

    @model_validator(mode="after")
    def _supported(self) -> RepairConfig:
        if self.hessian_inputs != "base":
            what = f"hessian_inputs={self.hessian_inputs!r}"
            if self.compensation == "none":
                raise ValueError(f"{what} needs a compensation that uses H")
            if self.hessian_inputs == "asymmetric" and self.compensation == "paper":
                raise ValueError(f"{what} needs compensation 'exact' or 'task_aware'")
        return self


# --- the baselines (hcnr_core.baselines): RAIT and DPO on IDK data ----------------------

LLAMA_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class BaselineConfig(FileConfig):
    """Shared by both baselines. Immutable; unknown keys are rejected."""

    run_options: ClassVar[tuple[str, ...]] = ("device", "threads")
    one_device: ClassVar[bool] = True  # RAIT/DPO train one model

    lr: float = Field(1e-3, gt=0.0, description="Peak AdamW learning rate of the LoRA")
    steps: int | None = Field(
        60, ge=1, le=1_000_000, description="Optimizer steps (or give epochs)"
    )
    epochs: float | None = Field(
        None, gt=0.0, le=1000.0, description="Passes over the data; replaces steps when given"
    )
    batch_size: int = Field(16, ge=1, le=4096)
    warmup: float = Field(0.1, ge=0.0, lt=1.0, description="Linear warm-up share of steps")
    weight_decay: float = Field(0.0, ge=0.0)
    lora_r: int = Field(8, ge=1, le=4096)
    lora_alpha: float = Field(16.0, gt=0.0)
    lora_dropout: float = Field(0.0, ge=0.0, lt=1.0)
    lora_targets: list[str] | str = Field(
        list(LLAMA_LINEARS),
        description="peft target_modules: module-name suffixes, or one regex string",
    )
    seed: int = Field(0, ge=0)
    max_seq_len: int = Field(512, ge=8, le=131072)
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = Field(
        "float32", description="Compute dtype while training; auto = the stored dtype"
    )
    n_samples: int | None = Field(
        None, ge=1, description="Use a seeded, answerable-stratified subset (data-size sweeps)"
    )
    check_adapter_base_name: bool = True

    @field_validator("lora_targets")
    @classmethod
    def _non_empty_targets(cls, value: list[str] | str) -> list[str] | str:
        if not value:
            raise ValueError("lora_targets must name at least one module")
        return value

    @model_validator(mode="before")
    @classmethod
    def _epochs_replace_steps(cls, data: Any) -> Any:
        """Given epochs, steps is None (not the default 60), so that a dumped config
        validates again as the same config."""
        if isinstance(data, dict) and data.get("epochs") is not None:
            if data.get("steps") is not None:
                raise ValueError("give steps or epochs, not both")
            data = {**data, "steps": None}
        return data

    @model_validator(mode="after")
    def _steps_or_epochs(self) -> BaselineConfig:
        if self.epochs is None and self.steps is None:
            raise ValueError("give steps or epochs")
        return self

    def total_steps(self, n_samples: int) -> int:
        if self.epochs is not None:
            return max(1, math.ceil(self.epochs * n_samples / self.batch_size))
        return int(self.steps)  # type: ignore[arg-type]  # validated


class RaitConfig(BaselineConfig):
    """RAIT: SFT of a LoRA on the honesty set (refusals + gold answers)."""


class DpoConfig(BaselineConfig):
    """DPO on IDK preference pairs, the fine-tuned model as the frozen reference."""

    lr: float = Field(2e-3, gt=0.0, description="Peak AdamW learning rate of the LoRA")
    beta: float = Field(0.1, gt=0.0, description="DPO temperature β")
    refusal: str | None = Field(
        None,
        description="Rejected response of answerable prompts [the honesty set's most "
        "common unanswerable response]",
    )
    rpo_alpha: float = Field(
        1.0,
        ge=0.0,
        description="Weight of the chosen responses' mean token NLL added to the DPO loss "
        "(RPO, Pang et al. 2024; TRL's rpo_alpha); 0 = pure sigmoid DPO",
    )
    max_new_tokens: int = Field(
        32, ge=1, le=4096, description="Tokens generated per rejected answer"
    )
    generation_batch_size: int = Field(32, ge=1, le=4096)


# --- auto: a measured choice among candidate repairs (hcnr_core.auto) ---------------------


class AutoCandidate(BaseModel):
    """One repair `auto` tries: a method and its hyper-parameters."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(min_length=1, max_length=40, pattern=r"^[A-Za-z0-9_.+-]+$")
    method: Literal["hcnr", "rait", "dpo"] = "hcnr"
    hyperparameters: dict[str, Any] = Field(default_factory=dict, max_length=64)


# What the evidence supports (bench/results/organism.md, realmodel.md): the paper's defaults
# lose domain accuracy on the organism (-77 points) and on SmolLM2 (-5); task-aware
# compensation keeps the domain; exact and a smaller R_CW sit between. Every HCNR candidate
# shares one pair of Fisher passes, so each extra one costs a compensation and a validation.
DEFAULT_CANDIDATES: tuple[AutoCandidate, ...] = (
    AutoCandidate(name="hcnr-paper"),
    AutoCandidate(name="hcnr-exact", hyperparameters={"compensation": "exact"}),
    AutoCandidate(
        name="hcnr-task-aware-mu1",
        hyperparameters={"compensation": "task_aware", "task_weight": 1.0},
    ),
    AutoCandidate(
        name="hcnr-task-aware-mu7-rcw1",
        hyperparameters={"compensation": "task_aware", "task_weight": 7.0, "r_cw": 1.0},
    ),
    AutoCandidate(name="hcnr-paper-rcw0.2", hyperparameters={"r_cw": 0.2}),
    # Asymmetric calibration (README, "Implementation notes"): the base's outputs on the
    # base's own inputs, block by block through the repaired model.
    AutoCandidate(
        name="hcnr-asymmetric-task-aware-mu7-rcw1",
        hyperparameters={
            "hessian_inputs": "asymmetric",
            "compensation": "task_aware",
            "task_weight": 7.0,
            "r_cw": 1.0,
        },
    ),
    AutoCandidate(  # on the RAIT/DPO frontier on SmolLM2 (bench/results/realmodel.md)
        name="hcnr-asymmetric-task-aware-mu30",
        hyperparameters={
            "hessian_inputs": "asymmetric",
            "compensation": "task_aware",
            "task_weight": 30.0,
        },
    ),
    AutoCandidate(  # meets the >= 33% / <= 2-point bar on SmolLM2 seeds 0 and 1
        name="hcnr-asymmetric-task-aware-mu50",
        hyperparameters={
            "hessian_inputs": "asymmetric",
            "compensation": "task_aware",
            "task_weight": 50.0,
        },
    ),
    AutoCandidate(  # meets the bar on the organism (bench/results/research_modes.md)
        name="hcnr-asymmetric-task-aware-mu15-rcw1",
        hyperparameters={
            "hessian_inputs": "asymmetric",
            "compensation": "task_aware",
            "task_weight": 15.0,
            "r_cw": 1.0,
        },
    ),
    AutoCandidate(
        name="hcnr-asymmetric-exact",
        hyperparameters={"hessian_inputs": "asymmetric", "compensation": "exact"},
    ),
)
BASELINE_CANDIDATES: tuple[AutoCandidate, ...] = (
    AutoCandidate(name="rait", method="rait", hyperparameters={"epochs": 1.0}),
    AutoCandidate(name="dpo", method="dpo", hyperparameters={"epochs": 1.0}),
)


class AutoConfig(FileConfig):
    """`auto`: try candidates, measure each on a held-out validation split, publish the most
    honest one (refusal F1) that loses at most `max_domain_drop` points of domain accuracy
    against the fine-tuned model on the same split."""

    # The device is every candidate's; the other options keep their defaults, as before
    # they moved out of the specs (a candidate's hyper-parameters are a spec's).
    run_options: ClassVar[tuple[str, ...]] = ("device",)

    candidates: list[AutoCandidate] | None = Field(
        None, max_length=32, description="Candidates in order [DEFAULT_CANDIDATES]"
    )
    include_baselines: bool = Field(False, description="Also try RAIT and DPO (1 epoch each)")
    max_domain_drop: float = Field(
        2.0, ge=0.0, le=100.0, description="Points of domain accuracy a choice may lose"
    )
    require_improvement: bool = Field(
        True,
        description="A candidate qualifies only if its validation refusal F1 beats the "
        "fine-tuned model's: a 'repair' that changes nothing is not published as one",
    )
    validation_fraction: float = Field(
        0.25,
        gt=0.0,
        lt=1.0,
        description="Share of the honesty and task sets held out for validation (when no "
        "validation set is given; of the task set at least 100/max_domain_drop rows, up to "
        "half of it); never used by the repairs",
    )
    # On by default since the real-model benchmark measured it (README, "Why auto is the
    # default"): select on the carve, fit on everything — the carve costs the repairs a
    # quarter of their rows, which cost Gemma-3-270M the frontier without the refit.
    refit: bool = Field(
        True,
        description="Publish the chosen setting repaired again from every sample, the "
        "carved validation rows included (its validation figures stay the candidate's); "
        "no effect with a validation set",
    )
    time_budget_s: float = Field(
        3600.0, gt=0.0, le=7 * 86400.0, description="No new candidate starts after this"
    )
    max_new_tokens: int = Field(32, ge=1, le=512, description="Greedy tokens per answer")
    seed: int = Field(0, ge=0)
    dtype: DType = "auto"
    max_seq_len: int = Field(512, ge=8, le=131072)
    batch_size: int = Field(8, ge=1, le=1024, description="Batch size of generation")

    @model_validator(mode="after")
    def _unique_names(self) -> AutoConfig:
        names = [c.name for c in self.tried()]
        if len(set(names)) != len(names):
            raise ValueError("candidate names must be unique")
        return self

    def tried(self) -> list[AutoCandidate]:
        """The candidates in the order they are tried."""
        chosen = list(self.candidates) if self.candidates is not None else [*DEFAULT_CANDIDATES]
        return chosen + ([*BASELINE_CANDIDATES] if self.include_baselines else [])
