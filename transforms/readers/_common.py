"""Pieces every input kind shares: tf.data options, the sentinel bookkeeping, and the
retry that explains a record's failure."""

from __future__ import annotations

from ..deadletters import Failure
from ..errors import first_line
from .tensors import dummy

__all__ = ["without_autotune", "tagged", "sentinel_row", "explain_by_retry", "path_bytes"]


def path_bytes(path: str) -> bytes:
    """A path's bytes: a file name that is not UTF-8 (held by Python as surrogate escapes)
    reaches TensorFlow as the bytes the file system has."""
    return path.encode("utf-8", "surrogateescape")


def without_autotune(ds):
    """`ds` with tf.data's autotuning off. With it on, each iterator runs a model thread
    that its destructor joins, and the destructor runs in Python's `EagerTensor_dealloc`,
    holding the GIL: measured (py-spy, 2 cores) at about 2 s after a worker's first shard
    in about half the runs, and up to 0.3 s after later ones; one iterator per shard makes
    that recur, where a long-lived training loop would never notice it. With
    autotuning off, `AUTOTUNE` parallelism resolves to min(initial_parallelism, CPU
    threads), with initial_parallelism raised from 16 to the CPU count so that a big worker
    decodes on every core; `prefetch` keeps its fixed buffer."""
    import os

    import tensorflow as tf

    options = tf.data.Options()
    options.autotune.enabled = False
    options.autotune.initial_parallelism = max(16, os.cpu_count() or 1)
    return ds.with_options(options)


def tagged(is_sentinel, fake, real, index, nbytes) -> dict:
    """A parsed record (`real()`, or `fake()` for the sentinel) with the pipeline's
    bookkeeping: its index, whether it is the sentinel, the framing bytes so far."""
    import tensorflow as tf

    out = tf.cond(is_sentinel, fake, real)
    out["__index__"] = index
    out["__sentinel__"] = is_sentinel
    out["__bytes__"] = nbytes
    return out


def explain_by_retry(index: int, key: str, parse, item) -> Failure:
    """Run the record's own tf.data map function eagerly and report its error."""
    import tensorflow as tf

    try:
        parse(tf.constant(index, tf.int64), (item, tf.constant(False), tf.constant(0, tf.int64)))
    except Exception as e:  # whatever the map function raised is the answer
        return Failure(index, key, "decode", "decode_failed", first_line(e))
    return Failure(index, key, "decode", "decode_failed", "failed inside tf.data but decoded when retried alone")


def sentinel_row(cfg, plans) -> dict:
    """The sentinel's columns, as every parser's `fake()` returns them: a zero of each
    column's type (only the sentinel's bookkeeping is read)."""
    import tensorflow as tf

    out = {f"__input__{n}": dummy(p) for n, p in plans.items()}
    out["key"] = tf.constant("")
    if cfg.label_feature:
        out["label"] = tf.zeros([], tf.as_dtype(cfg.label_type))
    for name, typ in cfg.passthrough.items():
        out[name] = tf.zeros([], tf.as_dtype(typ))
    return out
