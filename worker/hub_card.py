"""A job's Hub model card: `hcnr_core.card`'s card with the job's references and the
hyper-parameters the user asked for, rewritten once the before/after metrics are known.

The method writes its own card with the checkpoint; the worker replaces it after the
evaluation, and `hcnr_core.card.write_card` records the card's new sha256 in the method's
report (on disk and in the job's report), so every digest the job publishes stays true.
The card carries no job id: the same inputs publish the same bytes, whichever job or
attempt ran them (tests/reliability: bit-identical).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hcnr_core.card import CARD_NAME as CARD
from hcnr_core.card import METRICS, CardInputs, build_card, write_card

__all__ = ["CARD", "METRICS", "build", "card_inputs", "publish"]


def card_inputs(job: Any) -> CardInputs:
    return CardInputs(job.method, job.base_ref, job.finetuned_ref, job.hyperparameters)


def build(job: Any, report: dict[str, Any], eval_name: str | None = None) -> Any:
    """The `huggingface_hub.ModelCard` of the job's checkpoint."""
    return build_card(card_inputs(job), report, eval_name)


def publish(job: Any, report: dict[str, Any], out: Path, eval_name: str | None = None) -> None:
    """Write the job's card as `out/README.md`; the digests follow (`write_card`)."""
    write_card(out, card_inputs(job), report, eval_name)
