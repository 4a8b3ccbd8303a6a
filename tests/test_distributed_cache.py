"""The teacher-state cache over several processes (torchrun, gloo on the CPU) against one process."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from datasets import DatasetDict

from pipeline.config import CacheTeacherAttnConfig, PrepareDataConfig
from pipeline.data import prepare_alpaca, read_alpaca_rows, save_prepared
from pipeline.distributed import World
from pipeline.teacher import load_teacher, load_tokenizer
from pipeline.teacher_states import CHUNKS_PER_SHARD, MANIFEST, PROGRESS, write_teacher_states
from tests.conftest import REPO, SHARED

SCRIPT = REPO / "tests" / "distributed" / "cache_states.py"
CFG = CacheTeacherAttnConfig(block_size=2)  # what the script writes: 3 blocks of stories260K's 5 layers
TIMING = {"tokens_per_s", "wall_time_s"}
# one thread per process: the same arithmetic whatever the process count, so results can be bitwise;
# the reference is computed in this process, so its threads are held to one as well
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))


@pytest.fixture(scope="module")
def prepared(stories_path, tmp_path_factory) -> tuple[Path, DatasetDict]:
    """40 train and 20 validation chunks of 32 tokens: shards of 16, 16, 8 and 16, 4 chunks, so rank 0 of
    two has 3 shards to write and rank 1 only 2 (an uneven split, and uneven forward counts)."""
    cfg = PrepareDataConfig(seq_len=32, max_train_tokens=32 * 40, max_val_tokens=32 * 20, val_rows=20)
    data = prepare_alpaca(read_alpaca_rows(str(SHARED / "data" / "alpaca" / "train.jsonl")),
                          load_tokenizer(str(stories_path)), cfg).dataset
    assert -(-len(data["train"]) // CHUNKS_PER_SHARD) == 3 and -(-len(data["validation"]) // CHUNKS_PER_SHARD) == 2
    folder = tmp_path_factory.mktemp("prepared") / "prepared"
    save_prepared(data, folder)
    return folder, data


@pytest.fixture(scope="module")
def reference(stories_path, prepared, tmp_path_factory) -> tuple[Path, dict]:
    """One process, no torchrun: the code path of `nproc_per_node: 1`."""
    folder, threads = tmp_path_factory.mktemp("one") / "states", torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        metrics = write_teacher_states(load_teacher(str(stories_path)), prepared[1], CFG, folder)
    finally:
        torch.set_num_threads(threads)
    return folder, metrics


def torchrun(port: int, stories_path, prepared, out: Path, **env: str) -> dict:
    """2 processes of the script; returns rank 0's metrics."""
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                           "--master-port", str(port), str(SCRIPT), str(stories_path), str(prepared[0]), str(out),
                           str(out.parent / "metrics.json")], cwd=REPO, env=dict(ENV, **env), capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return json.loads((out.parent / "metrics.json").read_text())


def assert_same_cache(folder: Path, expected: Path) -> None:
    names = sorted(p.name for p in expected.iterdir())
    assert sorted(p.name for p in folder.iterdir()) == names and PROGRESS not in names
    assert all((folder / name).read_bytes() == (expected / name).read_bytes() for name in names)


def assert_same_metrics(metrics: dict, expected: dict) -> None:
    """The whole job's metrics (every rank's tokens, the validation loss summed in the same order)."""
    assert {k: v for k, v in metrics.items() if k not in TIMING} == {k: v for k, v in expected.items()
                                                                     if k not in TIMING}


def test_shards_are_dealt_round_robin():
    assert [list(World(rank, 2).items(3)) for rank in (0, 1)] == [[0, 2], [1]]
    assert list(World().items(3)) == [0, 1, 2]


@pytest.fixture(scope="module")
def two(stories_path, prepared, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("two") / "states"
    return out, torchrun(29431, stories_path, prepared, out)


def test_two_processes_write_bitwise_the_cache_of_one(reference, two):
    assert_same_cache(two[0], reference[0])
    assert_same_metrics(two[1], reference[1])


def test_a_teacher_sharded_over_two_processes_gives_bitwise_the_states_of_one(stories_path, prepared, reference,
                                                                             tmp_path):
    """FSDP2 gathers the exact weights; rank 1, with 20 forwards to rank 0's 40, must join the other 20."""
    metrics = torchrun(29432, stories_path, prepared, tmp_path / "states", SHARD_TEACHER="1")
    assert_same_cache(tmp_path / "states", reference[0])
    assert_same_metrics(metrics, reference[1])


def test_a_rerun_keeps_each_ranks_written_shards(stories_path, prepared, reference, two, tmp_path):
    """An interrupted run: its progress file, rank 1's shard train-0001 missing, no manifest."""
    folder = tmp_path / "states"
    shutil.copytree(two[0], folder)
    manifest = json.loads((folder / MANIFEST).read_text())
    (folder / PROGRESS).write_text(json.dumps({k: manifest[k] for k in ("config", "chunks", "seq_len", "mode")}))
    (folder / MANIFEST).unlink()
    (folder / "train-0001.safetensors").unlink()
    kept = {p.name: p.stat().st_mtime_ns for p in folder.glob("*.safetensors")}
    torchrun(29433, stories_path, prepared, folder)
    assert {name: (folder / name).stat().st_mtime_ns for name in kept} == kept  # neither rank rewrote its own
    assert (folder / "train-0001.safetensors").is_file()
    assert_same_cache(folder, reference[0])


def test_the_stage_under_torchrun_logs_one_mlflow_run_from_rank_0(stories_path, prepared, reference, tmp_path,
                                                                  monkeypatch):
    """`torchrun --nproc-per-node 2 -m stages.cache_teacher_attn` with the teacher sharded, in a workspace
    of its own: one stage run (rank 0's) under one parent, and the cache and metrics of one process."""
    import yaml

    from pipeline import tracking
    from pipeline.config import TrackingConfig
    from pipeline.params import read_params

    params = read_params(REPO / "params.yaml")
    params["teacher"]["source"] = str(stories_path)
    params["compute"] = {"device": "cpu", "dtype": "float32"}
    params["cache-teacher-attn"] = CFG.to_dict()
    params["distributed"] = {"nproc_per_node": 2, "shard_teacher": True}
    params["tracking"] = {"experiment": "distributed-cache"}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                           "29434", "-m", "stages.cache_teacher_attn", str(prepared[0]), "states", "metrics.json"],
                          cwd=tmp_path, env=dict(ENV, MLFLOW_TRACKING_URI=os.environ["MLFLOW_TRACKING_URI"]),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    client = tracking.mlflow_client(TrackingConfig(experiment="distributed-cache"))
    runs = client.search_runs([client.get_experiment_by_name("distributed-cache").experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    stages = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1 and [r.info.run_name for r in stages] == ["cache-teacher-attn"]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert stages[0].data.metrics["tokens"] == metrics["tokens"]
    assert_same_metrics(metrics, reference[1])
    assert_same_cache(tmp_path / "states", reference[0])
