# vlmlab: every target sets up what it needs; `make install` is idempotent.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.install-stamp
FASHION_MNIST := /usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz
PYTEST_ARGS ?=

.PHONY: install data demo test test-fast layers lint bench clean

install: $(STAMP) data

# Reinstall only when the package's dependency list changes.
$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[offline,dev]'
	@touch $(STAMP)

# Offline image data: Debian's dataset-fashion-mnist. Without apt (or root) vlmlab
# falls back to torchvision's download, which needs internet once.
data:
	@if [ -f $(FASHION_MNIST) ]; then :; \
	elif command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
		echo "installing Debian package dataset-fashion-mnist"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null; \
	else \
		echo "note: cannot apt-get install dataset-fashion-mnist here; Fashion-MNIST will be downloaded by torchvision (needs internet)"; \
	fi

# The main job, offline: Black-Box Forgetting on the ConSE stand-in, then its report.
# Black-Box Forgetting on the tiny CLIP trained here (trained on first use, then cached):
# it forgets for real there, where the ConSE stand-in misrecognizes the forget classes
# before the first query (README, "What make demo does and prints").
demo: install
	HF_HUB_OFFLINE=1 $(BIN)/vlmlab pretrain tiny-clip
	HF_HUB_OFFLINE=1 $(BIN)/vlmlab run experiments/quickstart-clip.yaml --results results/quickstart-clip
	$(BIN)/vlmlab report results/quickstart-clip

test: install layers
	$(BIN)/ruff check platform tests benchmarks
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest $(PYTEST_ARGS)

# The quick loop: no slow and no multi-node tests (under 3 minutes on 2 cores).
test-fast: install layers
	$(BIN)/ruff check platform tests benchmarks
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -m "not slow and not cluster" $(PYTEST_ARGS)

# The layer contract (pyproject.toml, [tool.importlinter]): imports point up the layers only;
# and the types (mypy, [tool.mypy]).
layers: install
	PYTHONPATH=platform $(BIN)/lint-imports
	$(BIN)/mypy

lint: install
	$(BIN)/ruff check platform tests benchmarks
	$(BIN)/ruff format --check platform tests benchmarks

bench: install
	$(BIN)/python benchmarks/oracle_text_path.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .mypy_cache .import_linter_cache
