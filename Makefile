# The two commands: `make run` (install + the main job on the local default) and `make test`.
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -c
PYTHON ?= python3
VENV   ?= .venv
CONFIG ?= jobs/configs/local.yaml
LOCK   ?= requirements/cpu.lock
PYTEST_ARGS ?=
# Our model conversions under the project's cache dir; DeepSpeed's JIT-built ops in the venv, whose torch
# and DeepSpeed they are built against (built by the install, below).
export UTILRAG_CACHE ?= $(CURDIR)/.cache/utilrag
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/$(VENV)/torch_extensions
export RAY_USAGE_STATS_ENABLED = 0
# The venv's tools first on PATH for every process we start: Ray's workers see the venv's ninja, and a
# process started from here saw the system's, whose build log format differs, so DeepSpeed's JIT op
# (deepspeed_shm_comm, ~30 s of compiling) was built twice per clean clone.
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
# The stamp changes with the lock file and pyproject, so a second `make` installs nothing.
STAMP := $(VENV)/.installed-$(shell cat $(LOCK) pyproject.toml | md5sum | cut -c1-12)

.PHONY: install run test check lint clean check-gpu-env
install: $(STAMP)

$(STAMP): $(LOCK) pyproject.toml
	@rm -f $(VENV)/.installed-*
	@test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	@echo "[install] $(LOCK) -> $(VENV) (exact pins, --no-deps: no CUDA torchvision/torchaudio/torchcodec, no triton)"
	$(VENV)/bin/pip install -q --disable-pip-version-check --no-deps -r $(LOCK) 2>&1 | { grep -v "is ignored: it is neither" || true; }
	$(VENV)/bin/pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e . 2>&1 | { grep -v "is ignored: it is neither" || true; }
	$(VENV)/bin/python -m utilrag.envcheck
	@echo "[install] DeepSpeed's CPU shared-memory allreduce op (deepspeed_shm_comm, ~30 s of compiling, once per venv)"
	DS_ACCELERATOR=cpu $(VENV)/bin/python -c "from deepspeed.accelerator import get_accelerator; get_accelerator().create_op_builder('ShareMemCommBuilder').load(verbose=False)" > /dev/null
	@touch $@

run: install
	$(VENV)/bin/utilrag run --config $(CONFIG)

# The quick loop: ruff lint + format check and mypy on pkg/ (also the first step of `make test`,
# so CI runs them). Settings in pyproject.toml.
LINT_PATHS := pkg tests benchmarks jobs scripts
lint: install
	$(VENV)/bin/ruff check $(LINT_PATHS)
	$(VENV)/bin/ruff format --check $(LINT_PATHS)
	$(VENV)/bin/mypy

# pytest exits 5 when it collects no test: that is a failure here, said plainly.
test: lint
	@$(VENV)/bin/python -m pytest $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests"; exit 1; fi; exit $$rc

# The working loop: lint, then the tests not marked slow (no vLLM engine, no cluster of a test's own).
check: lint
	@$(VENV)/bin/python -m pytest -m "not slow" $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make check: pytest collected no tests"; exit 1; fi; exit $$rc

# requirements/gpu.lock, installed into a fresh venv as cluster/Dockerfile installs it (no GPU needed),
# then the imports (torch, vllm, faiss, ray, deepspeed, utilrag), vLLM's compiled extensions and the
# requirements (pip check, extras too). Several GB of CUDA wheels, 5-20 minutes: not in `make test`.
# GPU_ENV_PIP_CACHE=<dir>: pip's cache there (built wheels; downloads if the index allows caching);
# GPU_ENV_DELETE=1 removes the venv at the end.
GPU_ENV_VENV ?= /tmp/utilrag-gpu-env
GPU_ENV_PIP_CACHE ?=
GPU_ENV_DELETE ?= 0
check-gpu-env:
	$(PYTHON) scripts/check_gpu_env.py --venv '$(GPU_ENV_VENV)' $(if $(GPU_ENV_PIP_CACHE),--pip-cache '$(GPU_ENV_PIP_CACHE)') \
	  $(if $(filter 1,$(GPU_ENV_DELETE)),--delete)

clean:
	rm -rf outputs .pytest_cache
