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

.PHONY: install system-deps demo demo-compare demo-recognizer test test-all test-cpus test-reliability bench clean

install: system-deps $(STAMP)

system-deps:
	@missing=""; for tool in ffmpeg espeak-ng bwrap; do command -v $$tool >/dev/null || missing="$$missing $$tool"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "installing Debian packages:$$missing"; \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq ffmpeg espeak-ng bubblewrap >/dev/null) || exit 1; \
	  else \
	    echo "missing:$$missing -- run: sudo apt-get install -y ffmpeg espeak-ng bubblewrap"; exit 1; \
	  fi; \
	fi

# --no-compile: pip's byte-compiling of every installed module took 29 of the install's 52 s on a 2-core Xeon; the
# modules a run imports compile on first import instead (where Python may write bytecode: PYTHONDONTWRITEBYTECODE).
$(STAMP): pyproject.toml requirements-cpu.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q --no-compile $(CPU_PINS) -e '.[train,dev]'
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

# The demo's recognizer alone (docs/robustness.md, "A recognizer-only proxy"): recipes/demo.yaml on its speech only
# (the backbone then runs nothing until the CTC gate opens), at a constant learning rate, 700 steps without probes
# (~4 minutes a run on 2 cores), once per grid cell and seed; then each variant's CTC loss and exact fraction over
# steps 450-650, where the recognizer leaves its plateau, as mean and paired difference over the seeds. Another grid
# key needs another RECOGNIZER_SWEEP name.
RECOGNIZER_GRID ?= --grid model.audio.conv_kernel=15,31
RECOGNIZER_SEEDS ?= 0,1,2
RECOGNIZER_SWEEP ?= demo-recognizer
demo-recognizer: install
	$(VENV)/bin/omni-train shards demo --out shards/demo --size demo
	OMP_NUM_THREADS=1 $(VENV)/bin/omni-train sweep --recipe recipes/demo.yaml --name $(RECOGNIZER_SWEEP) $(RECOGNIZER_GRID) \
	  --seeds $(RECOGNIZER_SEEDS) --nproc 2 -- 'data.train=[{shards: "shards/demo/train-{000000..000007}.tar", tasks: [asr]}]' \
	  data.batch_size=10 train.steps=700 'probes=[]' train.eval_every=0 train.checkpoint_every=700 train.tracker=none \
	  train.decay_steps=0 train.min_lr_ratio=1.0
	$(VENV)/bin/omni-train compare runs/$(RECOGNIZER_SWEEP) --train-window ctc_loss@450:650 --train-window ctc_exact@450:650

# The default suite excludes tests marked slow; it must collect tests (pytest exits 5 otherwise).
test: install
	$(PY) -m pytest -q -p no:cacheprovider --timeout=900 --durations=15

test-all: install
	$(PY) -m pytest -q -p no:cacheprovider --timeout=1800 -m ''

# The fault scenarios (tests/test_reliability.py, docs/reliability.md): kill -9 mid-step and mid-save under
# torchrun restarts, SIGTERM / SIGUSR1, NaN, loss spikes and DeepSpeed's skip, a loader worker killed, a shard
# deleted mid-run; 2 CPU ranks each, then the table of what each checked and measured. make test runs the fast ones.
test-reliability: install
	$(PY) -m pytest -q -p no:cacheprovider --timeout=1800 -m reliability tests/test_reliability.py

# The tests that threshold a training outcome (marked `outcome`) under each CPU kernel set torch has for
# x86-64: this CPU's own, then AVX2 and the plain default ones, as other machines would run them (float
# results differ in the last bits, and over many steps more). MKL's matrix products and oneDNN's
# convolutions choose their code per CPU whatever ATEN_CPU_CAPABILITY says, so the default run pins those
# to their most portable paths too. Fails if any of the three runs fails.
test-cpus: install
	@failed=""; for kernels in native avx2 default; do \
	  start=$$SECONDS; \
	  if [ $$kernels = native ]; then run="env -u ATEN_CPU_CAPABILITY" setting="ATEN_CPU_CAPABILITY unset"; \
	  elif [ $$kernels = avx2 ]; then run="env ATEN_CPU_CAPABILITY=avx2" setting="ATEN_CPU_CAPABILITY=avx2"; \
	  else setting="ATEN_CPU_CAPABILITY=default MKL_CBWR=COMPATIBLE ONEDNN_MAX_CPU_ISA=SSE41"; run="env $$setting"; fi; \
	  echo "=== test-cpus: $$setting (torch runs $$($$run $(PY) -c 'import torch; print(torch.backends.cpu.get_cpu_capability())') kernels)"; \
	  $$run $(PY) -m pytest -q -p no:cacheprovider --timeout=900 -m outcome || failed="$$failed $$kernels"; \
	  echo "=== test-cpus: $$setting done in $$((SECONDS - start)) s"; \
	done; \
	if [ -n "$$failed" ]; then echo "=== test-cpus: FAILED under:$$failed"; exit 1; fi; \
	echo "=== test-cpus: passed under native, avx2 and default"

bench: install
	$(PY) benchmarks/audio_features.py
	$(PY) benchmarks/packing.py
	$(PY) benchmarks/demo_speed.py

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
