# The two commands: `make run` serves Graft on the embedded default; `make test` runs every test.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: run test test-fast test-docker lint format install bench bench-gpu clean

# `make test` runs the suite in this many processes, a test module at a time each (a module's
# server is started once, its tests run in order), handed out in the order of pyproject's
# testpaths; about half the suite waits on processes, servers and outages rather than
# computing. TEST_WORKERS=0 runs it in this one process.
TEST_WORKERS ?= 2
XDIST := -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

run: $(STAMP)
	$(BIN)/graft serve

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/pytest -q $(XDIST)

# The inner loop: everything but the tests that start real servers and processes
# (tests/e2e, tests/services); `make test` (and CI) runs everything.
test-fast: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/pytest -q -p no:cacheprovider $(XDIST) tests/test_*.py tests/engine tests/core \
		tests/app tests/worker

# The production images and compose stack, for real (needs root: installs and starts Docker if
# absent). Builds both images, then runs tests/docker against `docker-compose up`.
test-docker: $(STAMP)
	VENV=$(VENV) tests/docker/build.sh
	PATH=$(abspath $(BIN)):$$PATH GRAFT_TEST_DOCKER=1 $(BIN)/pytest -q -p no:cacheprovider tests/docker

lint: $(STAMP)
	$(BIN)/ruff check .

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

install: $(STAMP)

$(STAMP): pyproject.toml
	@echo "Setting up $(VENV) (once): torch, torchvision, timm, onnxruntime, Keras, transformers."
	@echo "About 6.5 GB, most of it torch's CUDA libraries, unused without a GPU; 5 to 10 minutes"
	@echo "the first time. pip's own progress follows."
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --progress-bar on -e '.[dev]'
	@touch $(STAMP)
	@echo "$(VENV) is ready."

bench: $(STAMP)
	$(BIN)/python bench/quality.py
	$(BIN)/python bench/speed.py --views 1
	$(BIN)/python bench/memory.py

clean:
	rm -rf $(VENV) var .pytest_cache .ruff_cache
