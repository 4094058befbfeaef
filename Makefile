# Two entry points: `make demo` (set up, run the pipeline on the bundled corpus) and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
BILM := $(VENV)/bin/bilm
# CPU build by default; on a GPU machine install your CUDA build of torch into .venv first.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed
DEMO_OUT ?= demo_out

.PHONY: demo test setup clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev,deepspeed]"
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q tests

demo: $(STAMP)
	mkdir -p $(DEMO_OUT)
	printf 'The cat sat on the mat .\nI went to the bank to deposit money .\nWe sat on the river bank .\n' > $(DEMO_OUT)/sentences.txt
	$(BILM) embed --options tests/fixtures/bilm-tf/model/options.json --weights tests/fixtures/bilm-tf/model/lm_weights.hdf5 --input $(DEMO_OUT)/sentences.txt --output $(DEMO_OUT)/embeddings.hdf5
	$(PY) -c "import h5py; f = h5py.File('$(DEMO_OUT)/embeddings.hdf5'); [print('sentence', k, f[k].shape) for k in sorted(f) if k != 'sentence_to_index']"

clean:
	rm -rf $(DEMO_OUT)
