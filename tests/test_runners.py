"""The same job on every runner layerbeam supports: identical rows from DirectRunner's three
running modes and from a real portable runner (Beam's local job service, LOOPBACK and
EXTERNAL workers), one model load per worker process, and the Dataflow launch recipe
(Dockerfile pins, the sdist Beam's stager builds, the job graph built without submitting).

Every process started here listens on loopback only, is bounded in time, and is stopped in
fixture teardown even when a test fails.
"""

from __future__ import annotations

import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from layerbeam.run import run_job
from layerbeam.config import load_config
from layerbeam.transforms.readback import to_arrow
from tests.conftest import ROOT, base_config

PY = sys.executable
JOB_SECONDS = 240  # a portable job that runs longer than this has its services killed


# --------------------------------------------------------------------------- helpers


def _config(tmp: Path, pattern: str, out: Path, **overrides):
    """The tiny test config (MobileNetV2 alpha 0.35 at 64 px), one pooled and one raw output."""
    cfg = base_config(pattern, str(out), **overrides)
    cfg["layers"]["select"] = ["block_1_expand_relu", {"layer": "block_3_expand_relu", "reduce": "none"}]
    path = tmp / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return load_config(str(path), [])


def _rows(out: Path) -> dict[str, dict]:
    """{key: {column: value}}: every row the job wrote, tensors as numpy arrays."""
    table = to_arrow(str(out))
    cols = {}
    for name in table.column_names:
        col = table.column(name).combine_chunks()
        cols[name] = col.to_numpy_ndarray() if hasattr(col, "to_numpy_ndarray") else col.to_pylist()
    keys = cols["key"]
    return {k: {name: v[i] for name, v in cols.items()} for i, k in enumerate(keys)}


def _assert_same_rows(got: dict, want: dict) -> None:
    assert sorted(got) == sorted(want), "different keys"
    for key, row in want.items():
        assert sorted(got[key]) == sorted(row), f"{key}: different columns"
        for col, value in row.items():
            if isinstance(value, np.ndarray):
                np.testing.assert_array_equal(got[key][col], value, err_msg=f"{key}.{col}")
            else:
                assert got[key][col] == value, f"{key}.{col}"


def _env() -> dict[str, str]:
    """Environment for Beam services and the workers they start: this interpreter first on
    PATH (Beam's worker pool starts workers as plain `python`), where `layerbeam` is
    installed; nothing is added to PYTHONPATH."""
    return dict(
        os.environ,
        PATH=os.pathsep.join([str(Path(PY).parent), os.environ.get("PATH", "")]),
        TF_CPP_MIN_LOG_LEVEL="3",
    )


class _Service:
    """A background process in its own process group, port read from a file it writes."""

    def __init__(self, argv: list[str], folder: Path, name: str):
        self.port_file = folder / f"{name}.port"
        self.log = folder / f"{name}.log"
        self._log = open(self.log, "w")
        argv = [a.replace("{port_file}", str(self.port_file)) for a in argv]
        self.proc = subprocess.Popen(argv, stdout=self._log, stderr=subprocess.STDOUT, env=_env(), start_new_session=True)

    def wait_port(self, timeout: float = 60) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.port_file.exists():
                return int(self.port_file.read_text())
            if self.proc.poll() is not None:
                break
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"{self.log.name}: no port after {timeout}s (exit {self.proc.poll()}):\n{self.log.read_text()[-3000:]}")

    def stop(self) -> None:
        """SIGTERM the group (the service and the workers it started), SIGKILL after 10 s."""
        if self.proc.poll() is None:
            for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
                try:
                    os.killpg(self.proc.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    self.proc.wait(wait)
                    break
                except subprocess.TimeoutExpired:
                    continue
        else:  # the leader is gone; its workers may not be
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self._log.close()


# Beam's worker_pool_main, bound to 127.0.0.1 instead of [::] and on a port it picks
# itself (written to a file: no race for a free port). Same servicer, same worker command.
_WORKER_POOL = """
import os, sys, time, grpc
from apache_beam.portability.api import beam_fn_api_pb2_grpc
from apache_beam.runners.worker.worker_pool_main import BeamFnExternalWorkerPoolServicer
from apache_beam.utils import thread_pool_executor
server = grpc.server(thread_pool_executor.shared_unbounded_instance())
port = server.add_insecure_port("127.0.0.1:0")
beam_fn_api_pb2_grpc.add_BeamFnExternalWorkerPoolServicer_to_server(BeamFnExternalWorkerPoolServicer(use_process=True), server)
server.start()
with open(sys.argv[1] + ".tmp", "w") as f:
    f.write(str(port))
os.rename(sys.argv[1] + ".tmp", sys.argv[1])
while True:
    time.sleep(3600)
"""


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def reference(png_dataset, tmp_path_factory):
    """The in-process default (FnApiRunner, in_memory): (pattern, rows, metrics)."""
    folder, _, _ = png_dataset
    tmp = tmp_path_factory.mktemp("runners")
    pattern = f"{folder}/*.tfrecord"
    manifest = run_job(_config(tmp, pattern, tmp / "in_memory"), ["--direct_running_mode=in_memory"])
    return pattern, _rows(tmp / "in_memory"), manifest["_metrics"]


@pytest.fixture(scope="module")
def job_service(tmp_path_factory):
    """Beam's local job service on 127.0.0.1 (it binds `localhost`), port picked by itself."""
    folder = tmp_path_factory.mktemp("job_service")
    svc = _Service(
        [PY, "-m", "apache_beam.runners.portability.local_job_service_main", "--port=0", f"--staging_dir={folder / 'staging'}", "--port_file={port_file}"],
        folder, "job_service",
    )
    try:
        yield svc, svc.wait_port()
    finally:
        svc.stop()


@pytest.fixture(scope="module")
def worker_pool(tmp_path_factory):
    folder = tmp_path_factory.mktemp("worker_pool")
    svc = _Service([PY, "-c", _WORKER_POOL, "{port_file}"], folder, "worker_pool")
    try:
        yield svc, svc.wait_port()
    finally:
        svc.stop()


def _run_bounded(cfg, beam_args: list[str], services: list[_Service]) -> dict:
    """run_job, with the services killed (so the job fails) if it takes over JOB_SECONDS."""
    timer = threading.Timer(JOB_SECONDS, lambda: [s.stop() for s in services])
    timer.start()
    try:
        return run_job(cfg, beam_args)
    finally:
        timer.cancel()


# --------------------------------------------------------------------------- DirectRunner modes


def test_processor_is_built_once_per_process_not_per_dofn_copy_or_thread(reference, tmp_path):
    """Each bundle/thread gets its own unpickled DoFn; all of them share one ShardProcessor."""
    from layerbeam.transforms.beam import _ExtractShardDoFn

    pattern, _, _ = reference
    cfg = _config(tmp_path, pattern, tmp_path / "unused")
    from layerbeam.plan import prepare

    plan = prepare(cfg)
    proto = _ExtractShardDoFn(plan.spec, plan.run_id)
    copies = [pickle.loads(pickle.dumps(proto)) for _ in range(4)]
    threads = [threading.Thread(target=c.setup) for c in copies]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    processors = {id(c._processor) for c in copies}
    assert len(processors) == 1, f"{len(processors)} processors built for 4 DoFn copies in one process"


def test_in_memory_loads_the_model_once(reference):
    _, rows, metrics = reference
    assert len(rows) == 10
    assert metrics["shards"] == 3
    assert metrics["model_loads"] == 1
    # The worker ran in the launcher's process and took the model the checks loaded.
    assert metrics["launcher_model_reused"] == 1


@pytest.mark.parametrize(
    "mode, max_loads, reused",
    [
        ("multi_threading", 1, 1),  # two worker threads, one process: one model, the launcher's
        ("multi_processing", 2, 0),  # two worker processes: at most one model each, their own
    ],
)
def test_direct_modes_write_identical_rows(reference, tmp_path, mode, max_loads, reused):
    pattern, want, _ = reference
    out = tmp_path / mode
    manifest = run_job(_config(tmp_path, pattern, out), [f"--direct_running_mode={mode}", "--direct_num_workers=2"])
    _assert_same_rows(_rows(out), want)
    metrics = manifest["_metrics"]
    print(f"{mode}: {metrics}")
    assert metrics["shards"] == 3
    assert 1 <= metrics["model_loads"] <= max_loads, metrics
    # multi_processing's rows equal in_memory's: a worker's own model and the launcher's agree.
    assert metrics.get("launcher_model_reused", 0) == reused, metrics


# --------------------------------------------------------------------------- a real portable runner


def test_portable_runner_loopback(reference, job_service, tmp_path):
    """Job service in its own process; the SDK worker runs in this (the launcher) process."""
    pattern, want, _ = reference
    svc, port = job_service
    out = tmp_path / "loopback"
    manifest = _run_bounded(
        _config(tmp_path, pattern, out),
        ["--runner=PortableRunner", f"--job_endpoint=127.0.0.1:{port}", "--environment_type=LOOPBACK"],
        [svc],
    )
    _assert_same_rows(_rows(out), want)
    print(f"{out.name}: {manifest['_metrics']}")
    assert manifest["_metrics"]["model_loads"] == 1, manifest["_metrics"]


def test_portable_runner_external_worker_pool(reference, job_service, worker_pool, tmp_path):
    """Workers are separate processes started by a worker pool, as on Flink: everything the
    job needs travels pickled, nothing comes from the launcher's memory."""
    pattern, want, _ = reference
    (svc, port), (pool, pool_port) = job_service, worker_pool
    out = tmp_path / "external"
    manifest = _run_bounded(
        _config(tmp_path, pattern, out),
        [
            "--runner=PortableRunner",
            f"--job_endpoint=127.0.0.1:{port}",
            "--environment_type=EXTERNAL",
            f"--environment_config=127.0.0.1:{pool_port}",
        ],
        [svc, pool],
    )
    _assert_same_rows(_rows(out), want)
    print(f"{out.name}: {manifest['_metrics']}")
    assert manifest["_metrics"]["model_loads"] == 1, manifest["_metrics"]
    assert manifest["_metrics"].get("launcher_model_reused", 0) == 0, manifest["_metrics"]
    assert manifest["_metrics"]["shards"] == 3


# --------------------------------------------------------------------------- Dataflow recipe


def _pin(package: str) -> str:
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        name, _, version = line.partition("==")
        if name.strip().lower() == package:
            return version.strip()
    raise AssertionError(f"{package} is not pinned in constraints.txt")


def test_dockerfile_uses_the_pinned_beam_and_tensorflow():
    text = (ROOT / "Dockerfile").read_text()
    args = dict(re.findall(r"^ARG (\w+)=(\S+)$", text, flags=re.M))
    assert args["BEAM_VERSION"] == _pin("apache-beam"), "Dockerfile's BEAM_VERSION differs from constraints.txt"
    assert args["TF_VERSION"] == _pin("tensorflow"), "Dockerfile's TF_VERSION differs from constraints.txt"
    assert args["PY_VERSION"] == f"{sys.version_info.major}.{sys.version_info.minor}", "workers must run the launcher's Python"
    assert "FROM apache/beam_python${PY_VERSION}_sdk:${BEAM_VERSION} AS beam_sdk" in text
    assert "COPY --from=beam_sdk /opt/apache/beam /opt/apache/beam" in text
    assert 'ENTRYPOINT ["/opt/apache/beam/boot"]' in text


@pytest.mark.slow
def test_sdist_builds_as_beams_stager_does_and_installs_into_a_clean_venv(tmp_path):
    """Beam's own stager builds the sdist (`python -m build --sdist --no-isolation`); it
    installs into a fresh venv and imports from there. The venv sees the shared venv's
    site-packages through a .pth file (as --system-site-packages would, for a venv), so
    the dependencies are not downloaded again; the package is installed with --no-deps."""
    from apache_beam.runners.portability.stager import Stager

    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".git", ".venv", "data", "out", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache"))
    (tmp_path / "dist").mkdir()
    sdist = Path(Stager._build_setup_package(str(src / "pyproject.toml"), str(tmp_path / "dist")))
    assert sdist.name == "layerbeam-0.1.0.tar.gz"

    venv = tmp_path / "venv"
    subprocess.run([PY, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    vpy = venv / "bin" / "python"
    site = subprocess.run([str(vpy), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], capture_output=True, text=True, check=True).stdout.strip()
    shared = subprocess.run([PY, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], capture_output=True, text=True, check=True).stdout.strip()
    (Path(site) / "_shared_deps.pth").write_text(shared + "\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    subprocess.run([str(vpy), "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index", str(sdist)], check=True, env=env, cwd=tmp_path, timeout=300)
    got = subprocess.run(
        [str(vpy), "-c", "import layerbeam, layerbeam.run, layerbeam.cli, layerbeam.config, layerbeam.transforms.errors; print(layerbeam.__file__)"],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300,
    )
    assert got.returncode == 0, got.stderr[-2000:]
    assert Path(got.stdout.strip()).is_relative_to(venv), f"imported from {got.stdout.strip()}, not the clean venv"
    cli = subprocess.run([str(venv / "bin" / "layerbeam"), "layers", "--help"], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert cli.returncode == 0 and "--input-shape" in cli.stdout, cli.stderr[-2000:]


def test_dataflow_job_graph_builds_from_the_launch_script_without_submitting(png_dataset, tmp_path):
    """scripts/run_dataflow.sh with --dry_run=True: Beam's DataflowRunner validates the
    options, builds the sdist, and translates the graph into the job it would submit."""
    import json

    folder, _, _ = png_dataset
    image = "us-central1-docker.pkg.dev/my-project/layerbeam/worker:0.1.0"
    env = dict(_env(), PROJECT="my-project", REGION="us-central1", BUCKET="gs://my-bucket", IMAGE=image, PYTHON=PY)
    proc = subprocess.run(
        [
            "bash", str(ROOT / "scripts" / "run_dataflow.sh"),
            "--set", f"input.pattern={folder}/*.tfrecord", "--set", "input.key_feature=image/key",
            "--set", f"output.path={tmp_path / 'out'}", "--set", "model.weights=null",
            "--dry_run=True",
        ],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    job = json.loads(proc.stdout[proc.stdout.index("{\n"):])
    assert job["runner"] == "DataflowRunner"
    assert job["containers"] == [image] and job["sdk_container_image"] == image
    assert job["dataflow_service_options"] == ["worker_accelerator=type:nvidia-tesla-t4;count:1;install-nvidia-driver"]
    assert job["machine_type"] == "n1-standard-8"
    assert "workflow.tar.gz" in job["staged"], "the package sdist (--setup_file) is not staged"
    assert {"MatchShards/Expand", "ExtractShards/Reshuffle/ReshufflePerKey/GroupByKey", "ExtractShards/ExtractAndWrite"} <= set(job["transforms"])
    # the commit is distributed: bucketed dedupe through a GroupByKey, per-shard publish, one finalize
    for step in ("Commit/ByBucket", "Commit/Publish", "Commit/Finalize"):
        assert any(t.startswith(step) for t in job["transforms"]), step
    assert not (tmp_path / "out").exists(), "a dry run wrote output"
