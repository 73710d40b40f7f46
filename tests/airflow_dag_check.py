"""Run by the Airflow venv's interpreter (`make test-recipes`), never imported by pytest:
loads scripts/launch/airflow_dag.py in a real Airflow, renders its task for one logical
date, and runs the rendered task's command line through the Beam provider's own hook with
DirectRunner in place of DataflowRunner.

    python tests/airflow_dag_check.py DAG_FILE DS    # prints one JSON document on the last line

The DAG's settings come from the LAYERBEAM_* environment variables (the test points them
at local folders and at the project's venv).
"""

from __future__ import annotations

import json
import sys


def main(dag_file: str, ds: str) -> int:
    import pendulum

    try:  # Airflow 3.1+
        from airflow.dag_processing.dagbag import DagBag
    except ImportError:
        from airflow.models.dagbag import DagBag

    bag = DagBag(dag_folder=dag_file)  # examples: off through AIRFLOW__CORE__LOAD_EXAMPLES
    if bag.import_errors:
        print(json.dumps({"import_errors": {k: str(v) for k, v in bag.import_errors.items()}}))
        return 1
    dag = bag.dags["layerbeam_daily"]
    task = dag.get_task("extract_layers")
    when = pendulum.parse(ds)
    # the template variables Airflow sets for a run of this logical date
    context = {"ds": when.to_date_string(), "ds_nodash": when.format("YYYYMMDD"), "logical_date": when, "dag": dag, "task": task}
    task.render_template_fields(context, jinja_env=dag.get_template_env())
    rendered = {
        "dag_id": dag.dag_id,
        "schedule": str(getattr(dag, "schedule", None) or dag.timetable.summary),
        "operator": type(task).__name__,
        "runner": task.runner,
        "py_interpreter": task.py_interpreter,
        "py_options": task.py_options,
        "py_file": task.py_file,
        "pipeline_options": task.pipeline_options,
        "dataflow_config": task.dataflow_config,
    }

    # What execute() does for a runner other than Dataflow: the hook builds
    # `PY_INTERPRETER *PY_OPTIONS PY_FILE --runner=R --key=value ...` and runs it.
    import subprocess

    from airflow.providers.apache.beam.hooks.beam import BeamHook, beam_options_to_args

    # Note the command the hook starts (it logs it too, but through structlog); the process
    # itself runs unchanged.
    started: list[list[str]] = []
    popen = subprocess.Popen

    def recording_popen(cmd, *a, **kw):
        if isinstance(cmd, list) and any(str(c).startswith("--runner=") for c in cmd):
            started.append([str(c) for c in cmd])
        return popen(cmd, *a, **kw)

    subprocess.Popen = recording_popen
    options = dict(task.pipeline_options)
    rendered["args"] = beam_options_to_args(options)
    try:
        BeamHook(runner="DirectRunner").start_python_pipeline(variables=options, py_file=task.py_file, py_options=task.py_options, py_interpreter=task.py_interpreter)
        rendered["ok"] = True
    except Exception as e:  # the hook raises AirflowException on a non-zero exit
        rendered["ok"] = False
        rendered["error"] = str(e)
    finally:
        subprocess.Popen = popen
    rendered["command"] = started[0] if started else None

    # On Dataflow the operator learns the job's id from the launcher's output, with the
    # Google provider's callback: fed the line `python -m layerbeam.launch` prints for it
    # (Beam's own INFO line, in layerbeam's log format).
    from airflow.providers.google.cloud.hooks.dataflow import process_line_and_extract_dataflow_job_id_callback

    seen: list[str] = []
    callback = process_line_and_extract_dataflow_job_id_callback(on_new_job_id_callback=seen.append)
    callback("03:15:07 apache_beam.runners.dataflow.internal.apiclient Created job with id: [%s]" % "2026-11-27_03_15_00-123")
    rendered["job_id_seen"] = seen
    print(json.dumps(rendered, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))
