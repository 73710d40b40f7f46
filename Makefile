# The two commands a fresh clone needs (Python 3.11 and pip; the rest comes from PyPI):
#   make demo   venv → install → demo dataset → run configs/demo.yaml → summary
#   make test   venv → install with test deps → pytest
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-readers test-recipes install data clean

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
	$(PY) -m pytest -q -m "not readers and not recipes"

# The real clients (Spark, Hugging Face datasets, Ray, chdb, TFDS…) on the CLI's output;
# Spark needs a Java 17+ runtime (.ci/run installs one).
READERS_STAMP := $(VENV)/.readers-installed
$(READERS_STAMP): $(STAMP)
	$(PY) -m pip install -q -c constraints.txt -e '.[test,demo,readers]'
	touch $(READERS_STAMP)

test-readers: $(READERS_STAMP)
	$(PY) -m pytest -q -m readers

# The Airflow recipe (scripts/launch/airflow_dag.py) loads in a real Airflow with the Beam
# provider (and the Google one, which its Dataflow support needs), in a venv of its own: Airflow's pins and this project's do not meet in one
# environment (the DAG runs layerbeam through LAYERBEAM_PYTHON, as in production).
AIRFLOW_VENV := .venv-airflow
AIRFLOW_STAMP := $(AIRFLOW_VENV)/.installed
$(AIRFLOW_STAMP): constraints-airflow.txt
	$(PYTHON) -m venv $(AIRFLOW_VENV)
	$(AIRFLOW_VENV)/bin/python -m pip install -q -c constraints-airflow.txt "apache-airflow==3.3.2" "apache-airflow-providers-apache-beam==6.3.1" "apache-airflow-providers-google==22.8.0"
	touch $(AIRFLOW_STAMP)

test-recipes: $(STAMP) $(AIRFLOW_STAMP)
	LAYERBEAM_AIRFLOW_PYTHON=$(CURDIR)/$(AIRFLOW_VENV)/bin/python $(PY) -m pytest -q -m recipes

clean:
	rm -rf $(VENV) $(AIRFLOW_VENV) data out .pytest_cache
