# One command each: `make test`, `make demo`, `make bench`. Each sets up .venv on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Pinned so a CPU machine takes the CPU build (this workplace serves 2.13.0+cpu from local
# wheels). On another CPU-only machine add PyTorch's CPU wheel index with TORCH_PIP_ARGS.
TORCH ?= torch==2.13.0
TORCH_PIP_ARGS ?=
STAMP := $(VENV)/.installed

.PHONY: setup test test-slow demo demo-distill bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml setup.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH_PIP_ARGS) "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $(STAMP)

# The suite (about 5 minutes on 2 cores); Triton kernels run on the CPU under the interpreter.
test: setup
	TRITON_INTERPRET=1 $(BIN)/python -m pytest -q -m "not slow" tests

# The longer checks (peer trainers, multi-process runs); CI runs them after `make test`.
# pytest exits 5 when nothing is marked slow: that is a pass.
test-slow: setup
	TRITON_INTERPRET=1 $(BIN)/python -m pytest -q -m slow tests || [ $$? -eq 5 ]

# The main job: fused vs unfused training side by side on the embedded default: SFT, then
# DPO starting from the SFT run's weights (from random weights DPO stays near chance).
demo: setup
	$(BIN)/python -m fused_losses.train --compare --objective sft --output-dir runs/demo-sft
	$(BIN)/python -m fused_losses.train --compare --objective dpo --output-dir runs/demo-dpo \
		--model runs/demo-sft/fused/final --max-steps 40 --lr 3e-4

# Distillation, fused vs unfused (apart from `demo`, which it would lengthen by minutes): the
# larger small-llama preset (H = 384, 4 layers) trained briefly by SFT is the teacher, then
# distilled into tiny-llama (H = 256) with the generalised JSD.
demo-distill: setup
	$(BIN)/python -m fused_losses.train --objective sft --model small-llama \
		--output-dir runs/demo-teacher --max-steps 30
	$(BIN)/python -m fused_losses.train --compare --objective distill \
		--teacher runs/demo-teacher/final --output-dir runs/demo-distill --max-steps 30

# The primitive's benchmark against naive PyTorch (CPU: minutes; GPU: the full sweep).
bench: setup
	$(BIN)/python benchmarks/run.py

clean:
	rm -rf $(VENV) runs .pytest_cache .hypothesis
