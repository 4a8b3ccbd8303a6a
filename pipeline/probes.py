"""Long-context probes: what the linear branch buys beyond the softmax window.

Two lm-eval tasks in tasks/ read the documents written here, so every evaluated model is scored on
the same tokens through the same `lm-eval@*` stages:

- `lolcats_passkey`: a random number (the pass key) stated in WikiText-2 filler at a measured
  distance before the question; scored by whether the model's greedy continuation is the key
  (lm-eval's `acc` of a loglikelihood task). A model that cannot see the key scores ~0.
- `lolcats_position_loss`: WikiText-2 test articles cut at token positions (`position_bins`); each
  document is one bin's tokens as the continuation of everything before it, so its loss per token
  is the model's loss at those positions.

Distances and positions are counted in the tokens lm-eval scores: the teacher's tokenizer without
special tokens, as HFLM encodes a context and its continuation. Nothing here depends on the hybrid's
window: which bins lie beyond it is the report's reading (`pipeline.comparison.beyond_window`), so a
window ablation reruns no probe and no teacher evaluation.
"""
import json
import random
import re
from pathlib import Path

from .config import ProbesConfig
from .io import DataFileError

PROBES_DIR = Path("data/probes")  # prepare-probes' out; tasks/lolcats_*.yaml name these files too
PASSKEY_FILE, POSITION_LOSS_FILE = "passkey.jsonl", "position_loss.jsonl"
NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = " What is the pass key? The pass key is"  # the key follows as the continuation " <key>"
ARTICLE_TITLE = re.compile(r"^ = [^=].* = \n?$")  # " = Title = ": a level-1 heading starts an article


def wikitext_articles(path: str | Path) -> list[str]:
    """The articles of WikiText-2 test rows, each its rows joined as the perplexity text is."""
    path = Path(path)
    if not path.is_file():
        raise DataFileError(f"prepare-probes.source: {path} is missing; point it at WikiText-2 test rows "
                            "(../shared/data/wikitext2/test.jsonl)")
    articles: list[list[str]] = []
    with open(path) as f:
        for line in f:
            text = json.loads(line)["text"]
            if ARTICLE_TITLE.match(text):
                articles.append([])
            if articles:
                articles[-1].append(text)
    return ["\n\n".join(rows) for rows in articles]


class Tokens:
    """The tokenizer as lm-eval uses it: no special tokens; offsets to find characters among tokens."""

    def __init__(self, tokenizer) -> None:
        if not getattr(tokenizer, "is_fast", False):
            raise ValueError("prepare-probes: the teacher's tokenizer must be a fast (Rust) tokenizer, "
                             "for token offsets")
        self.tokenizer = tokenizer

    def count(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def offsets(self, text: str) -> list[tuple[int, int]]:
        return self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]

    def tokens_after(self, text: str, char: int) -> int:
        """Tokens that start at or after character `char`."""
        return sum(1 for start, _ in self.offsets(text) if start >= char)

    def continuation_tokens(self, context: str, continuation: str) -> int:
        """The continuation's token count as lm-eval's HFLM splits a (context, continuation) pair:
        trailing spaces move from the context to the continuation, the pair is encoded whole, and the
        continuation is what follows the context's own tokens; an empty context is a prefix token."""
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        if not context:
            return self.count(continuation)
        return self.count(context + continuation) - self.count(context)


def _smallest(n: int, enough) -> int:
    """The smallest k in [0, n] with enough(k) (monotone), n if none."""
    low, high = 0, n
    while low < high:
        mid = (low + high) // 2
        low, high = (low, mid) if enough(mid) else (mid + 1, high)
    return low


def passkey_doc(tokens: Tokens, words: list[str], rng: random.Random, length: int, distance: int,
                digits: int) -> dict:
    """One prompt of at most `length` tokens whose key ends `distance` or a few more tokens before its end."""
    key = str(rng.randrange(10 ** (digits - 1), 10 ** digits))
    middle = rng.randrange(length, len(words) - length)  # the needle goes between words[middle - 1] and words[middle]
    needle = NEEDLE.format(key=key)
    key_in_needle = needle.rindex(key) + len(key)  # the end of the key's second mention

    def prompt(before: int, after: int) -> tuple[str, int]:
        """The prompt with `before` filler words ahead of the needle and `after` behind it, and the
        character where the key's second mention ends."""
        head = " ".join(words[middle - before:middle])
        tail = "".join(" " + word for word in words[middle:middle + after])
        text = head + needle + tail + QUESTION
        strip = 0 if head else 1  # no filler ahead: the needle's leading space goes
        return text[strip:], len(head) + key_in_needle - strip

    def measured(before: int, after: int) -> int:  # tokens after the key's last digit
        return tokens.tokens_after(*prompt(before, after))

    after = _smallest(length, lambda k: measured(0, k) >= distance)
    if tokens.count(prompt(0, after)[0]) > length:
        raise ValueError(f"prepare-probes: a key {distance} tokens back does not fit a {length}-token prompt")
    before = _smallest(length, lambda b: tokens.count(prompt(b + 1, after)[0]) > length)  # the most that fit
    text, _ = prompt(before, after)
    found = measured(before, after)
    return {"context": text, "key": key, "distance": found, "target_distance": distance, "context_length": length,
            "context_tokens": tokens.count(text)}


def passkey_docs(tokenizer, articles: list[str], cfg: ProbesConfig) -> list[dict]:
    """`docs_per_cell` prompts per (context length, distance) with distance < context length."""
    tokens, rng = Tokens(tokenizer), random.Random(f"{cfg.seed}:passkey")
    words = " ".join(articles).split()
    return [passkey_doc(tokens, words, rng, length, distance, cfg.key_digits)
            for length in cfg.context_lengths for distance in cfg.distances if distance < length
            for _ in range(cfg.docs_per_cell)]


def position_docs(tokenizer, articles: list[str], cfg: ProbesConfig) -> list[dict]:
    """Per chosen article and bin [a, b): the article up to token a as context, tokens a..b-1 as continuation."""
    tokens, edges = Tokens(tokenizer), cfg.position_bins
    long_enough = [i for i, text in enumerate(articles) if tokens.count(text) >= edges[-1]]
    if len(long_enough) < cfg.position_docs:
        raise ValueError(f"prepare-probes.position_docs: only {len(long_enough)} articles hold "
                         f"{edges[-1]} tokens (position_bins' last edge); ask for fewer or shorter")
    chosen = sorted(random.Random(f"{cfg.seed}:position").sample(long_enough, cfg.position_docs))
    docs = []
    for article in chosen:
        text = articles[article]
        offsets = tokens.offsets(text)
        for a, b in zip(edges, edges[1:]):
            start, end = (offsets[a][0] if a else 0), offsets[b - 1][1]
            context, continuation = text[:start], text[start:end]
            docs.append({"context": context, "continuation": continuation, "article": article, "bin": f"{a}-{b}",
                         "start": a, "end": b, "tokens": tokens.continuation_tokens(context, continuation)})
    return docs


def write_jsonl(path: Path, docs: list[dict]) -> None:
    with open(path, "w") as f:
        f.writelines(json.dumps(doc) + "\n" for doc in docs)
