"""The projected cost at 8B / 70B / 405B (`pipeline.cost`) and its report table."""
import pytest

from pipeline import cost
from pipeline.report import cost_at_scale
from tests.conftest import REPO

STEPS = {"environment": {"device": "GPU X", "memory_gib": 100.0}, "command": "python -m benchmarks.gpu_stage_steps",
         "tokens_per_step": 4000,
         "steps": {"transfer_step": {"ms": 100.0, "above_start_mib": 10240.0},
                   "lora_step": {"ms": 300.0, "above_start_mib": 30720.0}}}


@pytest.mark.parametrize("model, billions", [("llama3-8b", 8.03), ("llama3.1-70b", 70.55), ("llama3.1-405b", 405.85)])
def test_the_shapes_give_the_published_parameter_counts(model, billions):
    assert cost.SHAPES[model].params / 1e9 == pytest.approx(billions, abs=0.01)


def test_time_scales_with_the_parameters_a_token_passes_and_memory_with_width_times_depth():
    rows = {r["model"]: r for r in cost.project(STEPS)}
    eight, seventy = rows["llama3-8b"], rows["llama3.1-70b"]
    assert eight["attention-transfer_gpu_hours"] == pytest.approx(20e6 * 0.1 / 4000 / 3600)  # measured as is
    assert eight["lora-recover_gpu_hours"] == pytest.approx(20e6 * 0.3 / 4000 / 3600)
    small, large = cost.SHAPES["llama3-8b"], cost.SHAPES["llama3.1-70b"]
    layers_ratio = large.layers * large.layer_params / (small.layers * small.layer_params)
    assert seventy["attention-transfer_gpu_hours"] == pytest.approx(eight["attention-transfer_gpu_hours"] * layers_ratio)
    weights = 2 * large.params / 2**30
    activations = 10.0 * (8192 * 80) / (4096 * 32)  # 10 GiB measured, x 5
    assert seventy["attention-transfer_peak_gib"] == pytest.approx(weights + activations)
    assert seventy["attention-transfer_gpus"] == -(-weights // (100 - activations))
    assert seventy["lora-recover_gpus"] is None  # 150 GiB of activations: more than one 100 GiB GPU holds
    assert eight["gpu_hours"] == pytest.approx(eight["attention-transfer_gpu_hours"] + eight["lora-recover_gpu_hours"])
    assert (eight["reported_gpu_hours"], rows["llama3.1-405b"]["reported_gpu_hours"]) == (6.5, 454.0)


def test_the_report_table_stands_beside_lolcats_figures_or_says_how_to_measure():
    [_, missing] = cost_at_scale(None)
    assert "python -m benchmarks.gpu_stage_steps" in missing[1]
    steps = cost.read_steps(REPO / "benchmarks" / "h200" / "gpu_stage_steps.json")
    heading, text, (_, header, rows) = cost_at_scale(steps)
    assert "NVIDIA H200" in text[1] and "20M tokens per stage" in text[1]
    assert [r[0] for r in rows] == ["llama3-8b", "llama3.1-70b", "llama3.1-405b"]
    assert header[-2:] == ["LoLCATs GPU-h", "LoLCATs reported"] and rows[0][-2] == "6.5"
    assert rows[2][header.index("lora-recover GPUs")] == "—"  # 405B LoRA activations exceed one H200 unsharded
    assert cost.read_steps(REPO / "no-such.json") is None
