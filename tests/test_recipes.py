"""The launch recipes for scheduled builds (scripts/launch/, README "Scheduled builds"),
each run or validated without a cloud:

- the cron line, run as cron would (its exact command through bash), twice, on the demo
  config and a copy of small demo-like data; and its flock keeping a second run out;
- the Dataflow Flex Template: metadata.json checked against the documented
  TemplateMetadata/ParameterMetadata schema, every parameter taken by the launcher, the
  Cloud Scheduler body's parameters valid for it, the Dockerfile wiring the launcher binary
  and FLEX_TEMPLATE_PYTHON_PY_FILE, and the template's program run as the launcher runs it
  (parameters as --name=value) on DirectRunner;
- the Airflow DAG (marker `recipes`, `make test-recipes`): loaded by a real Airflow's
  DagBag, rendered for one logical date, its command line run by the Beam provider's hook.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from pydantic import BaseModel, ConfigDict, Field

from tests.conftest import ROOT
from tests.objectstores import gcs_server  # noqa: F401  (the local GCS API server)

LAUNCH = ROOT / "scripts" / "launch"
PY = sys.executable
BIN = Path(PY).parent


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(TF_CPP_MIN_LOG_LEVEL="3", PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}", **extra)
    return env


def _rows(out: Path) -> int:
    import layerbeam

    return layerbeam.read(str(out)).num_rows


ROWS = 12


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory) -> Path:
    """A small copy of the demo dataset, made as `make demo` makes it
    (scripts/make_demo_data.py): 12 photo crops in 3 TFRecord shards."""
    import importlib.util

    out = tmp_path_factory.mktemp("demo") / "demo"
    spec = importlib.util.spec_from_file_location("make_demo_data", ROOT / "scripts" / "make_demo_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(["--out", str(out), "--images", str(ROWS), "--shards", "3", "--size", "64"]) in (0, None)
    assert len(list(out.glob("*.tfrecord"))) == 3
    return out


def _day(demo_data: Path, root: Path, day: str) -> Path:
    """The demo shards as one day's input folder."""
    dest = root / day
    dest.mkdir(parents=True)
    for p in sorted(demo_data.glob("*.tfrecord")):
        shutil.copy(p, dest / p.name)
    return dest


# --------------------------------------------------------------------------- the launcher


def test_launcher_turns_flags_into_the_layerbeam_run_command_line():
    from layerbeam.launch import run_command_line

    got = run_command_line([
        "--config=c.yaml", "--input_pattern=gs://b/in/*/*.tfrecord", "--output_path=gs://b/out",
        "--set=batching.batch_size=8", "--overrides=layers.dtype=float16; input.image_size=[96, 96]",
        "--overwrite", "--plan_only=false", "--max_shards=2",
        "--runner=DataflowRunner", "--labels=airflow-version=v3-3-2", "--job_name", "j1", "--setup_file=./pyproject.toml",
    ])
    assert got == [
        "run", "c.yaml", "--set", "input.pattern=gs://b/in/*/*.tfrecord", "--set", "output.path=gs://b/out",
        "--set", "batching.batch_size=8", "--set", "layers.dtype=float16", "--set", "input.image_size=[96, 96]",
        "--overwrite", "--max-shards", "2",
        # Beam's flags pass in order, `--set`'s prefix does not swallow --setup_file
        "--runner=DataflowRunner", "--labels=airflow-version=v3-3-2", "--job_name", "j1", "--setup_file=./pyproject.toml",
    ]
    # a Flex Template passes booleans as strings
    assert run_command_line(["--config=c.yaml", "--overwrite=true", "--plan_only=true"])[2:] == ["--overwrite", "--plan-only"]


def test_launcher_refuses_a_bad_flag_in_one_line(tmp_path):
    proc = subprocess.run([PY, "-m", "layerbeam.launch", "--config=configs/demo.yaml", "--overwrite=maybe"],
                          capture_output=True, text=True, env=_env(), cwd=ROOT, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr == "layerbeam: error: argument --overwrite: 'maybe' is not true or false; see `python -m layerbeam.launch --help`\n"
    proc = subprocess.run([PY, "-m", "layerbeam.launch", "--config=memory://nowhere/job.yaml"],
                          capture_output=True, text=True, env=_env(), cwd=ROOT, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("layerbeam: error: cannot read the config 'memory://nowhere/job.yaml'"), proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_launcher_plan_only_and_the_dataflow_job_id_line_airflow_follows(demo_data, tmp_path):
    """--plan_only runs the CLI's plan. And Beam's "Created job with id: [ID]" INFO line,
    which Airflow's Dataflow hook reads to follow (and cancel) the job, reaches stderr
    although `layerbeam run` silences Beam's log: the line is logged here exactly as Beam's
    Dataflow client logs it (the assertion below checks that client's source)."""
    import apache_beam.runners.dataflow.internal.apiclient as apiclient

    from layerbeam.launch import _JOB_ID_LOGGER

    source = Path(apiclient.__file__).read_text()
    assert apiclient.__name__ == _JOB_ID_LOGGER and "_LOGGER = logging.getLogger(__name__)" in source
    assert "_LOGGER.info('Created job with id: [%s]', response.id)" in source

    folder = demo_data
    code = (
        "import logging, sys\n"
        "from layerbeam.launch import main\n"
        f"rc = main(['--config=configs/demo.yaml', '--input_pattern={folder}/*.tfrecord', '--output_path={tmp_path / 'out'}', '--plan_only'])\n"
        f"logging.getLogger({_JOB_ID_LOGGER!r}).info('Created job with id: [%s]', '2026-11-27_03_15_00-123')\n"
        "sys.exit(rc)\n"
    )
    proc = subprocess.run([PY, "-c", code], capture_output=True, text=True, env=_env(), cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "size plan" in proc.stdout and "3 shards" in proc.stdout, proc.stdout
    # the pattern Airflow's Google provider matches (airflow.providers.google.cloud.hooks.dataflow.JOB_ID_PATTERN)
    m = re.search(r"Submitted job: (?P<java>[^\"\n\s]*)|Created job with id: \[(?P<python>[^\"\n\s]*)\]", proc.stderr)
    assert m and m.group("python") == "2026-11-27_03_15_00-123", proc.stderr[-2000:]
    # the very line tests/airflow_dag_check.py feeds to that provider's own callback
    assert re.search(r"^\d\d:\d\d:\d\d apache_beam\.runners\.dataflow\.internal\.apiclient Created job with id: \[2026-11-27_03_15_00-123\]$", proc.stderr, re.M), proc.stderr[-2000:]
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- cron


def _cron_jobs(path: Path) -> tuple[dict, list[str]]:
    """(environment lines, commands) of a crontab, as cron reads them: `NAME=value` lines
    set the environment; a job line is five time fields and the command, in which an
    unescaped % would be a newline and `\\%` is a %."""
    env, commands = {}, []
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        m = re.match(r"^([A-Za-z_][A-Za-z0-9_]*)\s*=\s*(.*)$", line)
        if m:
            env[m.group(1)] = m.group(2)
            continue
        fields = line.split(None, 5)
        assert len(fields) == 6, f"not a cron job line: {line}"
        for f in fields[:5]:
            assert re.fullmatch(r"[\d*/,\-]+", f), f"bad time field {f!r} in {line}"
        command = fields[5]
        assert not re.search(r"(?<!\\)%", command), "an unescaped % is a newline to cron"
        commands.append(command.replace("\\%", "%"))
    return env, commands


@pytest.fixture
def cron_home(demo_data, tmp_path):
    """LAYERBEAM_HOME as the recipe expects it: the demo config, the venv, and a day of
    input under data/incoming/."""
    home = tmp_path / "layerbeam"
    (home / "configs").mkdir(parents=True)
    shutil.copy(ROOT / "configs" / "demo.yaml", home / "configs" / "demo.yaml")
    (home / ".venv").symlink_to(BIN.parent)
    _day(demo_data, home / "data" / "incoming", "2026-11-26")
    return home


def _run_cron(command: str, env: dict, home: Path) -> subprocess.CompletedProcess:
    # cron runs the line with SHELL (the recipe sets /bin/bash) as `$SHELL -c LINE`
    assert env.get("SHELL") == "/bin/bash"
    return subprocess.run([env["SHELL"], "-c", command], capture_output=True, text=True,
                          env=_env(**dict(env, LAYERBEAM_HOME=str(home))), timeout=600)


def test_cron_line_runs_twice_with_exit_0_and_a_dated_log(cron_home):
    env, commands = _cron_jobs(LAUNCH / "layerbeam.cron")
    assert len(commands) == 1 and "LAYERBEAM_HOME" in env
    command = commands[0]
    assert "flock -n" in command and ">>" in command and "$(date +%F)" in command
    out = cron_home / "out" / "demo"
    for attempt in (1, 2):
        t0 = time.perf_counter()
        proc = _run_cron(command, env, cron_home)
        log = cron_home / "logs" / f"layerbeam-{time.strftime('%Y-%m-%d')}.log"
        text = log.read_text() if log.exists() else ""
        print(f"cron run {attempt}: exit {proc.returncode} in {time.perf_counter() - t0:.1f} s; log tail: {text.strip().splitlines()[-1:] if text else None}")
        assert proc.returncode == 0, text[-3000:] + proc.stderr[-2000:]
        assert proc.stdout == "" and proc.stderr == "", "everything goes to the log"
        assert (out / "_SUCCESS").exists() and _rows(out) == ROWS
    manifest = json.loads((out / "_manifest.json").read_text())
    assert manifest["config"]["input"]["pattern"] == "data/incoming/*/*.tfrecord"


def test_cron_lines_flock_keeps_a_second_run_out_while_one_runs(cron_home):
    env, (command,) = _cron_jobs(LAUNCH / "layerbeam.cron")
    (cron_home / "logs").mkdir()
    # a run in progress: something holds the recipe's lock file
    holder = subprocess.Popen(["flock", str(cron_home / "logs" / ".layerbeam.lock"), "sleep", "60"])
    try:
        deadline = time.time() + 10
        while time.time() < deadline and subprocess.run(["flock", "-n", str(cron_home / "logs" / ".layerbeam.lock"), "true"]).returncode == 0:
            time.sleep(0.1)  # until the holder has the lock
        t0 = time.perf_counter()
        proc = _run_cron(command, env, cron_home)
        assert proc.returncode == 1, "flock -n exits 1 when the lock is held"
        assert time.perf_counter() - t0 < 10, "the second run must not wait"
        assert not (cron_home / "out").exists(), "the second run wrote output"
    finally:
        holder.kill()
        holder.wait()


# --------------------------------------------------------------------------- Flex Template


class ParameterMetadata(BaseModel):
    """Dataflow's ParameterMetadata, as its REST reference documents it (name, label and
    helpText required; isOptional defaults to false; regexes: the value must match them)."""

    model_config = ConfigDict(extra="forbid", strict=True)
    name: str = Field(pattern=r"^[A-Za-z][A-Za-z0-9_]*$")
    label: str = Field(min_length=1)
    helpText: str = Field(min_length=1)
    isOptional: bool = False
    regexes: list[str] = []


class TemplateMetadata(BaseModel):
    """Dataflow's TemplateMetadata: name required, description optional, parameters."""

    model_config = ConfigDict(extra="forbid", strict=True)
    name: str = Field(min_length=1)
    description: str | None = None
    parameters: list[ParameterMetadata] = []


def _metadata() -> TemplateMetadata:
    return TemplateMetadata.model_validate(json.loads((LAUNCH / "metadata.json").read_text()))


def _matches(param: ParameterMetadata, value: str) -> bool:
    return all(re.search(r, value) for r in param.regexes)


def test_flex_metadata_is_valid_and_every_parameter_is_a_launcher_flag():
    from layerbeam.launch import _parser

    meta = _metadata()
    names = [p.name for p in meta.parameters]
    assert len(names) == len(set(names)), "a parameter is declared twice"
    assert [p.name for p in meta.parameters if not p.isOptional] == ["config"]
    parser = _parser()
    for p in meta.parameters:
        for r in p.regexes:
            re.compile(r)
        # the help text's example is a value the template accepts, and the launcher parses
        example = re.search(r"Example: (\S+)", p.helpText)
        value = example.group(1) if example else {"overwrite": "true", "max_dead_letter_fraction": "0.25"}[p.name]
        assert _matches(p, value), (p.name, value)
        args, unknown = parser.parse_known_args(["--config=c.yaml", f"--{p.name}={value}"])
        assert unknown == [], f"the launcher does not take --{p.name}"
    bad = {"config": "configs/demo.yaml", "input_pattern": "/local/*.tfrecord", "overwrite": "yes", "overrides": "no equals sign",
           "max_dead_letter_fraction": "2"}
    for p in meta.parameters:
        if p.name in bad:
            assert not _matches(p, bad[p.name]), f"{p.name} accepts {bad[p.name]!r}"


def test_cloud_scheduler_body_launches_the_template_with_valid_parameters():
    """scripts/launch/scheduler_body.json (the Cloud Scheduler job's POST body to
    flexTemplates:launch): every declared parameter it sets matches its regexes, the
    required ones are there, and the rest are Beam pipeline options the launcher passes on."""
    from apache_beam.options.pipeline_options import PipelineOptions

    body = json.loads((LAUNCH / "scheduler_body.json").read_text())
    launch = body["launchParameter"]
    assert set(launch) <= {"jobName", "parameters", "launchOptions", "environment", "update", "transformNameMappings", "containerSpecGcsPath"}
    assert launch["containerSpecGcsPath"].startswith("gs://") and re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", launch["jobName"])
    declared = {p.name: p for p in _metadata().parameters}
    params = launch["parameters"]
    assert all(isinstance(v, str) for v in params.values()), "the API takes strings"
    assert {n for n, p in declared.items() if not p.isOptional} <= set(params)
    parsers: list = []
    PipelineOptions([]).get_all_options(add_extra_args_fn=parsers.append, display_warnings=False)
    for name, value in params.items():
        if name in declared:
            assert _matches(declared[name], value), (name, value)
        else:
            _, unknown = parsers[0].parse_known_args([f"--{name}={value}"])
            assert unknown == [], f"{name} is neither a template parameter nor a Beam option"


def test_dockerfile_makes_the_worker_image_a_flex_template_launcher():
    text = (ROOT / "Dockerfile").read_text()
    args = dict(re.findall(r"^ARG (\w+)=(\S+)$", text, flags=re.M))
    launcher = args["FLEX_LAUNCHER_IMAGE"]
    assert launcher.startswith(f"gcr.io/dataflow-templates-base/python{args['PY_VERSION'].replace('.', '')}-template-launcher-base"), "the launcher's Python must be the image's"
    assert "FROM ${FLEX_LAUNCHER_IMAGE} AS flex_launcher" in text
    assert "COPY --from=flex_launcher /opt/google/dataflow/python_template_launcher /opt/google/dataflow/python_template_launcher" in text
    py_file = re.search(r"^ENV FLEX_TEMPLATE_PYTHON_PY_FILE=(\S+)$", text, flags=re.M).group(1)
    workdir = re.search(r"^WORKDIR (\S+)$", text, flags=re.M).group(1)
    rel = Path(py_file).relative_to(workdir)
    copied = [c for c in re.findall(r"^COPY (?!--from)(\S+) (\S+)$", text, flags=re.M) if c[0] == str(rel)]
    assert copied and (ROOT / rel).is_file(), f"{py_file} is not copied from the repository"
    assert text.rstrip().endswith('ENTRYPOINT ["/opt/apache/beam/boot"]'), "workers start through Beam's boot"
    assert "COPY configs ./configs" in text  # config=/opt/layerbeam/configs/... in the template's examples


def test_flex_template_program_runs_the_demo_config_as_the_launcher_runs_it(demo_data, tmp_path):
    """The Dockerfile's FLEX_TEMPLATE_PYTHON_PY_FILE, started as Dataflow's launcher starts
    it (`python FILE --PARAM=VALUE ... --runner=... --job_name=...`), with the demo config
    and the template's parameters, on DirectRunner: a real tiny run."""
    folder = demo_data
    out = tmp_path / "out"
    params = {"config": str(ROOT / "configs" / "demo.yaml"), "input_pattern": f"{folder}/*.tfrecord", "output_path": str(out),
              "overrides": "batching.batch_size=4;output.partition_by=[]", "overwrite": "false", "max_dead_letter_fraction": "0.2"}
    assert set(params) == {p.name for p in _metadata().parameters}
    argv = [f"--{k}={v}" for k, v in params.items()] + ["--runner=DirectRunner", "--job_name=layerbeam-daily"]
    proc = subprocess.run([PY, str(LAUNCH / "flex_template_main.py"), *argv], capture_output=True, text=True, env=_env(), cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "_SUCCESS").exists() and _rows(out) == ROWS
    manifest = json.loads((out / "_manifest.json").read_text())
    assert manifest["config"]["batching"]["batch_size"] == 4 and manifest["config"]["output"]["partition_by"] == []


# --------------------------------------------------------------------------- Airflow


@pytest.mark.recipes
def test_airflow_dag_loads_renders_a_day_and_its_command_runs(demo_data, tmp_path):
    """scripts/launch/airflow_dag.py in a real Airflow (LAYERBEAM_AIRFLOW_PYTHON: the venv
    `make test-recipes` builds): DagBag imports it without errors; its task, rendered for
    the logical date 2026-11-26, reads that day's folder and writes that day's output; the
    Beam provider's hook runs the rendered command (DirectRunner in place of Dataflow)
    through the project's interpreter, and the day's dataset is there."""
    airflow_py = os.environ.get("LAYERBEAM_AIRFLOW_PYTHON")
    if not airflow_py:
        pytest.skip("needs Airflow's venv: make test-recipes")
    bucket = tmp_path / "bucket"
    _day(demo_data, bucket / "incoming", "2026-11-26")
    env = _env(
        AIRFLOW_HOME=str(tmp_path / "airflow"), AIRFLOW__CORE__LOAD_EXAMPLES="False", AIRFLOW__CORE__DAGS_FOLDER=str(LAUNCH),
        LAYERBEAM_BUCKET=str(bucket), LAYERBEAM_PYTHON=PY, LAYERBEAM_CONFIG=str(ROOT / "configs" / "demo.yaml"),
    )
    proc = subprocess.run([airflow_py, str(ROOT / "tests" / "airflow_dag_check.py"), str(LAUNCH / "airflow_dag.py"), "2026-11-26"],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    print(json.dumps({k: got[k] for k in ("schedule", "runner", "command")}, indent=1))
    assert "import_errors" not in got, got
    assert got["schedule"] == "@daily" and got["operator"] == "BeamRunPythonPipelineOperator" and got["runner"] == "DataflowRunner"
    opts = got["pipeline_options"]
    assert opts["input_pattern"] == f"{bucket}/incoming/2026-11-26/*.tfrecord"
    assert opts["output_path"] == f"{bucket}/features/mobilenet_v2/2026-11-26"
    assert got["dataflow_config"]["job_name"] == "layerbeam-20261126"
    assert got["command"][:4] == [PY, "-m", "layerbeam.launch", "--runner=DirectRunner"]
    assert f"--input_pattern={bucket}/incoming/2026-11-26/*.tfrecord" in got["command"]
    assert got["ok"], got.get("error")
    assert got["job_id_seen"] == ["2026-11-27_03_15_00-123"], "Airflow would not find the Dataflow job's id"
    out = bucket / "features" / "mobilenet_v2" / "2026-11-26"
    assert (out / "_SUCCESS").exists() and _rows(out) == ROWS


def test_flex_template_launch_writes_the_job_and_waits_for_nothing(demo_data, tmp_path, gcs_server):
    """How Dataflow's launcher really runs the program: DataflowRunner with
    --template_location (it reads the job from there and submits it itself). Against a local
    GCS API server: the job file is written, with the worker image and the run's steps; no
    job is waited for, nothing is published, no lock is left behind."""
    import fsspec

    prefix = f"gs://{gcs_server.bucket}/flex-{os.getpid()}"
    job_file = f"{prefix}/staging/template_launches/2026-11-27_03_15_00-1/job_object"
    image = "us-central1-docker.pkg.dev/my-project/layerbeam/worker:0.1.0"
    out = tmp_path / "out"
    argv = [f"--config={ROOT / 'configs' / 'demo.yaml'}", f"--input_pattern={demo_data}/*.tfrecord", f"--output_path={out}",
            "--runner=DataflowRunner", "--project=my-project", "--region=us-central1", f"--temp_location={prefix}/tmp",
            f"--staging_location={prefix}/staging", f"--template_location={job_file}", f"--sdk_container_image={image}", "--job_name=layerbeam-daily"]
    # NO_GCE_CHECK: no credentials here, and none looked for on a metadata server; Beam's
    # GCS client is then anonymous, and reaches the local server through STORAGE_EMULATOR_HOST
    proc = subprocess.run([PY, str(LAUNCH / "flex_template_main.py"), *argv], capture_output=True, text=True,
                          env=_env(NO_GCE_CHECK="True"), cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout[proc.stdout.index("{\n"):])
    assert summary["_template"] == job_file and summary["runner"] == "DataflowRunner"
    assert "A template was just created at location" in proc.stderr
    with fsspec.open(job_file, "r") as f:
        job = json.load(f)
    text = json.dumps(job)
    assert job["name"] == "layerbeam-daily" and image in text
    assert {"MatchShards/Expand", "ExtractShards/ExtractAndWrite"} <= set(summary["transforms"])
    assert not (out / "_SUCCESS").exists() and not out.exists()
    staging = Path(f"{out}.layerbeam-staging")
    assert not list(staging.glob("_lock.*")), "a template launch must not leave the output locked"


def _readme_section() -> str:
    text = (ROOT / "README.md").read_text()
    start = text.index("### Launch recipes")
    return text[start:text.index("\n## ", start)]


def test_readme_recipes_are_the_files_and_name_real_parameters():
    """The README's cron block is the recipe file's lines; its `gcloud dataflow
    flex-template run` sets declared parameters with valid values, or Beam options."""
    from apache_beam.options.pipeline_options import PipelineOptions

    section = _readme_section()
    blocks = re.findall(r"```[a-z]*\n(.*?)```", section, flags=re.S)
    cron_file = [line for line in (LAUNCH / "layerbeam.cron").read_text().splitlines() if line.strip() and not line.startswith("#")]
    assert blocks[0].strip().splitlines() == cron_file
    for path in re.findall(r"`(scripts/launch/[^`\s]+)`", section):
        assert (ROOT / path).exists(), path
    run = next(b for b in blocks if "flex-template run" in b)
    declared = {p.name: p for p in _metadata().parameters}
    parsers: list = []
    PipelineOptions([]).get_all_options(add_extra_args_fn=parsers.append, display_warnings=False)
    seen = set()
    for raw in re.findall(r"--parameters=(\S+)", run.replace("\\\n", " ")):
        raw = raw.replace("'", "").replace("$IMAGE", "us-central1-docker.pkg.dev/p/r/worker:1")
        sep = ","
        if raw.startswith("^"):  # gcloud's custom delimiter: ^DELIM^key=value
            sep, raw = raw[1], raw[3:]
        for pair in raw.split(sep):
            name, value = pair.split("=", 1)
            seen.add(name)
            if name in declared:
                assert _matches(declared[name], value), (name, value)
            else:
                assert parsers[0].parse_known_args([f"--{name}={value}"])[1] == [], name
    assert {"config", "input_pattern", "output_path", "sdk_container_image"} <= seen
