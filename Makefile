# The two commands a fresh clone needs (Python 3.11 and pip; the rest comes from PyPI):
#   make demo   venv → install → demo dataset → run configs/demo.yaml → summary
#   make test   venv → install with test deps → pytest
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-readers install data clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[test,demo,tfds]'
	touch $(STAMP)

install: $(STAMP)

data/demo/_DONE: $(STAMP) scripts/make_demo_data.py
	$(PY) scripts/make_demo_data.py --out data/demo --images 320 --shards 4
	touch $@

data: data/demo/_DONE

demo: data/demo/_DONE
	$(VENV)/bin/layerbeam run configs/demo.yaml --overwrite

test: $(STAMP)
	$(PY) -m pytest -q -m "not readers"

# The real clients (Spark, Hugging Face datasets, Ray, chdb, TFDS…) on the CLI's output;
# Spark needs a Java 17+ runtime (.ci/run installs one).
READERS_STAMP := $(VENV)/.readers-installed
$(READERS_STAMP): $(STAMP)
	$(PY) -m pip install -q -c constraints.txt -e '.[test,demo,readers]'
	touch $(READERS_STAMP)

test-readers: $(READERS_STAMP)
	$(PY) -m pytest -q -m readers

clean:
	rm -rf $(VENV) data out .pytest_cache
