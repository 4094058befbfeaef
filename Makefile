# Two entry points: `make demo` (set up, run the whole pipeline on the bundled corpus) and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
BILM := $(VENV)/bin/bilm
# CPU build by default; on a GPU machine install your CUDA build of torch into .venv first.
TORCH_SPEC ?= torch==2.13.0
DEMO_OUT ?= demo_out
GPU_OUT ?=  # gpu-check's output directory; empty: benchmarks/results (with SMOKE=1 a temporary one)

.PHONY: demo probe test setup setup-dev clean gpu-check

# The demo needs the package only; the tests also need pytest, hypothesis, deepspeed, onnx(runtime),
# pyarrow, zstandard, sacremoses, sentencex and matplotlib.
setup: $(VENV)/.installed
setup-dev: $(VENV)/.installed-dev

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e .
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	$(PY) -m pip install -q -e ".[dev,deepspeed,onnx,corpora,text,plot]"
	touch $@

test: $(VENV)/.installed-dev
	$(PY) -m pytest -q tests

# The README's "make demo" block lists these commands (tests/test_readme.py keeps them equal).
# A stage that is done is reused: prepare is skipped when its manifest exists, train resumes
# from its newest checkpoint (nothing left to do once finished).
demo: $(VENV)/.installed
	test -f $(DEMO_OUT)/data/manifest.json || $(BILM) prepare data/sample/train.txt --out $(DEMO_OUT)/data --heldout-fraction 0
	$(BILM) train --config configs/tiny.yaml --data $(DEMO_OUT)/data/manifest.json --out $(DEMO_OUT)/run --resume --set model.lstm.dim=256 --set model.lstm.projection_dim=64
	$(BILM) evaluate --checkpoint $(DEMO_OUT)/run --data data/sample/heldout.txt
	$(BILM) export --checkpoint $(DEMO_OUT)/run --out $(DEMO_OUT)/export --force
	$(BILM) embed --options $(DEMO_OUT)/export/options.json --weights $(DEMO_OUT)/export/weights.hdf5 --input data/sample/demo_sentences.txt --out $(DEMO_OUT)/sentences.hdf5 --force
	$(PY) examples/nearest_neighbours.py --input data/sample/demo_sentences.txt --embeddings $(DEMO_OUT)/sentences.hdf5 --word bank

# What the demo model's vectors are worth (about 3.5 minutes on 2 cores once make demo is done; make
# demo runs first when its export is missing): bilm probe on sentence polarity (MR) and on
# part-of-speech tags (UD English-EWT) from PROBE_DATA, layers 0, 1, 2 and the learned mix against
# a random biLM of the same shape, 3 seeds each; tables on stdout, JSON and PNG into DEMO_OUT.
PROBE_DATA ?= ../shared/corpora/probe
probe: $(VENV)/.installed-plot
	test -f $(DEMO_OUT)/export/weights.hdf5 || $(MAKE) demo
	$(BILM) probe --model $(DEMO_OUT)/export --task classify --train $(PROBE_DATA)/mr/train.tsv --test $(PROBE_DATA)/mr/test.tsv --layers mix,0,1,2 --control random --json $(DEMO_OUT)/probe-mr.json --plot $(DEMO_OUT)/probe-mr.png --force
	$(BILM) probe --model $(DEMO_OUT)/export --task tag --train $(PROBE_DATA)/ud-ewt/train.conllu --test $(PROBE_DATA)/ud-ewt/test.conllu --layers mix,0,1,2 --control random --json $(DEMO_OUT)/probe-ewt.json --plot $(DEMO_OUT)/probe-ewt.png --force

$(VENV)/.installed-plot: $(VENV)/.installed
	$(PY) -m pip install -q -e ".[plot]"
	touch $@

# On a GPU machine: every GPU figure in one command (at most 7 minutes), written to GPU_OUT.
# It runs with the interpreter it is given as it is (no venv, no install; bilm from this checkout):
# make gpu-check PYTHON=python3 GPU_OUT=DIR. SMOKE=1: tiny shapes on the CPU (make test rehearses it).
gpu-check:
	$(PYTHON) benchmarks/gpu_check.py$(if $(GPU_OUT), --out "$(GPU_OUT)",)$(if $(SMOKE), --smoke,)

clean:
	rm -rf $(DEMO_OUT)
