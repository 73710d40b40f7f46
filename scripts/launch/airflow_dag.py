"""Airflow DAG: each day, extract that day's images with layerbeam on Dataflow (GPU workers).

Copy this file into the DAGs folder and set the five values below (or the LAYERBEAM_*
environment variables of the scheduler and workers). The Airflow workers need:

    pip install apache-airflow-providers-apache-beam apache-airflow-providers-google
    python3.11 -m venv /opt/layerbeam/venv && /opt/layerbeam/venv/bin/pip install -c constraints.txt '.[gcp]'

layerbeam lives in its own virtual environment (LAYERBEAM_PYTHON): Airflow's pins and
TensorFlow's do not meet in one environment, and the operator runs any interpreter. The
task runs `$LAYERBEAM_PYTHON -m layerbeam.launch --config=… --input_pattern=…{ds}… …`
(`layerbeam run` with every argument a --name=value flag): the operator turns
`pipeline_options` into those flags.

Each day's shards land in their own folder and each run builds that day's features, so a
retry or a backfill of any date redoes exactly that date. For one dataset over the whole
growing input (incremental builds), drop `{{ ds }}` from both paths.
"""

from __future__ import annotations

import os

import pendulum
from airflow.providers.apache.beam.operators.beam import BeamRunPythonPipelineOperator

try:  # Airflow 3
    from airflow.sdk import DAG
except ImportError:  # Airflow 2
    from airflow import DAG

PROJECT = os.environ.get("LAYERBEAM_PROJECT", "my-project")
REGION = os.environ.get("LAYERBEAM_REGION", "us-central1")
BUCKET = os.environ.get("LAYERBEAM_BUCKET", "gs://my-bucket")
# the worker image built from ./Dockerfile (layerbeam and its pinned dependencies inside)
IMAGE = os.environ.get("LAYERBEAM_IMAGE", "us-central1-docker.pkg.dev/my-project/layerbeam/worker:0.1.0")
# the interpreter of the virtual environment layerbeam[gcp] is installed in
PYTHON = os.environ.get("LAYERBEAM_PYTHON", "/opt/layerbeam/venv/bin/python")
# the job's config; the run's paths below override its input.pattern and output.path
CONFIG = os.environ.get("LAYERBEAM_CONFIG", f"{BUCKET}/layerbeam/configs/dataflow_gpu.yaml")

with DAG(
    dag_id="layerbeam_daily",
    schedule="@daily",
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,  # one build per output at a time
    tags=["layerbeam"],
) as dag:
    extract = BeamRunPythonPipelineOperator(
        task_id="extract_layers",
        runner="DataflowRunner",
        py_interpreter=PYTHON,
        py_options=["-m"],
        py_file="layerbeam.launch",
        pipeline_options={
            "config": CONFIG,
            "input_pattern": BUCKET + "/incoming/{{ ds }}/*.tfrecord",
            "output_path": BUCKET + "/features/mobilenet_v2/{{ ds }}",
            # Beam's Dataflow flags, as scripts/run_dataflow.sh passes them; the image holds
            # the package, so nothing is staged (sdk_location=container)
            "temp_location": f"{BUCKET}/tmp",
            "staging_location": f"{BUCKET}/staging",
            "sdk_container_image": IMAGE,
            "sdk_location": "container",
            "dataflow_service_options": "worker_accelerator=type:nvidia-tesla-t4;count:1;install-nvidia-driver",
            "machine_type": "n1-standard-8",
            "experiments": "no_use_multiple_sdk_containers",
            "disk_size_gb": "50",
            "max_num_workers": "20",
        },
        # a dict, cast by the operator when it runs: this file parses without the Google provider
        dataflow_config={"job_name": "layerbeam-{{ ds_nodash }}", "project_id": PROJECT, "location": REGION},
        retries=1,
    )
