"""The whole DVC pipeline, end to end, on a tiny configuration; then MLflow is read back.

stories260K (../shared/models) as teacher, a few 128-token chunks, a couple of lm-eval documents per
task. `dvc repro` runs every stage; `dvc exp run -S` runs an ablation; each execution must be one
finished parent run in MLflow carrying params.yaml and the headline metrics.
"""
import json
import re
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline import tracking
from pipeline.config import TrackingConfig
from tests.conftest import REPO, SHARED

TINY = {
    "teacher": {"source": "../shared/models/stories260K"},
    "attention": {"window_size": 16},
    "tracking": {"experiment": "e2e"},
    "prepare-data": {"seq_len": 128, "val_rows": 20, "max_train_tokens": 512, "max_val_tokens": 256},
    "attention-transfer": {"epochs": 1, "eval_every": 2},
    "lora-recover": {"max_updates": 2, "eval_every": 1},
    "prepare-probes": {"context_lengths": [96], "distances": [40], "docs_per_cell": 2, "position_bins": [0, 32, 96]},
    "lm-eval": {"limit": {"piqa": 2, "arc_easy": 2, "arc_challenge": 2, "hellaswag": 2, "winogrande": 2, "mmlu": 1},
                "mmlu_shots": 0, "ppl_seq_len": 128, "ppl_max_tokens": 256},
}
OUTPUTS = ("dvc.lock", "metrics", "plots", "reports", "data/prepared", "data/teacher_states", "models")


def run(cmd: list[str], cwd: Path, env: dict) -> str:
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, f"{' '.join(cmd)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


@pytest.fixture(scope="module")
def tiny_repo(tmp_path_factory) -> tuple[Path, dict]:
    """A copy of the tracked tree with TINY params, committed, with ../shared beside it."""
    root = tmp_path_factory.mktemp("e2e")
    (root / "shared").symlink_to(SHARED)
    repo = root / "repo"
    files = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    for name in files:
        if (REPO / name).is_file() and not any(name == o or name.startswith(o + "/") for o in OUTPUTS):
            (repo / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, repo / name)
    params = yaml.safe_load((repo / "params.yaml").read_text())
    for block, values in TINY.items():
        params[block].update(values)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "DVC_EXP_NAME")}
    env |= {"PATH": f"{Path(sys.executable).parent}:{env['PATH']}", "DVC_NO_ANALYTICS": "1",
            "GIT_AUTHOR_NAME": "e2e", "GIT_AUTHOR_EMAIL": "e2e@localhost",
            "GIT_COMMITTER_NAME": "e2e", "GIT_COMMITTER_EMAIL": "e2e@localhost"}
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "tiny"]):
        run(cmd, repo, env)
    return repo, env


def parent_runs(repo: Path) -> dict:
    client = tracking.mlflow_client(TrackingConfig(experiment="e2e", tracking_uri=f"sqlite:///{repo / 'mlflow.db'}"))
    experiment = client.get_experiment_by_name("e2e")
    runs = client.search_runs([experiment.experiment_id])
    parents = {r.info.run_id: r for r in runs if "pipeline_key" in r.data.tags}
    children = {pid: [r for r in runs if r.data.tags.get("mlflow.parentRunId") == pid] for pid in parents}
    return {r.data.tags["dvc_experiment"]: (r, children[pid]) for pid, r in parents.items()}


def test_repro_then_an_ablation_give_two_comparable_mlflow_rows(tiny_repo):
    repo, env = tiny_repo
    run([sys.executable, "-m", "dvc", "repro"], repo, env)
    report = json.loads((repo / "metrics" / "report.json").read_text())
    for key in ("teacher_mmlu", "lolcats_mmlu", "no_transfer_avg_zero_shot", "window_only_piqa",
                "lolcats_ppl_at_0", "no_transfer_ppl_at_0", "lolcats_wikitext2_ppl", "wall_time_s_total",
                "lolcats_linear_branch_gain", "lolcats_linear_branch_gain_loss_stderr", "window_only_passkey_acc_beyond"):
        assert key in report, key
    assert re.search(r"\| mmlu \(acc\) +\|", (repo / "reports" / "report.md").read_text())
    assert (repo / "reports" / "report.html").read_text().count("data:image/png;base64") == 6

    run([sys.executable, "-m", "dvc", "exp", "run", "-n", "window8", "-S", "attention.window_size=8"], repo, env)
    rows = parent_runs(repo)
    assert set(rows) == {"workspace", "window8"}
    for name, window in (("workspace", "16"), ("window8", "8")):
        parent, stages = rows[name]
        assert parent.info.status == "FINISHED"
        assert parent.data.params["attention.window_size"] == window
        assert parent.data.params["prepare-data.seq_len"] == "128"
        assert "lolcats_avg_zero_shot" in parent.data.metrics and "teacher_mmlu" in parent.data.metrics
        assert {"report", "lm-eval@lolcats"} <= {s.info.run_name for s in stages}
        # what a user opens is the parent: the report and its figures are there, and why a gap
        # closure is missing (the tiny run's teacher and baseline are within each other's stderr)
        client = tracking.mlflow_client(TrackingConfig(experiment="e2e", tracking_uri=f"sqlite:///{repo / 'mlflow.db'}"))
        assert {"report.html", "report.md", "figures"} <= {a.path for a in client.list_artifacts(parent.info.run_id)}
        assert "gap_closure_undetermined" in parent.data.tags and "gap_mmlu" in parent.data.metrics
        assert all(s.info.status == "FINISHED" for s in stages)
    # the ablation reran only what the window changes: never the teacher's data, cache or scores
    assert "lm-eval-teacher" in {s.info.run_name for s in rows["workspace"][1]}  # runs are named as DVC names stages
    ablation_stages = {s.info.run_name for s in rows["window8"][1]}
    assert not ablation_stages & {"prepare-data", "cache-teacher-attn", "lm-eval-teacher"}
    assert {"attention-transfer@lolcats", "lm-eval-window-only"} <= ablation_stages
    # linear_only reads no window param (data/attention/linear_only.json is unchanged): none of its stages reran
    assert not {s for s in ablation_stages if s.endswith("@linear_only")}


def test_a_bad_late_param_stops_before_any_stage_and_deletes_nothing(tiny_repo):
    """DVC removes a stage's outputs before its command runs: check-params, upstream of every stage,
    must fail first, so a mistake in lm-eval costs neither training outputs nor earlier scores."""
    repo, env = tiny_repo
    kept = [repo / "models" / "lolcats" / "transfer" / "hybrid_attention.safetensors",
            repo / "metrics" / "attention_transfer" / "lolcats.json", repo / "metrics" / "lm_eval" / "teacher.json"]
    before = {path: path.read_bytes() for path in kept}
    params = (repo / "params.yaml").read_text()
    assert params.count("batch_size: 4") == 1  # lm-eval's
    (repo / "params.yaml").write_text(params.replace("batch_size: 4", "batch_size: 0"))
    try:
        done = subprocess.run([sys.executable, "-m", "dvc", "repro"], cwd=repo, env=env, capture_output=True,
                              text=True, timeout=300)
    finally:
        (repo / "params.yaml").write_text(params)
    assert done.returncode != 0
    assert "error: lm-eval.batch_size: must be at least 1" in done.stdout + done.stderr
    assert "Running stage 'check-params'" in done.stdout and "Running stage 'lm-eval" not in done.stdout
    assert {path: path.read_bytes() for path in kept} == before
