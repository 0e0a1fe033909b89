"""Every repair method behind one seam: what the CLI, a service job and the library run.

    method = get_method("rait")                       # "hcnr" | "rait" | "dpo" | "auto"
    config = method.make_config({"epochs": 1.0})      # what to compute
    options = RunOptions(device="cuda:0")             # how to run it
    warnings = method.check(config, inputs, options)  # no weights loaded
    report = method.run(config, inputs, out, options=options, progress=on_event)

Each method takes the same `MethodInputs` (the base, the fine-tune — full or a LoRA
adapter —, the honesty set and the task set, which only HCNR reads), reports progress as
`ProgressEvent`s with an overall fraction, stops with `RepairCancelled` when
`should_cancel()` turns true, and publishes a checkpoint that loads with
`from_pretrained` plus its JSON report (`report_name`), whose `files` lists every file's
sha256 and size, and whose `config` records the spec and the run options the method
honours (`RunOptions.recorded`). The algorithms stay in their modules (`pipeline`,
`baselines`); this module only adapts them, so a caller never switches on the method's type.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

from hcnr_core.config import (
    BaselineConfig,
    DpoConfig,
    FileConfig,
    RaitConfig,
    RepairConfig,
    RunOptions,
)
from hcnr_core.data import Sample
from hcnr_core.errors import HCNRError
from hcnr_core.progress import ProgressEvent

MethodName = Literal["hcnr", "rait", "dpo", "auto"]
Progress = Callable[[ProgressEvent], None]
ShouldCancel = Callable[[], bool]
Data = str | Path | Sequence[Sample]


@dataclass(frozen=True)
class MethodInputs:
    """What a repair reads. `base` may be None for RAIT/DPO on a full fine-tune;
    `validation` (honesty rows with `answerable`, domain rows with `answers`) is read by
    `auto` only, which otherwise carves one from the honesty and task sets."""

    base: str | Path | None
    finetuned: str | Path
    honesty: Data
    task: Data | None = None
    validation: Data | None = None


class Method(Protocol):
    """A repair method: validated config in, published checkpoint + report out."""

    name: str
    title: str
    report_name: str
    config_type: type[FileConfig]

    def make_config(self, values: dict[str, Any]) -> Any:
        """The method's validated, frozen spec from user values (no run options: those
        are `RunOptions`, given to `check` and `run`)."""

    def check(
        self, config: Any, inputs: MethodInputs, options: RunOptions | None = None
    ) -> list[str]:
        """Every check that needs no weights; raises HCNRError, returns warnings."""

    def run(
        self,
        config: Any,
        inputs: MethodInputs,
        out: str | Path,
        *,
        options: RunOptions | None = None,
        progress: Progress | None = None,
        should_cancel: ShouldCancel | None = None,
        cache: dict | None = None,
    ) -> dict[str, Any]:
        """Repair and publish `out` atomically; returns the report written there. `options`
        (default `RunOptions()`: one CPU) say how it runs. `cache` is shared by runs on the
        same inputs (HCNR keeps its Fisher scores and task Hessians there)."""


def options_for(config: FileConfig, options: RunOptions | None) -> RunOptions:
    """`options` (default: one CPU), refused where `config`'s method cannot run them."""
    return (options or RunOptions()).check_for(type(config))


def require_inputs(inputs: MethodInputs, method: str, *names: str) -> None:
    absent = [n for n in names if getattr(inputs, n) is None]
    if absent:
        raise HCNRError(f"method {method!r} needs {' and '.join(absent)}")


class HCNRMethod:
    """Restoration of honesty-critical columns + compensation (`RepairPipeline`)."""

    name, title, report_name = "hcnr", "HCNR", "hcnr_report.json"
    config_type = RepairConfig

    def make_config(self, values: dict[str, Any]) -> RepairConfig:
        return RepairConfig(**values)

    def check(
        self, config: RepairConfig, inputs: MethodInputs, options: RunOptions | None = None
    ) -> list[str]:
        from hcnr_core.pipeline import RepairPipeline

        require_inputs(inputs, self.name, "base", "task")
        prepared = RepairPipeline(config, options_for(config, options)).prepare(
            inputs.base,  # type: ignore[arg-type]  # checked above
            inputs.finetuned,
            inputs.honesty,
            inputs.task,  # type: ignore[arg-type]
        )
        return list(prepared.warnings)

    def run(
        self,
        config: RepairConfig,
        inputs: MethodInputs,
        out: str | Path,
        *,
        options: RunOptions | None = None,
        progress: Progress | None = None,
        should_cancel: ShouldCancel | None = None,
        cache: dict | None = None,
    ) -> dict[str, Any]:
        from hcnr_core.pipeline import RepairPipeline

        require_inputs(inputs, self.name, "base", "task")
        pipeline = RepairPipeline(
            config,
            options_for(config, options),
            progress=progress,
            should_cancel=should_cancel,
            fisher_cache=None if cache is None else cache.setdefault("fisher", {}),
            task_hessian_cache=None if cache is None else cache.setdefault("task_hessians", {}),
        )
        prepared = pipeline.prepare(inputs.base, inputs.finetuned, inputs.honesty, inputs.task)  # type: ignore[arg-type]
        return pipeline.run(prepared, out)


@dataclass(frozen=True)
class BaselineMethod:
    """A LoRA trained on the fine-tune with the honesty set, merged (`hcnr_core.baselines`,
    which reports `ProgressEvent`s like the HCNR pipeline)."""

    name: Literal["rait", "dpo"]
    title: str
    config_type: type[BaselineConfig]
    report_name: str = "baseline_report.json"

    def make_config(self, values: dict[str, Any]) -> BaselineConfig:
        return self.config_type(**values)

    def check(
        self, config: BaselineConfig, inputs: MethodInputs, options: RunOptions | None = None
    ) -> list[str]:
        from hcnr_core.baselines import check_baseline

        options_for(config, options)  # no weights: the options are only checked
        return check_baseline(self.name, inputs.base, inputs.finetuned, inputs.honesty, config)

    def run(
        self,
        config: BaselineConfig,
        inputs: MethodInputs,
        out: str | Path,
        *,
        options: RunOptions | None = None,
        progress: Progress | None = None,
        should_cancel: ShouldCancel | None = None,
        cache: dict | None = None,
    ) -> dict[str, Any]:
        from hcnr_core import baselines

        train = baselines.train_rait if self.name == "rait" else baselines.train_dpo
        return train(
            inputs.base,
            inputs.finetuned,
            inputs.honesty,
            out,
            config,  # type: ignore[arg-type]  # the method's own config type
            options=options_for(config, options),
            progress=progress,
            should_cancel=should_cancel,
        )


# The methods that repair by themselves (auto's candidates); `hcnr_core.registry.get_method`
# also knows "auto", which runs these.
METHODS: dict[str, Method] = {
    "hcnr": HCNRMethod(),
    "rait": BaselineMethod("rait", "RAIT (SFT on IDK data)", RaitConfig),
    "dpo": BaselineMethod("dpo", "DPO on IDK preference pairs", DpoConfig),
}
