# LongAct: two commands on a fresh machine.
#   make demo   - the embedded default end to end on the CPU (sets itself up)
#   make test   - lint + the test suite (sets itself up)
# Each target installs what it needs into ./.venv first (idempotent).

VENV ?= .venv
PY := $(VENV)/bin/python
export PYTHONWARNINGS ?= ignore::UserWarning,ignore::FutureWarning,ignore::DeprecationWarning

.PHONY: setup demo test test-fast lint format bench reproduce gpu-rehearsal lock lock-gpu clean

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

# The GPU image's set (Python 3.12, Linux x86_64) resolved for that target from any
# machine, flash-attn aside (a source package, pinned in gpu.txt). uv, in its own
# folder: pip's resolver backtracked for over 12 minutes on this set without the lock.
UV_VERSION := 0.13.9
lock-gpu:
	test -x build/uv/bin/uv || { python3 -m venv build/uv && build/uv/bin/pip install -q uv==$(UV_VERSION); }
	( grep -v '^flash-attn' requirements/gpu.txt | sed 's#^-r verl.txt#-r requirements/verl.txt#'; \
	  cat requirements/gpu-build.txt ) \
	  | build/uv/bin/uv pip compile - --python-version 3.12 --python-platform x86_64-manylinux_2_28 \
	    --native-tls --no-annotate --no-header -q -o requirements/gpu.lock.new
	( echo "# The GPU set + its build tools, resolved for Python 3.12 on Linux x86_64 (uv pip"; \
	  echo "# compile), used as constraints by scripts/install.sh gpu. Regenerate: make lock-gpu"; \
	  cat requirements/gpu.lock.new ) > requirements/gpu.lock && rm requirements/gpu.lock.new

clean:
	rm -rf runs outputs .pytest_cache .ruff_cache .rehearsal
