# The two commands of the README. Both build .venv on first use (python3 -m venv + pip).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test docs fuzz lint format bench docs-images clean

demo: $(STAMP)
	$(BIN)/selfattn explain

test: $(STAMP) docs
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest

# The documentation site (mkdocs.yml, docs/) into site/. --strict fails on any warning: a link to
# a missing page, file or anchor, a page left out of the nav, a docstring mkdocstrings can't read.
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir site

# The property tests with thousands of fresh examples each (tests/conftest.py, profile "fuzz").
fuzz: $(STAMP)
	HYPOTHESIS_PROFILE=fuzz $(BIN)/python -m pytest tests/test_properties.py

$(STAMP): pyproject.toml requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements-dev.txt
	touch $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

bench: $(STAMP)
	$(BIN)/python benchmarks/engines.py --out docs/bench/engines.txt

# Every image in docs/ (not docs/bench/) from the current code, by the commands the docs show
# (docs/make_images.py): trains the induction preset (about 20 s) and screenshots the --html page
# with headless Chromium.
docs-images: $(STAMP)
	$(BIN)/python docs/make_images.py

clean:
	rm -rf $(VENV) build dist site src/*.egg-info .pytest_cache .ruff_cache
