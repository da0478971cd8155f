# Two commands set everything up on a fresh machine: `make demo` and `make test`.
# Both depend on `make setup`, which creates .venv and installs the project into it.
PYTHON ?= python3
VENV   ?= .venv
# pytest-xdist workers of make test (tests/conftest.py keeps all SLURM tests on one of them)
TEST_WORKERS ?= 3
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
DEMO   ?= out/demo

.PHONY: setup system-deps demo reproduce sweep-demo test test-fast lint bench clean

setup: $(STAMP)

# curl: for `pipe:curl ...` shard URLs (http(s):// itself is streamed by fsspec/aiohttp).
system-deps:
	@command -v curl >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq curl; \
	  else echo "please install curl (used by pipe:curl shard URLs)" >&2; exit 1; fi; }

$(STAMP): setup.cfg pyproject.toml constraints.txt | system-deps
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c constraints.txt -e '.[dev,s3,gcs,fast]'
	touch $(STAMP)

# One rank per job, two jobs at once. DEMO_SET adds chain overrides; the demo with DDP on 2
# ranks per job: make demo DEMO_SET="resources.tasks_per_node=2" DEMO_PARALLEL=1
DEMO_SET ?=
DEMO_PARALLEL ?= 2
demo: setup
	$(BIN)/python scripts/demo.py --out $(DEMO) --max-parallel $(DEMO_PARALLEL) $(if $(DEMO_SET),--set $(DEMO_SET))

# The reproduction on the synthetic Cityscapes (README: 96 minutes on 2 AVX2-only cores in fp32,
# about 55 projected on 2 AVX512-BF16 cores).
# REPRODUCE_SET adds chain overrides, e.g. "stages.cil_stage3.epochs=120".
REPRODUCE_SET ?=
reproduce: setup
	$(BIN)/python scripts/demo.py --chain reproduce_synthetic --images-per-city 48 --max-parallel 2 \
	  --out out/reproduce $(if $(REPRODUCE_SET),--set $(REPRODUCE_SET))

# A 2 x 2 sweep (temperature x lambda) of the demo chain, selected on the held-out city.
sweep-demo: setup
	test -f $(DEMO)/shards/manifest.json || $(BIN)/python scripts/demo.py --out $(DEMO) --data-only
	$(BIN)/cil-launch sweep demo_temperature_lambda --out out/sweep-demo --max-parallel 2

test: setup
	$(BIN)/python -m pytest -n $(TEST_WORKERS)

test-fast: setup
	$(BIN)/python -m pytest -n $(TEST_WORKERS) -m "not slow"

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

bench: setup
	$(BIN)/python bench/data_pipeline.py --transports local,http,s3
	$(BIN)/python bench/train_step.py

clean:
	rm -rf $(VENV) out
