"""Validated, frozen configuration of one HCNR repair (DESIGN.md §2)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from hcnr_core.devices import parse_devices

Compensation = Literal["paper", "exact", "task_aware", "none"]
Selection = Literal["hcnr", "random", "honesty_only"]
DType = Literal["auto", "float32", "bfloat16", "float16"]

# Every nn.Linear inside the decoder blocks (Llama: q,k,v,o,gate,up,down); never
# embeddings or lm_head, which live outside `layers.N`.
DEFAULT_TARGET_MODULES = r"(^|\.)layers\.\d+\..+"


class RepairConfig(BaseModel):
    """Hyper-parameters of a repair. Immutable; unknown keys are rejected."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    r_iw: float = Field(0.5, ge=0.0, le=1.0, description="Fraction of input columns per matrix")
    r_cw: float = Field(0.4, ge=0.0, le=1.0, description="Fraction of target matrices restored")
    compensation: Compensation = "paper"
    selection: Selection = Field(
        "hcnr", description="hcnr (priority r), random or honesty_only (ablations)"
    )
    damping: float = Field(0.01, ge=0.0, description="λ: H += λ·mean(diag H)·I")
    task_weight: float = Field(
        1.0,
        ge=0.0,
        description="μ of compensation=task_aware: weight of keeping the fine-tuned "
        "outputs on D_task against restoring the base outputs on D_hon",
    )
    seed: int = Field(0, ge=0)
    dtype: DType = Field(
        "auto", description="Compute dtype of forward/backward passes; auto = the base's stored"
    )
    device: str = Field(
        "cpu",
        description="cpu, cuda, cuda:N, mps, or GPUs to run replicas on: cuda:0,cuda:1",
    )
    max_seq_len: int = Field(512, ge=8, le=131072)
    batch_size: int = Field(8, ge=1, le=1024, description="Batch size of forward-only passes")
    hessian_budget_mb: int = Field(
        4096, ge=1, description="Max memory of Hessians held at once; more means fewer passes"
    )
    layerwise: bool = Field(
        False, description="One decoder block on the device at a time (models > GPU memory)"
    )
    target_modules: str = Field(
        DEFAULT_TARGET_MODULES, description="Regex searched in nn.Linear module names"
    )
    check_adapter_base_name: bool = Field(
        True, description="Require the adapter's base_model_name_or_path to name the base"
    )

    @field_validator("device")
    @classmethod
    def _valid_device(cls, value: str) -> str:
        return ",".join(parse_devices(value))

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
        if self.compensation == "task_aware" and self.layerwise:
            raise ValueError("compensation='task_aware' does not support layerwise yet")
        return self

    @classmethod
    def from_file(cls, path: str | Path, **overrides: Any) -> RepairConfig:
        """Load from YAML or JSON; `overrides` (e.g. CLI flags) win over the file."""
        text = Path(path).read_text(encoding="utf-8")
        data = json.loads(text) if str(path).endswith(".json") else yaml.safe_load(text)
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a mapping of config keys")
        return cls(**{**data, **overrides})
