"""Every GPU benchmark script runs end to end in its --smoke mode (tiny fp32 shapes on CPU).

Device time is scarce: a script that breaks (an import, an argument, a renamed function) should
fail here, not on the GPU. Triton columns are skipped (no interpreter in the subprocess) to keep
this quick; the kernels themselves are tested under the interpreter in tests/kernels.
"""
import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO

SCRIPTS = ["gpu_attention", "gpu_attention_check", "gpu_attention_profile", "gpu_feature_map", "gpu_transfer_step",
           "gpu_decode", "gpu_generate", "gpu_stage_steps"]
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
