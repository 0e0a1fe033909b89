"""A validation set for `auto` on a real-model build: the build's held-out SelfAware
validation rows plus reading-domain rows about people no other split uses.

    rows = auto_validation_rows(build_rows, seed=0, n_domain=100)

`auto` carves its validation split from the repair sets when it is given none; on a build
that leaves 50 of the 128 task rows (one answer is 2 points; 32 before the carve sized
itself to the limit, 3.1 points), many of them closed-book answers no model reproduces,
which measure nothing (bench/results/realmodel.md).
A user with domain data passes a validation file instead; this is that file for the
benchmark's builds. It lives apart from `data.py` so that the builds' cache keys (which
cover the code that makes the training data) stay valid.
"""

from __future__ import annotations

import random
from typing import Any

from hcnr_core.organism import world as w
from hcnr_core.realmodel.data import BIO, DomainSizes, reading_row


def domain_validation_rows(
    seed: int, n: int, domain: DomainSizes = DomainSizes()
) -> list[dict[str, Any]]:
    """`n` reading rows about people drawn after the build's own (the same world, the same
    slicing, so never a name of the fine-tune or of the domain eval), with fresh facts."""
    roles = {
        "known": 0,
        "aligned": domain.align_readers + domain.align_fictional,
        "domain": domain.sft_readers + domain.sft_fictional,
        "reading": 0,
        "eval_unknown": 0,
        "eval_domain": domain.eval_readers + n,
    }
    people = w.make_world(seed, roles).eval_domain[domain.eval_readers :]
    rng = random.Random(f"hcnr-realmodel-validation-{seed}")
    attributes = list(BIO)
    return [reading_row(w.with_fresh_facts(p, rng), rng.choice(attributes), rng) for p in people]


def auto_validation_rows(
    honesty_rows: list[dict[str, Any]],
    seed: int,
    n_domain: int = 100,
    domain: DomainSizes = DomainSizes(),
) -> list[dict[str, Any]]:
    """The build's `validation.jsonl` rows (honesty) followed by `n_domain` domain rows."""
    return [*honesty_rows, *domain_validation_rows(seed, n_domain, domain)]
