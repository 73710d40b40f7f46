"""Assemble and run a layerbeam job: preflight checks, the size plan, the Beam graph, and
the single commit at the end. This module owns the run; `transforms` only do the work.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import json
import math
import time
from collections.abc import Mapping, Sequence
from importlib import metadata
from typing import Any

from pipeline.config import ConfigError, JobConfig, config_to_dict

__all__ = ["Plan", "prepare", "build_pipeline", "run_job", "make_runner", "commit_run"]


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

    @property
    def bytes_per_example(self) -> int:
        return sum(s.bytes_per_example for s in self.outputs)

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


def prepare(cfg: JobConfig) -> Plan:
    """Every check that can fail before work starts, and the size plan.

    Raises:
        ConfigError: the model cannot be loaded, a selector matches nothing, the input
            matches no file, the output is complete already (without overwrite) or not
            writable, or the outputs exceed `layers.max_bytes_per_example`.
    """
    from transforms.beam import _input_shapes
    from transforms.extractor import ModelError, ModelGraph, SelectionError, load_model, model_fingerprint
    from transforms.readers import match_shards
    from transforms.writers import OutputLayout

    try:
        shards = match_shards(cfg.input.pattern, cfg.input.format, cfg.input.files_per_shard)
    except (OSError, ValueError) as e:
        raise ConfigError(f"input.pattern {cfg.input.pattern!r} cannot be listed: {e}; check the path and your credentials") from None
    if not shards:
        raise ConfigError(f"input.pattern {cfg.input.pattern!r} matches no file; check the path (a glob such as data/*.tfrecord)")
    if cfg.input.max_shards:
        shards = shards[: cfg.input.max_shards]
    try:
        model = load_model(cfg.model)
        graph = ModelGraph(model, input_shapes=_input_shapes(cfg, model))
        specs = graph.select(
            [s.model_dump(by_alias=True, exclude_none=True) for s in cfg.layers.select],
            exclude=cfg.layers.exclude,
            reduce=cfg.layers.reduce,
            dtype=cfg.layers.dtype,
            include_inputs=cfg.layers.include_inputs,
        )
    except (ModelError, SelectionError) as e:
        raise ConfigError(str(e).replace("{model}", cfg.model.source)) from None
    try:
        from transforms.readers import _feature_map

        _feature_map(cfg.input, graph.input_shapes) if cfg.input.format == "tfrecord" else None
    except ValueError as e:
        raise ConfigError(str(e)) from None
    fp = model_fingerprint(model)
    config = config_to_dict(cfg)
    run_key = {k: v for k, v in config.items()}
    run_key["output"] = {k: v for k, v in config["output"].items() if k != "overwrite"}
    run_id = hashlib.sha256((json.dumps(run_key, sort_keys=True) + fp).encode()).hexdigest()[:16]
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
    )
    if plan.bytes_per_example > cfg.layers.max_bytes_per_example:
        raise ConfigError(
            f"the selected outputs take {_human(plan.bytes_per_example)} per example, over the cap "
            f"layers.max_bytes_per_example = {_human(cfg.layers.max_bytes_per_example)}; reduce them (layers.reduce: mean) "
            f"or raise the cap knowingly: --set layers.max_bytes_per_example={plan.bytes_per_example}"
        )
    layout = OutputLayout(cfg.output.path, run_id)
    if layout.is_complete() and not cfg.output.overwrite:
        raise ConfigError(f"output {cfg.output.path!r} already holds a complete output; pass --overwrite to replace it or choose another output.path")
    _check_writable(layout)
    return plan


def _check_writable(layout) -> None:
    probe = f"{layout.staging_root}/.probe-{time.time_ns()}"
    try:
        layout.fs.makedirs(layout.staging_root, exist_ok=True)
        with layout.fs.open(probe, "w") as f:
            f.write("ok")
        layout.fs.rm(probe)
    except OSError as e:
        raise ConfigError(f"output.path {layout.out!r} is not writable ({e.strerror or e}); choose a folder you can write to") from None


def _estimate_examples(cfg: JobConfig, shards) -> int | None:
    """Examples in the input: exact for image folders; for TFRecord, records in the first
    shard (up to 2000 read) scaled by bytes."""
    if cfg.input.format == "images":
        n = sum(len(s.paths) for s in shards)
        return min(n, cfg.input.max_examples_per_shard * len(shards)) if cfg.input.max_examples_per_shard else n
    import tensorflow as tf

    from transforms.readers import _LocalBridge

    first = shards[0]
    bridge = _LocalBridge(first.paths[:1])
    try:
        n, nbytes = 0, 0
        for rec in tf.data.TFRecordDataset(bridge.paths, compression_type=cfg.input.compression or None).take(2000):
            n += 1
            nbytes += len(rec.numpy()) + 16
    except tf.errors.OpError:
        return None
    finally:
        bridge.close()
    if n == 0:
        return 0
    total = sum(s.size for s in shards)
    est = n if n < 2000 and len(shards) == 1 else round(total / (nbytes / n))
    if cfg.input.max_examples_per_shard:
        est = min(est, cfg.input.max_examples_per_shard * len(shards))
    return est


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB", "PB"):
        if abs(n) < 1024 or unit == "PB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def make_runner(beam_args: Sequence[str]):
    """(runner, PipelineOptions). DirectRunner (the default) runs on Beam's FnApiRunner
    directly: Beam 2.77's DirectRunner would first try to download the Prism binary."""
    from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions

    options = PipelineOptions(list(beam_args))
    runner = options.view_as(StandardOptions).runner
    if runner in (None, "DirectRunner", "SwitchingDirectRunner", "direct"):
        from apache_beam.runners.portability.fn_api_runner import FnApiRunner

        return FnApiRunner(), options
    return runner, options


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
        | "Commit" >> beam.Map(commit_run, beam.pvalue.AsList(shards), manifest_base, plan.run_id)
    )


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
        "outputs": [s.to_json() for s in plan.outputs],
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


def commit_run(results: list[dict], shards: list, manifest_base: Mapping, run_id: str) -> dict:
    """Check that every shard is there and the counts add up, then commit the output.

    Raises:
        CommitError: a shard is missing or doubled, counts do not reconcile, or workers
            built different models. Nothing is committed then.
    """
    from transforms.writers import CommitError, OutputLayout

    cfg = manifest_base["config"]
    expected = {s.id for s in shards}
    got = [r["shard"] for r in results]
    if sorted(got) != sorted(expected):
        missing = sorted(expected - set(got))
        extra = sorted({g for g in got if got.count(g) > 1} | (set(got) - expected))
        raise CommitError(f"shard results do not match the input: missing {missing}, unexpected or doubled {extra}; nothing committed")
    fps = {r["model_fingerprint"] for r in results}
    if fps != {manifest_base["model"]["fingerprint"]}:
        raise CommitError(f"workers built models with different weights {sorted(fps)}; set model.seed or use a weights file")
    read = sum(r["read"] for r in results)
    rows = sum(r["rows"] for r in results)
    dead = sum(r["dead_letters"] for r in results)
    for r in results:
        if r["read"] != r["rows"] + r["dead_letters"]:
            raise CommitError(f"shard {r['shard']}: read {r['read']} records but wrote {r['rows']} rows + {r['dead_letters']} dead letters; nothing committed")
    reasons: dict[str, int] = {}
    for r in results:
        for k, v in r["dead_reasons"].items():
            reasons[k] = reasons.get(k, 0) + v
    files = [dict(f, shard=r["shard"]) for r in results for f in r["files"]]
    manifest = dict(manifest_base)
    manifest.update(
        {
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "counts": {"records_read": read, "rows_written": rows, "dead_letters": dead, "dead_letter_reasons": reasons},
            "inputs": [{"shard": r["shard"], "paths": r["paths"], "bytes": r["bytes_in"], "records": r["read"], "rows": r["rows"], "dead_letters": r["dead_letters"]} for r in sorted(results, key=lambda r: r["shard"])],
            "files": [{"path": f["final_path"], "rows": f["rows"], "bytes": f["bytes"], "shard": f["shard"]} for f in files],
            "partition_by": cfg["output"]["partition_by"],
            "format": cfg["output"]["format"],
        }
    )
    OutputLayout(cfg["output"]["path"], run_id).commit(results, manifest, overwrite=cfg["output"]["overwrite"])
    return manifest["counts"]


def run_job(cfg: JobConfig, beam_args: Sequence[str] = (), plan: Plan | None = None) -> dict:
    """Run a job to completion and return the committed manifest (DirectRunner etc.)."""
    import apache_beam as beam

    from transforms.writers import OutputLayout

    plan = plan or prepare(cfg)
    runner, options = make_runner(beam_args)
    t0 = time.perf_counter()
    with beam.Pipeline(runner=runner, options=options) as p:
        build_pipeline(p, plan)
    seconds = time.perf_counter() - t0
    layout = OutputLayout(cfg.output.path, plan.run_id)
    if not layout.is_complete():
        raise RuntimeError(f"the pipeline finished but {cfg.output.path!r} has no _SUCCESS; see the log above")
    with layout.fs.open(f"{layout.out}/{layout.MANIFEST}") as f:
        manifest = json.load(f)
    manifest["_seconds"] = seconds
    return manifest
