# The two commands of the README: `make run` (main job, embedded default data) and `make test`.
# Both create the virtualenv and install the package on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test setup install-gpu bench lint clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

run: $(STAMP)
	$(BIN)/cxrdebias demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

# Replace the CPU onnxruntime by onnxruntime-gpu (they install the same module; never keep both).
install-gpu: $(STAMP)
	$(BIN)/python -m pip uninstall --yes onnxruntime
	$(BIN)/python -m pip install --quiet -c constraints.txt 'onnxruntime-gpu>=1.18'

lint: $(STAMP)
	$(BIN)/ruff check cxrdebias tests benchmarks apps

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
