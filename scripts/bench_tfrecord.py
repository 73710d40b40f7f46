"""How fast the TFRecord writer serializes tensor data, against the protobuf-API baseline.

    .venv/bin/python scripts/bench_tfrecord.py [--shape 28,28,192] [--rows 512]

Prints MB/s of tensor data (float32 values only, not framing) for:
  * protobuf API: `tf.train.Example(... FloatList(value=row) ...).SerializeToString()`
  * layerbeam `ExampleEncoder.encode` (wire format spliced from the batch buffer)
  * layerbeam `TFRecordShardWriter.write_shard` to a local file (encode + framing + CRCs + write)
  * the same with GZIP
  * for scale, Python writing the same bytes to a plain file (the disk/page-cache floor)
Each figure is the best of `--repeat` runs.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np
import pyarrow as pa


class _Spec:
    def __init__(self, name, shape, dtype):
        self.name, self.shape, self.dtype = name, tuple(shape), dtype

    def to_json(self):
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}


def _best(fn, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="28,28,192", help="per-example tensor shape (default: MobileNetV2 block_6_expand_relu, unreduced)")
    ap.add_argument("--rows", type=int, default=512, help="examples")
    ap.add_argument("--batch", type=int, default=32, help="rows per Arrow batch")
    ap.add_argument("--repeat", type=int, default=3, help="runs per figure; the best is printed")
    args = ap.parse_args()

    import tensorflow as tf

    from layerbeam.transforms.formats.tfrecord import ExampleEncoder, TFRecordShardWriter
    from layerbeam.transforms.schema import output_schema, to_record_batch

    shape = tuple(int(x) for x in args.shape.split(","))
    rng = np.random.default_rng(0)
    schema = output_schema([_Spec("t", shape, "float32")], {"key": pa.string(), "label": pa.int64()})
    batches = []
    for start in range(0, args.rows, args.batch):
        n = min(args.batch, args.rows - start)
        cols = {"key": np.array([f"shard-0:{start + i}" for i in range(n)], dtype=object), "label": np.arange(n) % 10}
        batches.append(to_record_batch(schema, cols, {"t": rng.standard_normal((n, *shape)).astype(np.float32)}))
    mb = args.rows * int(np.prod(shape)) * 4 / 1e6

    arrays = [(b.column("key").to_pylist(), b.column("label").to_pylist(), b.column("t").to_numpy_ndarray().reshape(b.num_rows, -1)) for b in batches]

    def protobuf_api():
        for keys, labels, t in arrays:
            for k, lab, row in zip(keys, labels, t):
                tf.train.Example(features=tf.train.Features(feature={
                    "key": tf.train.Feature(bytes_list=tf.train.BytesList(value=[k.encode()])),
                    "label": tf.train.Feature(int64_list=tf.train.Int64List(value=[lab])),
                    "t": tf.train.Feature(float_list=tf.train.FloatList(value=row)),
                    "t.shape": tf.train.Feature(int64_list=tf.train.Int64List(value=shape)),
                })).SerializeToString()

    enc = ExampleEncoder(schema)
    assert tf.train.Example.FromString(enc.encode(batches[0])[0]).features.feature["t"].float_list.value[0] == batches[0].column("t").storage.flatten()[0].as_py()

    def encode():
        for b in batches:
            enc.encode(b)

    with tempfile.TemporaryDirectory() as d:
        def write(compression):
            w = TFRecordShardWriter(schema, compression=compression)
            return lambda: w.write_shard(iter(batches), f"{d}/{compression}", "part")

        base_rows = max(1, args.rows // 8)  # the baseline is slow: time a slice and scale
        sl = arrays[: max(1, base_rows // args.batch)]
        sl_mb = sum(len(k) for k, _, _ in sl) * int(np.prod(shape)) * 4 / 1e6
        saved, arrays[:] = list(arrays), sl
        t_proto = _best(protobuf_api, args.repeat)
        arrays[:] = saved
        records = [r for b in batches for r in enc.encode(b)]

        def plain_write():  # the I/O floor: the same bytes, no framing, no CRC
            with open(f"{d}/plain.bin", "wb") as f:
                for r in records:
                    f.write(r)

        rows = [
            ("protobuf API (tf.train.FloatList)", sl_mb / t_proto),
            ("ExampleEncoder.encode", mb / _best(encode, args.repeat)),
            ("TFRecordShardWriter, no compression", mb / _best(write("none"), args.repeat)),
            ("TFRecordShardWriter, GZIP", mb / _best(write("gzip"), args.repeat)),
            ("(I/O floor: open().write of the same bytes)", mb / _best(plain_write, args.repeat)),
        ]
    print(f"{args.rows} examples × {'×'.join(map(str, shape))} float32 = {mb:.0f} MB of tensor data")
    for name, rate in rows:
        print(f"  {name:<40s} {rate:8.0f} MB/s")


if __name__ == "__main__":
    main()
