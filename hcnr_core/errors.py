"""Errors raised by hcnr_core. Each has a stable `code` that the service exposes."""

from __future__ import annotations


class HCNRError(Exception):
    """Base class: a user-facing error with a stable machine-readable code."""

    code = "hcnr_error"

    def details(self) -> object:
        """The structured part of the error (the API's `error.details`); None here."""
        return None


class DataValidationError(HCNRError):
    """A JSONL file is invalid. `problems` holds (line number, message) pairs."""

    code = "invalid_data"

    def __init__(self, source: str, problems: list[tuple[int, str]]):
        self.source = source
        self.problems = problems
        shown = "\n".join(
            f"  line {line}: {msg}" if line else f"  {msg}" for line, msg in problems[:20]
        )
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        super().__init__(f"{source}: invalid data\n{shown}{more}")

    def details(self) -> dict:
        problems = [{"line": line, "message": message} for line, message in self.problems]
        return {"source": self.source, "problems": problems}


class CheckpointError(HCNRError):
    """A checkpoint is missing, malformed or unusable."""

    code = "invalid_checkpoint"


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint needs pickle loading, remote code or reaches outside its directory."""

    code = "unsafe_checkpoint"


class IncompatibleCheckpointsError(CheckpointError):
    """Base and fine-tuned (or adapter) checkpoints do not belong together."""

    code = "incompatible_checkpoints"


class UnsupportedArchitectureError(CheckpointError):
    """The model keeps weights the repair cannot treat (not nn.Linear: GPT-2's Conv1D,
    MoE experts stored as 3-D tensors), or lacks the layout layer-by-layer mode walks."""

    code = "unsupported_architecture"


class OutputExistsError(HCNRError):
    code = "output_exists"


class RepairCancelled(HCNRError):
    """Raised between steps when the caller's cancellation check returns True."""

    code = "cancelled"


class InvalidGGUFError(CheckpointError):
    """A GGUF file is corrupt, truncated, not GGUF at all, or declares absurd sizes."""

    code = "invalid_gguf"


class UnsupportedGGUFArchitectureError(UnsupportedArchitectureError):
    """transformers' GGUF loader cannot build this GGUF's `general.architecture`."""


class RealModelUnavailableError(HCNRError):
    """A real model's PyPI package (its GGUF) is not installed; the message says what to pip."""

    code = "model_not_installed"


class InsufficientDataError(HCNRError):
    """Too little usable data to build what was asked for (e.g. a honesty set when the
    model answers none of the questions correctly). `stats` holds the counts."""

    code = "insufficient_data"

    def __init__(self, message: str, stats: dict | None = None):
        super().__init__(message)
        self.stats = stats or {}


class InvalidConfigError(HCNRError):
    """A method's hyper-parameters (e.g. one of auto's candidates) do not validate."""

    code = "invalid_hyperparameters"


class NoAcceptableCandidateError(HCNRError):
    """auto: no candidate stayed within the allowed domain-accuracy drop."""

    code = "no_acceptable_candidate"


class LimitExceededError(HCNRError):
    """An input asks for more work than a limit of `hcnr_core.limits.Limits` allows.
    `limit` names the setting, `value` is what the input asked for, `allowed` the limit."""

    code = "limit_exceeded"

    def __init__(
        self,
        message: str,
        *,
        limit: str = "",
        value: float | None = None,
        allowed: float | None = None,
    ):
        super().__init__(message)
        self.limit, self.value, self.allowed = limit, value, allowed

    def details(self) -> dict:
        return {"limit": self.limit, "value": self.value, "allowed": self.allowed}


class CheckpointTooLargeError(LimitExceededError):
    """config.json or the safetensors declare more than max_hidden_size, max_layers,
    max_vocab_size, max_parameters or max_checkpoint_bytes allow."""

    code = "checkpoint_too_large"


class CheckpointMismatchError(CheckpointError):
    """config.json describes a far larger model than its safetensors hold."""

    code = "checkpoint_config_mismatch"


class TooManySamplesError(LimitExceededError):
    code = "too_many_samples"


class TooManyTokensError(LimitExceededError):
    """A sample over max_tokens_per_sample, or all samples over max_tokens_per_job."""

    code = "too_many_tokens"


class DataTooLargeError(LimitExceededError):
    code = "data_too_large"


class ValidationTimeoutError(LimitExceededError):
    """The validation (template, tokenizer, meta model) ran past its wall-clock or CPU
    limit, or found no free slot in time; it was stopped and nothing was written."""

    code = "validation_timeout"


class ValidationMemoryError(LimitExceededError):
    """The validation's child process ran out of its memory limit."""

    code = "validation_out_of_memory"


class JobTimeoutError(LimitExceededError):
    """A job ran past job_timeout_seconds."""

    code = "timeout"
