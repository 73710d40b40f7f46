"""Runner choice, whether workers run in this process, and the dry-run summary."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = ["make_runner", "workers_in_this_process", "dry_run_summary"]


def make_runner(beam_args: Sequence[str]):
    """(runner, PipelineOptions). DirectRunner (the default) runs on Beam's FnApiRunner
    directly: Beam 2.77's DirectRunner would first try to download the Prism binary.
    FnApiRunner honours `--direct_running_mode` (in_memory | multi_threading |
    multi_processing) and `--direct_num_workers` itself.

    In `multi_processing` mode the workers are fresh `python -m ...sdk_worker_main`
    processes that unpickle the DoFns, so they import `layerbeam` as installed (an
    editable install included); nothing is added to their path.
    """
    from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions

    options = PipelineOptions(list(beam_args))
    runner = options.view_as(StandardOptions).runner
    if runner in (None, "DirectRunner", "SwitchingDirectRunner", "direct"):
        from apache_beam.runners.portability.fn_api_runner import FnApiRunner

        return FnApiRunner(), options
    return runner, options


def workers_in_this_process(runner, options) -> bool:
    """Whether the runner runs its SDK workers in this process: FnApiRunner (DirectRunner)
    in in_memory or multi_threading mode, or a portable runner with LOOPBACK workers."""
    from apache_beam.options.pipeline_options import DirectOptions, PortableOptions
    from apache_beam.runners.portability.fn_api_runner import FnApiRunner

    if isinstance(runner, FnApiRunner):
        return options.view_as(DirectOptions).direct_running_mode != "multi_processing"
    return options.view_as(PortableOptions).environment_type == "LOOPBACK"


def dry_run_summary(runner, result, options) -> dict:
    """What a `--dry_run=True` built: the runner's job graph, not submitted."""
    from apache_beam.options.pipeline_options import GoogleCloudOptions, WorkerOptions

    workers = options.view_as(WorkerOptions)
    out: dict[str, Any] = {
        "_dry_run": True,
        "runner": type(runner).__name__,
        "machine_type": workers.machine_type,
        "sdk_container_image": workers.sdk_container_image,
        "dataflow_service_options": options.view_as(GoogleCloudOptions).dataflow_service_options,
    }
    # DataflowRunner: apiclient.Job (a template's result has none: the runner keeps it)
    job = getattr(result, "job", None) or getattr(runner, "job", None)
    proto = getattr(job, "proto_pipeline", None)
    if proto is not None:
        from apache_beam.portability.api import beam_runner_api_pb2

        out["job_name"] = job.proto.name
        out["transforms"] = sorted(t.unique_name for t in proto.components.transforms.values() if not t.subtransforms)
        out["containers"], out["staged"] = [], []
        for env in proto.components.environments.values():
            if env.urn == "beam:env:docker:v1":
                out["containers"].append(beam_runner_api_pb2.DockerPayload.FromString(env.payload).container_image)
            for dep in env.dependencies:
                out["staged"].append(beam_runner_api_pb2.ArtifactStagingToRolePayload.FromString(dep.role_payload).staged_name)
    return out
