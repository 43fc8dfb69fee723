# Two commands set everything up on a fresh machine:
#   make run    the main job: a local CPU run on the embedded default
#   make test   the test suite (what .ci/run calls)
# Both create .venv on first use. torch is pinned to the 2.13.0 CPU build *in the same pip
# command* as everything else, so no dependency can resolve a multi-GB CUDA torch.

PY      ?= python3
VENV    ?= .venv
VPY     := $(VENV)/bin/python
PIP_PINS := torch==2.13.0 triton==3.7.1 megatron-core==0.16.1 hydra-core==1.3.8 omegaconf==2.3.1 transformers==5.23.0
STAMP   := $(VENV)/.installed
PIP_LOG := $(VENV)/pip-install.log

.PHONY: setup run test kernels bench clean test-nemo-rl nemo-rl-root

$(STAMP): pyproject.toml setup.py Makefile
	$(PY) -m venv $(VENV)
	@echo "installing the pinned dependencies and this package into $(VENV) (pip's output: $(PIP_LOG))"
	@{ $(VPY) -m pip install --upgrade pip && $(VPY) -m pip install $(PIP_PINS) -e '.[dev,megatron]'; } \
	  > $(PIP_LOG) 2>&1 || { tail -n 30 $(PIP_LOG); echo "pip install failed: see $(PIP_LOG)" >&2; exit 1; }
	$(VPY) -c "import torch; assert torch.version.cuda is None, 'a CUDA torch was installed: ' + torch.__version__"
	touch $(STAMP)

setup: $(STAMP)

run: $(STAMP)
	@$(VPY) -m nemo_entropy.cli build-kernels --quiet || echo "CPU kernel build failed: the run uses the reference backend"
	$(VENV)/bin/nemo-entropy train $(ARGS)

test: $(STAMP)
	$(VPY) -m nemo_entropy.cli build-kernels --quiet || echo "CPU kernel build failed: tests fall back to the reference backend"
	OMP_NUM_THREADS=1 $(VPY) -m pytest -q $(PYTEST_ARGS)

kernels: $(STAMP)
	$(VPY) -m nemo_entropy.cli build-kernels

clean:
	rm -rf $(VENV) build .pytest_cache

# ---- The real-NeMo-RL harness (tests/nemo_rl_real; docs/nemo_rl.md, "The real-NeMo-RL harness") ---------------
#   make test-nemo-rl NEMO_RL_ROOT=/path/to/nemo-rl-checkout [NEMO_RL_VENV=...] [PYTEST_ARGS=...]
# Runs NeMo-RL's own grpo_train on CPU with the plugin installed. NeMo-RL is not on PyPI: the checkout goes on
# PYTHONPATH after this repository (the checkout has its own `tests` package). NeMo-RL main needs Python 3.13, so
# the harness has its own venv, created on first use (or reused when NEMO_RL_VENV already holds one). On 3.13,
# torch==2.13.0 is the CUDA build (with its NVIDIA libraries most of a 6 GB venv); it runs on CPU. nemo-automodel is
# installed without its dependencies: NeMo-RL's automodel/train.py imports one helper from it.
NEMO_RL_ROOT  ?=
NEMO_RL_PY    ?= $(shell pyenv root 2>/dev/null)/versions/3.13.0/bin/python
NEMO_RL_VENV  ?= build/nemo-rl-venv
NEMO_RL_PINS  := torch==2.13.0 transformers==5.8.1 pydantic==2.14.4 ray==2.60.0 torchdata==0.11.0 \
                 omegaconf==2.3.1 hydra-core==1.3.8 tensorboard==2.21.0 mlflow==3.17.2 wandb==0.31.0 \
                 swanlab==0.10.3 prometheus_client==0.26.0 soundfile==0.14.0 tensordict==0.15.3 datasets==5.2.0 \
                 accelerate==1.16.0 matplotlib==3.11.2 rich==15.0.0 pyzmq==27.3.0 pynvml==13.0.1 \
                 fastapi==0.165.0 uvicorn==0.55.0 pytest==9.2.0 pytest-timeout==2.4.0
NEMO_RL_NODEPS_PINS := nemo-automodel==0.7.0
NEMO_RL_STAMP := $(NEMO_RL_VENV)/.nemo-entropy-harness-installed

nemo-rl-root:
	@test -n "$(NEMO_RL_ROOT)" || { echo "make test-nemo-rl needs NEMO_RL_ROOT=<NeMo-RL checkout>" >&2; exit 2; }
	@test -f "$(NEMO_RL_ROOT)/nemo_rl/algorithms/grpo.py" || { echo "NEMO_RL_ROOT=$(NEMO_RL_ROOT) is not a NeMo-RL checkout" >&2; exit 2; }

$(NEMO_RL_STAMP): Makefile
	test -x $(NEMO_RL_VENV)/bin/python || $(NEMO_RL_PY) -m venv $(NEMO_RL_VENV)
	$(NEMO_RL_VENV)/bin/python -c "import sys; assert sys.version_info[:2] == (3, 13), 'the NeMo-RL harness venv needs Python 3.13, not ' + sys.version"
	$(NEMO_RL_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(NEMO_RL_VENV)/bin/python -m pip install --quiet $(NEMO_RL_PINS)
	$(NEMO_RL_VENV)/bin/python -m pip install --quiet --no-deps $(NEMO_RL_NODEPS_PINS)
	touch $(NEMO_RL_STAMP)

test-nemo-rl: nemo-rl-root $(NEMO_RL_STAMP)
	PYTHONPATH="$(CURDIR):$(abspath $(NEMO_RL_ROOT))" NEMO_RL_ROOT="$(abspath $(NEMO_RL_ROOT))" OMP_NUM_THREADS=1 \
	  HF_HUB_OFFLINE=1 $(NEMO_RL_VENV)/bin/python -m pytest -q -W ignore::DeprecationWarning tests/nemo_rl_real $(PYTEST_ARGS)
