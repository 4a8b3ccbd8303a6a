"""The models the lm-eval stages score: the teacher, the training-free window-only baseline, students.

../shared/design/lolcats.md §5, §8 (always report the window-only ablation: the window alone can
carry commonsense benchmarks).
"""
import dataclasses
from pathlib import Path

from transformers import PreTrainedModel

from ..config import ComputeConfig, HybridConfig, TeacherConfig
from ..hybrid import linearize
from ..teacher import load_teacher, load_tokenizer
from .lm_model import load_saved

TEACHER = "teacher"
WINDOW_ONLY = "window_only"


def evaluated_model(source: str, teacher: TeacherConfig, attention: HybridConfig,
                    compute: ComputeConfig) -> tuple[PreTrainedModel, object]:
    """(model, tokenizer) for `teacher`, `window_only` (the swap with the linear branch off, no
    training) or a saved student / transfer folder, on `compute`'s device and dtype."""
    dtype, device = compute.torch_dtype, compute.torch_device
    if source == TEACHER:
        model = load_teacher(teacher.source, dtype, device)
    elif source == WINDOW_ONLY:
        model = linearize(load_teacher(teacher.source, dtype, device), dataclasses.replace(attention, mode="window_only"))
    elif Path(source).is_dir():
        model, _ = load_saved(source, teacher.source, dtype, device)
    else:
        raise ValueError(f"lm-eval: model source {source!r} is neither {TEACHER!r}, {WINDOW_ONLY!r} nor a folder")
    return model.eval(), load_tokenizer(teacher.source)
