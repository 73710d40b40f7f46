#!/usr/bin/env python3
"""CPU per image of the image decode that `input.exif_orientation` adds to (issue 17).

Decodes and resizes the same 1024 JPEGs (cached in memory) to 224×224 through tf.data, one
map call at a time, three ways, interleaved and best of --reps:

  layerbeam     `readers.images.decode_image` as it is: EXIF read only where there is a marker
  always_read   the EXIF block read and applied for every image (what the code did before)
  exif_off      `input.exif_orientation: false`

    python scripts/bench_decode_exif.py            # the benchmark's data (made if missing)
    python scripts/bench_decode_exif.py --data data/demo

The benchmark's photo crops have no EXIF, as many stored datasets do not; camera JPEGs do,
and for them `layerbeam` costs what `always_read` does plus the test.
"""

from __future__ import annotations

import argparse
import glob
import os
import sys
import time
from types import SimpleNamespace

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", help="a folder of TFRecord shards with image/encoded (default: the benchmark's 2048 images)")
    ap.add_argument("--images", type=int, default=1024)
    ap.add_argument("--reps", type=int, default=4)
    a = ap.parse_args()

    import tensorflow as tf
    from tensorflow.python.autograph.impl.api import do_not_convert

    from layerbeam.transforms.readers import images as I

    if a.data is None:
        import bench

        a.data = bench._dataset(2048, 8)
    files = sorted(glob.glob(f"{a.data}/*.tfrecord"))
    spec = {"image/encoded": tf.io.FixedLenFeature([], tf.string)}
    raw = next(iter(tf.data.TFRecordDataset(files).map(lambda r: tf.io.parse_single_example(r, spec)["image/encoded"]).take(a.images).batch(a.images)))
    n = int(raw.shape[0])
    source = tf.data.Dataset.from_tensor_slices(raw).cache()
    for _ in source:  # fill the cache: reading is not what is timed
        pass
    shape, identity = (224, 224, 3), lambda x: x

    def always_read(data):
        img = tf.io.decode_image(data, channels=3, dtype=tf.uint8, expand_animations=False)
        img = I.apply_orientation(img, I.exif_orientation(data))
        img = tf.image.resize(img, shape[:2], method="bilinear")
        return tf.cast(tf.ensure_shape(tf.cast(img, tf.float32), shape), tf.float32)

    ways = {
        "layerbeam": lambda d: I.decode_image(d, shape, SimpleNamespace(exif_orientation=True, resize_method="bilinear"), identity),
        "always_read": always_read,
        "exif_off": lambda d: I.decode_image(d, shape, SimpleNamespace(exif_orientation=False, resize_method="bilinear"), identity),
    }
    best = {k: (float("inf"), float("inf")) for k in ways}
    for _ in range(a.reps):
        for k, f in ways.items():
            ds = source.map(do_not_convert(f), num_parallel_calls=1).batch(64)
            c0, t0 = time.process_time(), time.perf_counter()
            for _ in ds:
                pass
            wall, cpu = (time.perf_counter() - t0) / n * 1e3, (time.process_time() - c0) / n * 1e3
            best[k] = (min(best[k][0], wall), min(best[k][1], cpu))
    print(f"{n} JPEGs from {a.data}, decode + resize to 224, best of {a.reps}")
    for k, (wall, cpu) in best.items():
        print(f"  {k:<12} {cpu:6.3f} ms CPU per image   {wall:6.3f} ms wall")


if __name__ == "__main__":
    main()
