"""Every GPU benchmark script runs end to end in its --smoke mode (tiny fp32 shapes on CPU).

Device time is scarce: a script that breaks (an import, an argument, a renamed function) should
fail here, not on the GPU. Triton columns are skipped (no interpreter in the subprocess) to keep
this quick; the kernels themselves are tested under the interpreter in tests/kernels.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO

SCRIPTS = ["gpu_attention", "gpu_attention_check", "gpu_attention_profile", "gpu_feature_map", "gpu_transfer_step",
           "gpu_decode", "gpu_decode_loop", "gpu_decode_profile", "gpu_decode_tiles", "gpu_generate", "gpu_graph_check", "gpu_stage_steps"]
OPTIONS = {"gpu_attention": ["--cuda-graphs"], "gpu_stage_steps": ["--eval-tokens", "100000"]}  # paths that only some GPU runs take


@pytest.mark.parametrize("script", SCRIPTS)
def test_script_writes_its_json_with_the_command(script, tmp_path):
    env = dict(os.environ, TRITON_INTERPRET="0")
    done = subprocess.run([sys.executable, "-m", f"benchmarks.{script}", *OPTIONS.get(script, []), "--smoke",
                           "--out", str(tmp_path)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    result = json.loads((tmp_path / f"{script}.json").read_text())
    assert result["command"].endswith(" ".join([f"benchmarks.{script}", *OPTIONS.get(script, []), "--smoke", "--out",
                                                str(tmp_path)]))
    assert result["environment"]


def test_results_are_named_after_the_device(monkeypatch):
    from benchmarks import gpu_common

    assert gpu_common.results_dir("some/dir", torch.device("cuda")) == Path("some/dir")  # --out wins
    assert gpu_common.results_dir(None, torch.device("cpu")) == REPO / "benchmarks" / "cpu"
    for name, slug in [("NVIDIA H200", "h200"), ("NVIDIA H100 80GB HBM3", "h100"), ("NVIDIA A100-SXM4-80GB", "a100-sxm4-80gb")]:
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device, name=name: name)
        assert gpu_common.results_dir(None, torch.device("cuda")) == REPO / "benchmarks" / slug


PIPELINE_ONLY = ("datasets", "mlflow", "dvc", "lm_eval", "gguf")  # what the bare GPU image lacks (KINDS.md)


@pytest.mark.parametrize("script", [s for s in SCRIPTS if s != "gpu_stage_steps"])  # stage steps run training
def test_kernel_scripts_need_no_pipeline_packages(script, tmp_path):
    """The kernel benchmarks run on the GPU image as it is: `import pipeline` must not pull in datasets & co."""
    for name in PIPELINE_ONLY:  # shadow each package with a module that fails on import
        (tmp_path / f"{name}.py").write_text(f"raise ModuleNotFoundError('{name} is not on the GPU image')\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), str(REPO)]), TRITON_INTERPRET="0")
    done = subprocess.run([sys.executable, "-m", f"benchmarks.{script}", "--help"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


def test_the_decode_kernels_compile_for_hopper_without_spilling(tmp_path):
    """The decode step's kernels compiled for sm_90 by Triton's own ptxas (no GPU needed): a kernel that
    fails to compile for the GPU, or spills, or takes so many registers that few warps stay resident,
    fails here instead of on a lent GPU. The window and state kernels carry the step's memory traffic;
    128 registers a thread still leaves 16 warps a multiprocessor. A window kernel with one head a
    program runs only where the grid has fewer (row, group) programs than GROUP_PROGRAMS, too few for
    registers to limit residency, so only its spills count."""
    env = dict(os.environ, TRITON_INTERPRET="0")
    done = subprocess.run([sys.executable, "-m", "benchmarks.decode_registers", "--models", "llama3-8b", "--out",
                           str(tmp_path)], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    rows = json.loads((tmp_path / "decode_registers.json").read_text())["rows"]
    assert {(row["mode"], row["kernel"]) for row in rows} >= {("terrace", "maps"), ("terrace", "window"),
                                                             ("terrace", "state"), ("window_only", "window")}
    assert {row["heads"] for row in rows if row["kernel"] == "window"} == {1, 4}  # batch 1 and batch 64
    for row in rows:
        assert row["stack_bytes"] == 0, row
        if row["kernel"] == "state" or (row["kernel"] == "window" and row["heads"] > 1):
            assert row["registers"] <= 128, row
