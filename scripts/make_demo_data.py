"""Build the demo dataset: real photographs (scikit-image's bundled samples), randomly
cropped and resized, written as TFRecord shards of tf.train.Example.

Features: image/encoded (JPEG bytes), image/key (string), image/class/label (int64: which
photograph the crop came from), image/class/text (string: its name).

    python scripts/make_demo_data.py --out data/demo --images 320 --shards 4
"""

from __future__ import annotations

import argparse
import io
import os
import sys

import numpy as np

# Colour photographs shipped inside the scikit-image wheel (no download).
PHOTOS = ["astronaut", "chelsea", "coffee", "rocket", "stereo_motorcycle", "hubble_deep_field", "retina", "immunohistochemistry", "colorwheel", "camera"]


def _load(name: str) -> np.ndarray:
    from skimage import data

    img = getattr(data, name)()
    if isinstance(img, tuple):  # stereo pairs: take the left view
        img = img[0]
    if img.ndim == 2:
        img = np.stack([img] * 3, axis=-1)
    return img[..., :3].astype(np.uint8)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="data/demo", help="output folder")
    p.add_argument("--images", type=int, default=320, help="number of examples")
    p.add_argument("--shards", type=int, default=4, help="number of TFRecord files")
    p.add_argument("--size", type=int, default=160, help="side of the stored JPEG")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf
    from PIL import Image

    rng = np.random.default_rng(args.seed)
    photos = [(n, _load(n)) for n in PHOTOS]
    os.makedirs(args.out, exist_ok=True)
    writers = [tf.io.TFRecordWriter(os.path.join(args.out, f"demo-{i:05d}-of-{args.shards:05d}.tfrecord")) for i in range(args.shards)]
    for k in range(args.images):
        label = k % len(photos)
        name, img = photos[label]
        h, w = img.shape[:2]
        side = int(rng.integers(min(h, w) // 3, min(h, w) + 1))
        y, x = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
        crop = Image.fromarray(img[y : y + side, x : x + side]).resize((args.size, args.size), Image.BILINEAR)
        buf = io.BytesIO()
        crop.save(buf, format="JPEG", quality=90)
        feature = {
            "image/encoded": tf.train.Feature(bytes_list=tf.train.BytesList(value=[buf.getvalue()])),
            "image/key": tf.train.Feature(bytes_list=tf.train.BytesList(value=[f"{name}-{k:05d}".encode()])),
            "image/class/label": tf.train.Feature(int64_list=tf.train.Int64List(value=[label])),
            "image/class/text": tf.train.Feature(bytes_list=tf.train.BytesList(value=[name.encode()])),
        }
        writers[k % args.shards].write(tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString())
    for w in writers:
        w.close()
    print(f"wrote {args.images} examples from {len(photos)} photographs into {args.shards} shards under {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
