"""Readers: find input shards and read them through tf.data into decoded, batched examples.

The reader contract. Each input format is a module (`tfrecord`, `images`, `parquet`,
`webdataset`, `tfds`) with:

* `dataset(paths, spec)`: a tf.data dataset of raw items (records, file paths, or dicts
  of column values);
* `parser(shard, spec, plans, preprocess)`: a tf.data map function
  `(index, (item, is_sentinel, bytes_so_far)) → {"__input__<name>": tensor, "key": …,
  label/passthrough columns}` (`_common.tagged` adds the bookkeeping);
* `explain(shard, spec, plans, preprocess, parse, local_paths, missing)`: one
  `Failure` per record that failed inside tf.data, read again one by one (bad path only);
* `check_end(shard, spec, local_path, consumed)`: `(shard-level Failure or None, records
  readable)` once the shard's items are consumed;
* `check_inputs(spec, plans)`: raise ValueError when the config cannot feed the
  model (run by the launcher before any work);

`plans` are the `tensors.InputPlan`s of the model's inputs: what each input is (an encoded
image or a tensor), its feature, shape and dtype, already checked against the model.
* `FRAMED`: whether items carry TFRecord framing bytes (for the size check and the
  framing walk of `framing.py`); a module whose files differ has `is_framed(path)`;
* optionally `check_shards(spec, shard)`: raise ValueError when the files lack what the
  config reads (checked on the first shard before any work);
* optionally `shared_parser(spec, plans, preprocess)`: the parser of every shard at once,
  `(index, item, base)` with the shard's file name as a tensor; a kind that has one is
  read shard after shard through one long-lived pipeline per worker (`ShardReaders`).

Decoding happens inside tf.data (parallel, in C++), never per element in Python. A record
that cannot be parsed or decoded is dropped by tf.data and reported by index, so the
caller can turn it into a dead letter: every record read is accounted for.
"""

from __future__ import annotations

import dataclasses
import os
import posixpath
import queue
import threading
import weakref
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

from .._fs import LocalBridge, fsspec_fs
from ..deadletters import Failure
from ._common import path_bytes, without_autotune
from .tensors import InputPlan, needs_padding, plan_inputs

__all__ = ["ReadSpec", "Shard", "Batch", "ShardEnd", "KINDS", "match_shards", "shard_identity", "read_shard", "ShardReaders", "check_inputs", "check_shards", "plan_inputs", "estimate_examples"]

KINDS = ("tfrecord", "images", "parquet", "webdataset", "tfds")


@dataclasses.dataclass(frozen=True)
class ReadSpec:
    """How to read the input (see `layerbeam.config.InputConfig` for each field)."""

    pattern: str
    format: str = "tfrecord"
    compression: str = ""
    image_feature: str = "image/encoded"
    inputs: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # name → feature, or a tensor mapping
    key_feature: str | None = None
    label_feature: str | None = None
    label_type: str = "int64"
    passthrough: Mapping[str, str] = dataclasses.field(default_factory=dict)
    image_size: tuple[int, int] | None = None
    channels: int = 3
    resize_method: str = "bilinear"
    preprocess: str = "auto"
    tfds_name: str | None = None
    tfds_split: str = "train"
    max_image_pixels: int | None = 50_000_000
    exif_orientation: bool = True
    files_per_shard: int = 512
    max_shards: int | None = None
    max_examples_per_shard: int | None = None


def _kind(fmt: str):
    if fmt == "tfrecord":
        from . import tfrecord

        return tfrecord
    if fmt == "images":
        from . import images

        return images
    if fmt == "parquet":
        from . import parquet

        return parquet
    if fmt == "webdataset":
        from . import webdataset

        return webdataset
    if fmt == "tfds":
        from . import tfds

        return tfds
    raise ValueError(f"input.format {fmt!r} has no reader; use one of {', '.join(KINDS)}")


@dataclasses.dataclass(frozen=True)
class Shard:
    """One unit of work: a TFRecord file, or a group of image files.

    Attributes:
        id: stable id used in output file names (`s00003`; image shards `i<folder digest>-<chunk>`).
        paths: the files; one for TFRecord. Empty for an image shard described by its span
            until the worker that reads it lists its folder (`folders.resolve`).
        size: total bytes.
        version: a digest of the content fingerprints the store gives for free with the
            listing (GCS generation and crc32c, S3 ETag, local mtime_ns, size and inode): a file
            rewritten with the same size gives another version, so it is extracted again.
        span: an image shard, compactly: `(folder URL, first file name, last file name,
            count)` of a contiguous run of the folder's sorted names (see `folders`).
    """

    id: str
    paths: tuple[str, ...]
    size: int = 0
    version: str = ""
    span: tuple[str, str, str, int] | None = None


def shard_identity(shard) -> tuple:
    """What makes two shards (of two runs, or two versions of an output) the same work: a
    `Shard`, a `ShardResult` or a manifest `inputs` entry. An image shard is its span
    `(folder, first, last, count)` with its bytes and version, never its paths; any other
    shard its paths, bytes and version."""
    if isinstance(shard, Mapping):
        span = shard.get("span") or (tuple(shard[k] for k in ("prefix", "first", "last", "count")) if "prefix" in shard else None)
        paths = shard.get("paths") or ()
        size = shard.get("bytes", shard.get("bytes_in", shard.get("size", 0)))
        version = shard.get("version", shard.get("input_version", ""))
    else:
        span, paths = getattr(shard, "span", None), getattr(shard, "paths", ())
        size = shard.size if hasattr(shard, "size") else getattr(shard, "bytes_in", 0)
        version = shard.version if hasattr(shard, "version") else getattr(shard, "input_version", "")
    if span:
        return (("span", *span), int(size), version)
    return (tuple(paths), int(size), version)


@dataclasses.dataclass
class Batch:
    """Decoded examples of one batch.

    Attributes:
        index: record index within the shard, per example (int64).
        columns: key, label and passthrough columns as numpy arrays.
        inputs: model input name → float32 tensor (B, H, W, C).
    """

    index: np.ndarray
    columns: dict[str, np.ndarray]
    inputs: dict[str, Any]

    def __len__(self) -> int:
        return len(self.index)


@dataclasses.dataclass(frozen=True)
class ShardEnd:
    """The last item `read_shard` yields: how many records the shard had and which failed.

    Attributes:
        records: records read (for a corrupt file: those before the damage).
        failures: one `Failure` per record missing from the batches, in index order.
        shard_error: a shard-level `Failure` when the file stopped part-way, else None.
    """

    records: int
    failures: tuple[Failure, ...] = ()
    shard_error: Failure | None = None


def match_shards(pattern: str, fmt: str, files_per_shard: int = 512, spec: ReadSpec | None = None) -> list[Shard]:
    """Expand a pattern into shards, in sorted path order (deterministic ids).

    Args:
        pattern: glob over a local path or any fsspec URL (`gs://`, `memory://`, `s3://` …);
            for 'tfds', the data_dir.
        fmt: 'tfrecord', 'parquet', 'webdataset' (one shard per file), 'images' (per folder,
            groups of `files_per_shard` files described by their span: see `folders`), or
            'tfds' (the split's files, from `spec`).
        spec: the `ReadSpec` ('tfds' needs its dataset name and split).

    Lists everything here: `layerbeam run` lists an `images` input per folder inside the
    pipeline instead (`beam.MatchShards`).
    """
    if fmt == "tfds":
        from . import tfds

        return tfds.shards(spec)
    if fmt == "images":
        from . import folders

        return folders.match(pattern, files_per_shard)
    fs, path = fsspec_fs(pattern)
    if not any(c in path for c in "*?["):
        if fs.isdir(path):
            path = path.rstrip("/") + "/*"
    infos = fs.glob(path, detail=True)
    files = sorted((p, int(i.get("size") or 0), _content_tag(fs, p, i)) for p, i in infos.items() if i.get("type") != "directory")
    local = "://" not in pattern or pattern.startswith("file://")
    name = (lambda p: p) if local else fs.unstrip_protocol
    return [Shard(f"s{i:05d}", (name(p),), s, _version([t])) for i, (p, s, t) in enumerate(files)]


def _content_tag(fs, path: str, info: Mapping) -> str:
    """The content fingerprint of one listed file, from what the listing already returned
    (no extra request on object stores; one `stat` locally, for the nanosecond mtime)."""
    import os

    from .._fs import _protocols

    protos = _protocols(fs)
    if protos & {"file", "local"}:
        st = os.stat(path)
        return f"{st.st_size}:{st.st_mtime_ns}:{st.st_ino}"
    keys = ("generation", "crc32c") if protos & {"gs", "gcs"} else ("ETag", "VersionId") if protos & {"s3", "s3a"} else ("mtime", "LastModified", "created", "etag")
    return ":".join([str(info.get("size"))] + [str(info.get(k, "")) for k in keys])


def _version(tags) -> str:
    import hashlib

    return hashlib.sha256("\n".join(tags).encode()).hexdigest()[:16]


def check_inputs(spec: ReadSpec, input_shapes: Mapping[str, tuple], input_dtypes: Mapping[str, str] | None = None) -> dict[str, InputPlan]:
    """The input plans; raise ValueError, with the fix, when `spec` cannot feed a model with
    these inputs (rank, dtype, fixed sizes; see `tensors.plan_inputs`)."""
    kind = _kind(spec.format)
    if spec.format == "images":
        from .images import single_image_input

        single_image_input(input_shapes)
    plans = plan_inputs(spec, input_shapes, input_dtypes)
    kind.check_inputs(spec, plans)
    return plans


def check_shards(spec: ReadSpec, shards: list[Shard]) -> None:
    """Raise ValueError, with the fix, when the input files cannot give what `spec` reads
    (a Parquet column that is missing or of an unreadable type); checked on the first shard."""
    check = getattr(_kind(spec.format), "check_shards", None)
    if check is not None and shards:
        check(spec, shards[0])


def read_shard(
    shard: Shard,
    cfg: ReadSpec,
    input_shapes: Mapping[str, tuple[int, ...]],
    preprocess,
    batch_size: int,
    max_examples: int | None = None,
    input_dtypes: Mapping[str, str] | None = None,
    readers: ShardReaders | None = None,
) -> Iterator[tuple[Batch | None, Any]]:
    """Yield `(batch, records_so_far)`; the final item is `(None, ShardEnd)`.

    Decoding runs per record inside tf.data, so one bad record never takes its batch with
    it. Records that fail are missing from the batches; at the end they are read again,
    one by one and only they, to say why each failed (`ShardEnd.failures`). A TFRecord
    file that is corrupt or truncated part-way keeps the records before the damage and
    reports it once (`ShardEnd.shard_error`).

    Args:
        shard: the shard.
        cfg: the `ReadSpec`.
        input_shapes: model input name → shape (images: (H, W, C) they are resized to;
            None for sizes padded per batch).
        preprocess: float32 (B?, H, W, C) 0..255 → model input; runs inside tf.data
            (image inputs only; None when there are none).
        batch_size: examples per batch.
        max_examples: read at most this many records of the shard.
        input_dtypes: model input name → dtype (default float32 for all).
        readers: a worker's long-lived pipelines (`ShardReaders`, made with the same
            arguments); a shard they can read goes through one of them instead of a
            pipeline of its own.
    """
    import tensorflow as tf

    kind = _kind(cfg.format)
    if shard.span is not None and not shard.paths:
        from .folders import resolve

        shard = resolve(shard, cfg.pattern)
    bridge = LocalBridge(shard.paths)
    repaired = None
    lease = None
    try:
        paths = bridge.paths
        framing, index_map = None, None
        framed = kind.is_framed(paths[0]) if hasattr(kind, "is_framed") else kind.FRAMED
        if framed and not cfg.compression and os.path.isfile(paths[0]):
            from . import framing as framing_mod

            framing = framing_mod.scan(paths[0])
            if not framing.clean:
                repaired, index_map = framing_mod.repair(paths[0], framing)
                paths = [repaired]
        plans = plan_inputs(cfg, input_shapes, input_dtypes)
        if readers is not None and index_map is None and readers.can_read(kind):
            lease = readers.lease()
            batches = lease.read(paths, max_examples or -1, posixpath.basename(shard.paths[0]))
            # Only a failed record's explanation needs the shard's own parser (run eagerly).
            explain_parse = None
        else:
            raw = kind.dataset(paths, cfg)
            if max_examples:
                # In a repaired copy, the records whose original index is under the cap.
                raw = raw.take(max_examples if index_map is None else int((index_map < max_examples).sum()))
            parse = kind.parser(shard, cfg, plans, preprocess)
            # A reader may hand a traced `tf.function`; explaining a failure runs the plain function eagerly.
            explain_parse = getattr(parse, "explain", parse)
            originals = None
            if index_map is not None:
                # A repaired copy holds the intact records only: give each its original index
                # (the sentinel's is the record count, damaged records included).
                count = min(framing.records, max_examples) if max_examples else framing.records
                originals = tf.constant(np.append(index_map[index_map < count], count), tf.int64)
            batches = iter(without_autotune(_batched(raw, parse, framed, plans, batch_size, originals).prefetch(2)))
        seen = 0
        got: list[np.ndarray] = []
        for el in batches:
            index = el.pop("__index__").numpy()
            is_sentinel = el.pop("__sentinel__").numpy()
            consumed = el.pop("__bytes__").numpy()
            inputs = {n: el.pop(f"__input__{n}") for n in input_shapes}
            if is_sentinel.any():
                total = int(index[is_sentinel][0])
                keep = ~is_sentinel
                index = index[keep]
                inputs = {n: tf.boolean_mask(v, keep) for n, v in inputs.items()}
                el = {k: tf.boolean_mask(v, keep) for k, v in el.items()}
                if lease is not None:  # the pipeline has given all of this shard: it may take the next
                    lease.release()
                    lease = None
                if len(index):
                    got.append(index)
                    yield Batch(index, {k: v.numpy() for k, v in el.items()}, inputs), seen + len(index)
                done = np.concatenate(got) if got else np.zeros(0, np.int64)
                shard_error = None
                corrupt: list[Failure] = []
                if framing is not None and not framing.clean:
                    corrupt = framing_failures(shard, framing, max_examples)
                    if framing.skipped:
                        shard_error = Failure(None, shard.paths[0], "read", "corrupt_shard", framing.summary())
                elif framed and not (max_examples and total >= max_examples):
                    shard_error, readable = kind.check_end(shard, cfg, bridge.paths[0], int(consumed[is_sentinel][0]))
                    # The read error itself took an index (the last before the sentinel);
                    # it is the shard-level dead letter, not a record.
                    total = min(total, readable)
                if max_examples:
                    total = min(total, max_examples)
                missing = np.setdiff1d(np.arange(total, dtype=np.int64), done)
                missing = np.setdiff1d(missing, np.array([f.index for f in corrupt], np.int64))
                failures = list(corrupt)
                if len(missing):
                    if explain_parse is None:
                        parse = kind.parser(shard, cfg, plans, preprocess)
                        explain_parse = getattr(parse, "explain", parse)
                    if index_map is not None:
                        failures += _explain_repaired(kind, shard, cfg, plans, preprocess, explain_parse, paths, index_map, missing)
                    else:
                        failures += kind.explain(shard, cfg, plans, preprocess, explain_parse, bridge.paths, missing)
                failures.sort(key=lambda f: f.index)
                yield None, ShardEnd(total, tuple(failures), shard_error)
                return
            seen += len(index)
            got.append(index)
            yield Batch(index, {k: v.numpy() for k, v in el.items()}, inputs), seen
        raise RuntimeError(f"shard {shard.id} ended without its sentinel record; this is a bug")
    finally:
        if lease is not None:  # left part-way (an error, or the caller stopped): not reusable
            lease.discard()
        bridge.close()
        if repaired:
            os.unlink(repaired)


def _batched(raw, parse, framed: bool, plans, batch_size: int, originals=None):
    """One shard's records → parsed, batched rows, the sentinel last (in the last batch).

    A sentinel after the last record carries the record count (its index) and the bytes of
    TFRecord framing consumed (the running sum) through the same pipeline, so records that
    fail at the very end are still counted, and a file that stops part-way (DataLossError,
    which ends the file's dataset under ignore_errors) is noticed: its records do not add
    up to its size. `originals`: the original index of each record of a repaired copy."""
    import tensorflow as tf

    # Functions given to tf.data here are plain TensorFlow, never converted by AutoGraph:
    # converting them (and a long-lived pipeline's `flat_map` function) cost 0.8 s of a
    # worker's first shard (cProfile), for no branch that needs it.
    plain = tf.autograph.experimental.do_not_convert
    sentinel = tf.data.Dataset.from_tensors((tf.nest.map_structure(_placeholder, raw.element_spec), tf.constant(True)))

    def running_bytes(total, item):
        record, is_sentinel = item
        if framed:
            size = tf.where(is_sentinel, tf.constant(0, tf.int64), tf.cast(tf.strings.length(record), tf.int64) + 16)
        else:
            size = tf.constant(0, tf.int64)
        total = total + size
        return total, (record, is_sentinel, total)

    ds = raw.map(plain(lambda r: (r, tf.constant(False)))).concatenate(sentinel)
    ds = ds.scan(tf.constant(0, tf.int64), plain(running_bytes)).enumerate()
    if originals is not None:
        ds = ds.map(plain(lambda i, item: (tf.gather(originals, i), item)))
    ds = ds.map(parse, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.ignore_errors()
    if needs_padding(plans):
        # Variable sizes (token sequences) are padded to the longest example of each
        # batch with the input's pad_value; other columns keep their defaults.
        pads = {f"__input__{n}": tf.constant(p.pad_value, p.dtype) for n, p in plans.items() if p.kind == "tensor"}
        values = {k: pads.get(k, tf.zeros([], v.dtype) if v.dtype != tf.string else tf.constant("")) for k, v in ds.element_spec.items()}
        return ds.padded_batch(batch_size, padding_values=values)
    return ds.batch(batch_size)


class ShardReaders:
    """A worker's long-lived tf.data pipelines: one iterator reads shard after shard.

    Every new tf.data iterator instantiates its functions again (the parser's decode,
    resize and preprocess graph, optimised by Grappler each time): measured at 0.5–0.6 s
    per shard for a MobileNetV2 224 job on 2 cores, three times the 0.17 s it then takes to
    read the shard's 256 images, and 5.4 s of a 31 s job of 8 shards. Here shards enter one
    pipeline through a queue (`from_generator` → `flat_map` of the same per-shard pipeline
    `read_shard` builds), so that cost is paid once per worker thread: a later shard's
    first batch comes 0.03 s after it is handed over.

    One pipeline reads one shard at a time; concurrent readers (DoFn threads) each lease
    their own. A shard left part-way (an error) discards its pipeline. Only kinds with a
    `shared_parser` (TFRecord) are read this way, and not a repaired copy (its records
    carry other indices); the rest keep a pipeline per shard.
    """

    def __init__(self, cfg: ReadSpec, input_shapes, preprocess, batch_size: int, input_dtypes=None):
        self._args = (cfg, plan_inputs(cfg, input_shapes, input_dtypes), preprocess, batch_size)
        self._idle: list[_Pipeline] = []
        self._lock = threading.Lock()

    def can_read(self, kind) -> bool:
        return hasattr(kind, "shared_parser")

    def lease(self) -> _Pipeline:
        with self._lock:
            if self._idle:
                return self._idle.pop()
        return _Pipeline(self, *self._args)

    def _give_back(self, pipeline: _Pipeline) -> None:
        with self._lock:
            self._idle.append(pipeline)


class _Pipeline:
    """One long-lived pipeline of `ShardReaders`, leased to one shard at a time."""

    def __init__(self, owner: ShardReaders, cfg: ReadSpec, plans, preprocess, batch_size: int):
        import tensorflow as tf

        kind = _kind(cfg.format)
        parse = kind.shared_parser(cfg, plans, preprocess)
        self._owner = owner
        self._queue: queue.Queue = queue.Queue()
        framed = kind.FRAMED

        def shards():
            while (item := self._queue.get()) is not None:
                yield item

        plain = tf.autograph.experimental.do_not_convert  # see `_batched`

        def one_shard(paths, take, base):
            raw = kind.dataset(paths, cfg).take(take)
            return _batched(raw, plain(lambda i, item: parse(i, item, base)), framed, plans, batch_size)

        signature = (tf.TensorSpec([None], tf.string), tf.TensorSpec([], tf.int64), tf.TensorSpec([], tf.string))
        ds = tf.data.Dataset.from_generator(shards, output_signature=signature).flat_map(plain(one_shard))
        self._ds = without_autotune(ds.prefetch(2))
        self._it = None
        # A pipeline waiting for its next shard holds a tf.data thread inside the generator;
        # ending the generator before the iterator is freed (collected, or at exit) lets
        # that thread finish instead of being joined while it waits.
        self._finalizer = weakref.finalize(self, _end_pipeline, self._queue, self.__dict__)

    def read(self, paths, take: int, base: str):
        """The pipeline's iterator, fed this shard: its batches come next, the sentinel in
        the last. The caller stops there, then `release()`s (or `discard()`s) the pipeline."""
        self._queue.put(([path_bytes(p) for p in paths], take, path_bytes(base)))
        if self._it is None:
            self._it = iter(self._ds)
        return self._it

    def release(self) -> None:
        self._owner._give_back(self)

    def discard(self) -> None:
        self._finalizer()


def _end_pipeline(q: queue.Queue, state: dict) -> None:
    q.put(None)
    it = state.pop("_it", None)
    if it is not None:
        for _ in it:  # the rest of a shard left part-way, then the end
            pass


def _placeholder(spec):
    """A value of an item's `TensorSpec` (unknown sizes 0): the sentinel's item."""
    import tensorflow as tf

    shape = [0 if d is None else d for d in spec.shape]
    return tf.fill(shape, "") if spec.dtype == tf.string else tf.zeros(shape, spec.dtype)


def framing_failures(shard: Shard, framing, max_examples: int | None = None) -> list[Failure]:
    """One `corrupt_record` dead letter per record whose data CRC fails (framing intact)."""
    import posixpath

    base = posixpath.basename(shard.paths[0])
    return [
        Failure(i, f"{base}:{i}", "read", "corrupt_record", f"data CRC mismatch in the {n}-byte record at byte offset {off}: its bytes are damaged")
        for i, off, n in framing.bad_data
        if not max_examples or i < max_examples
    ]


def _explain_repaired(kind, shard, cfg, plans, preprocess, parse, paths, index_map, missing) -> list[Failure]:
    """`kind.explain` on the repaired copy, whose record positions differ from the original
    indices: ask by position, answer by index."""
    position = {int(i): k for k, i in enumerate(index_map)}
    import posixpath

    base = posixpath.basename(shard.paths[0])
    asked = np.array([position[int(i)] for i in missing], np.int64)
    out = []
    for f, i in zip(kind.explain(shard, cfg, plans, preprocess, parse, paths, asked), missing.tolist()):
        key = f"{base}:{i}" if f.key == f"{base}:{f.index}" else f.key
        out.append(dataclasses.replace(f, index=i, key=key))
    return out


def estimate_examples(spec: ReadSpec, shards, budget: int = 2000) -> int | None:
    """Examples in the input (see each kind's `estimate_examples`), capped per shard by
    `spec.max_examples_per_shard`."""
    return _kind(spec.format).estimate_examples(spec, shards, budget)
