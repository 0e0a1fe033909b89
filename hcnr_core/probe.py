"""Does the fine-tuned model still *know* what it doesn't know? (DESIGN.md §5, paper Obs. 2)

For every layer, a logistic-regression probe predicts answerable vs unanswerable from the
hidden state of the last prompt token. Three readings per layer, all AUROC on a held-out
half of the questions:
  - `finetuned`: probe trained and tested on the fine-tuned model;
  - `base_on_finetuned`: probe trained on the base, applied to the fine-tuned model —
    high means the fine-tune kept the base's representation of "unknown" and only lost
    its expression, which is the case HCNR can repair;
  - `base`: trained and tested on the base (the reference).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from hcnr_core.batching import pad_rows, pad_token_id
from hcnr_core.data import Sample, render_prompt


@torch.no_grad()
def last_token_states(
    model: Any, tokenizer: Any, samples: Sequence[Sample], batch_size: int = 32
) -> torch.Tensor:
    """Hidden states of the last prompt token: (layers + 1, samples, hidden), float32."""
    device = next(model.parameters()).device
    pad_id = pad_token_id(tokenizer)
    out = []
    for start in range(0, len(samples), batch_size):
        texts = [render_prompt(tokenizer, s.messages) for s in samples[start : start + batch_size]]
        ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
        # Left padding: the last column is every prompt's last token.
        batch, mask = pad_rows(ids, pad_id, side="left")
        hidden = model(
            input_ids=batch.to(device), attention_mask=mask.to(device), output_hidden_states=True
        ).hidden_states
        out.append(torch.stack([h[:, -1].float().cpu() for h in hidden]))
    return torch.cat(out, dim=1)


def auroc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Area under the ROC curve = P(score of a positive > score of a negative), ties ½."""
    pos, neg = scores[labels.bool()], scores[~labels.bool()]
    if len(pos) == 0 or len(neg) == 0:
        raise ValueError("AUROC needs both classes")
    greater = (pos[:, None] > neg[None, :]).double().sum()
    ties = (pos[:, None] == neg[None, :]).double().sum()
    return float((greater + 0.5 * ties) / (len(pos) * len(neg)))


class LinearProbe:
    """L2-regularised logistic regression on standardised features (L-BFGS, float64)."""

    def __init__(self, l2: float = 1e-2, steps: int = 100):
        self.l2, self.steps = l2, steps

    def fit(self, x: torch.Tensor, y: torch.Tensor) -> LinearProbe:
        x = x.double()
        self.mean, self.std = x.mean(0), x.std(0).clamp_min(1e-6)
        z = (x - self.mean) / self.std
        self.w = torch.zeros(z.shape[1], dtype=torch.float64, requires_grad=True)
        self.b = torch.zeros((), dtype=torch.float64, requires_grad=True)
        optimizer = torch.optim.LBFGS([self.w, self.b], max_iter=self.steps)
        target = y.double()

        def closure() -> torch.Tensor:
            optimizer.zero_grad()
            logits = z @ self.w + self.b
            loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, target)
            loss = loss + self.l2 * self.w.pow(2).sum()
            loss.backward()
            return loss

        optimizer.step(closure)
        return self

    def score(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return ((x.double() - self.mean) / self.std) @ self.w + self.b


def split(labels: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A stratified half/half split of sample indices."""
    generator = torch.Generator().manual_seed(seed)
    train, test = [], []
    for value in (False, True):
        idx = torch.nonzero(labels == value).flatten()
        idx = idx[torch.randperm(len(idx), generator=generator)]
        train.append(idx[: len(idx) // 2])
        test.append(idx[len(idx) // 2 :])
    return torch.cat(train), torch.cat(test)


def probe_layers(
    base_states: torch.Tensor, ft_states: torch.Tensor, unanswerable: torch.Tensor, seed: int = 0
) -> dict[str, list[float]]:
    """Per-layer AUROC (unanswerable = positive) of the three probes."""
    train, test = split(unanswerable, seed)
    y_train, y_test = unanswerable[train], unanswerable[test]
    out: dict[str, list[float]] = {"base": [], "finetuned": [], "base_on_finetuned": []}
    for layer in range(base_states.shape[0]):
        base_probe = LinearProbe().fit(base_states[layer, train], y_train)
        ft_probe = LinearProbe().fit(ft_states[layer, train], y_train)
        out["base"].append(auroc(base_probe.score(base_states[layer, test]), y_test))
        out["finetuned"].append(auroc(ft_probe.score(ft_states[layer, test]), y_test))
        out["base_on_finetuned"].append(auroc(base_probe.score(ft_states[layer, test]), y_test))
    return out


def plot(result: dict[str, list[float]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axis = plt.subplots(figsize=(6, 3.5))
    for name, values in result.items():
        axis.plot(range(len(values)), values, "o-", label=name)
    axis.set_xlabel("layer (0 = embeddings)")
    axis.set_ylabel("AUROC, unanswerable vs answerable")
    axis.set_ylim(0.4, 1.02)
    axis.axhline(0.5, color="grey", lw=0.5)
    axis.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
