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

__all__ = ["MatchShards", "ExtractShards"]

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
def MatchShards(pbegin: beam.pvalue.PBegin, pattern: str, fmt: str, files_per_shard: int = 512, max_shards: int | None = None, spec=None):
    """PBegin → PCollection[Shard]: the pattern is expanded on a worker, not the launcher
    (`spec`, the `ReadSpec`, names a TFDS dataset's name and split)."""

    def expand(p):
        shards = match_shards(p, fmt, files_per_shard, spec=spec)
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
