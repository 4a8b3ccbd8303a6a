"""The student on disk: `save_student`, and `load_saved`, the one loader of every saved folder (§3, §5).

A student folder holds what `save_linearized` writes (config.json, hybrid weights, tokenizer) and the
adapter (peft `save_pretrained`) in `adapter/`; a transfer-only folder (attention-transfer's output)
has no `adapter/`. `load_saved` reads either, or a teacher source, the way lm-eval's `pretrained=`
names them; `AutoModelForCausalLM.from_pretrained(folder)` does the same after `import pipeline`.
Nothing here imports the training loop, so evaluating a model does not depend on how it was trained.
"""
import json
from pathlib import Path

import torch
from peft import PeftModel
from transformers import PreTrainedModel

from .hybrid import load_linearized, save_linearized
from .hybrid.convert import is_saved_linearized, saved_config
from .io import atomic_dir
from .teacher import load_teacher, teacher_id

ADAPTER_CONFIG = "adapter_config.json"  # peft's name for it
ADAPTER_DIR = "adapter"  # one level down: transformers follows an adapter_config.json at the top to the teacher


def save_student(model: PeftModel, folder: str | Path, teacher_source: str) -> None:
    with atomic_dir(folder) as tmp:
        model.save_pretrained(tmp / ADAPTER_DIR)
        _stable_adapter_config(tmp / ADAPTER_DIR / ADAPTER_CONFIG, teacher_source)
        save_linearized(model.get_base_model(), tmp, teacher_source)


def _stable_adapter_config(path: Path, teacher_source: str) -> None:
    """The same weights give the same bytes: peft writes `target_modules` from a set, in an order that
    changes from process to process (string hashing is salted), and `base_model_name_or_path` as the
    teacher's load path (for the embedded one, a cache folder of this machine); it becomes the teacher's
    stable id."""
    config = json.loads(path.read_text())
    if isinstance(config.get("target_modules"), list):
        config["target_modules"] = sorted(config["target_modules"])
    config["base_model_name_or_path"] = teacher_id(teacher_source)
    path.write_text(json.dumps(config, indent=2, sort_keys=True))  # peft's own layout


def load_student(folder: str | Path, teacher_source: str | None = None, dtype: torch.dtype | str | None = None,
                 device: torch.device | str = "cpu") -> PeftModel:
    """The linearized teacher with its saved hybrid weights and LoRA adapter, ready for inference.
    After `merge_and_unload()` the LoRA lives in the teacher's weights, which `save_linearized` does not
    write: save the peft model (`save_student`) instead."""
    base = load_linearized(folder, teacher_source, dtype, device)
    return PeftModel.from_pretrained(base, str(Path(folder) / ADAPTER_DIR)).eval()


def load_saved(pretrained: str | Path, teacher: str | None = None, dtype: torch.dtype = torch.float32,
               device: torch.device | str = "cpu") -> tuple[PreTrainedModel, str]:
    """The model a `pretrained=` argument names, and the teacher source its tokenizer comes from."""
    folder = Path(pretrained)
    if not is_saved_linearized(folder):
        source = teacher or str(pretrained)
        return load_teacher(source, dtype, device), source
    source = teacher or saved_config(folder)["teacher_source"]
    if (folder / ADAPTER_DIR).is_dir():
        return load_student(folder, teacher, dtype, device), source
    return load_linearized(folder, teacher, dtype, device).eval(), source
