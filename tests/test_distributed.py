"""Attention transfer over several processes (torchrun, gloo on the CPU) against one process."""
import os
import subprocess
import sys

import pytest
import torch

from pipeline.config import CacheTeacherAttnConfig
from pipeline.distributed import World
from pipeline.teacher import load_teacher
from pipeline.teacher_states import write_teacher_states
from tests.conftest import REPO

SCRIPT = REPO / "tests" / "distributed" / "transfer_blocks.py"


@pytest.fixture(scope="module")
def states(stories_path, data, tmp_path_factory):
    folder = tmp_path_factory.mktemp("states")
    write_teacher_states(load_teacher(str(stories_path)), data, CacheTeacherAttnConfig(block_size=1), folder)
    return folder  # 5 blocks, one per layer


def torchrun(nproc: int, stories_path, states, checkpoints, out, **env) -> subprocess.Popen:
    # one thread per process: the same arithmetic whatever the process count, so results can be bitwise
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), **env)
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
                             "--master-port", str(29400 + nproc), str(SCRIPT), str(stories_path), str(states),
                             str(checkpoints), str(out)], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def finished(process: subprocess.Popen) -> str:
    output, _ = process.communicate(timeout=600)
    assert process.returncode == 0, output[-3000:]
    return output


def test_blocks_are_dealt_round_robin():
    assert [World(rank, 2).owns(b) for rank in (0, 1) for b in range(5)] == [True, False, True, False, True,
                                                                             False, True, False, True, False]


def test_two_processes_give_bitwise_the_feature_maps_and_results_of_one(stories_path, states, tmp_path):
    for nproc in (1, 2):
        finished(torchrun(nproc, stories_path, states, tmp_path / f"checkpoints{nproc}", tmp_path / f"out{nproc}.pt"))
    one, two = (torch.load(tmp_path / f"out{n}.pt") for n in (1, 2))
    assert (one["ranks"], two["ranks"]) == (1, 2)
    assert one["weights"].keys() == two["weights"].keys()
    assert all(torch.equal(one["weights"][k], two["weights"][k]) for k in one["weights"])
    assert one["rows"] == two["rows"] and one["updates"] == two["updates"] and min(one["updates"]) > 0
    # each rank checkpointed only its own blocks, into the one folder
    assert sorted(p.name for p in (tmp_path / "checkpoints2").iterdir()) == [f"block_{b:03d}.pt" for b in range(5)]


def test_a_killed_rank_resumes_from_its_own_checkpoints(stories_path, states, tmp_path):
    reference = tmp_path / "reference.pt"
    finished(torchrun(2, stories_path, states, tmp_path / "uninterrupted", reference))
    checkpoints, out = tmp_path / "killed", tmp_path / "out.pt"
    killed = torchrun(2, stories_path, states, checkpoints, out, KILL_AT="1:3")  # rank 1, in its first block
    output, _ = killed.communicate(timeout=600)
    assert killed.returncode != 0 and not out.exists(), output[-2000:]
    assert (checkpoints / "block_001.pt").is_file()  # what rank 1 had saved before it died
    rerun = finished(torchrun(2, stories_path, states, checkpoints, out))
    assert "block 1 (layers 1-1): resuming at update 2 of 6" in rerun  # not trained afresh
    resumed, expected = torch.load(out), torch.load(reference)
    assert all(torch.equal(resumed["weights"][k], expected["weights"][k]) for k in expected["weights"])
    assert resumed["rows"] == expected["rows"]


def stage_workspace(work, stories_path, data) -> dict:
    """A folder to run `stages.attention_transfer` in: its params.yaml (stories260K, an MLflow store of its
    own), the attention config and the prepared data; returns the params."""
    import json

    import yaml

    from pipeline.config import HybridConfig
    from pipeline.data import save_prepared
    from pipeline.params import read_params

    params = read_params(REPO / "params.yaml")
    params["teacher"]["source"] = str(stories_path)
    params["compute"] = {"device": "cpu", "dtype": "float32"}
    params["attention-transfer"].update(epochs=1, eval_every=2)
    params["tracking"] = {"experiment": "distributed", "tracking_uri": f"sqlite:///{work}/mlflow.db"}
    work.mkdir()
    (work / "params.yaml").write_text(yaml.safe_dump(params))
    (work / "attention.json").write_text(json.dumps(HybridConfig(window_size=16).to_dict()))
    save_prepared(data, work / "prepared")
    return params


def transfer_stage(launcher: list[str], work, states) -> list[str]:
    return [*launcher, "-m", "stages.attention_transfer", "lolcats", "attention.json", "prepared", str(states),
            "transfer", "metrics.json", "plots"]


STAGE_ENV = {k: v for k, v in dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO)).items()
             if k != "MLFLOW_TRACKING_URI"}


def mlflow_runs(params: dict) -> list:
    from pipeline import tracking
    from pipeline.config import TrackingConfig

    client = tracking.mlflow_client(TrackingConfig(**params["tracking"]))
    experiment = client.get_experiment_by_name("distributed")
    return client.search_runs([experiment.experiment_id]) if experiment else []


def test_the_stage_under_torchrun_logs_one_mlflow_run_and_writes_what_one_process_writes(stories_path, data, states,
                                                                                        tmp_path):
    """`torchrun --nproc-per-node 2 -m stages.attention_transfer` in a workspace of its own: one parent run,
    one stage run (rank 0's), and the metrics and saved weights of the same stage run alone."""
    import json

    from safetensors.torch import load_file

    outputs = {}
    for nproc in (1, 2):
        work = tmp_path / f"run{nproc}"
        params = stage_workspace(work, stories_path, data)
        launcher = ([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29410"]
                    if nproc == 2 else [sys.executable])
        done = subprocess.run(transfer_stage(launcher, work, states), cwd=work, capture_output=True, text=True,
                              timeout=600, env=STAGE_ENV)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
        runs = mlflow_runs(params)
        parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
        stages = [r.info.run_name for r in runs if "mlflow.parentRunId" in r.data.tags]
        assert len(parents) == 1 and stages == ["attention-transfer@lolcats"], (nproc, stages)
        outputs[nproc] = (json.loads((work / "metrics.json").read_text()),
                          load_file(next((work / "transfer").glob("*.safetensors"))))
    (one, one_weights), (two, two_weights) = outputs[1], outputs[2]
    timing = {"tokens_per_s", "wall_time_s"}
    assert {k: v for k, v in one.items() if k not in timing} == {k: v for k, v in two.items() if k not in timing}
    assert one_weights.keys() == two_weights.keys()
    assert all(torch.equal(one_weights[k], two_weights[k]) for k in one_weights)


def test_a_rank_that_dies_marks_the_stage_run_and_its_pipeline_run_failed(stories_path, data, states, tmp_path):
    """Rank 1 SIGKILLed while the stage trains: torchrun stops rank 0 (SIGTERM), which marks its MLflow
    run and the parent FAILED on the way out rather than leaving them RUNNING."""
    import time

    import psutil

    work = tmp_path / "killed"
    params = stage_workspace(work, stories_path, data)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29411"]
    process = subprocess.Popen(transfer_stage(launcher, work, states), cwd=work, env=STAGE_ENV, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 300
    while not any(r.info.run_name == "attention-transfer@lolcats" for r in mlflow_runs(params)):
        assert process.poll() is None and time.monotonic() < deadline, "the stage ended before its MLflow run began"
        time.sleep(0.2)
    rank_1 = next(p for p in psutil.Process(process.pid).children(recursive=True) if p.environ().get("RANK") == "1")
    rank_1.kill()
    output, _ = process.communicate(timeout=300)
    assert process.returncode != 0 and not (work / "metrics.json").exists(), output[-3000:]
    status = {("stage" if "mlflow.parentRunId" in r.data.tags else "parent"): r.info.status for r in mlflow_runs(params)}
    assert status == {"stage": "FAILED", "parent": "FAILED"}, output[-3000:]
