"""Beam only: the PTransforms and DoFns. The work is plain Python elsewhere
(`shard.ShardProcessor`, `commit.commit_run`, `inference.LayerModelHandler`); the DoFns load
it once per worker process (`apache_beam.utils.shared.Shared`, as RunInference does), count
metrics, and pass results on.
"""

from __future__ import annotations

import logging
import threading
import time

import apache_beam as beam
from apache_beam.metrics import Metrics
from apache_beam.utils import shared

from .readers import Shard, match_shards
from .shard import JobSpec, ShardProcessor, ShardResult

__all__ = ["MatchShards", "ExtractShards", "CommitShards"]

_LOG = logging.getLogger("layerbeam")
_NS = "layerbeam"


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
        # The writer pulls batches on a pyarrow thread; Beam metrics are per thread, so
        # the callback only records and the metrics are updated here, on the DoFn's thread.
        done: list[tuple[int, float, float]] = []

        def on_batch(n, seconds):
            done.append((n, seconds, time.time()))

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
def MatchShards(pbegin: beam.pvalue.PBegin, pattern: str, fmt: str, files_per_shard: int = 512, max_shards: int | None = None):
    """PBegin → PCollection[Shard]: the pattern is expanded on a worker, not the launcher."""

    def expand(p):
        shards = match_shards(p, fmt, files_per_shard)
        return shards[:max_shards] if max_shards else shards

    return pbegin | "Pattern" >> beam.Create([pattern]) | "Expand" >> beam.FlatMap(expand)


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
def CommitShards(results: beam.PCollection, shards, manifest_base: dict, run_id: str, planned_inputs: str | None = None, buckets: int | None = None):
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
    """
    from . import commit
    from .staging import OutputLayout

    out = manifest_base["config"]["output"]["path"]
    nb = buckets or commit.DEDUPE_BUCKETS

    def layout():
        return OutputLayout(out, run_id)

    dicts = results | "AsDicts" >> beam.Map(lambda r: r.to_dict() if hasattr(r, "to_dict") else dict(r))
    verdict = (
        dicts
        | "Brief" >> beam.Map(commit.brief)
        | "AllBriefs" >> beam.combiners.ToList()
        | "Check" >> beam.Map(commit.check_results, beam.pvalue.AsList(shards), manifest_base, run_id, planned_inputs)
    )
    lost = (
        dicts
        | "KeyBuckets" >> beam.FlatMap(lambda r: commit.key_parts(layout(), r, nb))
        | "ByBucket" >> beam.GroupByKey()
        | "FindRepeats" >> beam.FlatMap(lambda kv: commit.find_repeats(kv[1]))
    )
    keyed = dicts | "ByShard" >> beam.Map(lambda r: (r["shard"], r))

    def publish(kv, go):
        shard, grouped = kv
        (r,) = grouped["result"]
        if go:  # False: this run's output is committed already
            yield commit.publish_shard(layout(), r, [x for part in grouped["lost"] for x in part])

    summaries = (
        {"result": keyed, "lost": lost}
        | "Join" >> beam.CoGroupByKey()
        | "Publish" >> beam.FlatMap(publish, beam.pvalue.AsSingleton(verdict))
    )
    counts = (
        summaries
        | "AllSummaries" >> beam.combiners.ToList()
        | "Finalize" >> beam.Map(lambda s: commit.finalize(layout(), s, manifest_base))
    )
    cleaned = (
        keyed
        | "CleanShard" >> beam.Map(lambda kv, _: commit.cleanup_shard(layout(), kv[0]), beam.pvalue.AsSingleton(counts))
        | "Cleaned" >> beam.combiners.Count.Globally()
    )
    return counts | "CleanRun" >> beam.Map(lambda c, _: (commit.cleanup_run(layout()), c)[1], beam.pvalue.AsSingleton(cleaned))
