"""WebDataset `.tar` shards: one tar file is one shard; its members are grouped into samples
by basename (`dir/0001.jpg`, `dir/0001.cls`, `dir/0001.json` → sample `dir/0001` with
members `jpg`, `cls`, `json`, as webdataset does: the extension is everything after the
first dot of the file name).

Members map to inputs, the label and passthrough columns by extension, as features do:
`input.image_feature: jpg`, `input.label_feature: cls` (a decimal integer as text),
`input.passthrough: {json: string}`. The key is the sample's basename (the dataset's own
id). The tar is read with Python's `tarfile` (a sequential container TensorFlow has no
reader for): bytes only, one sample at a time, into tf.data, where decoding happens.

A sample that lacks a member the run reads is a `missing_member` dead letter; a tar that
stops part-way keeps the samples before the damage and reports it on the shard.
"""

from __future__ import annotations

import posixpath
import tarfile

import numpy as np

from ..deadletters import Failure
from ..errors import first_line
from ._common import explain_by_retry, sentinel_row, tagged
from .images import classify_image, decode_image
from .tensors import decode_tensor

__all__ = ["FRAMED", "dataset", "parser", "explain", "check_end", "check_inputs", "estimate_examples", "samples"]

FRAMED = False
_KEY = "__key__"
_MISSING = "__missing__"


def _members(spec) -> list[str]:
    inputs = spec.inputs or {"": spec.image_feature}
    names = [v if isinstance(v, str) else v["feature"] for v in inputs.values()]
    names += [c for c in (spec.label_feature,) if c]
    names += list(spec.passthrough)
    return list(dict.fromkeys(names))


def _split(name: str) -> tuple[str, str]:
    folder, base = posixpath.split(name)
    stem, _, ext = base.partition(".")
    return posixpath.join(folder, stem), ext


def samples(path: str, wanted: list[str]):
    """Yield `(key, {extension: bytes})` per sample, in tar order; stops quietly where the
    tar is damaged (`check_end` reports it)."""
    key, members = None, {}
    try:
        with tarfile.open(path, "r:*") as tar:
            for info in tar:
                if not info.isfile():
                    continue
                k, ext = _split(info.name)
                if k != key:
                    if key is not None:
                        yield key, members
                    key, members = k, {}
                if ext in wanted:
                    members[ext] = tar.extractfile(info).read()
    except (tarfile.TarError, OSError, EOFError):
        pass
    if key is not None:
        yield key, members


def check_inputs(spec, plans) -> None:
    if spec.key_feature:
        raise ValueError("input.key_feature is set, but WebDataset samples are keyed by their basename; remove it")


def dataset(paths, spec):
    import tensorflow as tf

    wanted = _members(spec)
    signature = {_KEY: tf.TensorSpec([], tf.string), _MISSING: tf.TensorSpec([], tf.string), **{m: tf.TensorSpec([], tf.string) for m in wanted}}

    def gen():
        for key, members in samples(paths[0], wanted):
            out = {_KEY: key.encode("utf-8", "surrogateescape"), _MISSING: ",".join(m for m in wanted if m not in members).encode()}
            out.update({m: members.get(m, b"") for m in wanted})
            yield out

    return tf.data.Dataset.from_generator(gen, output_signature=signature)


def parser(shard, cfg, plans, preprocess):
    import tensorflow as tf

    types = {"int64": tf.int64, "float32": tf.float32}

    def utf8(value):
        return tf.strings.unicode_transcode(value, "UTF-8", "UTF-8", errors="strict")

    def number(text, dtype):
        return tf.strings.to_number(tf.strings.strip(text), out_type=dtype)

    def parse(index, item):
        sample, is_sentinel, nbytes = item

        def real():
            check = tf.debugging.assert_equal(sample[_MISSING], "", message="missing_member")
            with tf.control_dependencies([check]):
                out = {}
                for n, p in plans.items():
                    v = sample[p.feature]
                    if p.kind == "image":
                        out[f"__input__{n}"] = decode_image(v, p.shape, cfg, preprocess)
                    elif p.encoding == "raw" or p.read_dtype == "string":
                        out[f"__input__{n}"] = decode_tensor(v if p.encoding == "raw" else tf.reshape(v, [1]), p)
                    else:  # numbers as text, separated by spaces or commas
                        values = tf.strings.split(tf.strings.regex_replace(tf.strings.strip(v), "[,\\s]+", " "), " ")
                        out[f"__input__{n}"] = decode_tensor(tf.strings.to_number(values, tf.float64 if p.read_dtype.startswith("float") else tf.int64), p)
                out["key"] = utf8(sample[_KEY])
                if cfg.label_feature:
                    label = sample[cfg.label_feature]
                    out["label"] = utf8(tf.strings.strip(label)) if cfg.label_type == "string" else number(label, tf.int64)
                for name, typ in cfg.passthrough.items():
                    out[name] = utf8(sample[name]) if typ == "string" else number(sample[name], types[typ])
            return out

        def fake():
            return sentinel_row(cfg, plans)

        return tagged(is_sentinel, fake, real, index, nbytes)

    return parse


def check_end(shard, spec, local_path, consumed):
    """A tar that stops part-way (a truncated download) is one shard-level dead letter."""
    try:
        with tarfile.open(local_path, "r:*") as tar:
            for _ in tar:
                pass
        return None, 1 << 62
    except (tarfile.TarError, OSError, EOFError) as e:
        return Failure(None, shard.paths[0], "read", "corrupt_shard", f"the tar file stops part-way ({first_line(e)}); kept the samples before the damage; re-create or re-download the file"), 1 << 62


def estimate_examples(spec, shards, budget: int = 2000) -> int | None:
    """Samples counted from the tar headers of the first shards (members are not read),
    scaled by size for the rest."""
    from .._fs import LocalBridge

    counts, sizes = [], []
    for s in shards[:3]:
        bridge = LocalBridge(s.paths[:1])
        try:
            keys = set()
            with tarfile.open(bridge.paths[0], "r:*") as tar:
                for info in tar:
                    if info.isfile():
                        keys.add(_split(info.name)[0])
            counts.append(len(keys))
            sizes.append(s.size)
        except (tarfile.TarError, OSError, EOFError):
            return None
        finally:
            bridge.close()
    cap = spec.max_examples_per_shard
    if len(counts) == len(shards):
        return sum(min(c, cap) if cap else c for c in counts)
    per_byte = sum(counts) / max(1, sum(sizes))
    est = counts + [round(s.size * per_byte) for s in shards[len(counts):]]
    return sum(min(c, cap) if cap else c for c in est)


def explain(shard, cfg, plans, preprocess, parse, local_paths, missing: np.ndarray) -> list[Failure]:
    """One `Failure` per missing sample, read again from the tar (bad path only)."""
    import tensorflow as tf

    wanted = _members(cfg)
    want = set(missing.tolist())
    found = {}
    for i, (key, members) in enumerate(samples(local_paths[0], wanted)):
        if i not in want:
            continue
        shown = key.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
        try:
            key.encode("utf-8")
        except UnicodeEncodeError:
            found[i] = Failure(i, shown, "decode", "invalid_utf8", f"the sample's name {shown!r} is not UTF-8 text")
            continue
        lacking = [m for m in wanted if m not in members]
        if lacking:
            found[i] = Failure(i, shown, "decode", "missing_member", f"sample {shown!r} has no .{lacking[0]} member; it has: {', '.join(sorted(members)) or 'none the run reads'}")
            continue
        failure = None
        for p in plans.values():
            if p.kind == "image":
                bad = classify_image(members[p.feature], p.shape[-1], getattr(cfg, "max_image_pixels", None))
                if bad:
                    failure = Failure(i, shown, "decode", bad[0], f"member .{p.feature}: {bad[1]}")
                    break
        if failure is None:
            item = {_KEY: tf.constant(key.encode("utf-8", "surrogateescape")), _MISSING: tf.constant(b""), **{m: tf.constant(members[m]) for m in wanted}}
            failure = explain_by_retry(i, shown, parse, item)
        found[i] = failure
    return [found.get(i) or Failure(i, f"{posixpath.basename(shard.paths[0])}:{i}", "read", "unreadable_file", "the sample could not be read again to explain its failure") for i in missing.tolist()]
