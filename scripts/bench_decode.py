"""Images per second per CPU core for decode + resize to 224×224, by format, source size and
decode option: what the input side of a GPU worker costs.

Everything runs on ONE thread (TensorFlow inter-op and intra-op pools of 1, tf.data's private
thread pool of 1, sequential map), so the rate is per core. On a shared machine the wall clock
is noisy; the process CPU time is not (much), so both are printed and `cpu img/s` (images per
CPU-second of this process) is the number to use.

Sources are real photographs (scikit-image's samples) cropped to each size and encoded in
memory: JPEG quality 90 (4:2:0) and PNG (default compression). Variants:

* `decode_image` — tf.io.decode_image (what layerbeam's reader and most pipelines call)
* `jpeg` — tf.io.decode_jpeg, default DCT ("" = the library's INTEGER_ISLOW)
* `jpeg fast` — decode_jpeg(dct_method="INTEGER_FAST")
* `jpeg ratio=k` — decode_jpeg(ratio=k): libjpeg's reduced-scale IDCT, only when the
  source is ≥ k× the target on its short side
* `crop 87.5%` — tf.io.decode_and_crop_jpeg of the central 87.5% (the usual eval crop):
  libjpeg skips the rows and iMCU columns outside the window
* `png` — tf.io.decode_png

Each decoded image is resized (bilinear, float32) to 224×224 and cast as in a model input.

    python scripts/bench_decode.py                # ~1–2 min
    python scripts/bench_decode.py --seconds 1 --sizes 224x224,400x350
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import time

import numpy as np

PHOTOS = ["astronaut", "chelsea", "coffee", "rocket", "stereo_motorcycle", "hubble_deep_field", "retina", "immunohistochemistry"]
TARGET = 224


def _photos():
    from skimage import data, transform

    out = []
    for name in PHOTOS:
        img = getattr(data, name)()
        if isinstance(img, tuple):
            img = img[0]
        if img.ndim == 2:
            img = np.stack([img] * 3, -1)
        img = img[..., :3]
        # upscale small photos so that a 1024×768 crop exists (the stored samples are ~512 px)
        h, w = img.shape[:2]
        f = max(1.0, 1100 / min(h, w))
        if f > 1:
            img = (transform.resize(img, (int(h * f), int(w * f)), order=1, anti_aliasing=False) * 255).astype(np.uint8)
        out.append(img.astype(np.uint8))
    return out


def _encode(photos, w: int, h: int, fmt: str, per_photo: int, rng) -> list[bytes]:
    from PIL import Image

    blobs = []
    for img in photos:
        H, W = img.shape[:2]
        for _ in range(per_photo):
            # a crop of 1.0–1.3× the size, resized to exactly w×h: real image content at that size
            s = rng.uniform(1.0, 1.3)
            ch, cw = min(H, int(h * s)), min(W, int(w * s))
            y, x = rng.integers(0, H - ch + 1), rng.integers(0, W - cw + 1)
            pic = Image.fromarray(img[y:y + ch, x:x + cw]).resize((w, h), Image.BILINEAR)
            buf = io.BytesIO()
            pic.save(buf, format="JPEG", quality=90) if fmt == "jpeg" else pic.save(buf, format="PNG")
            blobs.append(buf.getvalue())
    return blobs


def _variants(w: int, h: int, fmt: str):
    import tensorflow as tf

    def finish(img):
        img = tf.image.resize(img, (TARGET, TARGET))
        return tf.ensure_shape(img, (TARGET, TARGET, 3))

    v = {"decode_image": lambda b: finish(tf.io.decode_image(b, channels=3, expand_animations=False))}
    if fmt == "png":
        v["png"] = lambda b: finish(tf.io.decode_png(b, channels=3))
        return v
    v["jpeg"] = lambda b: finish(tf.io.decode_jpeg(b, channels=3))
    v["jpeg fast"] = lambda b: finish(tf.io.decode_jpeg(b, channels=3, dct_method="INTEGER_FAST"))
    for k in (2, 4, 8):
        if min(w, h) >= k * TARGET:
            v[f"jpeg ratio={k}"] = (lambda k: lambda b: finish(tf.io.decode_jpeg(b, channels=3, ratio=k)))(k)
            v[f"jpeg ratio={k} fast"] = (lambda k: lambda b: finish(tf.io.decode_jpeg(b, channels=3, ratio=k, dct_method="INTEGER_FAST")))(k)
    ch, cw = int(h * 0.875), int(w * 0.875)
    window = tf.constant([(h - ch) // 2, (w - cw) // 2, ch, cw], tf.int32)
    v["crop 87.5%"] = lambda b: finish(tf.io.decode_and_crop_jpeg(b, window, channels=3))
    return v


def _measure(blobs: list[bytes], fn, seconds: float) -> tuple[float, float, int]:
    """(wall img/s, cpu img/s, images) decoding `blobs` over and over for about `seconds`."""
    import tensorflow as tf

    o = tf.data.Options()
    o.threading.private_threadpool_size = 1
    o.autotune.enabled = False
    ds = tf.data.Dataset.from_tensor_slices(blobs).repeat().map(fn).batch(16).with_options(o)
    it = iter(ds)
    for _ in range(2):  # warm-up: graph building, first allocations
        next(it)
    n, t0, c0 = 0, time.perf_counter(), time.process_time()
    while time.perf_counter() - t0 < seconds:
        n += int(next(it).shape[0])
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return n / wall, n / cpu, n


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="224x224,400x350,500x375,1024x768", help="source sizes WxH")
    ap.add_argument("--formats", default="jpeg,png")
    ap.add_argument("--seconds", type=float, default=2.0, help="per measurement")
    ap.add_argument("--repeat", type=int, default=2, help="best of")
    ap.add_argument("--markdown", action="store_true")
    args = ap.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import tensorflow as tf

    tf.config.threading.set_inter_op_parallelism_threads(1)
    tf.config.threading.set_intra_op_parallelism_threads(1)
    rng = np.random.default_rng(0)
    photos = _photos()
    rows = []
    for size in args.sizes.split(","):
        w, h = map(int, size.split("x"))
        for fmt in args.formats.split(","):
            blobs = _encode(photos, w, h, fmt, 4, rng)
            kb = np.mean([len(b) for b in blobs]) / 1024
            for name, fn in _variants(w, h, fmt).items():
                best = max((_measure(blobs, fn, args.seconds) for _ in range(args.repeat)), key=lambda r: r[1])
                rows.append((f"{w}×{h}", fmt, f"{kb:.0f}", name, best[0], best[1]))
                print(f"{w}×{h} {fmt:<4} {kb:5.0f} KB  {name:<20} wall {best[0]:7.0f} img/s   cpu {best[1]:7.0f} img/s per core", file=sys.stderr, flush=True)
    if args.markdown:
        print("| source | format | KB/image | decode | img/s per core (CPU time) | img/s (wall) |")
        print("|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r[0]} | {r[1]} | {r[2]} | {r[3]} | {r[5]:.0f} | {r[4]:.0f} |")
    else:
        print(f"{'source':<10} {'fmt':<5} {'KB':>5}  {'decode':<20} {'cpu img/s/core':>15} {'wall img/s':>11}")
        for r in rows:
            print(f"{r[0]:<10} {r[1]:<5} {r[2]:>5}  {r[3]:<20} {r[5]:>15.0f} {r[4]:>11.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
