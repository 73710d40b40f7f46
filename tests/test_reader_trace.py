"""The TFRecord reader traces its parser once per worker (not once per shard), without
AutoGraph for layerbeam's own code, and still converts a user's preprocessing function."""

from __future__ import annotations

import numpy as np

from tests.conftest import base_config


def _read(shard, spec, preprocess):
    from layerbeam.transforms.readers import read_shard

    batches = [b for b, _ in read_shard(shard, spec, {"input": (64, 64, 3)}, preprocess, 4) if b is not None]
    return {k.decode(): x for b in batches for k, x in zip(b.columns["key"], b.inputs["input"].numpy())}


def test_every_shard_reuses_one_traced_parser_and_a_users_tensor_branch_still_runs(png_dataset, tmp_path):
    from layerbeam.config import load_config, to_spec
    from layerbeam.transforms.models import preprocess_fn
    from layerbeam.transforms.readers import match_shards, plan_inputs, tfrecord

    folder, images, _ = png_dataset
    raw = base_config(f"{folder}/*.tfrecord", str(tmp_path / "out"), **{"input.preprocess": "tests.tiny:branchy_preprocess"})
    spec = to_spec(load_config(raw=raw)).input
    shards = match_shards(spec.pattern, "tfrecord", spec=spec)
    pre = preprocess_fn("tests.tiny:branchy_preprocess", "x")
    plans = plan_inputs(spec, {"input": (64, 64, 3)})
    parsers = {id(tfrecord.parser(s, spec, plans, pre)) for s in shards}
    assert len(parsers) == 1  # one trace for the worker's shards (keys come from a feature)
    got = {}
    for s in shards:
        got.update(_read(s, spec, pre))
    assert sorted(got) == sorted(images)
    for k, img in images.items():  # 64×64 read at 64×64: the resize keeps the pixels; the branch scaled them
        np.testing.assert_allclose(got[k], img.astype(np.float32) / 255.0, atol=1e-6)
    # without a key feature each shard's keys name its file: a parser per shard
    keyless = to_spec(load_config(raw=dict(raw, input={k: v for k, v in raw["input"].items() if k != "key_feature"}))).input
    assert len({id(tfrecord.parser(s, keyless, plans, pre)) for s in shards}) == len(shards)
    assert sorted(_read(shards[1], keyless, pre)) == [f"{shards[1].paths[0].rsplit('/', 1)[-1]}:{i}" for i in range(3)]


def _all(shard, spec, pre, readers=None, max_examples=None):
    """Every batch of a shard (keys, inputs) and its end, through `readers` or a pipeline of its own."""
    from layerbeam.transforms.readers import read_shard

    rows, end = {}, None
    for b, so_far in read_shard(shard, spec, {"input": (64, 64, 3)}, pre, 4, max_examples, None, readers):
        if b is None:
            end = so_far
        else:
            rows.update({k.decode(): x for k, x in zip(b.columns["key"], b.inputs["input"].numpy())})
    return rows, end


def test_one_long_lived_pipeline_reads_shard_after_shard_as_a_pipeline_per_shard_would(png_dataset, tmp_path):
    """`ShardReaders`: every shard of a worker goes through one tf.data iterator (no new
    iterator, so no new function instantiation, per shard), and gives exactly what a
    pipeline of the shard's own gives: keys (from a feature, or naming each shard's file),
    decoded inputs, counts, a `max_examples` cap. A shard left part-way discards its
    pipeline; the next shard gets a fresh one and is read whole."""
    from layerbeam.config import load_config, to_spec
    from layerbeam.transforms.models import preprocess_fn
    from layerbeam.transforms.readers import ShardReaders, match_shards, read_shard

    folder, images, _ = png_dataset
    raw = base_config(f"{folder}/*.tfrecord", str(tmp_path / "out"))
    keyless_raw = dict(raw, input={k: v for k, v in raw["input"].items() if k != "key_feature"})
    pre = preprocess_fn("auto", "keras.applications.MobileNetV2")
    for r in (raw, keyless_raw):
        spec = to_spec(load_config(raw=r)).input
        shards = match_shards(spec.pattern, "tfrecord", spec=spec)
        readers = ShardReaders(spec, {"input": (64, 64, 3)}, pre, 4)
        leased = []
        lease = readers.lease
        readers.lease = lambda: leased.append(lease()) or leased[-1]
        for cap in (None, 2):
            for s in shards:
                want, want_end = _all(s, spec, pre, max_examples=cap)
                got, got_end = _all(s, spec, pre, readers, max_examples=cap)
                assert sorted(got) == sorted(want) and len(got) == (min(cap, len(want)) if cap else len(want))
                for k in want:
                    np.testing.assert_array_equal(got[k], want[k])
                assert got_end == want_end
        assert len({id(p) for p in leased}) == 1 and len(leased) == 2 * len(shards)
        if r is raw:
            assert sorted(k for s in shards for k in _all(s, spec, pre, readers)[0]) == sorted(images)
        else:
            assert sorted(_all(shards[1], spec, pre, readers)[0]) == [f"{shards[1].paths[0].rsplit('/', 1)[-1]}:{i}" for i in range(3)]

    # left part-way: that pipeline is discarded, the next shard reads whole through a new one
    first = next(iter(read_shard(shards[0], spec, {"input": (64, 64, 3)}, pre, 4, None, None, readers)))
    assert first[0] is not None and len(first[0]) == 4  # the sentinel, in the next batch, is not read
    assert readers._idle == []
    got, end = _all(shards[0], spec, pre, readers)
    assert len(got) == 4 and end.records == 4 and len(readers._idle) == 1 and readers._idle[0] is not leased[0]


def test_a_process_with_a_waiting_pipeline_exits_promptly(png_dataset, tmp_path):
    """A long-lived pipeline waits for its next shard inside tf.data's generator thread;
    the process still exits (the pipeline is ended at exit, not joined while it waits)."""
    import subprocess
    import sys

    folder, _, _ = png_dataset
    code = f"""
from layerbeam.config import load_config, to_spec
from layerbeam.transforms.models import preprocess_fn
from layerbeam.transforms.readers import ShardReaders, match_shards, read_shard
from tests.conftest import base_config
spec = to_spec(load_config(raw=base_config({str(folder) + '/*.tfrecord'!r}, {str(tmp_path / 'o')!r}))).input
pre = preprocess_fn("auto", "keras.applications.MobileNetV2")
readers = ShardReaders(spec, {{"input": (64, 64, 3)}}, pre, 4)
n = sum(len(b) for b, _ in read_shard(match_shards(spec.pattern, "tfrecord", spec=spec)[0], spec, {{"input": (64, 64, 3)}}, pre, 4, None, None, readers) if b is not None)
print("read", n, "idle", len(readers._idle))
"""
    root = __import__("pathlib").Path(__file__).resolve().parents[1]
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=root, env={**__import__("os").environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    assert p.returncode == 0, p.stderr[-2000:]
    assert "read 4 idle 1" in p.stdout
