"""`layerbeam verify`: recompute random rows of a finished output with plain Keras and
compare them with what was written.

Independent of the extraction path on purpose: the rows' inputs are read again from the
original files with plain TensorFlow (`tf.train.Example` parsing, `tf.io.decode_image`,
`tf.image.resize`, the config's preprocessing), each output is recomputed with Keras's own
`predict` on `keras.Model(model.inputs, model.get_layer(path).output)`, and reduced and
rounded in numpy. Nothing of layerbeam's extractor, readers or writers is used; only the
model loader (the same source, weights and seed as the run; its fingerprint is checked
against the manifest's).

Tolerances, relative to each output's largest magnitude in the sample (`predict` batches
differ from the run's batches, so float32 results differ in the last bits): float32 1e-4,
float16 2e-3 (half an ulp is 4.9e-4), bfloat16 1e-2 (half an ulp is 3.9e-3).
"""

from __future__ import annotations

import dataclasses
import posixpath

import numpy as np

from .transforms.errors import ConfigError

__all__ = ["verify", "VerifyReport", "OutputCheck", "TOLERANCE"]

TOLERANCE = {"float32": 1e-4, "float16": 2e-3, "bfloat16": 1e-2}


@dataclasses.dataclass(frozen=True)
class OutputCheck:
    """One output's comparison: largest absolute and relative error over the sample."""

    name: str
    dtype: str
    max_abs: float
    max_rel: float
    tolerance: float  # absolute: the dtype's relative tolerance × the sample's largest |value|
    worst_key: str | None

    @property
    def ok(self) -> bool:
        return self.max_abs <= self.tolerance


@dataclasses.dataclass(frozen=True)
class VerifyReport:
    rows: int
    outputs: tuple[OutputCheck, ...]

    @property
    def ok(self) -> bool:
        return all(o.ok for o in self.outputs)


def verify(path: str, sample: int = 32, seed: int = 0, safe_mode: bool = True) -> VerifyReport:
    """Recompute `sample` random rows of the output at `path` and compare.

    Raises:
        ConfigError: the output cannot be checked this way (a model whose weights are not
            the run's, an input that no longer has a sampled key, a nested layer path).
    """
    import keras

    from .transforms.models import ModelSpec, load_model, model_fingerprint, preprocess_fn
    from .transforms.readback import open_output, to_arrow

    out = open_output(path)
    m = out.manifest
    cfg = m["config"]
    if sample < 1:
        raise ConfigError(f"--sample {sample} must be at least 1")
    table = to_arrow(out)
    if len(table) == 0:
        raise ConfigError(f"{path!r} has no rows to verify")
    rng = np.random.default_rng(seed)
    picked = np.sort(rng.choice(len(table), size=min(sample, len(table)), replace=False))
    table = table.take(picked)
    keys = [k if isinstance(k, str) else str(k) for k in table.column("key").to_pylist()]

    spec = ModelSpec(**dict(cfg["model"], safe_mode=safe_mode))
    model = load_model(spec)
    if model_fingerprint(model) != m["model"]["fingerprint"]:
        raise ConfigError(f"the model {cfg['model']['source']!r} now has other weights than the run's (fingerprint differs); verify needs the same model")
    shapes = {k: tuple(v) for k, v in m["model"]["input_shapes"].items()}
    images = _inputs_for(keys, m, shapes, preprocess_fn(cfg["input"]["preprocess"], cfg["model"]["source"]))

    checks = []
    for o in m["outputs"]:
        if "/" in o["path"]:
            raise ConfigError(f"output {o['name']!r} taps the nested path {o['path']!r}; verify recomputes top-level layers only")
        layer = model.get_layer(o["path"])
        sub = keras.Model(model.inputs, layer.output)
        names = list(shapes)  # the model's inputs, in order
        feed = [images[n] for n in names] if len(names) > 1 else images[names[0]]
        ref = np.asarray(sub.predict(feed, verbose=0, batch_size=8), np.float64)
        ref = _reduce(ref, o["reduce"], o["dtype"])
        got = table.column(o["name"]).combine_chunks().to_numpy_ndarray().astype(np.float64)
        err = np.abs(got - ref)
        scale = float(np.abs(ref).max()) or 1.0
        worst = int(np.unravel_index(np.argmax(err), err.shape)[0]) if err.size else 0
        checks.append(OutputCheck(
            name=o["name"], dtype=o["dtype"], max_abs=float(err.max()) if err.size else 0.0,
            max_rel=float((err / np.maximum(np.abs(ref), scale * 1e-3)).max()) if err.size else 0.0,
            tolerance=TOLERANCE[o["dtype"]] * scale, worst_key=keys[worst] if err.size else None,
        ))
    return VerifyReport(rows=len(keys), outputs=tuple(checks))


def _reduce(x: np.ndarray, reduce: str, dtype: str) -> np.ndarray:
    """The run's reduction and rounding, in numpy."""
    if reduce in ("mean", "max") and x.ndim > 2:
        axes = tuple(range(1, x.ndim - 1))
        x = x.mean(axis=axes) if reduce == "mean" else x.max(axis=axes)
    elif reduce == "flatten" and x.ndim > 2:
        x = x.reshape(len(x), -1)
    x = x.astype(np.float32)
    if dtype == "float16":
        x = x.astype(np.float16)
    elif dtype == "bfloat16":  # round to nearest even on the top 16 bits
        bits = x.view(np.uint32).astype(np.uint64)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16 << 16
        x = bits.astype(np.uint32).view(np.float32)
    return x.astype(np.float64)


def _inputs_for(keys: list[str], manifest: dict, shapes: dict, preprocess) -> dict[str, np.ndarray]:
    """The model inputs of the examples with these keys, from the original files."""
    import tensorflow as tf

    cfg = manifest["config"]["input"]
    wanted = {k: i for i, k in enumerate(keys)}
    found: dict[str, dict[str, np.ndarray]] = {}
    if cfg["format"] == "images":
        for k in keys:
            with tf.io.gfile.GFile(k, "rb") as f:
                found[k] = {next(iter(shapes)): _decode(f.read(), shapes[next(iter(shapes))], cfg, preprocess)}
    else:
        features = cfg["inputs"] or {next(iter(shapes)): cfg["image_feature"]}
        from .transforms.versions import inputs_of

        paths = [p for shard in inputs_of(manifest, manifest["config"]["output"]["path"]) for p in shard["paths"]]
        for p in paths:
            base = posixpath.basename(p)
            for index, record in enumerate(tf.data.TFRecordDataset(p, compression_type=cfg["compression"]).as_numpy_iterator()):
                ex = tf.train.Example.FromString(record).features.feature
                key = ex[cfg["key_feature"]].bytes_list.value[0].decode() if cfg["key_feature"] else f"{base}:{index}"
                if key in wanted and key not in found:
                    found[key] = {n: _decode(ex[f].bytes_list.value[0], shapes[n], cfg, preprocess) for n, f in features.items()}
            if len(found) == len(wanted):
                break
    missing = [k for k in keys if k not in found]
    if missing:
        raise ConfigError(f"{len(missing)} sampled keys are no longer in the input (e.g. {missing[0]!r}); the input changed since the run")
    return {n: np.stack([found[k][n] for k in keys]) for n in shapes}


def _decode(data: bytes, shape, cfg: dict, preprocess) -> np.ndarray:
    import tensorflow as tf

    h, w, c = shape
    img = tf.io.decode_image(data, channels=c, dtype=tf.uint8, expand_animations=False)
    img = tf.cast(tf.image.resize(img, (h, w), method=cfg["resize_method"]), tf.float32)
    return np.asarray(tf.cast(preprocess(img), tf.float32))
