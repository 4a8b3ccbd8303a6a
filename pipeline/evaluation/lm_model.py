"""`lolcats`: lm-eval's HFLM over a linearized or student model (../shared/design/lolcats.md §5).

`lm_eval --model lolcats --model_args pretrained=<folder>[,teacher=<source>]` where the folder is
a saved student (`adapter_config.json`: hybrid weights + LoRA, `pipeline.lora.load_student`), a
transfer-only folder (hybrid weights only, `pipeline.hybrid.load_linearized`), or anything else
`load_teacher` reads (a teacher source, evaluated as the plain softmax model). The tokenizer is
the teacher's: `teacher=`, else the source recorded in the folder's `hybrid_config.json`.
In code, `LolcatsLM(pretrained=model, tokenizer=tokenizer)` wraps a model already built.

Padding: HFLM right-pads loglikelihood batches and calls the model without a mask, which the
causal hybrid handles (pads only follow real tokens). Batched generation pads on the left, which
the hybrid refuses with an error; use batch_size 1 for `generate_until` tasks.
"""
import json
from pathlib import Path

import torch
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM  # importing lm_eval.models also registers the stock models
from transformers import PreTrainedModel

from ..hybrid import load_linearized
from ..hybrid.convert import CONFIG_FILE
from ..lora import ADAPTER_CONFIG, load_student
from ..teacher import load_teacher, load_tokenizer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}  # as compute.dtype
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


def load_saved(pretrained: str | Path, teacher: str | None = None, dtype: torch.dtype = torch.float32,
               device: torch.device | str = "cpu") -> tuple[PreTrainedModel, str]:
    """The model a `pretrained=` argument names, and the teacher source its tokenizer comes from."""
    folder = Path(pretrained)
    if not (folder / CONFIG_FILE).is_file():
        source = teacher or str(pretrained)
        return load_teacher(source, dtype, device), source
    source = teacher or json.loads((folder / CONFIG_FILE).read_text())["teacher_source"]
    if (folder / ADAPTER_CONFIG).is_file():
        return load_student(folder, source, dtype, device), source
    return load_linearized(folder, source, dtype, device).eval(), source


@register_model("lolcats")
class LolcatsLM(HFLM):
    def __init__(self, pretrained: str | PreTrainedModel, teacher: str | None = None, tokenizer=None,
                 dtype: str = "float32", device: str | None = None, **kwargs) -> None:
        if not isinstance(pretrained, torch.nn.Module):
            if device is None or (device.startswith("cuda") and not torch.cuda.is_available()):
                device = "cuda" if torch.cuda.is_available() else "cpu"  # the CLI asks for cuda:0 by default
            if dtype not in DTYPES:
                raise ValueError(f"LolcatsLM: dtype {dtype!r} is not one of {sorted(DTYPES)}")
            pretrained, source = load_saved(pretrained, teacher, DTYPES[dtype], device)
            tokenizer = tokenizer or load_tokenizer(source)
        if tokenizer is None:
            raise ValueError("LolcatsLM: an in-memory model needs its tokenizer (tokenizer=...)")
        super().__init__(pretrained=pretrained, tokenizer=tokenizer, **kwargs)
