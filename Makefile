# paramhub developer commands. `make serve` and `make test` work on a fresh clone with only
# Python 3.11, pip and make: both create .venv on first use.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
HOST ?= 127.0.0.1
PORT ?= 50051
DEVICE ?=
PROTOS := $(wildcard protos/paramhub/v1/*.proto)

.PHONY: setup serve test fuzz bench protos clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first and pinned: this CPU wheel is what the project is tested with; a bare
	# "torch" requirement could otherwise pull a multi-GB CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev,hf]'
	touch $@

setup: $(VENV)/.installed

serve: setup
	$(VENV)/bin/paramhub serve --host $(HOST) --port $(PORT) $(if $(DEVICE),--device $(DEVICE))

test: setup
	$(PY) -m pytest -q

# A longer, randomized run of the fuzz suite (make test runs a bounded, derandomized one).
FUZZ_EXAMPLES ?= 400
fuzz: setup
	PARAMHUB_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(PY) -m pytest -q -p no:randomly tests/integration/test_fuzz.py

bench: setup
	$(PY) -m benchmarks.run

# Regenerates client/paramhub/v1 from protos/ (the output is committed).
protos: setup
	$(PY) -m grpc_tools.protoc -Iprotos --python_out=client --pyi_out=client \
	  --grpc_python_out=client $(PROTOS)

clean:
	rm -rf $(VENV) .pytest_cache
