# The two commands of the README: `make run` (main job, embedded default data) and `make test`.
# Both create the virtualenv and install the package on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test setup install-gpu release-model bench lint clean

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

# The released demo model (models/cxr-synthetic-end/): embedded synthetic data (seed 0) → the
# default site recipe (configs/cxr/synthetic.yaml: EnD + site×label sampling, seed 0) at 224 px
# (a 7×7 Grad-CAM) → per-site test report → verified ONNX export (OOD guard, temperature) with
# MODEL_CARD.md (test-split results) and metadata.json. Time: docs/deployment.md (bf16 CPUs).
RELEASE := runs/release
release-model: $(STAMP)
	$(BIN)/cxrdebias data synth --out $(RELEASE)/data --seed 0 --force
	$(BIN)/cxrdebias train --data $(RELEASE)/data/manifest.csv --config configs/cxr/synthetic.yaml \
		--bias site --method end --seed 0 --out $(RELEASE)/end --force \
		--image-size 224
	$(BIN)/cxrdebias evaluate $(RELEASE)/end --per-institution --force
	$(BIN)/cxrdebias export $(RELEASE)/end --out models/cxr-synthetic-end/model.onnx \
		--model-version cxr-synthetic-end-0.2.0 --force
	install -m 644 $(RELEASE)/end/eval/report.md models/cxr-synthetic-end/test_report.md

# Replace the CPU onnxruntime by onnxruntime-gpu (they install the same module; never keep both).
install-gpu: $(STAMP)
	$(BIN)/python -m pip uninstall --yes onnxruntime
	$(BIN)/python -m pip install --quiet -c constraints.txt 'onnxruntime-gpu>=1.18'

# ruff, and the layer contracts of pyproject.toml ([tool.importlinter]; docs/architecture.md)
lint: $(STAMP)
	$(BIN)/ruff check cxrdebias tests benchmarks apps
	$(BIN)/lint-imports

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
