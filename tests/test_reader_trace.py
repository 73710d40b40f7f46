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
