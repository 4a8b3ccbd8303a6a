"""Which keys a query sees through softmax: the window kinds of ../shared/design/lolcats.md §1.3.

A window kind is a predicate ``contains(i, j, w)`` over absolute positions with ``j <= i``; it works
on Python ints and on broadcastable integer tensors alike, so the quadratic oracle, the chunked
form and the recurrent step share one definition. Every kind must be monotone: once key ``j``
leaves the window of query ``i`` it stays out for every later query, which is what lets the
recurrent form move it into the linear state for good.

Each kind also has a `code`, the number the Triton kernels branch on (their constexpr KIND:
`kernel_windows.py`). A kernel implements a kind by having a branch for its code and refuses any
other kind by name, so a kind registered here runs on the PyTorch paths at once and on a Triton
path only once that path has been given its rule.
"""
from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class WindowKind:
    name: str
    contains: Callable  # (i, j, w) -> bool or bool tensor; assumes j <= i
    capacity: Callable[[int], int]  # the most keys one window holds: the recurrent ring size
    code: int  # the kind inside the Triton kernels (KIND); unique, so no kernel takes one kind for another


WINDOW_KINDS: dict[str, WindowKind] = {}


def register_window(name: str, capacity: Callable[[int], int], code: int):
    if any(kind.code == code and kind.name != name for kind in WINDOW_KINDS.values()):
        raise ValueError(f"window kind code {code} is taken; codes in use: "
                         f"{sorted((kind.code, kind.name) for kind in WINDOW_KINDS.values())}")

    def add(contains: Callable) -> Callable:
        WINDOW_KINDS[name] = WindowKind(name, contains, capacity, code)
        return contains
    return add


def window_kind(name: str) -> WindowKind:
    if name not in WINDOW_KINDS:
        raise ValueError(f"unknown window kind {name!r}; known: {sorted(WINDOW_KINDS)}")
    return WINDOW_KINDS[name]


@register_window("sliding", capacity=lambda w: w, code=0)
def sliding(i, j, w):
    """The last ``w`` keys including the query itself: j in [i-w+1, i]."""
    return (i - j) < w


@register_window("terrace", capacity=lambda w: 2 * w, code=1)
def terrace(i, j, w):
    """Upstream's "TK" mask: keys in the query's ``w``-block and in the block before it.

    Blocks start at position 0. Upstream aligns them to the sequence end when T is not a multiple
    of ``w``; we keep them causal, so a prefix's outputs never change when the sequence grows.
    Both agree at the training length 1024.
    """
    return (i // w - j // w) <= 1
