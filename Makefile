# openedge-function: `make run` serves the example, `make test` runs the tests.
# As root, an interpreter the instances' unprivileged users can run (scripts/pick-python.sh).
PYTHON ?= $(shell bash scripts/pick-python.sh)
VENV ?= .venv
PY := $(VENV)/bin/python
CONFIG ?= example/etc/application.yml
PYTEST_ARGS ?=

.PHONY: install proto broker run test test-vm check bench bench-cluster soak wheel deb clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml setup.py protos/function.proto
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	$(MAKE) --no-print-directory proto
	touch $@

# The protobuf messages are generated from protos/function.proto, never edited (protoc comes with
# grpcio-tools).
proto:
	$(PY) -m grpc_tools.protoc -Iruntime_python/_pb=protos --python_out=. \
		runtime_python/_pb/function.proto

# A mosquitto on 127.0.0.1:1883 for `make run` (installed with apt-get when missing).
broker:
	@bash scripts/ensure-broker.sh

run: install broker
	@echo "the CLI (openedge-function invoke|status|run|new) is in $(VENV)/bin: in another terminal, . $(VENV)/bin/activate"
	$(VENV)/bin/openedge-function -c $(CONFIG)

check: install
	$(VENV)/bin/openedge-function --check -c $(CONFIG)

# Everything, the gateway in a VM included where the machine can run it (tests/test_vm.py says
# why not, otherwise).
test: install
	@bash scripts/ensure-broker.sh --binary-only
	@bash scripts/ensure-nats.sh
	@bash scripts/ensure-chromium.sh
	@bash tests/vm/ensure-tools.sh
	$(PY) -m pytest $(PYTEST_ARGS)

# The gateway in a VM alone: the package installed in a Debian 12 guest, run by systemd.
test-vm: install
	@bash tests/vm/ensure-tools.sh
	$(PY) -m pytest tests/test_vm.py -v $(PYTEST_ARGS)

# A wheel (pure Python: one for amd64 and arm64) with the runtime, the stubs, the unit and an
# example configuration, in dist/.
wheel: install
	$(PY) -m pip wheel --quiet --no-deps --wheel-dir dist .

# The Debian package (dh-virtualenv), in dist/.
deb:
	@bash scripts/build-deb.sh

# The benchmark (bench/bench.py --help): its own mosquitto, the relay ceiling, the daemon.
BENCH_ARGS ?=
bench: install
	@bash scripts/ensure-broker.sh --binary-only
	$(PY) -m pip install --quiet -e '.[bench]'
	$(PY) bench/bench.py $(BENCH_ARGS)

# Gateways sharing a NATS JetStream stream, one, two and three of them (bench/cluster.py --help).
bench-cluster: install
	@bash scripts/ensure-broker.sh --binary-only
	@bash scripts/ensure-nats.sh
	$(PY) bench/cluster.py $(BENCH_ARGS)

# The soak (bench/soak.py --help): steady mixed load for SOAK_ARGS' --duration (default 5 minutes,
# e.g. SOAK_ARGS="--duration 4h --plot"); fails on any QoS 1 loss or on growth after warm-up.
SOAK_ARGS ?=
soak: install
	@bash scripts/ensure-broker.sh --binary-only
	$(PY) -m pip install --quiet -e '.[bench]'
	$(PY) bench/soak.py $(SOAK_ARGS)

clean:
	rm -rf $(VENV) build dist *.egg-info runtime_python/_pb/function_pb2*.py var
