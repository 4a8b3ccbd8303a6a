"""MLflow bookkeeping (pipeline/tracking.py) against a temporary sqlite store."""
import json
import os
import signal
import subprocess
import sys

import pytest

from pipeline import tracking
from pipeline.config import PrepareDataConfig, TrackingConfig
from tests.conftest import REPO

PARAMS = "teacher:\n  source: tiny\nprepare-data:\n  seq_len: 32\n  val_rows: 4\n"


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    """One sqlite store for the module: creating its tables takes ~2 s."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


@pytest.fixture
def setup(store, tmp_path, monkeypatch, request):
    """A params.yaml, a fresh experiment per test, and no tracking env from outside."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("DVC_EXP_NAME", raising=False)
    params = tmp_path / "params.yaml"
    params.write_text(PARAMS)
    cfg = TrackingConfig(experiment=request.node.name, tracking_uri=store)
    return cfg, params, tracking.mlflow_client(cfg)


def runs(client, cfg):
    experiment = client.get_experiment_by_name(cfg.experiment)
    return {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])}


def test_stages_of_one_execution_nest_under_one_parent(setup):
    cfg, params, client = setup
    block = PrepareDataConfig(seq_len=32, val_rows=4)
    with tracking.stage_run("prepare-data", block, cfg, params_file=params) as first:
        pass
    with tracking.stage_run("report", {"report": {"top": 3}}, cfg, params_file=params,
                            closes_pipeline=True) as second:
        pass
    assert first.parent_id == second.parent_id
    found = runs(client, cfg)
    assert set(found) == {"pipeline-workspace", "prepare-data", "report"}
    parent = found["pipeline-workspace"]
    assert parent.info.run_id == first.parent_id
    assert parent.info.status == "FINISHED"  # closed by the last stage
    assert parent.data.params == {"teacher.source": "tiny", "prepare-data.seq_len": "32",
                                  "prepare-data.val_rows": "4"}
    assert parent.data.tags["dvc_experiment"] == "workspace"
    assert parent.data.tags["git_commit"] == tracking.git_commit()
    assert len(parent.data.tags["pipeline_key"]) == 16
    stage = found["prepare-data"]
    assert stage.info.status == "FINISHED"
    assert stage.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert stage.data.tags["stage"] == "prepare-data"
    assert stage.data.params["prepare-data.seq_len"] == "32"
    assert stage.data.params["prepare-data.source"] == block.source
    assert found["report"].data.params == {"report.top": "3"}


def test_a_new_key_or_a_closed_parent_starts_a_new_parent(setup, monkeypatch):
    cfg, params, client = setup
    with tracking.stage_run("a", {}, cfg, params_file=params) as first:
        pass
    monkeypatch.setenv("DVC_EXP_NAME", "exp-1")
    with tracking.stage_run("a", {}, cfg, params_file=params, closes_pipeline=True) as other_exp:
        pass
    monkeypatch.delenv("DVC_EXP_NAME")
    params.write_text(PARAMS + "  max_train_tokens: 64\n")
    with tracking.stage_run("a", {}, cfg, params_file=params) as other_params:
        pass
    assert len({first.parent_id, other_exp.parent_id, other_params.parent_id}) == 3
    with tracking.stage_run("a", {}, cfg, params_file=params) as again:
        pass
    assert again.parent_id == other_params.parent_id  # still RUNNING: reused
    exp_parent = client.get_run(other_exp.parent_id)
    assert exp_parent.data.tags["dvc_experiment"] == "exp-1"
    assert exp_parent.info.status == "FINISHED"


def test_a_raising_stage_fails_its_run_and_the_parent(setup):
    cfg, params, client = setup
    with pytest.raises(RuntimeError, match="boom"):
        with tracking.stage_run("prepare-data", {}, cfg, params_file=params) as run:
            raise RuntimeError("boom")
    assert client.get_run(run.run_id).info.status == "FAILED"
    assert client.get_run(run.parent_id).info.status == "FAILED"
    with tracking.stage_run("prepare-data", {}, cfg, params_file=params) as retry:
        pass
    assert retry.parent_id != run.parent_id  # a failed execution is never reused


def test_metrics_json_equals_logged_metrics(setup, tmp_path):
    cfg, params, client = setup
    metrics = {"train_tokens": 131072, "val_loss": 2.5, "train_response_token_frac": 0.49}
    path = tmp_path / "metrics" / "stage.json"
    with tracking.stage_run("prepare-data", {}, cfg, params_file=params) as run:
        run.log_metrics(metrics, path)
        run.log_step_metrics({"train_loss": 3.0}, step=7)
        with pytest.raises(ValueError, match="bad entries"):
            run.log_metrics({"Val Loss": 1.0, "ok": "x"}, tmp_path / "bad.json")
    written = json.loads(path.read_text())
    assert written == metrics
    logged = client.get_run(run.run_id).data.metrics
    assert {k: logged[k] for k in written} == pytest.approx(written)
    assert [(m.step, m.value) for m in client.get_metric_history(run.run_id, "train_loss")] == [(7, 3.0)]
    assert not (tmp_path / "bad.json").exists()
    assert [p.name for p in path.parent.iterdir()] == ["stage.json"]  # no temp file left


def test_artifacts_land_beside_the_sqlite_store(setup, tmp_path, store):
    cfg, params, client = setup
    note = tmp_path / "note.txt"
    note.write_text("hello")
    with tracking.stage_run("prepare-data", {}, cfg, params_file=params) as run:
        run.log_artifact(note)
    [artifact] = client.list_artifacts(run.run_id)
    assert artifact.path == "note.txt"
    uri = client.get_run(run.run_id).info.artifact_uri
    db_dir = store.removeprefix("sqlite:///").rsplit("/", 1)[0]
    assert uri.startswith(f"file://{db_dir}/{tracking.ARTIFACT_DIR}/")


def test_env_tracking_uri_wins(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///elsewhere.db")
    assert tracking.tracking_uri(TrackingConfig()) == "sqlite:///elsewhere.db"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert tracking.tracking_uri(TrackingConfig()) == "sqlite:///mlflow.db"


def test_flatten_uses_dotted_names():
    assert tracking.flatten({"a": {"b": 1, "c": {"d": None}}, "e": "x"}) == {"a.b": 1, "a.c.d": None, "e": "x"}


def test_a_killed_stage_is_marked_killed_and_its_parent_never_adopted(setup):
    cfg, params, client = setup
    # a stage process that opens its run and is then killed outright: nothing of its own can close it
    stage = subprocess.Popen([sys.executable, "-c", f"""
import time
from pipeline import tracking
from pipeline.config import TrackingConfig
with tracking.stage_run("attention-transfer@lolcats", {{}}, TrackingConfig({cfg.experiment!r}, {cfg.tracking_uri!r}),
                        params_file={str(params)!r}) as run:
    print(run.run_id, run.parent_id, flush=True)
    time.sleep(120)
"""], cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.PIPE, text=True)
    killed_id, dead_parent_id = stage.stdout.readline().split()
    stage.send_signal(signal.SIGKILL)
    stage.wait(timeout=30)
    assert client.get_run(killed_id).info.status == "RUNNING"  # what the issue saw: RUNNING for ever

    with tracking.stage_run("lm-eval-teacher", {}, cfg, params_file=params) as later:
        pass
    assert client.get_run(killed_id).info.status == "KILLED"
    assert client.get_run(dead_parent_id).info.status == "KILLED"
    assert later.parent_id != dead_parent_id  # the same params, but a new execution
    assert client.get_run(later.run_id).data.tags["pid"] == str(os.getpid())
    with tracking.stage_run("report", {}, cfg, params_file=params, closes_pipeline=True):
        pass  # a live stage's run is left alone by the next one
    assert client.get_run(later.run_id).info.status == "FINISHED"
    assert client.get_run(later.parent_id).info.status == "FINISHED"
