"""LoLCATs linearization library: hybrid attention swap, data, training, evaluation, tracking.

Importing it registers saved linearized models with transformers' AutoConfig / AutoModelForCausalLM
(`pipeline.auto`), so `AutoModelForCausalLM.from_pretrained(folder)` loads them.
"""
from . import auto  # noqa: F401  (the registration)
