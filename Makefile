# Two commands for a fresh machine with Python 3.11: `make demo` and `make test`.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   ?= .venv
PY      = $(VENV)/bin/python
DATA   ?= data/synthetic
PLAN   ?= demo
WEIGHTS ?=
OVERWRITE ?=

.PHONY: demo test test-fast test-slow install synth preprocess notebooks bench clean lab kaggle-bundle

$(VENV)/.installed: requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	@# PYTHONWARNINGS: setuptools' banner on every editable install says nothing to act on
	PYTHONWARNINGS=ignore $(PY) -m pip install --quiet --no-deps --no-build-isolation -e . || \
	    PYTHONWARNINGS=ignore $(PY) -m pip install --quiet --no-deps -e .
	touch $@

install: $(VENV)/.installed

## the main job: synthetic data -> the whole pipeline
demo: $(VENV)/.installed
	$(PY) -m rsna_utils demo --data $(DATA) --plan $(PLAN) $(if $(WEIGHTS),--weights $(WEIGHTS))

## the test suite (CI runs this)
test: $(VENV)/.installed
	$(PY) -m pytest -q

## the unit tests that need no generated dataset: about 75 s on 2 idle cores, for the inner loop
test-fast: $(VENV)/.installed
	$(PY) -m pytest -q --fast

test-slow: $(VENV)/.installed
	$(PY) -m pytest -q -m slow

## a DATA that already holds a dataset is refused: OVERWRITE=1 replaces it
synth: $(VENV)/.installed
	$(PY) -m rsna_utils synth --out $(DATA) --patients 200 --size small $(if $(OVERWRITE),--overwrite)

## JupyterLab on the notebook suite, with the project's environment as the python3 kernel
lab: $(VENV)/.installed
	$(PY) -m jupyter lab --notebook-dir=notebooks $(if $(filter 0,$(shell id -u)),--allow-root) $(LAB_ARGS)

## the offline Kaggle bundle (wheels + install.py + notebooks): upload BUNDLE as a dataset
BUNDLE ?= dist/rsna-bundle
kaggle-bundle: $(VENV)/.installed
	$(PY) -m rsna_utils bundle --out $(BUNDLE)

bench: $(VENV)/.installed
	$(PY) benchmarks/preprocess.py

clean:
	rm -rf $(VENV) runs data/synthetic*
