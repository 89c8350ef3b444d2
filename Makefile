# The two commands of the Quickstart: `make run` and `make test`. Both set everything up first.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
DEBS    := redis-server redis-tools nginx-light haproxy nutcracker wrk curl iproute2 tshark nftables conntrack \
           iputils-ping iperf3 dpdk-dev dnsmasq-base udhcpc
PYTEST_ARGS ?=

.PHONY: run demo test setup debs build bench clean

# The default topology (examples/edge.yaml): generator -> firewall -> ids -> l4lb -> two sinks,
# each its own supervised process, with the live view, for RUN_SECONDS.
RUN_SECONDS ?= 20
run: setup
	$(BIN)/shmfabric up examples/edge.yaml --duration $(RUN_SECONDS) --live

# The fabric alone: four node processes exchanging CRC-checked frames.
demo: setup
	$(BIN)/shmfabric demo

test: setup
	$(BIN)/python -m pytest $(PYTEST_ARGS)

setup: debs $(STAMP) build

# Debian packages for the real peers the tests start (redis, nginx, HAProxy, twemproxy, wrk, DPDK testpmd).
# Installed only when root; otherwise the tests that need them skip and say why.
debs:
	@missing=""; for p in $(DEBS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "installing Debian packages:$$missing"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	  else echo "not root: skipping Debian packages$$missing (tests needing them will skip)"; fi; \
	fi

$(STAMP): pyproject.toml setup.py
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip setuptools wheel
	$(BIN)/pip install -q -e '.[dev,bench]'
	touch $@

# Rebuild the compiled core in place whenever its sources change.
build: $(STAMP) src/shmfabric/core/_fabric.c src/shmfabric/core/fabric_layout.h
	@$(BIN)/python setup.py -q build_ext --inplace >/dev/null

bench: setup
	$(BIN)/shmfabric bench transport

clean:
	rm -rf $(VENV) build src/*.egg-info src/shmfabric/core/*.so
