"""Beam only: the PTransforms and DoFns. The work is plain Python elsewhere
(`shard.ShardProcessor`, `commit.commit_run`, `inference.LayerModelHandler`, `rows`); the
DoFns load it once per worker process (`apache_beam.utils.shared.Shared`, as RunInference
does), count metrics, and pass results on.

`MatchShards` → `ExtractShards` is `layerbeam run`'s path (files in, tf.data decoding in
the DoFn). `ExtractLayers` and `WriteLayers` are for PCollections a user already has.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
import threading
import time
import uuid
import weakref
from collections.abc import Mapping, Sequence
from typing import Any

import apache_beam as beam
import numpy as np
from apache_beam.metrics import Metrics
from apache_beam.utils import shared

from .deadletters import Failure
from .errors import ConfigError, ModelError, first_line
from .readers import Shard, match_shards
from .shard import JobSpec, ShardProcessor, ShardResult

__all__ = ["MatchShards", "ExtractShards", "CommitShards", "ExtractLayers", "WriteLayers", "examples_so_far"]

_LOG = logging.getLogger("layerbeam")
_NS = "layerbeam"


# Examples extracted so far by workers in this process, by run id: the launcher's progress
# display reads it when the runner runs its workers here (in_memory, multi_threading);
# workers elsewhere leave it at 0 and the display counts finished shards' markers instead.
_LIVE: dict[str, int] = {}
_LIVE_LOCK = threading.Lock()


def examples_so_far(run_id: str) -> int:
    with _LIVE_LOCK:
        return _LIVE.get(run_id, 0)


class _ExtractShardDoFn(beam.DoFn):
    """Shard → `ShardResult`, after writing the shard's rows to staging."""

    def __init__(self, spec: JobSpec, run_id: str):
        self._spec = spec
        self._run_id = run_id
        self._shared = shared.Shared()
        self._examples = Metrics.counter(_NS, "examples")
        self._batches = Metrics.counter(_NS, "batches")
        self._dead = Metrics.counter(_NS, "dead_letters")
        self._shards = Metrics.counter(_NS, "shards")
        self._resumed = Metrics.counter(_NS, "shards_resumed")
        self._loads = Metrics.counter(_NS, "model_loads")
        self._reused = Metrics.counter(_NS, "launcher_model_reused")
        self._latency = Metrics.distribution(_NS, "batch_latency_ms")
        # Wall-clock time each batch finished; its min is the time to first batch.
        self._batch_done = Metrics.distribution(_NS, "batch_done_unix_ms")

    def setup(self):
        spec, run_id = self._spec, self._run_id

        def load():
            _LOG.info("loading the model for run %s", run_id)
            return _Holder(ShardProcessor(spec, run_id))

        self._holder = self._shared.acquire(load, tag=run_id)
        self._processor = self._holder.value

    def process(self, shard: Shard):
        if self._holder.claim_count():  # counted here: setup() runs outside any metrics context
            self._loads.inc()
            if self._processor.reused_launcher_model:
                self._reused.inc()
        # Beam metrics belong to the thread of the DoFn's context: the callback only records
        # (it runs on this thread today, but the shard's writer has its own: `write_behind`),
        # and the metrics are updated here.
        done: list[tuple[int, float, float]] = []

        def on_batch(n, seconds):
            done.append((n, seconds, time.time()))
            with _LIVE_LOCK:
                _LIVE[self._run_id] = _LIVE.get(self._run_id, 0) + n

        result = self._processor.process(shard, on_batch=on_batch)
        for n, seconds, at in done:
            self._examples.inc(n)
            self._batches.inc()
            self._latency.update(int(seconds * 1000))
            self._batch_done.update(int(at * 1000))
        self._shards.inc()
        if result.resumed:
            self._resumed.inc()
        self._dead.inc(result.dead_letters)
        for reason, n in result.dead_reasons.items():
            Metrics.counter(_NS, f"dead_letters.{reason}").inc(n)
        for err in result.shard_errors:
            Metrics.counter(_NS, f"shard_errors.{err['reason']}").inc()
        _LOG.info("shard %s: %d rows, %d dead letters in %.1fs", shard.id, result.rows, result.dead_letters, result.seconds)
        yield result


class _Holder:
    """Shared.acquire needs a weak-referenceable object. It also remembers whether its
    load was counted, so that `model_loads` is one per load, whichever DoFn copy or
    thread processes first."""

    def __init__(self, value):
        self.value = value
        self._counted = False
        self._lock = threading.Lock()

    def claim_count(self) -> bool:
        with self._lock:
            first, self._counted = not self._counted, True
            return first


@beam.ptransform_fn
def MatchShards(pbegin: beam.pvalue.PBegin, pattern: str, fmt: str, files_per_shard: int = 512, max_shards: int | None = None, spec=None):
    """PBegin → PCollection[Shard]: the pattern is expanded on a worker, not the launcher
    (`spec`, the `ReadSpec`, names a TFDS dataset's name and split).

    An `images` input is listed in parallel, never on one worker: the pattern's prefixes
    (folders, or subtrees for `**`) are found first, spread over workers, and each is listed
    on its own into compact shards (`readers.folders`: a folder's span of names, no paths).
    `max_shards` then keeps the first shards in path order (a `Top` of that many only)."""
    if fmt != "images":

        def expand(p):
            shards = match_shards(p, fmt, files_per_shard, spec=spec)
            return shards[:max_shards] if max_shards else shards

        return pbegin | "Pattern" >> beam.Create([pattern]) | "Expand" >> beam.FlatMap(expand)
    from .readers import folders

    shards = (
        pbegin
        | "Pattern" >> beam.Create([pattern])
        | "Prefixes" >> beam.FlatMap(folders.plan_prefixes)
        | "Spread" >> beam.Reshuffle()
        | "ListPrefix" >> beam.FlatMap(lambda prefix: folders.list_prefix(pattern, prefix, files_per_shard))
    )
    if not max_shards:
        return shards
    return (
        shards
        | "FirstShards" >> beam.combiners.Top.Smallest(max_shards, key=folders.sort_key)
        | "Each" >> beam.FlatMap(lambda xs: xs)
    )


@beam.ptransform_fn
def ExtractShards(shards: beam.PCollection, spec: JobSpec, run_id: str):
    """PCollection[Shard] → PCollection[ShardResult]: each shard's rows written to staging; its
    result (counts, files) comes out. Reshuffled first so shards spread over workers."""
    return (
        shards
        | "Reshuffle" >> beam.Reshuffle()
        | "ExtractAndWrite" >> beam.ParDo(_ExtractShardDoFn(spec, run_id))
    )


@beam.ptransform_fn
def CommitShards(results: beam.PCollection, shards, manifest_base: dict, run_id: str, planned_inputs: str | None = None, buckets: int | None = None,
                 reuse: Sequence[Mapping] | beam.PCollection = (), delta: beam.PCollection | None = None):
    """PCollection[ShardResult] → PCollection[counts]: the commit, distributed
    (`commit.py`'s steps; no step on one worker grows with rows, files or bytes).

    - Check: one step over each shard's brief result (counts, no file lists); its verdict
      is a side input of publishing, so nothing is published unless every shard is there.
    - Dedupe: each shard's key hashes split by hash bucket → GroupByKey → each bucket
      sorted on its own worker → the rows each shard loses, grouped by shard.
    - Publish: per shard, in parallel (its result joined with what it loses): verify,
      rewrite only if it lost rows, one operation per file; out comes a small summary.
    - Finalize: one step over the summaries: manifest and `_SUCCESS`.
    - Clean up: per shard in parallel after `_SUCCESS`, then the run's folder.

    Args:
        shards: the shards the workers listed (a side input: the completeness check).
        buckets: hash buckets of the dedupe (default `commit.DEDUPE_BUCKETS`).
        reuse: an incremental run's shards taken from the latest version (small summaries,
            one per shard): their kept key hashes join the dedupe, and each is carried
            into the new version by `commit.reuse_shard` in parallel with publishing. A
            sequence (the launcher matched the listing), or a PCollection where the pipeline
            matched it (`images`, listed only there).
        delta: where the pipeline matched the listing, its one delta (the manifest's `delta`,
            counts of new, changed, reused, removed and redone shards). With `up_to_date`
            true nothing is checked, published or finalized: the output stays at its version
            and only this run's staging folder is removed.
    """
    from . import commit
    from .staging import OutputLayout

    out = manifest_base["config"]["output"]["path"]
    nb = buckets or commit.DEDUPE_BUCKETS

    def layout():
        return OutputLayout(out, run_id)

    # Results stay `ShardResult` objects (pickled by Beam's default coder): as dicts, their
    # paths would be encoded as UTF-8 strings, which an undecodable file name (kept
    # surrogate-escaped, as Python lists it) cannot be. The commit functions take either.
    dicts = results
    # The steps that need a whole collection (the check, the final names, the manifest) run
    # once each, on one `Impulse`, with that collection as a list side input. As
    # `combiners.ToList()` + `Map` each was a `CombineGlobally` (9 transforms, 2 fused stages
    # and a side input for its default value): 4 of them were 36 of the job's 74
    # transforms, a third of building the graph and half of the commit's stages.
    once = results.pipeline | "Once" >> beam.Impulse()
    briefs = beam.pvalue.AsList(dicts | "Brief" >> beam.Map(commit.brief))
    if isinstance(reuse, beam.PCollection):  # matched in the pipeline: the ids and the delta are side inputs
        reused = reuse | "Reused" >> beam.Map(lambda e: _Pickled(dict(e, reused=True)))
        reused_ids = beam.pvalue.AsList(reused | "ReusedIds" >> beam.Map(lambda e: e.value["shard"]))
        decided = beam.pvalue.AsSingleton(delta) if delta is not None else None

        def check(_, bs, listed, ids, d):
            if _up_to_date(d):
                return False  # nothing to publish; nothing is written (no publishing flag)
            return commit.check_results(bs, listed, manifest_base, run_id, planned_inputs, ids)

        verdict = once | "Check" >> beam.Map(check, briefs, beam.pvalue.AsList(shards), reused_ids, decided)
    else:
        ids = [e["shard"] for e in reuse]
        verdict = once | "Check" >> beam.Map(
            lambda _, bs, listed: commit.check_results(bs, listed, manifest_base, run_id, planned_inputs, ids), briefs, beam.pvalue.AsList(shards)
        )
        # no shard reused (a full run): no branch for them
        reused = (results.pipeline | "Reused" >> beam.Create([_Pickled(dict(e, reused=True)) for e in reuse])) if reuse else None
        decided = None
    # What the dedupe, the final names and publishing take of each shard: this run's, and in
    # an incremental run the reused ones' too.
    key_parts = [dicts | "KeyBuckets" >> beam.FlatMap(lambda r: commit.key_parts(layout(), r, nb))]
    file_lists = [
        dicts
        | "FileLists" >> beam.Map(lambda r: _Pickled({"shard": r.shard if hasattr(r, "shard") else r["shard"], "files": [{"path": f["path"]} for f in (r.files if hasattr(r, "files") else r["files"])]}))
    ]
    keyed = dicts | "ByShard" >> beam.Map(lambda r: (r.shard if hasattr(r, "shard") else r["shard"], r))
    joined = {"result": keyed}
    if reused is not None:
        key_parts.append(reused | "ReusedKeyBuckets" >> beam.FlatMap(lambda e: commit.key_parts(layout(), e.value, nb)))
        # reused shards' files count in the new version's names (TFDS's file count)
        file_lists.append(reused | "ReusedFileLists" >> beam.Map(lambda e: _Pickled({"shard": e.value["shard"], "files": [{"path": f["path"]} for f in e.value["files"]]})))
        joined["reused"] = reused | "ReusedByShard" >> beam.Map(lambda e: (e.value["shard"], e))
    joined["lost"] = (
        tuple(key_parts)
        | "AllKeyBuckets" >> beam.Flatten()
        | "ByBucket" >> beam.GroupByKey()
        | "FindRepeats" >> beam.FlatMap(lambda kv: commit.find_repeats(kv[1]))
    )
    # each file's committed name, where the format names files over the whole output (TFDS
    # names for TFRecord): given at publishing, so finalize renames nothing
    fmt = manifest_base["config"]["output"]["format"]
    names = once | "FinalNames" >> beam.Map(
        lambda _, rs: commit.final_names([x.value for x in rs], fmt, run_id), beam.pvalue.AsList(tuple(file_lists) | "FileListsFlat" >> beam.Flatten())
    )

    def publish(kv, go, names):
        shard, grouped = kv
        if not go:  # this run's output is committed already
            return
        lost_rows = [x for part in grouped["lost"] for x in part]
        if grouped.get("reused"):
            (e,) = grouped["reused"]
            yield _Pickled(commit.reuse_shard(layout(), e.value, lost_rows, fmt))
            return
        (r,) = grouped["result"]
        yield _Pickled(commit.publish_shard(layout(), r, lost_rows, names=names.get(shard)))

    summaries = (
        joined
        | "Join" >> beam.CoGroupByKey()
        | "Publish" >> beam.FlatMap(publish, beam.pvalue.AsSingleton(verdict), beam.pvalue.AsSingleton(names))
    )

    def finalize(_, s, d):
        if _up_to_date(d):  # the output stays at its version: no manifest, no `_SUCCESS`
            return commit.committed_counts(layout()) or {}
        base = manifest_base if d is None else dict(manifest_base, delta={k: v for k, v in d.items() if k != "up_to_date"})
        return commit.finalize(layout(), [x.value for x in s], base)

    counts = once | "Finalize" >> beam.Map(finalize, beam.pvalue.AsList(summaries), decided)
    # each shard's staging removed in parallel once `_SUCCESS` is there, then the run's folder
    cleaned = keyed | "CleanShard" >> beam.Map(lambda kv, _: commit.cleanup_shard(layout(), kv[0]), beam.pvalue.AsSingleton(counts))
    return counts | "CleanRun" >> beam.Map(lambda c, _: (commit.cleanup_run(layout()), c)[1], beam.pvalue.AsList(cleaned))


def _up_to_date(delta) -> bool:
    """The delta the pipeline decided says there is nothing to commit."""
    return bool(delta and delta.get("up_to_date"))


class _Pickled:
    """A value Beam's default coder pickles whole. A shard's summary names its input files,
    and a file name that is not valid UTF-8 (listed surrogate-escaped) cannot be encoded as
    a Beam string; pickled, it reaches the manifest as Python listed it."""

    __slots__ = ("value",)

    def __init__(self, value):
        self.value = value


# --------------------------------------------------------------------------- ExtractLayers

# Runners whose workers run on this machine, where an in-memory model saved to a local
# temporary file can be read by every worker.
_LOCAL_RUNNERS = {"DirectRunner", "SwitchingDirectRunner", "FnApiRunner", "BundleBasedDirectRunner", "PrismRunner", "TestDirectRunner"}


def _runs_here(pipeline) -> bool:
    from apache_beam.options.pipeline_options import PortableOptions

    runner = getattr(pipeline, "runner", None)
    name = type(runner).__name__ if runner is not None else "DirectRunner"
    if name in _LOCAL_RUNNERS:
        return True
    return pipeline.options.view_as(PortableOptions).environment_type == "LOOPBACK"


class _CheckInputs(beam.DoFn):
    """(key, array | {input: array}) → (key, {input name: float32 array}) of the model's
    input shapes. A bad element raises, or with `dead` becomes a `(key, dead letter)` on the
    `dead` output: checked one by one before batching, so it cannot fail its batch."""

    DEAD = "dead"

    def __init__(self, input_shapes: Mapping[str, tuple[int, ...]], dead: bool):
        self._shapes = dict(input_shapes)
        self._dead = dead
        self._bad = Metrics.counter(_NS, "dead_letters.bad_input")

    def process(self, element):
        from .extractor import model_inputs

        try:
            key, value = element
        except (TypeError, ValueError):
            key, value, err = None, None, f"element {_short(element)} is not a (key, example) pair; key your PCollection, e.g. beam.Map(lambda x: (id_of(x), x))"
        else:
            err = None
        if err is None:
            try:
                yield key, model_inputs(value, self._shapes, batched=False, what=f"element {key!r}")
                return
            except ValueError as e:
                err = first_line(e)
        if not self._dead:
            raise ValueError(err + "; or use ExtractLayers(...).with_exception_handling() to route such elements to a dead-letter output")
        self._bad.inc()
        yield beam.pvalue.TaggedOutput(self.DEAD, (key, {"stage": "check", "reason": "bad_input", "detail": err}))


def _short(x: Any) -> str:
    text = repr(x)
    return text if len(text) <= 80 else text[:77] + "..."


def _failed_batch(failure):
    """RunInference's failed batch `([(key, example) ...], (type, repr, traceback))` → one
    dead letter per element."""
    batch, (exc_type, _, tb) = failure
    last = (tb[-1] if tb else "").strip()  # "module.Type: message …", the traceback's last entry
    first = last.splitlines()[0] if last else "inference failed"
    detail = f"{getattr(exc_type, '__name__', exc_type)}: {first.split(': ', 1)[-1]}"[:300]
    for key, _ in batch:
        yield key, {"stage": "inference", "reason": "inference_failed", "detail": detail}


def _inference(element):
    key, result = element
    return key, result.inference


class ExtractLayers(beam.PTransform[beam.PCollection[tuple[Any, Any]], beam.PCollection[tuple[Any, dict[str, np.ndarray]]]]):
    """Layer outputs of keyed examples, with Beam's `RunInference`.

    `PCollection[tuple[key, array | dict[str, array]]]` → `PCollection[tuple[key, dict[str,
    np.ndarray]]]`: per example, one array per selected output (reduced and cast as asked).
    An example is an array of the model's input shape (single-input models) or a dict
    {input name: array} (multi-input models); any numeric dtype, given to the model as
    float32, without preprocessing (apply your model's `preprocess_input` first).

    Built on `RunInference(KeyedModelHandler(LayerModelHandler(...)))`: the model is loaded
    once per worker process (RunInference's `Shared` machinery), examples are batched with
    `BatchElements` up to `batch_size`, and RunInference's metrics are counted under the
    `layerbeam` namespace. Each element is checked against the model's input shapes before
    batching. `ExtractLayers(...).with_exception_handling()` returns `(outputs, dead)`:
    `dead` is a `PCollection[tuple[key, {stage, reason, detail}]]` of the elements that
    failed the check (`bad_input`) or whose batch the model failed on
    (`inference_failed`), while the rest still arrive. Without it, a bad element fails the
    pipeline with a one-line message.

    The model travels as a source, never pickled. When the transform is built, the
    launcher loads it once to check the selection and learn the input shapes (so a
    selector that matches nothing fails here, not on a worker); a worker in the launcher's
    process (DirectRunner, LOOPBACK) takes that copy and its trace instead of loading the
    model again (a source it loaded, not a caller's in-memory model). A `keras.Model` given in
    memory is saved to a temporary `.keras` file on this machine (deleted when the
    transform is garbage-collected), which only workers on this machine can read: it is
    accepted for DirectRunner (any `direct_running_mode`), Prism and LOOPBACK portable
    runners; for Dataflow and other remote runners pass a source the workers can read
    (`gs://.../model.keras`, `keras.applications.<Name>`, `module:function`).

    Args:
        model: a `keras.Model`, a `.keras`/`.h5` path or URL, `keras.applications.<Name>`,
            `module:function`, or a `layerbeam.transforms.models.ModelSpec`.
        select: selectors as in `layers.select` (see `layerbeam.list_layers(model)`).
        reduce: none | mean | max | flatten, the default for every selector.
        dtype: float32 | float16 | bfloat16 (float32 values rounded to bfloat16).
        batch_size: the largest batch; RunInference may form smaller ones.
        exclude, include_inputs: as `layers.exclude` / `layers.include_inputs`.
        input_shape: build (`keras.applications`) or trace the model at this shape.
        weights, model_kwargs, seed, safe_mode: as `model.weights`, `model.kwargs`,
            `model.seed`, `model.safe_mode`.
        jit_compile: compile the extractor with XLA.
        min_batch_size: the smallest batch; default `batch_size` (fixed batches: grown
            from 1, `BatchElements` kept MobileNetV2's batches at 1–12 on CPU, which
            computes slower). Lower it, with `max_batch_duration_secs`, for streaming.
        max_batch_duration_secs: `BatchElements`' flush time (streaming).
        model_identifier: RunInference's; share one loaded model between steps.

    Attributes:
        outputs: the `OutputSpec`s of the selected outputs (name, shape, dtype, …).
        input_shapes: {model input name: shape} the examples must have.

    Example:
        >>> with beam.Pipeline() as p:
        ...     feats = (p | beam.Create([("a", img_a), ("b", img_b)])
        ...                | layerbeam.ExtractLayers("model.keras", select=["conv1"]))
    """

    def __init__(
        self,
        model,
        select: str | Sequence[str | Mapping[str, Any]] = "all",
        reduce: str = "mean",
        dtype: str = "float32",
        batch_size: int = 32,
        *,
        exclude: Sequence[str] = (),
        include_inputs: bool = False,
        input_shape: Sequence[int] | None = None,
        weights: str | None = None,
        model_kwargs: Mapping[str, Any] | None = None,
        seed: int = 0,
        safe_mode: bool = True,
        jit_compile: bool = False,
        min_batch_size: int | None = None,
        max_batch_duration_secs: int | None = None,
        model_identifier: str | None = None,
    ):
        super().__init__()
        from .inference import LayerModelHandler
        from .layers import ModelGraph, SelectSpec
        from .models import LauncherModel, ModelSpec, model_fingerprint, offer_launcher_model, resolve_model, withdraw_launcher_model

        if batch_size < 1:
            raise ConfigError(f"batch_size {batch_size!r} must be at least 1")
        keras_model, spec, shapes = resolve_model(model, input_shape=input_shape, weights=weights, kwargs=model_kwargs, seed=seed, safe_mode=safe_mode)
        graph = ModelGraph(keras_model, input_shapes=shapes)
        selectors = [select] if isinstance(select, (str, Mapping)) else list(select)
        layers = SelectSpec(select=tuple(s if isinstance(s, str) else dict(s) for s in selectors), exclude=tuple(exclude), reduce=reduce, dtype=dtype, include_inputs=include_inputs)
        self.outputs = graph.select(list(layers.select), exclude=layers.exclude, reduce=reduce, dtype=dtype, include_inputs=include_inputs)
        self.input_shapes = graph.input_shapes
        fingerprint = model_fingerprint(keras_model)
        self._in_memory = spec is None
        if spec is None:
            spec = ModelSpec(source=_save_temporarily(self, keras_model), safe_mode=safe_mode)
            key = None  # the caller's own model object: workers load the saved copy
        else:
            # A worker in this process (DirectRunner, LOOPBACK) takes the model loaded here
            # and its trace instead of loading it again; offered while this transform lives,
            # withdrawn at once where the workers run elsewhere (`expand`).
            key = uuid.uuid4().hex
            offer_launcher_model(key, LauncherModel.capture(keras_model, fingerprint, (graph, tuple(self.outputs)), placed=False))
            weakref.finalize(self, withdraw_launcher_model, key)
        self._launcher_key = key
        self._handler = LayerModelHandler(
            spec, layers, input_shapes=list(self.input_shapes.values()), batch_size=batch_size, fingerprint=fingerprint,
            jit_compile=jit_compile, min_batch_size=min_batch_size, max_batch_duration_secs=max_batch_duration_secs,
            launcher_key=key,
        )
        self._model_identifier = model_identifier
        self._dead = False

    def with_exception_handling(self) -> ExtractLayers:
        """Return `(outputs, dead)` instead of failing on a bad element (see the class)."""
        self._dead = True
        return self

    def expand(self, pcoll):
        from apache_beam.ml.inference.base import KeyedModelHandler, RunInference

        runs_here = _runs_here(pcoll.pipeline)
        if self._launcher_key and not runs_here:
            from .models import withdraw_launcher_model

            withdraw_launcher_model(self._launcher_key)  # the workers load their own
        if self._in_memory and not runs_here:
            raise ConfigError(
                f"ExtractLayers got a keras.Model in memory, but runner {type(pcoll.pipeline.runner).__name__} runs workers elsewhere; "
                "save the model where the workers can read it (model.save('gs://.../model.keras')) and pass that path"
            )
        checked = pcoll | "CheckInputs" >> beam.ParDo(_CheckInputs(self.input_shapes, self._dead)).with_outputs(_CheckInputs.DEAD, main="ok")
        inference = RunInference(KeyedModelHandler(self._handler), model_identifier=self._model_identifier)
        if not self._dead:
            return checked.ok | "RunInference" >> inference | "Outputs" >> beam.Map(_inference)
        results, dlq = checked.ok | "RunInference" >> inference.with_exception_handling()
        outputs = results | "Outputs" >> beam.Map(_inference)
        failed = dlq.failed_inferences | "FailedBatches" >> beam.FlatMap(_failed_batch)
        dead = (checked[_CheckInputs.DEAD], failed) | "DeadLetters" >> beam.Flatten()
        return outputs, dead


# --------------------------------------------------------------------------- DecodeImages

class DecodeImages(beam.PTransform[beam.PCollection[tuple[Any, bytes]], beam.PCollection[tuple[Any, np.ndarray]]]):
    """Encoded images → model-ready arrays, decoded as the file-pattern path decodes them.

    `PCollection[tuple[key, bytes]]` → `PCollection[tuple[key, np.ndarray]]`: each JPEG,
    PNG, GIF, BMP or WebP is decoded, turned by its EXIF orientation, resized to `size` and
    preprocessed, float32 (H, W, channels), by the same TensorFlow function
    `input.format: tfrecord`/`images` run in tf.data, so an image gives the same array on
    both paths. Put it in front of `ExtractLayers`.

    Elements are decoded in batches of `batch_size` by one `tf.function` that decodes a
    batch's images in parallel (`tf.map_fn`), one batch ahead of the steps after it (on a
    GPU worker, the next batch decodes while the model runs). Decoding each element
    eagerly in a `Map`, as Beam's RunInference examples do, costs every op's eager
    dispatch and uses one core:
    on 2 cores, 256 px photo crops to 224, 0.8 ms of wall time per image here against
    1.1–1.5 ms, and `ExtractLayers` fed this way ran 1.11× faster end to end than fed by
    the eager `Map` (`scripts/bench.py`, kinds `extract_layers` and `extract_layers_eager`).

    A batch with an image that does not decode is decoded again one image at a time, so
    only that image fails: with `.with_exception_handling()` it becomes a `(key, {stage,
    reason, detail})` on the `dead` output (reasons as the file path's dead letters:
    `not_an_image`, `truncated_image`, `image_too_large`, ...; `bad_input` for a value that
    is not bytes), and `(outputs, dead)` is returned; without it, the pipeline fails with a
    one-line message.

    Args:
        size: (height, width) the images are resized to, the model's input size.
        preprocess: the scaling the model was trained with: `keras.applications.<Name>`
            (that application's `preprocess_input`), none (0..255), scale (0..1), tf
            (-1..1), caffe, torch, or `module:function` (float32 0..255 in).
        channels: 3 (RGB) or 1 (grayscale).
        resize_method, exif_orientation, max_image_pixels: as `input.resize_method`,
            `input.exif_orientation` and `input.max_image_pixels`.
        batch_size: images decoded together.

    Example:
        >>> feats = (p | beam.io.ReadFromTFRecord(pattern) | beam.Map(key_and_bytes)
        ...            | layerbeam.DecodeImages((224, 224), "keras.applications.MobileNetV2")
        ...            | layerbeam.ExtractLayers("keras.applications.MobileNetV2", select=["out_relu"]))
    """

    def __init__(
        self,
        size: Sequence[int],
        preprocess: str = "none",
        *,
        channels: int = 3,
        resize_method: str = "bilinear",
        exif_orientation: bool = True,
        max_image_pixels: int | None = 50_000_000,
        batch_size: int = 32,
    ):
        super().__init__()
        from .readers import ReadSpec

        if not isinstance(size, Sequence) or len(size) != 2 or not all(isinstance(d, (int, np.integer)) and d > 0 for d in size):
            shown = tuple(size) if isinstance(size, Sequence) else size
            raise ConfigError(f"DecodeImages size {shown!r} is not (height, width) in positive pixels; give e.g. (224, 224)")
        if channels not in (1, 3):
            raise ConfigError(f"DecodeImages channels {channels!r} is not 1 or 3; decode to RGB (3) or grayscale (1)")
        if batch_size < 1:
            raise ConfigError(f"DecodeImages batch_size {batch_size!r} must be at least 1")
        if resize_method not in _RESIZE_METHODS:
            raise ConfigError(f"DecodeImages resize_method {resize_method!r} is unknown; use one of {', '.join(_RESIZE_METHODS)}")
        _image_preprocess(preprocess)  # an unknown name fails here, on the launcher
        # The file path's own read options, so both paths decode with the same settings.
        self._spec = ReadSpec(
            pattern="", format="tfrecord", image_size=(int(size[0]), int(size[1])), channels=channels,
            resize_method=resize_method, exif_orientation=exif_orientation, max_image_pixels=max_image_pixels,
        )
        self._preprocess = preprocess
        self._batch_size = batch_size
        self._dead = False

    def with_exception_handling(self) -> DecodeImages:
        """Return `(outputs, dead)` instead of failing on a bad image (see the class)."""
        self._dead = True
        return self

    def expand(self, pcoll):
        n = self._batch_size
        batches = pcoll | "Batch" >> beam.BatchElements(min_batch_size=n, max_batch_size=n)
        decoded = batches | "Decode" >> beam.ParDo(_DecodeBatchDoFn(self._spec, self._preprocess, self._dead)).with_outputs(_DecodeBatchDoFn.DEAD, main="ok")
        return (decoded.ok, decoded[_DecodeBatchDoFn.DEAD]) if self._dead else decoded.ok


_RESIZE_METHODS = ("bilinear", "nearest", "bicubic", "area", "lanczos3")  # as input.resize_method


def _image_preprocess(name: str):
    """`DecodeImages`' preprocess name → the function (`keras.applications.<Name>`: its own)."""
    from .models import preprocess_fn

    if name == "auto":
        raise ConfigError("DecodeImages preprocess 'auto' needs a model; name it: 'keras.applications.<Name>', none, scale, tf, caffe, torch or module:function")
    if name.startswith("keras.applications."):
        import keras

        if not hasattr(keras.applications, name.split(".", 2)[2]):
            raise ConfigError(f"DecodeImages preprocess {name!r}: keras.applications has no {name.split('.', 2)[2]!r}")
        return preprocess_fn("auto", name)
    try:
        return preprocess_fn(name, "")
    except ModelError as e:  # its message names the config field
        raise ConfigError(str(e).replace("input.preprocess", "DecodeImages preprocess")) from None


class _DecodeBatchDoFn(beam.DoFn):
    """[(key, bytes)] → (key, float32 array) per image, one `tf.function` call per batch.

    One batch ahead: batch k is decoded on a thread of this DoFn while batch k-1's arrays
    go on downstream, where `ExtractLayers` runs the model on them in this thread (fused
    steps run in the thread that calls `process`), so decoding overlaps the model as
    tf.data overlaps them on the file path. The last batch of a bundle is emitted by
    `finish_bundle`; each batch keeps its own window and timestamp."""

    DEAD = "dead"

    def __init__(self, spec, preprocess: str, dead: bool):
        self._spec = spec
        self._preprocess = preprocess
        self._dead = dead

    def setup(self):
        import concurrent.futures

        import tensorflow as tf

        from .readers.images import decode_image

        spec, pre = self._spec, _image_preprocess(self._preprocess)
        shape = (*spec.image_size, spec.channels)
        one = tf.TensorSpec(shape, tf.float32)

        # parallel_iterations: the batch's decodes run side by side on TensorFlow's
        # inter-op threads (one image is one kernel); no AutoGraph: no Python control flow.
        def decode(data):
            return tf.map_fn(lambda d: decode_image(d, shape, spec, pre), data, fn_output_signature=one, parallel_iterations=64)

        self._decode = tf.function(decode, input_signature=[tf.TensorSpec([None], tf.string)], autograph=False)
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="layerbeam-decode")

    def start_bundle(self):
        self._pending = None

    def process(self, batch, window=beam.DoFn.WindowParam, timestamp=beam.DoFn.TimestampParam):
        good, dead = [], []
        for element in batch:
            try:
                key, value = element
            except (TypeError, ValueError):
                dead.append((None, "bad_input", f"element {_short(element)} is not a (key, image bytes) pair; key your PCollection, e.g. beam.Map(lambda r: (r.key, r.image))"))
                continue
            if isinstance(value, (bytes, bytearray, memoryview, np.bytes_)):
                good.append((key, bytes(value)))
            else:
                dead.append((key, "bad_input", f"element {key!r} holds a {type(value).__name__}, not encoded image bytes; give the file's bytes (JPEG, PNG, GIF, BMP or WebP)"))
        future = self._pool.submit(self._decode_batch, [d for _, d in good]) if good else None
        previous, self._pending = self._pending, (future, good, dead, window, timestamp)
        if previous is not None:
            yield from self._emit(*previous)

    def finish_bundle(self):
        previous, self._pending = self._pending, None
        if previous is not None:
            yield from self._emit(*previous)

    def teardown(self):
        pool = getattr(self, "_pool", None)
        if pool is not None:
            pool.shutdown(wait=True)

    def _decode_batch(self, datas: list[bytes]) -> np.ndarray:
        import tensorflow as tf

        return self._decode(tf.constant(datas)).numpy()

    def _emit(self, future, good, dead, window, timestamp):
        import tensorflow as tf
        from apache_beam.utils.windowed_value import WindowedValue

        def out(value, tag=None):
            wv = WindowedValue(value, timestamp, (window,))
            return wv if tag is None else beam.pvalue.TaggedOutput(tag, wv)

        dead = list(dead)
        try:
            arrays = future.result() if future is not None else []
        except tf.errors.OpError:  # one bad image fails the batch: find it, keep the rest
            arrays = None
        if arrays is not None:
            for (key, _), a in zip(good, arrays):
                yield out((key, a))
        else:
            for key, data in good:
                try:
                    a = self._decode_batch([data])[0]
                except tf.errors.OpError as e:
                    dead.append((key, *self._why(data, e)))
                    continue
                yield out((key, a))
        for key, reason, detail in dead:
            Metrics.counter(_NS, f"dead_letters.{reason}").inc()
            if not self._dead:
                raise ValueError(f"{detail}; or use DecodeImages(...).with_exception_handling() to route such elements to a dead-letter output")
            yield out((key, {"stage": "decode", "reason": reason, "detail": detail}), self.DEAD)

    def _why(self, data: bytes, error) -> tuple[str, str]:
        from .readers.images import classify_image

        found = classify_image(data, self._spec.channels, self._spec.max_image_pixels)
        return found if found is not None else ("decode_failed", first_line(error))


def _save_temporarily(owner, model) -> str:
    """Save an in-memory model to a temporary .keras file removed with `owner`."""
    folder = tempfile.mkdtemp(prefix="layerbeam-model-")
    weakref.finalize(owner, shutil.rmtree, folder, True)
    path = os.path.join(folder, "model.keras")
    try:
        model.save(path)
    except Exception as e:  # Keras raises several types for models it cannot serialize
        raise ModelError(
            f"the keras.Model {model.name!r} given to ExtractLayers cannot be saved to a .keras file ({first_line(e)}); "
            "ExtractLayers sends workers a model source, so pass a module:function that builds it"
        ) from None
    return path


# --------------------------------------------------------------------------- WriteLayers

def _column_type(v) -> str:
    """The Arrow type name of a scalar value of a WriteLayers dict; "?" for anything else."""
    if isinstance(v, (bool, int, np.integer, np.bool_)):
        return "int64"
    if isinstance(v, (float, np.floating)):
        return "float32"
    if isinstance(v, (str, bytes, np.str_, np.bytes_)):
        return "string"
    return "?"


def _signature(element) -> tuple:
    """An element's columns: ((name, "tensor", dtype, shape) | (name, "column", type, ()), …)."""
    _, values = element
    sig = []
    for name, v in values.items():
        if isinstance(v, np.ndarray):
            sig.append((str(name), "tensor", "float16" if v.dtype == np.float16 else "float32", tuple(int(d) for d in v.shape)))
        else:
            sig.append((str(name), "column", _column_type(v), ()))
    return tuple(sig)


def _chosen(signatures: Sequence[tuple[tuple, int]]) -> tuple:
    """The signature most elements have (ties: the first in sorted order); () if none."""
    if not signatures:
        return ()
    return sorted(signatures, key=lambda sc: (-sc[1], repr(sc[0])))[0][0]


def _layout_of(signature: tuple, partition_by: Sequence[str]):
    """(Arrow schema, tensor OutputSpecs) for a signature."""
    import pyarrow as pa

    from .layers import OutputSpec
    from .schema import output_schema

    arrow = {"int64": pa.int64(), "float32": pa.float32(), "string": pa.string()}
    cols: dict[str, Any] = {"key": pa.string()}
    specs = []
    for name, kind, typ, shape in signature:
        if kind == "column":
            if typ == "?":
                raise ConfigError(f"WriteLayers: {name!r} holds values that are neither numpy arrays (tensor columns) nor ints, floats or strings (plain columns); convert them")
            cols[name] = arrow[typ]
        else:
            specs.append(OutputSpec(name=name, path=name, layer_type="", reduce="none", dtype=typ, shape=shape))
    for p in partition_by:
        if p not in cols or p == "key":
            raise ConfigError(f"WriteLayers: partition_by names {p!r}, which is not a scalar column of the elements; partition by one of {sorted(set(cols) - {'key'}) or 'nothing: add scalar values (e.g. a label) to the dicts'}")
    return output_schema(specs, cols), specs


def _bucket(element, n: int) -> tuple[int, Any]:
    key = element[0]
    data = key if isinstance(key, bytes) else str(key).encode()
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big") % n, element


def _key_text(key) -> str:
    return key.decode("utf-8", "replace") if isinstance(key, bytes) else str(key)


class _WriteBucketDoFn(beam.DoFn):
    """(bucket, [(key, {name: value})]) → `ShardResult`, after staging the bucket's rows as
    one shard (sorted by key, so a retried bundle writes the same files). A repeated key
    or an element whose columns differ from the others' becomes a dead letter."""

    def __init__(self, spec, run_id: str):
        self._spec = spec
        self._run_id = run_id
        self._rows = Metrics.counter(_NS, "rows_written")
        self._dead = Metrics.counter(_NS, "dead_letters")

    def process(self, item, signatures):
        from .formats import make_writer
        from .rows import write_rows
        from .staging import OutputLayout

        bucket, elements = item
        chosen = _chosen(signatures)
        schema, specs = _layout_of(chosen, self._spec.partition_by)
        want = sorted(chosen)
        rows = sorted(((_key_text(k), v) for k, v in elements), key=lambda kv: kv[0])
        keep, index, failures, seen = [], [], [], set()
        for i, (key, values) in enumerate(rows):
            if key in seen:
                failures.append(Failure(i, key, "write", "duplicate_key", f"key {key!r} was already written by another element"))
                continue
            sig = sorted(_signature((key, values)))
            if sig != want:
                failures.append(Failure(i, key, "write", "output_mismatch", f"element {key!r} has columns {sig}, the others {want}; give every element the same outputs"))
                continue
            seen.add(key)
            keep.append((key, values))
            index.append(i)
        columns = {name: np.array([v[name] for _, v in keep], dtype=object if typ == "string" else typ) for name, kind, typ, _ in chosen if kind == "column"}
        if "string" in {typ for _, kind, typ, _ in chosen if kind == "column"}:
            columns = {n: np.array([_key_text(x) for x in a], dtype=object) if a.dtype == object else a for n, a in columns.items()}
        outputs = {s.name: np.stack([v[s.name] for _, v in keep]).astype(s.dtype, copy=False) if keep else np.zeros((0, *s.shape), s.dtype) for s in specs}
        layout = OutputLayout(self._spec.path, self._run_id)
        result = write_rows(
            layout, make_writer(self._spec, schema), schema, f"b{bucket:05d}", [k for k, _ in keep], columns, outputs, "",
            index=np.array(index, np.int64), failures=failures, origin=f"<WriteLayers shard {bucket}>",
        )
        self._rows.inc(result.rows)
        self._dead.inc(result.dead_letters)
        yield result


def _commit_written(results: list[ShardResult], signatures, spec, run_id: str) -> dict:
    """Commit the staged shards (`rows.commit_rows`); return the committed manifest."""
    import json

    from .formats import make_writer
    from .rows import commit_rows, manifest_base, write_rows
    from .staging import OutputLayout

    schema, specs = _layout_of(_chosen(signatures), spec.partition_by)
    writer = make_writer(spec, schema)
    layout = OutputLayout(spec.path, run_id)
    if not results:  # an empty PCollection: commit an empty output, as a run of no rows would
        results = [write_rows(layout, writer, schema, "b00000", [], {}, {s.name: np.zeros((0, *s.shape), s.dtype) for s in specs}, "", origin="<WriteLayers>")]
    config = {
        "input": {"kind": "beam"},
        "model": {"source": None},
        "layers": {},
        "output": {"path": spec.path, "format": spec.format, "partition_by": list(spec.partition_by), "overwrite": spec.overwrite, "allow_empty": True},
    }
    model = {"source": None, "weights": None, "fingerprint": "", "input_shapes": {}}
    commit_rows(results, manifest_base(run_id, config, model, specs, writer.storage_spec()))
    with layout.fs.open(f"{layout.out}/{layout.MANIFEST}") as f:
        return json.load(f)


class WriteLayers(beam.PTransform[beam.PCollection[tuple[Any, Mapping[str, Any]]], beam.PCollection[dict]]):
    """Write `PCollection[tuple[key, dict[str, value]]]` (what `ExtractLayers` gives) as a
    committed layerbeam output: the same staging, atomic commit, `_manifest.json` and
    `_SUCCESS` as `layerbeam run`, readable with `layerbeam.read(path)`.

    In each dict, numpy arrays are tensor columns (float16 stays float16, other dtypes are
    stored as float32) and scalars (int, float, str) are plain columns (int64, float32,
    string) that `partition_by` may name. Keys become the `key` column (as strings). The
    elements are hashed by key into `num_shards` shards, each written to staging by one
    worker; then one commit moves every file into place. An element whose key repeats, or
    whose columns differ from those most elements have, becomes a dead letter
    (`duplicate_key`, `output_mismatch`), counted in the manifest like a run's.

    The result is a PCollection of one element: the committed manifest.

    Args:
        path: the output folder (local path or fsspec URL, e.g. gs://bucket/out).
        format: parquet | tfrecord.
        partition_by: Hive partition columns (scalar values of the dicts).
        num_shards: how many shards (each at least one file per partition) to write.
        overwrite: replace an existing complete output.
        max_rows_per_file, compression, parquet_encoding: as the `output` config's fields.

    Raises:
        ConfigError: when built, if `path` holds an output already (without
            `overwrite`) or is being written by a run.
    """

    def __init__(
        self,
        path: str,
        format: str = "parquet",
        partition_by: Sequence[str] = (),
        *,
        num_shards: int = 16,
        overwrite: bool = False,
        max_rows_per_file: int = 100_000,
        compression: str = "zstd",
        parquet_encoding: str = "portable",
    ):
        super().__init__()
        from .formats import FORMATS, WriteSpec
        from .rows import refuse_existing
        from .staging import OutputLayout

        if format not in FORMATS:
            raise ConfigError(f"WriteLayers: format {format!r} is unknown; use one of {', '.join(FORMATS)}")
        if num_shards < 1:
            raise ConfigError(f"WriteLayers: num_shards {num_shards!r} must be at least 1")
        if isinstance(partition_by, str):
            partition_by = (partition_by,)
        self._spec = WriteSpec(
            path=path, format=format, partition_by=tuple(partition_by), overwrite=overwrite,
            max_rows_per_file=max_rows_per_file, compression=compression, parquet_encoding=parquet_encoding,
        )
        self._run_id = uuid.uuid4().hex[:16]
        self._num_shards = num_shards
        refuse_existing(OutputLayout(path, self._run_id), overwrite)

    def expand(self, pcoll):
        from apache_beam.transforms.window import GlobalWindows

        spec, run_id, n = self._spec, self._run_id, self._num_shards
        if not isinstance(pcoll.windowing.windowfn, GlobalWindows):
            # The commit runs once, in the global window, over every shard written: elements
            # of other windows would reach it as nothing, and an empty output be published.
            raise ConfigError(
                f"WriteLayers: the input is windowed by {type(pcoll.windowing.windowfn).__name__}, but one output is written for a whole "
                "bounded PCollection; apply beam.WindowInto(beam.window.GlobalWindows()) before WriteLayers"
            )
        signatures = beam.pvalue.AsList(
            pcoll | "Signature" >> beam.Map(_signature) | "CountSignatures" >> beam.combiners.Count.PerElement()
        )  # [(signature, elements)]
        results = (
            pcoll
            | "Shard" >> beam.Map(_bucket, n)  # (shard, (key, values))
            | "GroupByShard" >> beam.GroupByKey()
            | "WriteShard" >> beam.ParDo(_WriteBucketDoFn(spec, run_id), signatures)  # ShardResult
        )
        # once, over every shard's result (a side input; see `CommitShards`)
        return pcoll.pipeline | "Once" >> beam.Impulse() | "Commit" >> beam.Map(
            lambda _, rs, sigs: _commit_written(rs, sigs, spec, run_id), beam.pvalue.AsList(results), signatures
        )
