"""MLflow bookkeeping: the only module that imports mlflow (style rule 12).

One pipeline execution = one parent run; every stage run is nested under it. DVC starts each stage
as its own process, so a stage finds its parent by a key made of the git commit of HEAD, the sha256
of params.yaml and the DVC experiment name (env `DVC_EXP_NAME`, set by `dvc exp run`; "workspace"
otherwise): the newest RUNNING parent with that key is reused, else a new one is created with every
params.yaml value logged under its dotted name. A failing stage marks its run and the parent FAILED;
the last stage of the pipeline closes the parent as FINISHED (`closes_pipeline=True`).
A stage killed outright (SIGKILL, power loss) cannot mark anything, so every stage run records its
process (tags `host`, `pid`, `process_start`) and each new stage first marks KILLED the RUNNING
runs whose process on this host is gone, with their parents: history never shows a dead run as
RUNNING, and no new execution adopts a dead parent.

`StageRun.log_metrics` writes the DVC metrics JSON and logs the same dict to MLflow in one call,
so the two cannot disagree. mlflow takes ~2 s to import, so it is imported only when a run starts.
"""
import contextlib
import hashlib
import json
import logging
import os
import re
import socket
import subprocess
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from .config import TrackingConfig
from .io import atomic_write
from .params import PARAMS_FILE, ParamsBlock, read_params

log = logging.getLogger(__name__)

ARTIFACT_DIR = "mlartifacts"  # beside a sqlite store (git-ignored, as is the store)
WORKSPACE = "workspace"  # the DVC experiment name of a plain `dvc repro`
_METRIC_KEY = re.compile(r"[a-z][a-z0-9_]*")
_BATCH = 100  # MLflow accepts at most 100 params or tags per log_batch call


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mappings as one level with dotted keys: {"a": {"b": 1}} → {"a.b": 1}."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def tracking_uri(tracking: TrackingConfig) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or tracking.tracking_uri


def mlflow_client(tracking: TrackingConfig) -> Any:
    """An `mlflow.MlflowClient` on the store `tracking` names (for stages that read runs back)."""
    import mlflow

    return mlflow.MlflowClient(tracking_uri=tracking_uri(tracking))


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return "unknown"  # not a git checkout (e.g. a copied tree): still track, just unkeyed by code
    return out.stdout.strip()


def dvc_experiment() -> str:
    return os.environ.get("DVC_EXP_NAME") or WORKSPACE


def pipeline_key(commit: str, params_sha256: str, experiment: str) -> str:
    return hashlib.sha256(f"{commit}\n{params_sha256}\n{experiment}".encode()).hexdigest()[:16]


@dataclass
class StageRun:
    """What a stage logs to: its own MLflow run."""

    client: Any  # mlflow.MlflowClient
    run_id: str
    parent_id: str

    def log_metrics(self, metrics: Mapping[str, float], json_path: str | Path) -> None:
        """Write `metrics` to the DVC metrics JSON (atomically) and log the same values to MLflow."""
        bad = [k for k, v in metrics.items()
               if not _METRIC_KEY.fullmatch(k) or isinstance(v, bool) or not isinstance(v, (int, float))]
        if bad:
            raise ValueError(f"metrics must map snake_case names to numbers; bad entries: {bad}")

        def write_then_log(tmp: str) -> None:
            Path(tmp).write_text(json.dumps(dict(metrics), indent=2) + "\n")
            self.log_step_metrics(metrics, step=0)  # before the rename: no JSON without MLflow

        atomic_write(json_path, write_then_log)

    def log_step_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        self._log(self.run_id, metrics, step)

    def log_pipeline_metrics(self, metrics: Mapping[str, float]) -> None:
        """Headline metrics on the parent run: the one row per execution that `mlflow ui` compares."""
        self._log(self.parent_id, metrics, 0)

    def _log(self, run_id: str, metrics: Mapping[str, float], step: int) -> None:
        import mlflow

        now = int(time.time() * 1000)
        entries = [mlflow.entities.Metric(k, float(v), now, step) for k, v in metrics.items()]
        for i in range(0, len(entries), 1000):  # MLflow's per-call limit for metrics
            self.client.log_batch(run_id, metrics=entries[i:i + 1000])

    def set_tag(self, key: str, value: str) -> None:
        """A fact about the stage run that is not a number (e.g. which blocks diverged)."""
        self.client.set_tag(self.run_id, key, value)

    def set_pipeline_tag(self, key: str, value: str) -> None:
        self.client.set_tag(self.parent_id, key, value)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_pipeline_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """On the parent run, which is what a user opens in `mlflow ui`."""
        self.client.log_artifact(self.parent_id, str(path), artifact_path)


@contextlib.contextmanager
def stage_run(stage: str, params: ParamsBlock | Sequence[ParamsBlock] | Mapping[str, Any],
              tracking: TrackingConfig, *, closes_pipeline: bool = False,
              params_file: str | Path = PARAMS_FILE) -> Iterator[StageRun]:
    """An MLflow run named `stage`, nested under this pipeline execution's parent run.

    `params` (blocks or a mapping) are logged flattened with dotted names (`prepare-data.seq_len`).
    If the body raises, the stage run and the parent are marked FAILED and the exception propagates.
    """
    uri = tracking_uri(tracking)
    client = mlflow_client(tracking)
    experiment_id = _experiment_id(client, tracking.experiment, uri)
    commit, exp_name = git_commit(), dvc_experiment()
    _mark_dead_runs_killed(client, experiment_id)
    parent_id = _parent_run(client, experiment_id, Path(params_file), commit, exp_name)
    tags = {"stage": stage, "git_commit": commit, "dvc_experiment": exp_name,
            "mlflow.parentRunId": parent_id, **_process_tags(os.getpid())}
    run_id = client.create_run(experiment_id, run_name=stage, tags=tags).info.run_id
    _log_params(client, run_id, _as_params(params))
    log.info("MLflow run %s (%s) under pipeline run %s at %s", run_id, stage, parent_id, uri)
    start = time.perf_counter()
    try:
        yield StageRun(client, run_id, parent_id)
    except BaseException:
        client.set_terminated(run_id, "FAILED")
        client.set_terminated(parent_id, "FAILED")
        raise
    client.set_terminated(run_id, "FINISHED")
    log.info("%s finished in %.0f s", stage, time.perf_counter() - start)
    if closes_pipeline:
        client.set_terminated(parent_id, "FINISHED")


def _as_params(params: ParamsBlock | Sequence[ParamsBlock] | Mapping[str, Any]) -> dict[str, Any]:
    if isinstance(params, Mapping):
        return flatten(params)
    blocks = [params] if isinstance(params, ParamsBlock) else list(params)
    return flatten({block.BLOCK: block.to_dict() for block in blocks})


def _experiment_id(client: Any, name: str, uri: str) -> str:
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    artifacts = None
    if uri.startswith("sqlite:///"):  # keep artifacts beside the store, inside the repo by default
        store = Path(uri.removeprefix("sqlite:///")).resolve()
        artifacts = (store.parent / ARTIFACT_DIR).as_uri()
    return client.create_experiment(name, artifact_location=artifacts)


def _process_tags(pid: int) -> dict[str, str]:
    """What identifies a process on this machine: its pid and start time (pids are reused)."""
    return {"host": socket.gethostname(), "pid": str(pid), "process_start": repr(psutil.Process(pid).create_time())}


def _alive(tags: Mapping[str, str]) -> bool:
    """Whether the process a run's tags name (on this host) still runs."""
    try:
        started = psutil.Process(int(tags["pid"])).create_time()
    except psutil.NoSuchProcess:
        return False
    return abs(started - float(tags["process_start"])) < 1  # otherwise the pid now belongs to another process


def _mark_dead_runs_killed(client: Any, experiment_id: str) -> None:
    """Stage runs left RUNNING by a process of this host that no longer exists, and their parents: KILLED."""
    host = socket.gethostname()
    for run in client.search_runs([experiment_id], filter_string=f"attributes.status = 'RUNNING' and tags.host = '{host}'",
                                  max_results=1000):
        if _alive(run.data.tags):
            continue
        client.set_terminated(run.info.run_id, "KILLED")
        parent_id = run.data.tags["mlflow.parentRunId"]
        if client.get_run(parent_id).info.status == "RUNNING":
            client.set_terminated(parent_id, "KILLED")
        log.warning("MLflow run %s (%s) was left RUNNING by process %s, which is gone: marked it and its "
                    "pipeline run %s KILLED", run.info.run_id, run.info.run_name, run.data.tags["pid"], parent_id)


def _parent_run(client: Any, experiment_id: str, params_file: Path, commit: str, exp_name: str) -> str:
    content = params_file.read_bytes()
    params_sha = hashlib.sha256(content).hexdigest()
    key = pipeline_key(commit, params_sha, exp_name)
    found = client.search_runs(
        [experiment_id], filter_string=f"tags.pipeline_key = '{key}' and attributes.status = 'RUNNING'",
        order_by=["attributes.start_time DESC"], max_results=1)
    if found:
        return found[0].info.run_id
    tags = {"pipeline_key": key, "git_commit": commit, "dvc_experiment": exp_name,
            "params_sha256": params_sha}
    run_id = client.create_run(experiment_id, run_name=f"pipeline-{exp_name}", tags=tags).info.run_id
    _log_params(client, run_id, flatten(read_params(params_file)))
    client.log_artifact(run_id, str(params_file))
    log.info("new pipeline run %s (key %s)", run_id, key)
    return run_id


def _log_params(client: Any, run_id: str, params: Mapping[str, Any]) -> None:
    import mlflow

    entries = [mlflow.entities.Param(k, str(v)) for k, v in params.items()]
    for i in range(0, len(entries), _BATCH):
        client.log_batch(run_id, params=entries[i:i + _BATCH])
