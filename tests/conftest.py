"""Shared fixtures: small real images in TFRecord shards, and a CLI runner.

TensorFlow is imported once per test process; images are small; models are built once
per module.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


def photo_crops(n: int, size: int, seed: int = 0) -> list[np.ndarray]:
    """`n` real photographic crops (scikit-image samples), uint8 (size, size, 3)."""
    from PIL import Image
    from skimage import data

    photos = [data.astronaut(), data.chelsea(), data.coffee(), data.rocket()]
    rng = np.random.default_rng(seed)
    out = []
    for k in range(n):
        img = photos[k % len(photos)]
        h, w = img.shape[:2]
        side = int(rng.integers(min(h, w) // 3, min(h, w)))
        y, x = int(rng.integers(0, h - side)), int(rng.integers(0, w - side))
        out.append(np.asarray(Image.fromarray(img[y : y + side, x : x + side]).resize((size, size), Image.BILINEAR)))
    return out


def encode_png(img: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def example(features: dict) -> bytes:
    import tensorflow as tf

    feat = {}
    for k, v in features.items():
        if isinstance(v, bytes):
            feat[k] = tf.train.Feature(bytes_list=tf.train.BytesList(value=[v]))
        elif isinstance(v, str):
            feat[k] = tf.train.Feature(bytes_list=tf.train.BytesList(value=[v.encode()]))
        elif isinstance(v, (int, np.integer)):
            feat[k] = tf.train.Feature(int64_list=tf.train.Int64List(value=[int(v)]))
        else:
            feat[k] = tf.train.Feature(float_list=tf.train.FloatList(value=[float(v)]))
    return tf.train.Example(features=tf.train.Features(feature=feat)).SerializeToString()


def write_tfrecords(folder: Path, records_per_shard: list[list[bytes]]) -> list[Path]:
    import tensorflow as tf

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, records in enumerate(records_per_shard):
        p = folder / f"part-{i:05d}.tfrecord"
        with tf.io.TFRecordWriter(str(p)) as w:
            for r in records:
                w.write(r)
        paths.append(p)
    return paths


@pytest.fixture(scope="session")
def png_dataset(tmp_path_factory):
    """10 PNG photo crops of 64×64 in 3 shards (4, 3, 3), keys k000…, labels k % 3.

    Returns (folder, {key: uint8 image}, {key: label})."""
    folder = tmp_path_factory.mktemp("pngs")
    imgs = photo_crops(10, 64)
    keys = [f"k{i:03d}" for i in range(10)]
    labels = {k: i % 3 for i, k in enumerate(keys)}
    recs = [example({"image/encoded": encode_png(im), "image/key": k, "image/class/label": labels[k]}) for im, k in zip(imgs, keys)]
    write_tfrecords(folder, [recs[:4], recs[4:7], recs[7:]])
    return folder, dict(zip(keys, imgs)), labels


def base_config(pattern: str, out: str, **overrides) -> dict:
    cfg = {
        "input": {
            "pattern": pattern,
            "key_feature": "image/key",
            "label_feature": "image/class/label",
        },
        "model": {"source": "keras.applications.MobileNetV2", "input_shape": [64, 64, 3], "kwargs": {"alpha": 0.35}},
        "layers": {"select": ["block_1_expand_relu"]},
        "batching": {"batch_size": 4},
        "output": {"path": out},
    }
    return with_overrides(cfg, **overrides)


def with_overrides(cfg: dict, **overrides) -> dict:
    """Set dotted keys (`output.path=...`) in a raw config dict, creating sections; returns it."""
    for dotted, value in overrides.items():
        node = cfg
        keys = dotted.split(".")
        for k in keys[:-1]:
            node = node.setdefault(k, {})
        node[keys[-1]] = value
    return cfg


def run_cli(args: list[str], cwd: Path | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run the real `layerbeam` entry point in a subprocess (exit code, no traceback), in
    the environment a user has: TF_CPP_MIN_LOG_LEVEL unset."""
    env = dict(os.environ)
    env.pop("TF_CPP_MIN_LOG_LEVEL", None)
    return subprocess.run(
        [sys.executable, "-c", "import sys; from layerbeam.cli import main; sys.exit(main())", *args],
        cwd=cwd or ROOT, env=env, capture_output=True, text=True, timeout=timeout,
    )


def read_manifest(out: Path) -> dict:
    return json.loads((Path(out) / "_manifest.json").read_text())


@pytest.fixture(scope="session")
def three_formats(png_dataset, tmp_path_factory):
    """One job (MobileNetV2 α=0.35 at 64 px, block_1_expand_relu as mean float32, unreduced
    float16 and mean bfloat16) written three ways: Parquet (the portable default), Parquet
    `list` encoding, TFRecord+GZIP.

    Returns {"parquet" | "list" | "tfrecord": (out path, manifest)}."""
    from layerbeam.run import run_job
    from layerbeam.config import load_config

    folder, _, _ = png_dataset
    root = tmp_path_factory.mktemp("formats")
    select = [
        {"layer": "block_1_expand_relu", "as": "pooled"},
        {"layer": "block_1_expand_relu", "as": "map16", "reduce": "none", "dtype": "float16"},
        {"layer": "block_1_expand_relu", "as": "pooled_bf16", "dtype": "bfloat16"},
    ]
    variants = {
        "parquet": {},
        "list": {"output.parquet_encoding": "list"},
        "tfrecord": {"output.format": "tfrecord", "output.tfrecord_compression": "gzip"},
    }
    out = {}
    for name, extra in variants.items():
        raw = base_config(f"{folder}/*.tfrecord", str(root / name), **{"layers.select": select, "output.partition_by": ["label"], **extra})
        manifest = run_job(load_config(raw=raw))
        out[name] = (root / name, manifest)
    return out
