# The README's two commands: `make demo` and `make test`. Both build .venv from requirements*.txt.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
DEMO   := demo_data
# CPU demo training: 64 px, Macenko, 15 epochs from random init (no download), small enough for any laptop; what it
# prints, and how the numbers depend on the CPU and the seed: docs/BENCHMARKS.md.
DEMO_TRAIN_FLAGS ?= --image-size 64 --batch-size 32 --weights none --epochs 15 --lr 1e-3

.PHONY: demo test clean rsync slurm gpu-check

$(VENV)/.runtime: requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements.txt
	touch $@

$(VENV)/.dev: $(VENV)/.runtime requirements-dev.txt
	$(PY) -m pip install -q -r requirements-dev.txt
	touch $@

# Re-running is cheap: the demo data is kept, train.py resumes (a finished run is left as it is) and the
# evaluation is rewritten whole. `make clean demo` starts from scratch.
demo: $(VENV)/.runtime
	test -d $(DEMO) || $(PY) make_demo_data.py $(DEMO) --seed 0
	$(PY) audit_leakage.py --data-root $(DEMO)
	$(PY) train.py --data-root $(DEMO) --run-id demo --device cpu $(DEMO_TRAIN_FLAGS)
	$(PY) train_patient.py --checkpoint runs/demo/best.pt --device cpu
	$(PY) evaluate.py --checkpoint runs/demo/best.pt --holdout

# Every CUDA-only branch end to end on demo data, and the throughput targets, in one table (about 5 minutes on one
# GPU; exits 2 at once without CUDA). Paste the table, with the card's name, where the README asks for it.
gpu-check: $(VENV)/.runtime
	test -d $(DEMO) || $(PY) make_demo_data.py $(DEMO) --seed 0
	$(PY) tools/gpu_check.py --data-root $(DEMO) --json runs/gpu_check.json

# The launcher tests stage data with rsync (and test the cp fallback without it): install it where missing.
rsync:
	@command -v rsync >/dev/null || { apt-get update -qq && apt-get install -y -qq rsync >/dev/null; } \
	  || echo "WARNING: rsync missing and not installable here; the launcher's rsync tests will fail"

# tests/test_launcher_slurm.py runs the launcher under a real one-node SLURM (root only): install Debian's scheduler
# where missing. A temporary policy-rc.d (only if the machine has none) keeps the packages from starting the system
# daemons; the test starts its own, with its own key and ports, and stops them.
SLURM_COMMANDS := munged mungekey slurmctld slurmd slurmstepd sbatch scontrol scancel sinfo
slurm:
	@missing=$$(for c in $(SLURM_COMMANDS); do PATH=$$PATH:/usr/sbin:/sbin command -v $$c >/dev/null || echo $$c; done); \
	if [ -n "$$missing" ] && [ "$$(id -u)" = 0 ]; then \
	  policy=/usr/sbin/policy-rc.d; made=; \
	  [ -e $$policy ] || { printf '#!/bin/sh\nexit 101\n' >$$policy && chmod 755 $$policy && made=1; }; \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
	      slurmctld slurmd munge slurm-client </dev/null >/dev/null; } \
	    || echo "WARNING: SLURM not installable here (missing: $$missing); the SLURM launcher test will be skipped"; \
	  [ -z "$$made" ] || rm -f $$policy; \
	elif [ -n "$$missing" ]; then \
	  echo "WARNING: not root, so SLURM is not installed (missing: $$missing); the SLURM launcher test will be skipped"; \
	fi

test: $(VENV)/.dev rsync slurm
	$(PY) -m pytest -q tests

clean:
	rm -rf $(DEMO) runs .pytest_cache
