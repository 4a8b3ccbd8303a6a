"""The LoLCATs hybrid attention as peft-style roles: config (what), attention (the layer), convert (surgery)."""
from .attention import HybridAttention, hybrid_attention_forward
from .cache import HybridCache, HybridCacheLayer
from .config import HybridConfig
from .convert import (ATTN_IMPLEMENTATION, attention_modules, hybrid_config, hybrid_state_dict, linearize,
                      linearized_digest, load_linearized, save_linearized)
from .feature_maps import FEATURE_MAPS

__all__ = ["ATTN_IMPLEMENTATION", "FEATURE_MAPS", "HybridAttention", "HybridCache", "HybridCacheLayer", "HybridConfig", "attention_modules", "hybrid_config",
           "hybrid_attention_forward", "hybrid_state_dict", "linearize", "linearized_digest", "load_linearized", "save_linearized"]
