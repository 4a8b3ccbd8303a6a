"""params.yaml ↔ pipeline/config.py: defaults agree, every check fails naming its dotted key."""
import dataclasses
import os
import subprocess
import sys
import typing

import pytest
import yaml

from pipeline import config
from pipeline.evaluation.suite import BENCHMARKS
from pipeline.params import ConfigError, ParamsBlock, build_block, read_params
from tests.conftest import REPO

ENTRY_BLOCKS = {"variants"}  # named entries of one dataclass (params.build_entry): no single default
CLASSES = [getattr(config, name) for name in config.__all__]
BLOCKS = [cls for cls in CLASSES if issubclass(cls, ParamsBlock) and hasattr(cls, "BLOCK")
          and cls.BLOCK not in ENTRY_BLOCKS]  # TrainingConfig is a base without a block of its own

# one case per `require` check: (block class, bad field values, dotted key the message must start with)
BAD_VALUES = [
    (config.TeacherConfig, {"source": "  "}, "teacher.source"),
    (config.HybridConfig, {"window": "diagonal"}, "attention.window"),
    (config.HybridConfig, {"feature_map": "nope"}, "attention.feature_map"),
    (config.HybridConfig, {"window_size": 0}, "attention.window_size"),
    (config.HybridConfig, {"feature_dim": -1}, "attention.feature_dim"),
    (config.HybridConfig, {"init_gamma": 1.0}, "attention.init_gamma"),
    (config.HybridConfig, {"init_gamma": 0.0}, "attention.init_gamma"),
    (config.TrackingConfig, {"experiment": ""}, "tracking.experiment"),
    (config.TrackingConfig, {"tracking_uri": " "}, "tracking.tracking_uri"),
    (config.PrepareDataConfig, {"source": ""}, "prepare-data.source"),
    (config.PrepareDataConfig, {"seq_len": 1}, "prepare-data.seq_len"),
    (config.PrepareDataConfig, {"val_rows": 0}, "prepare-data.val_rows"),
    (config.PrepareDataConfig, {"seq_len": 64, "max_train_tokens": 63}, "prepare-data.max_train_tokens"),
    (config.PrepareDataConfig, {"seq_len": 64, "max_val_tokens": 10}, "prepare-data.max_val_tokens"),
    (config.CacheTeacherAttnConfig, {"block_size": 0}, "cache-teacher-attn.block_size"),
    (config.CacheTeacherAttnConfig, {"max_cache_gb": 0.0}, "cache-teacher-attn.max_cache_gb"),
    (config.CacheTeacherAttnConfig, {"batch_size": 0}, "cache-teacher-attn.batch_size"),
    (config.ComputeConfig, {"device": "gpu"}, "compute.device"),
    (config.AttentionTransferConfig, {"grad_accum": 8, "batch_size": 3}, "attention-transfer.batch_size"),
    (config.LoraRecoverConfig, {"batch_size": 0}, "lora-recover.batch_size"),
    (config.AttentionTransferConfig, {"lr": 0.0}, "attention-transfer.lr"),
    (config.AttentionTransferConfig, {"weight_decay": -0.1}, "attention-transfer.weight_decay"),
    (config.AttentionTransferConfig, {"epochs": -1}, "attention-transfer.epochs"),
    (config.AttentionTransferConfig, {"grad_accum": 0}, "attention-transfer.grad_accum"),
    (config.AttentionTransferConfig, {"eval_every": 0}, "attention-transfer.eval_every"),
    (config.AttentionTransferConfig, {"max_updates": -1}, "attention-transfer.max_updates"),
    (config.AttentionTransferConfig, {"plateau_patience": -1}, "attention-transfer.plateau_patience"),
    (config.AttentionTransferConfig, {"plateau_factor": 1.0}, "attention-transfer.plateau_factor"),
    (config.AttentionTransferConfig, {"min_lr": 0.1}, "attention-transfer.min_lr"),
    (config.AttentionTransferConfig, {"max_unimproved_frac": 1.5}, "attention-transfer.max_unimproved_frac"),
    (config.AttentionTransferConfig, {"mse_factor": -1.0}, "attention-transfer.mse_factor"),
    (config.AttentionTransferConfig, {"xent_factor": -1.0}, "attention-transfer.xent_factor"),
    (config.AttentionTransferConfig, {"mse_factor": 0.0, "xent_factor": 0.0}, "attention-transfer.mse_factor"),
    (config.LoraRecoverConfig, {"lr": -1.0}, "lora-recover.lr"),
    (config.LoraRecoverConfig, {"rank": 0}, "lora-recover.rank"),
    (config.LoraRecoverConfig, {"alpha": 0}, "lora-recover.alpha"),
    (config.LoraRecoverConfig, {"dropout": 1.0}, "lora-recover.dropout"),
    (config.LoraRecoverConfig, {"target_modules": []}, "lora-recover.target_modules"),
]

# what build_block itself rejects: types, choices, unknown keys (raw params.yaml values)
BAD_PARAMS = [
    (config.TeacherConfig, {"dtype": "float32"}, "teacher.dtype: unknown key; valid keys are"),  # now compute.dtype
    (config.ComputeConfig, {"dtype": "float16"}, "compute.dtype: expected one of ['auto', 'float32', 'bfloat16']"),
    (config.CacheTeacherAttnConfig, {"states": "ram"}, "cache-teacher-attn.states: expected one of"),
    (config.TeacherConfig, {"revision": "main"}, "teacher.revision: unknown key; valid keys are"),
    (config.HybridConfig, {"mode": "softmax"}, "attention.mode: expected one of"),
    (config.HybridConfig, {"feature_init": "zeros"}, "attention.feature_init: expected one of"),
    (config.HybridConfig, {"backend": "cuda"}, "attention.backend: expected one of"),
    (config.HybridConfig, {"window_size": "64"}, "attention.window_size: expected an integer"),
    (config.HybridConfig, {"init_gamma": "0.1"}, "attention.init_gamma: expected a number"),
    (config.TrackingConfig, {"experiment": 3}, "tracking.experiment: expected a string"),
    (config.PrepareDataConfig, {"seq_len": 1024.0}, "prepare-data.seq_len: expected an integer"),
    (config.PrepareDataConfig, {"val_rows": True}, "prepare-data.val_rows: expected an integer"),
    (config.PrepareDataConfig, {"max_train_tokens": "all"}, "prepare-data.max_train_tokens: expected an integer"),
    (config.PrepareDataConfig, {"shuffle": True}, "prepare-data.shuffle: unknown key; valid keys are"),
]


def case_id(case) -> str:
    return f"{case[0].BLOCK}-{'-'.join(f'{k}={v!r}' for k, v in case[1].items())}"


@pytest.mark.parametrize("cls, values, key", BAD_VALUES, ids=map(case_id, BAD_VALUES))
def test_each_check_names_its_dotted_key(cls, values, key):
    with pytest.raises(ConfigError) as caught:
        cls(**values)
    assert str(caught.value).startswith(f"{key}: ")
    with pytest.raises(ConfigError, match=f"^{key}: "):  # the same through params.yaml reading
        build_block(cls, {cls.BLOCK: values})


@pytest.mark.parametrize("cls, raw, message", BAD_PARAMS, ids=map(case_id, BAD_PARAMS))
def test_types_choices_and_unknown_keys_are_rejected(cls, raw, message):
    with pytest.raises(ConfigError) as caught:
        build_block(cls, {cls.BLOCK: raw})
    assert str(caught.value).startswith(message)


def test_a_block_that_is_not_a_mapping_is_rejected():
    with pytest.raises(ConfigError, match=r"^prepare-data: expected a mapping"):
        build_block(config.PrepareDataConfig, {"prepare-data": [1024]})


def test_null_caps_mean_no_cap():
    cfg = build_block(config.PrepareDataConfig, {"prepare-data": {"max_train_tokens": None}})
    assert cfg.max_train_tokens is None


def test_task_limits_has_one_field_per_benchmark_in_registry_order():
    """`lm-eval.limit` is a params block, so its keys are fields; the benchmarks they name are the registry's."""
    assert [f.name for f in dataclasses.fields(config.TaskLimits)] == list(BENCHMARKS)


@pytest.mark.parametrize("cls, extra", [(config.ComputeConfig, {"auto"}), (config.CacheTeacherAttnConfig, set())])
def test_dtype_choices_are_the_names_of_dtypes(cls, extra):
    """The Literal a dtype field spells out for the params reader names exactly what `DTYPES` maps."""
    dtype = next(f for f in dataclasses.fields(cls) if f.name == "dtype")
    assert set(typing.get_args(dtype.type)) == set(config.DTYPES) | extra


@pytest.mark.parametrize("cls", BLOCKS, ids=lambda cls: cls.BLOCK)
def test_defaults_equal_params_yaml(cls):
    block = read_params(REPO / "params.yaml")[cls.BLOCK]
    assert set(block) == {f.name for f in dataclasses.fields(cls)}, "params.yaml lists every field"
    assert build_block(cls, {cls.BLOCK: block}) == cls()


def test_every_params_block_has_a_dataclass():
    assert set(read_params(REPO / "params.yaml")) - ENTRY_BLOCKS == {cls.BLOCK for cls in BLOCKS}



def test_a_mistyped_param_stops_the_stage_with_one_line(tmp_path):
    params = read_params(REPO / "params.yaml")
    params["prepare-data"]["seq_len"] = "1024"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-m", "stages.prepare_data", "source.json", "out", "metrics.json"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert done.stderr.splitlines() == ["error: prepare-data.seq_len: expected an integer, got '1024'"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]  # nothing loaded or written


def test_params_read_as_dvc_reads_them_so_1e_3_is_a_number(tmp_path):
    from dvc.utils.serialize import parse_yaml

    text = "attention-transfer:\n  lr: 1e-3\n  min_lr: 1E-5\n  epochs: 1\n"
    (tmp_path / "params.yaml").write_text(text)
    params = read_params(tmp_path / "params.yaml")
    assert params == parse_yaml(text, "params.yaml")
    cfg = build_block(config.AttentionTransferConfig, params)
    assert (cfg.lr, cfg.min_lr, cfg.epochs) == (1e-3, 1e-5, 1)
    repo_params = REPO / "params.yaml"
    assert read_params(repo_params) == parse_yaml(repo_params.read_text(), str(repo_params))
    (tmp_path / "params.yaml").write_text("attention-transfer:\n  lr: [1e-3\n")
    with pytest.raises(ConfigError, match=r"params.yaml: not valid YAML: "):
        read_params(tmp_path / "params.yaml")


def test_check_params_takes_params_yaml_and_names_the_first_bad_key():
    params = read_params(REPO / "params.yaml")
    assert config.check_params(params) == sorted(params)
    typo = {("atention" if k == "attention" else k): v for k, v in params.items()}
    with pytest.raises(ConfigError, match=r"^atention: unknown params block; valid blocks are \["):
        config.check_params(typo)
    late = dict(params, **{"lm-eval": dict(params["lm-eval"], batch_size=0)})
    with pytest.raises(ConfigError, match=r"^lm-eval.batch_size: must be at least 1"):
        config.check_params(late)
    variant = dict(params, variants=dict(params["variants"], odd={"mode": "softmax"}))
    with pytest.raises(ConfigError, match=r"^variants.odd.mode: expected one of"):
        config.check_params(variant)


def test_each_mode_reads_only_its_own_fields_so_the_others_change_nothing():
    base = config.HybridConfig()
    window_change = dataclasses.replace(base, window="sliding", window_size=16, init_gamma=0.3)
    feature_change = dataclasses.replace(base, feature_map="t2r", feature_dim=32, init_gamma=0.3)
    assert window_change.for_mode("linear_only") == base.for_mode("linear_only")
    assert feature_change.for_mode("window_only") == base.for_mode("window_only")
    assert window_change.for_mode("hybrid") != base.for_mode("hybrid")  # the method reads every field
    assert feature_change.for_mode(None) == feature_change  # its own mode, all of it read
    assert window_change.for_mode("linear_only").mode == "linear_only"


def test_scoped_attention_has_each_variant_and_the_window_only_baseline():
    params = read_params(REPO / "params.yaml")
    params["attention"] = {**params["attention"], "window_size": 16}
    scoped = config.scoped_attention(params)
    assert set(scoped) == set(params["variants"]) | {config.WINDOW_ONLY}
    assert scoped["lolcats"].window_size == 16 and scoped["window_only"].window_size == 16
    assert scoped["linear_only"] == config.HybridConfig(mode="linear_only")  # the window is not its business
    params["variants"]["window_only"] = {"mode": "window_only"}
    with pytest.raises(ConfigError, match="variants.window_only: the name of a baseline"):
        config.check_params(params)
