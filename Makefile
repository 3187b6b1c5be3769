# LongAct: two commands on a fresh machine.
#   make demo   - the embedded default end to end on the CPU (sets itself up)
#   make test   - lint + the test suite (sets itself up)
# Each target installs what it needs into ./.venv first (idempotent).

VENV ?= .venv
PY := $(VENV)/bin/python
export PYTHONWARNINGS ?= ignore::UserWarning,ignore::FutureWarning,ignore::DeprecationWarning

.PHONY: setup demo test test-fast lint format bench reproduce gpu-rehearsal lock clean

setup: $(VENV)/.longact-install-cpu

$(VENV)/.longact-install-cpu: requirements/cpu.txt requirements/dev.txt requirements/cpu.lock requirements/verl.txt setup.py scripts/install.sh scripts/torch_source.py
	bash scripts/install.sh cpu --dev --venv $(VENV) --editable

demo: setup
	$(PY) -m longact.demo.pipeline --out runs/demo

test: setup lint
	$(PY) -m pytest tests -q --durations=20

test-fast: setup
	$(PY) -m pytest tests -q -m "not slow"

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: setup
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

bench: setup
	$(PY) -m bench.run --out docs/bench

# The GPU check as the lent GPU machine runs it, on this CPU: a fresh virtualenv of that
# machine's packages (scripts/gpu_machine_packages.txt), the wheels gpu_wheels.sh brings,
# then scripts/gpu_check.sh --device cpu from the checkout's root. Needs no .venv.
gpu-rehearsal:
	bash scripts/gpu_rehearsal.sh

reproduce: setup
	$(PY) -m longact.demo.reproduce --out runs/reproduce --report docs/reproduce.md

lock: setup
	$(VENV)/bin/pip freeze --exclude-editable | grep -v -e '^longact' -e '^vllm[ =]' \
	  | sed 's/^torch==2.13.0+cpu$$/torch==2.13.0/' > requirements/cpu.lock.new
	( echo "# Full pinned environment of the CPU set + dev set (pip freeze), used as constraints"; \
	  echo "# so every machine resolves the same versions. Regenerate: make lock"; \
	  cat requirements/cpu.lock.new ) > requirements/cpu.lock && rm requirements/cpu.lock.new

clean:
	rm -rf runs outputs .pytest_cache .ruff_cache .rehearsal
