# Two commands set up everything on a fresh machine:
#   make run    creates .venv if missing, installs fastmae, runs the main job on the built-in default
#   make test   creates .venv if missing, installs fastmae with its test tools, runs the CPU test suite
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# torch first, pinned to a version whose CPU wheel installs without CUDA packages; fastmae supports torch 2.11 to 2.14
TORCH_SPEC ?= torch==2.13.0

.PHONY: run test venv clean

$(VENV)/.installed: setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q "$(TORCH_SPEC)" || $(PY) -m pip install -q "torch>=2.11"
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

venv: $(VENV)/.installed

# The built-in default: pretrain the tiny preset on the built-in generated dataset (1 to 2 minutes on a 2-core
# CPU), draw reconstructions, and probe the encoder linearly. Everything lands in output/demo/.
# One thread: the tiny model's matrices are too small for two threads to pay.
DEMO := output/demo
run: $(VENV)/.installed
	OMP_NUM_THREADS=1 $(PY) -m fastmae pretrain --model mae_vit_tiny_patch4 --input_size 32 --epochs 20 \
		--warmup_epochs 2 --batch_size 64 --blr 5e-3 --norm_pix_loss --num_workers 0 \
		--output_dir $(DEMO) --log_dir $(DEMO) --overwrite
	$(PY) -m fastmae visualize --checkpoint $(DEMO)/checkpoint-last.pth --output $(DEMO)/reconstructions.png
	OMP_NUM_THREADS=1 $(PY) -m fastmae linprobe --checkpoint $(DEMO)/checkpoint-last.pth --pool mean \
		--output_dir $(DEMO)

# The suite runs in TEST_JOBS processes (pytest-xdist; one per core, at most 4; TEST_JOBS=1 runs it in this
# process), each test file whole in one of them: a file's shared set-up (the compile check's worker, a quick
# benchmark run) is then made once.
TEST_JOBS ?= $(shell n=$$(nproc 2>/dev/null || echo 1); [ "$$n" -gt 4 ] && n=4; echo $$n)
test: $(VENV)/.installed
	$(PY) -m pytest tests -q $(if $(filter 1,$(TEST_JOBS)),,-n $(TEST_JOBS) --dist loadscope)

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
