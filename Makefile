# paramhub developer commands. `make serve` and `make test` work on a fresh clone with only
# Python 3.11, pip and make: both create .venv on first use.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
HOST ?= 127.0.0.1
PORT ?= 50051
DEVICE ?=
PROTOS := $(wildcard protos/paramhub/v1/*.proto)

.PHONY: setup serve test check fuzz bench load protos clean

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

# The import contracts and the type check first (seconds), then the suite.
test: setup check
	$(PY) -m pytest -q

check: setup
	$(VENV)/bin/lint-imports
	$(PY) -m mypy

# A longer, randomized run of the fuzz suite (make test runs a bounded, derandomized one).
FUZZ_EXAMPLES ?= 400
fuzz: setup
	PARAMHUB_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(PY) -m pytest -q -p no:randomly tests/integration/test_fuzz.py

bench: setup
	$(PY) -m benchmarks.run
	$(PY) -m benchmarks.cold

# Many clients on one default server for LOAD_SECONDS (loopback only, bounded; see
# benchmarks/load.py): 64 mixed clients, 1,000 watchers, 32 slow readers, 64-worker sync rounds.
LOAD_SECONDS ?= 60
load: setup
	$(PY) -m benchmarks.load --seconds $(LOAD_SECONDS)

# Regenerates client/paramhub/v1 from protos/ (the output is committed).
protos: setup
	$(PY) -m grpc_tools.protoc -Iprotos --python_out=client --pyi_out=client \
	  --grpc_python_out=client $(PROTOS)

clean:
	rm -rf $(VENV) .pytest_cache

# The server image from docker/Dockerfile, with docker or, where docker has no daemon, podman
# (docker/engine.py holds the recipe; it builds a local base where no registry is reachable).
.PHONY: image container-test
IMAGE ?= paramhub:cpu
image: setup
	$(PY) docker/engine.py build --tag $(IMAGE)

# Builds the image and runs it as compose.yaml does: serve, stop, restart on the volume, read
# back (tests/integration/test_container.py). Skipped, saying so, where no engine runs.
container-test: setup
	@if $(PY) docker/engine.py which >/dev/null; then \
	  $(MAKE) image && PARAMHUB_CONTAINER_TEST=1 PARAMHUB_IMAGE=$(IMAGE) \
	    $(PY) -m pytest -q tests/integration/test_container.py; \
	else echo "container-test SKIPPED: neither docker (with a daemon) nor podman runs here"; fi
