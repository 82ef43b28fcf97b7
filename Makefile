# The two README commands. Each does its own set-up: a virtual environment in .venv, torch==2.13.0 first (the
# local CPU wheel; an unpinned torch would pull several GB of CUDA packages), then this package pinned by
# constraints.txt.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export HF_HUB_OFFLINE ?= 1
export HF_HUB_DISABLE_TELEMETRY ?= 1
export TOKENIZERS_PARALLELISM ?= false
# One torch thread per process: the tiny:// models are too small to gain from a second thread, and with any other
# load on 2 cores (or two accelerate processes) a second thread oversubscribes them. Measured with SFT on
# tiny://arithmetic, batch 32, 30 steps, one background job running: 1 thread 0.21 s/step in every run; 2 threads
# 0.16 to 0.74 s/step. Override with `make demo OMP_NUM_THREADS=2`.
export OMP_NUM_THREADS ?= 1

.PHONY: setup demo test test-slow clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

setup: $(BIN)/python
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -c constraints.txt -e ".[test]"

# Main job: the demo recipe on the embedded default (tiny:// model + synthetic arithmetic task).
demo: setup
	$(BIN)/trl-safeppo run recipes/demo.yaml

# Default test tier (under 15 minutes on 2 CPU cores).
test: setup
	$(BIN)/python -m pytest -q

# Long real-training tier.
test-slow: setup
	$(BIN)/python -m pytest -q -m slow

clean:
	rm -rf $(VENV) build dist *.egg-info
