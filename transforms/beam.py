"""Beam wrappers: match shards, extract-and-write each shard, commit once.

The work per shard is plain Python (`ShardProcessor.process`), testable without Beam; the
DoFns only load it once per worker process (`apache_beam.utils.shared.Shared`, as
RunInference does), count metrics, and pass results on.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import apache_beam as beam
import numpy as np
import pyarrow as pa
from apache_beam.metrics import Metrics
from apache_beam.utils import shared

from transforms.readers import Failure, Shard, ShardEnd, match_shards, read_shard
from transforms.writers import OutputLayout, make_writer, output_schema, stored_bytes, to_record_batch

__all__ = ["MatchShards", "ExtractShards", "ShardProcessor", "DEAD_LETTER_SCHEMA", "column_types", "key_hashes"]

_LOG = logging.getLogger("layerbeam")
_NS = "layerbeam"

DEAD_LETTER_SCHEMA = pa.schema(
    [
        pa.field("key", pa.string()),
        pa.field("shard", pa.string()),
        pa.field("index", pa.int64()),  # null for a shard-level dead letter
        pa.field("stage", pa.string()),  # read | decode | dedupe
        pa.field("reason", pa.string()),  # a code from transforms.readers.REASONS
        pa.field("detail", pa.string()),  # one line naming the value
    ]
)


def column_types(input_cfg) -> dict[str, pa.DataType]:
    """The non-tensor output columns and their Arrow types."""
    cols: dict[str, pa.DataType] = {"key": pa.string()}
    if input_cfg.format == "images":
        cols["label"] = pa.string()
    elif input_cfg.label_feature:
        cols["label"] = pa.int64() if input_cfg.label_type == "int64" else pa.string()
    arrow = {"int64": pa.int64(), "float32": pa.float32(), "string": pa.string()}
    for name, typ in input_cfg.passthrough.items():
        cols[name] = arrow[typ]
    return cols


class ShardProcessor:
    """Everything one worker process needs, built once: model, extractor, schema, writer.

    Args:
        config: the validated `JobConfig` as a JSON dict (what travels to workers).
        run_id: the run fingerprint; names the staging folder.
    """

    def __init__(self, config: Mapping[str, Any], run_id: str):
        from pipeline.config import JobConfig
        from transforms.devices import ExtractorPool, discover_gpus, plan_devices, precision
        from transforms.extractor import Extractor, load_model, model_fingerprint, preprocess_fn

        self.cfg = cfg = JobConfig.model_validate(config)
        self.device_plan = plan_devices(discover_gpus(), cfg.batching.max_gpus)
        self.reused_launcher_model = False

        def build(device: str):
            # One model per device: its variables live there (loading is seeded, so every
            # copy has the same weights; the fingerprint checks it).
            import tensorflow as tf

            with tf.device(device):
                if launcher is not None and device == launcher.device:  # the plan's devices are distinct
                    model, fp = launcher.model, launcher.fingerprint
                    self.reused_launcher_model = True
                else:
                    model = load_model(cfg.model)
                    fp = model_fingerprint(model)
                if getattr(self, "model_fingerprint", fp) != fp:
                    raise RuntimeError(f"the model copy for {device} has other weights than the first copy")
                self.model_fingerprint = fp
                graph, self.specs = trace_and_select(cfg, model)
                self.input_shapes = graph.input_shapes
                return Extractor(graph.build(self.specs), jit_compile=cfg.batching.jit_compile)

        with precision(cfg.batching.precision):
            launcher = _launcher_model(run_id)  # compares the policy in force
            self.extractor = ExtractorPool(build, self.device_plan)
        stored = sum(stored_bytes(s, cfg.output.parquet_compat) for s in self.specs)
        self.batch_size = effective_batch_size(cfg.batching.batch_size, cfg.batching.max_batch_bytes, stored)
        self.preprocess = preprocess_fn(cfg.input.preprocess, cfg.model.source)
        self.schema = output_schema(self.specs, column_types(cfg.input))
        self.writer = make_writer(cfg.output, self.schema)
        self.layout = OutputLayout(cfg.output.path, run_id)

    def process(self, shard: Shard, on_batch=None) -> dict:
        """Extract and write one shard; return its result (also stored as its marker).

        A shard whose marker exists (a resumed run) is not processed again. Otherwise its
        staged files are removed first and rewritten under the same names, so a retried
        bundle replaces what an earlier attempt left instead of adding to it. A record
        whose key repeats an earlier record of the shard becomes a `duplicate_key` dead
        letter; repeats across shards are found at commit (`pipeline.build.commit_run`).
        """
        done = self.layout.read_marker(shard.id)
        if done is not None and tuple(done.get("paths", ())) == shard.paths:
            done["resumed"] = True
            return done
        self.layout.clear_shard(shard.id)
        t0 = time.perf_counter()
        stats = {"rows": 0}
        # Where the shard's time goes: waiting for tf.data, the model, Arrow conversion;
        # the rest of the shard's time is the writer (encoding, compression, I/O).
        timing = {"input_wait": 0.0, "model": 0.0, "to_arrow": 0.0}
        end: list[ShardEnd] = []
        first_seen: dict[bytes, int] = {}  # key → index of the record that wrote it
        kept_hash: list[np.ndarray] = []
        kept_index: list[np.ndarray] = []
        dupes: list[Failure] = []

        def batches() -> Iterable[pa.RecordBatch]:
            t = time.perf_counter()
            for batch, so_far in read_shard(
                shard, self.cfg.input, self.input_shapes, self.preprocess,
                self.batch_size, self.cfg.input.max_examples_per_shard,
            ):
                tb = time.perf_counter()
                timing["input_wait"] += tb - t
                if batch is None:
                    end.append(so_far)
                    return
                batch = _drop_repeated_keys(batch, first_seen, dupes)
                if batch is None:
                    t = time.perf_counter()
                    continue
                kept_hash.append(batch.columns.pop("__key_hash__"))
                kept_index.append(batch.index)
                tb = time.perf_counter()
                outputs = self.extractor(batch.inputs)
                tm = time.perf_counter()
                timing["model"] += tm - tb
                stats["rows"] += len(batch)
                if on_batch:
                    on_batch(len(batch), tm - tb)
                rb = to_record_batch(self.schema, batch.columns, outputs)
                t = time.perf_counter()
                timing["to_arrow"] += t - tm
                yield rb
                t = time.perf_counter()

        # The run id is in the name: a reader that listed an older output and opens its files
        # after the swap finds them gone instead of reading this run's data under old names.
        basename = f"part-{self.layout.run_id[:8]}-{shard.id}"
        files = self.writer.write_shard(batches(), self.layout.shard_dir(shard.id), basename)
        (shard_end,) = end
        failures = sorted([*shard_end.failures, *dupes], key=lambda f: f.index)
        dead = self._dead_letters(shard, failures, shard_end.shard_error)
        self.layout.write_keys(
            shard.id,
            np.concatenate(kept_hash) if kept_hash else np.zeros(0, KEY_HASH_DTYPE),
            np.concatenate(kept_index) if kept_index else np.zeros(0, np.int64),
        )
        err = shard_end.shard_error
        result = {
            "shard": shard.id,
            "paths": list(shard.paths),
            "bytes_in": shard.size,
            "read": shard_end.records,
            "rows": sum(f.rows for f in files),
            "dead_letters": len(failures),
            "dead_reasons": _count([f.reason for f in failures]),
            "shard_errors": [{"reason": err.reason, "detail": err.detail, "path": err.key}] if err else [],
            "files": [{"path": f.path, "final_path": f.path, "rows": f.rows, "bytes": f.bytes} for f in files],
            "model_fingerprint": self.model_fingerprint,
            "seconds": round(time.perf_counter() - t0, 3),
        }
        timing["write_and_other"] = result["seconds"] - sum(timing.values())
        result["timing"] = {k: round(v, 3) for k, v in timing.items()}
        if result["rows"] != stats["rows"]:
            raise RuntimeError(f"shard {shard.id}: extracted {stats['rows']} rows but the writer reports {result['rows']}")
        if dead["reason"]:
            self._write_dead(shard, dead)
        self.layout.write_marker(shard.id, result)
        return result

    def _dead_letters(self, shard: Shard, failures: Sequence[Failure], shard_error: Failure | None) -> dict[str, list]:
        rows = [*failures, *([shard_error] if shard_error else [])]
        where = [shard.paths[f.index] if self.cfg.input.format == "images" and f.index is not None else shard.paths[0] for f in rows]
        return {
            "key": [f.key for f in rows],
            "shard": where,
            "index": [f.index for f in rows],
            "stage": [f.stage for f in rows],
            "reason": [f.reason for f in rows],
            "detail": [f.detail for f in rows],
        }

    def _write_dead(self, shard: Shard, dead: Mapping[str, list]) -> None:
        import pyarrow.parquet as pq

        from transforms.writers import arrow_fs

        fs, path = arrow_fs(self.layout.dead_file(shard.id))
        fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
        pq.write_table(pa.table(dict(dead), schema=DEAD_LETTER_SCHEMA), path, filesystem=fs)


@dataclasses.dataclass
class LauncherModel:
    """A model the launcher loaded for its checks, as a worker in the same process may
    take it: with its fingerprint, the Keras dtype policy it was built under, and the
    device its variables were placed on (TensorFlow's default then). `release()` lets the
    launcher's reference go once no in-process worker can want it."""

    model: Any
    fingerprint: str
    policy: str
    device: str

    def release(self) -> None:
        self.model = None

    @classmethod
    def capture(cls, model, fingerprint: str) -> LauncherModel:
        import keras

        from transforms.devices import discover_gpus, plan_devices

        device = plan_devices(discover_gpus()).devices[0]  # where TensorFlow placed it by default
        return cls(model, fingerprint, keras.mixed_precision.global_policy().name, device)


# The launcher's models, by run id. An in-process runner (DirectRunner's FnApiRunner in
# in_memory or multi_threading mode, a LOOPBACK portable runner) runs the worker in the
# launcher's own process, where loading the model a second time only costs start-up time
# (1 s for ResNet50). Workers in other processes find this empty and load their own.
_LAUNCHER_MODELS: dict[str, LauncherModel] = {}


@contextlib.contextmanager
def offer_launcher_model(run_id: str, model: LauncherModel | None):
    """While the block runs, a worker of run `run_id` in this process takes `model` as its
    copy for `model.device` instead of loading one, if it runs under the same dtype policy."""
    if model is not None and model.model is not None:
        _LAUNCHER_MODELS[run_id] = model
    try:
        yield
    finally:
        _LAUNCHER_MODELS.pop(run_id, None)


def _launcher_model(run_id: str) -> LauncherModel | None:
    """The launcher's model for this run, if this process has it and it was built under
    the dtype policy this worker set (`batching.precision`)."""
    import keras

    entry = _LAUNCHER_MODELS.get(run_id)
    return entry if entry is not None and entry.policy == keras.mixed_precision.global_policy().name else None


def effective_batch_size(batch_size: int, max_batch_bytes: int, bytes_per_example: int) -> int:
    """`batch_size`, lowered so one batch's outputs stay under `max_batch_bytes`
    (unreduced outputs of a big model can be tens of MB per example)."""
    return max(1, min(batch_size, max_batch_bytes // max(1, bytes_per_example)))


KEY_HASH_DTYPE = "S16"


def key_hashes(keys: np.ndarray) -> np.ndarray:
    """128-bit BLAKE2b of each key (bytes or str), as `S16`: stable across processes; used to
    find keys repeated across shards at commit without holding the keys themselves. At
    128 bits, a false match among 10^12 keys has a probability below 10^-14."""
    import hashlib

    return np.array(
        [hashlib.blake2b(k if isinstance(k, bytes) else str(k).encode(), digest_size=16).digest() for k in keys],
        dtype=KEY_HASH_DTYPE,
    ).reshape(len(keys))


def _drop_repeated_keys(batch, first_seen: dict[bytes, int], dupes: list[Failure]):
    """The batch without records whose key an earlier record of the shard had (those become
    `duplicate_key` failures; compared by the keys themselves, not hashes); None if
    nothing is left. Adds `__key_hash__` to the columns."""
    import tensorflow as tf

    keys = batch.columns["key"]
    hashes = key_hashes(keys)
    keep = np.ones(len(hashes), bool)
    for j, (k, i) in enumerate(zip(keys.tolist(), batch.index.tolist())):
        first = first_seen.setdefault(k, i)
        if first != i:
            keep[j] = False
            k = keys[j].decode("utf-8", "replace") if isinstance(keys[j], bytes) else str(keys[j])
            dupes.append(Failure(i, k, "dedupe", "duplicate_key", f"key {k!r} was already written by record {first} of this shard"))
    if keep.all():
        batch.columns["__key_hash__"] = hashes
        return batch
    if not keep.any():
        return None
    columns = {k: v[keep] for k, v in batch.columns.items()}
    columns["__key_hash__"] = hashes[keep]
    inputs = {n: tf.boolean_mask(v, keep) for n, v in batch.inputs.items()}
    return type(batch)(batch.index[keep], columns, inputs)


def _count(values: Sequence[str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for v in values:
        out[v] = out.get(v, 0) + 1
    return out


def trace_and_select(cfg, model):
    """(`ModelGraph`, `OutputSpec`s): the model traced at the configured input shape and the
    outputs `cfg.layers` selects. The launcher's checks and every worker build it this way.

    Raises:
        ModelError, SelectionError: as `ModelGraph` and `ModelGraph.select` do.
    """
    from transforms.extractor import ModelGraph

    graph = ModelGraph(model, input_shapes=_input_shapes(cfg, model))
    specs = graph.select(
        [s.model_dump(by_alias=True, exclude_none=True) for s in cfg.layers.select],
        exclude=cfg.layers.exclude,
        reduce=cfg.layers.reduce,
        dtype=cfg.layers.dtype,
        include_inputs=cfg.layers.include_inputs,
    )
    return graph, specs


def _input_shapes(cfg, model) -> list[tuple[int, ...]] | None:
    """Input shapes to trace the model at: model.input_shape, or image_size × channels."""
    if cfg.model.input_shape and not cfg.input.image_size:
        return [tuple(cfg.model.input_shape)]
    try:
        inputs = list(model.inputs)
    except (AttributeError, ValueError):
        inputs = []
    if cfg.input.image_size:
        h, w = cfg.input.image_size
        if inputs:
            return [(h, w, int(t.shape[-1]) if t.shape[-1] is not None else cfg.input.channels) for t in inputs]
        return [(h, w, cfg.input.channels)]
    if cfg.model.input_shape:
        return [tuple(cfg.model.input_shape)]
    return None


# --------------------------------------------------------------------------- DoFns


class _ExtractShardDoFn(beam.DoFn):
    """Shard → result dict, after writing the shard's rows to staging."""

    def __init__(self, config: Mapping[str, Any], run_id: str):
        self._config = dict(config)
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
        config, run_id = self._config, self._run_id

        def load():
            _LOG.info("loading the model for run %s", run_id)
            return _Holder(ShardProcessor(config, run_id))

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
        if result.get("resumed"):
            self._resumed.inc()
        self._dead.inc(result["dead_letters"])
        for reason, n in result["dead_reasons"].items():
            Metrics.counter(_NS, f"dead_letters.{reason}").inc(n)
        for err in result.get("shard_errors", ()):
            Metrics.counter(_NS, f"shard_errors.{err['reason']}").inc()
        _LOG.info("shard %s: %d rows, %d dead letters in %.1fs", shard.id, result["rows"], result["dead_letters"], result["seconds"])
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
def ExtractShards(shards: beam.PCollection, config: Mapping[str, Any], run_id: str):
    """PCollection[Shard] → PCollection[dict]: each shard's rows written to staging; its
    result (counts, files) comes out. Reshuffled first so shards spread over workers."""
    return (
        shards
        | "Reshuffle" >> beam.Reshuffle()
        | "ExtractAndWrite" >> beam.ParDo(_ExtractShardDoFn(config, run_id))
    )
