"""Next-token loss on response tokens: the LoRA objective and the perplexity every stage reports.

The shared loss helper; the evaluation's own perplexities (WikiText-2, Alpaca validation) are
`pipeline.evaluation.heldout_perplexity`, built on `split_loss`.
"""
import math

import torch
import torch.nn.functional as F

from .data import IGNORE  # the label prepare-data gives prompt tokens


def response_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Summed negative log-likelihood of labelled next tokens, and how many there are.

    logits [B,T,V], labels [B,T] (position t predicts labels[t+1], as transformers shifts them).
    """
    targets = labels[:, 1:]
    nll = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets.flatten(),
                          ignore_index=IGNORE, reduction="sum")
    return nll, int((targets != IGNORE).sum())


@torch.no_grad()
def split_loss(model: torch.nn.Module, dataset, limit: int | None = None) -> dict[str, float]:
    """Mean response-token loss and perplexity of `model` over the chunks of one dataset split."""
    total, count = 0.0, 0
    device = next(model.parameters()).device
    rows = range(len(dataset) if limit is None else min(limit, len(dataset)))
    for i in rows:
        row = dataset[i]
        ids, labels = torch.tensor([row["input_ids"]], device=device), torch.tensor([row["labels"]], device=device)
        nll, n = response_nll(model(ids).logits, labels)
        total, count = total + nll.item(), count + n
    loss = total / max(count, 1)
    return {"loss": loss, "ppl": math.exp(loss), "tokens": float(count)}
