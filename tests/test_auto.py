"""A saved linearized model loads as itself through transformers' Auto classes, from any folder (pipeline/auto.py)."""
import json
import os
import subprocess
import sys

import pytest
import torch

from pipeline.config import LoraRecoverConfig
from pipeline.hybrid import HybridCache, HybridConfig, linearize, load_linearized, save_linearized
from pipeline.lora import add_lora
from pipeline.student import save_student
from pipeline.params import ConfigError
from pipeline.teacher import load_teacher, teacher_reference
from tests.conftest import REPO

IDS = [[1, 400, 300, 200, 100, 50, 60, 70, 80, 90, 100, 110, 120, 130]]  # past the window of 8

# Run in a fresh process from another working folder: what a user of the saved folder does.
LOAD = """
import sys, torch
if sys.argv[2] == "import":
    import pipeline
from transformers import AutoModelForCausalLM, AutoTokenizer
try:
    model = AutoModelForCausalLM.from_pretrained(sys.argv[1])
except ValueError as e:
    print("REFUSED", " ".join(str(e).split()))
    raise SystemExit(0)
ids = torch.tensor(%s)
with torch.no_grad():
    torch.save(model(ids).logits, "logits.pt")
out = model.generate(ids, max_new_tokens=6, do_sample=False, return_dict_in_generate=True)
again = model.generate(ids, max_new_tokens=6, do_sample=False, use_cache=False)
print(type(model).__name__, type(out.past_key_values).__name__, out.sequences.tolist() == again.tolist(),
      type(AutoTokenizer.from_pretrained(sys.argv[1])).__name__)
""" % IDS


def run_elsewhere(folder, mode: str, cwd) -> str:
    env = {**os.environ, "PYTHONPATH": str(REPO)}  # no checkout on the path but this one
    done = subprocess.run([sys.executable, "-c", LOAD, str(folder), mode], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def student(stories_path, tmp_path_factory):
    """A saved student with a trained-looking adapter, and its logits in this process (LoRA unmerged)."""
    model = add_lora(linearize(load_teacher(str(stories_path)), HybridConfig(window_size=8)), LoraRecoverConfig(),
                     train_feature_maps=False)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    folder = tmp_path_factory.mktemp("saved") / "student"
    save_student(model, folder, str(stories_path))
    with torch.no_grad():
        return folder, model.eval()(torch.tensor(IDS)).logits


def test_automodel_loads_the_student_from_another_folder_after_the_import(student, tmp_path):
    folder, logits = student
    line = run_elsewhere(folder, "import", tmp_path)
    assert line == "LlamaForCausalLM HybridCache True LlamaTokenizer"  # generate() defaults to the hybrid cache
    assert torch.allclose(torch.load(tmp_path / "logits.pt"), logits, atol=1e-4)  # LoRA merged: same model


def test_without_the_import_transformers_refuses_the_folder_and_never_loads_the_teacher(student, tmp_path):
    folder, _ = student
    line = run_elsewhere(folder, "no-import", tmp_path)
    assert line.startswith("REFUSED") and "model type `lolcats`" in line
    assert not (tmp_path / "logits.pt").exists()
    from peft import AutoPeftModelForCausalLM
    with pytest.raises(ValueError, match="adapter_config.json"):  # peft finds no adapter at the top either
        AutoPeftModelForCausalLM.from_pretrained(str(folder))


def test_unmerged_on_request_and_a_merged_model_is_not_saved_without_its_lora(student, tmp_path):
    import pipeline  # noqa: F401  (the registration)
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    folder, logits = student
    unmerged = AutoModelForCausalLM.from_pretrained(folder, merge_lora=False)
    assert isinstance(unmerged, PeftModel)
    with torch.no_grad():
        assert torch.allclose(unmerged(torch.tensor(IDS)).logits, logits, atol=1e-6)
    merged = AutoModelForCausalLM.from_pretrained(folder)
    with pytest.raises(ValueError, match="LoRA is merged"):
        save_linearized(merged, tmp_path / "lost", json.loads((folder / "config.json").read_text())["teacher_source"])
    with pytest.raises(TypeError, match="does not take"):
        AutoModelForCausalLM.from_pretrained(folder, output_loading_info=True)
    with pytest.raises(ValueError, match="split the model"):
        AutoModelForCausalLM.from_pretrained(folder, device_map="auto")


def test_a_folder_teacher_is_named_by_its_absolute_path_and_checked_by_content(stories_path, tmp_path, monkeypatch):
    import shutil
    teacher = tmp_path / "teacher"
    shutil.copytree(stories_path, teacher)
    model = linearize(load_teacher(str(teacher)), HybridConfig(window_size=8))
    monkeypatch.chdir(tmp_path)
    save_linearized(model, "saved", "teacher")  # a relative source: stored absolute
    config = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert config["teacher_source"] == str(teacher) and config == {**config, **teacher_reference(str(teacher))}
    monkeypatch.chdir(REPO)
    load_linearized(tmp_path / "saved")  # from another folder: the path holds
    with open(teacher / "config.json", "a") as f:
        f.write("\n")  # not the weights it was trained on any more
    with pytest.raises(ConfigError, match="no longer holds the weights"):
        load_linearized(tmp_path / "saved")
    shutil.rmtree(teacher)
    with pytest.raises(ConfigError, match="teacher folder .* is gone"):
        load_linearized(tmp_path / "saved")
    assert teacher_reference("SmolLM2-135M-Instruct") == {"teacher_source": "SmolLM2-135M-Instruct"}


def test_a_folder_of_the_old_layout_gets_a_clear_error(tmp_path):
    (tmp_path / "hybrid_config.json").write_text("{}")
    with pytest.raises(ConfigError, match="not a saved linearized model .*hybrid_config.json"):
        load_linearized(tmp_path)


def test_generate_without_a_cache_gets_the_hybrid_cache(stories_path):
    model = linearize(load_teacher(str(stories_path)), HybridConfig(window_size=8))
    out = model.generate(torch.tensor(IDS), max_new_tokens=3, do_sample=False, return_dict_in_generate=True)
    assert isinstance(out.past_key_values, HybridCache)
