"""The shard worker: read → drop repeated keys → extract → write one shard → `ShardResult`.

Plain Python, testable without Beam; `beam.py` only loads a `ShardProcessor` once per
worker process and counts metrics.
"""

from __future__ import annotations

import contextlib
import dataclasses
import queue
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa

from .deadletters import Failure, count_reasons, dead_letter_table, write_dead_letters
from .formats import WriteSpec, make_writer
from .layers import SelectSpec, trace_and_select
from .models import ModelSpec
from .readers import ReadSpec, Shard, ShardEnd, ShardReaders, check_inputs, read_shard, shard_identity
from .readers.folders import resolve
from .schema import column_types, output_schema, stored_bytes, to_record_batch
from .staging import KEY_HASH_DTYPE, OutputLayout, key_hashes  # the key files' format: in staging, TensorFlow-free
from .stats import ShardStats

__all__ = ["BatchSpec", "JobSpec", "ShardResult", "ShardProcessor", "effective_batch_size", "key_hashes", "KEY_HASH_DTYPE"]


@dataclasses.dataclass(frozen=True)
class BatchSpec:
    """How to batch and where to compute (see `layerbeam.config.BatchingConfig`)."""

    batch_size: int = 32
    max_batch_bytes: int = 256 << 20
    jit_compile: bool = False
    precision: str = "float32"
    max_gpus: int | None = None


@dataclasses.dataclass(frozen=True)
class JobSpec:
    """Everything a worker needs to extract and write shards: what travels to workers."""

    input: ReadSpec
    model: ModelSpec
    layers: SelectSpec
    output: WriteSpec
    batching: BatchSpec = BatchSpec()


@dataclasses.dataclass(frozen=True)
class ShardResult:
    """What one shard's worker did: counts, the files it staged, timing. Also its marker.

    Attributes:
        shard: the shard id.
        paths: the shard's input files; empty for an image shard, which `span` describes
            (results carry no per-image list).
        bytes_in: their size.
        read: records read (`read = rows + dead_letters`).
        rows, dead_letters: rows written and records turned into dead letters.
        dead_reasons: dead letters by reason.
        shard_errors: shard-level failures (`{reason, detail, path}`).
        files: the data files (`{path, final_path, rows, bytes}`, relative to the shard's folder).
        model_fingerprint: the weights the worker computed with.
        seconds: wall time of the shard; `timing`: where it went.
        resumed: the shard was done by an earlier attempt (its marker was found).
        attempt: the attempt that wrote the files (they are under `shards/<shard>/<attempt>/`).
        input_version: the store's content fingerprint of the shard's inputs (`Shard.version`).
        span: an image shard's `(folder, first name, last name, count)` (`Shard.span`).
    """

    shard: str
    paths: tuple[str, ...]
    bytes_in: int
    read: int
    rows: int
    dead_letters: int
    dead_reasons: Mapping[str, int]
    shard_errors: tuple[Mapping[str, Any], ...]
    files: tuple[Mapping[str, Any], ...]
    model_fingerprint: str
    seconds: float = 0.0
    timing: Mapping[str, float] | None = None
    resumed: bool = False
    attempt: str = ""
    input_version: str = ""
    stats: Mapping[str, Mapping[str, Any]] | None = None  # per output: `stats.ShardStats` partials
    span: tuple[str, str, str, int] | None = None

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["paths"] = list(self.paths)
        d["span"] = list(self.span) if self.span else None
        d["shard_errors"] = [dict(e) for e in self.shard_errors]
        d["files"] = [dict(f) for f in self.files]
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ShardResult:
        names = {f.name for f in dataclasses.fields(cls)}
        d = {k: v for k, v in d.items() if k in names}
        d["paths"] = tuple(d["paths"])
        d["span"] = tuple(d["span"]) if d.get("span") else None
        d["shard_errors"] = tuple(d.get("shard_errors") or ())
        d["files"] = tuple(d["files"])
        return cls(**d)


class ShardProcessor:
    """Everything one worker process needs, built once: model, extractor, schema, writer.

    Args:
        spec: the job (what travels to workers).
        run_id: the run fingerprint; names the staging folder.
    """

    def __init__(self, spec: JobSpec, run_id: str):
        from .devices import ExtractorPool, discover_gpus, plan_devices, precision
        from .extractor import Extractor, extractor_model
        from .models import launcher_model, load_model, model_fingerprint, preprocess_fn

        self.cfg = cfg = spec
        self.device_plan = plan_devices(discover_gpus(), cfg.batching.max_gpus)
        self.reused_launcher_model = False

        def build(device: str):
            # One model per device: its variables live there (loading is seeded, so every
            # copy has the same weights; the fingerprint checks it).
            import tensorflow as tf

            with tf.device(device):
                traced = None
                if launcher is not None and device == launcher.device:  # the plan's devices are distinct
                    model, fp, traced = launcher.model, launcher.fingerprint, launcher.traced
                    self.reused_launcher_model = True
                else:
                    model = load_model(cfg.model)
                    fp = model_fingerprint(model)
                if getattr(self, "model_fingerprint", fp) != fp:
                    raise RuntimeError(f"the model copy for {device} has other weights than the first copy")
                self.model_fingerprint = fp
                # The launcher traced this model for this job already (same spec, same
                # policy): tracing it again costs the first batch ~0.5 s for MobileNetV2.
                if traced is not None and traced[2] == cfg:
                    graph, self.specs = traced[:2]
                else:
                    graph, self.specs = trace_and_select(cfg, model)
                self.input_shapes = graph.input_shapes
                self.input_dtypes = graph.input_dtypes
                return Extractor(extractor_model(graph, self.specs), jit_compile=cfg.batching.jit_compile)

        with precision(cfg.batching.precision):
            launcher = launcher_model(run_id)  # compares the policy in force
            self.extractor = ExtractorPool(build, self.device_plan)
        stored = sum(stored_bytes(s, cfg.output.parquet_encoding if cfg.output.format == "parquet" else None) for s in self.specs)
        self.batch_size = effective_batch_size(cfg.batching.batch_size, cfg.batching.max_batch_bytes, stored)
        plans = check_inputs(cfg.input, self.input_shapes, self.input_dtypes)
        images = any(p.kind == "image" for p in plans.values())  # preprocessing is for images only
        self.preprocess = preprocess_fn(cfg.input.preprocess, cfg.model.source) if images else None
        self.schema = output_schema(self.specs, column_types(cfg.input))
        self.writer = make_writer(cfg.output, self.schema)
        # One long-lived input pipeline per reading thread instead of one per shard (see ShardReaders).
        self.readers = ShardReaders(cfg.input, self.input_shapes, self.preprocess, self.batch_size, self.input_dtypes)
        self.layout = OutputLayout(cfg.output.path, run_id)

    def process(self, shard: Shard, on_batch=None) -> ShardResult:
        """Extract and write one shard; return its result (also stored as its marker).

        A shard whose marker exists for the same input files and content (a resumed run) is
        not processed again. Otherwise this attempt writes under its own attempt id, so a
        retried bundle or a zombie worker never touches another attempt's files; only the
        attempt whose result reaches the commit is committed. A record
        whose key repeats an earlier record of the shard becomes a `duplicate_key` dead
        letter; repeats across shards are found at commit (`commit.commit_run`).
        """
        done = self.layout.read_marker(shard.id)
        if done is not None and shard_identity(done) == shard_identity(shard):
            return dataclasses.replace(ShardResult.from_dict(done), resumed=True)
        described = shard
        if shard.span is not None:  # listed by the pipeline: its worker lists the folder again
            shard = resolve(shard, self.cfg.input.pattern)
        attempt = self.layout.new_attempt()
        t0 = time.perf_counter()
        stats = {"rows": 0}
        # Where the shard's time goes on this thread: waiting for tf.data, the model; the rest
        # (`write_and_other`) is waiting for the writer where it fell behind, and the shard's
        # bookkeeping. `to_arrow` (Arrow conversion and statistics) is timed on the writer's
        # thread, where it overlaps the next batch's model (`write_behind`).
        timing = {"input_wait": 0.0, "model": 0.0, "to_arrow": 0.0}
        end: list[ShardEnd] = []
        first_seen: dict[bytes, int] = {}  # key → index of the record that wrote it
        kept_hash: list[np.ndarray] = []
        kept_index: list[np.ndarray] = []
        dupes: list[Failure] = []
        shard_stats = ShardStats([s.name for s in self.specs])

        def batches() -> Iterable[pa.RecordBatch]:
            t = time.perf_counter()
            for batch, so_far in read_shard(
                shard, self.cfg.input, self.input_shapes, self.preprocess,
                self.batch_size, self.cfg.input.max_examples_per_shard, self.input_dtypes, self.readers,
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
                yield batch.columns, outputs
                t = time.perf_counter()

        def arrow(items) -> Iterable[pa.RecordBatch]:
            # On the writer's thread: converting an unreduced map's batch and taking its
            # statistics cost 1.6 s of a 38 s job (bench scenario b) on the model's thread,
            # where the model's own threads sat idle meanwhile.
            for columns, outputs in items:
                t = time.perf_counter()
                rb = to_record_batch(self.schema, columns, outputs)
                shard_stats.update(rb)  # over the values as stored
                timing["to_arrow"] += time.perf_counter() - t
                yield rb

        # The run id is in the name: a reader that listed an older output and opens its files
        # after the swap finds them gone instead of reading this run's data under old names.
        basename = f"part-{self.layout.run_id[:8]}-{shard.id}"
        files = write_behind(
            lambda items: self.writer.write_shard(arrow(items), self.layout.shard_dir(shard.id, attempt), basename), batches()
        )
        (shard_end,) = end
        failures = sorted([*shard_end.failures, *dupes], key=lambda f: f.index)
        self.layout.write_keys(
            shard.id,
            attempt,
            np.concatenate(kept_hash) if kept_hash else np.zeros(0, KEY_HASH_DTYPE),
            np.concatenate(kept_index) if kept_index else np.zeros(0, np.int64),
        )
        err = shard_end.shard_error
        seconds = round(time.perf_counter() - t0, 3)
        timing["write_and_other"] = seconds - timing["input_wait"] - timing["model"]
        result = ShardResult(
            shard=shard.id,
            paths=() if described.span else tuple(shard.paths),
            bytes_in=shard.size,
            read=shard_end.records,
            rows=sum(f.rows for f in files),
            dead_letters=len(failures),
            dead_reasons=count_reasons([f.reason for f in failures]),
            shard_errors=({"reason": err.reason, "detail": err.detail, "path": err.key},) if err else (),
            files=tuple(f.result() for f in files),
            model_fingerprint=self.model_fingerprint,
            seconds=seconds,
            timing={k: round(v, 3) for k, v in timing.items()},
            attempt=attempt,
            input_version=shard.version,
            stats=shard_stats.to_json(),
            span=described.span,
        )
        if result.rows != stats["rows"]:
            raise RuntimeError(f"shard {shard.id}: extracted {stats['rows']} rows but the writer reports {result.rows}")
        dead = [*failures, *([err] if err else [])]
        if dead:
            write_dead_letters(self.layout.dead_file(shard.id, attempt), dead_letter_table(dead, shard.paths, per_file=len(shard.paths) > 1))
        self.layout.write_marker(shard.id, result.to_dict())
        return result


_END = object()


def write_behind(write, batches: Iterable, depth: int = 2):
    """`write(batches)`, with the writer on a thread of its own that takes the batches from a
    queue of `depth`, so that converting (in `write`, as `ShardProcessor` does), encoding,
    compressing and uploading batch k overlap reading and the model on batch k+1 (both release
    the GIL for their heavy parts: pyarrow's writer, numpy, TensorFlow's kernels).

    The batches are produced on the calling thread (a worker thread's long-lived tf.data
    pipeline and the model stay on it). An error on either side ends both and is raised
    here, as if `write(batches)` had run in line: the writer sees a producer's error raised
    from its iterator, so it closes its files the same way; if the caller is interrupted
    anywhere (even while waiting for the writer), the writer stops at its next batch.
    Memory: up to `depth` + 2 batches are alive at once (queued, being written, being made).
    """
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()  # the caller left abnormally: the writer must not wait for more
    done: dict[str, Any] = {}

    def rows():
        while True:
            try:
                item = q.get(timeout=0.05)
            except queue.Empty:
                if stop.is_set():
                    raise RuntimeError("the shard's producer stopped before its last batch") from None
                continue
            if item is _END:
                return
            if isinstance(item, _Raised):
                raise item.error
            yield item

    def consume():
        try:
            done["files"] = write(rows())
        except BaseException as e:  # noqa: BLE001 - handed to the calling thread
            done["error"] = e
            with contextlib.suppress(queue.Empty):  # unblock a producer waiting on a full queue
                while True:
                    q.get_nowait()

    def put(item) -> bool:
        while t.is_alive():
            try:
                q.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False  # the writer stopped (an error): stop producing

    t = threading.Thread(target=consume, name="layerbeam-writer", daemon=True)
    t.start()
    finished = False
    try:
        try:
            for b in batches:
                if not put(b):
                    break
        except BaseException as e:
            put(_Raised(e))
            t.join()
            if done.get("error") not in (None, e):  # the writer had failed too: say so
                e.add_note(f"the shard's writer had failed as well: {done['error']!r}")
            raise
        put(_END)
        t.join()
        finished = True
    finally:
        if not finished:
            stop.set()
        if hasattr(batches, "close"):  # a generator the writer's error left part-way: end it now
            batches.close()
    if "error" in done:
        raise done["error"]
    return done["files"]


@dataclasses.dataclass
class _Raised:
    error: BaseException


def effective_batch_size(batch_size: int, max_batch_bytes: int, bytes_per_example: int) -> int:
    """`batch_size`, lowered so one batch's outputs stay under `max_batch_bytes`
    (unreduced outputs of a big model can be tens of MB per example)."""
    return max(1, min(batch_size, max_batch_bytes // max(1, bytes_per_example)))


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
