"""Assemble and run a layerbeam job: preflight checks, the size plan, the Beam graph, and
the single commit at the end. This module owns the run; `transforms` only do the work.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import json
import time
from collections.abc import Mapping, Sequence
from importlib import metadata
from typing import Any

from pipeline.config import ConfigError, JobConfig, config_to_dict

__all__ = ["Plan", "OverCapError", "prepare", "build_pipeline", "run_job", "make_runner", "commit_run"]


class OverCapError(ConfigError):
    """The selected outputs exceed `layers.max_bytes_per_example`; `.plan` says by how much."""

    def __init__(self, message: str, plan: Plan):
        super().__init__(message)
        self.plan = plan


@dataclasses.dataclass(frozen=True)
class Plan:
    """What a run will do, known before any work starts."""

    config: dict
    run_id: str
    model_fingerprint: str
    input_shapes: dict
    outputs: list  # [OutputSpec]
    shards: int
    input_bytes: int
    estimated_examples: int | None
    inputs: tuple = ()  # ((shard id, (paths …), bytes), …)
    # The model the checks loaded (`transforms.beam.LauncherModel`); a worker that runs in
    # this process takes it instead of loading its own. Never pickled to workers.
    launcher_model: Any = dataclasses.field(default=None, repr=False, compare=False)

    def stored_bytes(self, spec) -> int:
        """One output's bytes per example as stored (`output.parquet_compat` widens float16)."""
        from transforms.writers import stored_bytes

        return stored_bytes(spec, bool(self.config["output"].get("parquet_compat")))

    @property
    def bytes_per_example(self) -> int:
        return sum(self.stored_bytes(s) for s in self.outputs)

    @property
    def projected_bytes(self) -> int | None:
        return None if self.estimated_examples is None else self.estimated_examples * self.bytes_per_example


def _versions() -> dict[str, str]:
    out = {}
    for pkg in ("layerbeam", "tensorflow", "keras", "apache-beam", "pyarrow", "numpy"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def _require_filesystem(what: str, url: str) -> None:
    """A URL whose file system package is missing is a one-line error, not a traceback."""
    import fsspec

    try:
        fsspec.core.url_to_fs(url)
    except ImportError as e:
        scheme = url.split("://", 1)[0]
        extra = {"gs": "gcp", "gcs": "gcp", "s3": "s3"}.get(scheme)
        fix = f"pip install 'layerbeam[{extra}]'" if extra else "install the fsspec implementation for it"
        raise ConfigError(f"{what} {url!r} needs a file system package for {scheme}:// that is not installed ({e}); {fix}") from None
    except ValueError as e:
        raise ConfigError(f"{what} {url!r} is not a path fsspec understands: {e}") from None


def prepare(cfg: JobConfig) -> Plan:
    """Every check that can fail before work starts, and the size plan.

    Raises:
        ConfigError: the model cannot be loaded, a selector matches nothing, the input
            matches no file, the output is complete already or holds foreign files
            (without overwrite), another run is writing it, a half-built run of a
            different config is staged for it (without overwrite), it is not writable,
            or the outputs exceed `layers.max_bytes_per_example`.
    """
    from transforms.beam import LauncherModel, trace_and_select
    from transforms.devices import discover_gpus, precision
    from transforms.extractor import ModelError, SelectionError, load_model, model_fingerprint, preprocess_fn
    from transforms.readers import match_shards
    from transforms.writers import OutputLayout

    for what, url in (("input.pattern", cfg.input.pattern), ("output.path", cfg.output.path)):
        _require_filesystem(what, url)
    # Memory growth before this process touches a GPU, or the launcher's model load below
    # would reserve the whole device for the rest of the run.
    discover_gpus()
    try:
        shards = match_shards(cfg.input.pattern, cfg.input.format, cfg.input.files_per_shard)
    except (OSError, ValueError) as e:
        raise ConfigError(f"input.pattern {cfg.input.pattern!r} cannot be listed: {e}; check the path and your credentials") from None
    if not shards:
        raise ConfigError(f"input.pattern {cfg.input.pattern!r} matches no file; check the path (a glob such as data/*.tfrecord)")
    if cfg.input.max_shards:
        shards = shards[: cfg.input.max_shards]
    # The workers build the model under this policy; built under the same one here, the
    # checks see what they will see, and an in-process worker can take this copy.
    try:
        with precision(cfg.batching.precision):
            model = load_model(cfg.model)
            graph, specs = trace_and_select(cfg, model)
            offered = LauncherModel.capture(model, model_fingerprint(model))
    except (ModelError, SelectionError) as e:
        raise ConfigError(str(e).replace("{model}", cfg.model.source)) from None
    from transforms.beam import column_types

    row_columns = column_types(cfg.input)
    for spec in specs:
        if spec.name in row_columns:
            raise ConfigError(
                f"output name {spec.name!r} (from {spec.path!r}) is also the name of the {spec.name!r} column; "
                f"rename the output with {{layer: {spec.path}, as: <another name>}}"
            )
    try:
        from transforms.readers import _feature_map, single_image_input

        if cfg.input.format == "tfrecord":
            _feature_map(cfg.input, graph.input_shapes)
        else:
            single_image_input(graph.input_shapes)
        preprocess_fn(cfg.input.preprocess, cfg.model.source)  # resolved here, not first on a worker
    except (ValueError, ModelError) as e:
        raise ConfigError(str(e)) from None
    fp = offered.fingerprint
    config = config_to_dict(cfg)
    run_id = _run_id(config, fp, shards)
    total = sum(s.size for s in shards)
    plan = Plan(
        config=config,
        run_id=run_id,
        model_fingerprint=fp,
        input_shapes=graph.input_shapes,
        outputs=specs,
        shards=len(shards),
        input_bytes=total,
        estimated_examples=_estimate_examples(cfg, shards),
        inputs=tuple((s.id, s.paths, s.size) for s in shards),
        launcher_model=offered,
    )
    if plan.bytes_per_example > cfg.layers.max_bytes_per_example:
        biggest = sorted(specs, key=lambda s: -plan.stored_bytes(s))[:3]
        raise OverCapError(
            f"the {len(specs)} selected outputs take {_human(plan.bytes_per_example)} ({plan.bytes_per_example:,} B) per example, "
            f"over the cap layers.max_bytes_per_example = {_human(cfg.layers.max_bytes_per_example)}"
            + (f" (~{_human(plan.projected_bytes)} for ~{plan.estimated_examples:,} examples)" if plan.projected_bytes else "")
            + f"; largest: {', '.join(f'{s.name} {_human(plan.stored_bytes(s))}' for s in biggest)}; "
            f"reduce them (layers.reduce: mean, dtype: float16), select fewer, "
            f"or raise the cap knowingly: --set layers.max_bytes_per_example={plan.bytes_per_example}",
            plan,
        )
    _check_output(cfg, run_id, OutputLayout(cfg.output.path, run_id))
    return plan


def _run_id(config: Mapping, model_fingerprint: str, shards: Sequence) -> str:
    """The run fingerprint: config (less `output.overwrite`), model weights, input shards.

    Deterministic: the same command over the same input gives the same id, which is how a
    re-run after a crash finds its staged shards (and how a changed config does not).
    """
    key = dict(config)
    key["output"] = {k: v for k, v in config["output"].items() if k != "overwrite"}
    inputs = [[list(s.paths), s.size] for s in shards]
    return hashlib.sha256(json.dumps([key, model_fingerprint, inputs], sort_keys=True).encode()).hexdigest()[:16]


def _check_output(cfg: JobConfig, run_id: str, layout) -> None:
    """Refuse, before any work, an output this run must not write (see `prepare`)."""
    path = cfg.output.path
    overwrite = cfg.output.overwrite
    if layout.is_complete() and not overwrite:
        raise ConfigError(f"output {path!r} already holds a complete output; pass --overwrite to replace it or choose another output.path")
    if layout.has_foreign_files() and not overwrite:
        raise ConfigError(f"output {path!r} holds files but no _SUCCESS, so it is not a complete layerbeam output; choose another output.path, or pass --overwrite to replace it")
    holder = layout.lock_holder()
    if holder is not None:
        raise layout.locked_error(holder)
    others = layout.other_runs()
    if others and not overwrite:
        info = layout.read_run_info(others[0])
        why = _differences(info, cfg, run_id) if info else "its config is unknown"
        raise ConfigError(
            f"output {path!r} has a half-built run {others[0]} from a different config ({why}); re-run that config to finish it, "
            f"or pass --overwrite to discard it and build this one"
        )
    _check_writable(layout)


def _differences(info: Mapping, cfg: JobConfig, run_id: str) -> str:
    """Which config fields, model or input shards differ between a staged run and this one."""
    mine = _flatten(config_to_dict(cfg))
    theirs = _flatten(info.get("config", {}))
    keys = sorted(k for k in set(mine) | set(theirs) if k != "output.overwrite" and mine.get(k) != theirs.get(k))
    parts = []
    if keys:
        parts.append("differs in " + ", ".join(keys[:6]) + (" …" if len(keys) > 6 else ""))
    if not keys:
        parts.append("same config, but different model weights or input files")
    return "; ".join(parts)


def _flatten(d: Mapping, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, Mapping):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _check_writable(layout) -> None:
    """Write and delete a probe file beside the output; leave nothing behind.

    On a local disk the folders the probe needed are removed again (deepest first, only
    those it created, only if empty). Object stores have no folders: deleting the probe
    leaves nothing there, and nothing else is touched.
    """
    import os

    from transforms.writers import _is_local

    probe = f"{layout.staging_root}/.probe-{time.time_ns()}"
    try:
        created = []
        if _is_local(layout.fs):
            d = layout.staging_root
            while d and not os.path.exists(d):
                created.append(d)
                d = os.path.dirname(d.rstrip("/"))
        layout.fs.makedirs(layout.staging_root, exist_ok=True)
        with layout.fs.open(probe, "w") as f:
            f.write("ok")
        layout.fs.rm(probe)
        for d in created:  # deepest first
            try:
                os.rmdir(d)
            except OSError:  # not empty: another run put something there meanwhile
                break
    except OSError as e:
        raise ConfigError(f"output.path {layout.out!r} is not writable ({e.strerror or e}); choose a folder you can write to") from None


def _estimate_examples(cfg: JobConfig, shards, budget: int = 2000) -> int | None:
    """Examples in the input: exact for image folders; for TFRecord, records are counted
    shard by shard (up to `budget` records read): exact when every shard fits in the
    budget, else scaled by file size from the shards read completely (or, when not even
    the first shard fits, by the mean record size, which assumes no compression)."""
    cap = cfg.input.max_examples_per_shard
    if cfg.input.format == "images":
        return sum(min(len(s.paths), cap) if cap else len(s.paths) for s in shards)
    import tensorflow as tf

    from transforms.readers import _LocalBridge

    counts: list[int] = []  # records of each shard read completely
    n_partial, nbytes = 0, 0
    for shard in shards:
        left = budget - sum(counts)
        if left <= 0:
            break
        bridge = _LocalBridge(shard.paths[:1])
        try:
            n = 0
            for rec in tf.data.TFRecordDataset(bridge.paths, compression_type=cfg.input.compression or None).take(left + 1):
                n += 1
                nbytes += len(rec.numpy()) + 16  # 16 bytes of TFRecord framing per record
        except tf.errors.OpError:
            return None
        finally:
            bridge.close()
        if n > left:
            n_partial = n
            break
        counts.append(n)
    capped = [min(c, cap) if cap else c for c in counts]
    if len(counts) == len(shards):
        return sum(capped)
    rest = shards[len(counts):]
    if counts and sum(s.size for s in shards[: len(counts)]):
        per_byte = sum(counts) / sum(s.size for s in shards[: len(counts)])
    elif n_partial:
        per_byte = n_partial / nbytes
    else:
        return None
    est_rest = [round(s.size * per_byte) for s in rest]
    return sum(capped) + sum(min(e, cap) if cap else e for e in est_rest)


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB", "PB"):
        if abs(n) < 1024 or unit == "PB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def make_runner(beam_args: Sequence[str]):
    """(runner, PipelineOptions). DirectRunner (the default) runs on Beam's FnApiRunner
    directly: Beam 2.77's DirectRunner would first try to download the Prism binary.
    FnApiRunner honours `--direct_running_mode` (in_memory | multi_threading |
    multi_processing) and `--direct_num_workers` itself.

    In `multi_processing` mode the workers are fresh `python -m ...sdk_worker_main`
    processes that unpickle the DoFns, so they must be able to import `pipeline` and
    `transforms`: true for an installed package; for a source checkout the checkout is
    added to the PYTHONPATH the workers inherit.
    """
    from apache_beam.options.pipeline_options import DirectOptions, PipelineOptions, StandardOptions

    options = PipelineOptions(list(beam_args))
    runner = options.view_as(StandardOptions).runner
    if runner in (None, "DirectRunner", "SwitchingDirectRunner", "direct"):
        from apache_beam.runners.portability.fn_api_runner import FnApiRunner

        if options.view_as(DirectOptions).direct_running_mode == "multi_processing":
            _export_source_root()
        return FnApiRunner(), options
    return runner, options


def _export_source_root() -> None:
    """Put this checkout on PYTHONPATH for worker subprocesses, unless installed."""
    import os
    from pathlib import Path

    root = str(Path(__file__).resolve().parents[1])
    if any(part in ("site-packages", "dist-packages") for part in Path(root).parts):
        return
    current = os.environ.get("PYTHONPATH", "")
    paths = [p for p in current.split(os.pathsep) if p]
    if root not in paths:
        os.environ["PYTHONPATH"] = os.pathsep.join([root, *paths])


def build_pipeline(pipeline, plan: Plan):
    """Add the job to `pipeline`: match → extract+write each shard → commit once."""
    import apache_beam as beam

    from transforms.beam import ExtractShards, MatchShards

    cfg = plan.config
    shards = pipeline | "MatchShards" >> MatchShards(
        cfg["input"]["pattern"], cfg["input"]["format"], cfg["input"]["files_per_shard"], cfg["input"]["max_shards"]
    )  # Shard(id, paths, size)
    results = shards | "ExtractShards" >> ExtractShards(cfg, plan.run_id)  # per-shard result dict
    manifest_base = _manifest_base(plan)
    return (
        results
        | "CollectResults" >> beam.combiners.ToList()
        | "Commit" >> beam.Map(commit_run, beam.pvalue.AsList(shards), manifest_base, plan.run_id, _inputs_digest(plan.inputs))
    )


def _inputs_digest(shards) -> str:
    """A digest of the shard list: (id, paths, bytes) of `Shard`s or of `Plan.inputs` tuples
    (a file rewritten under the same name changes its size, hence the digest)."""
    items = sorted((s.id, tuple(s.paths), s.size) if hasattr(s, "id") else (s[0], tuple(s[1]), s[2]) for s in shards)
    return hashlib.sha256(json.dumps(items).encode()).hexdigest()


def _manifest_base(plan: Plan) -> dict:
    return {
        "layerbeam_manifest": 1,
        "run_id": plan.run_id,
        "config": plan.config,
        "model": {
            "source": plan.config["model"]["source"],
            "weights": plan.config["model"]["weights"],
            "fingerprint": plan.model_fingerprint,
            "input_shapes": {k: list(v) for k, v in plan.input_shapes.items()},
        },
        "outputs": [dict(s.to_json(), bytes_per_example=plan.stored_bytes(s)) for s in plan.outputs],
        "storage": _storage_spec(plan),
        "bytes_per_example": plan.bytes_per_example,
        "versions": _versions(),
    }


def _storage_spec(plan: Plan) -> dict:
    """How each column is stored (the feature spec readers build their parsing from)."""
    from transforms.beam import column_types
    from transforms.writers import make_writer, output_schema

    cfg = JobConfig.model_validate(plan.config)
    return make_writer(cfg.output, output_schema(plan.outputs, column_types(cfg.input))).storage_spec()


def commit_run(results: list[dict], shards: list, manifest_base: Mapping, run_id: str, planned_inputs: str | None = None) -> dict:
    """Check that every shard is there and the counts add up, then commit the output.

    Records whose key an earlier shard (in shard order) already wrote are left out here and
    become `duplicate_key` dead letters: each shard stored its rows' 128-bit key hashes, so
    this check needs about 100 bytes of memory per row written at its peak. Repeats within a shard were
    already removed by the shard's worker.

    Args:
        planned_inputs: `_inputs_digest` of the shards the launcher listed (and the run id
            was computed from); the workers list the pattern again, and a difference
            means the input changed during the run.

    Raises:
        CommitError: the input changed since the launcher listed it, a shard is missing or
            doubled, counts do not reconcile (`read = written + dead`), or workers built
            different models. Nothing is committed then.
    """
    from collections import Counter

    from transforms.writers import CommitError, OutputLayout

    cfg = manifest_base["config"]
    if planned_inputs is not None and _inputs_digest(shards) != planned_inputs:
        raise CommitError(
            f"the files matching input.pattern {cfg['input']['pattern']!r} changed while the job ran "
            f"({len(shards)} shards now); nothing committed. Re-run when the input is stable (finished shards are kept only for the same input)"
        )
    expected = {s.id for s in shards}
    got = [r["shard"] for r in results]
    if sorted(got) != sorted(expected):
        counts = Counter(got)
        missing = sorted(expected - set(got))
        extra = sorted({g for g, n in counts.items() if n > 1} | (set(got) - expected))
        raise CommitError(f"shard results do not match the input: missing {missing}, unexpected or doubled {extra}; nothing committed")
    fps = {r["model_fingerprint"] for r in results}
    if fps != {manifest_base["model"]["fingerprint"]}:
        raise CommitError(f"workers built models with different weights {sorted(fps)}; set model.seed or use a weights file")
    layout = OutputLayout(cfg["output"]["path"], run_id)
    results = layout.assemble(results, _repeated_keys(layout, results))
    read = sum(r["read"] for r in results)
    rows = sum(r["rows"] for r in results)
    dead = sum(r["dead_letters"] for r in results)
    for r in results:
        if r["read"] != r["rows"] + r["dead_letters"]:
            raise CommitError(f"shard {r['shard']}: read {r['read']} records but wrote {r['rows']} rows + {r['dead_letters']} dead letters; nothing committed")
    if read != rows + dead:
        raise CommitError(f"read {read} records but wrote {rows} rows + {dead} dead letters; nothing committed")
    reasons: dict[str, int] = {}
    for r in results:
        for k, v in r["dead_reasons"].items():
            reasons[k] = reasons.get(k, 0) + v
    shard_errors = [dict(e, shard=r["shard"], records_kept=r["read"]) for r in results for e in r.get("shard_errors", ())]
    files = [dict(f, shard=r["shard"]) for r in results for f in r["files"]]
    manifest = dict(manifest_base)
    manifest.update(
        {
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "counts": {
                "records_read": read,
                "rows_written": rows,
                "dead_letters": dead,
                "dead_letter_reasons": dict(sorted(reasons.items())),
            },
            "shard_errors": shard_errors,
            "inputs": [{"shard": r["shard"], "paths": r["paths"], "bytes": r["bytes_in"], "records": r["read"], "rows": r["rows"], "dead_letters": r["dead_letters"], "timing": r.get("timing")} for r in results],
            "files": [{"path": f["final_path"], "rows": f["rows"], "bytes": f["bytes"], "shard": f["shard"]} for f in files],
            "dead_letter_files": [f"{layout.DEAD_DIR}/{r['shard']}.parquet" for r in results if r["dead_letters"] or r.get("shard_errors")],
            "partition_by": cfg["output"]["partition_by"],
            "format": cfg["output"]["format"],
        }
    )
    layout.publish(manifest, overwrite=cfg["output"]["overwrite"])
    return manifest["counts"]


def _repeated_keys(layout, results: Sequence[Mapping]) -> dict[str, dict[bytes, dict]]:
    """shard id → {key hash: dead-letter row} for rows whose key an earlier shard wrote.

    The earliest (shard id, record index) keeps the key; every later one is dropped.
    Vectorized over all rows (about 100 bytes of memory per row at its peak: hashes,
    indices, the sort order and sorted copies); Python runs only once per repeated key.
    """
    import numpy as np

    order = sorted(results, key=lambda r: r["shard"])
    hashes, ranks, index = [], [], []
    for rank, r in enumerate(order):
        h, i = layout.read_keys(r["shard"])
        hashes.append(h)
        index.append(i)
        ranks.append(np.full(len(h), rank, np.int64))
    if not hashes:
        return {}
    h, rank, idx = np.concatenate(hashes), np.concatenate(ranks), np.concatenate(index)
    sort = np.lexsort((idx, rank, h))  # by hash, then shard order, then record index
    h, rank, idx = h[sort], rank[sort], idx[sort]
    later = np.concatenate([[False], h[1:] == h[:-1]])
    if not later.any():
        return {}
    first = np.flatnonzero(~later)[np.cumsum(~later) - 1]  # position of each run's first row
    drop: dict[str, dict[bytes, dict]] = {}
    for j in np.flatnonzero(later):
        r = order[rank[j]]
        f = first[j]
        drop.setdefault(r["shard"], {})[h[j].tobytes()] = {
            "key": None,  # filled in from the row by the commit
            "shard": r["paths"][0] if len(r["paths"]) == 1 else r["paths"][int(idx[j])],
            "index": int(idx[j]),
            "stage": "dedupe",
            "reason": "duplicate_key",
            "detail": f"the key was already written by record {int(idx[f])} of shard {order[rank[f]]['shard']}",
        }
    return drop


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

    from transforms.beam import offer_launcher_model
    from transforms.writers import OutputLayout

    plan = plan or prepare(cfg)
    runner, options = make_runner(beam_args)
    if options.view_as(TestOptions).dry_run:
        p = beam.Pipeline(runner=runner, options=options)
        build_pipeline(p, plan)
        return _dry_run_summary(p.runner, p.run(), options)
    layout = OutputLayout(cfg.output.path, plan.run_id)
    layout.acquire_lock()
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
        if offered is not None and not _workers_in_this_process(runner, options):
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
        layout.release_lock()
    if not layout.is_complete():
        raise RuntimeError(f"the pipeline finished but {cfg.output.path!r} has no _SUCCESS; see the log above")
    with layout.fs.open(f"{layout.out}/{layout.MANIFEST}") as f:
        manifest = json.load(f)
    manifest["_seconds"] = seconds
    manifest["_metrics"] = metrics
    first = metrics.get("batch_done_unix_ms", {}).get("min")
    manifest["_first_batch_unix"] = first / 1000 if first else None
    return manifest


def _workers_in_this_process(runner, options) -> bool:
    """Whether the runner runs its SDK workers in this process: FnApiRunner (DirectRunner)
    in in_memory or multi_threading mode, or a portable runner with LOOPBACK workers."""
    from apache_beam.options.pipeline_options import DirectOptions, PortableOptions
    from apache_beam.runners.portability.fn_api_runner import FnApiRunner

    if isinstance(runner, FnApiRunner):
        return options.view_as(DirectOptions).direct_running_mode != "multi_processing"
    return options.view_as(PortableOptions).environment_type == "LOOPBACK"


def _dry_run_summary(runner, result, options) -> dict:
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
    job = getattr(result, "job", None)  # DataflowRunner: apiclient.Job
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
