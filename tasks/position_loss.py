"""Per-token loss of a position bin for lolcats_position_loss.yaml (pipeline/probes.py)."""


def loss_per_token(doc: dict, results: list[tuple[float, bool]]) -> dict[str, float]:
    """lm-eval hands one (loglikelihood, is_greedy) per document; `tokens` is the continuation's
    token count as HFLM splits the pair (prepare-probes measured it)."""
    loglikelihood, _ = results[0]
    return {"loss": -loglikelihood / doc["tokens"]}
