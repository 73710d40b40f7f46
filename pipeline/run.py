"""A run's lifetime: the lock, stale runs, the Beam graph, launching it, its metrics."""

from __future__ import annotations

import errno
import json
import re
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from .config import JobConfig, load_config
from .plan import Plan, manifest_base, prepare
from .runners import dry_run_summary, make_runner, workers_in_this_process

__all__ = ["run", "run_job", "build_pipeline", "Progress", "dead_letter_examples", "is_disk_full"]


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


class Progress(dict):
    """A snapshot for a progress display: `shards_done`, `shards` (planned), `examples_done`,
    `examples` (estimated, or None), `dead_letters`, `seconds`; on remote runners
    `job_id` and `state` instead."""


def build_pipeline(pipeline, plan: Plan):
    """Add the job to `pipeline`: match → extract+write each shard → commit (distributed)."""
    from .transforms.beam import CommitShards, ExtractShards, MatchShards
    import apache_beam as beam

    from .transforms.commit import inputs_digest

    cfg = plan.config
    shards = pipeline | "MatchShards" >> MatchShards(
        cfg["input"]["pattern"], cfg["input"]["format"], cfg["input"]["files_per_shard"], cfg["input"]["max_shards"], spec=plan.spec.input
    )  # Shard(id, paths, size)
    from .transforms.readers import shard_identity

    todo, reuse, delta = shards, plan.reuse, None
    if plan.reuse:  # an incremental run: only new and changed shards reach the extraction
        skip = {shard_identity(e) for e in plan.reuse}
        todo = shards | "NewOrChanged" >> beam.Filter(lambda s: shard_identity(s) not in skip)
    elif plan.delta and plan.delta.get("in_pipeline"):
        # `images` over an output with a version: the launcher has no listing, so the reuse
        # decision is made here once every folder is listed. The list is one small
        # description per shard (a span, not its images), so it is bounded by the shard count.
        from .plan import delta_in_pipeline

        out, parent, sample = cfg["output"]["path"], plan.parent, plan.sample  # not `plan`, which holds the launcher's model
        decided = pipeline | "Listed" >> beam.Impulse() | "Delta" >> beam.Map(
            lambda _, listed: delta_in_pipeline(listed, out, parent, sample), beam.pvalue.AsList(shards)
        )  # (delta, reuse entries), once, over every shard listed (a side input)
        skip = decided | "SkipIdentities" >> beam.Map(lambda d: {shard_identity(e) for e in d[1]})
        todo = shards | "NewOrChanged" >> beam.Filter(lambda s, skip: shard_identity(s) not in skip, beam.pvalue.AsSingleton(skip))
        reuse = decided | "ReuseEntries" >> beam.FlatMap(lambda d: d[1])
        delta = decided | "DeltaCounts" >> beam.Map(lambda d: d[0])
    results = todo | "ExtractShards" >> ExtractShards(plan.spec, plan.run_id)  # ShardResult
    # the commit, distributed: check → bucketed dedupe → parallel publish → manifest + _SUCCESS
    # `images` are listed only in the pipeline (no launcher list to compare with): each shard's
    # worker checks its folder still holds the span and version listed
    planned = None if plan.listing is not None else inputs_digest(plan.inputs)
    return results | "Commit" >> CommitShards(shards, manifest_base(plan), plan.run_id, planned, reuse=reuse, delta=delta)


def run_job(cfg: JobConfig, beam_args: Sequence[str] = (), plan: Plan | None = None, progress: Callable[[Progress], None] | None = None) -> dict:
    """Run a job to completion and return the committed manifest.

    Resuming is the default: the run's staging folder is named by its fingerprint, so the
    same command run again after a crash finds the shards it finished (their markers) and
    does only the rest. With `output.overwrite`, half-built runs of other configs staged
    for the output are discarded first. The output's lock is held from here to the end.

    The manifest comes back with keys that are not in the file: `_seconds` (wall time of
    the pipeline), `_metrics` (the job's committed `layerbeam` metrics, e.g. `model_loads`:
    one per worker process) and `_first_batch_unix`. With `--dry_run=True` (DataflowRunner)
    the job graph is built and nothing is submitted or locked: the result is a summary
    with `"_dry_run": True`. With `--template_location` (how Dataflow's Flex Template
    launcher runs the program) the job is written there for Dataflow to start, nothing is
    locked or waited for, and the summary has `"_template"`: the location.

    Args:
        progress: called about twice a second with a `Progress` snapshot while the job
            runs (local runners: shards and examples done; remote runners: job id and
            state, when they change).

    Raises:
        OutcomeError: the run did its work but published nothing (no rows, or more dead
            letters than `output.max_dead_letter_fraction`); its `examples` attribute
            maps the top reasons to one dead letter each.
    """
    import apache_beam as beam
    from apache_beam.options.pipeline_options import GoogleCloudOptions, TestOptions

    from .transforms.commit import OutputLock
    from .transforms.errors import OutcomeError
    from .transforms.models import launcher_model_offered
    from .transforms.staging import OutputLayout

    plan = plan or prepare(cfg)
    if plan.up_to_date:  # nothing new, changed or removed: success, nothing written
        from .transforms.versions import latest_manifest

        manifest = latest_manifest(plan.config["output"]["path"])
        _finish_committed(manifest)
        return dict(manifest, _up_to_date=True, _seconds=0.0, _metrics={})
    runner, options = make_runner(beam_args)
    if options.view_as(TestOptions).dry_run:
        p = beam.Pipeline(runner=runner, options=options)
        build_pipeline(p, plan)
        return dry_run_summary(p.runner, p.run(), options)
    template = options.view_as(GoogleCloudOptions).template_location
    if template:
        return _write_template(cfg, plan, runner, options, template)
    layout = OutputLayout(cfg.output.path, plan.run_id)
    lock = OutputLock(layout)
    lock.acquire()
    try:
        _check_still_parent(layout, plan)
        if cfg.output.overwrite:
            stale = layout.other_runs()
            if layout.is_complete() and layout.committed_run_id() == plan.run_id:
                stale.append(plan.run_id)  # left by the committed run itself: nothing to resume
            layout.discard_runs(stale)
        else:  # half-built runs of the same extraction over an older listing: this one replaces them
            from .plan import superseded

            layout.discard_runs([r for r in layout.other_runs() if superseded(layout, r, plan)])
        layout.write_run_info(_run_info(plan))
        t0 = time.perf_counter()
        p = beam.Pipeline(runner=runner, options=options)
        build_pipeline(p, plan)
        offered = plan.launcher_model
        local = workers_in_this_process(runner, options)
        if offered is not None and not local:
            offered.release()  # the workers load their own; the launcher need not hold it
        watcher = _Watcher(layout, plan, progress, t0) if progress else None
        try:
            with launcher_model_offered(plan.run_id, offered):
                if watcher and _is_local_runner(runner):
                    watcher.start()
                result = p.run()
                if watcher and not _is_local_runner(runner):
                    _report_remote(result, progress)
                result.wait_until_finish()
        except OutcomeError as e:
            raise _outcome(e, layout) from None
        finally:
            if watcher:
                watcher.stop()
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
    if plan.delta and plan.delta.get("in_pipeline") and manifest.get("run_id") != plan.run_id:  # `images`: the pipeline found nothing new, changed or removed
        return dict(manifest, _up_to_date=True, _metrics=metrics)
    if progress and _is_local_runner(runner):  # the final state, from the manifest (the markers went with the staging)
        c = manifest["counts"]
        progress(Progress(shards_done=plan.to_extract, shards=plan.to_extract, examples_done=c["records_read"], examples=plan.estimated_examples,
                          dead_letters=c["dead_letters"], seconds=seconds))
    manifest["_metrics"] = metrics
    first = metrics.get("batch_done_unix_ms", {}).get("min")
    manifest["_first_batch_unix"] = first / 1000 if first else None
    return manifest


def _finish_committed(manifest: Mapping) -> None:
    """The committed run was killed after `_SUCCESS`, before its cleanup (its staging folder
    is still there): finish that cleanup, as its own commit run again would. Otherwise
    nothing is touched."""
    from .transforms import commit
    from .transforms.staging import OutputLayout

    layout = OutputLayout(manifest["config"]["output"]["path"], manifest["run_id"])
    if not layout.fs.exists(layout.run_dir):
        return
    lock = commit.OutputLock(layout)
    lock.acquire()
    try:
        commit.finalize(layout, [], manifest)  # committed already: moves what it had left to move
        commit.cleanup_run(layout)
    finally:
        lock.release()


def _check_still_parent(layout, plan: Plan) -> None:
    """With the lock held: the output is still at the version this run planned from (another
    run may have committed between planning and the lock)."""
    from .config import ConfigError
    from .transforms.versions import latest_manifest, manifest_version

    m = latest_manifest(layout.out, layout.fs)
    now = manifest_version(m) if m else None
    if now != plan.parent:
        raise ConfigError(
            f"output {layout.out!r} moved to version {now} while this run was planned on {plan.parent if plan.parent is not None else 'no output'} "
            "(another run committed); run the same command again: it starts from the new version"
        )


def _run_info(plan: Plan) -> dict:
    return {
        "run_id": plan.run_id,
        "config": plan.config,
        "model_fingerprint": plan.model_fingerprint,
        **({"listing": plan.listing} if plan.listing is not None else
           {"shards": [{"shard": i[0], "paths": list(i[1]), "bytes": i[2]} for i in plan.inputs]}),
    }


def _write_template(cfg: JobConfig, plan: Plan, runner, options, location: str) -> dict:
    """`--template_location` (a Dataflow Flex Template launch, or a classic template): the
    runner writes the job there and submits nothing; Dataflow starts it after this process
    has exited. So no lock is held and nothing is waited for: the job's own commit step
    publishes. The run's info is written as for any run, so a later run that finds its
    staging can say which config it was."""
    import apache_beam as beam

    from .transforms.staging import OutputLayout

    OutputLayout(cfg.output.path, plan.run_id).write_run_info(_run_info(plan))
    if plan.launcher_model is not None:
        plan.launcher_model.release()  # the workers load their own
    p = beam.Pipeline(runner=runner, options=options)
    build_pipeline(p, plan)
    summary = dry_run_summary(p.runner, p.run(), options)
    summary.pop("_dry_run")
    return dict(summary, _template=location)


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


def _is_local_runner(runner) -> bool:
    from apache_beam.runners.portability.fn_api_runner import FnApiRunner

    return isinstance(runner, FnApiRunner)


def _report_remote(result, progress) -> None:
    """A remote runner's job id and state, once, after submission (the runner's own log
    has the console URL)."""
    job_id = getattr(result, "job_id", None)
    progress(Progress(job_id=job_id() if callable(job_id) else job_id, state=str(getattr(result, "state", "?"))))


class _Watcher:
    """Reports progress while a local job runs: finished shards from their markers (any
    worker, any process), examples from the in-process counter where workers run here."""

    def __init__(self, layout, plan: Plan, progress, t0: float):
        self.layout, self.plan, self.progress, self.t0 = layout, plan, progress, t0
        self.seen: dict[str, dict] = {}
        from .transforms.beam import examples_so_far

        self.base = examples_so_far(plan.run_id)  # an earlier run of the same id in this process
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="layerbeam-progress", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        if self._thread.is_alive():
            self._stop.set()
            self._thread.join(timeout=5)

    def _loop(self) -> None:
        while not self._stop.wait(0.5):
            self._report()

    def _report(self) -> None:
        from .transforms.beam import examples_so_far

        fs = self.layout.fs
        try:
            names = fs.glob(f"{self.layout.run_dir}/shards/*.done.json")
        except OSError:
            names = []
        for n in names:
            if n not in self.seen:
                try:
                    with fs.open(n, "r") as f:
                        self.seen[n] = json.load(f)
                except (OSError, ValueError):  # being written: next time
                    pass
        done = list(self.seen.values())
        records = sum(r.get("read", 0) for r in done)
        dead = sum(r.get("dead_letters", 0) for r in done)
        live = examples_so_far(self.plan.run_id) - self.base + sum(r.get("dead_letters", 0) for r in done if not r.get("resumed"))
        self.progress(Progress(
            shards_done=len(done), shards=self.plan.to_extract, examples_done=max(records, live),
            examples=self.plan.estimated_examples, dead_letters=dead, seconds=time.perf_counter() - self.t0,
        ))


def _outcome(e, layout):
    """The commit's OutcomeError without Beam's "[while running ...]" suffix, with one
    example dead letter for each of the top reasons (`examples`)."""
    from .transforms.errors import OutcomeError

    message = re.sub(r" \[while running '[^']*'\]$", "", str(e).strip())
    out = OutcomeError(message, getattr(e, "counts", None))
    out.examples = dead_letter_examples(layout)
    return out


def dead_letter_examples(layout, top: int = 3) -> dict[str, dict]:
    """reason → one staged dead letter of that reason, for the `top` most frequent reasons
    of a run that was not published."""
    import pyarrow.parquet as pq

    fs = layout.fs
    try:
        files = sorted(set(fs.glob(f"{layout.run_dir}/dead/*.parquet")) | set(fs.glob(f"{layout.run_dir}/final/{layout.DEAD_DIR}/*.parquet")))
    except OSError:
        return {}
    counts: dict[str, int] = {}
    first: dict[str, dict] = {}
    for p in files:
        with fs.open(p, "rb") as f:
            for row in pq.read_table(f).to_pylist():
                counts[row["reason"]] = counts.get(row["reason"], 0) + 1
                first.setdefault(row["reason"], row)
    return {r: first[r] for r in sorted(counts, key=lambda r: -counts[r])[:top]}


def is_disk_full(e: BaseException) -> bool:
    """The exception (or one it came from) is ENOSPC; Beam re-raises a worker's OSError
    with its message only, so the message is checked too."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno == errno.ENOSPC or "No space left on device" in str(e):
            return True
        e = e.__cause__ or e.__context__
    return False
