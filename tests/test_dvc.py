"""dvc.yaml tells the truth (style rules 2, 3): names, params, deps agree with the code."""
import ast
import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline import config
from pipeline.params import ParamsBlock
from tests.conftest import REPO

# Besides its own block (read whole), the keys each stage reads from shared blocks. `tracking` is
# read by every stage but only says where runs are recorded, so dvc.yaml lists it nowhere.
SHARED_READS = {
    "check-params": {},  # every block, through its dependency on the whole of params.yaml
    "resolve-source": {"prepare-data": ["source"]},
    "prepare-data": {"teacher": ["source"]},
    "prepare-probes": {"teacher": ["source"]},
    "cache-teacher-attn": {"teacher": ["source"], "compute": "all"},
    "attention-transfer": {"teacher": ["source"], "compute": "all"},  # attention: its data/attention file
    "lora-recover": {"teacher": ["source"], "compute": "all"},
    "lm-eval-teacher": {"teacher": ["source"], "compute": "all"},
    "lm-eval-window-only": {"teacher": ["source"], "compute": "all"},  # attention: its data/attention file
    "lm-eval": {"teacher": ["source"], "compute": "all"},
    "report": {"lm-eval": ["limit"], "attention": ["window_size"]},  # the window: which probes lie beyond it
}
# stages that run another stage's script (and so read its params block), by that stage's name
SCRIPT_OF = {"lm-eval-teacher": "lm-eval", "lm-eval-window-only": "lm-eval"}
# foreach stages that also read their own entry of ENTRY_BLOCK
READS_ENTRY = {"attention-transfer", "lora-recover"}
# `foreach` stages run once per entry of this block and read their own entry (`variants.${key}`)
ENTRY_BLOCK = "variants"
RECORD_ONLY = {"tracking"}
# the model stages dvc.yaml starts through torchrun: the process count sits in their command (a change
# reruns them), and the rest of the `distributed` block changes no output, so no stage lists it
TORCHRUN = "python -m torch.distributed.run --standalone --nproc-per-node ${distributed.nproc_per_node} -m "
LAUNCHED = {"cache-teacher-attn", "attention-transfer", "lora-recover"}
# the gate upstream of every other stage: checks every block, records no MLflow run, writes these
PARAMS_GATE, PARAMS_CHECKED, SCOPED_ATTENTION = "check-params", "data/params_checked.json", "data/attention"
# stages that record no MLflow run: the gate, and the source pin, which runs at every `dvc repro`
UNTRACKED = {PARAMS_GATE, "resolve-source"}
# pipeline modules that check params, record runs or write files atomically; they never decide
# what a stage computes, so they are not deps (an edit there reruns nothing)
BOOKKEEPING = {"pipeline/__init__.py", "pipeline/config.py", "pipeline/params.py", "pipeline/stage.py",
               "pipeline/tracking.py", "pipeline/io.py"}

STAGES = {name: spec.get("do", spec) for name, spec in yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"].items()}
PER_ENTRY = {name for name, spec in yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"].items() if "foreach" in spec}
CLASSES = {cls.BLOCK: cls for cls in (getattr(config, n) for n in config.__all__)
           if issubclass(cls, ParamsBlock) and hasattr(cls, "BLOCK")}


def script(stage: str) -> Path:
    return REPO / "stages" / f"{SCRIPT_OF.get(stage, stage).replace('-', '_')}.py"


def expected_params(stage: str) -> set[str]:
    block = SCRIPT_OF.get(stage, stage)
    own = {f"{block}.{f.name}" for f in dataclasses.fields(CLASSES[block])} if block in CLASSES else set()
    shared = set()
    if stage in READS_ENTRY:
        shared.add(f"{ENTRY_BLOCK}.${{key}}")
    for block, keys in SHARED_READS[stage].items():
        fields = {f.name for f in dataclasses.fields(CLASSES[block])}
        keys = sorted(fields) if keys == "all" else keys
        assert set(keys) <= fields, f"SHARED_READS names fields {block} does not have"
        shared |= {f"{block}.{key}" for key in keys}
    return own | shared


def listed_params(entries: list) -> set[str]:
    """dvc.yaml `params` entries as dotted keys; a bare block name stands for all of its fields."""
    keys = set()
    for entry in entries:
        assert isinstance(entry, str), "params come from params.yaml, listed by key"
        if "." in entry or entry not in CLASSES:
            keys.add(entry)
        else:
            keys |= {f"{entry}.{f.name}" for f in dataclasses.fields(CLASSES[entry])}
    return keys


def pipeline_modules(path: Path, seen: set[str]) -> set[str]:
    """Repo-relative paths of the pipeline modules `path` imports, followed through non-bookkeeping ones."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = path.parent if node.level else REPO
            for _ in range(max(node.level - 1, 0)):
                base = base.parent
            package = base.joinpath(*node.module.split(".")) if node.module else base
            targets = [package] + [package / alias.name for alias in node.names]  # names may be modules
        elif isinstance(node, ast.Import):
            targets = [REPO.joinpath(*a.name.split(".")) for a in node.names]
        else:
            continue
        for target in targets:
            module = target.with_suffix(".py") if target.with_suffix(".py").is_file() else target / "__init__.py"
            rel = module.relative_to(REPO).as_posix() if module.is_relative_to(REPO) else ""
            if rel.startswith("pipeline/") and module.is_file() and rel not in seen:
                seen.add(rel)
                found.add(rel)
                if rel not in BOOKKEEPING:
                    found |= pipeline_modules(module, seen)
    return found


def test_every_stage_is_known_here():
    assert set(STAGES) == set(SHARED_READS), "add the stage's shared reads to SHARED_READS"


def test_check_params_tracks_all_of_params_yaml_and_gates_every_other_stage():
    assert STAGES[PARAMS_GATE]["params"] == [{"params.yaml": None}]
    assert [next(iter(out)) for out in STAGES[PARAMS_GATE]["outs"]] == [PARAMS_CHECKED, SCOPED_ATTENTION]
    assert all(PARAMS_CHECKED in spec["deps"] for name, spec in STAGES.items() if name != PARAMS_GATE)


@pytest.mark.parametrize("stage", sorted(set(STAGES) - {PARAMS_GATE}))
def test_params_are_exactly_what_the_stage_reads(stage):
    assert listed_params(STAGES[stage].get("params", [])) == expected_params(stage)
    assert not {k.split(".")[0] for k in listed_params(STAGES[stage].get("params", []))} & RECORD_ONLY


@pytest.mark.parametrize("stage", sorted(set(STAGES) - {PARAMS_GATE}))
def test_one_name_everywhere(stage):
    """Stage, script, `python -m` module and params block all match (the MLflow run name: below)."""
    name = SCRIPT_OF.get(stage, stage)
    module = f"stages.{name.replace('-', '_')}"
    assert STAGES[stage]["cmd"].startswith(f"{TORCHRUN if stage in LAUNCHED else 'python -m '}{module} ")
    tree = ast.parse(script(stage).read_text())
    sharing = [s for s in STAGES if SCRIPT_OF.get(s, s) == name]
    built = [arg.id for node in ast.walk(tree) if isinstance(node, ast.Call)
             and getattr(node.func, "id", None) in ("load_blocks", "load_entry") for arg in node.args
             if isinstance(arg, ast.Name) and arg.id in config.__all__]
    blocks = {getattr(config, name).BLOCK for name in built}
    # a script shared by several stages reads what any of them depends on
    expected = (set() if stage in UNTRACKED else set(RECORD_ONLY)) | ({name} & set(CLASSES))
    expected |= {"distributed"} & blocks if stage in LAUNCHED else set()
    for s in sharing:
        expected |= set(SHARED_READS[s]) | ({ENTRY_BLOCK} if s in READS_ENTRY else set())
    assert blocks == expected


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_deps_cover_the_script_and_the_modules_it_computes_with(stage):
    deps = STAGES[stage]["deps"]
    assert script(stage).relative_to(REPO).as_posix() in deps
    computing = pipeline_modules(script(stage), set()) - BOOKKEEPING
    uncovered = [m for m in computing if not any(m == d or m.startswith(d.rstrip("/") + "/") for d in deps)]
    assert not uncovered, f"{stage} computes with {uncovered} but does not list them under deps"
    produced = [d for d in deps if any(o == d or o.startswith(d.rstrip("/") + "/") or d.startswith(o + "/")
                                       for o in PRODUCED)]
    assert all((REPO / d).exists() for d in deps if "${" not in d and d not in produced)


# everything a stage writes (outs, metrics, plots): a dep on it, or on a folder of them, is an edge
PRODUCED = {out if isinstance(out, str) else next(iter(out)) for spec in STAGES.values()
            for kind in ("outs", "metrics", "plots") for out in spec.get(kind, [])}


def test_dvc_dag_accepts_the_pipeline():
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    done = subprocess.run([sys.executable, "-m", "dvc", "dag"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert all(stage in done.stdout for stage in STAGES)


def _stage_run_name(stage: str, spec: dict) -> str | None:
    """The MLflow run name the stage's script gives itself, for the stage's command (foreach: `${key}`)."""
    call = next(node for node in ast.walk(ast.parse(script(stage).read_text()))
                if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "stage_run")
    first = call.args[0]
    words = spec["cmd"].removeprefix(TORCHRUN).replace("python -m ", "", 1).split()
    words = ["python", "-m", *words]  # words[3]: the command's first argument
    if isinstance(first, ast.Constant):
        return first.value
    if isinstance(first, ast.Attribute) and first.attr == "stage":  # the command names its stage
        return words[3]
    if isinstance(first, ast.JoinedStr):  # f"attention-transfer@{args.variant}": the variant is argument 1
        return "".join(part.value if isinstance(part, ast.Constant) else words[3] for part in first.values)
    return None


@pytest.mark.parametrize("stage", sorted(set(STAGES) - UNTRACKED))
def test_each_stage_names_its_mlflow_run_as_dvc_names_the_stage(stage):
    expected = f"{stage}@${{key}}" if stage in PER_ENTRY else stage
    assert _stage_run_name(stage, STAGES[stage]) == expected
