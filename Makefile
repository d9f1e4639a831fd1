# omni_train set-up. `make demo` and `make test` install everything they need themselves.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# CPU machines get exact torch/torchcodec pins (an unpinned torch pulls a multi-GB CUDA build);
# machines with an NVIDIA driver keep pyproject's ranges.
CPU_PINS := $(if $(shell command -v nvidia-smi 2>/dev/null),,-r requirements-cpu.txt)
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.torch_extensions
export WANDB_MODE ?= offline

.PHONY: install system-deps demo demo-compare test test-all bench clean

install: system-deps $(STAMP)

system-deps:
	@missing=""; for tool in ffmpeg espeak-ng; do command -v $$tool >/dev/null || missing="$$missing $$tool"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "installing Debian packages:$$missing"; \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq ffmpeg espeak-ng >/dev/null) || exit 1; \
	  else \
	    echo "missing:$$missing -- run: sudo apt-get install -y ffmpeg espeak-ng"; exit 1; \
	  fi; \
	fi

$(STAMP): pyproject.toml requirements-cpu.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(CPU_PINS) -e '.[train,dev]'
	touch $(STAMP)

# The demo corpus (cached: rebuilt only when missing), training with its probes every few hundred
# steps, the probe table at the end (printed by the run), and PNG curves.
demo: install
	$(VENV)/bin/omni-train shards demo --out shards/demo --size demo
	OMP_NUM_THREADS=1 $(VENV)/bin/torchrun --nproc_per_node=2 launch/pretrain.py --recipe recipes/demo.yaml
	$(VENV)/bin/omni-train plot runs/demo

# The same corpus and steps without a transfer mechanism (the naive baseline: ~26 min on 2 cores, every
# utterance enters its backbone as full audio), then both runs'
# zero-shot, pipeline and transcript numbers side by side.
demo-compare: install
	$(VENV)/bin/omni-train shards demo --out shards/demo --size demo
	test -s runs/demo/probes.jsonl || OMP_NUM_THREADS=1 $(VENV)/bin/torchrun --nproc_per_node=2 launch/pretrain.py --recipe recipes/demo.yaml
	OMP_NUM_THREADS=1 $(VENV)/bin/torchrun --nproc_per_node=2 launch/pretrain.py --recipe recipes/demo.yaml model.transfer.kind=none name=demo-naive
	$(VENV)/bin/omni-train compare runs/demo runs/demo-naive
	$(VENV)/bin/omni-train plot runs/demo runs/demo-naive

# The default suite excludes tests marked slow; it must collect tests (pytest exits 5 otherwise).
test: install
	$(PY) -m pytest -q -p no:cacheprovider --timeout=900

test-all: install
	$(PY) -m pytest -q -p no:cacheprovider --timeout=1800 -m ''

bench: install
	$(PY) benchmarks/audio_features.py
	$(PY) benchmarks/packing.py
	$(PY) benchmarks/demo_speed.py

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
