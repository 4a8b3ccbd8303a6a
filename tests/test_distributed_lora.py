"""lora-recover over several processes (torchrun, gloo on the CPU, FSDP2) against one process, and
activation checkpointing against none."""
import dataclasses
import os
import subprocess
import sys

import pytest
import torch

from pipeline.config import HybridConfig, LoraRecoverConfig, check_params
from pipeline.data import load_prepared, save_prepared
from pipeline.distributed import World
from pipeline.hybrid import HybridAttention, linearize, load_linearized, save_linearized
from pipeline.lora import add_lora, recover
from pipeline.params import ConfigError, read_params
from pipeline.student import load_student
from pipeline.teacher import load_teacher
from tests.conftest import REPO

SCRIPT = REPO / "tests" / "distributed" / "lora_recover.py"
# the gradients of an update are summed in another order (each rank's forwards, then over the ranks) and
# the train loss likewise: fp32 rounding apart, the same numbers. (With the script's two forwards per
# update both orders are a + b, and the runs agree bitwise; the tolerance is for the general case.)
TOLERANCE = {"rtol": 1e-5, "atol": 1e-6}


@pytest.fixture(scope="module")
def inputs(stories_path, data, tmp_path_factory):
    """A saved transfer (untrained hybrid weights) and prepare-data's chunks, as lora-recover reads them."""
    folder = tmp_path_factory.mktemp("inputs")
    torch.manual_seed(0)
    save_linearized(linearize(load_teacher(str(stories_path)), HybridConfig(window_size=16)), folder / "transfer",
                    str(stories_path))
    save_prepared(data, folder / "prepared")
    return folder


def launch(nproc: int, stories_path, inputs, checkpoints, out, **env) -> subprocess.Popen:
    # one thread per process: the same arithmetic whatever the process count
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), **env)
    launcher = ["-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-port", str(29700 + nproc)]
    return subprocess.Popen([sys.executable, *(launcher if nproc > 1 else []), str(SCRIPT), str(stories_path),
                             str(inputs / "transfer"), str(inputs / "prepared"), str(checkpoints), str(out)],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def finished(process: subprocess.Popen) -> str:
    output, _ = process.communicate(timeout=600)
    assert process.returncode == 0, output[-3000:]
    return output


@pytest.fixture(scope="module")
def runs(stories_path, inputs, tmp_path_factory):
    """The script as one plain process and under torchrun with 2, side by side: {nproc: its out folder}."""
    folder = tmp_path_factory.mktemp("runs")
    processes = {n: launch(n, stories_path, inputs, folder / f"checkpoints{n}", folder / f"out{n}") for n in (1, 2)}
    for process in processes.values():
        finished(process)
    return {n: folder / f"out{n}" for n in processes}


def assert_same_run(one: dict, two: dict) -> None:
    assert one["lora"].keys() == two["lora"].keys() and len(one["lora"]) > 0
    for key in one["lora"]:
        torch.testing.assert_close(two["lora"][key], one["lora"][key], **TOLERANCE)
    assert (one["updates"], one["items_seen"]) == (two["updates"], two["items_seen"]) == (4, 12)
    assert [r["update"] for r in one["rows"]] == [r["update"] for r in two["rows"]]
    for a, b in zip(one["rows"], two["rows"]):
        for column in ("train_loss", "val_loss"):
            assert (a[column] is None) == (b[column] is None)
            if a[column] is not None:
                assert b[column] == pytest.approx(a[column], rel=TOLERANCE["rtol"], abs=TOLERANCE["atol"])


def test_two_processes_train_and_save_the_student_of_one(runs, stories_path):
    one, two = (torch.load(runs[n] / "result.pt") for n in (1, 2))
    assert (one["ranks"], two["ranks"]) == (1, 2)
    assert_same_run(one, two)
    # rank 0 saved an ordinary student, which loads and runs as the one-process student does
    ids = torch.arange(1, 65)[None]
    with torch.no_grad():
        logits = [load_student(runs[n] / "student", str(stories_path))(ids).logits for n in (1, 2)]
    torch.testing.assert_close(logits[1], logits[0], **TOLERANCE)


def test_a_killed_rank_resumes_from_rank_0s_checkpoint(runs, stories_path, inputs, tmp_path):
    checkpoints, out = tmp_path / "checkpoints", tmp_path / "out"
    killed = launch(2, stories_path, inputs, checkpoints, out, KILL_AT="1:3")  # after the checkpoint of update 2
    output, _ = killed.communicate(timeout=600)
    assert killed.returncode != 0 and not (out / "result.pt").exists(), output[-2000:]
    assert (checkpoints / "lora.pt").is_file()
    rerun = finished(launch(2, stories_path, inputs, checkpoints, out))
    assert "lora-recover: resuming at update 2 of 4" in rerun  # not trained afresh
    assert_same_run(torch.load(runs[2] / "result.pt"), torch.load(out / "result.pt"))


def test_activation_checkpointing_recomputes_to_the_same_gradients(stories_path, inputs, tmp_path):
    """Bitwise at N = 1 on the CPU: the recompute runs the same ops on the same inputs, and draws the same
    window-dropout coins (the feature maps train too, so their gradients are compared as well)."""
    cfg = LoraRecoverConfig(lr=1e-2, epochs=1, grad_accum=2, batch_size=1, max_updates=3, eval_every=2)
    results = {}
    for checkpointing in (False, True):
        model = add_lora(load_linearized(inputs / "transfer", str(stories_path)), cfg, train_feature_maps=True)
        calls = []
        next(m for m in model.modules() if isinstance(m, HybridAttention)).register_forward_hook(
            lambda *args: calls.append(torch.is_grad_enabled()))
        outcome = recover(model, load_prepared(inputs / "prepared"),
                          dataclasses.replace(cfg, activation_checkpointing=checkpointing),
                          tmp_path / str(checkpointing), lambda metrics, step: None, window_dropout=0.5)
        results[checkpointing] = ({n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad},
                                  outcome.curve_rows(), calls.count(True))
    (weights, rows, forwards), (weights_ckpt, rows_ckpt, forwards_ckpt) = results[False], results[True]
    assert forwards_ckpt == 2 * forwards == 2 * 6  # every training forward of the layer ran again in the backward
    assert rows_ckpt == rows
    assert weights_ckpt.keys() == weights.keys() and all(torch.equal(weights_ckpt[k], weights[k]) for k in weights)


def test_forwards_that_the_processes_cannot_share_are_refused():
    with pytest.raises(ConfigError, match=r"^lora-recover\.grad_accum: 3 chunks per update are 3 forwards .* 2 "
                                          r"processes \(distributed\.nproc_per_node\) cannot share evenly; make "
                                          r"grad_accum / batch_size a multiple of 2 \(e\.g\. grad_accum 4\)"):
        LoraRecoverConfig(grad_accum=3).check_processes(2)
    LoraRecoverConfig(grad_accum=4, batch_size=2).check_processes(2)  # 2 forwards: one each
    LoraRecoverConfig(grad_accum=3).check_processes(1)


def test_check_params_refuses_them_before_any_stage():
    params = read_params(REPO / "params.yaml")
    params["distributed"]["nproc_per_node"] = 2  # params.yaml's grad_accum is 1
    with pytest.raises(ConfigError, match=r"^lora-recover\.grad_accum: 1 chunks per update are 1 forwards"):
        check_params(params)


def test_the_stage_refuses_them_before_any_work(tmp_path):
    """params.yaml's grad_accum 1 under 2 processes: a one-line error from each rank, before the stage
    opens its MLflow run or reads its (here missing) inputs."""
    (tmp_path / "params.yaml").write_text((REPO / "params.yaml").read_text())
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                           "29710", "-m", "stages.lora_recover", "lolcats", "missing", "missing", "student",
                           "metrics.json", "plots"], cwd=tmp_path, capture_output=True, text=True, timeout=600,
                          env={k: v for k, v in dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO)).items()
                               if k != "MLFLOW_TRACKING_URI"})
    assert done.returncode != 0
    assert done.stderr.count("error: lora-recover.grad_accum: 1 chunks per update are 1 forwards") == 2, done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]  # no mlflow.db, no outputs
