# zipvl-ray: `make serve` runs the service on the built-in model, `make test` runs the tests.
# Both create (or reuse) .venv and install what they need: torch==2.13.0 first, then the package.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.zipvl-installed
CONFIG ?= configs/zipvl.yaml
# Where torch comes from. Empty: pip's configured indexes (PyPI's Linux wheel of torch 2.13 bundles CUDA,
# several GB); on a CPU-only machine `make serve TORCH_INDEX=https://download.pytorch.org/whl/cpu`.
TORCH_INDEX ?=
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false
# `serve run` starts its own local Ray cluster (instead of joining one started with `ray start`),
# bound to 127.0.0.1.
export RAY_ADDRESS ?= local
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER ?= 0
# Serve's HTTP proxy answers some errors itself (404 while the app deploys, 503 backpressure, 408
# timeouts) in plain text; this callback makes them OpenAI JSON errors (docs/reliability.md).
export RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH ?= zipvl_ray.api.middleware:proxy_middlewares
# `make serve` only: Serve's direct ingress. Port 8000 stays Serve's proxy (on the head node only, which
# direct ingress implies); the ingress replica also serves the same API on its own port (8001, or the
# next free one up to 8099: the log says "Started HTTP server on port N"), one Ray hop fewer (about
# 10 ms less per request on loopback, docs/performance.md "Direct ingress"). The range's maximum is
# exclusive. The 2 s drain lets Ctrl-C stop it quickly (Serve's 30 s is for load balancers to deregister
# a replica) and no port quarantine lets a restarted replica take 8001 again (the quarantine is for
# HAProxy mode). `make serve SERVE_ENV=` runs without it.
SERVE_ENV ?= RAY_SERVE_ENABLE_DIRECT_INGRESS=1 RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT=8001 \
	RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT=8100 RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S=2 \
	RAY_SERVE_PORT_QUARANTINE_S=0

.PHONY: install serve demo test test-fast lint format k8s gpu-wheels clean

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) torch==2.13.0
	$(PY) -m pip install -q -e ".[dev]"
	@touch $(STAMP)

install: $(STAMP)

serve: install
	env $(SERVE_ENV) $(VENV)/bin/serve run $(CONFIG)

demo: install
	$(PY) -m zipvl_ray.demo

test: install
	$(PY) -m pytest -q

test-fast: install
	$(PY) -m pytest -q -m "not ray and not slow"

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: install
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

# Re-render the KubeRay manifests from configs/ and validate them (run after changing configs/).
k8s: install
	$(PY) -m zipvl_ray.k8s render
	$(PY) -m zipvl_ray.k8s check

# Wheels for a GPU machine without package registries (CPython 3.12, x86-64), carried in .whl/ by
# benchmarks/gpu_session.sh (docs/performance.md, "A GPU session in one call").
GPU_WHEELS := pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 \
	typing-extensions==4.16.0 transformers==5.23.0 regex==2026.12.2
gpu-wheels:
	$(PYTHON) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
		-d .whl $(GPU_WHEELS)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
