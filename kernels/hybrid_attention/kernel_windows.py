"""The window kinds of `windows.py` inside the Triton kernels (chunk forward and backward, decode step).

A kernel takes a kind as the constexpr KIND, the registry entry's `code`, and reads its rule from
`in_window` (the registry's `contains`: the chunk kernels' score blocks) and `window_start` (the
first key of a query's window: the decode step's ring). Every launcher resolves the window name
through `kernel_code` first, which refuses a kind without a branch here, naming it and the kinds
that have one; the branches also end in a static assert, so a code without a branch fails to
compile instead of running as another kind. tests/kernels/test_kernel_windows.py holds each branch
to the registry's predicate.
"""
import triton
import triton.language as tl

from .windows import WINDOW_KINDS, window_kind

# The codes of the kinds with a branch below; constexpr, the only globals a jit function may read.
SLIDING = tl.constexpr(window_kind("sliding").code)
TERRACE = tl.constexpr(window_kind("terrace").code)
IMPLEMENTED = frozenset({SLIDING.value, TERRACE.value})


def kernel_code(window: str, kernel: str) -> int:
    """KIND of the window kind named `window`, or ValueError if the kernels have no branch for it
    (`kernel` names the refusing path in the message)."""
    code = window_kind(window).code
    if code not in IMPLEMENTED:
        implemented = sorted(kind.name for kind in WINDOW_KINDS.values() if kind.code in IMPLEMENTED)
        raise ValueError(f"the {kernel} does not implement window kind {window!r}; it implements {implemented}")
    return code


@triton.jit
def in_window(i, j, W: tl.constexpr, KIND: tl.constexpr):
    """`contains(i, j, W)` of the kind KIND, for integer tensors that broadcast, with j <= i."""
    if KIND == TERRACE:
        return (i // W - j // W) <= 1
    else:
        tl.static_assert(KIND == SLIDING, "no Triton rule for this window kind")
        return (i - j) < W


@triton.jit
def window_start(p, W: tl.constexpr, KIND: tl.constexpr):
    """The first position in the window of query position p (negative near the start). Every kind
    here is an interval ending at p: `contains(p, j, W)` is j >= window_start(p, W)."""
    if KIND == TERRACE:
        return (p // W - 1) * W  # the previous w-block
    else:
        tl.static_assert(KIND == SLIDING, "no Triton rule for this window kind")
        return p - W + 1
