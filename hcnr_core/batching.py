"""One collation for every method: token rows to a padded batch.

Training, Fisher and Hessian passes pad on the right (positions line up with the samples'
own indices); generation and last-token probes pad on the left (the last column holds
every prompt's last token, where generation continues). Padded positions are masked, so
the pad id only has to be a valid token (`pad_token_id`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch

from hcnr_core.data import EncodedSample

IGNORE = -100  # label of positions no loss is taken on (prompt and padding)


def pad_token_id(tokenizer: Any) -> int:
    """The id padding uses: the tokenizer's pad token, else its EOS (Llama-style tokenizers
    define none; padded positions are masked, so only the id's validity matters, never a
    made-up 0 that may be a real token)."""
    pad_id = tokenizer.pad_token_id
    return tokenizer.eos_token_id if pad_id is None else pad_id


def pad_rows(
    rows: Sequence[Sequence[int]], pad_id: int, side: Literal["right", "left"] = "right"
) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention mask), both (len(rows), longest row), long."""
    width = max(len(row) for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for r, row in enumerate(rows):
        span = slice(0, len(row)) if side == "right" else slice(width - len(row), width)
        ids[r, span] = torch.tensor(list(row), dtype=torch.long)
        mask[r, span] = 1
    return ids, mask


def collate(batch: Sequence[EncodedSample], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded ids, attention mask and labels that keep only response tokens."""
    ids, mask = pad_rows([s.input_ids for s in batch], pad_id)
    labels = torch.full_like(ids, IGNORE)
    for row, s in enumerate(batch):
        n = len(s.input_ids)
        labels[row, s.prompt_len : n] = ids[row, s.prompt_len : n]
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


class Collator:
    """`collate` with a fixed pad id, for `transformers.Trainer`'s `data_collator`."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, batch: Sequence[EncodedSample]) -> dict[str, torch.Tensor]:
        return collate(batch, self.pad_id)
