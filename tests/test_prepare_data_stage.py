"""`python -m stages.prepare_data` end to end on a small slice, with the MLflow store in tmp_path."""
import json
import os
import subprocess
import sys

import pytest
import yaml
from datasets import load_from_disk

from pipeline import tracking
from pipeline.config import TrackingConfig
from pipeline.io import file_digest
from tests.conftest import REPO
from tests.helpers import make_rows, write_jsonl


def run_module(cwd, module: str, *args: str) -> subprocess.CompletedProcess:
    """`python -m stages.MODULE ARGS` as DVC runs it, in `cwd` (its params.yaml), this repo's code."""
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "DVC_EXP_NAME")}
    return subprocess.run([sys.executable, "-m", f"stages.{module}", *args], cwd=cwd,
                          env={**env, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=300)


def prepare(cwd) -> subprocess.CompletedProcess:
    return run_module(cwd, "prepare_data", "data/source.json", "data/prepared", "metrics/prepare_data.json")


def test_prepare_data_stage_writes_dataset_metrics_and_runs(tmp_path, stories_path):
    write_jsonl(tmp_path / "rows.jsonl", make_rows(60))
    params = {
        "teacher": {"source": str(stories_path)},
        "tracking": {"experiment": "e2e", "tracking_uri": "sqlite:///mlflow.db"},
        "prepare-data": {"source": "rows.jsonl", "seq_len": 32, "val_rows": 5,
                         "max_train_tokens": 4 * 32, "max_val_tokens": 100},
    }
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    for done in (run_module(tmp_path, "resolve_source", "data/source.json"), prepare(tmp_path)):
        assert done.returncode == 0, done.stderr

    prepared = load_from_disk(str(tmp_path / "data" / "prepared"))
    assert (len(prepared["train"]), len(prepared["validation"])) == (4, 3)  # 128 / 32, floor(100 / 32)
    assert {len(ids) for ids in prepared["train"]["input_ids"]} == {32}
    metrics = json.loads((tmp_path / "metrics" / "prepare_data.json").read_text())
    assert metrics["train_tokens"] == 128 and metrics["val_chunks"] == 3 and metrics["val_rows"] <= 5

    cfg = TrackingConfig(experiment="e2e", tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    client = tracking.mlflow_client(cfg)
    experiment = client.get_experiment_by_name("e2e")
    runs = {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])}
    assert set(runs) == {"prepare-data", "pipeline-workspace"}
    stage = runs["prepare-data"]
    assert stage.info.status == "FINISHED"
    assert runs["pipeline-workspace"].info.status == "RUNNING"  # a later stage closes the pipeline
    assert stage.data.params["prepare-data.seq_len"] == "32"
    assert stage.data.params["teacher.source"] == str(stories_path)
    assert stage.data.tags["source_sha256"] == file_digest(tmp_path / "rows.jsonl")
    assert stage.data.metrics == metrics
    assert (tmp_path / tracking.ARTIFACT_DIR).is_dir()  # artifacts beside the store



def run_prepare_data(tmp_path, teacher_source: str, rows_text: str) -> tuple[int, str]:
    """The stage as DVC runs it: (exit code, its last line on stderr)."""
    (tmp_path / "rows.jsonl").write_text(rows_text)
    params = {"teacher": {"source": teacher_source}, "tracking": {"experiment": "e2e"},
              "prepare-data": {"source": "rows.jsonl", "seq_len": 32, "val_rows": 5}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    for done in (run_module(tmp_path, "resolve_source", "data/source.json"), prepare(tmp_path)):
        if done.returncode:
            break
    return done.returncode, done.stderr.splitlines()[-1]


def test_an_unknown_teacher_or_a_bad_rows_file_stops_with_one_line_naming_it(tmp_path, stories_path):
    rows = "".join(json.dumps(r) + "\n" for r in make_rows(60))
    assert run_prepare_data(tmp_path, "no/such-model", rows) == (
        2, f"error: teacher.source: 'no/such-model' is neither a local folder (relative to {tmp_path}) nor in the "
           "local hub cache, and the hub is offline (HF_HUB_OFFLINE)")
    rows = json.dumps(make_rows(1)[0]) + "\n" + '{"instruction": 1,\n'
    assert run_prepare_data(tmp_path, str(stories_path), rows) == (
        2, "error: rows.jsonl: not valid JSON, Expecting property name enclosed in double quotes at column 19 (line 2)")


def test_the_source_pin_follows_the_file_and_a_stale_pin_is_refused(tmp_path, stories_path):
    """An edited rows file changes data/source.json (prepare-data's dependency): DVC reruns prepare-data."""
    rows = "".join(json.dumps(r) + "\n" for r in make_rows(60))
    assert run_prepare_data(tmp_path, str(stories_path), rows)[0] == 0
    before = json.loads((tmp_path / "data" / "source.json").read_text())
    assert before == {"source": "rows.jsonl", "sha256": file_digest(tmp_path / "rows.jsonl"), "bytes": len(rows)}
    (tmp_path / "rows.jsonl").write_text(rows[: len(rows) // 2].rsplit("\n", 1)[0] + "\n")  # cut, as the issue did
    assert run_module(tmp_path, "resolve_source", "data/source.json").returncode == 0
    assert json.loads((tmp_path / "data" / "source.json").read_text())["sha256"] != before["sha256"]
    params = yaml.safe_load((tmp_path / "params.yaml").read_text())
    params["prepare-data"]["source"] = "other.jsonl"  # params changed, pin not rewritten: outside DVC
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    done = prepare(tmp_path)
    assert (done.returncode, done.stderr.splitlines()[-1]) == (
        2, "error: prepare-data.source: 'other.jsonl', but data/source.json pins 'rows.jsonl'; run `dvc repro` "
           "(its resolve-source stage writes it anew)")
