"""The models the lm-eval stages score: the teacher, the training-free window-only baseline, students.

../shared/design/lolcats.md §5, §8 (always report the window-only ablation: the window alone can
carry commonsense benchmarks).
"""
from pathlib import Path

from transformers import PreTrainedModel

from ..config import TEACHER, ComputeConfig, TeacherConfig, read_scoped_attention
from ..hybrid import linearize
from ..teacher import load_teacher, load_tokenizer
from ..student import load_saved


def evaluated_model(source: str, teacher: TeacherConfig, compute: ComputeConfig) -> tuple[PreTrainedModel, object]:
    """(model, tokenizer) for `teacher`, an attention config file (the swap with no training: check-params'
    `window_only.json` is the window-only baseline) or a saved student / transfer folder, on `compute`'s
    device and dtype."""
    dtype, device = compute.torch_dtype, compute.torch_device
    if source == TEACHER:
        model = load_teacher(teacher.source, dtype, device)
    elif source.endswith(".json"):
        model = linearize(load_teacher(teacher.source, dtype, device), read_scoped_attention(source))
    elif Path(source).is_dir():
        model, _ = load_saved(source, teacher.source, dtype, device)
    else:
        raise ValueError(f"lm-eval: model source {source!r} is neither {TEACHER!r}, an attention .json nor a folder")
    return model.eval(), load_tokenizer(teacher.source)
