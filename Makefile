# The README's two commands: `make demo` and `make test`. Both build .venv from requirements*.txt.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
DEMO   := demo_data
# CPU demo training: 64 px, 6 epochs from random init, ~1.5 min on 2 idle cores; validation PR-AUC ~0.5-0.65 against
# a dummy's 0.05 (seeds 0-2). --no-macenko until the demo's stain reference (B22-47_0/01653.png) is a tile
# MacenkoNormalizer.fit accepts (it is DAB-free now).
DEMO_TRAIN_FLAGS ?= --image-size 64 --batch-size 32 --weights none --epochs 6 --lr 1e-3 --no-macenko

.PHONY: demo test clean

$(VENV)/.runtime: requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements.txt
	touch $@

$(VENV)/.dev: $(VENV)/.runtime requirements-dev.txt
	$(PY) -m pip install -q -r requirements-dev.txt
	touch $@

demo: $(VENV)/.runtime
	$(PY) make_demo_data.py $(DEMO) --seed 0
	$(PY) audit_leakage.py --data-root $(DEMO)
	@if [ -f train.py ]; then $(PY) train.py --data-root $(DEMO) --run-id demo --device cpu $(DEMO_TRAIN_FLAGS); fi
	@if [ -f evaluate.py ]; then $(PY) evaluate.py --checkpoint runs/demo/best.pt; fi

test: $(VENV)/.dev
	$(PY) -m pytest -q tests

clean:
	rm -rf $(DEMO) runs .pytest_cache
