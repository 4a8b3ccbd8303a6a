"""WinoGrande partial scoring for lolcats_winogrande.yaml (../shared/design/lolcats.md §5).

The choices are the contexts (the sentence up to the blank, filled with each option) and the
target is the shared continuation after the blank, so lm-eval compares
log p(rest | sentence with option k) across k. `doc_to_text` returns the gold option's index:
for such tasks lm-eval reads it as the index of the right context.
"""


def _blank(doc: dict) -> int:
    return doc["sentence"].index("_")


def gold_option(doc: dict) -> int:
    return int(doc["answer"]) - 1  # "1" | "2" → 0 | 1


def filled_contexts(doc: dict) -> list[str]:
    head = doc["sentence"][:_blank(doc)]
    return [head + doc["option1"], head + doc["option2"]]


def after_blank(doc: dict) -> str:
    return doc["sentence"][_blank(doc) + 1:].strip()
