# Two commands for a fresh machine:  make demo  |  make test
VENV   ?= .venv
PY     := $(VENV)/bin/python
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
RUN    ?= runs/demo

.PHONY: demo test bench textbook install clean

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
	$(BIN)/rnnscope export $(RUN) --feature in_comment --top 10 --out $(RUN)/in_comment.html --overwrite
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
	$(PY) benchmarks/dashboard_speed.py --chars 20000,1000000 --documents 10000 --tile 10 --keep runs/bench
	$(PY) benchmarks/serve_start.py runs/bench/run1000000
	$(PY) benchmarks/watch_overhead.py

# Gradient flow while a network learns (README, "The textbook story"): three architectures on one corpus with
# the watch on, and a plain RNN under SGD at a rate that explodes, with and without clipping. Resumable.
TB    ?= runs/textbook
TBARGS = --corpus linux --layers 1 --hidden 128 --embed 32 --batch 32 --seq-len 100 --steps 1500 \
         --val-every 500 --watch-every 25 --threads 1
textbook: $(STAMP)
	$(BIN)/rnnscope zoo corpus linux
	for arch in rnn lstm gru; do $(BIN)/rnnscope zoo train --arch $$arch $(TBARGS) --out $(TB)/$$arch || exit 1; done
	$(BIN)/rnnscope zoo train --arch rnn $(TBARGS) --optimizer sgd --lr 12 --min-lr 0.01 --clip 0 --out $(TB)/rnn-sgd-noclip
	$(BIN)/rnnscope zoo train --arch rnn $(TBARGS) --optimizer sgd --lr 12 --min-lr 0.01 --clip 1 --out $(TB)/rnn-sgd-clip

clean:
	rm -rf $(VENV) runs build *.egg-info
