"""`lolcats`: lm-eval's HFLM over a linearized or student model (../shared/design/lolcats.md §5).

`lm_eval --model lolcats --model_args pretrained=<folder>[,teacher=<source>]` where the folder is
a saved student (hybrid weights + LoRA in `adapter/`, `pipeline.student.load_student`), a transfer-only
folder (hybrid weights only, `pipeline.hybrid.load_linearized`), or anything else `load_teacher` reads
(a teacher source, evaluated as the plain softmax model). A saved folder is handed to HFLM by its path
and loaded through `AutoModelForCausalLM` (`pipeline.auto`), with the LoRA merged; its tokenizer is
the one saved in it, or the teacher's given as `teacher=`.
In code, `LolcatsLM(pretrained=model, tokenizer=tokenizer)` wraps a model already built.

Padding: HFLM right-pads loglikelihood batches and calls the model without a mask, which the
causal hybrid handles (pads only follow real tokens). Batched generation pads on the left, which
the hybrid refuses with an error; use batch_size 1 for `generate_until` tasks.
"""
from pathlib import Path

import torch
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM  # importing lm_eval.models also registers the stock models
from transformers import PreTrainedModel

from ..config import DTYPES
from ..hybrid.convert import is_saved_linearized
from ..teacher import load_tokenizer, resolve_teacher

CHECKOUT = Path(__file__).resolve().parents[2]  # the checkout this code is from


def check_checkout(cwd: Path) -> None:
    """Refuse to run this checkout's code from inside another checkout of the project.

    `lm_eval` (a console script, no cwd on sys.path) finds `pipeline` through the venv's editable
    install, i.e. in the checkout the venv was built in; a venv copied into another checkout would
    silently evaluate with the other checkout's code."""
    if (cwd / "pipeline" / "evaluation" / "lm_model.py").is_file() and cwd.resolve() != CHECKOUT:
        raise ImportError(f"lm_eval --model lolcats: this environment runs the code of {CHECKOUT}, but the current "
                          f"folder {cwd} is another checkout; run `make setup` here (or use that checkout's venv)")


check_checkout(Path.cwd())


@register_model("lolcats")
class LolcatsLM(HFLM):
    def __init__(self, pretrained: str | PreTrainedModel, teacher: str | None = None, tokenizer=None,
                 dtype: str = "float32", device: str | None = None, **kwargs) -> None:
        # HFLM's log_softmax runs in the model's dtype unless told otherwise, and each loglikelihood is
        # a sum of those log-probs: with bf16 weights on a GPU a 4K-token span's sum would keep ~3
        # significant digits. fp32 scores everywhere (a no-op for an fp32 model: the CPU numbers).
        kwargs.setdefault("softmax_dtype", torch.float32)
        if isinstance(pretrained, torch.nn.Module):
            if tokenizer is None:
                raise ValueError("LolcatsLM: an in-memory model needs its tokenizer (tokenizer=...)")
            super().__init__(pretrained=pretrained, tokenizer=tokenizer, **kwargs)
            return
        if device is None or (device.startswith("cuda") and not torch.cuda.is_available()):
            device = "cuda" if torch.cuda.is_available() else "cpu"  # the CLI asks for cuda:0 by default
        if dtype not in DTYPES:
            raise ValueError(f"LolcatsLM: dtype {dtype!r} is not one of {sorted(DTYPES)}")
        if is_saved_linearized(pretrained):  # HFLM loads it by path, through AutoModelForCausalLM
            if teacher is not None:
                kwargs["teacher"] = teacher
                tokenizer = tokenizer or load_tokenizer(teacher)
            path = str(pretrained)
        else:  # a teacher source: the folder or hub id transformers reads
            path = resolve_teacher(teacher or str(pretrained))
        super().__init__(pretrained=path, tokenizer=tokenizer, dtype=DTYPES[dtype], device=device, backend="causal",
                         **kwargs)
