# The README's two commands: `make demo` and `make test`. Both build .venv from requirements*.txt.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
DEMO   := demo_data

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
