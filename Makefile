PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The older stack, kept supported: TensorFlow 2.15 (built-in Keras 2), NumPy 1, and tensorflow-privacy as the
# peer of the cross-check tests (it holds TensorFlow <= 2.15 and dp-accounting 0.4.3).
LEGACY := .venv-legacy
LEGACY_STAMP := $(LEGACY)/.installed
DOCS_STAMP := $(VENV)/.docs-installed
LEGACY_PINS := tensorflow==2.15.1 tf-keras==2.15.1 'numpy<2'

export TF_CPP_MIN_LOG_LEVEL ?= 2

.PHONY: demo test test-slow test-legacy docs test-docs lint format clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(STAMP): $(BIN)/python setup.cfg pyproject.toml
	$(BIN)/pip install --quiet -e '.[dev]'
	$(BIN)/pip check
	touch $(STAMP)

$(DOCS_STAMP): $(STAMP)
	$(BIN)/pip install --quiet -e '.[docs]'
	$(BIN)/pip check
	touch $(DOCS_STAMP)

$(LEGACY)/bin/python:
	$(PYTHON) -m venv $(LEGACY)
	$(LEGACY)/bin/pip install --quiet --upgrade pip

$(LEGACY_STAMP): $(LEGACY)/bin/python setup.cfg pyproject.toml
	$(LEGACY)/bin/pip install --quiet -e '.[dev,peer]' $(LEGACY_PINS)
	$(LEGACY)/bin/pip check
	touch $(LEGACY_STAMP)

demo: $(STAMP)
	$(BIN)/lipdp train configs/digits.yaml --out runs/digits-$$(date +%Y%m%d-%H%M%S)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

test: lint
	$(BIN)/python -m pytest -q

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow

test-legacy: $(LEGACY_STAMP)
	$(LEGACY)/bin/python -m pytest -q

# The documentation site (docs/, mkdocs.yml) into site/; --strict fails on any broken link or reference.
docs: $(DOCS_STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir site

# The documentation's slower code blocks (guides that train several models); the others run in make test.
test-docs: $(STAMP)
	$(BIN)/python -m pytest -q -m slow tests/test_docs.py

clean:
	rm -rf $(VENV) $(LEGACY) runs build site *.egg-info
