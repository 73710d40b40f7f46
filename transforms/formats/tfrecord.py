"""TFRecord: one shard's rows as files of `tf.train.Example`s, Hive-partitioned.

A tf.train.Example is written straight in protobuf wire format: per column, the bytes in
front of the values are the same for every row (tag, lengths, key), so a row is one
`b"".join` of precomputed prefixes and slices of the batch's value buffer. Building
`tf.train.FloatList(value=array)` through the protobuf API instead runs ~100 MB/s.
"""

from __future__ import annotations

import dataclasses
import os
import posixpath
import struct
from collections.abc import Callable, Iterable, Iterator, Sequence

import numpy as np
import pyarrow as pa

from .._fs import content_id, fsspec_fs
from ..errors import CommitError
from ..schema import _ARROW_NAMES, SHAPE_SUFFIX, read_schema, storage_spec, table_from_numpy
from . import WriteSpec, WrittenFile

__all__ = ["ExampleEncoder", "TFRecordShardWriter", "writer", "rewrite_without", "feature_spec", "parse_example_fn", "read_tables", "tf_dataset", "arrow_dataset", "sidecars", "final_paths"]


def _varint(n: int) -> bytes:
    n &= (1 << 64) - 1  # int64 two's complement, as protobuf encodes negative int64
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _ld(field: int, length: int) -> bytes:
    """Tag and length of a length-delimited field."""
    return _varint(field << 3 | 2) + _varint(length)


def _entry(key: bytes, feature_prefix: bytes, feature_len: int) -> tuple[bytes, int]:
    """(bytes before the values, total length) of one `Features.feature` map entry."""
    head = _ld(1, len(key)) + key + _ld(2, feature_len)
    body_len = len(head) + feature_len
    return _ld(1, body_len) + head + feature_prefix, len(_ld(1, body_len)) + body_len


def _float_feature_prefix(nbytes: int) -> tuple[bytes, int]:
    inner = _ld(1, nbytes)  # FloatList.value, packed
    prefix = _ld(2, len(inner) + nbytes) + inner  # Feature.float_list
    return prefix, len(prefix) + nbytes


def _bytes_feature(value: bytes) -> bytes:
    body = _ld(1, len(value)) + value  # BytesList.value
    return _ld(1, len(body)) + body  # Feature.bytes_list


def _int64_feature(values: Iterable[int]) -> bytes:
    packed = b"".join(_varint(int(v)) for v in values)
    body = _ld(1, len(packed)) + packed  # Int64List.value, packed
    return _ld(3, len(body)) + body  # Feature.int64_list


class ExampleEncoder:
    """Arrow record batches (the output schema) → serialized `tf.train.Example`s.

    Tensor columns: float32 as a `float_list` (plus a constant `<name>.shape` int64_list),
    float16 as one bytes value holding the row-major values as little-endian float16
    (`tf.io.decode_raw(x, tf.float16)`, `np.frombuffer(x, "<f2")`, TFDS's `Tensor`
    feature with `encoding: bytes`), so nothing is widened and no TensorFlow-only
    serialization is needed to read it. Scalars: string → bytes_list, int64 → int64_list, float32 →
    float_list. The result parses with `tf.io.parse_single_example` like any Example.
    """

    def __init__(self, schema: pa.Schema):
        self.schema = schema
        self._fixed: list[tuple[str, bytes, int, int]] = []  # (column, prefix, row bytes, entry length)
        self._var: list[tuple[str, str, bytes]] = []  # (column, arrow type name, key)
        const = []
        names = set(schema.names)
        for f in schema:
            key = f.name.encode()
            if isinstance(f.type, pa.FixedShapeTensorType):
                shape = list(f.type.shape)
                size = int(np.prod(shape))
                if f.type.value_type == pa.float16():
                    value_len = size * 2
                    body = _ld(1, value_len)  # BytesList.value = the raw little-endian values
                    body_len = len(body) + value_len
                    prefix = _ld(1, body_len) + body
                    self._fixed.append((f.name, *self._entry(key, prefix, len(_ld(1, body_len)) + body_len, size * 2)))
                else:
                    prefix, flen = _float_feature_prefix(size * 4)
                    self._fixed.append((f.name, *self._entry(key, prefix, flen, size * 4)))
                    shape_key = f.name + SHAPE_SUFFIX
                    if shape_key in names:
                        raise ValueError(f"column {shape_key!r} collides with the shape feature of output {f.name!r}; rename the column or the output")
                    feat = _int64_feature(shape)
                    const.append(_entry(shape_key.encode(), feat, len(feat))[0])
            elif f.type == pa.float32():
                prefix, flen = _float_feature_prefix(4)
                self._fixed.append((f.name, *self._entry(key, prefix, flen, 4)))
            elif f.type in (pa.string(), pa.int64()):
                self._var.append((f.name, _ARROW_NAMES[f.type], key))
            else:
                raise ValueError(f"column {f.name!r} has type {f.type}, which the TFRecord writer cannot store; use int64, float32 or string")
        self._const = b"".join(const)
        self._fixed_len = len(self._const) + sum(e for *_, e in self._fixed)

    @staticmethod
    def _entry(key: bytes, prefix: bytes, feature_len: int, row_bytes: int) -> tuple[bytes, int, int]:
        entry_prefix, entry_len = _entry(key, prefix, feature_len)
        return entry_prefix, row_bytes, entry_len

    def encode(self, batch: pa.RecordBatch) -> list[bytes]:
        """Serialize every row of `batch` (whose schema is this encoder's)."""
        n = batch.num_rows
        fixed = []
        for name, prefix, row_bytes, _ in self._fixed:
            col = batch.column(name)
            values = col.storage.flatten() if isinstance(col.type, pa.FixedShapeTensorType) else col
            arr = np.ascontiguousarray(values.to_numpy(zero_copy_only=False))
            arr = arr.astype(arr.dtype.newbyteorder("<"), copy=False)
            fixed.append((prefix, memoryview(arr.view(np.uint8).reshape(-1)), row_bytes))
        var = []
        for name, typ, key in self._var:
            col = batch.column(name)
            if typ == "string":
                feats = [_bytes_feature(v) for v in (col.cast(pa.binary()).to_pylist())]
            else:
                feats = [_int64_feature((v,)) for v in col.to_pylist()]
            var.append([_entry(key, ft, len(ft))[0] for ft in feats])
        out = []
        const, fixed_len = self._const, self._fixed_len
        for i in range(n):
            parts: list = [b""]
            size = fixed_len
            for prefix, buf, rb in fixed:
                parts.append(prefix)
                parts.append(buf[i * rb : (i + 1) * rb])
            for entries in var:
                e = entries[i]
                parts.append(e)
                size += len(e)
            parts.append(const)
            parts[0] = _ld(1, size)  # Example.features
            out.append(b"".join(parts))
        return out


class TFRecordShardWriter:
    """Writes a shard's rows as TFRecord files of `tf.train.Example`s, Hive-partitioned.

    One Example per row with every column (partition columns included, so a file read on
    its own is complete). A new file starts after `max_rows_per_file` rows or
    `max_bytes_per_file` serialized bytes, per partition folder. Files are written with
    TensorFlow's `TFRecordWriter` (C++ framing and CRCs); on a non-local destination they
    are written to a local temporary folder and uploaded.

    Args:
        schema: the output schema (`output_schema`).
        partition_by: Hive partition columns.
        max_rows_per_file: rows per file at most.
        max_bytes_per_file: serialized bytes per file at most (before compression); a
            single larger record still gets a file of its own.
        compression: "none" or "gzip" (files end in `.tfrecord.gz`).
    """

    def __init__(
        self,
        schema: pa.Schema,
        partition_by: Sequence[str] = (),
        max_rows_per_file: int = 100_000,
        max_bytes_per_file: int = 256 << 20,
        compression: str = "none",
    ):
        self.schema = schema
        self.partition_by = tuple(partition_by)
        self.max_rows_per_file = max_rows_per_file
        self.max_bytes_per_file = max_bytes_per_file
        self.compression = "GZIP" if compression.lower() == "gzip" else ""
        self.extension = "tfrecord.gz" if self.compression else "tfrecord"
        self.encoder = ExampleEncoder(schema)

    def storage_spec(self) -> dict:
        return storage_spec(self.schema, "tfrecord", self.partition_by, compression=self.compression or None)

    def _groups(self, batch: pa.RecordBatch) -> list[tuple[str, list[int]]]:
        if not self.partition_by:
            return [("", list(range(batch.num_rows)))]
        from urllib.parse import quote

        groups: dict[str, list[int]] = {}
        cols = [batch.column(c).to_pylist() for c in self.partition_by]
        for i, values in enumerate(zip(*cols)):
            d = "/".join(f"{c}={quote(str(v), safe='')}" for c, v in zip(self.partition_by, values))
            groups.setdefault(d, []).append(i)
        return list(groups.items())

    def write_shard(self, batches: Iterable[pa.RecordBatch], dest: str, basename: str) -> list[WrittenFile]:
        import os
        import shutil
        import tempfile

        import tensorflow as tf

        local = dest[len("file://"):] if dest.startswith("file://") else dest
        tmp = None
        if "://" in local:
            tmp = local = tempfile.mkdtemp(prefix="layerbeam-tfrecord-")
        # zlib level 1: float activations barely compress, so a higher level only costs time.
        options = tf.io.TFRecordOptions(compression_type=self.compression, compression_level=1 if self.compression else None)
        open_files: dict[str, list] = {}  # partition folder → [writer, relative path, rows, bytes, last record's offset]
        closed: list[tuple[str, int, int, int]] = []  # path, records, last record's offset, payload bytes
        counter = 0
        try:
            for batch in batches:
                if batch.num_rows == 0:
                    continue
                records = self.encoder.encode(batch)
                for folder, rows in self._groups(batch):
                    for i in rows:
                        rec = records[i]
                        f = open_files.get(folder)
                        if f is not None and (f[2] >= self.max_rows_per_file or (f[3] and f[3] + len(rec) > self.max_bytes_per_file)):
                            f[0].close()
                            closed.append((f[1], f[2], f[4], f[3]))
                            f = None
                        if f is None:
                            rel = posixpath.join(folder, f"{basename}-{counter}.{self.extension}") if folder else f"{basename}-{counter}.{self.extension}"
                            counter += 1
                            os.makedirs(os.path.dirname(os.path.join(local, rel)), exist_ok=True)
                            f = open_files[folder] = [tf.io.TFRecordWriter(os.path.join(local, rel), options), rel, 0, 0, 0]
                        f[0].write(rec)
                        f[4] = 16 * f[2] + f[3]  # this record's offset: 8-byte length, 4-byte CRC, data, 4-byte CRC each
                        f[2] += 1
                        f[3] += len(rec)
            for f in open_files.values():
                f[0].close()
                closed.append((f[1], f[2], f[4], f[3]))
            written = []
            for rel, rows, last, payload in closed:
                # the file as closed must frame exactly the records written (the commit pins
                # the stored bytes to it, or range-reads the last header where it cannot)
                path = os.path.join(local, rel)
                if self.compression:  # gzip's trailer: the uncompressed size mod 2^32
                    with open(path, "rb") as fh:
                        fh.seek(-4, os.SEEK_END)
                        ok = int.from_bytes(fh.read(4), "little") == (16 * rows + payload) % (1 << 32)
                else:
                    ok = framed_records(path) == rows
                if not ok:
                    raise CommitError(f"the TFRecord writer wrote {rows} records to {rel!r} but the closed file does not frame them")
                written.append(WrittenFile(rel, rows, os.path.getsize(path), last_record=None if self.compression else last))
            if tmp is not None:
                fs, root = fsspec_fs(dest)
                done = []
                for w in written:
                    target = posixpath.join(root, w.path)
                    fs.makedirs(posixpath.dirname(target), exist_ok=True)
                    fs.put(os.path.join(local, w.path), target)
                    info = fs.info(target)  # one request: the stored size and the store's identity of the bytes
                    if int(info["size"]) != w.bytes:
                        raise CommitError(f"uploaded {w.bytes} bytes to {target!r} but the store holds {info['size']}")
                    done.append(dataclasses.replace(w, content_id=content_id(fs, info)))
                written = done
            return written
        finally:
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)


def framed_records(path: str) -> int:
    """Records of an uncompressed local TFRecord file by its framing (the length headers), or
    -1 if the file ends inside a record: seeks from header to header, reads no payload."""
    n, size = 0, os.path.getsize(path)
    with open(path, "rb") as fh:
        pos = 0
        while pos < size:
            head = fh.read(8)
            if len(head) < 8:
                return -1
            (length,) = struct.unpack("<Q", head)
            pos += 12 + length + 4
            if pos > size:
                return -1
            fh.seek(pos)
            n += 1
    return n


def check_last_record(header: bytes, offset: int, size: int) -> str | None:
    """Why the 12 bytes at `offset` (a record's length and its masked CRC-32C) do not frame a
    last record that ends exactly at `size`; None if they do."""
    if len(header) != 12:
        return f"the file ends {size - offset} bytes after where its last record starts"
    from ..readers.framing import _masked_crc

    (length,) = struct.unpack("<Q", header[:8])
    if _masked_crc(header[:8]) != struct.unpack("<I", header[8:])[0]:
        return f"no record header at byte {offset} (its length's checksum does not match)"
    if offset + 12 + length + 4 != size:
        return f"its last record (at byte {offset}, {length} bytes) ends at byte {offset + 16 + length}, not at the file's end ({size})"
    return None


def writer(spec: WriteSpec, schema: pa.Schema) -> TFRecordShardWriter:
    return TFRecordShardWriter(
        schema,
        partition_by=spec.partition_by,
        max_rows_per_file=spec.max_rows_per_file,
        max_bytes_per_file=spec.max_bytes_per_file,
        compression=spec.tfrecord_compression,
    )


def rewrite_without(fs, src: str, dst: str, keep: Callable[[Sequence], np.ndarray]) -> int:
    """Through a local copy: TensorFlow reads and writes the records (framing and CRCs)."""
    import os
    import tempfile

    import tensorflow as tf

    compression = "GZIP" if src.endswith(".gz") else ""
    with tempfile.TemporaryDirectory(prefix="layerbeam-dedupe-") as tmp:
        local_in, local_out = os.path.join(tmp, "in"), os.path.join(tmp, "out")
        fs.get(src, local_in)
        records = [r.numpy() for r in tf.data.TFRecordDataset(local_in, compression_type=compression or None)]
        keys = [tf.train.Example.FromString(r).features.feature["key"].bytes_list.value[0] for r in records]
        mask = keep(keys)
        with tf.io.TFRecordWriter(local_out, options=tf.io.TFRecordOptions(compression_type=compression)) as w:
            for r, k in zip(records, mask):
                if k:
                    w.write(r)
        fs.put(local_out, dst)
    return int(mask.sum())


# --------------------------------------------------------------------------- reading back


def feature_spec(storage: dict, columns: Sequence[str] | None = None) -> dict:
    """`tf.io.parse_single_example` features for a TFRecord output's storage spec.

    Args:
        storage: the manifest's `storage` section.
        columns: a subset of columns; default all.
    """
    import tensorflow as tf

    dtypes = {"string": tf.string, "int64": tf.int64, "float32": tf.float32}
    spec = {}
    for c in storage["columns"]:
        if columns is not None and c["name"] not in columns:
            continue
        t = c["tfrecord"]
        if t["kind"] in ("raw_bytes", "tensor_proto"):
            spec[t["feature"]] = tf.io.FixedLenFeature([], tf.string)
        else:
            spec[t["feature"]] = tf.io.FixedLenFeature(c["shape"], dtypes[c["dtype"]])
    return spec


def parse_example_fn(storage: dict, columns: Sequence[str] | None = None):
    """A function: serialized tf.train.Example → {column: tensor of its shape and dtype}.
    Reads float16 stored as raw little-endian bytes and, in outputs written before that,
    as a serialized TensorProto."""
    import tensorflow as tf

    spec = feature_spec(storage, columns)
    cols = [c for c in storage["columns"] if columns is None or c["name"] in columns]

    def parse(record):
        raw = tf.io.parse_single_example(record, spec)
        out = {}
        for c in cols:
            v = raw[c["tfrecord"]["feature"]]
            kind = c["tfrecord"]["kind"]
            if kind == "raw_bytes":
                v = tf.reshape(tf.io.decode_raw(v, tf.as_dtype(c["dtype"]), little_endian=True), c["shape"])
            elif kind == "tensor_proto":
                v = tf.ensure_shape(tf.io.parse_tensor(v, tf.as_dtype(c["dtype"])), c["shape"])
            out[c["name"]] = v
        return out

    return parse


def tf_dataset(out, cols: Sequence[dict]):
    """Parsed by tf.data itself with the manifest's feature spec, files in manifest order."""
    import tensorflow as tf

    # a tf.string constant: an output of no rows has no files, and [] would be float32
    ds = tf.data.TFRecordDataset(tf.constant(list(out.files), tf.string), compression_type=out.storage.get("compression") or "")
    return ds.map(parse_example_fn(out.storage, [c["name"] for c in cols]), num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


def read_tables(out, cols: Sequence[dict]) -> Iterator[pa.Table]:
    for batch in tf_dataset(out, cols).batch(1024).as_numpy_iterator():
        yield table_from_numpy(batch, cols)


def arrow_dataset(out):
    """An in-memory `pyarrow.dataset.Dataset` of the whole output (TFRecord has no lazy Arrow reader)."""
    import pyarrow.dataset as ds

    tables = list(read_tables(out, out.columns))
    return ds.dataset(pa.concat_tables(tables) if tables else read_schema(out.columns).empty_table())


# --------------------------------------------------------------------------- TFDS metadata
#
# `tfds.builder_from_directory(out)` needs `dataset_info.json` and `features.json` in `out`,
# and files named by a per-split template ending in `{SHARD_X_OF_Y}` (`…-00000-of-00002`,
# at least 5 digits). One TFDS split per Hive partition folder (`label=3/` → `label_3`),
# `train` for an unpartitioned output; `split="all"` reads everything. Gzip-compressed
# outputs get no TFDS metadata: TFDS reads uncompressed TFRecord only.

TFDS_NAME = "layerbeam"
_TENSOR = "tensorflow_datasets.core.features.tensor_feature.Tensor"
_TEXT = "tensorflow_datasets.core.features.text_feature.Text"
_DICT = "tensorflow_datasets.core.features.features_dict.FeaturesDict"


def _split_name(folder: str, taken: set) -> str:
    import re

    name = re.sub(r"\W+", "_", folder.replace("=", "_")).strip("_") or "train"
    base, i = name, 1
    while name in taken:  # two folders that sanitize alike
        name, i = f"{base}_{i}", i + 1
    taken.add(name)
    return name


def final_paths(paths: Sequence[str], run_id: str) -> list[str]:
    """The committed names of a run's TFRecord files (staged paths, in commit order): TFDS
    shard names per partition folder, `<folder>/part-<run>.tfrecord-00000-of-00002`, so
    TFDS finds them from its template (the run id stays in the name)."""
    if any(p.endswith(".gz") for p in paths):
        return list(paths)
    by_folder: dict[str, list[int]] = {}
    for i, p in enumerate(paths):
        by_folder.setdefault(posixpath.dirname(p), []).append(i)
    out = list(paths)
    for folder, idx in by_folder.items():
        digits = max(5, len(str(len(idx))))
        for n, i in enumerate(idx):
            name = f"part-{run_id[:8]}.tfrecord-{n:0{digits}d}-of-{len(idx):0{digits}d}"
            out[i] = posixpath.join(folder, name) if folder else name
    return out


def _feature(c: dict) -> dict:
    if c["dtype"] == "string":
        return {"pythonClassName": _TEXT, "text": {}}
    shape = {"dimensions": [str(int(d)) for d in c["shape"]]} if c["shape"] else {}
    encoding = "bytes" if c["tfrecord"]["kind"] == "raw_bytes" else "none"
    return {"pythonClassName": _TENSOR, "tensor": {"dtype": c["dtype"], "encoding": encoding, "shape": shape}}


def sidecars(manifest: dict) -> dict[str, bytes]:
    """`dataset_info.json` and `features.json` for TFDS (see above); {} for gzip outputs
    and for files not named by `final_paths` (TFDS could not find them)."""
    import json
    import re

    storage = manifest["storage"]
    if storage.get("compression"):
        return {}
    splits: dict[str, list[dict]] = {}
    for f in manifest["files"]:
        splits.setdefault(posixpath.dirname(f["path"]), []).append(f)
    taken: set = set()
    info_splits = []
    for folder, files in sorted(splits.items()):
        names = [re.fullmatch(r"(.+)\.tfrecord-(\d{5,})-of-(\d{5,})", posixpath.basename(f["path"])) for f in files]
        if not all(names) or [int(m[2]) for m in names] != list(range(len(files))) or {(m[1], int(m[3])) for m in names} != {(names[0][1], len(files))}:
            return {}
        prefix = names[0][1]
        template = (f"{folder}/" if folder else "") + prefix + ".{FILEFORMAT}-{SHARD_X_OF_Y}"
        info_splits.append({
            "name": _split_name(folder, taken),
            "filepathTemplate": template,
            "shardLengths": [str(int(f["rows"])) for f in files],
            "numBytes": str(int(sum(f["bytes"] for f in files))),
        })
    info = {
        "moduleName": "layerbeam",
        "name": TFDS_NAME,
        "description": f"layerbeam layer outputs of {manifest.get('model', {}).get('source', '?')}, run {manifest.get('run_id', '?')}",
        "version": "1.0.0",
        "fileFormat": "tfrecord",
        "splits": info_splits,
    }
    features = {"pythonClassName": _DICT, "featuresDict": {"features": {c["tfrecord"]["feature"]: _feature(c) for c in storage["columns"]}}}
    return {"dataset_info.json": json.dumps(info, indent=2).encode(), "features.json": json.dumps(features, indent=2).encode()}
