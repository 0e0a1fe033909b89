"""The organism's tokenizer: a real `PreTrainedTokenizerFast` over the world's words."""

from __future__ import annotations

from typing import Any

from hcnr_core.organism.world import world_words
from hcnr_core.toy import build_word_tokenizer


def build_tokenizer() -> Any:
    """Word-level vocabulary with the toy chat template; input is lower-cased, so users
    can type "Where does Adam Abbot live?" and stay inside the vocabulary."""
    from tokenizers import normalizers

    tokenizer = build_word_tokenizer(world_words())
    tokenizer.backend_tokenizer.normalizer = normalizers.Lowercase()
    return tokenizer
