"""Held-out perplexities every evaluated model reports (../shared/design/lolcats.md §5).

WikiText-2: the test rows joined as `"\n\n".join(rows)` (the GPTQ/LoLCATs text), tokenized once,
cut into non-overlapping windows of `ppl_seq_len` tokens (a partial last window is dropped), at
most `ppl_max_tokens` tokens. Alpaca: response-token perplexity of the prepared validation
chunks (`pipeline.perplexity.split_loss`), as many chunks as hold `ppl_max_tokens` tokens.
"""
import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F

from ..config import LmEvalConfig
from ..perplexity import split_loss
from .suite import DATA_ROOT

WIKITEXT2_TEST = DATA_ROOT / "wikitext2" / "test.jsonl"


def wikitext2_text(path: str | Path = WIKITEXT2_TEST) -> str:
    with open(path) as f:
        return "\n\n".join(json.loads(line)["text"] for line in f)


@torch.no_grad()
def wikitext2_perplexity(model: torch.nn.Module, tokenizer, cfg: LmEvalConfig,
                         path: str | Path = WIKITEXT2_TEST) -> dict[str, float]:
    ids = torch.tensor(tokenizer(wikitext2_text(path))["input_ids"])  # [N]
    usable = len(ids) if cfg.ppl_max_tokens is None else min(len(ids), cfg.ppl_max_tokens)
    windows = usable // cfg.ppl_seq_len
    if windows == 0:
        raise ValueError(f"lm-eval.ppl_seq_len: {path} has only {len(ids)} tokens, fewer than one window")
    device = next(model.parameters()).device
    batch = ids[:windows * cfg.ppl_seq_len].view(windows, cfg.ppl_seq_len)  # [W, L]
    total, count = 0.0, 0
    for window in batch:  # one window per forward: the memory of a single sequence
        window = window.unsqueeze(0).to(device)  # [1, L]
        logits = model(window).logits  # [1, L, V]
        total += F.cross_entropy(logits[0, :-1].float(), window[0, 1:], reduction="sum").item()
        count += cfg.ppl_seq_len - 1
    return {"wikitext2_ppl": math.exp(total / count), "wikitext2_tokens": float(count)}


def alpaca_perplexity(model: torch.nn.Module, split, cfg: LmEvalConfig) -> dict[str, float]:
    """`split`: prepared Alpaca chunks (rows with input_ids and labels), e.g. the validation split."""
    limit = None
    if cfg.ppl_max_tokens is not None and len(split) > 0:
        limit = math.ceil(cfg.ppl_max_tokens / len(split[0]["input_ids"]))
    result = split_loss(model, split, limit)
    return {"alpaca_val_loss": result["loss"], "alpaca_val_ppl": result["ppl"], "alpaca_val_tokens": result["tokens"]}
