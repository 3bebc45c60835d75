# Two commands for a fresh machine:  make demo  |  make test
VENV   ?= .venv
PY     := $(VENV)/bin/python
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
RUN    ?= runs/demo

.PHONY: demo test bench install clean

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	# torch first and pinned: 2.13.0 resolves to the local CPU wheel, never a CUDA build
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/rnnscope zoo list
	$(BIN)/rnnscope probe zoo:lstm-linux --text zoo/samples/linux.c --out $(RUN) --grad --overwrite
	$(BIN)/rnnscope analyze $(RUN)
	$(BIN)/rnnscope export $(RUN) --feature in_comment --top 10 --out $(RUN)/in_comment.html
	@echo
	@echo "Recorded every state, gate and gradient of zoo:lstm-linux over zoo/samples/linux.c into $(RUN),"
	@echo "found the units that track each feature, and wrote a heatmap to $(RUN)/in_comment.html."
	@echo "Next:  $(BIN)/rnnscope serve $(RUN)    (then open http://127.0.0.1:5006/)"

test: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) benchmarks/probe_overhead.py
	$(PY) benchmarks/record_memory.py
	$(PY) benchmarks/neuron_search.py
	$(PY) benchmarks/dashboard_speed.py

clean:
	rm -rf $(VENV) runs build *.egg-info
