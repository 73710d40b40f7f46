"""A run's lifetime: the lock, stale runs, the Beam graph, launching it, its metrics."""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from .config import JobConfig, load_config
from .plan import Plan, manifest_base, prepare
from .runners import dry_run_summary, make_runner, workers_in_this_process

__all__ = ["run", "run_job", "build_pipeline"]


def run(config: str | Path | Mapping | JobConfig, overrides: Sequence[str] = (), beam_args: Sequence[str] = ()) -> dict:
    """Run a job as `layerbeam run` does and return the committed manifest.

    Args:
        config: a YAML file, a dict with the YAML's structure, or a `JobConfig`.
        overrides: `section.key=value` strings, as `--set` takes them
            (e.g. `["output.path=/tmp/out", "output.overwrite=true"]`).
        beam_args: Beam's flags, e.g. `["--direct_running_mode=multi_processing"]`.

    Returns:
        The manifest (see `run_job`: with `_seconds` and `_metrics` added).

    Raises:
        ConfigError: a bad config, override, model, selection, input or output (one line).
    """
    if isinstance(config, JobConfig):
        if overrides:
            from .config import config_to_dict

            config = load_config(raw=config_to_dict(config), overrides=list(overrides))
        cfg = config
    elif isinstance(config, Mapping):
        cfg = load_config(raw=dict(config), overrides=list(overrides))
    else:
        cfg = load_config(config, list(overrides))
    return run_job(cfg, beam_args)


def build_pipeline(pipeline, plan: Plan):
    """Add the job to `pipeline`: match → extract+write each shard → commit once."""
    import apache_beam as beam

    from .transforms.beam import ExtractShards, MatchShards
    from .transforms.commit import commit_run, inputs_digest

    cfg = plan.config
    shards = pipeline | "MatchShards" >> MatchShards(
        cfg["input"]["pattern"], cfg["input"]["format"], cfg["input"]["files_per_shard"], cfg["input"]["max_shards"]
    )  # Shard(id, paths, size)
    results = shards | "ExtractShards" >> ExtractShards(plan.spec, plan.run_id)  # ShardResult
    return (
        results
        | "CollectResults" >> beam.combiners.ToList()
        | "Commit" >> beam.Map(commit_run, beam.pvalue.AsList(shards), manifest_base(plan), plan.run_id, inputs_digest(plan.inputs))
    )


def run_job(cfg: JobConfig, beam_args: Sequence[str] = (), plan: Plan | None = None) -> dict:
    """Run a job to completion and return the committed manifest.

    Resuming is the default: the run's staging folder is named by its fingerprint, so the
    same command run again after a crash finds the shards it finished (their markers) and
    does only the rest. With `output.overwrite`, half-built runs of other configs staged
    for the output are discarded first. The output's lock is held from here to the end.

    The manifest comes back with keys that are not in the file: `_seconds` (wall time of
    the pipeline), `_metrics` (the job's committed `layerbeam` metrics, e.g. `model_loads`:
    one per worker process) and `_first_batch_unix`. With `--dry_run=True` (DataflowRunner)
    the job graph is built and nothing is submitted or locked: the result is a summary
    with `"_dry_run": True`.
    """
    import apache_beam as beam
    from apache_beam.options.pipeline_options import TestOptions

    from .transforms.commit import OutputLock
    from .transforms.shard import offer_launcher_model
    from .transforms.staging import OutputLayout

    plan = plan or prepare(cfg)
    runner, options = make_runner(beam_args)
    if options.view_as(TestOptions).dry_run:
        p = beam.Pipeline(runner=runner, options=options)
        build_pipeline(p, plan)
        return dry_run_summary(p.runner, p.run(), options)
    layout = OutputLayout(cfg.output.path, plan.run_id)
    lock = OutputLock(layout)
    lock.acquire()
    try:
        if cfg.output.overwrite:
            stale = layout.other_runs()
            if layout.is_complete() and layout.committed_run_id() == plan.run_id:
                stale.append(plan.run_id)  # left by the committed run itself: nothing to resume
            layout.discard_runs(stale)
        layout.write_run_info({
            "run_id": plan.run_id,
            "config": plan.config,
            "model_fingerprint": plan.model_fingerprint,
            "shards": [{"shard": i, "paths": list(p), "bytes": b} for i, p, b in plan.inputs],
        })
        t0 = time.perf_counter()
        p = beam.Pipeline(runner=runner, options=options)
        build_pipeline(p, plan)
        offered = plan.launcher_model
        if offered is not None and not workers_in_this_process(runner, options):
            offered.release()  # the workers load their own; the launcher need not hold it
        try:
            with offer_launcher_model(plan.run_id, offered):
                result = p.run()
                result.wait_until_finish()
        finally:
            if offered is not None:
                offered.release()
        seconds = time.perf_counter() - t0
        metrics = _metrics(result)
    finally:
        lock.release()
    if not layout.is_complete():
        raise RuntimeError(f"the pipeline finished but {cfg.output.path!r} has no _SUCCESS; see the log above")
    with layout.fs.open(f"{layout.out}/{layout.MANIFEST}") as f:
        manifest = json.load(f)
    manifest["_seconds"] = seconds
    manifest["_metrics"] = metrics
    first = metrics.get("batch_done_unix_ms", {}).get("min")
    manifest["_first_batch_unix"] = first / 1000 if first else None
    return manifest


def _metrics(result) -> dict:
    """layerbeam's Beam metrics (committed values) as plain numbers, where the runner has them."""
    from apache_beam.metrics.metric import MetricsFilter

    out: dict = {}
    try:
        q = result.metrics().query(MetricsFilter().with_namespace("layerbeam"))
    except (AttributeError, NotImplementedError):
        return out
    for c in q.get("counters", []):
        value = c.committed if c.committed is not None else c.attempted
        out[c.key.metric.name] = out.get(c.key.metric.name, 0) + int(value or 0)
    for d in q.get("distributions", []):
        v = d.committed if d.committed is not None else d.attempted
        if v is not None and v.count:
            out[d.key.metric.name] = {"count": v.count, "sum": v.sum, "min": v.min, "max": v.max, "mean": v.mean}
    return out
