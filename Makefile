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

.PHONY: setup run test kernels bench clean

$(STAMP): pyproject.toml setup.py Makefile
	$(PY) -m venv $(VENV)
	$(VPY) -m pip install --quiet --upgrade pip
	$(VPY) -m pip install --quiet $(PIP_PINS) -e '.[dev,megatron]'
	$(VPY) -c "import torch; assert torch.version.cuda is None, 'a CUDA torch was installed: ' + torch.__version__"
	touch $(STAMP)

setup: $(STAMP)

run: $(STAMP)
	$(VENV)/bin/nemo-entropy train $(ARGS)

test: $(STAMP)
	$(VPY) -m nemo_entropy.cli build-kernels --quiet || echo "CPU kernel build failed: tests fall back to the reference backend"
	OMP_NUM_THREADS=1 $(VPY) -m pytest -q $(PYTEST_ARGS)

kernels: $(STAMP)
	$(VPY) -m nemo_entropy.cli build-kernels

clean:
	rm -rf $(VENV) build .pytest_cache
