"""The `attention` params block: what the hybrid layer is (../shared/design/lolcats.md §1).

One hybrid attention; every variant (window kind and size, feature map, baselines) is a value here.
"""
import dataclasses
import math
from dataclasses import dataclass
from typing import Literal

from kernels.hybrid_attention import WINDOW_KINDS

from ..params import ParamsBlock
from .feature_maps import FEATURE_MAPS


# what only one branch reads: the softmax window's shape, the linear branch's feature maps (init_gamma,
# the mix of the two, is read only when both are there)
WINDOW_FIELDS = ("window", "window_size")
LINEAR_FIELDS = ("feature_map", "feature_dim", "feature_init")


@dataclass
class HybridConfig(ParamsBlock):
    BLOCK = "attention"

    # the method, or a baseline with one branch off: window_only (no linear part), linear_only (no window)
    mode: Literal["hybrid", "window_only", "linear_only"] = "hybrid"
    window: str = "terrace"  # softmax window kind: "terrace" (upstream TK, main results) or "sliding"
    window_size: int = 64  # w: keys per window block (tokens)
    feature_map: str = "hedgehog"  # phi of the linear branch: hedgehog | t2r | elu
    feature_dim: int = 64  # F' columns of each per-head W; Hedgehog's phi then has 2 * F' values
    feature_init: Literal["identity", "kaiming"] = "identity"  # upstream passes --lk_zero_init: identity
    init_gamma: float = 0.1  # window weight gamma = sigmoid(w_h) at the start (upstream "w01")
    backend: Literal["auto", "torch", "triton"] = "auto"  # auto: Triton kernel on CUDA, PyTorch otherwise
    # layers the teacher already runs over its own sliding window (Gemma 2/3 local layers, Mistral
    # with sliding_window) cost constant memory: global_only keeps them exact softmax over that
    # window; all linearizes them too, each imitating its teacher's window
    linearize: Literal["global_only", "all"] = "global_only"

    def __post_init__(self) -> None:
        self.require(self.window in WINDOW_KINDS, "window", f"must be one of {sorted(WINDOW_KINDS)}")
        self.require(self.feature_map in FEATURE_MAPS, "feature_map", f"must be one of {sorted(FEATURE_MAPS)}")
        self.require(self.window_size > 0, "window_size", "must be a positive number of tokens")
        self.require(self.feature_dim > 0, "feature_dim", "must be positive")
        self.require(0.0 < self.init_gamma < 1.0, "init_gamma", "must lie strictly between 0 and 1")

    def for_mode(self, mode: str | None) -> "HybridConfig":
        """This config in `mode` (None: its own), with every field that mode does not read at its default.

        Two configs that build the same layer are then equal: a linear-only model does not change, and its
        stages (which depend on this, through `scoped_attention`) do not rerun, when the window does."""
        config = dataclasses.replace(self, mode=mode or self.mode)
        unread = ((() if config.uses_window else WINDOW_FIELDS) + (() if config.uses_linear else LINEAR_FIELDS)
                  + (() if config.uses_window and config.uses_linear else ("init_gamma",)))
        defaults = HybridConfig()
        return dataclasses.replace(config, **{name: getattr(defaults, name) for name in unread})

    @property
    def uses_window(self) -> bool:
        return self.mode != "linear_only"

    @property
    def uses_linear(self) -> bool:
        return self.mode != "window_only"

    @property
    def effective_window_size(self) -> int:
        """The window the kernels see: 0 switches the softmax branch off (linear-only)."""
        return self.window_size if self.uses_window else 0

    @property
    def init_window_factor(self) -> float:
        """logit(init_gamma): the stored parameter, -2.1972 for 0.1 as upstream."""
        return math.log(self.init_gamma / (1 - self.init_gamma))
